"""bench/bench_probe_length.py on the built-in model: the cores it compares come from the
same base model every time, and its measures mean what its report says."""

import argparse

import torch

from . import load_bench


def load():
    return load_bench("bench_probe_length")


def _args(**kw):
    return argparse.Namespace(**{**dict(model="builtin", size="tiny", suite="skills", tasks="rev", lengths="4,2",
                                        reference=4, budget=0.05, batch_size=8, lr=1e-3, n_train=200, threads=1,
                                        machine="test", autocast=None), **kw})


def test_probe_length_on_the_builtin_model(monkeypatch):
    bench = load()
    args = _args()
    opened = {}
    from trace_ft.config import RunSetup

    real_open = RunSetup.open

    def open_and_keep(*a, **kw):  # the base model's weights before any probe
        setup = real_open(*a, **kw)
        opened["before"] = {k: v.clone() for k, v in setup.base.state_dict().items()}
        opened["base"] = setup.base
        return setup

    monkeypatch.setattr(RunSetup, "open", open_and_keep)
    out = bench.measure(args)
    rows = out["rev"]["rows"]
    assert [r["steps"] for r in rows] == [2, 4]  # lengths in order
    assert all(0.0 <= r["recovered"] <= 1.0 and 0.0 <= r["stable"] <= 1.0 for r in rows)
    # the longest length's stream-B probe is the reference itself here (same length, same
    # batches): its stability and its recovery of the reference are one measure
    assert rows[-1]["stable"] == rows[-1]["recovered"]
    assert 0 < rows[-1]["recovered"] < 1  # other batches choose another core, in part
    # every probe started from, and left, the base model as it was
    after = opened["base"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in opened["before"].items())
    text = bench.markdown(out, args)
    assert "| rev |" in text and "2 steps" in text and "4 steps" in text
    assert "rounded_recovered" not in rows[0] and "bfloat16" not in text


def test_probe_length_with_the_products_in_bf16():
    """--autocast: each stream-A probe again with its products in bf16, compared with the
    same probe unrounded (mostly the same core, not all of it) and with the reference."""
    bench = load()
    args = _args(lengths="3", autocast="bfloat16")
    row = bench.measure(args)["rev"]["rows"][0]
    assert 0.0 <= row["rounded_recovered"] <= 1.0 and row["rounded_seconds"] > 0
    assert 0.5 < row["rounded_agrees"] <= 1.0
    text = bench.markdown({"rev": {"rows": [row]}}, args)
    assert "products in bfloat16" in text and "bfloat16 / unrounded seconds" in text


def test_recovered_counts_the_reference_elements_chosen_again():
    from trace_kernels import CoreMask

    bench = load()
    ref = CoreMask.from_dense({"w": torch.tensor([True, True, False, True])})
    core = CoreMask.from_dense({"w": torch.tensor([True, False, True, True])})
    assert bench.recovered(core, ref) == 2 / 3
    assert bench.recovered(ref, ref) == 1.0
