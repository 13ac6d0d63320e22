"""Continual fine-tuning strategies, one file each, one interface (`base.Strategy`)."""

from ...method.select import GRANULARITIES
from .base import Context, Strategy, TaskCost
from .ewc import EWC, EWCPenalty
from .lora import LoRA
from .mtl import MTL
from .replay import Replay
from .seqft import SeqFT
from .trace import Trace

# trace_guard: trace with the general-ability guard on (--protect-base, --protect 1 unless set)
NAMES = ("trace", "trace_paper", "trace_guard", "seqft", "lora", "ewc", "replay", "mtl")


def strategy_names_ok(name: str) -> None:
    """Raise, naming the choices, for a name no strategy has."""
    if name in NAMES or (name.startswith("trace_") and name[6:] in GRANULARITIES):
        return
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(NAMES)} "
                     f"or trace_<{'|'.join(GRANULARITIES)}>")


__all__ = ["NAMES", "strategy_names_ok", "Context", "Strategy", "TaskCost", "EWC", "EWCPenalty", "LoRA", "MTL",
           "Replay", "SeqFT", "Trace"]
