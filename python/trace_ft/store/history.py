"""The on-disk record of past tasks, so TRACE's knowledge of them survives between runs.

Layout of a history directory::

    manifest.json            format, version, the model's fingerprint, one entry per task
    tasks/001-<name>/        core.safetensors    the task's CoreMask
                             updates.safetensors its probe update Δ (exact, or sketches)
                             fisher.safetensors  its Fisher diagonal (when the guard used it)
                             core_before.safetensors, core_after.safetensors
                                                 its core's values before and after training
                                                 (what `trace-ft export` rebuilds models from)
                             test.jsonl          its test split, for scoring it later

Each manifest entry holds the task's name, time, data fingerprint, model fingerprint,
hyperparameters, a summary, and the name, size and SHA-256 of each of its files.

Writes are crash-safe: a task's files are built in a hidden staging directory, fsynced
and renamed into place, and only then is the manifest replaced (temporary file, fsync,
rename). The manifest is the only thing a reader trusts, so a writer killed at any point
leaves the previous history readable; its leftovers are removed by the next writer.
Opening verifies every checksum and the model fingerprint and refuses a mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from torch import Tensor, nn

from trace_kernels import CoreMask

from ..method.offload import TensorsOnDisk
from ..method.select import EarlierTask
from ..method.sketch import BlockSketch
from ..tasks import Example, Task, read_examples
from . import atomic
from .updates import load_tensors, load_updates, save_tensors, save_updates

FORMAT = "trace-ft-history"
VERSION = 1
MANIFEST = "manifest.json"
TASKS = "tasks"

class HistoryError(ValueError):
    """The history cannot be read or does not belong to this model; names what and where."""


# ---- fingerprints ---------------------------------------------------------------------

def model_fingerprint(model: nn.Module | Mapping[str, Tensor]) -> dict:
    """Parameter names, shapes and dtypes (not values) and their SHA-256: what must match
    for masks and updates of one model to apply to another."""
    named = model.named_parameters() if isinstance(model, nn.Module) else model.items()
    params = [[n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in named]
    blob = json.dumps(params, separators=(",", ":")).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "parameters": params}


def _examples_sha(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.answer], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def data_fingerprint(task: Task) -> dict:
    return {"train_sha256": _examples_sha(task.train), "test_sha256": _examples_sha(task.test),
            "n_train": len(task.train), "n_test": len(task.test), "source": task.meta.get("source")}


def compare_fingerprints(recorded: dict, current: dict, where: str, ignore_dtype: bool = False) -> None:
    """Raise HistoryError naming the first differences between two model fingerprints."""
    if recorded["sha256"] == current["sha256"]:
        return
    old = {n: (tuple(s), d) for n, s, d in recorded["parameters"]}
    new = {n: (tuple(s), d) for n, s, d in current["parameters"]}
    problems = []
    for n in old:
        if n not in new:
            problems.append(f"{n!r} is in the history, not in this model")
        elif old[n][0] != new[n][0]:
            problems.append(f"{n!r} has shape {list(old[n][0])} in the history, {list(new[n][0])} here")
        elif old[n][1] != new[n][1] and not ignore_dtype:
            problems.append(f"{n!r} is {old[n][1]} in the history, {new[n][1]} here "
                            "(load the model in the recorded dtype, or allow a dtype change)")
    problems += [f"{n!r} is in this model, not in the history" for n in new if n not in old]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HistoryError(f"{where} was recorded for a different model: "
                           + "; ".join(problems[:3]) + more)


# ---- records --------------------------------------------------------------------------

@dataclass
class TaskRecord:
    """One past task: what selection needs of it, and what is needed to score it again."""

    name: str
    core: CoreMask | None = None
    updates: Mapping[str, Tensor | BlockSketch] = field(default_factory=dict)
    fisher: Mapping[str, Tensor] = field(default_factory=dict)
    before: Mapping[str, Tensor] = field(default_factory=dict)   # core values before the task
    after: Mapping[str, Tensor] = field(default_factory=dict)    # and after it trained
    test: Sequence[Example] = ()
    scorer: str = "exact"
    data: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def earlier(self) -> EarlierTask:
        updates = self.updates if isinstance(self.updates, TensorsOnDisk) else dict(self.updates)
        return EarlierTask(updates=updates, core=self.core, fisher=dict(self.fisher))

    def task(self) -> Task:
        """The task for scoring (its test split; no training data is kept)."""
        return Task(self.name, [], list(self.test), scorer=self.scorer, meta={"source": "history"})


def _write_test(examples: Sequence[Example], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            row = {"prompt": e.prompt, "answer": e.answer}
            if e.alternatives:
                row["alternatives"] = list(e.alternatives)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- the history ----------------------------------------------------------------------

def _rmdir_if_empty(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except OSError:
        return False


class TaskHistory:
    """A history directory. `open` it (verifying it), read records with `record(i)` or
    `earlier()`, and `append` a task (atomically)."""

    def __init__(self, path: Path, manifest: dict | None) -> None:
        self.path = path
        self._manifest = manifest
        self._held = False

    # -- reading --
    @classmethod
    def open(cls, path: str | Path, model: nn.Module | dict | None = None, *, create: bool = False,
             verify: bool = True, ignore_dtype: bool = False) -> TaskHistory:
        """Open the history at `path`. `model` (a module or a `model_fingerprint`) must match
        the recorded one. `create`: an absent or empty directory is a new, empty history."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise HistoryError(f"history {path} is a file, not a directory")
        manifest = None
        if (path / MANIFEST).exists():
            manifest = cls._read_manifest(path)
        elif not create:
            raise HistoryError(f"{path} is not a task history (no {MANIFEST})")
        elif path.is_dir() and any(not p.name.startswith(".") and p.name != TASKS for p in path.iterdir()):
            raise HistoryError(f"{path} is not empty and is not a task history (no {MANIFEST})")
        hist = cls(path, manifest)
        if model is not None:
            hist.check_model(model, ignore_dtype)
        if verify:
            for i in range(len(hist)):
                hist._verify(i)
        return hist

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        f = path / MANIFEST
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HistoryError(f"{f}: unreadable manifest ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise HistoryError(f"{f}: not a trace-ft task history manifest")
        if data.get("version") != VERSION:
            raise HistoryError(f"{f}: history format version {data.get('version')} is not supported "
                               f"(this trace-ft reads version {VERSION})")
        if not isinstance(data.get("tasks"), list) or not isinstance(data.get("model"), dict):
            raise HistoryError(f"{f}: damaged manifest (no task list or model fingerprint)")
        return data

    def __len__(self) -> int:
        return 0 if self._manifest is None else len(self._manifest["tasks"])

    @property
    def entries(self) -> list[dict]:
        """The manifest entries, oldest first (name, time, data, hyperparameters, summary, files)."""
        return [] if self._manifest is None else list(self._manifest["tasks"])

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    @property
    def model(self) -> dict | None:
        """The recorded model fingerprint (None for an empty history)."""
        return None if self._manifest is None else self._manifest["model"]

    def check_model(self, model: nn.Module | dict, ignore_dtype: bool = False) -> None:
        if self._manifest is None:
            return
        fp = model if isinstance(model, dict) else model_fingerprint(model)
        compare_fingerprints(self._manifest["model"], fp, f"history {self.path}", ignore_dtype)

    def _file(self, i: int, key: str) -> Path | None:
        entry = self.entries[i]
        info = entry["files"].get(key)
        return None if info is None else self.path / entry["dir"] / info["file"]

    def _verify(self, i: int) -> None:
        entry = self.entries[i]
        for key, info in entry["files"].items():
            f = self.path / entry["dir"] / info["file"]
            what = f"history {self.path}: task {i + 1} ({entry['name']!r}) {key} file {f.name}"
            if not f.is_file():
                raise HistoryError(f"{what} is missing")
            if f.stat().st_size != info["bytes"]:
                raise HistoryError(f"{what} has {f.stat().st_size} bytes, the manifest says "
                                   f"{info['bytes']} (truncated or replaced)")
            if atomic.sha256_file(f) != info["sha256"]:
                raise HistoryError(f"{what} fails its SHA-256 check (damaged or modified)")

    def record(self, i: int, verify: bool = True, lazy: bool = False) -> TaskRecord:
        """Task `i` (0-based, oldest first), its files read back (and verified). `lazy`:
        exact updates stay in their file until looked up (`FileUpdates`)."""
        entry = self.entries[i]
        if verify:
            self._verify(i)
        try:
            core = CoreMask.load(self._file(i, "core")) if "core" in entry["files"] else None
            upd = self._file(i, "updates")
            fis = self._file(i, "fisher")
            bef, aft = self._file(i, "before"), self._file(i, "after")
            test = self._file(i, "test")
            return TaskRecord(
                name=entry["name"], core=core,
                updates=load_updates(upd, lazy) if upd else {},
                fisher=load_tensors(fis) if fis else {},
                before=load_tensors(bef) if bef else {}, after=load_tensors(aft) if aft else {},
                test=read_examples(test) if test else (),
                scorer=entry.get("scorer", "exact"), data=entry.get("data", {}),
                hyperparameters=entry.get("hyperparameters", {}), summary=entry.get("summary", {}),
            )
        except HistoryError:
            raise
        except Exception as e:  # damaged content that still matched its checksum
            raise HistoryError(f"history {self.path}: task {i + 1} ({entry['name']!r}) cannot be "
                               f"read: {e}") from None

    def earlier(self) -> list[EarlierTask]:
        """What selection needs of every past task, oldest first; exact updates are read from
        their files when selection looks them up, so the history takes no memory meanwhile."""
        return [self.record(i, verify=False, lazy=True).earlier() for i in range(len(self))]

    def tasks(self) -> list[Task]:
        """Every past task that has a test split, for scoring (reads only the test files,
        not the updates and Fisher diagonals); `untested` names the others."""
        out = []
        for i, entry in enumerate(self.entries):
            test = self._file(i, "test")
            if test is not None:
                out.append(TaskRecord(name=entry["name"], scorer=entry.get("scorer", "exact"),
                                      test=read_examples(test)).task())
        return out

    @property
    def untested(self) -> list[str]:
        """Tasks recorded without a test split (e.g. by `TraceCallback` without `test=`)."""
        return [e["name"] for e in self.entries if "test" not in e["files"]]

    # -- writing --
    @contextlib.contextmanager
    def hold(self):
        """Be this history's only writer for the block (e.g. a whole adapt run, so a second
        run on the same history fails at once rather than after its training)."""
        with self._lock():
            yield self

    @contextlib.contextmanager
    def _lock(self):
        if self._held:  # already ours
            yield
            return
        # The highest directory this lock creates: removed again if nothing is recorded in
        # it, so a run refused after taking the lock leaves the file system as it was (but
        # not what another writer put there meanwhile, e.g. adapt's checkpoint beside it).
        created = next((d for d in reversed([self.path, *self.path.parents]) if not d.exists()), None)
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        new_lock = not lock.exists()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no advisory locks on this platform
                pass
            except BlockingIOError:
                raise HistoryError(f"history {self.path} is being written by another process") from None
            self._held = True
            yield
        finally:
            self._held = False
            os.close(fd)
            if not (self.path / MANIFEST).exists():
                if created is not None:  # the history directory is this lock's: remove it, and
                    shutil.rmtree(self.path, ignore_errors=True)
                    for d in self.path.parents:  # the parents it made while nothing else is there
                        if d == created.parent or not _rmdir_if_empty(d):
                            break
                elif new_lock:
                    lock.unlink(missing_ok=True)

    def append(self, record: TaskRecord, model: nn.Module | dict) -> dict:
        """Add `record` as the newest task, atomically; returns its manifest entry.
        `model` (module or fingerprint) must match the history's model."""
        fp = model if isinstance(model, dict) else model_fingerprint(model)
        with self._lock():
            on_disk = self._read_manifest(self.path) if (self.path / MANIFEST).exists() else None
            if len(on_disk["tasks"] if on_disk else []) != len(self):
                raise HistoryError(f"history {self.path} changed since it was opened; open it again")
            if on_disk is not None:
                compare_fingerprints(on_disk["model"], fp, f"history {self.path}")
            tasks_dir = self.path / TASKS
            tasks_dir.mkdir(exist_ok=True)
            index = len(self) + 1
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", record.name)[:40] or "task"
            name = f"{index:03d}-{slug}"
            atomic.remove_stale(tasks_dir, name)
            target = tasks_dir / name
            if target.exists():  # a crashed writer's directory the manifest never listed
                shutil.rmtree(target)
            files = {}
            with atomic.staging_dir(target) as tmp:
                writers = {"core": ("core.safetensors", lambda p: record.core.save(p), record.core is not None),
                           "updates": ("updates.safetensors", lambda p: save_updates(record.updates, p),
                                       bool(record.updates)),
                           "fisher": ("fisher.safetensors", lambda p: save_tensors(record.fisher, p),
                                      bool(record.fisher)),
                           "before": ("core_before.safetensors", lambda p: save_tensors(record.before, p),
                                      bool(record.before)),
                           "after": ("core_after.safetensors", lambda p: save_tensors(record.after, p),
                                     bool(record.after)),
                           "test": ("test.jsonl", lambda p: _write_test(record.test, p), bool(record.test))}
                for key, (fname, write, wanted) in writers.items():
                    if not wanted:
                        continue
                    write(tmp / fname)
                    files[key] = {"file": fname, "bytes": (tmp / fname).stat().st_size,
                                  "sha256": atomic.sha256_file(tmp / fname)}
                atomic.install_dir(tmp, target)
            entry = {
                "index": index, "name": record.name, "dir": f"{TASKS}/{name}",
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model_sha256": fp["sha256"], "scorer": record.scorer, "data": record.data,
                "hyperparameters": record.hyperparameters, "summary": record.summary, "files": files,
            }
            manifest = {"format": FORMAT, "version": VERSION,
                        "model": on_disk["model"] if on_disk else fp,
                        "tasks": (on_disk["tasks"] if on_disk else []) + [entry]}
            atomic.write_json(self.path / MANIFEST, manifest)
            self._manifest = manifest
        return entry


__all__ = ["TaskHistory", "TaskRecord", "HistoryError", "model_fingerprint", "data_fingerprint",
           "compare_fingerprints"]

