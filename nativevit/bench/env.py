"""What a result is measured on: device, dtype, hardware name, library versions, source revision."""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

# The one dtype table of every benchmark; CSV rows carry these names.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}

DEVICE_TYPES = ("cpu", "cuda")


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of ``dtype`` (``torch.bfloat16`` -> ``"bf16"``)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"no benchmark name for {dtype}; known: {sorted(DTYPES)}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str) -> torch.device:
    """A device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``) that can run here, else ``ValueError``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"not a device: {text!r} (use cpu or cuda[:N])") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {text!r} (use cpu or cuda[:N])")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("cuda was asked for but no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quiet_cpu_compile(device: torch.device | str) -> None:
    """Without a GPU, inductor's C++ build logs a warning that no CUDA runtime was found (this torch is a
    CUDA build): true, expected, and no fault of the run, so it is not shown. A no-op with a GPU."""
    if torch.device(device).type == "cpu" and not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


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
    """``{"torch": ..., "triton": ...}`` (``"none"`` when triton is not installed)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def git_sha() -> str:
    """Short commit of the source checkout the package runs from, or ``"unknown"`` (an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


__all__ = [
    "DEVICE_TYPES",
    "DTYPES",
    "default_device",
    "dtype_name",
    "git_sha",
    "hardware_name",
    "parse_device",
    "quiet_cpu_compile",
    "synchronize",
    "versions",
]
