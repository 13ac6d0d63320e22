"""Loads the native extensions once and remembers why one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def load(name: str) -> ModuleType | None:
    """Import `trace_kernels.<name>` (e.g. "_C"); None if it was not built or fails to load."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"trace_kernels.{name}")
        except ImportError as exc:
            _modules[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules[name]


def error(name: str) -> str | None:
    """Why `load(name)` returned None, or None if it loaded."""
    load(name)
    return _errors.get(name)
