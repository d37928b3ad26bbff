"""Padding left by each way of batching variable-length images (``nativevit.bench.packing``).

Token counts (patch tokens of each image's grid, ``ImageProcessor().grid_for``) of every built-in image
set, their union, and a synthetic mix of ``--mix-items`` items drawn from the union with a fixed seed,
batched three ways:

* ``budget N``: ``nv.packing.pack_by_budget(lengths, N)``, every batch padded to N (static shapes,
  e.g. CUDA graphs): padding = 1 - real tokens / (batches * N);
* ``bucket k``: sorted by length, k per batch, each batch padded to its longest item;
* ``fixed k``: dataset order, k per batch, padded to the batch's longest (a padded ViT's batches).

No model runs: counting only, seconds on any machine.

    python benchmarks/bench_packing.py
    python benchmarks/bench_packing.py --budgets 4096 16384 --batch-sizes 2 8 --mix-items 100000
    python benchmarks/bench_packing.py --markdown --out benchmarks/results

Appends to ``<out>/<hardware>-packing.csv`` and writes ``<hardware>-packing.png`` beside it.
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
from nativevit.bench.packing import BATCH_SIZES, BUDGETS, MIX_ITEMS, MIX_SEED, run_packing, table


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", type=positive_int, default=list(BUDGETS), help="token budgets")
    p.add_argument(
        "--batch-sizes", nargs="+", type=positive_int, default=list(BATCH_SIZES), help="k of bucket and fixed"
    )
    p.add_argument(
        "--mix-items", type=nonneg_int, default=MIX_ITEMS, help="items of the synthetic mix (0: none)"
    )
    p.add_argument("--seed", type=int, default=MIX_SEED, help="seed of the synthetic mix")
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=28 * 28 * 1280,
        help="processor max_pixels (default 1280 tokens)",
    )
    p.add_argument("--markdown", action="store_true", help="also print the table in markdown")
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)

    def work():
        from nativevit.bench.plot import plot_packing

        rows, results = run_packing(
            max_pixels=args.max_pixels,
            budgets=list(dict.fromkeys(args.budgets)),
            batch_sizes=list(dict.fromkeys(args.batch_sizes)),
            mix_items=args.mix_items,
            seed=args.seed,
        )
        if args.markdown:
            print()
            print("\n".join(table(results, markdown=True)))
        print()
        path = write_results(args.out, "packing", rows)
        print("plot written to", plot_packing(path).resolve())

    return run_guarded("bench_packing", work)


if __name__ == "__main__":
    sys.exit(main())
