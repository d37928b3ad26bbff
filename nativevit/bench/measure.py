"""Timing: interleaved rounds over several cases, peak memory, the ``torch.mm`` roofline.

Every benchmark times its cases with :func:`measure`: after the warm-up, each round runs every case
once, in order, and each case reports the median of its rounds. On a shared, noisy machine a burst
of load then hits all cases of a round alike instead of whichever case happened to run during it,
so the ratios between cases stay meaningful even when the absolute times wander.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .env import synchronize

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # tqdm is a dependency; a bare environment still runs, without bars
    _tqdm = None


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", enabled: bool = True):
    """``iterable`` with a progress bar on stderr (tqdm, only on a terminal), else ``iterable`` itself."""
    if _tqdm is None or not enabled:
        return iterable
    return _tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def note(line: str) -> None:
    """Print ``line`` without breaking an active progress bar."""
    if _tqdm is not None:
        _tqdm.write(line)
    else:
        print(line, flush=True)


@dataclass
class Case:
    """One thing to time: ``step()`` runs it once (its result is discarded)."""

    name: str
    step: Callable[[], object]


@dataclass
class Timing:
    """What :func:`measure` found for one case.

    ``samples``: wall seconds of each timed round; ``cpu_samples``: this process's CPU seconds in the
    same calls (all threads); ``peak_bytes``: peak memory of the first timed call above the level at
    its start (CUDA allocator, or on CPU the resident set), 0 when memory was not tracked.
    """

    name: str
    samples: list[float]
    cpu_samples: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def seconds(self) -> float:
        """Median wall time of the timed rounds."""
        return statistics.median(self.samples)

    @property
    def min_seconds(self) -> float:
        return min(self.samples)

    @property
    def cpu_seconds(self) -> float:
        """Median process CPU time of the timed rounds."""
        return statistics.median(self.cpu_samples)


def measure(
    cases: Sequence[Case],
    *,
    warmup: int = 0,
    iters: int = 1,
    device: torch.device | str = "cpu",
    memory: bool = True,
    desc: str = "",
) -> dict[str, Timing]:
    """Time ``cases`` in interleaved rounds; returns ``{case name: Timing}`` in the order given.

    Each case first runs ``warmup`` untimed calls (cases in turn), then ``iters`` (>= 1) timed rounds
    run every case once, in order. With ``memory``, peak memory is read during the first timed round.
    ``desc`` labels a progress bar (shown on a terminal only).
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    timings = {c.name: Timing(c.name, []) for c in cases}
    schedule = [(r, c) for r in range(warmup + iters) for c in cases]
    for r, case in progress(schedule, total=len(schedule), desc=desc):
        if r < warmup:
            case.step()
            continue
        t = timings[case.name]
        with PeakMemory(device, enabled=memory and r == warmup) as mem:
            wall, cpu = _timed_call(case.step, device)
        t.samples.append(wall)
        t.cpu_samples.append(cpu)
        if memory and r == warmup:
            t.peak_bytes = mem.peak
    return timings


def _timed_call(fn: Callable[[], object], device) -> tuple[float, float]:
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def time_fn(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3, device="cpu") -> float:
    """Median wall seconds of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones (one case alone)."""
    return measure([Case("fn", fn)], warmup=warmup, iters=iters, device=device, memory=False)["fn"].seconds


MM_SIZE = 2048


def mm_peak_flops(dtype: torch.dtype, device="cpu", n: int = MM_SIZE, iters: int = 10) -> float:
    """FLOP/s of a square ``n x n`` ``torch.mm`` at ``dtype``: the roofline every benchmark reports against.

    The best of ``iters`` timed calls after two warm-ups: a peak, because on a shared machine the median
    wanders with the load (with 5 calls, a burst of load on a 2-core machine gave half the rate, and
    kernels then showed "160% of mm").
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = min(
        measure([Case("mm", lambda: torch.mm(a, b))], warmup=2, iters=iters, device=device, memory=False)[
            "mm"
        ].samples
    )
    return 2 * n**3 / best


class PeakMemory:
    """Context manager: ``peak`` (bytes) reached inside it above the level at entry.

    CUDA: the allocator's statistics. CPU: the process's resident-set high-water mark (``VmHWM``, reset
    at entry where Linux allows it) above the resident set at entry; 0 where ``/proc`` is unavailable.
    """

    def __init__(self, device: torch.device | str, *, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_bytes("VmRSS")
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = max(0, _proc_status_bytes("VmHWM") - self._base)


def _proc_status_bytes(field_name: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    # Writing "5" to clear_refs resets the VmHWM high-water mark (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


__all__ = [
    "MM_SIZE",
    "Case",
    "PeakMemory",
    "Timing",
    "format_bytes",
    "measure",
    "mm_peak_flops",
    "note",
    "progress",
    "time_fn",
]
