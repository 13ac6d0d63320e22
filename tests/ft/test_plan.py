"""The plan line's estimate: each task's step scaled by the tokens of its batches, so a suite
of short and long prompts is not costed as if every task were the first."""

from types import SimpleNamespace

import pytest

from trace_ft.config.plan import TRACE_STEP, batch_tokens, estimate, task_step_seconds
from trace_ft.continual.strategies import Trace
from trace_ft.lm.text import CharTokenizer
from trace_ft.tasks.base import Example, Task


def _task(name, prompt_len, n=24):
    examples = [Example("p" * prompt_len + str(i), "a" * 3) for i in range(n)]
    return Task(name, examples, examples[:4])


def _setup(*tasks):
    return SimpleNamespace(cfg=SimpleNamespace(batch_size=4, max_len=512), codec=CharTokenizer(), tasks=list(tasks))


def test_a_task_of_long_prompts_costs_its_tokens():
    short, long_ = _task("short", 20), _task("long", 200)
    setup = _setup(short, long_, short)
    steps = task_step_seconds(setup, 2.0)
    # (the timed batch is the first task's first; its others differ by a digit)
    assert steps[0] == pytest.approx(2.0, rel=0.05) and steps[2] == steps[0]
    assert steps[1] == pytest.approx(2.0 * batch_tokens(setup, long_) / batch_tokens(setup, short), rel=0.05)
    assert steps[1] > 5 * steps[0]
    # the timed task first: a suite that opens with the long task scales the others down
    assert task_step_seconds(_setup(long_, short), 10.0)[1] < 2.0


def test_padding_counts_as_computed():
    # one prompt of 100 characters in every batch of 4: each batch is as wide as it
    mixed = Task("mixed", [Example("p" * (100 if i % 4 == 0 else 10), "aaa") for i in range(16)], [Example("q", "a")])
    wide = Task("wide", [Example("p" * 100, "aaa") for _ in range(16)], [Example("q", "a")])
    assert batch_tokens(_setup(mixed), mixed) == batch_tokens(_setup(wide), wide)


def test_a_continued_probe_counts_among_the_tasks_steps():
    # --probe-continue: the probe's 8 steps are the task's first 8 of 24, not 8 more
    task = _task("t", 20)
    setup = SimpleNamespace(
        cfg=SimpleNamespace(batch_size=4, max_len=512, n_test=4, steps=24, score_unseen="next", general_every="end"),
        tasks=[task, task], general=SimpleNamespace(test=[]), perplexity=None, benchmarks=None)
    args = dict(step_s=2.0, tokens=100, task_steps=[2.0, 3.0])
    separate = estimate(setup, [Trace(probe_steps=8, keep_routes=False)], **args)
    continued = estimate(setup, [Trace(probe_steps=8, keep_routes=False, continue_probe=True)], **args)
    assert separate - continued == pytest.approx(8 * TRACE_STEP * (2.0 + 3.0))


def test_the_guard_counts_its_fisher_passes():
    # --protect: a Fisher pass of fisher_batches after each task but the last (no later task
    # reads the last one's), and over the guarded prose once with --protect-base
    from trace_ft.method.select import SelectConfig

    task = _task("t", 20)
    setup = SimpleNamespace(
        cfg=SimpleNamespace(batch_size=4, max_len=512, n_test=4, steps=24, score_unseen="next", general_every="end"),
        tasks=[task, task, task], general=SimpleNamespace(test=[]), perplexity=None, benchmarks=None)
    args = dict(step_s=2.0, tokens=100, task_steps=[2.0, 3.0, 5.0])
    plain = estimate(setup, [Trace(probe_steps=8, keep_routes=False)], **args)
    guarded = SelectConfig(protect=1.0)
    earlier = estimate(setup, [Trace(guarded, probe_steps=8, keep_routes=False, fisher_batches=20)], **args)
    assert earlier - plain == pytest.approx(20 * (2.0 + 3.0))
    prose = estimate(setup, [Trace(guarded, probe_steps=8, keep_routes=False, fisher_batches=20,
                                   general=_task("prose", 20))], **args)
    assert prose - earlier == pytest.approx(20 * 2.0)
