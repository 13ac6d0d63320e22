"""Scores of an untrained model kept across runs: the same model scored on the same
evaluation set gives the same numbers, so `run` and `frontier` measure a base model once per
machine, not once per run.

A score is filed under the digest of everything it depends on: the model's weights (every
tensor's name, dtype, shape and bytes), the device type, the tokenizer's fingerprint, what
was scored (a task's encoded test set and scorer, a text's windows, a benchmark and its
question limit) and `VERSION` (bumped when scoring code changes). Files are JSON, written
atomically; deleting `<cache>/scores` forgets them all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_json

VERSION = 1


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        shape = t.shape
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """Base-model scores under `root` (normally `<cache>/scores`) for one model, device and
    tokenizer: `get_or(what, compute)` returns the stored value of `what` (a JSON-able
    description of the measurement) or computes, stores and returns it."""

    def __init__(self, root: str | Path, model: nn.Module, tokenizer_fingerprint: str) -> None:
        self.root = Path(root)
        device = next(model.parameters()).device.type
        self.model_key = digest({"weights": weights_digest(model), "device": device,
                                 "tokenizer": tokenizer_fingerprint, "version": VERSION})
        self.hits = self.misses = 0

    def path(self, what: dict) -> Path:
        key = digest({"model": self.model_key, "what": what})
        return self.root / key[:2] / f"{key}.json"

    def get_or(self, what: dict, compute: Callable[[], Any]) -> Any:
        path = self.path(what)
        try:
            stored = json.loads(path.read_text())
            if stored.get("what") == what:
                self.hits += 1
                return stored["value"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # absent or unreadable: measured anew
        value = compute()
        self.misses += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"what": what, "value": value})
        return value
