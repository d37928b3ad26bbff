"""Whole encoder, packed vs padded: every image set, fp32 and bf16, plus a token-budget sweep.

Same weights, same images, same dtype, one process (``nativevit.bench.encoder``). Per mode: latency,
tokens/s, peak memory, padding fraction; per set: the work ratio (padded / packed FLOPs from the FLOP
model) next to the measured packed/padded speedup.

    python benchmarks/bench_encoder.py                                # all sets, fp32 + bf16, depth 2
    python benchmarks/bench_encoder.py --depth 32 --dtypes bf16 --sets seed
    python benchmarks/bench_encoder.py --out benchmarks/results       # update the committed results
    python benchmarks/plot_results.py --results benchmarks/results    # plots from the CSV
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
from nativevit.bench.encoder import DEFAULT_MAX_PIXELS, MODELS, EncoderRun, run_encoder
from nativevit.bench.images import IMAGE_SETS

# max merged tokens per image (max_pixels = budget * 28 * 28) of the seed-set sweep
SWEEP_BUDGETS = (256, 512, 1024, 2048)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="qwen2_vl")
    p.add_argument("--depth", type=positive_int, default=2)
    add_dtype_argument(p, default=["fp32", "bf16"], multiple=True)
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=list(IMAGE_SETS))
    p.add_argument(
        "--sweep",
        nargs="*",
        type=positive_int,
        default=list(SWEEP_BUDGETS),
        help="merged tokens per image of the seed-set sweep; none to skip",
    )
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode")
    p.add_argument("--warmup", type=nonneg_int, default=0)
    p.add_argument("--iters", type=positive_int, default=1)
    add_device_argument(p)
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)

    sets = [(name, name, DEFAULT_MAX_PIXELS) for name in args.sets]
    sets += [(f"seed@{b}tok", "seed", 28 * 28 * b) for b in args.sweep]

    def work():
        rows = []
        for dtype in args.dtypes:
            run = EncoderRun(
                model=args.model,
                depth=args.depth,
                dtype=dtype,
                device=str(args.device),
                backend=args.backend,
                sets=sets,
                warmup=args.warmup,
                iters=args.iters,
            )
            rows += run_encoder(run, benchmark="encoder", title="bench_encoder")
        write_results(args.out, "encoder", rows, device=args.device)

    return run_guarded("bench_encoder", work)


if __name__ == "__main__":
    sys.exit(main())
