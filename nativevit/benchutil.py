"""Shared benchmark plumbing: timing, the matmul roofline, hardware/version stamps, CSV results.

Every benchmark (the ``nativevit bench`` job and ``benchmarks/bench_*.py``) uses these, so all
results share one CSV schema:

    benchmark, backend, dtype, shape, metric, value, unit, hardware, torch, triton, git_sha, timestamp
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

CSV_COLUMNS = (
    "benchmark", "backend", "dtype", "shape", "metric", "value", "unit",
    "hardware", "torch", "triton", "git_sha", "timestamp",
)  # fmt: skip

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def hardware_name(device: torch.device | str = "cpu") -> str:
    """A short, file-name-safe hardware tag: the GPU name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"{name} x{os.cpu_count()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3, device="cpu") -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def mm_peak_flops(dtype: torch.dtype, device="cpu", n: int = 2048, iters: int = 5) -> float:
    """Peak FLOP/s of a square ``torch.mm`` at ``dtype``, the roofline every benchmark reports against:
    the best of ``iters`` timed calls (a peak; on a shared machine the median wanders with the load)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    best = min(time_fn(lambda: torch.mm(a, b), warmup=0, iters=1, device=device) for _ in range(iters))
    return 2 * n**3 / best


def peak_memory_tracker(device: torch.device | str):
    """Context manager measuring peak memory (bytes): CUDA allocator stats, or on CPU the process's
    resident-set high-water mark above its level at entry."""
    return _PeakMemory(torch.device(device))


class _PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_bytes("VmRSS")
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = max(0, _proc_status_bytes("VmHWM") - self._base)


def _proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in bytes; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
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


def append_csv(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append result rows (dicts with benchmark/backend/dtype/shape/metric/value/unit) to ``path``,
    stamping hardware, versions, git sha and time; writes the header for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {
        "hardware": hardware_name(),
        **versions(),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})
    return path


def results_path(benchmark: str, device: torch.device | str = "cpu") -> Path:
    """``benchmarks/results/<hardware>-<benchmark>.csv`` in a source checkout (cwd otherwise)."""
    base = RESULTS_DIR if RESULTS_DIR.parent.is_dir() else Path.cwd() / "benchmark-results"
    return base / f"{hardware_name(device)}-{benchmark}.csv"
