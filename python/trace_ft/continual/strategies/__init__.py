"""Continual fine-tuning strategies, one file each, one interface (`base.Strategy`)."""

from .base import Context, Strategy, TaskCost
from .ewc import EWC, EWCPenalty
from .lora import LoRA
from .mtl import MTL
from .replay import Replay
from .seqft import SeqFT
from .trace import Trace

# trace_guard: trace with the general-ability guard on (--protect-base, --protect 1 unless set)
NAMES = ("trace", "trace_paper", "trace_guard", "seqft", "lora", "ewc", "replay", "mtl")

__all__ = ["NAMES", "Context", "Strategy", "TaskCost", "EWC", "EWCPenalty", "LoRA", "MTL",
           "Replay", "SeqFT", "Trace"]
