"""A training step (forward, backward, optimizer step) on a ~58M-parameter Llama config,
batch 4 × 256 tokens, CPU: full fine-tuning with torch.optim.AdamW(fused=True) against TRACE
with cores of 5 % elements, 5 % rows and 10 % whole tensors (the authors' rule), the tensors
without core frozen and `MaskedAdamW` on the core; with core-only weight gradients
(`install_core_grads`: core rows, or core elements where they spread over most rows) and,
for rows and elements, without.

    python bench/bench_train_step.py [--steps 6] [--device cpu|cuda] [--out bench/results/train_step_cpu]

Each case runs in its own process (so peak RSS is its own), one after another in one run;
time per step is the median of the steps after the first two, and the ratio is against the
full fine-tuning step of the same run. Bytes: gradients (including compact ones) and
optimizer state after a step, before zero_grad; peak: RSS on the CPU, the allocator's
peak on a GPU. The cores are random at the given density
(the step's cost does not depend on which elements a probe would choose).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

CASES = {  # name: (granularity, density, compact (core-only) weight gradients)
    "full fine-tuning (torch fused AdamW)": (None, 1.0, False),
    "trace element 5 %": ("element", 0.05, True),
    "trace element 5 %, full weight gradients": ("element", 0.05, False),
    "trace row 5 %": ("row", 0.05, True),
    "trace row 5 %, full weight gradients": ("row", 0.05, False),
    "trace whole tensors 10 %": ("tensor", 0.10, True),
}


def build(vocab: int = 32000):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def core_for(model, granularity: str, density: float):
    import torch

    from trace_kernels import CoreMask, MaskEntry

    g = torch.Generator().manual_seed(1)
    eligible = [(n, p) for n, p in model.named_parameters()
                if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    entries = {}
    if granularity == "tensor":  # whole tensors, in a random order, up to density of the eligible
        budget = density * sum(p.numel() for _, p in eligible)
        for i in torch.randperm(len(eligible), generator=g).tolist():
            n, p = eligible[i]
            if p.numel() <= budget:
                budget -= p.numel()
                entries[n] = MaskEntry(tuple(p.shape), p.numel(), torch.zeros(1, dtype=torch.int32))
        return CoreMask(entries)
    for n, p in eligible:
        b = 1 if granularity == "element" else p.shape[-1]
        flags = torch.rand(p.numel() // b, generator=g) < density
        entries[n] = MaskEntry(tuple(p.shape), b, torch.nonzero(flags).reshape(-1))
    return CoreMask(entries)


def worker(case: str, steps: int, out: str, device: str, vocab: int) -> None:
    import torch

    from trace_kernels import MaskedAdamW, install_core_grads

    granularity, density, compact = CASES[case]
    model = build(vocab).to(device)
    params = sum(p.numel() for p in model.parameters())
    compact_layers = 0
    if granularity is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        core_elements = params
    else:
        core = core_for(model, granularity, density)
        core_elements = core.numel_selected
        for n, p in model.named_parameters():
            p.requires_grad_(n in core)
        named = [(n, p) for n, p in model.named_parameters() if n in core]
        if compact:
            # the element case measures the element path itself (a uniform 5 % core is above
            # the default's 4 %, where a real core's layers mostly lie below it)
            handle = install_core_grads(model, core, **({"max_element_fraction": 1.0} if granularity == "element" else {}))
            compact_layers = len(handle.names)
            named += handle.named_parameters()
        opt = MaskedAdamW(named, lr=1e-4, masks=core)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (4, 256), generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, grad_bytes, state_bytes = [], 0, 0
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor))
        opt.zero_grad(set_to_none=True)
    tail = sorted(times[2:])
    result = {"case": case, "parameters": params, "core_elements": core_elements,
              "compact_layers": compact_layers, "step_seconds": tail[len(tail) // 2],
              "step_seconds_all": times, "grad_bytes": grad_bytes, "state_bytes": state_bytes,
              "peak_rss_bytes": (torch.cuda.max_memory_allocated() if device.startswith("cuda") else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step_cpu"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary: the output head's share of "
                    "the step (at hidden 512, 32000 makes the head 28 %% of the parameters; a Llama-3-8B "
                    "head is 6.5 %%)")
    ap.add_argument("--worker", metavar="CASE")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out, args.device, args.vocab)
        return
    from common import machine, write_report

    rows = []
    for case in CASES:
        part = Path(args.out + ".part.json")
        subprocess.run([sys.executable, __file__, "--worker", case, "--steps", str(args.steps),
                        "--device", args.device, "--vocab", str(args.vocab), "--out", str(part)], check=True)
        rows.append(json.loads(part.read_text()))
        part.unlink()
    full = rows[0]
    for r in rows:
        r["step_ratio"] = r["step_seconds"] / full["step_seconds"]
        r["bytes_ratio"] = (r["grad_bytes"] + r["state_bytes"]) / (full["grad_bytes"] + full["state_bytes"])
    info = machine()
    where = f"{info['cpu']}, {info['threads']} threads"
    if args.device.startswith("cuda"):
        import torch

        where = torch.cuda.get_device_name(args.device)
    head = args.vocab * 512 / full["parameters"]
    table = [f"Llama config of {full['parameters'] / 1e6:.1f}M parameters (hidden 512, 8 layers, "
             f"vocab {args.vocab}: the output head is {head:.0%} of the parameters), batch 4 × 256 tokens, fp32; {args.steps} steps per case, median of the "
             f"last {args.steps - 2}; {where}. Ratios against full "
             "fine-tuning in this run.", "",
             "| case | core elements | compact layers | step (s) | × full FT | gradient MiB | "
             f"optimizer state MiB | (grad + state) × full FT | peak {'GPU memory' if args.device != 'cpu' else 'RSS'} MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['case']} | {r['core_elements']:,} | {r['compact_layers']} | {r['step_seconds']:.2f} | "
                     f"{r['step_ratio']:.2f} | {r['grad_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.1f} | "
                     f"{r['bytes_ratio']:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    write_report(Path(args.out).name, {"machine": info, "device": args.device, "vocab": args.vocab,
                                       "steps": args.steps, "rows": rows},
                 [f"# Training step: full fine-tuning against TRACE cores ({args.device})", "", *table])
    print("\n".join(table))


if __name__ == "__main__":
    main()
