"""`trace-ft run` and `trace-ft adapt` with `--parallel ddp` and `--parallel fsdp2` under
torchrun (2 gloo ranks, one thread each) equal the single-process run: the same cores,
losses within 1e-4, and the accuracy matrices equal (cells that differ, if greedy decoding
flips on reduction-order noise, are listed); an interrupted parallel adapt resumes to the
uninterrupted run's weights."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from helpers import torchrun
from trace_ft.cli import main

WORKER = Path(__file__).with_name("adapt_parallel_worker.py")


def _args(cache, out):
    return ["run", "--size", "tiny", "--cache-dir", str(cache), "--out", str(out), "--quiet",
            "--tasks", "rev,sub", "--steps", "8", "--probe-steps", "3", "--n-train", "64",
            "--n-test", "16", "--batch-size", "8", "--threads", "1",
            "--strategies", "trace,trace_row,seqft,ewc,replay", "--protect", "0.5", "--protect-base", "true"]


def _torchrun(args, check=True):
    return torchrun(args, timeout=600, check=check)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(builtin_cache, tmp_path, mode):
    one = tmp_path / "one"
    assert main(_args(builtin_cache, one)) == 0  # also builds the tiny base model, once
    two = tmp_path / "two"
    _torchrun(["-m", "trace_ft", *_args(builtin_cache, two), "--parallel", mode])
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b["parallel"] == {"mode": mode, "world": 2} and a["parallel"] is None
    if mode == "fsdp2":  # each rank keeps optimizer state for its shards only
        for name in ("trace", "seqft"):
            assert b["strategies"][name]["costs"]["state_bytes"] < 0.6 * a["strategies"][name]["costs"]["state_bytes"]
    differing = []
    for name, ea in a["strategies"].items():
        eb = b["strategies"][name]
        for ca, cb in zip(ea["costs"]["per_task"], eb["costs"]["per_task"]):
            if ca["final_loss"] is not None:
                assert cb["final_loss"] == pytest.approx(ca["final_loss"], rel=1e-4, abs=1e-5), name
        if ea.get("selections"):
            assert [s["core_elements"] for s in ea["selections"]] == [s["core_elements"] for s in eb["selections"]]
            assert [s["probe_loss"] for s in eb["selections"]] == pytest.approx(
                [s["probe_loss"] for s in ea["selections"]], rel=1e-4)
        for i, (ra, rb) in enumerate(zip(ea["matrix"], eb["matrix"])):
            differing += [(name, i, j, x, y) for j, (x, y) in enumerate(zip(ra, rb)) if x != y]
    # greedy decoding may flip a token on reduction-order noise: one answer of 16 at most per cell
    assert all(abs(x - y) <= 100 / 16 + 1e-9 for *_, x, y in differing), differing
    assert len(differing) <= 2, differing


def test_parallel_needs_torchrun(builtin_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert main(_args(builtin_cache, tmp_path / "x") + ["--parallel", "ddp"]) != 0
    assert "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(_args(builtin_cache, tmp_path / "y") + ["--parallel", "fsdp2", "--core-grads", "true"]) != 0
    assert "needs unsharded weights" in capsys.readouterr().err
    assert main(_args(builtin_cache, tmp_path / "z")[:-4] + ["--strategies", "trace,lora", "--parallel", "fsdp2"]) != 0
    assert "does not run lora" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_adapt_on_two_ranks_equals_one_process(builtin_cache, tmp_path, mode):
    from trace_ft.store.history import TaskHistory

    # ddp starts from an empty cache: rank 0 pretrains the base model while rank 1 waits
    # (both ranks used to pretrain and race to install it), then the one process reuses it
    cache = tmp_path / "cache" if mode == "ddp" else builtin_cache
    small = ["--size", "tiny", "--cache-dir", str(cache), "--quiet", "--steps", "8",
             "--probe-steps", "3", "--n-train", "64", "--n-test", "16", "--batch-size", "8",
             "--threads", "1", "--checkpoint-every", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(["-m", "trace_ft", "adapt", "--model", "builtin", "--task", "rev", "--history",
               str(two / "hist"), "--out", str(two / "m"), *small, "--parallel", mode])
    assert main(["adapt", "--model", "builtin", "--task", "rev", "--history", str(one / "hist"),
                 "--out", str(one / "m"), *small]) == 0
    a, b = (TaskHistory.open(d / "hist").entries[0] for d in (one, two))
    assert b["summary"]["core_elements"] == a["summary"]["core_elements"]
    assert b["summary"]["final_loss"] == pytest.approx(a["summary"]["final_loss"], rel=1e-4)
    assert b["summary"]["probe_loss"] == pytest.approx(a["summary"]["probe_loss"], rel=1e-4)
    assert b["summary"]["scores"] == a["summary"]["scores"]
    assert not (two / "m.checkpoint").exists()  # rank 0 removed it; nobody left another
    ra, rb = (TaskHistory.open(d / "hist").record(0) for d in (one, two))
    assert ra.core == rb.core  # the history holds whole tensors, whatever the sharding
    for n in ra.after:
        assert torch.allclose(rb.after[n], ra.after[n], rtol=1e-5, atol=1e-6), n
    for n in ra.updates:
        assert rb.updates[n].shape == ra.updates[n].shape
        assert torch.allclose(rb.updates[n], ra.updates[n], rtol=1e-4, atol=1e-5), n


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_parallel_adapt_resumes_after_an_interruption(builtin_cache, tmp_path, mode):
    """Every rank stops after step 7 (the last checkpoint is step 6); `--resume` on 2 ranks
    ends with the weights the uninterrupted 2-rank run has, bit for bit."""
    from safetensors.torch import load_file

    def launch(name, stop_at=0, resume=0, check=True):
        return _torchrun([str(WORKER), str(builtin_cache), str(tmp_path / name / "hist"),
                          str(tmp_path / name / "m"), mode, str(stop_at), str(resume)], check)

    launch("whole")
    assert launch("cut", stop_at=7, check=False).returncode != 0
    state = json.loads((tmp_path / "cut" / "m.checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    launch("cut", resume=1)
    a, b = (load_file(str(tmp_path / d / "m" / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_rank_0_cannot_open_stops_every_rank(tmp_path):
    """Rank 0 opens the model first (`main_first`): its failure reaches rank 1, which would
    otherwise wait for it, and both ranks end with the error."""
    out = _torchrun(["-m", "trace_ft", "adapt", "--model", str(tmp_path / "missing"), "--task", "rev",
                     "--history", str(tmp_path / "hist"), "--out", str(tmp_path / "m"), "--size", "tiny",
                     "--threads", "1", "--parallel", "ddp"], check=False)
    assert out.returncode != 0
    assert "not a Hugging Face model directory" in out.stderr
    assert "rank 0 failed: ValueError" in out.stderr


@pytest.mark.slow
def test_a_bf16_probe_on_sharded_weights_matches_one_process(builtin_cache, tmp_path):
    """The probe under autocast with FSDP2's shards (each rank's products in bf16 on half the
    batch): the same probe losses as one process, to bf16's rounding, and both record it."""
    argv = ["run", "--size", "tiny", "--cache-dir", str(builtin_cache), "--quiet", "--tasks", "rev,sub",
            "--steps", "8", "--probe-steps", "3", "--n-train", "64", "--n-test", "16", "--batch-size", "8",
            "--threads", "1", "--strategies", "trace", "--probe-autocast", "bf16"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    _torchrun(["-m", "trace_ft", *argv, "--out", str(tmp_path / "two"), "--parallel", "fsdp2"])
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["config"]["trace_probe_autocast"] == b["config"]["trace_probe_autocast"] == "bf16"
    losses = [[s["probe_loss"] for s in r["strategies"]["trace"]["selections"]] for r in (a, b)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
