"""`trace-ft frontier` end to end on a tiny model: one entry per point and seed with the
keys others recompute from, the routed strategy at BWT 0, the report, the plot, resume."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from trace_ft.cli import main
from trace_ft.continual import metrics


def _args(cache, out, *extra):
    return ["frontier", "--size", "tiny", "--cache-dir", str(cache), "--out", str(out), "--quiet",
            "--tasks", "rev,dup", "--steps", "4", "--probe-steps", "2", "--n-train", "48",
            "--n-test", "12", "--batch-size", "8", "--threads", "1", "--seeds", "2",
            "--frontier-strategies", "seqft,trace", "--grid", "seqft:lr=1e-3,3e-3",
            "--grid", "trace:trace_lr=1e-2", "--grid", "trace:trace_budget=0.05", *extra]


@pytest.mark.slow
def test_frontier_points_seeds_and_outputs(builtin_cache, tmp_path, capsys):
    out = tmp_path / "f"
    assert main(_args(builtin_cache, out)) == 0
    res = json.loads((out / "results.json").read_text())
    fr = res["frontier"]
    assert set(fr) == {"seqft", "trace", "trace_routed"}
    assert len(fr["seqft"]) == 2 * 2 and len(fr["trace"]) == 2 and len(fr["trace_routed"]) == 2
    for name, entries in fr.items():
        for e in entries:
            for key in ("params", "seed", "ap", "bwt", "plasticity", "fwt", "base_delta", "matrix"):
                assert key in e, (name, key)
            m = metrics.summarize(e["matrix"], res["first_task_column"])  # recomputable
            assert (m["AP"], m["BWT"], m["plasticity"]) == (e["ap"], e["bwt"], e["plasticity"])
            assert set(e["metrics_by"]) == {"exact", "edit", "loglik"}
    assert {e["seed"] for e in fr["seqft"]} == {0, 1}
    assert all(e["bwt"] == 0.0 and e["routing_exact"] for e in fr["trace_routed"])
    assert all(e["metrics_by"]["loglik"]["bwt"] == 0.0 for e in fr["trace_routed"])
    report = (out / "report.md").read_text()
    assert "trace against the others at equal plasticity: task BWT" in report and "## seqft" in report
    assert "## Side by side (the TRACE paper's layout)" in report
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    # an interrupted frontier resumes: finished runs are kept, not run again
    before = (out / "results.json").read_text()
    assert main(_args(builtin_cache, out, "--resume")) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["frontier"] == json.loads(before)["frontier"]
    assert again["seconds"] == json.loads(before)["seconds"] > 0   # the kept runs' time is kept
    # the routed row may be asked for later (it adds a row, changes no run); other settings not
    assert main(_args(builtin_cache, out, "--resume", "--routed", "false")) == 0
    assert json.loads((out / "results.json").read_text())["frontier"] == json.loads(before)["frontier"]
    assert main(_args(builtin_cache, out, "--resume", "--steps", "5")) == 2
    assert "was run with other settings (steps)" in capsys.readouterr().err
    # results made before a setting existed were made at its default: they resume
    saved = json.loads((out / "results.json").read_text())
    del saved["config"]["trace_probe_autocast"]
    (out / "results.json").write_text(json.dumps(saved))
    assert main(_args(builtin_cache, out, "--resume", "--seeds", "1")) == 0  # (the last --seeds wins)
    assert "; 2 seed(s);" in (out / "report.md").read_text()  # the seeds the results hold
    assert main(_args(builtin_cache, out, "--resume", "--probe-autocast", "bf16")) == 2
    err = capsys.readouterr().err
    assert "was run with other settings (trace_probe_autocast): trace_probe_autocast 'off', now 'bf16'" in err


def test_bad_frontier_settings_are_refused(builtin_cache, tmp_path, capsys):
    for extra, needle in ((["--grid", "nope:lr=1"], "no frontier for strategy 'nope'"),
                          (["--grid", "seqft:bogus=1"], "'bogus' is not a setting"),
                          (["--grid", "seqft:lr=-1"], "lr must be > 0"),
                          (["--seeds", "0"], "seeds must be >= 1")):
        assert main(_args(builtin_cache, tmp_path / "x", *extra)) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
