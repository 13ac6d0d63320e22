"""Checkpoints of one `trace-ft adapt` run, so an interrupted run resumes where it stopped
and ends with the same result as an uninterrupted one.

Layout of the checkpoint directory::

    state.json               what the run was started with (inputs), and the newest step
    selection/               the task's core, its recorded update, the probe's losses
    step-000040/             the values of the core elements (nothing else is trained),
                             optimizer state, losses so far and the RNG state, after step 40

Every part is written to a hidden staging directory and renamed into place before
`state.json` (the only file a reader trusts) is replaced to point at it, each with the
SHA-256 of its files, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from trace_kernels import CoreMask

from . import atomic
from .updates import load_tensors, load_updates, save_tensors, save_updates

VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is damaged or belongs to another run."""


def _describe_files(folder: Path) -> dict:
    return {f.name: {"bytes": f.stat().st_size, "sha256": atomic.sha256_file(f)}
            for f in sorted(folder.iterdir()) if f.is_file()}


class AdaptCheckpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def state(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {self.path}: unreadable state.json ({e})") from None
        if state.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {self.path}: version {state.get('version')} "
                                  f"is not supported")
        return state

    def check_inputs(self, inputs: dict) -> dict:
        """The saved state, after checking it was started with the same `inputs`."""
        state = self.state()
        saved = state["inputs"]
        for key in sorted(set(saved) | set(inputs)):
            if saved.get(key) != inputs.get(key):
                raise CheckpointError(
                    f"checkpoint {self.path} belongs to a different run: its {key} differs "
                    f"({saved.get(key)!r} there, {inputs.get(key)!r} now); "
                    "run with the original settings, or delete the checkpoint to start over")
        return state

    def _verify(self, folder: Path, files: dict) -> None:
        for name, info in files.items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != info["bytes"] or atomic.sha256_file(f) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {f} is missing or damaged; "
                                      "delete the checkpoint to start over")

    # -- the selection, saved once after the probe --
    def start(self, inputs: dict, core: CoreMask, updates: dict, info: dict,
              continue_from: dict[str, Tensor] | None = None) -> None:
        """Save the selection. `continue_from`: the probe's state on the core, as tensors, when
        the task's training continues from it (so a run killed before its first step resumes
        from it too, without probing again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / "selection"
        atomic.remove_stale(self.path, "selection")
        if target.exists():
            shutil.rmtree(target)
        with atomic.staging_dir(target) as tmp:
            core.save(tmp / "core.safetensors")
            save_updates(updates, tmp / "updates.safetensors")
            if continue_from is not None:
                save_tensors(continue_from, tmp / "continue_from.safetensors")
            (tmp / "info.json").write_text(json.dumps(info))
            files = _describe_files(tmp)
            atomic.install_dir(tmp, target)
        atomic.write_json(self.state_file, {"version": VERSION, "inputs": inputs,
                                            "selection": files, "step": 0, "step_dir": None})

    def selection(self, state: dict) -> tuple[CoreMask, dict, dict]:
        folder = self.path / "selection"
        self._verify(folder, state["selection"])
        return (CoreMask.load(folder / "core.safetensors"), load_updates(folder / "updates.safetensors"),
                json.loads((folder / "info.json").read_text()))

    def continue_from(self, state: dict) -> dict[str, Tensor] | None:
        """The probe's state on the core saved with the selection (checked by `selection`), or None."""
        if "continue_from.safetensors" not in state["selection"]:
            return None
        return load_tensors(self.path / "selection" / "continue_from.safetensors")

    # -- training progress, saved every N steps --
    def save_step(self, step: int, tensors: dict[str, Tensor], optimizer_state: dict,
                  losses: list[float]) -> None:
        state = self.state()
        name = f"step-{step:06d}"
        target = self.path / name
        atomic.remove_stale(self.path, name)
        if target.exists():
            shutil.rmtree(target)
        with atomic.staging_dir(target) as tmp:
            save_tensors(tensors, tmp / "weights.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))
            files = _describe_files(tmp)
            atomic.install_dir(tmp, target)
        atomic.write_json(self.state_file, {**state, "step": step, "step_dir": name, "step_files": files})
        for old in self.path.glob("step-*"):  # older steps, and any a crash left unreferenced
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load_step(self, state: dict) -> tuple[int, dict[str, Tensor], dict | None, list[float]]:
        """(step, core values by tensor, optimizer state, losses) of the newest saved step, or
        (0, {}, None, []) when training had not reached a checkpoint."""
        if not state.get("step_dir"):
            return 0, {}, None, []
        folder = self.path / state["step_dir"]
        self._verify(folder, state["step_files"])
        progress = json.loads((folder / "progress.json").read_text())
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return (int(progress["step"]), load_tensors(folder / "weights.safetensors"),
                torch.load(folder / "optimizer.pt", weights_only=True), list(progress["losses"]))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
