"""Scenarios the distributed tests run under torchrun (gloo, CPU, one thread per rank).

    torchrun --nproc-per-node 2 tests/distributed_worker.py SCENARIO OUT_DIR

Each rank checks what it can see, raises on a failure (so torchrun fails) and writes
OUT_DIR/<scenario>.<rank>.json with what the test asserts on. Every rank computes the
one-process reference itself (same seed, the global batch), so no rank needs another's
result to compare.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from trace_kernels import CoreMask, MaskEntry, MaskedAdamW  # noqa: E402
from trace_ft.lm.parallel import exit_rank  # noqa: E402

class Net(nn.Module):
    """Rows that split 17/16 (a), 5/4 (mid), 4/3 (b), 3/2 (c) and 1/0 (scale) over 2 ranks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(20, 33, bias=False)
        self.mid = nn.Linear(33, 9, bias=False)
        self.b = nn.Linear(9, 7, bias=False)
        self.c = nn.Linear(7, 5, bias=False)
        self.scale = nn.Parameter(torch.randn(1, 5) * 0.1)

    def forward(self, x):
        h = self.c(torch.tanh(self.b(torch.tanh(self.mid(torch.tanh(self.a(x)))))))
        return h * (1 + self.scale)


def masks(model: nn.Module, granularity, seed: int = 1) -> CoreMask:
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for n, p in model.named_parameters():
        numel = p.numel()
        b = {"element": 1, "row": p.shape[-1], "tensor": numel}.get(granularity, granularity)
        if numel % b:
            b = 1
        flags = torch.rand(numel // b, generator=g) < 0.4
        if granularity == "tensor":
            flags[:] = n != "mid.weight"
        entries[n] = MaskEntry(tuple(p.shape), b, torch.nonzero(flags).reshape(-1))
    return CoreMask(entries)


def batches(steps: int, rows: int = 8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(rows, 20, generator=g), torch.randn(rows, 5, generator=g)) for _ in range(steps)]


def loss_of(model, x, y):
    return (model(x) - y).square().mean()


def world():
    return dist.get_rank(), dist.get_world_size()


def my_half(x):
    rank, size = world()
    return x.chunk(size)[rank]


def train(model, opt, data, local: bool):
    for x, y in data:
        if local:
            x, y = my_half(x), my_half(y)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def compare(model, ref, before, core: CoreMask) -> dict:
    """Max relative error of each parameter against the one-process reference, and the
    number of unselected elements that changed (must be 0)."""
    out = {}
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        got = full(p).detach()
        rel = float((got - q).norm() / q.norm().clamp_min(1e-30))
        frozen = ~core[n].to_dense() if n in core else torch.ones_like(got, dtype=torch.bool)
        moved = int((got.view(torch.int32) != before[n].view(torch.int32))[frozen].sum())
        out[n] = {"rel": rel, "frozen_moved": moved}
        assert moved == 0, (n, moved)
        assert rel <= 1e-5, (n, rel)
    return out


def shard(model, reshard: bool = True, mp: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world()[1],))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else MixedPrecisionPolicy()
    for m in (model.a, model.mid, model.b, model.c):
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return model


def scenario_fsdp2(out: Path) -> dict:
    """Every granularity, reshard on and off: FSDP2 equals one process; each rank's state is
    its share of the core."""
    results = {}
    for granularity in ("element", "row", 3, "tensor"):
        for reshard in (True, False):
            ref = Net()
            core = masks(ref, granularity)
            before = {n: p.detach().clone() for n, p in ref.named_parameters()}
            model = shard(copy.deepcopy(ref), reshard)
            ropt = MaskedAdamW(ref.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
            opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
            data = batches(3)
            train(ref, ropt, data, local=False)
            train(model, opt, data, local=True)
            errs = compare(model, ref, before, core)
            local = sum(lay.numel_selected for lay in opt._layout.values())
            moments = sum(st["exp_avg"].numel() for st in opt.state.values())
            assert moments == local, (moments, local)
            totals = torch.tensor([local], dtype=torch.int64)
            dist.all_reduce(totals)
            assert int(totals) == core.numel_selected, (int(totals), core.numel_selected)
            results[f"{granularity}-{reshard}"] = {"errors": errs, "local_core": local,
                                                   "state_bytes": opt.state_bytes()["moments"]}
    # mixed precision (bf16 compute, fp32 master shards): only core elements of the fp32
    # masters move, and they do move
    ref = Net()
    core = masks(ref, "row")
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    model = shard(copy.deepcopy(ref), True, mp=True)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=core)
    train(model, opt, batches(2), local=True)
    moved_core = 0
    for n, p in model.named_parameters():
        got = full(p).detach()
        assert got.dtype == torch.float32
        changed = got != before[n]
        assert not changed[~core[n].to_dense()].any(), n
        moved_core += int(changed[core[n].to_dense()].sum())
    assert moved_core > 0
    results["mixed-precision"] = {"core_elements_moved": moved_core}
    return results


def scenario_swapped(out: Path) -> dict:
    """accelerate's FSDP2 way: the optimizer is built (and here already stepped once) on
    the full model; then the model is sharded and each parameter in the optimizer's groups
    is swapped for its DTensor. The optimizer follows: masks onto the shards, state cut to
    each rank's slice. The run equals one process."""
    results = {}
    for granularity in ("element", "row", 3):
        ref = Net()
        core = masks(ref, granularity)
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        model = copy.deepcopy(ref)
        ropt = MaskedAdamW(ref.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
        data = batches(3)
        train(ref, ropt, data, local=False)
        train(model, opt, data[:1], local=False)      # one step unsharded, on the global batch
        shard(model)
        new = dict(model.named_parameters())
        for group in opt.param_groups:                 # what accelerate's switch does
            group["params"] = [new[n] for n in group["param_names"]]
        train(model, opt, data[1:], local=True)
        errs = compare(model, ref, before, core)
        local = sum(lay.numel_selected for lay in opt._layout.values())
        moments = sum(st["exp_avg"].numel() for st in opt.state.values())
        assert moments == local and all(any(p is q for q in new.values()) for p in opt.state), (moments, local)
        results[str(granularity)] = {"errors": errs, "local_core": local}
    return results


def scenario_ddp(out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = Net()
    core = masks(ref, "element")
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    model = DDP(copy.deepcopy(ref))
    ropt = MaskedAdamW(ref.named_parameters(), lr=1e-2, masks=core)
    opt = MaskedAdamW(model.module.named_parameters(), lr=1e-2, masks=core)
    data = batches(3)
    train(ref, ropt, data, local=False)
    train(model, opt, data, local=True)
    return {"errors": compare(model.module, ref, before, core)}


def scenario_ddp_core_grads(out: Path) -> dict:
    """Core-only weight gradients under torch DDP, installed before wrapping (rows and
    elements paths), with gradient accumulation: the first micro-batch under no_sync."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel as DDP

    from trace_kernels import install_core_grads

    result = {}
    for granularity, fractions in (("row", dict(max_row_fraction=1.0)),
                                   ("element", dict(max_row_fraction=1e-9, max_element_fraction=1.0))):
        ref = Net()
        core = masks(ref, granularity)
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        inner = copy.deepcopy(ref)
        handle = install_core_grads(inner, core, **fractions)
        assert handle.names, "no layer took core gradients"
        model = DDP(inner)
        ropt = MaskedAdamW(ref.named_parameters(), lr=1e-2, masks=core)
        opt = MaskedAdamW(model.module.named_parameters(), lr=1e-2, masks=core)
        data = batches(6)
        for pair in (data[i:i + 2] for i in range(0, len(data), 2)):
            ropt.zero_grad()
            opt.zero_grad()
            for i, (x, y) in enumerate(pair):
                loss_of(ref, x, y).backward()
                with model.no_sync() if i == 0 else nullcontext():
                    loss_of(model, my_half(x), my_half(y)).backward()
            ropt.step()
            opt.step()
        layers = handle.names
        handle.remove()  # the carriers go: the model's parameters are the reference's again
        assert not hasattr(inner, "_ddp_params_and_buffers_to_ignore")
        result[granularity] = {"errors": compare(model.module, ref, before, core), "layers": layers}
    return result


def scenario_refused(out: Path) -> dict:
    """Layouts the kernels cannot serve are refused at construction, naming the parameter
    and the placement; nothing is constructed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world()[1],))
    messages = {}
    for name, placements in (("by_column", [Shard(1)]), ("replicated", [Replicate()])):
        w = nn.Parameter(distribute_tensor(torch.randn(6, 8), mesh, placements))
        core = CoreMask.from_dense({name: torch.ones(6, 8, dtype=torch.bool)})
        try:
            MaskedAdamW([(name, w)], lr=1e-3, masks=core)
        except ValueError as exc:
            messages[name] = str(exc)
            assert name in str(exc) and "placements" in str(exc), exc
        else:
            raise AssertionError(f"{name}: not refused")
    return messages


def _fsdp_pair(core_granularity="row"):
    ref = Net()
    core = masks(ref, core_granularity)
    for n, p in ref.named_parameters():  # as TRACE trains: tensors without core are frozen
        p.requires_grad_(core[n].num_selected > 0)
    model = shard(copy.deepcopy(ref))
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
    return ref, model, opt, core


def _snapshot(model):
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def scenario_checkpoint(out: Path) -> dict:
    """torch.distributed.checkpoint round trip (same world size); a full state from these
    ranks loaded into 2 ranks again and into one process: the next step is identical."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    data = batches(4)
    granularity = os.environ.get("CKPT_GRANULARITY", "row")
    ref, model, opt, core = _fsdp_pair(granularity)
    train(model, opt, data[:2], local=True)
    ckpt = out / f"dcp-{granularity}"
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(ckpt))
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(model, options=full_opts)
    full_optim = get_optimizer_state_dict(model, opt, options=full_opts)
    if dist.get_rank() == 0:
        torch.save({"model": full_model, "optim": full_optim}, out / f"full-{granularity}.pt")
    dist.barrier()
    train(model, opt, data[2:3], local=True)
    expected = _snapshot(model)

    # 1. sharded checkpoint into fresh ranks
    _, m2, o2, _ = _fsdp_pair(granularity)
    state = {"model": get_model_state_dict(m2), "optim": get_optimizer_state_dict(m2, o2)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(m2, state["model"])
    set_optimizer_state_dict(m2, o2, state["optim"])
    train(m2, o2, data[2:3], local=True)
    got = _snapshot(m2)
    sharded_equal = all(torch.equal(got[n], expected[n]) for n in expected)
    assert sharded_equal, "dcp round trip: the next step differs"

    # 2. the full state into 2 ranks
    saved = torch.load(out / f"full-{granularity}.pt", weights_only=False)
    _, m3, o3, _ = _fsdp_pair(granularity)
    set_model_state_dict(m3, saved["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(m3, o3, saved["optim"], options=StateDictOptions(full_state_dict=True))
    train(m3, o3, data[2:3], local=True)
    got = _snapshot(m3)
    assert all(torch.equal(got[n], expected[n]) for n in expected), "full state into 2 ranks"

    # 3. the full state into one process (every rank does it alone, on the global batch);
    # read again: loading into the ranks turned the dict's tensors into DTensors
    saved = torch.load(out / f"full-{granularity}.pt", weights_only=False)
    one = Net()
    one.load_state_dict(saved["model"])
    for n, p in one.named_parameters():
        p.requires_grad_(core[n].num_selected > 0)
    o1 = MaskedAdamW(one.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
    fsd = saved["optim"]
    names = [n for n, _ in one.named_parameters()]
    o1.load_state_dict({"state": {names.index(k): v for k, v in fsd["state"].items()},
                        "param_groups": [{**g, "params": [names.index(k) for k in g["params"]]}
                                         for g in fsd["param_groups"]]})
    train(one, o1, data[2:3], local=False)
    rel = {n: float((p.detach() - expected[n]).norm() / expected[n].norm()) for n, p in one.named_parameters()}
    assert max(rel.values()) <= 1e-5, rel
    return {"sharded_round_trip_equal": sharded_equal, "one_process_rel": rel}


def scenario_reshard_save(out: Path) -> dict:
    """Two steps on the ranks, a DCP checkpoint of model and optimizer; the one-process
    reference of three steps (what any world size must give after loading it) beside it.
    Batches of 12 rows: every world size of 1-4 ranks averages equal shares."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    data = batches(3, rows=12)
    granularity = os.environ.get("CKPT_GRANULARITY", "row")
    ref, model, opt, core = _fsdp_pair(granularity)
    train(model, opt, data[:2], local=True)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(out / f"reshard-{granularity}"))
    one = MaskedAdamW(ref.named_parameters(), lr=1e-2, weight_decay=0.1, masks=core)
    train(ref, one, data, local=False)
    if dist.get_rank() == 0:
        torch.save({n: p.detach() for n, p in ref.named_parameters()}, out / f"expected-{granularity}.pt")
    return {"world": dist.get_world_size()}


def scenario_reshard_load(out: Path) -> dict:
    """The checkpoint `reshard_save` wrote, loaded at this world size: the third step equals
    the one-process reference, and no element outside the core moved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    data = batches(3, rows=12)
    granularity = os.environ.get("CKPT_GRANULARITY", "row")
    start, model, opt, core = _fsdp_pair(granularity)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(out / f"reshard-{granularity}"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, data[2:], local=True)
    expected = torch.load(out / f"expected-{granularity}.pt")
    ref = Net()
    ref.load_state_dict(expected)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    return {"world": dist.get_world_size(), "compare": compare(model, ref, before, core)}


def _dyadic(like: torch.Tensor, g: torch.Generator, low: int) -> torch.Tensor:
    """Integers in [low, 100] times 2^-8: every block sum of squares, products or Fisher
    values of the worker's tensors (at most 660 elements, < 2^24 units) is exact in fp32,
    so the sum is the same in any order and on any CPU."""
    return torch.randint(low, 101, tuple(like.shape), generator=g).float() * 2.0 ** -8


def scenario_select(out: Path) -> dict:
    """The probe on FSDP2 shards equals one process's to its tolerance; the selection from
    sharded inputs equals one process's bit for bit on identical inputs (values whose block
    sums are exact, so the order ranks add partial sums in cannot flip a block at the
    budget's edge), and every rank derives the same core from its own probe."""
    from torch.distributed.tensor import distribute_tensor

    from trace_ft import EarlierTask, ProbeResult, SelectConfig, probe, select_core

    data = batches(4)

    def loss(model, batch):
        return loss_of(model, *batch)

    ref = Net()
    model = shard(copy.deepcopy(ref))
    local_data = [(my_half(x), my_half(y)) for x, y in data]
    kw = dict(steps=4, lr=1e-2, exclude=("scale", r"c\.weight"), loss_fn=loss,  # not in blocks of 3
              max_grad_norm=1.0)
    one = probe(ref, data, **kw)
    mine = probe(model, local_data, **kw)
    errors = {}
    for n in one.deltas:
        d, f = full(mine.deltas[n]), full(mine.fisher[n])
        errors[n] = [float((d - one.deltas[n]).norm() / one.deltas[n].norm()),
                     float((f - one.fisher[n]).norm() / one.fisher[n].norm())]
        assert max(errors[n]) <= 1e-5, (n, errors[n])

    # identical inputs for both: one process's tensors, and the same values sharded as the
    # probe's are (placements and mesh of its DTensors)
    g = torch.Generator().manual_seed(11)
    names = list(one.deltas)

    def pair(low: int):
        plain = {n: _dyadic(one.deltas[n], g, low) for n in names}
        sharded = {n: distribute_tensor(t, mine.deltas[n].device_mesh, mine.deltas[n].placements)
                   for n, t in plain.items()}
        return plain, sharded

    (d1, dn), (f1, fn), (u1, un), (e1, en) = pair(-100), pair(1), pair(-100), pair(1)
    # the real probes' earlier update (the same probe on other data), for the ranks-agree check
    earlier_mine = probe(model, [(my_half(x), my_half(y)) for x, y in data[::-1]], **kw).deltas
    same, chosen = {}, {}
    for granularity in ("element", "row", 3, "tensor"):
        # an earlier core at row level would cover every tensor for whole-tensor selection
        earlier_core = masks(ref, "tensor" if granularity == "tensor" else "row", seed=9)
        for unit in ("block", "row"):
            cfg = SelectConfig(granularity=granularity, budget=0.4, specificity_unit=unit, protect=0.5)
            key = f"{granularity}-{unit}"
            a = select_core(ProbeResult(d1, f1, steps=4), [EarlierTask(u1, earlier_core, e1)], cfg).mask
            b = select_core(ProbeResult(dn, fn, steps=4), [EarlierTask(un, earlier_core, en)], cfg).mask
            same[key], chosen[key] = a == b, a.numel_selected
            c = select_core(mine, [EarlierTask(earlier_mine, earlier_core, dict(mine.fisher))], cfg).mask
            gathered = [None] * world()[1]
            dist.all_gather_object(gathered, {n: e.indices.tolist() for n, e in c.items()})
            assert all(gr == gathered[0] for gr in gathered), f"{key}: ranks disagree"
    return {"errors": errors, "same_as_one_process": same, "chosen": chosen}


SCENARIOS = {"fsdp2": scenario_fsdp2, "swapped": scenario_swapped, "ddp": scenario_ddp, "refused": scenario_refused,
             "ddp_core_grads": scenario_ddp_core_grads,
             "checkpoint": scenario_checkpoint, "select": scenario_select,
             "reshard_save": scenario_reshard_save, "reshard_load": scenario_reshard_load}


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        result = SCENARIOS[name](out)
        (out / f"{name}.{dist.get_rank()}.json").write_text(json.dumps(result, indent=1, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)  # skip the interpreter's teardown, where gloo can abort a finished rank
