"""Peak memory of a block of work, measured so that it repeats.

- CUDA: the caching allocator's own peak of allocated tensor bytes above the bytes
  allocated at entry (`torch.cuda.max_memory_allocated`).
- CPU (Linux): the kernel's exact high-water mark of the resident set (VmHWM), reset at
  entry through /proc/self/clear_refs, minus the resident set at entry. Memory that the C
  allocator freed but kept would hide a block's own use behind an earlier block's
  leftovers, so freed memory is handed back to the system first (malloc_trim). It counts
  every byte the process touched: tensors, autograd buffers, Python objects. (Serving
  large allocations by mmap would make it repeat to ~2 % instead of ~10 %, but costs
  page faults on every tensor: 1.5× the time of a small-model run here.)
- Elsewhere: RSS sampled every 5 ms (approximate; `exact` is False).

Meters nest: an inner meter's reset of the high-water mark first hands the mark to every
open outer meter, so the run's peak still covers its phases (`PhaseLog`: time and peak of
each named phase of a task).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Iterator

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def _clear_refs() -> bool:
    """Set VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


_OPEN: list[PeakMemory] = []   # meters inside their `with` block, outermost first


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the most memory in use
    above what was in use at entry (see the module doc for what is counted), and
    ``m.exact``: whether it is a kernel or allocator count rather than a sampled one.
    ``m.start_bytes``: what was in use at entry."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.exact = True
        self._thread = None

    def _mark(self) -> int:
        """The device's high-water mark now (bytes)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.exact:
            return (_status_kib("VmHWM") or 0) * 1024
        return max(self._high, _rss())

    def _hand_on(self, high: int) -> None:
        """Give the outer open meters a mark this one is about to clear or has seen."""
        for meter in _OPEN:
            if meter is not self and meter.device == self.device:
                meter._high = max(meter._high, high)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._hand_on(torch.cuda.max_memory_allocated(self.device))
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            libc = _libc()
            if libc is not None:
                libc.malloc_trim(0)
            high = _status_kib("VmHWM")
            if high is not None:
                self._hand_on(high * 1024)
            self._start = _rss()
            self.exact = _clear_refs()
            if not self.exact:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
        self._high = self._start
        _OPEN.append(self)
        if self._thread is not None:
            self._thread.start()
        return self

    @property
    def start_bytes(self) -> int:
        return self._start

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._high = max(self._high, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        _OPEN.remove(self)
        high = max(self._high, self._mark())
        self._hand_on(high)
        self.peak_bytes = max(0, high - self._start)


class PhaseLog:
    """Seconds and peak memory of the named phases of a run, summed (time) and maxed
    (memory) over repeats: ``with log.phase("probe"): ...``. The peak is absolute, the
    memory in use above the log's `base_bytes` (what was in use when the log began, e.g.
    after the base model was loaded), so phases compare directly."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.base_bytes = _rss() if self.device.type != "cuda" else torch.cuda.memory_allocated(self.device)
        self.rows: dict[str, dict] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with PeakMemory(self.device) as m:
            yield
        row = self.rows.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_bytes": 0})
        row["seconds"] += time.perf_counter() - t0
        row["calls"] += 1
        row["peak_bytes"] = max(row["peak_bytes"], m.start_bytes + m.peak_bytes - self.base_bytes)


def memory_note(device: torch.device | str = "cpu") -> str:
    """One line for reports: what the peak-memory column counts on `device`."""
    if torch.device(device).type == "cuda":
        return "peak memory: CUDA allocator peak of tensor bytes above the start of the strategy"
    if os.path.exists("/proc/self/clear_refs"):
        return ("peak memory: the kernel's high-water mark of the process's resident memory "
                "(VmHWM) above the start of the strategy, with freed memory returned to the "
                "system first; it counts tensors, autograd buffers and Python objects")
    return "peak memory: resident memory sampled every 5 ms above the start (approximate)"
