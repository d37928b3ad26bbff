"""Qwen2.5-VL window attention: windowed vs all-full layers, packed vs padded, on built-in image sets.

One attention layer (frame segments vs window segments, packed backend vs padded) and the whole
tower at ``--depth`` blocks (windowed vs the same weights with full attention, packed vs
``layout="padded"``); see ``nativevit.bench.window``. Work next to every time, so a speedup can be
read against its work ratio; wall, minimum and process CPU time are reported.

    python benchmarks/bench_window.py                         # seed set, depth 4, fp32
    python benchmarks/bench_window.py --sets documents --depth 8 --iters 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys

from nativevit.bench.args import (
    ArgumentParser,
    add_device_argument,
    add_dtype_argument,
    add_out_argument,
    check_out_dir,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from nativevit.bench.encoder import DEFAULT_MAX_PIXELS
from nativevit.bench.images import IMAGE_SETS
from nativevit.bench.window import LAYOUTS, WindowRun, run_window


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=["seed"])
    p.add_argument(
        "--depth", type=nonneg_int, default=4, help="encoder blocks (all windowed but the last); 0 skips"
    )
    add_dtype_argument(p)
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="processor max_pixels")
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed rounds of the attention cases")
    p.add_argument("--iters", type=positive_int, default=5, help="timed rounds of the attention cases")
    p.add_argument("--encoder-iters", type=positive_int, default=1, help="timed rounds of the encoder cases")
    p.add_argument("--encoder-modes", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True, help="attention level")
    add_device_argument(p)
    add_out_argument(p)
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV")
    args = p.parse_args(argv)
    if not args.no_csv:
        check_out_dir(p, args.out)
    run = WindowRun(
        sets=args.sets,
        depth=args.depth,
        dtype=args.dtype,
        device=str(args.device),
        backend=args.backend,
        max_pixels=args.max_pixels,
        attention=args.attention,
        warmup=args.warmup,
        iters=args.iters,
        encoder_iters=args.encoder_iters,
        encoder_layouts=args.encoder_modes,
    )

    def work():
        rows = run_window(run)
        if not args.no_csv:
            write_results(args.out, "window", rows, device=args.device)

    return run_guarded("bench_window", work)


if __name__ == "__main__":
    sys.exit(main())
