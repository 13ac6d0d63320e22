"""Core-only weight gradients (`install_core_grads`): the compact gradient equals the dense
gradient's core rows or core elements up to matmul reduction order (fp32: rtol 1e-5;
bf16: the bf16 rounding of the same sums, rtol 2e-2), and MaskedAdamW stepped from it
moves exactly the elements the full-gradient path moves, to the same values (bit for bit
when the gradients are equal), with no full-size weight gradient made."""

import copy
import types

import pytest
import torch
from torch import nn

from trace_kernels import CoreMask, MaskEntry, MaskedAdamW, install_core_grads
from trace_kernels.core_grads import CARRIER, core_rows

# install_core_grads arguments for each compact mode: core rows, or core elements only
MODES = {"rows": dict(max_row_fraction=1.0), "elements": dict(max_row_fraction=1e-9, max_element_fraction=1.0)}

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


def assert_bf16_close(mine, dense):
    """bf16 weights of the two paths agree to bf16 rounding on at least 99 % of elements."""
    for (name, ref), got in zip(dense.state_dict().items(), mine.state_dict().values()):
        close = torch.isclose(got.float(), ref.float(), rtol=2e-2, atol=1e-3)
        assert close.float().mean() > 0.99, name


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


def run_steps(net, core, compact, steps=3, micro=2, dtype=torch.float32, clip=None, mode="rows",
              clip_core=False, cast=None, **kw):
    for n, p in net.named_parameters():
        p.requires_grad_(n in core)
    handle = install_core_grads(net, core, **MODES[mode]) if compact else None
    if cast is not None:  # the model cast after install
        net.to(cast)
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
            norm = opt.clip_grad_norm_(clip) if clip_core else nn.utils.clip_grad_norm_(net.parameters(), clip)
            norms.append(float(norm))
        opt.step()
    return handle, opt, norms


@pytest.mark.parametrize("granularity,mode", [("row", "rows"), ("element", "rows"), ("element", "elements"),
                                              ("row", "elements")])
def test_steps_match_the_full_gradient_path(granularity, mode):
    gen = torch.Generator().manual_seed(1)
    dense = model()
    core = weights_core(dense, gen, granularity)
    mine = copy.deepcopy(dense)
    before = copy.deepcopy(dense.state_dict())
    run_steps(dense, core, False)
    handle, opt, _ = run_steps(mine, core, True, mode=mode)
    assert all(getattr(m, CARRIER).shape[1] == (1 if mode == "elements" else m.in_features)
               for m in mine if hasattr(m, CARRIER))
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


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_the_dense_rows_and_accumulate(mode):
    gen = torch.Generator().manual_seed(2)
    dense = model()
    core = weights_core(dense, gen, "element" if mode == "elements" else "row")
    mine = copy.deepcopy(dense)
    x = torch.randn(2, 4, 13, generator=gen)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for net, xx in zip((dense, mine), xs):
        if net is mine:
            install_core_grads(net, core, **MODES[mode])
        for _ in range(2):  # accumulated over two backward passes
            net(xx).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    for i in (0, 2, 4):
        carrier = getattr(mine[i], CARRIER)
        want = dense[i].weight.grad.reshape(-1, carrier.shape[1])[carrier.trace_rows]
        torch.testing.assert_close(carrier.grad, want, rtol=1e-5, atol=1e-6)
        assert mine[i].weight.grad is None
    torch.testing.assert_close(mine[0].bias.grad, dense[0].bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_clipping_through_model_parameters_counts_the_compact_gradients(mode):
    gen = torch.Generator().manual_seed(3)
    net = model()
    core = weights_core(net, gen)
    dense = copy.deepcopy(net)
    _, _, norms = run_steps(net, core, True, steps=1, clip=1e-3, mode=mode)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in core)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        dense(torch.randn(6, 5, 13, generator=g)).square().mean().backward()
    params = dict(dense.named_parameters())
    cols = {"rows": lambda n: params[n].shape[1], "elements": lambda n: 1}[mode]
    want = torch.stack([params[n].grad.reshape(-1, cols(n))[core_rows(e, cols(n))[0]].norm()
                        for n, e in core.items()]).norm()
    assert norms[0] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("granularity,mode", [("row", "rows"), ("element", "rows"), ("element", "elements")])
def test_optimizer_clipping_measures_the_core_alike_on_both_paths(granularity, mode):
    """MaskedAdamW.clip_grad_norm_ reads the core elements' gradients only: the same norm and
    the same clipped steps whether the weights' gradients are full or core-only, and the
    norm is the dense gradient's at the core elements (what `trace-ft` clips on)."""
    gen = torch.Generator().manual_seed(4)
    dense = model()
    core = weights_core(dense, gen, granularity)
    mine = copy.deepcopy(dense)
    probe = copy.deepcopy(dense)
    _, _, dense_norms = run_steps(dense, core, False, clip=1e-3, clip_core=True)
    _, _, core_norms = run_steps(mine, core, True, clip=1e-3, clip_core=True, mode=mode)
    assert dense_norms == pytest.approx(core_norms, rel=1e-5)
    for name, ref in dense.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    # the first norm is the dense gradient's norm at the core elements
    for n, p in probe.named_parameters():
        p.requires_grad_(n in core)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        probe(torch.randn(6, 5, 13, generator=g)).square().mean().backward()
    params = dict(probe.named_parameters())
    want = torch.stack([params[n].grad.reshape(-1)[e.element_indices()].norm() for n, e in core.items()]).norm()
    assert dense_norms[0] == pytest.approx(float(want), rel=1e-5)
    assert want < torch.stack([params[n].grad.norm() for n in core]).norm()  # not the whole tensors'


@pytest.mark.parametrize("mode", MODES)
def test_bf16_with_masters_matches_the_full_gradient_path(mode):
    gen = torch.Generator().manual_seed(4)
    dense = model(torch.bfloat16)
    core = weights_core(dense, gen, "element" if mode == "elements" else "row")
    mine = copy.deepcopy(dense)
    run_steps(dense, core, False, dtype=torch.bfloat16)
    run_steps(mine, core, True, dtype=torch.bfloat16, mode=mode)
    assert_bf16_close(mine, dense)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_cast_after_install_keeps_one_element_carriers(mode):
    gen = torch.Generator().manual_seed(6)
    dense = model()
    core = weights_core(dense, gen, "element" if mode == "elements" else "row")
    mine = copy.deepcopy(dense)
    dense.to(torch.bfloat16)
    run_steps(dense, core, False, dtype=torch.bfloat16)
    carriers = []
    cast = torch.nn.Module.to

    def to_and_look(net, *args):  # the carriers as the cast leaves them: full k × in tensors
        out = cast(net, *args)
        carriers.extend(m.weight_core_grad for m in net if hasattr(m, CARRIER))
        assert carriers and all(c.untyped_storage().nbytes() > 2 for c in carriers)
        return out

    mine.to = types.MethodType(to_and_look, mine)
    run_steps(mine, core, True, dtype=torch.bfloat16, mode=mode, cast=torch.bfloat16)
    assert all(c.untyped_storage().nbytes() <= 2 and c.dtype == torch.bfloat16 for c in carriers)
    assert_bf16_close(mine, dense)


def installed(seed, mode="rows"):
    """A model with a row core, the rest frozen, compact gradients installed."""
    gen = torch.Generator().manual_seed(seed)
    net = model()
    core = weights_core(net, gen)
    for n, p in net.named_parameters():
        p.requires_grad_(n in core)
    install_core_grads(net, core, **MODES[mode])
    return gen, net, core


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_skips_a_step_with_an_inf_in_a_compact_gradient(mode):
    gen, net, core = installed(6, mode)
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
    with pytest.raises(ValueError, match="max_element_fraction"):
        install_core_grads(net, core, max_element_fraction=1.5)


def test_layers_where_it_saves_nothing_keep_the_full_gradient():
    net = model()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    core = CoreMask.full(shapes, "row")  # every row: nothing to save
    with install_core_grads(net, core) as handle:  # nor sparse enough for the element path
        assert handle.names == []
    with install_core_grads(net, core, max_row_fraction=1.0) as handle:
        assert len(handle.names) == 3
    assert not any(CARRIER in n for n, _ in net.named_parameters())


def test_layers_take_rows_when_the_core_is_in_few_rows_else_elements_when_it_is_sparse():
    net = model()
    gen = torch.Generator().manual_seed(8)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    # one element in every row: no row to skip, 1/13 or 1/40 of the elements
    spread = CoreMask.from_indices({n: ((r, c), 1, torch.arange(r) * c + torch.arange(r) % c)
                                    for n, (r, c) in shapes.items()})
    with install_core_grads(net, spread, max_element_fraction=0.1) as handle:
        assert sorted(handle.names) == ["0.weight", "2.weight", "4.weight"]
        assert all(getattr(net[i], CARRIER).shape[1] == 1 for i in (0, 2, 4))
    with install_core_grads(net, spread, max_element_fraction=0.0) as handle:
        assert handle.names == []  # most rows hold core elements: nothing cheaper to do
    rows = row_core(gen, shapes, 0.2, "row")
    with install_core_grads(net, rows, max_row_fraction=0.5) as handle:
        assert all(getattr(net[int(n[0])], CARRIER).shape[1] == shapes[n][1] for n in handle.names)


def _train(net, core, steps=3, seed=7):
    """A MaskedAdamW over `net`'s core (core-only gradients as installed), `steps` steps."""
    opt = MaskedAdamW(net.named_parameters(), lr=1e-2, masks=core, backend="cpu")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(6, 13, generator=gen)
        net(x).square().mean().backward()
        opt.step()
    return net


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("how", ["deepcopy", "save_whole", "state_dict"])
def test_an_installed_model_survives_copies_and_saves(gen, mode, how, tmp_path):
    """Issue #35: deepcopy then a forward raised AttributeError ('trace_rows'); a model saved
    whole with torch.save could not be loaded ('_core_forward'). Now a copy, a reloaded model
    and a state_dict round trip train exactly as the original does, and stay core-only."""
    net = model()
    core = weights_core(net, gen)
    for n, p in net.named_parameters():
        p.requires_grad_(n in core)
    handle = install_core_grads(net, core, **MODES[mode])
    if how == "deepcopy":
        other = copy.deepcopy(net)
    elif how == "save_whole":
        torch.save(net, tmp_path / "model.pt")
        other = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        other = model(seed=3)
        for n, p in other.named_parameters():
            p.requires_grad_(n in core)
        install_core_grads(other, core, **MODES[mode])
        missing, unexpected = other.load_state_dict(net.state_dict())
        assert not missing and not unexpected
        assert not any(k.endswith(CARRIER) or "core_index" in k for k in net.state_dict())
    _train(net, core)
    _train(other, core)
    theirs = dict(other.named_parameters())
    for n, a in net.named_parameters():
        if not n.endswith(CARRIER):  # (a carrier's one element of storage is never read)
            assert torch.equal(a, theirs[n]), n
    assert all(p.grad is None for n, p in other.named_parameters() if n.endswith("weight"))
    assert any(p.grad is not None for n, p in other.named_parameters() if n.endswith(CARRIER))
    installed = len(handle.names)
    assert installed
    handle.remove()
    from trace_kernels import remove_core_grads

    assert remove_core_grads(other) == installed       # the copy's layers, restored
    assert all(type(m) in (nn.Linear, nn.GELU) for m in (*net, *other))

