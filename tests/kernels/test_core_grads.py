"""Core-rows weight gradients (`install_core_grads`): the compact gradient equals the dense
gradient's core rows up to matmul reduction order (fp32: rtol 1e-5; bf16: the bf16
rounding of the same sums, rtol 2e-2), and MaskedAdamW stepped from it moves exactly
the elements the full-gradient path moves, to the same values (bit for bit when the
gradients are equal), with no full-size weight gradient made."""

import copy

import pytest
import torch
from torch import nn

from trace_kernels import CoreMask, MaskEntry, MaskedAdamW, install_core_grads
from trace_kernels.core_grads import CARRIER, core_rows

pytest.importorskip("trace_kernels._C")


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 40), nn.GELU(), nn.Linear(40, 40, bias=False), nn.GELU(),
                         nn.Linear(40, 7)).to(dtype)


def row_core(gen, shapes, frac=0.2, granularity="row"):
    picked = {}
    for name, entry in CoreMask.full(shapes, granularity).items():
        keep = torch.rand(entry.num_blocks, generator=gen) < frac
        keep[0] = True
        picked[name] = (entry.shape, entry.block_size, entry.indices[keep])
    return CoreMask.from_indices(picked)


def weights_core(net, gen, granularity="row", frac=0.2):
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    return row_core(gen, shapes, frac, granularity)


@pytest.mark.parametrize("shape,bs", [((9, 12), 1), ((9, 12), 4), ((9, 12), 12), ((9, 12), 36),
                                      ((9, 12), 108), ((9, 12), 5 * 12 // 5)])
def test_core_rows_maps_every_block_onto_the_rows(shape, bs):
    gen = torch.Generator().manual_seed(bs)
    n = shape[0] * shape[1] // bs
    idx = torch.nonzero(torch.rand(n, generator=gen) < 0.4).reshape(-1)
    entry = MaskEntry(shape, bs, idx)
    rows, compact = core_rows(entry, shape[1])
    w = torch.randn(shape, generator=gen)
    assert torch.equal(rows, torch.unique(entry.element_indices() // shape[1]))
    assert torch.equal(w[rows].reshape(-1)[compact.element_indices()], w.reshape(-1)[entry.element_indices()])


def test_core_rows_refuses_blocks_across_rows():
    assert core_rows(MaskEntry((9, 12), 9, torch.tensor([0, 5])), 12) is None


def run_steps(net, core, compact, steps=3, micro=2, dtype=torch.float32, clip=None, **kw):
    for n, p in net.named_parameters():
        p.requires_grad_(n in core)
    handle = install_core_grads(net, core, max_row_fraction=1.0) if compact else None
    opt = MaskedAdamW(net.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core, backend="cpu", **kw)
    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(6, 5, 13, generator=gen).to(dtype)
            net(x).float().square().mean().backward()
        if compact:
            for n in core:
                assert dict(net.named_parameters())[n].grad is None  # never a full-size gradient
        if clip is not None:
            norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), clip)))
        opt.step()
    return handle, opt, norms


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_steps_match_the_full_gradient_path(granularity):
    gen = torch.Generator().manual_seed(1)
    dense = model()
    core = weights_core(dense, gen, granularity)
    mine = copy.deepcopy(dense)
    before = copy.deepcopy(dense.state_dict())
    run_steps(dense, core, False)
    handle, opt, _ = run_steps(mine, core, True)
    assert sorted(handle.names) == sorted(core)
    sd = mine.state_dict()
    assert not any(CARRIER in k for k in sd)
    for name, ref in dense.state_dict().items():
        got = sd[name]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
        if name in core:  # elements outside the core: bit for bit as they were
            outside = ~core[name].to_dense()
            assert torch.equal(got[outside], before[name][outside]), name
    assert not mine[0].weight.requires_grad  # DDP/FSDP wait for no gradient of it
    handle.remove()
    assert not any(CARRIER in n for n, _ in mine.named_parameters())
    assert "forward" not in mine[0].__dict__ and mine[0].weight.requires_grad


def test_gradients_equal_the_dense_rows_and_accumulate():
    gen = torch.Generator().manual_seed(2)
    dense = model()
    core = weights_core(dense, gen)
    mine = copy.deepcopy(dense)
    x = torch.randn(2, 4, 13, generator=gen)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for net, xx in zip((dense, mine), xs):
        if net is mine:
            install_core_grads(net, core, max_row_fraction=1.0)
        for _ in range(2):  # accumulated over two backward passes
            net(xx).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    for i in (0, 2, 4):
        rows = getattr(mine[i], CARRIER).trace_rows
        torch.testing.assert_close(getattr(mine[i], CARRIER).grad, dense[i].weight.grad[rows], rtol=1e-5, atol=1e-6)
        assert mine[i].weight.grad is None
    torch.testing.assert_close(mine[0].bias.grad, dense[0].bias.grad, rtol=1e-5, atol=1e-6)


def test_clipping_through_model_parameters_counts_the_compact_gradients():
    gen = torch.Generator().manual_seed(3)
    net = model()
    core = weights_core(net, gen)
    dense = copy.deepcopy(net)
    _, _, norms = run_steps(net, core, True, steps=1, clip=1e-3)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in core)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        dense(torch.randn(6, 5, 13, generator=g)).square().mean().backward()
    params = dict(dense.named_parameters())
    want = torch.stack([params[n].grad.reshape(params[n].shape[0], -1)[core_rows(e, params[n].shape[1])[0]].norm()
                        for n, e in core.items()]).norm()
    assert norms[0] == pytest.approx(float(want), rel=1e-5)


def test_bf16_with_masters_matches_the_full_gradient_path():
    gen = torch.Generator().manual_seed(4)
    dense = model(torch.bfloat16)
    core = weights_core(dense, gen)
    mine = copy.deepcopy(dense)
    run_steps(dense, core, False, dtype=torch.bfloat16)
    run_steps(mine, core, True, dtype=torch.bfloat16)
    for (name, ref), got in zip(dense.state_dict().items(), mine.state_dict().values()):
        close = torch.isclose(got.float(), ref.float(), rtol=2e-2, atol=1e-3)
        assert close.float().mean() > 0.99, name


def installed(seed):
    """A model with a row core, the rest frozen, core-rows gradients installed."""
    gen = torch.Generator().manual_seed(seed)
    net = model()
    core = weights_core(net, gen)
    for n, p in net.named_parameters():
        p.requires_grad_(n in core)
    install_core_grads(net, core, max_row_fraction=1.0)
    return gen, net, core


def test_grad_scaler_skips_a_step_with_an_inf_in_a_compact_gradient():
    gen, net, core = installed(6)
    opt = MaskedAdamW(net.named_parameters(), lr=1e-2, masks=core, backend="cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = copy.deepcopy(net.state_dict())
    scaler.scale(net(torch.randn(3, 13, generator=gen)).square().mean()).backward()
    getattr(net[2], CARRIER).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.zero_grad()
    assert all(getattr(net[i], CARRIER).grad is None for i in (0, 2, 4))
    scaler.scale(net(torch.randn(3, 13, generator=gen)).square().mean()).backward()
    scaler.step(opt)  # a finite step moves the core
    assert not torch.equal(net[2].weight, before["2.weight"])


def test_refusals_name_the_parameter():
    gen, net, core = installed(7)
    opt = MaskedAdamW([(n, p) for n, p in net.named_parameters() if n in core], lr=1e-2, masks=core)
    net(torch.randn(3, 13, generator=gen)).sum().backward()
    with pytest.raises(ValueError, match="carrier is not in this optimizer"):
        opt.step()
    with pytest.raises(ValueError, match="max_row_fraction"):
        install_core_grads(net, core, max_row_fraction=0)


def test_layers_where_it_saves_nothing_keep_the_full_gradient():
    net = model()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    core = CoreMask.full(shapes, "row")  # every row: nothing to save
    with install_core_grads(net, core) as handle:
        assert handle.names == []
    with install_core_grads(net, core, max_row_fraction=1.0) as handle:
        assert len(handle.names) == 3
    assert not any(CARRIER in n for n, _ in net.named_parameters())
