"""Precision by device: whether it multiplies bf16 natively (where it does, bf16 products cost
well under fp32's: the probe under autocast 0.6-0.7 of its fp32 time on an AVX-512 BF16 CPU,
docs/performance.md rounds 14-15; where it does not, torch emulates them and they cost more),
and attention kept in fp32 under CPU autocast, where that is the faster kernel."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn


def native_bf16(device: torch.device | str) -> bool:
    """True on a CUDA device of compute capability 8.0 or later and on a CPU with AVX-512 BF16
    or AMX; False elsewhere, and for a device string torch does not parse (the run's own
    validation names it)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return False
    if d.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if d.type == "cpu":  # (torch's own CPU feature probes; absent in a torch that lacks them)
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(p is not None and p() for p in probes)
    return False


# The name under which `fp32_attention` registers its attention with transformers.
FP32_SDPA = "trace_fp32_sdpa"


def _register_fp32_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):
            mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() \
                else attention_mask
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)

    AttentionInterface.register(FP32_SDPA, fp32_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def fp32_attention(model: nn.Module):
    """Inside, a transformers model whose attention is "sdpa" computes it in fp32 while CPU
    autocast runs the rest in bf16 (its output goes back into the autocast products). On a
    CPU, PyTorch's fused attention is slower in bf16 than in fp32 (backward 14 ms a layer
    against ~5 for SmolLM2 at batch 8: the bf16 probe step 0.65× an fp32 step, 0.58× with
    this), and fp32 keeps it memory-efficient where the math kernel would not be. Nothing
    changes outside CPU autocast, on other devices, or for other attention kernels."""
    configs = []
    if torch.is_autocast_enabled("cpu"):
        seen = set()
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and id(c) not in seen and getattr(c, "_attn_implementation", None) == "sdpa":
                seen.add(id(c))
                configs.append(c)
    if configs:
        from transformers import AttentionInterface

        if FP32_SDPA not in AttentionInterface._global_mapping:
            _register_fp32_sdpa()
    try:
        for c in configs:
            c._attn_implementation = FP32_SDPA
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"


def with_fp32_attention(loss_fn: Callable[[nn.Module, object], Tensor]) -> Callable[[nn.Module, object], Tensor]:
    """`loss_fn` computed under `fp32_attention` of its model."""
    @functools.wraps(loss_fn)
    def loss(model: nn.Module, batch) -> Tensor:
        with fp32_attention(model):
            return loss_fn(model, batch)
    return loss
