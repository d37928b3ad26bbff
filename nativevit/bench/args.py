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


def add_out_argument(
    p: argparse.ArgumentParser, *, what: str = "the results CSV <hardware>-<benchmark>.csv"
) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for {what} (default ./{DEFAULT_OUT}); CSV rows are appended",
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


def add_model_arguments(p: argparse.ArgumentParser, *, default_depth: int) -> None:
    """``--model`` / ``--depth`` (a preset's widths at any depth) or ``--checkpoint DIR`` (a released or
    saved tower); read back with :func:`model_choice`."""
    from .encoder import MODELS

    p.add_argument(
        "--model",
        choices=MODELS,
        help="tower preset: a family's widths at --depth blocks (random weights), with its image processor; "
        "*tiny: the family's small test tower (default qwen2_vl)",
    )
    p.add_argument("--depth", type=positive_int, help=f"blocks of the preset (default {default_depth})")
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help="a checkpoint directory (as released, or from save_pretrained) instead of --model/--depth",
    )


def model_choice(p: argparse.ArgumentParser, args: argparse.Namespace, *, default_depth: int):
    """``(config, model name, depth, checkpoint or None)`` of :func:`add_model_arguments`'s options;
    a usage error (exit 2) for a checkpoint that is not one, or one combined with ``--model``/``--depth``."""
    from ..checkpoint import read_config
    from .encoder import model_config

    if args.checkpoint is not None:
        given = [
            name for name, value in (("--model", args.model), ("--depth", args.depth)) if value is not None
        ]
        if given:
            p.error(f"argument --checkpoint: the tower comes from the checkpoint; drop {' and '.join(given)}")
        if not args.checkpoint.is_dir():
            p.error(f"argument --checkpoint: no folder {str(args.checkpoint)!r}")
        try:
            cfg, _ = read_config(args.checkpoint)
        except (OSError, ValueError) as e:
            p.error(f"argument --checkpoint: {e}")
        return cfg, cfg.model_type, cfg.depth, args.checkpoint
    name = args.model or "qwen2_vl"
    depth = args.depth if args.depth is not None else default_depth
    return model_config(name, depth), name, depth, None


def add_images_argument(p: argparse.ArgumentParser, *, default: Sequence[str] | None) -> None:
    from .images import IMAGE_SETS

    shown = " ".join(default) if default else "none"
    p.add_argument(
        "--images",
        nargs="+",
        metavar="SET|DIR|FILE",
        help=f"built-in image sets ({', '.join(sorted(IMAGE_SETS))}), folders of images or image files "
        f"(default {shown})",
    )


def image_choice(p: argparse.ArgumentParser, items: Sequence[str]) -> list[tuple[str, list]]:
    """The input sets of ``--images`` items (see ``images.input_sets``); a usage error for a bad item."""
    from .images import input_sets

    try:
        return input_sets(items)
    except ValueError as e:
        p.error(f"argument --images: {e}")


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
    "add_images_argument",
    "add_model_arguments",
    "add_out_argument",
    "check_attention_backend",
    "check_out_dir",
    "device_arg",
    "image_choice",
    "model_choice",
    "nonneg_int",
    "positive_int",
    "run_guarded",
    "write_results",
]
