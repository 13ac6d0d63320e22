"""Which function runs an op on a backend: each backend module registers its kernels against
the ops by name when it is imported (`register_kernel`), and `kernel` finds a backend's, or
the reference's where the backend has none of its own. A backend is found by its module's
name (``trace_kernels.backends.<name>``), imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# "plan_masked_adamw" is a backend's prepared launch of a masked step (built once from the
# step's lists, then stepped with only the gradients): the reference has none, and a backend
# without one runs the op at every step.
OPS = ("masked_adamw_", "adamw_fisher_", "delta_stats", "sampled_dot", "rank_scores", "rank_counts",
       "element_max_cosine", "check_block_indices", "plan_masked_adamw")
NAMES = ("reference", "cpu", "cuda", "triton")  # the backends, each `backends/<name>`
_KERNELS: dict[tuple[str, str], Callable] = {}


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is backend `backend`'s kernel of `op` (one of `OPS`)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}")

    def register(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        return fn

    return register


def kernel(op: str, name: str) -> Callable | None:
    """Backend `name`'s kernel of `op`, else the reference's; None for a prepared launch
    (plan_masked_adamw) the backend does not have."""
    _load(name)
    found = _KERNELS.get((op, name))
    if found is None and op != "plan_masked_adamw":
        _load("reference")
        found = _KERNELS[(op, "reference")]
    return found


def _load(name: str) -> None:
    """Import backend `name`'s module: its kernels register themselves."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}")
    importlib.import_module(f"{__package__}.{name}")
