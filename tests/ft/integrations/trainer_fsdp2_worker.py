"""A Trainer run with TRACE under FSDP2 (accelerate), 2 gloo ranks on the CPU:

    torchrun --nproc-per-node 2 trainer_fsdp2_worker.py OUT_DIR [RESUME_CHECKPOINT]
    python trainer_fsdp2_worker.py OUT_DIR --single      # the one-process reference

accelerate (1.15) turns FSDP on only for accelerator back ends; on CPU ranks it silently
falls back to DDP. So that the real FSDP2 path runs here, the worker declares the ranks
"multi-GPU" before the Trainer builds its Accelerator; the device stays the CPU, and
`fully_shard`, the optimizer swap and the DCP checkpoints are accelerate's and torch's own.
Rank 0 writes OUT_DIR/final.pt (the gathered weights) and OUT_DIR/core.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from test_hf import fresh_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from trace_ft.integrations.hf import TraceCallback, load_core, trace_optimizer_recipe  # noqa: E402
from trace_ft.lm.batches import EncodedSet  # noqa: E402
from trace_ft.lm.parallel import exit_rank  # noqa: E402
from trace_ft.lm.text import CharTokenizer  # noqa: E402
from trace_ft.tasks import builtin_task  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    single = "--single" in sys.argv
    resume = sys.argv[2] if len(sys.argv) > 2 and not single else None
    world = 1 if single else 2
    task = builtin_task("rev", n_train=64, n_test=8)
    ds = EncodedSet(task.train, CharTokenizer())
    model = fresh_model()
    probe = list(DataLoader(ds, batch_size=8, collate_fn=ds.collate))
    recipe = trace_optimizer_recipe(None if resume else probe, lr=1e-2, probe_steps=3, budget=0.05,
                                    core=load_core(resume) if resume else None)
    fsdp = {} if single else dict(fsdp=True, fsdp_config={
        "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine",
        warmup_steps=1, max_grad_norm=1.0, save_strategy="steps", save_steps=3,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0,
        remove_unused_columns=False, disable_tqdm=True, save_only_model=False, **fsdp)
    if not single:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    history = None if resume else out / "history"
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=ds.collate,
                      optimizer_cls_and_kwargs=recipe,
                      callbacks=[TraceCallback(recipe, history=history, task="rev" if history else None)])
    assert single or trainer.is_fsdp_enabled
    trainer.train(resume_from_checkpoint=resume)

    opt = recipe.optimizer
    params = dict(trainer.model.named_parameters())
    sharded = [n for n, p in params.items() if hasattr(p, "full_tensor")]
    assert single or sharded, "the model was not sharded"
    final = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in params.items()}
    local = sum(st["exp_avg"].numel() for st in opt.state.values())
    counts = [torch.tensor([local])]
    if not single:
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(counts, torch.tensor([local]))
    if trainer.is_world_process_zero():
        torch.save({"final": final, "state_per_rank": [int(c) for c in counts],
                    "sharded": sharded, "losses": [e["loss"] for e in trainer.state.log_history
                                                   if "loss" in e]}, out / "final.pt")
        opt.trace.core.save(out / "core.safetensors")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
    exit_rank(0)  # skip the interpreter's teardown, where gloo can abort a finished rank
