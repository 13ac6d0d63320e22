"""`trace-ft adapt`: three adapt runs equal one `trace-ft run`, an interrupted run resumes to
the uninterrupted result (stopped in-process and killed from outside), and bad input is
refused with nothing lost."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from safetensors.torch import load_file

from trace_ft.commands.adapt import adapt
from trace_ft.cli import main
from trace_ft.store.history import TaskHistory
from trace_ft.config import RunConfig

SMALL = ["--size", "tiny", "--quiet", "--steps", "12", "--probe-steps", "3", "--n-train", "64",
         "--n-test", "16", "--batch-size", "8", "--threads", "1"]


def flags(cache, *extra):
    return [*SMALL, "--cache-dir", str(cache), *extra]


def config(cache, **over) -> RunConfig:
    base = dict(size="tiny", steps=12, trace_probe_steps=3, n_train=64, n_test=16, batch_size=8,
                threads=1, cache_dir=str(cache))
    return RunConfig.from_dict({**base, **over})


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def comparable(path):
    """A history's entries without what differs between two equal runs (times, paths), and
    its cores (safetensors metadata order varies between processes, so not core file bytes)."""
    hist = TaskHistory.open(path)
    out = []
    for i, entry in enumerate(hist.entries):
        s = {k: v for k, v in entry["summary"].items()
             if k not in ("seconds", "out", "checkpoint", "resumed", "model_in", "model_out")}
        out.append({"name": entry["name"], "data": entry["data"], "summary": s,
                    "files": {k: v["sha256"] for k, v in entry["files"].items() if k != "core"},
                    "core": hist.record(i).core})
    return out


@pytest.mark.slow
def test_three_adapts_give_the_numbers_of_one_run(builtin_cache, tmp_path, capsys):
    extra = ["--protect", "1"]  # the guard's Fisher goes through the history too
    assert main(["run", *flags(builtin_cache, *extra), "--tasks", "rev,sub,dup",
                 "--strategies", "trace", "--out", str(tmp_path / "run")]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())["strategies"]["trace"]
    model, hist = "builtin", tmp_path / "h"
    for k, task in enumerate(["rev", "sub", "dup"], 1):
        out = tmp_path / f"m{k}"
        assert main(["adapt", *flags(builtin_cache, *extra), "--model", str(model), "--task", task,
                     "--history", str(hist), "--out", str(out), "--eval-history"]) == 0
        model = out
    entries = TaskHistory.open(hist).entries
    assert [e["name"] for e in entries] == ["rev", "sub", "dup"]
    # the same training: losses, probe losses and cores, bit for bit
    assert [e["summary"]["final_loss"] for e in entries] == [c["final_loss"] for c in res["costs"]["per_task"]]
    assert [e["summary"]["probe_loss"] for e in entries] == [s["probe_loss"] for s in res["selections"]]
    assert [e["summary"]["core_elements"] for e in entries] == [s["core_elements"] for s in res["selections"]]
    assert all(e["files"].keys() == {"core", "updates", "fisher", "test", "before", "after"} for e in entries)
    # the same scores: row j of run's matrix (column 0 is the base skill) after task j
    for j, e in enumerate(entries, 1):
        assert list(e["summary"]["scores"].values()) == res["matrix"][j][1:j + 1]
    assert entries[1]["summary"]["model_in"] == entries[0]["summary"]["model_out"]
    capsys.readouterr()
    assert main(["history", str(hist)]) == 0
    listing = capsys.readouterr().out
    assert "3 task(s), all files verified" in listing and "  3  dup" in listing


def _first_task(cache, tmp_path):
    """rev added to the built-in model: the start of the resume tests."""
    adapt(config(cache), "builtin", "rev", tmp_path / "h0", tmp_path / "m1", progress=False, log=print)
    return tmp_path / "m1", tmp_path / "h0"


def _resume_setup(cache, tmp_path):
    """rev added to the built-in model; then sub added to copy A of its history without an
    interruption. Returns (model after rev, A's model, A's history, B's model path, B's
    history: a second copy for the interrupted run)."""
    m1, h0 = _first_task(cache, tmp_path)
    for copy in ("hA", "hB"):
        shutil.copytree(h0, tmp_path / copy)
    adapt(config(cache), str(m1), "sub", tmp_path / "hA", tmp_path / "A", checkpoint_every=4,
          progress=False, log=print)
    return m1, tmp_path / "A", tmp_path / "hA", tmp_path / "B", tmp_path / "hB"


@pytest.mark.slow
def test_resume_after_an_interruption_equals_an_uninterrupted_run(builtin_cache, tmp_path):
    m1, A, hA, B, hB = _resume_setup(builtin_cache, tmp_path)

    def stop(done):
        if done == 10:
            raise KeyboardInterrupt  # as Ctrl-C would, between checkpoints (every 4 steps)

    with pytest.raises(KeyboardInterrupt):
        adapt(config(builtin_cache), str(m1), "sub", hB, B, checkpoint_every=4, progress=False,
              log=print, on_step=stop)
    assert not B.exists() and len(TaskHistory.open(hB)) == 1
    state = json.loads((tmp_path / "B.checkpoint" / "state.json").read_text())
    assert state["step"] == 8
    with pytest.raises(ValueError, match="pass --resume"):
        adapt(config(builtin_cache), str(m1), "sub", hB, B, progress=False, log=print)
    with pytest.raises(ValueError, match="its config differs"):
        adapt(config(builtin_cache, steps=13), str(m1), "sub", hB, B, resume=True, progress=False, log=print)
    summary = adapt(config(builtin_cache), str(m1), "sub", hB, B, resume=True, checkpoint_every=4,
                    progress=False, log=print)
    assert summary["resumed"] and not (tmp_path / "B.checkpoint").exists()
    assert same_weights(A, B)
    assert comparable(hA) == comparable(hB)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [6, 10])  # before the first checkpointed step, and after it
def test_probe_continuation_resumes_to_the_uninterrupted_run(builtin_cache, tmp_path, stop_at):
    """With --probe-continue the probe's 3 steps are the task's first: the core trains steps
    3..11 from the probe's state. Killed before any step is checkpointed (every 8 steps here:
    step 8), the resume starts from the probe's state saved with the selection; after it,
    from step 8's optimizer state. Either way: the uninterrupted run's weights and history."""
    m1, h0 = _first_task(builtin_cache, tmp_path)
    for copy in ("hA", "hB", "hC"):
        shutil.copytree(h0, tmp_path / copy)
    cont = config(builtin_cache, trace_continue_probe=True)
    a = adapt(cont, str(m1), "sub", tmp_path / "hA", tmp_path / "A", checkpoint_every=8, progress=False, log=print)
    adapt(config(builtin_cache), str(m1), "sub", tmp_path / "hC", tmp_path / "C", progress=False, log=print)
    assert not same_weights(tmp_path / "A", tmp_path / "C")  # continuing is not restarting
    assert len(TaskHistory.open(tmp_path / "hA").entries[-1]["summary"]["scores"]) == 1
    assert a["core_elements"] > 0

    def stop(done):
        if done == stop_at:
            raise KeyboardInterrupt

    B, hB = tmp_path / "B", tmp_path / "hB"
    with pytest.raises(KeyboardInterrupt):
        adapt(cont, str(m1), "sub", hB, B, checkpoint_every=8, progress=False, log=print, on_step=stop)
    state = json.loads((tmp_path / "B.checkpoint" / "state.json").read_text())
    assert state["step"] == (0 if stop_at < 8 else 8)
    assert "continue_from.safetensors" in state["selection"]
    adapt(cont, str(m1), "sub", hB, B, resume=True, checkpoint_every=8, progress=False, log=print)
    assert same_weights(tmp_path / "A", B)
    assert comparable(tmp_path / "hA") == comparable(hB)


def test_probe_continuation_refuses_a_given_core(builtin_cache, tmp_path):
    with pytest.raises(ValueError, match="--probe-continue continues from the probe, and --core skips it"):
        adapt(config(builtin_cache, trace_continue_probe=True), "builtin", "rev", tmp_path / "h", tmp_path / "m",
              core=tmp_path / "core.safetensors", progress=False, log=print)
    assert not (tmp_path / "h").exists() and not (tmp_path / "m").exists()


def test_a_given_core_turns_the_default_continuation_off(builtin_cache, tmp_path, monkeypatch):
    """Where the model's default would continue from the probe, a given core (no probe to
    continue from) trains the task's steps from its start instead of refusing."""
    import dataclasses
    import re

    import torch

    from trace_ft.config import defaults
    from trace_ft.lm.model import model_shapes
    from trace_ft.method.probe import DEFAULT_EXCLUDE
    from trace_kernels import CoreMask

    monkeypatch.setitem(defaults.DEFAULTS, "builtin",
                        dataclasses.replace(defaults.DEFAULTS["builtin"], continue_probe_share=1.0))
    cfg = config(builtin_cache)
    assert cfg.trace.continue_probe and "trace_continue_probe" in cfg.defaulted
    shapes = {n: s for n, s in model_shapes("builtin", "tiny").items()
              if not any(re.search(p, n) for p in DEFAULT_EXCLUDE)}
    torch.manual_seed(0)
    core = CoreMask.from_dense({n: torch.rand(s) < 0.05 for n, s in shapes.items()})
    core.save(tmp_path / "core.safetensors")
    out = adapt(cfg, "builtin", "rev", tmp_path / "h", tmp_path / "m", core=tmp_path / "core.safetensors",
                progress=False, log=print)
    assert out["core_elements"] == core.numel_selected
    entry = TaskHistory.open(tmp_path / "h").entries[-1]
    assert entry["hyperparameters"]["trace"]["continue_probe"] is False


@pytest.mark.slow
def test_resume_after_the_process_is_killed(builtin_cache, tmp_path):
    m1, A, hA, B, hB = _resume_setup(builtin_cache, tmp_path)
    argv = ["adapt", *flags(builtin_cache), "--model", str(m1), "--task", "sub", "--history",
            str(hB), "--out", str(B), "--checkpoint-every", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "trace_ft", *argv])
    state = tmp_path / "B.checkpoint" / "state.json"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if state.exists() and json.loads(state.read_text()).get("step", 0) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    if rc == 0:  # it finished before the kill landed: nothing to resume
        pytest.skip("the run ended before it could be killed")
    assert rc == -signal.SIGKILL and len(TaskHistory.open(hB)) == 1
    assert main([*argv, "--resume"]) == 0
    assert same_weights(A, B)
    assert comparable(hA) == comparable(hB)


def _snapshot(*paths):
    out = {}
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            if p.is_file() and p.name != ".lock":
                out[str(p)] = p.read_bytes()
    return out


def test_bad_input_is_refused_and_nothing_is_lost(builtin_cache, tmp_path, capsys):
    hist, m1 = tmp_path / "h", tmp_path / "m1"
    assert main(["adapt", *flags(builtin_cache, "--steps", "2"), "--task", "rev",
                 "--history", str(hist), "--out", str(m1)]) == 0
    before = _snapshot(hist, m1)

    def refused(args, needle):
        capsys.readouterr()
        assert main(["adapt", *flags(builtin_cache, "--steps", "2"), *args]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert _snapshot(hist, m1) == before

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    (bad / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    refused(["--model", str(m1), "--task", str(bad), "--history", str(hist), "--out", str(tmp_path / "x")],
            "train.jsonl:2: record has no 'answer' field")
    (bad / "train.jsonl").unlink()
    refused(["--model", str(m1), "--task", str(bad), "--history", str(hist), "--out", str(tmp_path / "x")],
            "no train.json or train.jsonl")
    # a history recorded for another model
    refused(["--model", str(_other_model(tmp_path)), "--task", "sub", "--history", str(hist),
             "--out", str(tmp_path / "x")], "was recorded for a different model")
    refused(["--model", str(m1), "--task", "rev", "--history", str(hist), "--out", str(tmp_path / "x")],
            "task 'rev' is already in history")
    refused(["--model", str(m1), "--task", "sub", "--history", str(hist), "--out", str(m1)],
            "already exists (pass --overwrite")
    trunc = tmp_path / "core.safetensors"
    shutil.copy(hist / "tasks" / "001-rev" / "core.safetensors", trunc)
    trunc.write_bytes(trunc.read_bytes()[:40])
    refused(["--model", str(m1), "--task", "sub", "--history", str(hist), "--out", str(tmp_path / "x"),
             "--core", str(trunc)], "not a readable CoreMask file")
    refused(["--model", str(m1), "--task", "sub", "--history", str(hist), "--out", str(tmp_path / "x"),
             "--resume"], "--resume: no checkpoint")
    with TaskHistory.open(hist).hold():  # another run is adding a task: refused before training
        refused(["--model", str(m1), "--task", "sub", "--history", str(hist), "--out", str(tmp_path / "x")],
                "is being written by another process")
    assert not (tmp_path / "x.checkpoint").exists()
    assert not (tmp_path / "x").exists()
    # not refused, but said: the model is not the one the history's last task produced
    capsys.readouterr()
    assert main(["adapt", *flags(builtin_cache, "--steps", "2"), "--task", "sub", "--history", str(hist),
                 "--out", str(tmp_path / "x")]) == 0
    assert "is not the model the history's last task ('rev') produced" in capsys.readouterr().out


def _other_model(tmp_path):
    from transformers import LlamaForCausalLM

    from trace_ft.lm.model import BuiltinSpec, builtin_config, save_model
    from trace_ft.lm.text import CharTokenizer

    tok = CharTokenizer()
    path = tmp_path / "other"
    save_model(LlamaForCausalLM(builtin_config(BuiltinSpec(hidden=32, layers=1, heads=2, intermediate=64),
                                               tok.vocab_size)), tok, path)
    return path


def test_full_disk_while_saving_the_model(builtin_cache, tmp_path, monkeypatch, capsys):
    import errno

    from transformers import PreTrainedModel

    hist = tmp_path / "h"
    real = PreTrainedModel.save_pretrained

    def full(self, path, *a, **kw):
        real(self, path, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    argv = ["adapt", *flags(builtin_cache, "--steps", "2"), "--task", "rev", "--history", str(hist),
            "--out", str(tmp_path / "m1")]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists() and not list(tmp_path.glob(".m1*"))
    assert len(TaskHistory.open(hist, create=True)) == 0
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0  # the checkpoint kept the trained weights
    assert TaskHistory.open(hist).names == ["rev"] and (tmp_path / "m1" / "model.safetensors").exists()
