"""`trace-ft export`: the model as it stood after a task, rebuilt from the newest model and
the history's core values, bit-identical to what that task produced."""

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file

from trace_ft.cli import main

FLAGS = ["--size", "tiny", "--quiet", "--steps", "4", "--probe-steps", "2", "--n-train", "48",
         "--n-test", "8", "--batch-size", "8", "--threads", "1"]


@pytest.mark.slow
def test_export_rebuilds_each_earlier_model(builtin_cache, tmp_path, capsys):
    flags = [*FLAGS, "--cache-dir", str(builtin_cache)]
    hist, model = tmp_path / "h", "builtin"
    for k, task in enumerate(["rev", "sub", "dup"], 1):
        assert main(["adapt", *flags, "--model", str(model), "--task", task, "--history", str(hist),
                     "--out", str(tmp_path / f"m{k}")]) == 0
        model = tmp_path / f"m{k}"
    for k, task in ((1, "rev"), (2, "2")):
        capsys.readouterr()
        assert main(["export", str(hist), "--after", task, "--out", str(tmp_path / f"e{k}")]) == 0
        assert "bit-identical to the model that task produced" in capsys.readouterr().out
        a = load_file(str(tmp_path / f"e{k}" / "model.safetensors"))
        b = load_file(str(tmp_path / f"m{k}" / "model.safetensors"))
        assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)
    # from an intermediate model too, and refusals
    assert main(["export", str(hist), "--after", "rev", "--model", str(tmp_path / "m2"),
                 "--out", str(tmp_path / "e1b")]) == 0
    for args, needle, out in (
            (["--after", "dup", "--model", str(tmp_path / "m1")], "earlier than 'dup'", tmp_path / "x"),
            (["--after", "nope"], "not in history", tmp_path / "x"),
            (["--after", "rev", "--model", str(tmp_path)], "no model at", tmp_path / "x"),
            (["--after", "rev"], "already exists", tmp_path / "e1")):
        assert main(["export", str(hist), *args, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
