"""trace_ft.method.select and sketch: selection finds planted core parameters, honours
specificity and earlier cores, reproduces the authors' rule; sketches keep cosines."""

import math

import pytest
import torch
from torch import nn

from trace_kernels import CoreMask
from trace_ft import EarlierTask, ProbeResult, SelectConfig, probe, select_core, sketch_update
from trace_ft.method.sketch import sketch_cosine


def planted_problem(gen, rows=48, cols=64, core_rows=12, noise=1e-3):
    """A linear map whose target differs from its start only on `core_rows` rows."""
    layer = nn.Linear(cols, rows, bias=False)
    target = layer.weight.detach().clone()
    core = torch.randperm(rows, generator=gen)[:core_rows]
    target[core] += torch.randn(core_rows, cols, generator=gen) * 0.5
    batches = []
    for _ in range(8):
        x = torch.randn(32, cols, generator=gen)
        y = x @ target.T + noise * torch.randn(32, rows, generator=gen)
        batches.append((x, y))
    return layer, core, batches


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("importance", ["rank", "product", "weighted"])
def test_selection_finds_planted_rows(gen, importance):
    layer, core, batches = planted_problem(gen)
    result = probe(layer, batches, steps=20, lr=1e-2, loss_fn=mse, exclude=())
    sel = select_core(result, budget=12 / 48, granularity="row", importance=importance)
    chosen = set(sel.mask["weight"].indices.tolist())
    recall = len(chosen & set(core.tolist())) / len(core)
    assert recall >= 0.9, (importance, sorted(chosen), sorted(core.tolist()))
    assert sel.mask.numel_selected <= 12 * 64
    assert "weight" in sel.summary()


def test_specificity_excludes_blocks_shared_with_an_earlier_task(gen):
    layer, core, batches = planted_problem(gen)
    result = probe(layer, batches, steps=20, lr=1e-2, loss_fn=mse, exclude=())
    shared_rows = core[:4]
    earlier = torch.zeros_like(result.deltas["weight"])
    earlier[shared_rows] = result.deltas["weight"][shared_rows] * 3.0  # same direction
    other = torch.randn(earlier.shape, generator=gen)
    earlier[core[4:]] = other[core[4:]]  # unrelated direction elsewhere
    sel = select_core(result, [EarlierTask(updates={"weight": earlier})], budget=12 / 48, granularity="row")
    chosen = set(sel.mask["weight"].indices.tolist())
    assert not chosen & set(shared_rows.tolist())
    assert len(chosen & set(core[4:].tolist())) >= 7
    assert sel.report[0]["excluded_shared"] >= 4
    # "downweight" keeps them possible but lower; with a full budget they come back
    sel2 = select_core(result, [EarlierTask(updates={"weight": earlier})], budget=1.0,
                       shared_rule="downweight", granularity="row")
    assert set(shared_rows.tolist()) <= set(sel2.mask["weight"].indices.tolist())


def test_earlier_cores_are_excluded_unless_shared(gen):
    layer, core, batches = planted_problem(gen)
    result = probe(layer, batches, steps=20, lr=1e-2, loss_fn=mse, exclude=())
    taken = CoreMask.from_blocks({"weight": ((48, 64), 64, torch.isin(torch.arange(48), core[:6]))})
    sel = select_core(result, [EarlierTask(core=taken)], budget=12 / 48, granularity="row")
    assert not set(sel.mask["weight"].indices.tolist()) & set(core[:6].tolist())
    assert sel.report[0]["excluded_earlier_core"] == 6
    sel = select_core(result, [EarlierTask(core=taken)], budget=12 / 48, share_earlier_cores=True, granularity="row")
    assert set(core[:6].tolist()) <= set(sel.mask["weight"].indices.tolist())


def synthetic_result(gen, shapes):
    deltas = {n: torch.randn(s, generator=gen) * torch.rand(1, generator=gen) for n, s in shapes.items()}
    fisher = {n: torch.rand(s, generator=gen) * torch.rand(1, generator=gen) for n, s in shapes.items()}
    return ProbeResult(deltas=deltas, fisher=fisher, steps=1)


def test_paper_preset_reproduces_the_released_rule(gen):
    shapes = {f"layer{i}.w": (8 + i, 16) for i in range(20)}
    result = synthetic_result(gen, shapes)
    sel = select_core(result, config=SelectConfig.paper())
    rms = torch.tensor([d.double().square().mean().sqrt() for d in result.deltas.values()])
    mf = torch.tensor([f.double().mean() for f in result.fisher.values()])
    score = 0.5 * (rms - rms.min()) / (rms.max() - rms.min()) + 0.5 * (mf - mf.min()) / (mf.max() - mf.min())
    expected = {list(shapes)[i] for i in torch.argsort(score, descending=True)[:2].tolist()}
    chosen = {n for n, e in sel.mask.items() if e.num_selected}
    assert chosen == expected
    assert all(e.block_size == math.prod(shapes[n]) for n, e in sel.mask.items())


def test_paper_specificity_selector(gen):
    shapes = {f"t{i}": (4, 8) for i in range(10)}
    result = synthetic_result(gen, shapes)
    # earlier update: same direction for t0..t8 (scaled), opposite-ish for t9
    earlier = {n: d * (1.0 if n != "t9" else -1.0) for n, d in result.deltas.items()}
    sel = select_core(result, [EarlierTask(updates=earlier)], SelectConfig.paper(specificity=True))
    assert {n for n, e in sel.mask.items() if e.num_selected} == {"t9"}


def test_per_tensor_budget(gen):
    shapes = {"a": (40, 10), "b": (20, 10)}
    result = synthetic_result(gen, shapes)
    result.deltas["a"] *= 100  # global would favour a
    sel = select_core(result, budget=0.25, scope="per_tensor", granularity="row")
    assert sel.mask["a"].num_selected == 10 and sel.mask["b"].num_selected == 5
    sel = select_core(result, budget=0.25, granularity="element")
    assert sel.mask.numel_selected == 150


def test_sketch_cosine_close_to_exact(gen):
    block, nb = 65536, 8
    base = torch.randn(nb * block, generator=gen)
    noise = torch.randn(nb * block, generator=gen)
    mix = torch.linspace(0, 1, nb).repeat_interleave(block)
    other = mix * base + (1 - mix) * noise  # cosines spread from ~0 to 1
    sk = sketch_update(other, "w", block, dim=8192, seed=3)
    approx = sketch_cosine(base, "w", sk)
    a, b = base.view(nb, block).double(), other.view(nb, block).double()
    exact = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert (approx.double() - exact).abs().max() < 0.05
    # the sketch is 8x smaller than the update
    assert sk.values.numel() * 8 == other.numel()


def test_selection_with_sketched_history(gen):
    layer, core, batches = planted_problem(gen, rows=8, cols=8192, core_rows=4)
    result = probe(layer, batches, steps=10, lr=1e-2, loss_fn=mse, exclude=())
    earlier = result.deltas["weight"].clone()
    sk = sketch_update(earlier, "weight", 8192, dim=1024)
    sel = select_core(result, [EarlierTask(updates={"weight": sk})], budget=0.5, granularity="row")
    assert sel.report[0]["excluded_shared"] >= 4  # same direction everywhere: all shared


def test_interference_guard_avoids_blocks_earlier_tasks_are_sensitive_to(gen):
    # two tensors; the new task is equally pulled by every row, but an earlier task's
    # Fisher sits on the first half of the rows of "a": the guard moves the core elsewhere
    deltas = {"a": torch.ones(8, 4), "b": torch.ones(8, 4)}
    fisher = {"a": torch.ones(8, 4), "b": torch.ones(8, 4)}
    res = ProbeResult(deltas=deltas, fisher=fisher, steps=1)
    old = {"a": torch.zeros(8, 4), "b": torch.zeros(8, 4)}
    old["a"][:4] = 1.0
    earlier = [EarlierTask(fisher=old)]
    sel = select_core(res, earlier, SelectConfig(budget=0.25, granularity="row", protect=5.0))
    chosen_a = sel.mask["a"].block_mask() if "a" in sel.mask else torch.zeros(8, dtype=torch.bool)
    assert not chosen_a[:4].any()
    assert sel.mask.numel_selected == 16
    # off by default: the same inputs may pick the protected rows
    plain = select_core(res, earlier, SelectConfig(budget=1.0, granularity="row"))
    assert plain.mask["a"].block_mask()[:4].all()
    with pytest.raises(ValueError, match="protect must be >= 0"):
        select_core(res, earlier, SelectConfig(protect=-1.0))
    with pytest.raises(ValueError, match="earlier Fisher of 'a'"):
        select_core(res, [EarlierTask(fisher={"a": torch.ones(3)})], SelectConfig(protect=1.0))


@pytest.mark.parametrize("sketched", [False, True])
def test_element_selection_measures_specificity_per_row(gen, sketched):
    """At element level a block's cosine is only a sign test; with specificity_unit="row"
    every element gets its row's cosine."""
    delta = torch.randn(6, 5, generator=gen).repeat_interleave(2, 1)  # pairs of equal values
    flip = torch.tensor([1.0, -1.0]).repeat(5)  # one of each pair flipped: row cosine exactly 0
    earlier = torch.cat([delta[:3] * 2.0, delta[3:] * flip])
    result = ProbeResult(deltas={"w": delta}, fisher={"w": torch.rand(6, 10, generator=gen)}, steps=1)
    row_cos = torch.nn.functional.cosine_similarity(delta, earlier, dim=1)
    assert (row_cos[:3] > 0.99).all() and (row_cos[3:].abs() < 0.5).all()
    update = sketch_update(earlier, "w", 10, dim=16) if sketched else earlier
    by_row = select_core(result, [EarlierTask(updates={"w": update})], granularity="element",
                         specificity_unit="row", budget=1.0)
    chosen = by_row.mask["w"].block_mask().view(6, 10)
    assert not chosen[:3].any() and chosen[3:].all()
    assert by_row.report[0]["excluded_shared"] == 30
    if not sketched:  # per element: the 5 agreeing signs of each of rows 3-5 count as shared too
        by_element = select_core(result, [EarlierTask(updates={"w": earlier})], granularity="element",
                                 budget=1.0)
        assert by_element.report[0]["excluded_shared"] == 30 + 3 * 5
    with pytest.raises(ValueError, match="specificity_unit"):
        select_core(result, [], specificity_unit="column")
