"""The memo of device-side plans the GPU backends keep between calls of an op (tile lists,
per-tensor tables, statistics plans), keyed by the backend and what the plan was built from.
A MaskedAdamW group's plan (`trace_kernels.optim.functional.StepPlan`) holds a backend's
prepared launch where the backend registers one (the cpu backend's native table); the GPU
backends have none yet and find their tables here at each call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LIMIT = 256  # plans are cheap to rebuild; unbounded growth under changing layouts is not


class PlanCache:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._plans: dict[tuple, Any] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The plan for `key`, built on first use. A full cache is emptied rather than
        evicted one by one: a run that overflows it changes layout every call anyway."""
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) >= self.limit:
                self._plans.clear()
            hit = self._plans[key] = build()
        return hit

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


PLANS = PlanCache()
