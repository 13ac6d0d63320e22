"""`trace-ft run` end to end through the command line, on a very small built-in model."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from trace_ft.continual import metrics
from trace_ft.cli import main

ALL = "trace,trace_paper,trace_element,seqft,lora,ewc,replay,mtl"


def _args(cache, out, *extra):
    return ["run", "--size", "tiny", "--cache-dir", str(cache), "--out", str(out), "--quiet",
            "--tasks", "rev,sub", "--steps", "8", "--probe-steps", "3", "--n-train", "64",
            "--n-test", "16", "--batch-size", "8", "--threads", "1", *extra]


@pytest.fixture
def cache(builtin_cache):
    return builtin_cache


@pytest.mark.slow
def test_every_strategy_through_the_cli(cache, tmp_path):
    out = tmp_path / "run"
    assert main(_args(cache, out, "--strategies", ALL)) == 0
    for f in ("results.json", "report.md", "accuracy.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    names = ALL.split(",")
    assert list(res["strategies"]) == names[:1] + ["trace_routed"] + names[1:]
    # the task-routed bound: every task scored with the model right after it, rebuilt from
    # the final model and the core values; BWT exactly 0, on every metric
    routed = res["strategies"].pop("trace_routed")
    assert routed["routing_exact"] and routed["metrics"]["BWT"] == 0.0
    assert all(routed["metrics_by"][m]["BWT"] == 0.0 for m in ("exact", "edit", "loglik"))
    trace = res["strategies"]["trace"]["matrices"]
    assert routed["matrices"]["exact"][-1][1] == trace["exact"][1][1]  # rev, right after rev
    assert routed["matrices"]["exact"][-1][0] == trace["exact"][0][0]  # base, before any task
    assert routed["costs"]["storage_bytes_per_task"][0] > 0 and routed["costs"]["lora_bytes_per_task"] > 0
    assert res["columns"] == ["base", "rev", "sub"] and res["first_task_column"] == 1
    report = (out / "report.md").read_text()
    for name, r in res["strategies"].items():
        a = r["matrix"]
        assert len(a) == 3 and all(len(row) == 3 for row in a)
        m = r["metrics"]
        # by hand, from the saved matrix
        assert m["AP"] == pytest.approx((a[2][1] + a[2][2]) / 2)
        assert m["base_change"] == pytest.approx(a[2][0] - a[0][0])
        if name != "mtl":
            assert m["plasticity"] == pytest.approx((a[1][1] + a[2][2]) / 2)
            assert m["BWT"] == pytest.approx(a[2][1] - a[1][1])
            assert m["FWT"] == pytest.approx(a[1][2] - a[0][2])
            assert m["forgetting"] == pytest.approx(a[1][1] - a[2][1])
        else:
            assert a[1] == [None, None, None] and m["BWT"] is None
        assert m == metrics.summarize(a, 1)
        assert f"| {name} |" in report
        assert r["costs"]["trainable_per_task"] and r["costs"]["seconds"] > 0
    assert res["strategies"]["trace"]["costs"]["trainable_fraction"] < 0.1
    assert res["strategies"]["seqft"]["costs"]["trainable_fraction"] == 1.0


@pytest.mark.slow
def test_same_seed_same_numbers(cache, tmp_path):
    mats = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        assert main(_args(cache, out, "--strategies", "trace,seqft", "--seed", "5")) == 0
        res = json.loads((out / "results.json").read_text())
        mats.append({n: r["matrix"] for n, r in res["strategies"].items()})
    assert mats[0] == mats[1]


def test_config_file_and_flag_precedence(cache, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('strategies = ["seqft"]\nsteps = 3\n[trace]\nbudget = 0.2\n')
    out = tmp_path / "run"
    assert main(_args(cache, out, "--config", str(cfg), "--steps", "2", "--tasks", "rev")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["steps"] == 2 and res["config"]["trace_budget"] == 0.2
    assert list(res["strategies"]) == ["seqft"]


@pytest.mark.parametrize("extra,needle", [
    (["--strategies", "seqft,bogus"], "unknown strategy 'bogus'"),
    (["--tasks", "nonexistent_dir"], "neither a built-in task"),
    (["--budget", "1.5"], "budget must be a fraction"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--general-every", "epoch"], "general_every must be 'task' or 'end'"),
])
def test_bad_input_is_a_clear_error(cache, tmp_path, capsys, extra, needle):
    assert main(_args(cache, tmp_path / "x", *extra)) == 2
    assert needle in capsys.readouterr().err


def test_bad_config_file(cache, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("steps = 3\nbogus_key = 1\n")
    assert main(_args(cache, tmp_path / "x", "--config", str(cfg))) == 2
    assert "unknown configuration keys: bogus_key" in capsys.readouterr().err


def test_local_model_directory_and_task_directories(tmp_path):
    pytest.importorskip("gguf")
    from helpers import write_tiny_gguf
    from trace_ft.lm.model import load_model, open_model
    from trace_ft.lm.text import HFCodec

    # a pretrained model's stand-in: a tiny Llama with a byte-level tokenizer, as a local
    # Hugging Face directory (converted from a GGUF the test writes)
    _, _, model_dir = open_model(write_tiny_gguf(tmp_path / "tiny.gguf"), cache_dir=tmp_path / "cache",
                                 progress=False)
    model, codec = load_model(model_dir)
    assert isinstance(codec, HFCodec) and sum(p.numel() for p in model.parameters()) > 0
    task = tmp_path / "echo"
    task.mkdir()
    rows = [json.dumps({"input": f"e:{i}=", "output": str(i)}) for i in range(40)]
    (task / "train.jsonl").write_text("\n".join(rows[:30]))
    (task / "test.jsonl").write_text("\n".join(rows[30:]))
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--tasks", f"{task},rev", "--strategies",
                 "seqft,trace,trace_guard", "--steps", "3", "--probe-steps", "2", "--n-train", "30",
                 "--n-test", "10", "--batch-size", "4", "--general-every", "task", "--out", str(out),
                 "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    # any model but the built-in one is scored on general ability: the knowledge probe as
    # task 0 and the perplexity on general prose, at the start and after every task
    assert res["columns"] == ["general", "echo", "rev"] and res["first_task_column"] == 1
    seqft = res["strategies"]["seqft"]
    assert seqft["metrics"]["base_change"] is not None and len(seqft["general"]["perplexity"]) == 3
    assert all(p > 1 for p in seqft["general"]["perplexity"]) and seqft["general"]["tokens"] >= 20_000
    assert seqft["metrics"]["ppl_change"] == seqft["general"]["perplexity"][-1] - seqft["general"]["perplexity"][0]
    report = (out / "report.md").read_text()
    assert "## General ability (task 0)" in report and "| seqft | perplexity |" in report
    # trace_guard guards general prose: its selection saw a Fisher of that text
    guard = res["strategies"]["trace_guard"]
    assert guard["config"]["protect_general"] == "general-text" and guard["config"]["select"]["protect"] == 1.0
    # the prose, then each task but the last (no later selection reads its Fisher)
    assert guard["costs"]["phases"]["guard fisher"]["calls"] == 1 + 1
    # --general-every end: task 0 and the perplexity at the start and after the last task
    # only, the tasks after each; the metrics a frontier point needs are all there
    assert main(["run", "--model", str(model_dir), "--tasks", f"{task},rev", "--strategies", "seqft",
                 "--steps", "3", "--n-train", "30", "--n-test", "10", "--batch-size", "4",
                 "--general-every", "end", "--out", str(out / "end"), "--quiet"]) == 0
    end = json.loads((out / "end" / "results.json").read_text())["strategies"]["seqft"]
    assert end["general"]["perplexity"][1] is None and end["matrix"][1][0] is None
    assert end["matrix"][1][1] is not None and end["matrix"][2][2] is not None
    assert end["general"]["perplexity"][2] == seqft["general"]["perplexity"][2]
    assert end["metrics"] == seqft["metrics"]
    assert "| seqft | perplexity |" in (out / "end" / "report.md").read_text()
    assert main(["run", "--model", str(tmp_path), "--out", str(out), "--quiet"]) == 2


def _listing(root):
    """Every path under `root` (hidden ones too) with its bytes: what a refused command
    must leave exactly as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_bad_input_leaves_the_file_system_as_it_was(cache, tmp_path, capsys, monkeypatch):
    """Each refused command: an error naming the cause, and not one file or directory
    created or changed, whether the history, --out or the default runs/ existed or not."""
    import torch

    from trace_kernels import CoreMask

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out of `run` is runs/<timestamp> here
    core = work / "core.safetensors"
    CoreMask.from_dense({"no.such.weight": torch.ones(4, 4, dtype=torch.bool)}).save(core)
    tiny = ["--size", "tiny", "--cache-dir", str(cache), "--quiet", "--steps", "2",
            "--n-train", "16", "--n-test", "4", "--threads", "1"]
    adapt = ["adapt", *tiny, "--task", "rev", "--history", str(work / "new" / "hist"),
             "--out", str(work / "m")]
    (work / "done").mkdir()
    (work / "done" / "results.json").write_text("{}")  # an earlier run's or frontier's output
    cases = [
        (["run", *tiny, "--out", str(work / "done")], "already exists and is not empty (pass --overwrite"),
        (["frontier", *tiny, "--out", str(work / "done")], "pass --resume to continue it"),
        (["run", *tiny, "--granularity", "foo"], "granularity must be one of"),
        (["run", *tiny, "--specificity-unit", "page"], "specificity_unit must be one of"),
        (["run", *tiny, "--dtype", "float8"], "dtype must be one of"),
        (["run", *tiny, "--size", "huge"], "size must be one of"),
        (["run", *tiny, "--tasks", "nonexistent_dir"], "neither a built-in task"),
        ([*adapt, "--core", str(core)], "names parameter 'no.such.weight'"),
        ([*adapt, "--granularity", "foo"], "granularity must be one of"),
        ([*adapt, "--resume"], "--resume: no checkpoint"),
    ]
    before = _listing(work)
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
        assert _listing(work) == before, argv


def test_settings_are_checked_before_the_model_loads(tmp_path, capsys):
    """A bad setting is refused before the built-in base is pretrained into an empty cache."""
    empty = tmp_path / "cache"
    assert main(["run", "--cache-dir", str(empty), "--granularity", "foo", "--quiet"]) == 2
    assert "granularity must be one of" in capsys.readouterr().err
    assert not empty.exists()


def test_run_prints_the_summary_table(cache, tmp_path, capsys):
    assert main(_args(cache, tmp_path / "run", "--strategies", "seqft", "--tasks", "rev",
                      "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert "| strategy | AP | BWT |" in out and "| seqft |" in out
    assert out.index("| seqft |") < out.index("wrote ")


def test_help_shows_defaults_and_version(capsys):
    from trace_kernels import __version__

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("default: 200 for the built-in model, 16 for a pretrained one", "(default: 0.05)",
                   "(default: element)",
                   "default: 1e-3 for the built-in model, 1e-4 for a pretrained one",
                   "(default: trace,seqft,lora,ewc,replay,mtl)"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trace-lr" in text and "Not here: --lr" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", [["run", "--quiet"], ["adapt", "--task", "rev", "--history", "h",
                                                           "--out", "m"]])
def test_missing_optional_packages_name_the_extra(tmp_path, command):
    """Installed without the [hf] extra: a one-line error that says what to install, not a
    traceback; nothing is written."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
            "from trace_ft.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "pip install 'trace-kernels[hf]'" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
