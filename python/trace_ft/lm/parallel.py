"""Data parallelism for the commands (`--parallel ddp|fsdp2` under torchrun).

Each global batch (the one a single process would draw) is split by rows across the
ranks; each rank's loss is its share of the global token mean, so the gradients summed
over ranks are the single process's gradient up to summation order, and every rank takes
the same step.

- ``ddp``: every rank holds the whole model; one all-reduce after each backward, before
  clipping. DDP's arithmetic without its module wrapper: the strategies change which
  tensors require gradients from task to task (and TRACE's core-rows carriers come and
  go), which a `DistributedDataParallel` built once cannot follow.
- ``fsdp2``: the model is sharded with `fully_shard` (each decoder layer, then the root),
  FSDP2 reduce-scatters the gradients (summed, not averaged: the loss is already weighted)
  and each rank keeps optimizer state for its shards only. Scoring needs the whole model:
  the ranks gather it into rank 0's unsharded copy (`gather_into`), which scores.

What is not a training step runs on every rank (Fisher passes: under ddp over the whole
batch, the same numbers everywhere; under fsdp2 split like a training step) or on rank 0
only (scoring, reports, files).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

MODES = ("ddp", "fsdp2")


def check_launch() -> None:
    """Raise unless this process is a rank of a torchrun launch."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--parallel needs a torchrun launch: torchrun --nproc-per-node N -m "
                         "trace_ft run --parallel ddp ...")


# Set once a DataParallel has destroyed the process group it made: the program may then end
# its rank with `exit_rank` (the command-line entry point does).
ended_a_group = False


def exit_rank(code: int) -> None:
    """End a torchrun rank now, without the interpreter's teardown. After the work is done
    and written (and the process group destroyed), gloo can still abort a rank during
    teardown ("terminate called without an active exception", pytorch/pytorch#190489),
    which torchrun reports as a failed launch; seen in CI one launch in tens."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main_first(parallel: DataParallel | None, fn: Callable[[], object]):
    """`fn()` on rank 0, then, once it succeeded, on the other ranks: for work the ranks
    would race on, such as the first use of a cache. A failure on rank 0 raises on every
    rank (no rank is left waiting). Without `parallel`, just `fn()`."""
    if parallel is None:
        return fn()
    failure: list = [None]
    result = None
    if parallel.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised
            failure = [f"{type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if parallel.is_main:
        return result
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 failed: {failure[0]}")
    return fn()


def is_main(parallel: DataParallel | None) -> bool:
    """Whether this process scores, reports and writes: rank 0, or the only process."""
    return parallel is None or parallel.is_main


def tokens(batch: dict[str, Tensor]) -> int:
    """The tokens a causal-LM loss averages over: labels not -100 after the one-token shift
    (rows when the batch has no labels)."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if labels is None:
        return int(next(iter(batch.values())).shape[0])
    return int((labels[..., 1:] != -100).sum())


class DataParallel:
    """The ranks of a torchrun launch (see the module's docstring)."""

    def __init__(self, device: str = "cpu", mode: str = "ddp") -> None:
        if mode not in MODES:
            raise ValueError(f"parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_launch()
        self.mode = mode
        self.device = torch.device(device)
        if self.device.type == "cuda":  # one GPU per rank: "cuda" means the rank's own
            if self.device.index is None:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp2"

    def prepare(self, model: nn.Module) -> nn.Module:
        """fsdp2: shard `model` in place (each block of its layer list, then the root), with
        gradients summed over ranks. ddp: `model` as it is."""
        if not self.sharded:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        layers = getattr(getattr(model, "model", model), "layers", None)
        for layer in layers if isinstance(layers, nn.ModuleList) else ():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for m in model.modules():
            if isinstance(m, FSDPModule):  # a plain sum (gloo has no pre-scaled sum)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        return model

    def gather_into(self, model: nn.Module, whole: nn.Module | None) -> None:
        """fsdp2: every rank sends its shards; rank 0 loads the whole model into `whole`
        (its unsharded copy; None on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            device = next(whole.parameters()).device
            whole.load_state_dict({k: v.to(device) for k, v in state.items()})

    def local(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of a global batch (contiguous, as even as the rows allow)."""
        rows = int(next(iter(batch.values())).shape[0])
        if rows < self.world:
            raise ValueError(f"a batch of {rows} rows cannot be split over {self.world} ranks "
                             "(raise --batch-size)")
        return {k: torch.tensor_split(v, self.world)[self.rank] for k, v in batch.items()}

    def loss(self, loss_fn: Callable[[nn.Module, dict], Tensor]) -> Callable[[nn.Module, dict], Tensor]:
        """`loss_fn` on this rank's rows, weighted by its share of the global tokens: its
        gradient summed over ranks is the global batch's; its value is the global mean."""
        def local_loss(model: nn.Module, batch: dict) -> Tensor:
            mine = self.local(batch)
            n = float(tokens(mine))
            loss = loss_fn(model, mine)
            # one all-reduce: the global token count and the global sum of token losses
            sums = torch.stack([torch.tensor(n, dtype=torch.float64), loss.detach().double().cpu() * n])
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            total, mean = sums[0].item(), (sums[1] / sums[0]).item()
            scaled = loss * (n / total)
            return scaled + (mean - scaled).detach()
        return local_loss

    def gather_tensors(self, values: dict) -> dict:
        """Whole tensors for sharded ones (every rank takes part, every rank gets them);
        other values as they are."""
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in values.items()}

    def optimizer_state(self, model: nn.Module, optimizer) -> dict | None:
        """The whole optimizer state of a sharded model, keyed by parameter names, gathered
        to rank 0 (None elsewhere; every rank takes part)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        """Load what `optimizer_state` gave into the shards (every rank passes the whole
        state)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # torch matches the groups' keys exactly: drop what a scheduler added (initial_lr)
        keys = {"params", *optimizer.param_groups[0]}
        groups = [{k: v for k, v in g.items() if k in keys} for g in state["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {**state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    def sync_grads(self, params: Sequence[Tensor]) -> None:
        """Sum the ranks' gradients (one all-reduce per dtype; FSDP2 has reduced them)."""
        if self.sharded:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(s)

    def check_same(self, what: str, data: bytes) -> None:
        """Raise on every rank if the ranks hold different `data` (e.g. the selected core)."""
        digest = hashlib.sha256(data).hexdigest()
        seen: list = [None] * self.world
        dist.all_gather_object(seen, digest)
        if len(set(seen)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: {seen}")

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        global ended_a_group
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            ended_a_group = True
