"""The on-disk task history: round trip, crash safety (writers killed at every write step and
at random times), checksums, model fingerprints, locking and a full disk."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trace_ft.store import history as H
from trace_ft.store.history import HistoryError, TaskHistory, TaskRecord, model_fingerprint
from trace_ft.method.sketch import sketch_update
from trace_ft.tasks import Example
from trace_kernels import CoreMask

SHAPES = {"layers.0.w": (48, 32), "layers.1.w": (48, 32)}


def model_fp(dtype=torch.float32, shapes=SHAPES):
    return model_fingerprint({n: torch.empty(s, dtype=dtype) for n, s in shapes.items()})


def make_record(i: int, big: int = 0) -> TaskRecord:
    """Task i's record; its content is a function of i, so a reader can check it exactly."""
    g = torch.Generator().manual_seed(i)
    core = CoreMask.from_dense({n: torch.rand(s, generator=g) < 0.1 for n, s in SHAPES.items()})
    updates = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    updates["layers.1.w"] = sketch_update(updates["layers.1.w"], "layers.1.w", 32, dim=8)
    if big:
        updates["big"] = torch.randn(big, generator=g)
    fisher = {n: torch.rand(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}
    test = [Example(f"p{i}-{k}", f"a{k}") for k in range(5)]
    return TaskRecord(f"task{i}", core=core, updates=updates, fisher=fisher, test=test,
                      data={"n": i}, hyperparameters={"budget": 0.1}, summary={"i": i})


def assert_same_record(got: TaskRecord, want: TaskRecord) -> None:
    assert got.name == want.name and got.core == want.core
    assert list(got.updates) == list(want.updates)
    for n, u in want.updates.items():
        v = got.updates[n]
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        else:
            assert torch.equal(u.values, v.values) and (u.block_size, u.seed, u.exact) == (v.block_size, v.seed, v.exact)
    assert all(torch.equal(want.fisher[n], got.fisher[n]) for n in want.fisher)
    assert list(got.test) == list(want.test)
    assert (got.data, got.hyperparameters, got.summary) == (want.data, want.hyperparameters, want.summary)


def test_round_trip_and_earlier(tmp_path):
    h = TaskHistory.open(tmp_path / "h", model_fp(), create=True)
    assert len(h) == 0 and h.earlier() == []
    recs = [make_record(i) for i in (1, 2)]
    for r in recs:
        h.append(r, model_fp())
    h2 = TaskHistory.open(tmp_path / "h", model_fp())
    assert h2.names == ["task1", "task2"] and len(h2) == 2
    for i, r in enumerate(recs):
        assert_same_record(h2.record(i), r)
    earlier = h2.earlier()
    assert earlier[1].core == recs[1].core and torch.equal(earlier[0].updates["layers.0.w"], recs[0].updates["layers.0.w"])
    entry = h2.entries[0]
    assert entry["model_sha256"] == model_fp()["sha256"] and set(entry["files"]) == {"core", "updates", "fisher", "test"}
    assert all(len(f["sha256"]) == 64 for f in entry["files"].values())
    assert h2.record(0).task().test == recs[0].test


def test_open_refuses_what_is_not_a_history(tmp_path):
    with pytest.raises(HistoryError, match="not a task history"):
        TaskHistory.open(tmp_path / "absent")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    with pytest.raises(HistoryError, match="not empty"):
        TaskHistory.open(tmp_path / "full", create=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HistoryError, match="is a file"):
        TaskHistory.open(tmp_path / "file", create=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(HistoryError, match="unreadable manifest"):
        TaskHistory.open(bad)
    (bad / "manifest.json").write_text(json.dumps({"format": "trace-ft-history", "version": 99}))
    with pytest.raises(HistoryError, match="version 99"):
        TaskHistory.open(bad)


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "h"
    h = TaskHistory.open(path, create=True)
    h.append(make_record(1), model_fp())
    folder = path / h.entries[0]["dir"]
    core = folder / "core.safetensors"
    original = core.read_bytes()
    core.write_bytes(original[:-7])  # truncated
    with pytest.raises(HistoryError, match=r"task 1 \('task1'\) core file core.safetensors has .* bytes.*truncated"):
        TaskHistory.open(path)
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    core.write_bytes(bytes(flipped))  # same size, other bytes
    with pytest.raises(HistoryError, match="SHA-256"):
        TaskHistory.open(path)
    core.unlink()
    with pytest.raises(HistoryError, match="is missing"):
        TaskHistory.open(path)
    core.write_bytes(original)
    assert_same_record(TaskHistory.open(path).record(0), make_record(1))


def test_model_fingerprint_mismatch_is_refused(tmp_path):
    path = tmp_path / "h"
    TaskHistory.open(path, create=True).append(make_record(1), model_fp())
    other = model_fp(shapes={"layers.0.w": (48, 32), "layers.1.w": (64, 32)})
    with pytest.raises(HistoryError, match=r"different model: 'layers.1.w' has shape \[48, 32\] in the history, \[64, 32\] here"):
        TaskHistory.open(path, other)
    renamed = model_fp(shapes={"layers.0.w": (48, 32), "layers.9.w": (48, 32)})
    with pytest.raises(HistoryError, match="'layers.1.w' is in the history, not in this model"):
        TaskHistory.open(path, renamed)
    with pytest.raises(HistoryError, match="float32 in the history, bfloat16 here"):
        TaskHistory.open(path, model_fp(torch.bfloat16))
    assert len(TaskHistory.open(path, model_fp(torch.bfloat16), ignore_dtype=True)) == 1
    with pytest.raises(HistoryError, match="different model"):
        TaskHistory.open(path).append(make_record(2), other)
    assert len(TaskHistory.open(path)) == 1


def test_one_writer_at_a_time_and_stale_handles(tmp_path):
    path = tmp_path / "h"
    a = TaskHistory.open(path, create=True)
    b = TaskHistory.open(path, create=True)
    with a._lock():
        with pytest.raises(HistoryError, match="being written by another process"):
            b.append(make_record(1), model_fp())
    a.append(make_record(1), model_fp())
    with pytest.raises(HistoryError, match="changed since it was opened"):
        b.append(make_record(2), model_fp())


def test_full_disk_while_writing_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "h"
    TaskHistory.open(path, create=True).append(make_record(1), model_fp())
    before = (path / "manifest.json").read_bytes()
    real = H.save_updates

    def full_disk(updates, p):
        real(updates, p)
        with open(p, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(H, "save_updates", full_disk)
    with pytest.raises(OSError, match="No space left"):
        TaskHistory.open(path).append(make_record(2), model_fp())
    monkeypatch.undo()
    assert (path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (path / "tasks").iterdir()) == ["001-task1"]  # staging removed
    h = TaskHistory.open(path)
    h.append(make_record(2), model_fp())
    assert TaskHistory.open(path).names == ["task1", "task2"]


# ---- writers killed mid-write ---------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from ft.store.test_history import make_record, model_fp
    from trace_ft.store import history as H
    from trace_ft.store import atomic
    label = {label!r}

    def die_at(name, after):  # the writer killed where `label` says, by wrapping what it calls there
        real = getattr(atomic, name)
        def run(*args):
            hit = (label == "wrote " + args[0].stem.split(".")[0].replace("core_", "") if name == "sha256_file"
                   else label == "installed task directory" if name == "install_dir"
                   else label == ("after manifest" if after else "before manifest"))
            if hit and not after:
                os._exit(17)
            out = real(*args)
            if hit:
                os._exit(17)
            return out
        setattr(atomic, name, run)

    die_at("sha256_file", after=False)   # a file written, not yet checksummed and installed
    die_at("install_dir", after=True)
    die_at("write_json", after=label == "after manifest")
    path = {path!r}
    print("ready", flush=True)
    while True:
        h = H.TaskHistory.open(path, create=True, verify=False)
        h.append(make_record(len(h) + 1, big={big}), model_fp())
        if label:
            break
""")


def _child(path, label="", big=0):
    code = CHILD.format(tests=str(Path(__file__).parents[2]), label=label, path=str(path), big=big)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _check_consistent(path) -> int:
    h = TaskHistory.open(path, model_fp(), create=True)  # verifies every checksum
    for i in range(len(h)):
        got = h.record(i)
        want = make_record(i + 1, big=got.updates["big"].numel() if "big" in got.updates else 0)
        assert_same_record(got, want)
    return len(h)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["wrote core", "wrote test", "installed task directory",
                                   "before manifest", "after manifest"])
def test_writer_killed_at_each_step(tmp_path, label):
    path = tmp_path / "h"
    TaskHistory.open(path, create=True).append(make_record(1), model_fp())
    proc = _child(path, label)
    assert proc.wait(timeout=120) == 17
    n = _check_consistent(path)
    assert n == (2 if label == "after manifest" else 1)
    TaskHistory.open(path).append(make_record(n + 1), model_fp())  # the next writer cleans up
    assert _check_consistent(path) == n + 1
    leftovers = [p.name for p in (path / "tasks").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not list(path.glob(".manifest.json.*"))


@pytest.mark.slow
def test_writer_killed_at_random_times(tmp_path):
    rng = random.Random(os.getpid())
    path = tmp_path / "h"
    counts = []
    for _ in range(3):
        proc = _child(path, big=500_000)  # 2 MB of update per task: kills land mid-write
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        counts.append(_check_consistent(path))
    assert counts == sorted(counts)  # never lost a task that was written
    print("tasks after each kill:", counts)


def test_tasks_without_a_test_split_are_named_not_scored(tmp_path):
    """A task recorded without test examples (TraceCallback without test=) is listed in
    `untested` and left out of `tasks()`, which --eval-history scores."""
    h = TaskHistory.open(tmp_path / "h", model_fp(), create=True)
    h.append(make_record(1), model_fp())
    bare = make_record(2)
    bare.test = ()
    h.append(bare, model_fp())
    h = TaskHistory.open(tmp_path / "h")
    assert [t.name for t in h.tasks()] == ["task1"] and h.untested == ["task2"]


def test_a_lock_on_a_new_directory_leaves_nothing_when_nothing_is_written(tmp_path):
    path = tmp_path / "new" / "h"
    with pytest.raises(RuntimeError):
        with TaskHistory.open(path, model_fp(), create=True).hold():
            assert (path / ".lock").exists()
            raise RuntimeError("refused after taking the lock")
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with TaskHistory.open(empty, model_fp(), create=True).hold():
        pass
    assert list(empty.iterdir()) == []


def test_a_test_split_with_unicode_line_separators_reads_back(tmp_path):
    """U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings; the history writes
    them so, and every later open read them as line breaks (issue #35: every later adapt on
    such a history failed with HistoryError)."""
    odd = [Example("a\u2028b", "c\u2029d"), Example("e\u0085f", "g\r\nh")]
    rec = make_record(3)
    rec.test = odd
    h = TaskHistory.open(tmp_path / "h", model_fp(), create=True)
    h.append(rec, model_fp())
    again = TaskHistory.open(tmp_path / "h", model_fp())
    assert list(again.record(0).test) == odd
    assert again.tasks()[0].test == odd
