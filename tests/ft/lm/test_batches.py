"""trace_ft.lm.batches: answers are the only labelled tokens, the set is a dataset, and the
seeded sampler repeats."""

import pytest
import torch

from trace_ft.lm.batches import IGNORE, EncodedSet, sample_batches
from trace_ft.lm.text import CharTokenizer
from trace_ft.tasks import Example


def test_labels_cover_the_answer_and_eos_only():
    tok = CharTokenizer()
    enc = EncodedSet([Example("ab=", "xy"), Example("abcd=", "z")], tok)
    batch = enc.collate([enc[0], enc[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 1 + 5 + 2)
    row = batch["labels"][0]
    labelled = row[row != IGNORE].tolist()
    assert labelled == tok.encode("xy") + [tok.eos_id]
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0]   # bos a b = x y eos, padding
    assert torch.equal(enc.batch([0, 1])["input_ids"], batch["input_ids"])


def test_max_len_keeps_the_answer():
    enc = EncodedSet([Example("a" * 30 + "=", "xyz")], CharTokenizer(), max_len=10)
    assert len(enc.prompts[0]) + len(enc.answers[0]) == 10 and enc.answers[0][:3] == CharTokenizer().encode("xyz")


def test_sampler_is_seeded():
    enc = EncodedSet([Example(f"p{i}=", str(i)) for i in range(20)], CharTokenizer())
    a = [b["input_ids"] for b in sample_batches([enc], 4, 6, seed=3)]
    b = [b["input_ids"] for b in sample_batches([enc], 4, 6, seed=3)]
    c = [b["input_ids"] for b in sample_batches([enc], 4, 6, seed=4)]
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_label_only_logits_give_the_models_own_loss_and_gradient(monkeypatch):
    """Past FULL_LOGITS_BYTES the loss is computed from the logits of the positions that
    predict a label only (a 262k vocabulary's full logits are GBs); loss and gradient are
    the model's own, and the logits the same numbers."""
    import pytest

    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_ft.lm import batches as B
    from trace_ft.lm.train import causal_lm_loss

    torch.manual_seed(0)
    tok = CharTokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    enc = EncodedSet([Example("a long prompt here=", "xy"), Example("short=", "answer z")], tok)
    batch = enc.batch([0, 1])
    want = model(**batch).loss
    (g_want,) = torch.autograd.grad(want, model.model.layers[0].mlp.up_proj.weight)
    full_logits, full_labels = B.label_logits(model, batch)
    monkeypatch.setattr(B, "FULL_LOGITS_BYTES", 0)
    logits, labels = B.label_logits(model, batch)
    first = full_labels.shape[1] - labels.shape[1]
    assert first > 0 and torch.equal(labels, full_labels[:, first:])
    torch.testing.assert_close(logits, full_logits[:, first:], rtol=1e-5, atol=1e-6)
    got = causal_lm_loss(model, batch)
    (g_got,) = torch.autograd.grad(got, model.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_the_head_runs_on_the_labelled_positions_only(monkeypatch):
    """`labelled_logits` gathers the hidden states of the positions that predict a label
    before the output head: as many rows as labels, each the model's own logits there; the
    loss and gradient are the model's. Without a head module, or with one the model does
    not call: the same numbers, cut from the logits."""
    import pytest

    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_ft.lm import batches as B
    from trace_ft.lm.train import causal_lm_loss

    torch.manual_seed(0)
    tok = CharTokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    enc = EncodedSet([Example("a long prompt here=", "xy"), Example("short=", "answer z"),
                      Example("mid prompt=", "q")], tok)
    batch = enc.batch([0, 1, 2])
    want = model(**batch).loss
    (g_want,) = torch.autograd.grad(want, model.model.layers[0].mlp.up_proj.weight)
    full_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    where = labels != B.IGNORE
    monkeypatch.setattr(B, "FULL_LOGITS_BYTES", 0)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape))
    logits, got_labels = B.labelled_logits(model, batch)
    hook.remove()
    assert rows == [torch.Size([int(where.sum()), 32])]  # the head saw the labelled positions only
    assert torch.equal(got_labels, labels[where])
    torch.testing.assert_close(logits, full_logits[where], rtol=1e-5, atol=1e-6)
    got = causal_lm_loss(model, batch)
    (g_got,) = torch.autograd.grad(got, model.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    # a module the model never calls: its logits from the first label on, cut to the labelled rows
    monkeypatch.setattr(B, "_output_head", lambda m: torch.nn.Identity())
    cut, cut_labels = B.labelled_logits(model, batch)
    assert torch.equal(cut_labels, got_labels)
    torch.testing.assert_close(cut, logits, rtol=1e-5, atol=1e-6)
    # no output-embeddings module: label_logits' rows, flattened (IGNORE among the labels)
    monkeypatch.setattr(B, "_output_head", lambda m: None)
    flat, flat_labels = B.labelled_logits(model, batch)
    torch.testing.assert_close(flat[flat_labels != B.IGNORE], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_lm_loss(model, batch), want, rtol=1e-6, atol=1e-7)


class _Prompts:
    """What greedy_decode reads of an encoded set: prompts of token ids and a pad id."""

    def __init__(self, prompts, pad_id=0):
        self.prompts, self.answers, self.pad_id = prompts, [[1]] * len(prompts), pad_id

    def __len__(self):
        return len(self.prompts)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_decode_drops_rows_at_eos_and_keeps_every_rows_tokens(family):
    """A row that reaches eos leaves the batch (and the KV cache, sliding-window layers too):
    every row's tokens are those of decoding without eos, cut at its first eos, and the
    forward passes shrink as rows end."""
    pytest.importorskip("transformers")
    from trace_ft.lm.batches import greedy_decode

    from .test_precision import tiny_gemma3, tiny_llama

    model = tiny_llama() if family == "llama" else tiny_gemma3()
    gen = torch.Generator().manual_seed(3)
    enc = _Prompts([torch.randint(1, 64, (int(n),), generator=gen).tolist()
                    for n in torch.randint(2, 9, (10,), generator=gen)])
    free = greedy_decode(model, enc, max_new_tokens=12)   # no eos: every row 12 tokens
    assert [len(r) for r in free] == [12] * 10

    def ends(v):  # each row's first step emitting v (None: never)
        return [r.index(v) if v in r else None for r in free]

    # an eos at which rows end at different steps and one row never does
    eos = max(range(64), key=lambda v: (None in ends(v)) * len({e for e in ends(v) if e is not None}))
    steps = ends(eos)
    assert None in steps and len({e for e in steps if e is not None}) >= 2
    sizes = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: sizes.append(a[0].shape[0]))
    got = greedy_decode(model, enc, max_new_tokens=12, eos_id=eos)
    hook.remove()
    assert got == [r[:e] if e is not None else r for r, e in zip(free, steps)]
    # the prompt pass and one pass a step, each with the rows not yet ended
    live = [sum(1 for e in steps if e is None or e >= t) for t in range(12)]
    assert sizes == [10] + live[1:]
