"""Plots from results CSVs (``nativevit.bench.plot``): each ``<hardware>-encoder.csv`` under
``--results`` gets a ``.png`` beside it (the newest run of each case wins).

    python benchmarks/plot_results.py                                 # ./nativevit-results
    python benchmarks/plot_results.py --results benchmarks/results    # the committed results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nativevit.bench.args import ArgumentParser, run_guarded
from nativevit.bench.plot import plot_encoder
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
        paths = sorted(args.results.glob("*-encoder.csv"))
        if not paths:
            raise ValueError(f"no *-encoder.csv in {args.results}")
        for path in paths:
            print("wrote", plot_encoder(path))

    return run_guarded("plot_results", work)


if __name__ == "__main__":
    sys.exit(main())
