"""Wall time and peak memory of each phase of a Phase B step (generation, teacher, student, update).

On CUDA the clock synchronises at phase boundaries (kernels run asynchronously, so an unsynchronised
timer charges one phase's work to the next) and reads the allocator's peak. On CPU a daemon thread
samples the process's resident set size every few milliseconds (Linux /proc; elsewhere memory is
not reported), so the peak of a phase is the largest RSS seen while it ran; glibc's allocator first
hands back the pages freed before the phase (malloc_trim), which it would otherwise keep and count
towards every later phase.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _rss_bytes() -> int | None:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


class _RssSampler:
    """Keeps the largest RSS seen since the last `reset`, polled every `interval` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = _rss_bytes() or 0
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="padd-rss").start()

    def _run(self) -> None:
        while True:
            rss = _rss_bytes() or 0
            with self._lock:
                self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        # Freed memory stays in the process (glibc keeps it for reuse) and would count towards every
        # later phase: hand it back first, so that a phase's peak is its own.
        if _TRIM is not None:
            _TRIM(0)
        with self._lock:
            self.peak = _rss_bytes() or 0

    def read(self) -> int:
        rss = _rss_bytes() or 0
        with self._lock:
            return max(self.peak, rss)


_SAMPLER: _RssSampler | None = None


class PhaseClock:
    """Accumulates seconds and the peak memory (GB) per named phase over one rollout batch.

    with clock("teacher"): ...   # time and peak memory of the block, added to "teacher"
    """

    def __init__(self, device: torch.device, phases: tuple[str, ...]):
        global _SAMPLER
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds = dict.fromkeys(phases, 0.0)
        self.peak_gb: dict[str, float] = defaultdict(float)
        self.memory = self.cuda or _rss_bytes() is not None
        if self.memory and not self.cuda and _SAMPLER is None:
            _SAMPLER = _RssSampler()

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.memory:
            _SAMPLER.reset()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = _SAMPLER.read() if self.memory else 0
            self.seconds[phase] += time.perf_counter() - start
            self.peak_gb[phase] = max(self.peak_gb[phase], peak / 2**30)

    def metrics(self) -> dict[str, float]:
        """time_PHASE (s) for every phase and mem_PHASE_gb for those that ran, when memory is known."""
        out = {f"time_{k}": round(v, 4) for k, v in self.seconds.items()}
        if self.memory:
            out.update({f"mem_{k}_gb": round(v, 3) for k, v in self.peak_gb.items()})
        return out
