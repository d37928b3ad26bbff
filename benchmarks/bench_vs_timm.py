"""nativevit packed vs timm NaFlexViT padded: same weights, same mixed-resolution images, on CPU.

timm's own NaFlex path (patchify, collate to the longest image, masked SDPA) against ``nv.from_timm``
on one packed batch; see ``nativevit.bench.vs_timm``. Reported: tokens/s, the work ratio padded/packed,
the matmul roofline fraction, and the peak memory of one call of each mode (each in a fresh process).

    python benchmarks/bench_vs_timm.py                      # ViT-B/16 NaFlex, 2 blocks, fp32 + bf16
    python benchmarks/bench_vs_timm.py --depth 12 --iters 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys

from nativevit.bench.args import (
    ArgumentParser,
    add_out_argument,
    check_out_dir,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from nativevit.bench.images import IMAGE_SETS
from nativevit.bench.vs_timm import DEFAULT_MODEL, TimmRun, run_vs_timm

DTYPES = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a timm NaFlexVit model name")
    p.add_argument(
        "--depth", type=positive_int, default=2, help="transformer blocks (ratios barely depend on it)"
    )
    p.add_argument(
        "--sets", nargs="+", choices=sorted(set(IMAGE_SETS) - {"video"}), default=["seed", "skewed"]
    )
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--max-seq-len", type=positive_int, default=1024, help="NaFlex patch budget per image")
    p.add_argument("--warmup", type=nonneg_int, default=0, help="untimed rounds after the first call")
    p.add_argument("--iters", type=positive_int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    run = TimmRun(
        model=args.model,
        depth=args.depth,
        sets=args.sets,
        dtypes=args.dtypes,
        max_seq_len=args.max_seq_len,
        warmup=args.warmup,
        iters=args.iters,
        memory=not args.no_memory,
    )

    def work():
        write_results(args.out, "vs_timm", run_vs_timm(run))

    return run_guarded("bench_vs_timm", work)


if __name__ == "__main__":
    sys.exit(main())
