"""Command line: ``nativevit bench | profile | tokens``."""

from __future__ import annotations

import argparse
import sys


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .benchmark import add_bench_arguments, run_bench

    p = sub.add_parser("bench", help="packed vs padded encoder on a built-in mixed-resolution image set")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nativevit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
