"""Sequential LoRA (peft): a fresh adapter per task on the attention and MLP projections,
merged into the weights after the task."""

from __future__ import annotations

from .base import Context, Strategy, TaskCost, train_adamw

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_bytes(model, rank: int, targets=TARGETS) -> int:
    """Bytes of one LoRA adapter of `rank` on `model`'s target projections (A and B of
    r·(in + out) values each matrix, in the weights' dtype): what storing one per task costs."""
    total = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.dim() == 2 and len(parts) >= 2 and parts[-2] in targets and parts[-1] == "weight":
            total += rank * (p.shape[0] + p.shape[1]) * p.element_size()
    return total


class LoRA(Strategy):
    name = "lora"

    def __init__(self, lr: float | None = None, rank: int = 8, alpha: float = 16.0,
                 targets=TARGETS) -> None:
        super().__init__(lr)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)

    def config(self) -> dict:
        return {"lr": self.lr, "rank": self.rank, "alpha": self.alpha, "targets": self.targets}

    def learn(self, ctx: Context, index, task, seen) -> TaskCost:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise RuntimeError("the lora strategy needs peft: pip install 'trace-kernels[hf]'") from e
        cfg = self.train_config(ctx)
        lcfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                          target_modules=self.targets, bias="none")
        peft_model = get_peft_model(ctx.model, lcfg)
        cost = train_adamw(ctx, peft_model, ctx.batches([task], cfg.steps, salt=index), cfg,
                           self.desc(ctx, index, task))
        ctx.model = peft_model.merge_and_unload()
        for p in ctx.model.parameters():
            p.requires_grad_(True)
        return cost
