"""MaskedAdamW on one rank against two (DDP and FSDP2), on a ~20M-parameter Llama config,
5 % row-level and element-level cores: time per training step (forward, backward, masked
step) as a ratio to the one-process step measured in the same run, and each rank's bytes
of parameters, gradients and optimizer state. Then the probe (`trace_ft`'s warm start) on
one process against FSDP2 shards: each rank's bytes of Δ, Fisher and probe moments, and
how far the probe raised the process's peak resident memory.

    python bench/bench_distributed.py [--steps 12] [--out bench/results/distributed_cpu]

One process uses every thread; each of the two ranks (gloo, CPU) uses half of them, so the
machine's cores are the same in both. Results: <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def build(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def core_for(model, granularity: str, density: float = 0.05):
    from bench_train_step import core_for as random_core  # the same random cores

    return random_core(model, granularity, density)


def worker(mode: str, granularity: str, steps: int, out: str) -> None:
    """One measurement: mode single | ddp | fsdp2 (the last two under torchrun)."""
    import torch
    import torch.distributed as dist

    from trace_kernels import MaskedAdamW
    from trace_kernels.sharding import local_tensor

    distributed = mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    model = build()
    if granularity == "probe":
        return probe_worker(model, mode, rank, world, steps, out)
    core = core_for(model, granularity)
    for n, p in model.named_parameters():
        p.requires_grad_(n in core)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        named = model.named_parameters()
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        named = model.named_parameters()
    else:
        wrapped, named = model, model.named_parameters()
    named = [(n, p) for n, p in named if n in core]
    opt = MaskedAdamW(named, lr=1e-4, masks=core)
    g = torch.Generator().manual_seed(2)
    batch, seq = 8, 64
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    ids = ids.chunk(world)[rank]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if distributed:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    params = sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters())
    grads = sum(local_tensor(p.grad).numel() * local_tensor(p.grad).element_size()
                for p in model.parameters() if p.grad is not None)
    result = {"mode": mode, "granularity": granularity, "rank": rank, "world": world,
              "step_seconds": sorted(times[2:])[len(times[2:]) // 2],
              "param_bytes": params, "grad_bytes": grads,
              "state_bytes": opt.state_bytes()["total"], "core_elements": core.numel_selected,
              "parameters": sum(p.numel() for p in build().parameters()) if rank == 0 else None}
    Path(out).with_suffix(f".{mode}.{granularity}.{rank}.json").write_text(json.dumps(result))
    if distributed:
        dist.destroy_process_group()


def probe_worker(model, mode: str, rank: int, world: int, steps: int, out: str) -> None:
    """The warm-start probe over every matrix, on the whole model or on FSDP2 shards."""
    import resource

    import torch
    import torch.distributed as dist

    from trace_ft.method.probe import probe
    from trace_kernels.sharding import local_tensor

    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (8, 64), generator=g).chunk(world)[rank]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    result = probe(model, [{"input_ids": ids, "labels": ids}], steps, 1e-4)
    seconds = (time.perf_counter() - t0) / steps
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def size(tensors):
        return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors.values())

    row = {"mode": mode, "granularity": "probe", "rank": rank, "world": world,
           "step_seconds": seconds, "delta_bytes": size(result.deltas), "fisher_bytes": size(result.fisher),
           "peak_rss_growth": peak_after - peak_before,
           "param_bytes": sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters()),
           "parameters": sum(p.numel() for p in build().parameters()) if rank == 0 else None}
    Path(out).with_suffix(f".{mode}.probe.{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed_cpu"))
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "GRANULARITY"))
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.steps, args.out)
        from trace_ft.lm.parallel import exit_rank

        exit_rank(0)  # skip the interpreter's teardown, where gloo can abort a finished rank
    threads = os.cpu_count() or 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed."))  # each worker's row, until merged
    def measure(mode: str, what: str, steps: int, extra_env: dict | None = None) -> list[dict]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads if mode == "single" else max(1, threads // 2)),
               **(extra_env or {})}
        me = [str(Path(__file__).resolve()), "--worker", mode, what, "--steps", str(steps), "--out", str(tmp / "m")]
        cmd = ([sys.executable, *me] if mode == "single" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *me])
        subprocess.run(cmd, check=True, env=env)
        return [json.loads(f.read_text()) for f in sorted(tmp.glob(f"m.{mode}.{what}.*.json"))]

    rows = [r for granularity in ("row", "element") for mode in ("single", "ddp", "fsdp2")
            for r in measure(mode, granularity, args.steps)]
    # large blocks straight from mmap, so freed memory leaves the resident set: glibc's
    # growing mmap threshold otherwise keeps the transient per-layer buffers of FSDP2 in
    # its heap, and the peak resident set then hides what is live
    rows += [r for mode in ("single", "fsdp2")
             for r in measure(mode, "probe", 5, {"MALLOC_MMAP_THRESHOLD_": "65536"})]
    base = {r["granularity"]: r["step_seconds"] for r in rows if r["mode"] == "single"}
    for r in rows:
        r["step_ratio"] = r["step_seconds"] / base[r["granularity"]]
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    shutil.rmtree(tmp)
    probes = [r for r in rows if r["granularity"] == "probe"]
    rows = [r for r in rows if r["granularity"] != "probe"]
    lines = ["# MaskedAdamW on 1 rank against 2 (DDP, FSDP2), CPU gloo", "",
             f"Llama config of {rows[0]['parameters']:,} parameters, 5 % cores of the attention and "
             f"MLP matrices; batch 8 × 64 tokens (split over the ranks); {args.steps} steps, median "
             f"of the last {args.steps - 2}; one process with {threads} threads, each rank "
             f"{max(1, threads // 2)}. Ratios: step time against the one-process step of the same "
             "granularity, measured in this run.", "",
             "| core | mode | rank | step (s) | × one process | parameter MiB | gradient MiB | optimizer state KiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['granularity']} 5 % | {r['mode']} | {r['rank']} | {r['step_seconds']:.3f} | "
                     f"{r['step_ratio']:.2f} | {r['param_bytes'] / 2**20:.1f} | {r['grad_bytes'] / 2**20:.1f} | "
                     f"{r['state_bytes'] / 2**10:.1f} |")
    one = next(r for r in probes if r["mode"] == "single")
    lines += ["", "The probe (5 warm-start steps over every matrix, Δ and Fisher kept), one process "
              "against 2 FSDP2 ranks; '× one process': the rank's share. Run with "
              "MALLOC_MMAP_THRESHOLD_=65536 so that the peak resident set follows live memory "
              "(with glibc's default, freed FSDP2 buffers stay resident and every rank's peak "
              "looks like one process's).", "",
              "| mode | rank | probe step (s) | parameter MiB | Δ MiB | Fisher MiB | × one process (Δ + Fisher) | peak RSS growth MiB | × one process (peak) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in probes:
        share = (r["delta_bytes"] + r["fisher_bytes"]) / (one["delta_bytes"] + one["fisher_bytes"])
        lines.append(f"| {r['mode']} | {r['rank']} | {r['step_seconds']:.3f} | {r['param_bytes'] / 2**20:.1f} | "
                     f"{r['delta_bytes'] / 2**20:.1f} | {r['fisher_bytes'] / 2**20:.1f} | {share:.2f} | "
                     f"{r['peak_rss_growth'] / 2**20:.1f} | {r['peak_rss_growth'] / one['peak_rss_growth']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
