"""Latency and memory, measured so that the numbers mean what they say.

- ``latency``: median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.
- ``weight_bytes``: bytes of a model's parameters and buffers (each storage counted once, so tied
  weights are not double-counted) — what the weights occupy, not what running them costs.
- ``peak_rss``: the peak resident set size of *this process* while ``fn()`` runs (Linux: the
  VmHWM high-water mark is reset through ``/proc/self/clear_refs`` first). It includes everything
  already resident (Python, torch, the loaded model), so compare ``peak - before`` between runs,
  in the same process state. Elsewhere it falls back to ``ru_maxrss``, the peak since the process
  started, and says so.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def latency(fn: Callable[[], object], warmup: int = 2, repeats: int = 10) -> float:
    """Median seconds of ``fn()`` (wall clock, ``time.perf_counter``) after ``warmup`` calls."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers; shared storages are counted once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    for t in tensors:
        # Key on the data pointer and size so tied weights (same storage) count once.
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            continue
        seen.add(key)
        total += key[1]
    return total


@dataclass(frozen=True)
class PeakMemory:
    before: int  # resident bytes just before fn() ran
    peak: int  # highest resident bytes while fn() ran
    exact: bool  # False: ``peak`` is the process-lifetime peak (no clear_refs), an upper bound

    @property
    def increase(self) -> int:
        return max(self.peak - self.before, 0)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the VmHWM peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss(fn: Callable[[], object]) -> PeakMemory:
    """Peak resident set size of this process while ``fn()`` runs (see the module docstring)."""
    exact = _reset_peak()
    before_kib = _status_kib("VmRSS")
    fn()
    peak_kib = _status_kib("VmHWM") if exact else None
    if peak_kib is None or before_kib is None:
        exact = False
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, else KiB
        return PeakMemory(before=(before_kib or 0) * 1024, peak=peak, exact=False)
    return PeakMemory(before=before_kib * 1024, peak=peak_kib * 1024, exact=exact)


def torch_threads() -> int:
    """Intra-op threads torch uses (state this beside any timing)."""
    return torch.get_num_threads()
