"""`trace-ft history`: verify a task history and list its tasks."""

from __future__ import annotations

import json
from pathlib import Path

from ..store.history import TaskHistory


def show_history(path: str | Path, as_json: bool = False) -> str:
    """The listing of the history at `path`, after verifying every file's checksum."""
    hist = TaskHistory.open(path)
    if as_json:
        return json.dumps(hist.entries, indent=1)
    lines = [f"{path}: {len(hist)} task(s), all files verified",
             f"{'#':>3s}  {'task':16s} {'added (UTC)':20s} {'core':>12s} {'final loss':>10s}  scores after it"]
    for e in hist.entries:
        s = e.get("summary", {})
        core = s.get("core_elements")
        loss = s.get("final_loss")
        scores = ", ".join(f"{k}={v:.1f}" for k, v in s.get("scores", {}).items())
        lines.append(f"{e['index']:3d}  {e['name'][:16]:16s} {e['time'][:19]:20s} "
                     f"{'-' if core is None else f'{core:,}':>12s} "
                     f"{'-' if loss is None else f'{loss:.4f}':>10s}  {scores}")
    return "\n".join(lines)
