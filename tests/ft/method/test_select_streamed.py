"""The streamed element-level selection (a large model's, in bounded memory) chooses exactly
the core, and reports exactly the numbers, of the materialised path it replaces. Both are
run past a lowered `EXACT_RANKS_UP_TO`, so small tensors take the binned-rank paths a real
model's element level takes, on fresh random inputs of odd shapes with ties at the budget's
threshold, earlier tasks (bf16 and sketched updates, cores, Fisher for the guard) and each
rule."""

import math

import pytest
import torch

from helpers import same_report_rows
from trace_kernels import CoreMask
from trace_ft import EarlierTask, ProbeResult, select_core, sketch_update
from trace_ft.method.select import budget, core, ranks

SHAPES = {"a.weight": (7, 13), "b.weight": (31, 5), "c.weight": (3, 17, 2)}


def _probe(gen) -> ProbeResult:
    # values on a coarse grid: many equal scores, so the budget's threshold falls in a tie
    deltas = {n: torch.randint(-6, 7, s, generator=gen).float() * 0.25 for n, s in SHAPES.items()}
    fisher = {n: torch.randint(0, 5, s, generator=gen).float() * 0.125 for n, s in SHAPES.items()}
    return ProbeResult(deltas=deltas, fisher=fisher, steps=3)


def _earlier(gen, unit: str, dtype: torch.dtype = torch.bfloat16) -> list[EarlierTask]:
    # (fp32 updates at element units take the native cosine pass, bf16 ones the block path)
    first = {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}
    core = CoreMask.from_blocks({n: (s, 1, torch.rand(math.prod(s), generator=gen) < 0.1)
                                 for n, s in SHAPES.items()})
    fisher = {n: torch.rand(s, generator=gen).to(torch.bfloat16) for n, s in SHAPES.items()}
    tasks = [EarlierTask(updates=first, core=core, fisher=fisher),
             EarlierTask(fisher={n: torch.rand(s, generator=gen) for n, s in SHAPES.items()})]
    if unit == "row":  # a sketched update needs the unit it was sketched on
        tasks.append(EarlierTask(updates={n: sketch_update(torch.randn(s, generator=gen), n, s[-1], dim=4)
                                          for n, s in list(SHAPES.items())[:2]}))
    return tasks


def _both(monkeypatch, probe, earlier, **cfg):
    monkeypatch.setattr(ranks, "EXACT_RANKS_UP_TO", 64)
    streamed = select_core(probe, earlier, granularity="element", **cfg)
    monkeypatch.setattr(core, "streamable", lambda *a: False)
    materialised = select_core(probe, earlier, granularity="element", **cfg)
    return streamed, materialised


@pytest.mark.parametrize("unit,dtype", [("block", torch.bfloat16), ("block", torch.float32),
                                        ("row", torch.bfloat16)])
@pytest.mark.parametrize("rule", ["exclude", "downweight"])
@pytest.mark.parametrize("protect", [0.0, 2.0])
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.3, 1.0])
def test_streamed_selection_equals_the_materialised_one(monkeypatch, unit, dtype, rule, protect, budget):
    gen = torch.Generator().manual_seed(hash((unit, str(dtype), rule, protect, budget)) % 2**31)
    probe, earlier = _probe(gen), _earlier(gen, unit, dtype)
    streamed, materialised = _both(monkeypatch, probe, earlier, budget=budget, specificity_unit=unit,
                                   shared_rule=rule, protect=protect)
    assert not streamed.scores and materialised.scores  # the streamed path keeps no score
    for name in SHAPES:
        assert torch.equal(streamed.mask[name].indices, materialised.mask[name].indices), name
    assert same_report_rows(streamed.report, materialised.report)
    assert streamed.mask.numel_selected == sum(r["chosen"] for r in materialised.report)
    if 0 < budget < 1:
        assert streamed.mask.numel_selected == math.floor(budget * streamed.mask.numel)


def test_streamed_selection_without_history_and_its_errors(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    probe = _probe(gen)
    streamed, materialised = _both(monkeypatch, probe, [], budget=0.1)
    assert [torch.equal(streamed.mask[n].indices, materialised.mask[n].indices) for n in SHAPES] == [True] * 3
    bad = [EarlierTask(updates={"a.weight": torch.zeros(5)})]
    with pytest.raises(ValueError, match="'a.weight'"):
        select_core(probe, bad, granularity="element")
    bad = [EarlierTask(fisher={"b.weight": torch.zeros(4)})]
    with pytest.raises(ValueError, match="'b.weight'"):
        select_core(probe, bad, granularity="element", protect=1.0)


def test_top_scores_keep_exactly_the_k_largest_across_tensors(gen):
    """The floor rises by a histogram of fp32 bins: doubles a few ulps apart (one fp32 value,
    either side of a bin's edge) and ties at the k-th largest must still give the k largest,
    ties to the earlier position in scan order."""
    edge = torch.tensor([0.75], dtype=torch.float64)       # an fp32 bin edge (a power-of-two fraction)
    parts, where = [], []
    for t in range(9):
        n = int(torch.randint(50, 400, (1,), generator=gen))
        v = torch.rand(n, generator=gen, dtype=torch.float64) * 0.7
        v[torch.rand(n, generator=gen) < 0.02] = 0.9
        near = torch.rand(n, generator=gen) < 0.03           # at the edge, doubles an ulp apart
        v[near] = edge + torch.randint(-3, 4, (int(near.sum()),), generator=gen).double() * 2.0 ** -53
        v[torch.rand(n, generator=gen) < 0.05] = 0.5         # ties
        parts.append(v)
        where.append((f"t{t}", v))
    values = torch.cat(parts)
    # the k-th largest just below the edge, in the edge's fp32 bin
    below_edge = int((values >= 0.75).sum()) + 2
    for k in (1, 7, 100, below_edge, values.numel() - 1):
        top = budget.TopScores(k)
        for name, v in where:
            keep = torch.nonzero(v >= top.floor).reshape(-1)
            top.add(name, keep, v[keep], v.numel())
        got = top.chosen(k)
        order = torch.sort(values, descending=True, stable=True).indices[:k]   # ties: scan order
        want = torch.zeros(values.numel(), dtype=torch.bool)
        want[order] = True
        at = 0
        for name, v in where:
            w = torch.nonzero(want[at:at + v.numel()]).reshape(-1)
            idx, vals = got.get(name, (torch.zeros(0, dtype=torch.int64), None))
            assert torch.equal(idx, w), (k, name)
            at += v.numel()


@pytest.mark.gpu
@pytest.mark.parametrize("streamed", [True, False])
def test_selection_of_a_probe_on_the_gpu_is_the_cpus(monkeypatch, streamed):
    """A probe whose Δ and Fisher stay on the GPU (a single-GPU run) is selected as the same
    probe on the CPU is: the per-block sums come to the CPU, the selection runs there."""
    gen = torch.Generator().manual_seed(11)
    probe, earlier = _probe(gen), _earlier(gen, "block", torch.float32)
    monkeypatch.setattr(ranks, "EXACT_RANKS_UP_TO", 64)
    if not streamed:
        monkeypatch.setattr(core, "streamable", lambda *a: False)
    on_gpu = ProbeResult(deltas={n: d.cuda() for n, d in probe.deltas.items()},
                         fisher={n: f.cuda() for n, f in probe.fisher.items()}, steps=probe.steps)
    for cfg in (dict(budget=0.1), dict(budget=0.3, protect=2.0, shared_rule="downweight")):
        want = select_core(probe, earlier, granularity="element", **cfg)
        got = select_core(on_gpu, earlier, granularity="element", **cfg)
        for name in SHAPES:
            assert torch.equal(got.mask[name].indices.cpu(), want.mask[name].indices), name
        assert same_report_rows(got.report, want.report)
