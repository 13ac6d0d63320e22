"""trace_ft.store.atomic: a write that fails leaves the old content and no leftovers; a
crash between the renames of an overwrite is repaired by the next writer."""

import os

import pytest

from trace_ft.store import atomic


def test_write_with_replaces_whole_or_not_at_all(tmp_path):
    f = tmp_path / "a.json"
    atomic.write_json(f, {"x": 1})
    assert f.read_text().strip().startswith("{") and '"x": 1' in f.read_text()

    def half(tmp):
        open(tmp, "w").write("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_with(f, half)
    assert '"x": 1' in f.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left


def test_install_dir_and_overwrite(tmp_path):
    target = tmp_path / "model"
    with atomic.staging_dir(target) as tmp:
        (tmp / "w").write_text("one")
        atomic.install_dir(tmp, target)
    assert (target / "w").read_text() == "one"
    with atomic.staging_dir(target) as tmp:
        (tmp / "w").write_text("two")
        with pytest.raises(FileExistsError):
            atomic.install_dir(tmp, target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging removed
    with atomic.staging_dir(target) as tmp:
        (tmp / "w").write_text("two")
        atomic.install_dir(tmp, target, overwrite=True)
    assert (target / "w").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_block_removes_its_staging(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(tmp_path / "x") as tmp:
            (tmp / "f").write_text("?")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_puts_back_an_old_directory(tmp_path):
    """An overwrite killed between its two renames left `.name.old` and no `name`."""
    old = tmp_path / ".model.old"
    old.mkdir()
    (old / "w").write_text("kept")
    (tmp_path / ".model.abc.tmp").mkdir()
    atomic.remove_stale(tmp_path, "model")
    assert (tmp_path / "model" / "w").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sha256_file(tmp_path):
    f = tmp_path / "b"
    f.write_bytes(b"abc")
    assert atomic.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert os.path.getsize(f) == 3


def test_output_folders_are_claimed_once_and_never_silently_reused(tmp_path):
    """Issue #35: runs/<timestamp> had one-second resolution, and --out overwrote an
    existing folder without asking."""
    from trace_ft.store.atomic import check_out, claim_dir

    base = tmp_path / "runs" / "20261206-101010"
    assert [claim_dir(base).name for _ in range(3)] == ["20261206-101010", "20261206-101010-2", "20261206-101010-3"]
    check_out(tmp_path / "absent", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists and is not empty.*--overwrite"):
        check_out(tmp_path / "full", overwrite=False)
    check_out(tmp_path / "full", overwrite=True)
