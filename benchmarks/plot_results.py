"""Plots from results CSVs (``nativevit.bench.plot``): every ``<hardware>-encoder.csv``,
``-strategies.csv``, ``-packing.csv`` and ``-kernels.csv`` under ``--results`` gets a ``.png`` beside
it (the newest run of each case wins).

    python benchmarks/plot_results.py                                 # ./nativevit-results
    python benchmarks/plot_results.py --results benchmarks/results    # the committed results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nativevit.bench.args import ArgumentParser, run_guarded
from nativevit.bench.plot import PLOTS, plot_folder
from nativevit.bench.results import DEFAULT_OUT


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder of results CSVs (default ./{DEFAULT_OUT})",
    )
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"argument --results: no folder {str(args.results)!r}")

    def work():
        written, skipped = plot_folder(args.results)
        for why in skipped:
            print("skipped:", why)
        if not written:
            raise ValueError(
                f"no results CSV with a plot ({', '.join('*' + s for s in PLOTS)}) in {args.results}"
            )
        for path in written:
            print("wrote", path)

    return run_guarded("plot_results", work)


if __name__ == "__main__":
    sys.exit(main())
