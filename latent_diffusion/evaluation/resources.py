"""Speed and peak memory of a call: `measure(fn, *args, warmup=1, repeats=3)`; `PeakMemory` for any block.

Time: the median of `repeats` wall-clock timings (time.perf_counter) after
`warmup` untimed calls; on CUDA the device is synchronized before and after
each call, so queued kernels are counted.

Memory, over the timed calls:

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`
  (tensors allocated by torch on the current device; exact for what it counts,
  blind to the caching allocator's reserve and to other libraries).
- CPU: the process's resident set size (RSS), sampled by a background thread
  from /proc/self/statm every `sample_interval` seconds, combined with the
  kernel's lifetime peak (`resource.getrusage().ru_maxrss`) when that rises
  during the calls. Approximate: a spike shorter than the sampling interval
  can be missed unless it sets a new lifetime peak, memory freed back to the
  allocator but kept by it still counts, and other threads of the process
  count too.

Benchmarks belong in `benchmarks/`, not in timed tests.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIB = 1024 * 1024


@dataclass(frozen=True)
class Measurement:
    """Median seconds per call, and peak memory during the timed calls (bytes)."""

    seconds: float
    peak_bytes: int  # CUDA: max allocated; CPU: max RSS of the process
    peak_increase_bytes: int  # the peak above what was in use just before the timed calls
    memory_kind: str  # "cuda_max_allocated" or "cpu_rss_approx"
    times: tuple[float, ...]


def current_rss_bytes() -> int | None:
    """Resident set size of this process from /proc/self/statm (Linux); None where that file does not exist."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def lifetime_peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process so far (ru_maxrss: KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class RSSPeakSampler:
    """Context manager tracking the peak RSS while it is open, by sampling in a daemon thread."""

    def __init__(self, sample_interval: float = 0.002):
        if sample_interval <= 0:
            raise ValueError(f"sample_interval must be > 0 seconds; got {sample_interval}")
        self.sample_interval = sample_interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None:
            self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.sample_interval):
            self._sample()

    def __enter__(self) -> "RSSPeakSampler":
        self._lifetime_before = lifetime_peak_rss_bytes()
        self.baseline = current_rss_bytes() or self._lifetime_before or 0
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        lifetime_after = lifetime_peak_rss_bytes()
        if lifetime_after is not None and self._lifetime_before is not None and lifetime_after > self._lifetime_before:
            self.peak = max(self.peak, lifetime_after)  # a new lifetime peak was set during the calls


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _timed_calls(fn: Callable, args, kwargs, repeats: int, synchronize: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn(*args, **kwargs)
        synchronize()
        times.append(time.perf_counter() - start)
    return times


class PeakMemory:
    """Context manager: peak memory while open; CUDA max allocated on a CUDA device, else the sampled process RSS.

    `peak`: the peak (bytes); `increase`: the peak above what was in use on entering; `kind`: which counter.
    """

    def __init__(self, device: torch.device | str, sample_interval: float = 0.002):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_approx"
        self.sample_interval = sample_interval
        self.peak = self.increase = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._sampler = RSSPeakSampler(self.sample_interval).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.increase = self.peak - self._baseline
        else:
            self._sampler.__exit__(*exc)
            self.peak, self.increase = self._sampler.peak, max(self._sampler.peak - self._sampler.baseline, 0)


def measure(fn: Callable, *args, warmup: int = 1, repeats: int = 3, device: str | torch.device | None = None,
            sample_interval: float = 0.002, **kwargs) -> Measurement:
    """Call `fn(*args, **kwargs)` `warmup` times untimed, then `repeats` times timed; median seconds and peak memory.

    `device` picks the memory counter: "cuda[:i]" (default when CUDA is available) or "cpu" (approximate RSS).
    Keyword arguments named warmup, repeats, device or sample_interval are taken by `measure`; wrap `fn` in
    functools.partial to pass such arguments on.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    device = _resolve_device(device)
    for _ in range(warmup):
        fn(*args, **kwargs)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with PeakMemory(device, sample_interval) as memory:
        times = _timed_calls(fn, args, kwargs, repeats, synchronize)
    return Measurement(seconds=statistics.median(times), peak_bytes=int(memory.peak),
                       peak_increase_bytes=int(memory.increase), memory_kind=memory.kind, times=tuple(times))
