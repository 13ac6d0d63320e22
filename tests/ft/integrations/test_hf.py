"""TRACE inside a Hugging Face Trainer: only core elements move, under the Trainer's own
scheduler, clipping and gradient accumulation; checkpoints carry the core; a resumed run
ends where an uninterrupted one does; the task lands in the history."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trace_ft.lm.batches import EncodedSet
from trace_ft.integrations.hf import CORE_FILE, TraceCallback, load_core, trace_optimizer
from trace_ft.store.history import TaskHistory
from trace_ft.lm.model import BuiltinSpec, builtin_config, quiet_transformers
from trace_ft.tasks import builtin_task
from trace_ft.lm.text import CharTokenizer


def fresh_model():
    from transformers import LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    spec = BuiltinSpec(hidden=32, layers=2, heads=2, intermediate=64)
    return LlamaForCausalLM(builtin_config(spec, CharTokenizer().vocab_size))


def trainer_for(model, opt, out, callbacks=()):
    from transformers import Trainer, TrainingArguments

    task = builtin_task("rev", n_train=64, n_test=8)
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine",
        warmup_steps=1, max_grad_norm=1.0, save_strategy="steps", save_steps=3,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0,
        remove_unused_columns=False, disable_tqdm=True, save_only_model=False)
    ds = EncodedSet(task.train, CharTokenizer())
    return Trainer(model=model, args=args, train_dataset=ds, data_collator=ds.collate,
                   optimizers=(opt, None), callbacks=list(callbacks)), task


@pytest.mark.slow
def test_trainer_trains_only_the_core_and_resumes(tmp_path):
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = builtin_task("rev", n_train=64, n_test=8)
    ds = EncodedSet(task.train, CharTokenizer())
    probe_batches = list(DataLoader(ds, batch_size=8, collate_fn=ds.collate))
    # the two added lines
    opt = trace_optimizer(model, probe_batches, lr=1e-2, probe_steps=3, budget=0.05)
    trainer, task = trainer_for(model, opt, tmp_path / "run",
                                [TraceCallback(opt, history=tmp_path / "h", task="rev", test=task.test)])
    trainer.train()

    core = opt.trace.core
    assert 0 < core.numel_selected <= 0.05 * core.numel + 1
    moved = 0
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        inside = core.to_dense(n) if n in core else torch.zeros_like(changed)
        assert not (changed & ~inside).any(), f"{n}: an element outside the core moved"
        moved += int((changed & inside).sum())
    assert moved > 0.9 * core.numel_selected
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert len(set(lrs)) > 3 and lrs[-1] < max(lrs)  # the Trainer's cosine schedule drove it

    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and load_core(ckpt) == core
    hist = TaskHistory.open(tmp_path / "h", model)
    assert hist.names == ["rev"] and hist.record(0).core == core

    # resume from step 3 with the saved core (no second probe): same end point
    resumed_model = fresh_model()
    opt2 = trace_optimizer(resumed_model, lr=1e-2, core=load_core(ckpt))
    trainer2, _ = trainer_for(resumed_model, opt2, tmp_path / "resumed", [TraceCallback(opt2)])
    trainer2.train(resume_from_checkpoint=str(ckpt))
    final = dict(resumed_model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), final[n].detach()), n
    assert (tmp_path / "resumed" / "checkpoint-6" / CORE_FILE).is_file()
    saved = load_file(str(tmp_path / "run" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(saved[n], p.detach()) for n, p in model.named_parameters() if n in saved)


def test_trace_optimizer_refuses_bad_input():
    model = fresh_model()
    with pytest.raises(ValueError, match="needs probe_batches"):
        trace_optimizer(model, lr=1e-3)
    from trace_kernels import CoreMask

    with pytest.raises(ValueError, match="does not have"):
        trace_optimizer(model, lr=1e-3, core=CoreMask.from_dense({"nope.weight": torch.ones(2, 2, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="core is empty"):
        trace_optimizer(model, lr=1e-3, core=CoreMask.from_dense(
            {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32, dtype=torch.bool)}))
    with pytest.raises(TypeError, match="optimizer returned by trace_optimizer"):
        TraceCallback(torch.optim.AdamW(model.parameters()))


def _launch(args: list[str], ranks: int, worker: str = "trainer_fsdp2_worker.py") -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import torchrun

    worker = Path(__file__).with_name(worker)
    if ranks > 1:
        torchrun([worker, *args], timeout=300, ranks=ranks)
        return
    out = subprocess.run([sys.executable, str(worker), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]


@pytest.mark.slow
def test_trainer_under_fsdp2_equals_one_process_and_resumes(tmp_path):
    """The Trainer builds MaskedAdamW from the recipe on the full model; accelerate shards
    the model (FSDP2, 2 gloo ranks) and swaps the optimizer's parameters for the shards.
    The run equals one process on the same global batch, each rank keeps state for its
    share of the core, and a run resumed from the sharded (DCP) checkpoint ends exactly
    where the uninterrupted one does."""
    from trace_kernels import CoreMask

    _launch([str(tmp_path / "single"), "--single"], 1)
    _launch([str(tmp_path / "fsdp")], 2)
    _launch([str(tmp_path / "resumed"), str(tmp_path / "fsdp" / "checkpoint-3")], 2)
    one, two, resumed = (torch.load(tmp_path / d / "final.pt") for d in ("single", "fsdp", "resumed"))
    core = CoreMask.load(tmp_path / "fsdp" / "core.safetensors")
    assert core == CoreMask.load(tmp_path / "single" / "core.safetensors")  # rank 0's probe, sent
    assert len(two["sharded"]) == len(one["final"])
    a, b = two["state_per_rank"]
    assert a > 0 and b > 0 and a + b == one["state_per_rank"][0] == core.numel_selected
    for n, q in one["final"].items():
        p = two["final"][n]
        assert float((p - q).norm() / q.norm()) <= 1e-5, n
        assert torch.equal(resumed["final"][n], p), n
    assert (tmp_path / "fsdp" / "checkpoint-3" / CORE_FILE).is_file()
    model = fresh_model()
    rec, ref = (TaskHistory.open(tmp_path / d / "history", model).record(0) for d in ("fsdp", "single"))
    assert rec.core == core and all(torch.allclose(rec.after[n], ref.after[n], rtol=1e-5, atol=1e-7)
                                    for n in ref.after)


@pytest.mark.slow
def test_whole_tensor_cores_under_deepspeed_zero3(tmp_path):
    """The authors' setup needs no custom optimizer: the probe picks whole tensors, the rest
    get requires_grad=False, and DeepSpeed ZeRO-3 (2 gloo ranks, CPU accelerator) trains the
    core with a plain AdamW. Equal to one process; every other tensor bit for bit unchanged."""
    import json

    pytest.importorskip("deepspeed")
    _launch([str(tmp_path)], 2, "deepspeed_worker.py")
    result = json.loads((tmp_path / "deepspeed.json").read_text())
    core = [n for n, r in result.items() if r["core"]]
    assert 1 < len(core) < len(result)
    assert all(r["partitioned"] for r in result.values())  # ZeRO-3 held every tensor in parts
    assert all(r["rel"] <= 1e-5 for r in result.values())
    assert all(r["unchanged"] != r["core"] for r in result.values())  # the core moved, nothing else


@pytest.mark.slow
def test_trace_optimizer_probes_on_rank_0_and_shares_the_core(tmp_path):
    """An unsharded model on 2 ranks: rank 0 alone probes, the other rank gets the same
    core; a probe that fails on rank 0 ends every rank with an error, not a hang."""
    import json

    (tmp_path / "ok").mkdir()
    _launch([str(tmp_path / "ok"), "ok"], 2, "probe_once_worker.py")
    a, b = (json.loads((tmp_path / "ok" / f"probe_once.{r}.json").read_text()) for r in range(2))
    assert a["probed"] and not b["probed"]
    assert a["core"] == b["core"] > 0 and a["digest"] == b["digest"]
    (tmp_path / "fail").mkdir()
    _launch([str(tmp_path / "fail"), "fail"], 2, "probe_once_worker.py")
    a, b = (json.loads((tmp_path / "fail" / f"probe_once.{r}.json").read_text()) for r in range(2))
    assert "error" in a and "probe failed on rank 0" in b["error"], (a, b)
