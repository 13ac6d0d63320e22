"""`trace-ft eval`: standard benchmarks on any model the project opens (the built-in name is
refused: it reads no English), scored offline as OLMES and lm-evaluation-harness score them
(`trace_ft.benchmarks`), printed as a table beside the model card's figures where the model
is a known one, and written as JSON and markdown."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch

from ..benchmarks.data import BenchmarkData, benchmark_names
from ..benchmarks.results import evaluate, table
from ..config.defaults import model_kind
from ..lm.model import default_cache_dir, open_model
from ..lm.pretrained import KNOWN
from ..store.atomic import check_out, claim_dir, write_bytes, write_json


def card_of(model: str) -> dict[str, float]:
    """The model card's figures of a known model (empty for any other)."""
    spec = KNOWN.get(str(model))
    return dict(spec.card) if spec is not None else {}


def arc_average(results: dict) -> tuple[float, float] | None:
    """The mean of ARC-Easy and ARC-Challenge on the summed log-likelihood and per character
    (how model cards report "ARC"), where both were scored."""
    if "arc_easy" in results and "arc_challenge" in results:
        e, c = results["arc_easy"], results["arc_challenge"]
        return (e.acc + c.acc) / 2, (e.acc_per_char + c.acc_per_char) / 2
    return None


def run_eval(model: str, bench: str = "headline", limit: int | None = None, out: str | Path | None = None,
             cache_dir: str | None = None, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
             overwrite: bool = False, progress: bool = True, log=print) -> dict:
    names = benchmark_names(bench)
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be >= 2 (a standard error needs two questions), got {limit}")
    if model_kind(model) == "builtin":
        raise ValueError("the built-in model reads no English: standard benchmarks are for a pretrained model "
                         "(--model smollm2-135m, a .gguf file or a Hugging Face directory)")
    if out is not None:
        check_out(out, overwrite)
    if threads:
        torch.set_num_threads(threads)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.perf_counter()
    data = BenchmarkData(cache, log)
    net, codec, model_dir = open_model(model, cache_dir=cache, dtype=dtype, device=device, progress=progress,
                                       chat=False)
    counts = {n: len(data.questions(n, limit)) for n in names}
    log(f"plan: {model_dir} on {sum(counts.values()):,} questions ("
        + ", ".join(f"{n} {c}" for n, c in counts.items())
        + (f"; the first {limit} of each, MMLU's spread over its subjects" if limit else "; whole splits")
        + "), each benchmark with a progress bar; about 450 tokens a second for a 135M model on two cores")
    results = evaluate(net, codec, names, data, limit, progress=progress)
    card = card_of(model)
    text = table(results, card)
    arc = arc_average(results)
    if arc is not None:
        text += f"\n\nARC average (Easy, Challenge): acc {arc[0]:.1f}, acc_norm {arc[1]:.1f}" + (
            f"; the model card: {card['arc_avg']:.1f}" if "arc_avg" in card else "")
    log("\n" + text + "\n")
    out = Path(out) if out is not None else claim_dir(Path("runs") / datetime.now().strftime("eval-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "model_dir": str(model_dir), "limit": limit, "seconds": time.perf_counter() - t0,
              "card": card, "arc_average": arc, "results": {n: r.as_dict() for n, r in results.items()}}
    write_json(out / "results.json", report)
    write_bytes(out / "report.md", f"# Standard benchmarks: {model}\n\n{text}\n".encode())
    log(f"wrote {out}/results.json, report.md ({report['seconds']:.0f} s)")
    return report


__all__ = ["run_eval", "card_of", "arc_average"]
