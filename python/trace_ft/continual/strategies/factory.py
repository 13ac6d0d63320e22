"""The strategies a `RunConfig` names, built from its settings (`build_strategy`), and the
trace variants of a sweep (`sweep_strategies`)."""

from __future__ import annotations

from ...method.probe import DEFAULT_EXCLUDE
from ...method.select import GRANULARITIES, SelectConfig
from ...tasks import Task
from . import EWC, MTL, LoRA, Replay, SeqFT, Strategy, Trace, strategy_names_ok

# `cfg` below is a `trace_ft.config.RunConfig`, the layer above this one (read, not imported)


def _trace_kwargs(cfg, general: Task | None) -> dict:
    return dict(probe_steps=cfg.trace_probe_steps, probe_lr=cfg.trace_probe_lr, lr=cfg.trace_lr,
                sketch_dim=cfg.trace_sketch_dim,
                exclude=DEFAULT_EXCLUDE if cfg.trace_exclude is None else tuple(cfg.trace_exclude),
                master_weights=cfg.trace_master_weights,
                core_grads=cfg.parallel != "fsdp2" if cfg.trace_core_grads is None else cfg.trace_core_grads,
                general=general if cfg.trace_protect_base else None)


def build_strategy(name: str, cfg, general: Task | None = None) -> Strategy:
    """`general`: the base skill's task, protected by trace when `trace_protect_base`."""
    trace_kw = _trace_kwargs(cfg, general)
    if name == "trace":
        return Trace(cfg.select_config(), name="trace", **trace_kw)
    if name == "trace_paper":
        return Trace(SelectConfig.paper(), name="trace_paper", **trace_kw)
    if name == "trace_guard":  # general ability guarded whatever --protect-base says
        return Trace(cfg.select_config(protect=cfg.trace_protect or 1.0), name="trace_guard",
                     **{**trace_kw, "general": general})
    if name.startswith("trace_") and name[6:] in GRANULARITIES:
        return Trace(cfg.select_config(granularity=name[6:]), name=name, **trace_kw)
    if name == "seqft":
        return SeqFT()
    if name == "lora":
        return LoRA(lr=cfg.lora_lr, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if name == "ewc":
        return EWC(lr=cfg.ewc_lr, lam=cfg.ewc_lambda)
    if name == "replay":
        return Replay(buffer_per_task=cfg.replay_buffer, ratio=cfg.replay_ratio)
    if name == "mtl":
        return MTL()
    strategy_names_ok(name)  # raises, naming the choices
    raise AssertionError(name)


def sweep_strategies(cfg, general: Task | None = None) -> list[Strategy]:
    out = []
    for g in cfg.sweep_granularity:
        for b in cfg.sweep_budget:
            for ps in cfg.sweep_probe_steps:
                kw = {**_trace_kwargs(cfg, general), "probe_steps": ps}
                out.append(Trace(cfg.select_config(granularity=g, budget=b),
                                 name=f"trace[{g},{b:g},p{ps}]", **kw))
    return out
