"""The standard benchmarks' scorer: each context computed once and shared by its choices
gives, to float tolerance, what scoring every (context, continuation) alone gives (the way
lm-evaluation-harness scores them), on a tiny random Llama and a character tokenizer, odd
lengths, shared and distinct contexts, and pairs longer than the window."""

import math

import pytest
import torch

from trace_ft.benchmarks.scoring import encode_pair, score_choices

pytest.importorskip("transformers")


def tiny_llama(window=64, vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=window,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def encode(text):  # a character tokenizer: ids 3.. for letters, spaces and punctuation
    return [3 + (ord(ch) % 37) for ch in text]


def random_pairs(gen, questions=11):
    words = ["alpha", "be", "gamma delta", "e", "zeta eta theta", "io", "kappa"]
    out = []
    for q in range(questions):
        pick = lambda k: " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=gen))  # noqa: E731
        ctx = f"Question {q}: {pick(int(torch.randint(1, 6, (1,), generator=gen)))}\nAnswer:"
        k = int(torch.randint(2, 5, (1,), generator=gen))
        choices = [(ctx, " " + pick(int(torch.randint(1, 4, (1,), generator=gen)))) for _ in range(k)]
        if q % 4 == 3:  # Winogrande's kind: contexts differ, continuations agree
            choices = [(ctx + f" option {i}", " and the rest") for i in range(k)]
        out.append(choices)
    return out


def test_shared_context_scoring_equals_scoring_each_choice_alone():
    gen = torch.Generator().manual_seed(1)
    model, pairs = tiny_llama(), random_pairs(gen)
    shared = score_choices(model, encode, pairs, prefix_id=1, pad_id=0, tokens_per_batch=96)
    alone = score_choices(model, encode, pairs, prefix_id=1, pad_id=0, share=False)
    for q, (a, b) in enumerate(zip(shared, alone)):
        for c, (x, y) in enumerate(zip(a, b)):
            assert x.tokens == y.tokens, (q, c)
            assert math.isclose(x.loglik, y.loglik, rel_tol=1e-5, abs_tol=1e-4), (q, c, x, y)
    # a direct check of what "alone" means: one forward over context + continuation
    (ctx, cont), = [pairs[0][0]]
    cids, kids = encode_pair(encode, ctx, cont)
    ids = torch.tensor([cids + kids])
    logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, -len(kids):]
    want = float(logp.gather(-1, torch.tensor(kids).unsqueeze(-1)).sum())
    assert math.isclose(alone[0][0].loglik, want, rel_tol=1e-6, abs_tol=1e-5)


def test_a_context_prefix_starts_every_context():
    """Where the tokenizer starts a text with bos (Gemma), every context starts with it,
    shared or alone, and an empty context is it alone: the continuation's log-likelihood is
    read after [bos] + context."""
    gen = torch.Generator().manual_seed(2)
    model, pairs = tiny_llama(window=128), random_pairs(gen, questions=5) + [[("", " alpha"), ("", " be")]]
    shared = score_choices(model, encode, pairs, prefix_id=1, pad_id=0, context_prefix=[1], tokens_per_batch=96)
    alone = score_choices(model, encode, pairs, prefix_id=1, pad_id=0, context_prefix=[1], share=False)
    plain = score_choices(model, encode, pairs, prefix_id=1, pad_id=0)
    for q, (a, b) in enumerate(zip(shared, alone)):
        for c, (x, y) in enumerate(zip(a, b)):
            assert math.isclose(x.loglik, y.loglik, rel_tol=1e-5, abs_tol=1e-4), (q, c)
    for q, (ctx, cont) in enumerate([pairs[0][0], pairs[-1][0]]):
        cids, kids = encode_pair(encode, ctx, cont)
        ids = torch.tensor([[1] + cids + kids])
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, -len(kids):]
        want = float(logp.gather(-1, torch.tensor(kids).unsqueeze(-1)).sum())
        got = (alone[0][0], alone[-1][0])[q]
        assert math.isclose(got.loglik, want, rel_tol=1e-6, abs_tol=1e-5)
    # an empty context reads [bos] either way; a non-empty one differs with the prefix
    assert alone[-1][0].loglik == pytest.approx(plain[-1][0].loglik, rel=1e-6)
    assert abs(alone[0][0].loglik - plain[0][0].loglik) > 1e-4


def test_trailing_context_space_moves_to_the_continuation():
    ctx, cont = encode_pair(encode, "Answer: ", "yes")
    assert ctx == encode("Answer:") and cont == encode(" yes")


def test_pairs_longer_than_the_window_are_truncated_from_the_left():
    model = tiny_llama(window=16)
    long_ctx = "x" * 40 + "\nAnswer:"
    pairs = [[(long_ctx, " short"), (long_ctx, " " + "y" * 30)], [("ok", " fine")]]
    got = score_choices(model, encode, pairs, prefix_id=1, pad_id=0)
    assert got[0][0].tokens == len(" short") and got[0][1].tokens == 16  # only the window's last tokens
    assert all(math.isfinite(s.loglik) for row in got for s in row)
    with pytest.raises(ValueError, match="has no tokens"):
        score_choices(model, lambda t: [] if t == "" else encode(t), [[("a", "")]], prefix_id=1, pad_id=0)
