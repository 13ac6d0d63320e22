"""trace_ft.evaluate: greedy decoding scored by each task's scorer."""

import math

import pytest
import torch
from torch import nn

from trace_ft.evaluate import Evaluator
from trace_ft.lm.text import CharTokenizer
from trace_ft.tasks import Example, Task


class Out(dict):
    @property
    def logits(self):
        return self["logits"]


class SaysA(nn.Module):
    """Answers "a" to every prompt, then ends: what greedy decoding must read back."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, **kw):
        logits = torch.zeros(*input_ids.shape, self.tok.vocab_size)
        first = input_ids.shape[1] > 1          # the prompt pass, then one token per step
        logits[:, -1, self.tok.encode("a")[0] if first else self.tok.eos_id] = 1.0
        return Out(logits=logits, past_key_values=None)


def test_scores_are_the_tasks_scores_of_the_decoded_answers():
    tok = CharTokenizer()
    all_a = Task("all_a", [], [Example(f"p{i}=", "a") for i in range(4)])
    half = Task("half", [], [Example("x=", "a"), Example("y=", "b"), Example("z=", " a "),
                             Example("w=", "ab")])
    label = Task("label", [], [Example("q=", "a"), Example("r=", "b")], scorer="label")
    scores = Evaluator([all_a, half, label], tok)(SaysA(tok))
    assert scores["exact"] == [100.0, 50.0, 50.0]
    # partial credit: "a" for "ab" is half right
    assert scores["edit"] == [100.0, 62.5, 50.0]
    # teacher-forced, the stand-in model's logits are flat before the last position: every
    # answer token has probability 1/vocabulary
    assert scores["loglik"] == pytest.approx([-math.log(tok.vocab_size)] * 3)


def test_edit_similarity():
    from trace_ft.evaluate import edit_similarity

    assert edit_similarity("kitten", "sitting") == 1 - 3 / 7
    assert edit_similarity(" abc ", "abc") == 1.0 and edit_similarity("", "") == 1.0
    assert edit_similarity("", "ab") == 0.0


def test_text_perplexity_is_the_exponent_of_the_mean_token_loss():
    """Back-to-back windows, every token but a window's first predicted; the result is
    exp(mean cross-entropy) of exactly those tokens, in any batch size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_ft.evaluate import TextPerplexity

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    text = "The quick brown fox jumps over the lazy dog. " * 10   # 450 characters
    ppl = TextPerplexity(text, tok, window=64, batch_size=3)
    assert ppl.tokens == 7 * 63                                  # 7 whole windows of 64
    ids = torch.tensor(tok.encode(text)[:7 * 64]).view(7, 64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    want = math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1))))
    assert ppl(model) == pytest.approx(want, rel=1e-5)
    assert TextPerplexity(text, tok, window=64, batch_size=8)(model) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than two windows"):
        TextPerplexity("short", tok, window=64)


def test_text_perplexity_starts_each_window_as_the_tokenizer_starts_a_text():
    """A tokenizer that starts a text with bos (Gemma's): each window is bos and 63 text
    tokens, every text token predicted (the first from bos alone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_ft.evaluate import TextPerplexity

    class BosChars(CharTokenizer):
        text_prefix = [0]

    tok = BosChars()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    text = "The quick brown fox jumps over the lazy dog. " * 10
    ppl = TextPerplexity(text, tok, window=64, batch_size=3)
    assert ppl.tokens == 7 * 63 and ppl.windows[:, 0].eq(0).all()  # 7 windows of bos + 63 characters
    ids = torch.tensor(tok.encode(text)[:7 * 63]).view(7, 63)
    ids = torch.cat([torch.zeros(7, 1, dtype=torch.long), ids], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    want = math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1))))
    assert ppl(model) == pytest.approx(want, rel=1e-5)
    assert TextPerplexity(text, CharTokenizer(), window=64).signature() != ppl.signature()


def test_text_sets_score_every_token_without_framing():
    from trace_ft.lm.batches import EncodedSet

    tok = CharTokenizer()
    enc = EncodedSet([Example("", "hello world"), Example("", "abc")], tok, max_len=5, text=True)
    assert enc.prompts == [[], []] and enc.answers == [tok.encode("hello"), tok.encode("abc")]

    class BosChars(CharTokenizer):  # a tokenizer that starts a text with bos (Gemma's)
        text_prefix = [0]

    bos = EncodedSet([Example("", "hello world")], BosChars(), max_len=5, text=True)
    assert bos.prompts == [[0]] and bos.answers == [tok.encode("hell")]  # bos read, never scored
    batch = enc.batch([0, 1])
    assert batch["labels"][0].tolist() == tok.encode("hello")
    assert batch["labels"][1].tolist()[:3] == tok.encode("abc") and batch["labels"][1, 3:].eq(-100).all()
