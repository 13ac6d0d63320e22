"""Crash-safe file writes: stage in the target's directory, fsync, then rename.

A reader sees either the old file (or directory) or the complete new one, never a torn
write, whatever point a process dies at. Staged names start with a dot so a crash leaves
only hidden leftovers, which the next writer removes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _as_umask_allows(path: str | Path, directory: bool) -> None:
    """mkstemp and mkdtemp make private files (0600) and directories (0700); what we stage
    is for whoever may read the target, so give it the mode an ordinary open or mkdir would
    (0666 or 0777 less the umask): a shared cache or output folder stays readable."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    path = Path(path)
    dirs = [path]
    for root, subdirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb+") as fh:
                os.fsync(fh.fileno())
        dirs += [Path(root) / d for d in subdirs]
    for d in reversed(dirs):
        fsync_dir(d)


def write_with(path: str | Path, write) -> None:
    """Replace `path` atomically with what ``write(temporary_path)`` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _as_umask_allows(tmp, directory=False)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A fresh hidden directory next to `target` to build its new content in; removed if
    the block fails (the caller installs it with `install_dir`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _as_umask_allows(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(target: str | Path) -> Iterator[Path]:
    """A hidden directory next to `target` for files on the way to it (an extracted GGUF),
    removed when the block ends; named like `staging_dir`'s, so `remove_stale` finds what a
    killed process left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked_dir(path: str | Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Be the only holder of `path` (a directory, made if absent) for the block: an
    exclusive advisory lock on the directory itself (flock), so nothing is written into it.
    A second process waits (``waiting()`` is called once if it has to) and goes on when
    the first is done. Without flock (Windows) the block runs unlocked."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def install_dir(staged: Path, target: str | Path, overwrite: bool = False) -> None:
    """Make the complete directory `staged` appear as `target`.

    When `target` does not exist this is one atomic rename. With `overwrite`, an existing
    `target` is first renamed aside and deleted afterwards: a crash between the two renames
    leaves the old content in a hidden ``.<name>.old`` directory next to it, never a mix.
    """
    target = Path(target)
    fsync_tree(staged)
    old = None
    if target.exists():
        if not overwrite:
            shutil.rmtree(staged, ignore_errors=True)
            raise FileExistsError(f"{target} already exists")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException as e:
        if old is not None:
            os.rename(old, target)
        shutil.rmtree(staged, ignore_errors=True)
        # a non-empty directory appeared at `target` meanwhile (another writer finished
        # first): renaming onto it fails with ENOTEMPTY or EEXIST, not FileExistsError
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{target} already exists") from None
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale(parent: str | Path, name: str) -> None:
    """Clean up after crashed writes of `name` in `parent`: put back an old directory that
    `install_dir` had moved aside if nothing replaced it, delete every other leftover."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    old = parent / f".{name}.old"
    if old.is_dir() and not (parent / name).exists():
        os.rename(old, parent / name)
        fsync_dir(parent)
    for p in parent.glob(f".{name}.*"):
        if p.name.endswith((".tmp", ".old")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def check_out(out: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an output folder that already holds something, before any work, unless told
    to replace what is there."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty (pass {flag} to write into it)")


def claim_dir(base: str | Path) -> Path:
    """A new, empty folder at `base`, or at `base`-2, -3, ... when that is taken: made with
    one mkdir each, so two runs started in the same second never share a folder."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name next to {base}")
