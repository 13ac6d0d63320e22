"""The authors' setup, whole-tensor cores under DeepSpeed ZeRO-3, on 2 gloo ranks (CPU):

    torchrun --nproc-per-node 2 deepspeed_worker.py OUT_DIR

No custom optimizer: the probe picks whole tensors (`SelectConfig.paper`), `freeze_outside`
turns ``requires_grad`` off everywhere else, and DeepSpeed's engine wraps a plain
`torch.optim.AdamW` over what is left. Every rank also trains the one-process reference on
the global batch; rank 0 writes OUT_DIR/deepspeed.json with each tensor's relative error
against it and whether each tensor outside the core stayed bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import GatheredParameters  # noqa: E402

from test_hf import fresh_model  # noqa: E402
from trace_ft.method.pipeline import TracePipeline, freeze_outside  # noqa: E402
from trace_ft.lm.parallel import exit_rank  # noqa: E402
from trace_ft.method.select import SelectConfig  # noqa: E402

STEPS, ROWS, LR = 4, 8, 1e-2


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, 40, (ROWS, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})  # every row the same token count
    return out


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()

    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, sel = TracePipeline(SelectConfig.paper(budget=0.25), probe_steps=3).probe_and_select(
        model, data, lr=LR, max_grad_norm=1.0)
    core = sel.mask.nonempty()
    freeze_outside(model, core)
    opt = torch.optim.AdamW(trainable(model), lr=LR, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": ROWS // world, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for batch in data:
        mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
        engine.backward(engine(**mine).loss)
        engine.step()

    ref = fresh_model()
    freeze_outside(ref, core)
    ropt = torch.optim.AdamW(trainable(ref), lr=LR, weight_decay=0.1)
    for batch in data:
        ropt.zero_grad()
        ref(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(ref), 1.0)
        ropt.step()

    refs = dict(ref.named_parameters())
    result = {}
    for n, p in engine.module.named_parameters():
        with GatheredParameters([p]):
            got = p.detach().clone()
        q = refs[n].detach()
        result[n] = {"core": n in core, "rel": float((got - q).norm() / q.norm().clamp_min(1e-30)),
                     "unchanged": bool(torch.equal(got, before[n])),
                     "partitioned": hasattr(p, "ds_tensor")}
    if rank == 0:
        (out / "deepspeed.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)  # skip the interpreter's teardown, where gloo can abort a finished rank
