"""``nativevit encode`` end to end: items/s, tokens/s, and where the time goes (decode + preprocess in the
``DataLoader`` workers vs the encoder), on the built-in image sets written as JPEG files.

Each run is the real command (``nativevit.encode.main``) on a folder holding ``--copies`` copies of every
image of the chosen sets; its ``summary.json`` gives the numbers. ``decode_s`` is the time spent decoding
and preprocessing (summed over batches, in whichever process ran them), ``encoder_s`` the encoder's
forward passes, ``wait_s`` the time the encoder waited for a batch, ``busy`` = encoder_s / loop time.
With ``--workers 0`` decoding and encoding take turns, so ``decode_s`` and ``encoder_s`` split the loop.

    python benchmarks/bench_encode.py                                   # qwen2_vl_shallow, workers 0 and 1
    python benchmarks/bench_encode.py --preset qwen2_vl --dtype bf16 --device cuda --workers 0 8 --copies 20
    python benchmarks/bench_encode.py --out benchmarks/results          # append <hardware>-encode.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import PIL.Image

from nativevit.bench.args import (
    ArgumentParser,
    add_device_argument,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from nativevit.bench.images import IMAGE_SETS, synthetic_image
from nativevit.bench.results import Row, shape
from nativevit.encode import main as encode_main
from nativevit.encode.command import DTYPES, preset_names

STILL_SETS = tuple(name for name in IMAGE_SETS if name != "video")


def write_images(root: Path, sets: list[str], copies: int) -> int:
    """The sets' images as JPEG files under ``root`` (``copies`` of each, distinct pixels); their count."""
    n = 0
    for name in sets:
        for i, (w, h) in enumerate(IMAGE_SETS[name]):
            for c in range(copies):
                folder = root / name
                folder.mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(synthetic_image(w, h, seed=1000 * c + i)).save(
                    folder / f"{c}-{i}.jpg", quality=90
                )
                n += 1
    return n


def run_once(images: Path, out: Path, args: argparse.Namespace, workers: int) -> dict:
    argv = [str(images), "--out", str(out), "--preset", args.preset, "--dtype", args.dtype]
    argv += ["--device", str(args.device), "--backend", args.backend, "--max-pixels", str(args.max_pixels)]
    argv += ["--max-tokens", str(args.max_tokens), "--workers", str(workers), "--overwrite", "--quiet"]
    code = encode_main(argv)
    if code != 0:
        raise RuntimeError(f"nativevit encode exited with status {code}")
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=preset_names(), default="qwen2_vl_shallow", help="random-weight tower")
    p.add_argument("--sets", nargs="+", choices=STILL_SETS, default=list(STILL_SETS), help="image sets")
    p.add_argument("--copies", type=positive_int, default=2, help="copies of every image (default 2)")
    p.add_argument("--workers", nargs="+", type=nonneg_int, default=[0, 1], help="worker counts to compare")
    p.add_argument("--max-pixels", type=positive_int, default=28 * 28 * 256, help="processor max_pixels")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="token budget per batch")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto")
    add_device_argument(p)
    p.add_argument(
        "--out", type=Path, help="append rows to <out>/<hardware>-encode.csv (default: print only)"
    )
    args = p.parse_args(argv)

    def work():
        rows = []
        with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
            images = Path(tmp) / "images"
            t = time.perf_counter()
            n = write_images(images, args.sets, args.copies)
            print(
                f"{n} JPEG images of sets {', '.join(args.sets)} written in {time.perf_counter() - t:.1f} s"
            )
            print(
                f"{args.preset}, {args.dtype}, {args.device}, max_pixels {args.max_pixels}, "
                f"budget {args.max_tokens} tokens"
            )
            head = "workers  items  items/s  tokens/s  decode_s  encoder_s  wait_s  write_s  busy  padding"
            print(head)
            for workers in args.workers:
                s = run_once(images, Path(tmp) / f"out-{workers}", args, workers)
                t = s["time"]
                busy = t["encoder_s"] / s["seconds"] if s["seconds"] else 0.0
                print(
                    f"{workers:>7}  {s['items']:>5}  {s['items_per_s']:>7.2f}  {s['tokens_per_s']:>8.0f}  "
                    f"{t['decode_s']:>8.2f}  {t['encoder_s']:>9.2f}  {t['wait_s']:>6.2f}  "
                    f"{t['write_s']:>7.2f}  {busy:>4.0%}  {s['padding']:>7.1%}"
                )
                where = shape(
                    sets="+".join(args.sets),
                    preset=args.preset,
                    workers=workers,
                    max_pixels=args.max_pixels,
                    max_tokens=args.max_tokens,
                )
                backend = f"encode:{s['backend']}"
                for metric, value, unit in (
                    ("items_per_s", s["items_per_s"], "items/s"),
                    ("tokens_per_s", s["tokens_per_s"], "tokens/s"),
                    ("decode_s", t["decode_s"], "s"),
                    ("encoder_s", t["encoder_s"], "s"),
                    ("wait_s", t["wait_s"], "s"),
                    ("encoder_busy", busy, "fraction"),
                    ("padding", s["padding"], "fraction"),
                ):
                    rows.append(Row("encode", backend, args.dtype, where, metric, float(value), unit))
        if args.out is not None:
            write_results(args.out, "encode", rows, device=args.device)

    return run_guarded("bench_encode", work)


if __name__ == "__main__":
    sys.exit(main())
