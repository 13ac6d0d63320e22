"""The strategies a `RunConfig` names, built from its settings (`build_strategy`), and the
trace variants of a sweep (`sweep_strategies`)."""

from __future__ import annotations

import dataclasses

from ...method.probe import DEFAULT_EXCLUDE, PROBE_AUTOCAST
from ...tasks import Task
from ...method.select import GRANULARITIES, SelectConfig
from . import EWC, MTL, LoRA, Replay, SeqFT, Strategy, Trace, strategy_names_ok

# `cfg` below is a `trace_ft.config.RunConfig`, the layer above this one (read, not imported);
# its settings are resolved (every default filled in) when it is built


def _trace_kwargs(cfg, general: Task | None, name: str) -> dict:
    t = cfg.trace
    return dict(probe_steps=t.probe_steps, probe_lr=t.probe_lr, lr=t.lr, sketch_dim=t.sketch_dim,
                exclude=DEFAULT_EXCLUDE if t.exclude is None else tuple(t.exclude),
                master_weights=t.master_weights, core_grads=t.core_grads,
                general=general if t.protect_base else None,
                keep_routes=cfg.routed and name == "trace", lora_rank=cfg.lora.rank,
                continue_probe=t.continue_probe,
                probe_autocast=PROBE_AUTOCAST[t.probe_autocast])


def build_strategy(name: str, cfg, general: Task | None = None) -> Strategy:
    """`general`: the base skill's task, protected by trace when `trace_protect_base`."""
    select = cfg.trace.select
    if name == "trace":
        return Trace(select, name=name, **_trace_kwargs(cfg, general, name))
    if name == "trace_paper":
        return Trace(SelectConfig.paper(), name=name, **_trace_kwargs(cfg, general, name))
    if name == "trace_guard":  # general ability guarded whatever --protect-base says
        return Trace(dataclasses.replace(select, protect=select.protect or 1.0), name=name,
                     **{**_trace_kwargs(cfg, general, name), "general": general})
    if name.startswith("trace_") and name[6:] in GRANULARITIES:
        return Trace(dataclasses.replace(select, granularity=name[6:]), name=name,
                     **_trace_kwargs(cfg, general, name))
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
                name = f"trace[{g},{b:g},p{ps}]"
                kw = {**_trace_kwargs(cfg, general, name), "probe_steps": ps,
                      "continue_probe": cfg.probe_continues(ps)}
                out.append(Trace(dataclasses.replace(cfg.trace.select, granularity=g, budget=b), name=name, **kw))
    return out
