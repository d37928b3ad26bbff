"""Command-line plumbing shared by ``nativevit bench|profile`` and ``benchmarks/bench_*.py``: argument
types that reject bad values the way argparse does (exit 2, one line), the ``--out`` folder, and the
error boundary that turns a failed run into one line and exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .env import DTYPES, default_device, parse_device
from .results import DEFAULT_OUT, Row, results_path, write_csv

# Errors a run reports as one line (bad files, missing folders, a backend that cannot run, out of
# memory); anything else is a bug and keeps its traceback.
RUN_ERRORS = (OSError, RuntimeError, ValueError, MemoryError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``prog: error: message (see prog --help)``, exit 2.
    Sub-command parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def device_arg(text: str) -> torch.device:
    """argparse type: a device that can run here (``cpu``, ``cuda``, ``cuda:N``)."""
    try:
        return parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        type=device_arg,
        default=default_device(),
        help=f"cpu or cuda[:N] (default {default_device()})",
    )


def add_dtype_argument(p: argparse.ArgumentParser, *, default: str | None = "fp32", multiple: bool = False):
    name, kwargs = ("--dtypes", {"nargs": "+"}) if multiple else ("--dtype", {})
    p.add_argument(name, choices=sorted(DTYPES), default=default, **kwargs)


def add_out_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for the results CSV <hardware>-<benchmark>.csv (default ./{DEFAULT_OUT}); "
        "results are appended",
    )


def check_out_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    """Reject an ``--out`` that exists and is not a folder (before any work is done)."""
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {str(out)!r} exists and is not a folder")


def check_attention_backend(
    name: str, *, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, packed: bool = True
) -> str:
    """The backend ``name`` resolves to for a q of ``(*, heads, head_dim)`` at ``dtype`` on ``device``;
    ``ValueError`` saying why when it is unknown, cannot run there, or (``packed``) is the baseline."""
    from ..ops import resolve_backend

    if packed and name == "padded":
        raise ValueError("'padded' is the baseline, which always runs; choose a packed backend (or auto)")
    probe = torch.empty(1, heads, head_dim, dtype=dtype, device=device)
    try:
        return resolve_backend("attention", name, probe).name
    except (RuntimeError, ValueError) as e:
        raise ValueError(str(e)) from None


def write_results(out: Path, benchmark: str, rows: Sequence[Row], *, device="cpu", echo=print) -> Path:
    """Append ``rows`` to ``<out>/<hardware>-<benchmark>.csv``, say where, return the path."""
    path = write_csv(results_path(out, benchmark, device), rows, device=device)
    echo(f"results appended to {path.resolve()}")
    return path


def run_guarded(prog: str, fn: Callable[[], int | None]) -> int:
    """``fn()``'s exit status; a run error (see :data:`RUN_ERRORS`) is printed as one line on stderr
    and gives 1, an interrupt gives 130."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except RUN_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1


__all__ = [
    "RUN_ERRORS",
    "ArgumentParser",
    "add_device_argument",
    "add_dtype_argument",
    "add_out_argument",
    "check_attention_backend",
    "check_out_dir",
    "device_arg",
    "nonneg_int",
    "positive_int",
    "run_guarded",
    "write_results",
]
