"""Fine-tune with the Hugging Face Trainer, training only TRACE's core parameters.

    python examples/trainer_trace.py --task rev --steps 60
    python examples/trainer_trace.py --model path/to/hf-model --task path/to/task_dir
    python examples/trainer_trace.py ... --resume runs/trainer/checkpoint-30
    torchrun --nproc-per-node 8 examples/trainer_trace.py --model path/to/hf-model --fsdp2
    accelerate launch --num_processes 8 examples/trainer_trace.py ... --fsdp2

With --fsdp2 the Trainer shards the model with FSDP2 (accelerate) and builds the optimizer
itself from `trace_optimizer_recipe` (it refuses a ready optimizer under FSDP); rank 0
probes and every rank trains the same core, each keeping state for its shard. accelerate
enables FSDP on GPU (and other accelerator) ranks only: on CPU ranks it runs DDP instead.

A plain Trainer script plus the two marked lines: `trace_optimizer` probes the task and
returns a MaskedAdamW over its core; `TraceCallback` saves the core with each checkpoint
and, with --history, records the task for the next one's selection.
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from trace_ft.integrations.hf import TraceCallback, load_core, trace_optimizer, trace_optimizer_recipe
from trace_ft.lm.batches import EncodedSet
from trace_ft.lm.model import open_model
from trace_ft.tasks import resolve_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin", help="a local HF causal LM, or 'builtin' (tiny)")
    ap.add_argument("--task", default="rev", help="a built-in skill or a task directory")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--budget", type=float, default=0.05, help="core: fraction of eligible elements")
    ap.add_argument("--out", default="runs/trainer")
    ap.add_argument("--history", help="a task history directory to select against and append to")
    ap.add_argument("--resume", help="a checkpoint directory of an earlier run of this script")
    ap.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 (launch with torchrun)")
    args = ap.parse_args()

    model, codec, _ = open_model(args.model, size="tiny", progress=False)
    (task,) = resolve_tasks([args.task], n_train=2000, n_test=100)
    train = EncodedSet(task.train, codec)  # a dataset of prompt and answer ids; .collate pads

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # --- TRACE: the two added lines (a resumed run reuses the checkpoint's core) ----------
    trace_args = dict(lr=args.lr, probe_steps=20, budget=args.budget, history=args.history,
                      core=load_core(args.resume) if args.resume else None)
    probe = DataLoader(train, batch_size=16, shuffle=True, collate_fn=train.collate)
    if args.fsdp2:  # the Trainer builds it, on the model before sharding
        opt = recipe = trace_optimizer_recipe(probe, **trace_args)
        given = dict(optimizer_cls_and_kwargs=recipe)
    else:
        opt = trace_optimizer(model, probe, **trace_args)
        given = dict(optimizers=(opt, None))
    callback = TraceCallback(opt, history=args.history, task=task.name if args.history else None,
                             test=task.test)
    # ---------------------------------------------------------------------------------------
    fsdp = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0, save_steps=max(1, args.steps // 2), logging_steps=10,
        report_to="none", use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        disable_tqdm=True, **(fsdp if args.fsdp2 else {}))
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=train.collate,
                      callbacks=[callback], **given)
    trainer.train(resume_from_checkpoint=args.resume)
    opt = callback.optimizer
    params = dict(model.named_parameters())
    if trainer.is_fsdp_enabled:  # the shards, gathered (every rank takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        params = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    if trainer.is_world_process_zero():
        core = opt.trace.core
        outside = sum(int(((p.detach() != before[n]) & ~core.to_dense(n)).sum()) if n in core else
                      int((p.detach() != before[n]).sum()) for n, p in params.items())
        print(f"core: {core.numel_selected:,} of {core.numel:,} eligible elements ({core.density:.2%})")
        print(f"optimizer state (this rank's): {opt.state_bytes()['total']:,} bytes")
        print(f"elements changed outside the core: {outside}")
        print(f"final training loss: {trainer.state.log_history[-1].get('train_loss', float('nan')):.4f}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group on every rank
    if torch.distributed.is_torchelastic_launched():
        # gloo can still abort a finished rank in the interpreter's teardown ("terminate
        # called without an active exception", pytorch/pytorch#190489): skip it
        from trace_ft.lm.parallel import exit_rank

        exit_rank(0)


if __name__ == "__main__":
    main()
