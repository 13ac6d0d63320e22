"""trace_ft.lm.precision: which devices multiply bf16 natively, and attention kept in fp32
under CPU autocast (the bf16 probe's faster kernel) with the model's own masks."""

import pytest
import torch
import torch.nn.functional as F

from trace_ft.lm import precision
from trace_ft.lm.precision import fp32_attention, native_bf16, with_fp32_attention
from trace_ft.lm.train import causal_lm_loss


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def tiny_gemma3():
    """Gemma 3's text model: a sliding-window layer (window 4, so the window masks too) and a
    global one, each with its own mask."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           query_pre_attn_scalar=8)
    cfg._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(cfg)


def padded_batch():
    ids = torch.randint(1, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the mask matters to every position of row 0
    mask[2, :7] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_native_bf16_names_no_device_it_cannot_know():
    assert native_bf16("bogus-device") is False
    assert native_bf16("meta") is False
    assert isinstance(native_bf16("cpu"), bool)


def record_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append({"q": q.detach().clone(), "v": v.detach().clone(), "autocast": torch.is_autocast_enabled("cpu"),
                      "mask": None if attn_mask is None else attn_mask.clone(), "causal": kw.get("is_causal")})
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_attention_runs_in_fp32_under_cpu_autocast_with_the_same_inputs_and_mask(monkeypatch, make):
    model, batch = make(), padded_batch()
    calls = record_sdpa(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = causal_lm_loss(model, batch)
        with fp32_attention(model):
            assert model.config._attn_implementation == precision.FP32_SDPA
            kept = causal_lm_loss(model, batch)
    assert model.config._attn_implementation == "sdpa"  # restored on leaving
    assert len(calls) == 4  # two layers, twice
    for plain_call, fp32_call in zip(calls[:2], calls[2:]):  # layer by layer
        # plain: autocast casts q, k, v to bf16 inside the op; kept: fp32 in, autocast off around it
        assert plain_call["autocast"] and plain_call["v"].dtype == torch.bfloat16
        assert not fp32_call["autocast"] and fp32_call["q"].dtype == fp32_call["v"].dtype == torch.float32
        assert plain_call["causal"] == fp32_call["causal"]
        m16, m32 = plain_call["mask"], fp32_call["mask"]  # the model's own mask, as sdpa gets it
        assert m16 is not None  # (left padding: a mask the kernel must apply)
        assert torch.equal(m16, m32) if m16.dtype == torch.bool else torch.equal(m16.float(), m32)
    # layer 0's inputs: the same projections feed both
    plain_call, fp32_call = calls[0], calls[2]
    assert torch.equal(fp32_call["v"].bfloat16(), plain_call["v"]) and torch.equal(fp32_call["q"], plain_call["q"])
    if make is tiny_gemma3:  # the sliding layer's mask is not the global one's
        assert not torch.equal(calls[0]["mask"], calls[1]["mask"])
    # the loss of fp32 attention is nearer the fp32 model's than a loss with the mask ignored
    with torch.no_grad():
        ref = causal_lm_loss(model, batch)
        unmasked = causal_lm_loss(model, {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])})
    assert abs(float(kept.detach()) - float(ref)) < 0.5 * abs(float(unmasked) - float(ref))
    assert kept.dtype == plain.dtype == torch.float32


def test_fp32_attention_changes_nothing_outside_cpu_autocast(monkeypatch):
    model, batch = tiny_llama(), padded_batch()
    with torch.no_grad():
        ref = causal_lm_loss(model, batch)
        with fp32_attention(model):
            assert model.config._attn_implementation == "sdpa"
            same = with_fp32_attention(causal_lm_loss)(model, batch)
    assert torch.equal(ref, same)
    model.config._attn_implementation = "eager"  # another kernel: left alone under autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16), fp32_attention(model):
        assert model.config._attn_implementation == "eager"


def test_the_config_is_restored_when_the_loss_raises():
    model = tiny_llama()

    def broken(m, batch):
        assert m.config._attn_implementation == precision.FP32_SDPA
        raise RuntimeError("boom")

    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="boom"):
        with_fp32_attention(broken)(model, padded_batch())
    assert model.config._attn_implementation == "sdpa"
