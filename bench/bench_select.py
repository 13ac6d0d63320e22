"""The element-level selection of a SmolLM2-135M-sized probe (106M eligible elements, the
model's 210 weight matrices), its native passes against the same passes in torch ops.

`select_core` on synthetic probes (Δ normal, Fisher heavy-tailed), for a first task (no
history) and a second (the first's exact fp32 update and core as history: the cosine and
exclusion passes run too), with the selection's three kernels (`ops.rank_scores`,
`ops.rank_counts`, `ops.element_max_cosine`) on the cpu backend, and with the reference's
torch ops in their place; the rest of the selection is the same code. Times paired per
round (median of the ratios); the two give the same core and report, checked.

    python bench/bench_select.py [--rounds 3]   # writes bench/results/select_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, paired_ratios, write_report  # noqa: E402

from trace_ft.method.probe import ProbeResult  # noqa: E402
from trace_ft.method.select import select_core  # noqa: E402
from trace_ft.method.select.config import EarlierTask  # noqa: E402
from trace_kernels.backends import registry  # noqa: E402

OPS = ("rank_scores", "rank_counts", "element_max_cosine")
LAYER = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
         "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
         "mlp.down_proj": (576, 1536)}
SHAPES = {f"model.layers.{i}.{n}.weight": s for i in range(30) for n, s in LAYER.items()}


def synthetic_probe(gen: torch.Generator) -> ProbeResult:
    return ProbeResult(deltas={n: torch.randn(s, generator=gen) * 1e-4 for n, s in SHAPES.items()},
                       fisher={n: torch.rand(s, generator=gen) ** 4 * 1e-6 for n, s in SHAPES.items()}, steps=8)


@contextmanager
def torch_ops():
    """The selection's kernels on the cpu backend replaced by the reference's torch ops."""
    registry.kernel("rank_scores", "cpu")  # (both backends loaded and registered)
    registry.kernel("rank_scores", "reference")
    saved = {op: registry._KERNELS[(op, "cpu")] for op in OPS}
    try:
        for op in OPS:
            registry._KERNELS[(op, "cpu")] = registry._KERNELS[(op, "reference")]
        yield
    finally:
        registry._KERNELS.update({(op, "cpu"): fn for op, fn in saved.items()})


def digest(selection) -> str:
    h = hashlib.sha256()
    for n in SHAPES:
        h.update(selection.mask[n].indices.numpy().tobytes())
    h.update(json.dumps(selection.report, sort_keys=True).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    first, second = synthetic_probe(gen), synthetic_probe(gen)
    core = select_core(first)
    earlier = [EarlierTask(updates={n: d * 3 for n, d in first.deltas.items()}, core=core.mask)]
    tasks = {"first task (no history)": (first, []), "second task (one earlier task)": (second, earlier)}

    rows, payload = [], {"machine": machine(), "elements": sum(d.numel() for d in first.deltas.values()),
                         "rounds": args.rounds, "cases": {}}
    for label, (probe, history) in tasks.items():
        native = select_core(probe, history)
        with torch_ops():
            plain = select_core(probe, history)
        assert digest(native) == digest(plain), f"{label}: the two give different cores or reports"

        def baseline(p=probe, h=history):
            with torch_ops():
                select_core(p, h)

        r = paired_ratios(baseline, {"native": lambda p=probe, h=history: select_core(p, h)}, args.rounds, warmup=1)
        r = r["native"]
        payload["cases"][label] = r
        rows.append(f"| {label} | {r['median_s']:.2f} | {r['baseline_median_s']:.2f} | **{r['ratio']:.2f}×** "
                    f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |")
    m = payload["machine"]
    table = ["# Element-level selection of a SmolLM2-135M-sized probe (CPU)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, ISA clone "
             f"{m.get('isa_clone', '?')}. {payload['elements']:,} elements in the model's 210 weight shapes; "
             f"`select_core` (5 % budget, element level: the streamed driver), {args.rounds} rounds, each timed right "
             "after its baseline; ratio = median of the paired ratios (range). Same core and report both ways.", "",
             "| selection | native passes s | the same passes in torch ops s | ratio |", "|---|---:|---:|---:|",
             *rows]
    write_report("select_cpu", payload, table)
    print("\n".join(table))


if __name__ == "__main__":
    main()
