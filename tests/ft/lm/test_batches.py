"""trace_ft.lm.batches: answers are the only labelled tokens, the set is a dataset, and the
seeded sampler repeats."""

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
