"""Base-model scores kept across runs (store.scores): filed under the weights' digest (one
changed element, a dtype or a buffer is another model), the tokenizer and what was scored;
a sequence built twice measures the untrained model once and reads the same numbers back."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from trace_ft.continual.sequence import TaskSequence
from trace_ft.lm.model import BuiltinSpec, builtin_config
from trace_ft.lm.text import CharTokenizer
from trace_ft.store.scores import ScoreCache, weights_digest
from trace_ft.tasks import builtin_task


def _model(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(builtin_config(BuiltinSpec(hidden=32, layers=1, heads=2, intermediate=64),
                                           CharTokenizer().vocab_size)).eval()


def test_the_weights_digest_sees_every_element_dtype_and_buffer():
    m = _model()
    d0 = weights_digest(m)
    assert weights_digest(_model()) == d0
    with torch.no_grad():
        p = m.model.layers[0].mlp.up_proj.weight
        p.view(-1)[17] = torch.nextafter(p.view(-1)[17], torch.tensor(1.0))
    assert weights_digest(m) != d0
    assert weights_digest(_model().to(torch.bfloat16)) != d0
    m2 = _model()
    m2.register_buffer("extra", torch.zeros(3))
    assert weights_digest(m2) != d0


def test_get_or_computes_once_and_files_under_what_was_scored(tmp_path):
    cache = ScoreCache(tmp_path, _model(), CharTokenizer().fingerprint())
    calls = []
    compute = lambda: calls.append(1) or {"exact": 12.5}  # noqa: E731
    assert cache.get_or({"kind": "task", "name": "a"}, compute) == {"exact": 12.5}
    assert cache.get_or({"kind": "task", "name": "a"}, compute) == {"exact": 12.5}
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    cache.get_or({"kind": "task", "name": "b"}, compute)
    assert len(calls) == 2
    # another model, or another tokenizer, shares nothing
    other = ScoreCache(tmp_path, _model(seed=1), CharTokenizer().fingerprint())
    other.get_or({"kind": "task", "name": "a"}, compute)
    ScoreCache(tmp_path, _model(), CharTokenizer("abc").fingerprint()).get_or({"kind": "task", "name": "a"}, compute)
    assert len(calls) == 4
    # a torn or foreign file is measured anew, not trusted
    path = cache.path({"kind": "task", "name": "a"})
    path.write_text("{not json")
    assert cache.get_or({"kind": "task", "name": "a"}, compute) == {"exact": 12.5} and len(calls) == 5
    path.write_text(json.dumps({"what": {"kind": "other"}, "value": 99}))
    assert cache.get_or({"kind": "task", "name": "a"}, compute) == {"exact": 12.5} and len(calls) == 6


def test_a_sequence_scores_the_untrained_model_once_across_builds(tmp_path):
    tok, base = CharTokenizer(), _model()
    tasks = [builtin_task("rev", n_train=8, n_test=6), builtin_task("sub", n_train=8, n_test=6)]
    first = TaskSequence.build(tasks, None, base, tok, cache=ScoreCache(tmp_path, base, tok.fingerprint()))
    cache = ScoreCache(tmp_path, base, tok.fingerprint())
    again = TaskSequence.build(tasks, None, base, tok, cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)
    assert again.row0 == first.row0 == TaskSequence.build(tasks, None, base, tok).row0
    other_tasks = [builtin_task("rev", seed=1, n_train=8, n_test=6)]
    TaskSequence.build(other_tasks, None, base, tok, cache=cache)
    assert cache.misses == 1  # another test set is another measurement
