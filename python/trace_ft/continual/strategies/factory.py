"""The strategies a `RunConfig` names, built from its settings (`build_strategy`), and the
trace variants of a sweep (`sweep_strategies`)."""

from __future__ import annotations

from ...method.probe import DEFAULT_EXCLUDE
from ...method.select import GRANULARITIES, SelectConfig
from ...tasks import Task
from . import EWC, MTL, LoRA, Replay, SeqFT, Strategy, Trace, strategy_names_ok

# `cfg` below is a `trace_ft.config.RunConfig`, the layer above this one (read, not imported)


def _trace_kwargs(cfg, general: Task | None) -> dict:
    t = cfg.trace
    return dict(probe_steps=t.probe_steps, probe_lr=t.probe_lr, lr=t.lr, sketch_dim=t.sketch_dim,
                exclude=DEFAULT_EXCLUDE if t.exclude is None else tuple(t.exclude),
                master_weights=t.master_weights,
                core_grads=cfg.parallel != "fsdp2" if t.core_grads is None else t.core_grads,
                general=general if t.protect_base else None)


def build_strategy(name: str, cfg, general: Task | None = None) -> Strategy:
    """`general`: the base skill's task, protected by trace when `trace_protect_base`."""
    trace_kw = _trace_kwargs(cfg, general)
    if name == "trace":
        return Trace(cfg.trace.select_config(), name="trace", **trace_kw)
    if name == "trace_paper":
        return Trace(SelectConfig.paper(), name="trace_paper", **trace_kw)
    if name == "trace_guard":  # general ability guarded whatever --protect-base says
        return Trace(cfg.trace.select_config(protect=cfg.trace.protect or 1.0), name="trace_guard",
                     **{**trace_kw, "general": general})
    if name.startswith("trace_") and name[6:] in GRANULARITIES:
        return Trace(cfg.trace.select_config(granularity=name[6:]), name=name, **trace_kw)
    if name == "seqft":
        return SeqFT()
    if name == "lora":
        return LoRA(lr=cfg.lora.lr, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    if name == "ewc":
        return EWC(lr=cfg.ewc.lr, lam=cfg.ewc.lam)
    if name == "replay":
        return Replay(buffer_per_task=cfg.replay.buffer, ratio=cfg.replay.ratio)
    if name == "mtl":
        return MTL()
    strategy_names_ok(name)  # raises, naming the choices
    raise AssertionError(name)


def sweep_strategies(cfg, general: Task | None = None) -> list[Strategy]:
    out = []
    for g in cfg.sweep.granularity:
        for b in cfg.sweep.budget:
            for ps in cfg.sweep.probe_steps:
                kw = {**_trace_kwargs(cfg, general), "probe_steps": ps}
                out.append(Trace(cfg.trace.select_config(granularity=g, budget=b),
                                 name=f"trace[{g},{b:g},p{ps}]", **kw))
    return out
