"""bench/bench_step_floor.py on the built-in model: the floor is what it says (every input
gradient, no weight gradient), the steps train copies, and the report's ratios are to the
full fine-tuning step of the same rounds."""

import argparse

import torch

from . import load_bench


def load():
    return load_bench("bench_step_floor")


def _setup():
    from trace_ft.config import RunConfig, RunSetup

    cfg = RunConfig.from_dict(dict(model="builtin", size="tiny", suite="skills", tasks=["rev"], n_test=4, seed=0))
    return cfg, RunSetup.open(cfg, progress=False)


def test_the_floor_runs_every_input_gradient_and_no_weight_gradient():
    bench = load()
    cfg, setup = _setup()
    from trace_ft.continual.strategies.base import Context
    from trace_ft.lm.train import causal_lm_loss

    ctx = Context(model=setup.base, codec=setup.codec, train=cfg.train_config(), seed=0, progress=False,
                  max_len=cfg.max_len)
    batch = next(iter(ctx.batches([setup.tasks[0]], 1, salt=1)))
    floor = bench.floor_model(setup.base)
    reached = []
    first = next(m for m in floor.modules() if isinstance(m, torch.nn.Linear))  # the first layer's
    first.register_full_backward_hook(lambda mod, gin, gout: reached.append(gin[0] is not None))
    causal_lm_loss(floor, batch).backward()
    assert reached == [True]  # the input gradient reached the bottom layer
    assert all(p.grad is None and not p.requires_grad for p in floor.parameters())
    assert all(p.requires_grad for p in setup.base.parameters())  # the base is left as it was


def test_measure_on_the_builtin_model(monkeypatch):
    bench = load()
    from trace_ft.config import RunSetup

    opened = {}
    real_open = RunSetup.open

    def open_and_keep(*a, **kw):
        setup = real_open(*a, **kw)
        opened["before"] = {k: v.clone() for k, v in setup.base.state_dict().items()}
        opened["base"] = setup.base
        return setup

    monkeypatch.setattr(RunSetup, "open", open_and_keep)
    args = argparse.Namespace(model="builtin", size="tiny", suite="skills", task="rev", batch_size=None,
                              rounds=2, steps=1, threads=1)
    out = bench.measure(args)
    cases = out["cases"]
    assert set(cases) == {"full", "trace", "floor", "forward"}
    assert all(len(c["round_medians_s"]) == 2 and min(c["round_medians_s"]) > 0 for c in cases.values())
    assert cases["full"]["ratios"] == [1.0, 1.0] and cases["full"]["ratio"] == 1.0
    assert all(r == t / f for r, t, f in zip(cases["trace"]["ratios"], cases["trace"]["round_medians_s"],
                                             cases["full"]["round_medians_s"]))
    assert 0 < out["core_elements"] < out["eligible_elements"]
    after = opened["base"].state_dict()  # every step trained a copy
    assert all(torch.equal(after[k], v) for k, v in opened["before"].items())
