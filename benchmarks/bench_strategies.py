"""Encoder cost of each resolution strategy on the seed image sizes (``nativevit.bench.strategies``).

For every strategy of ``nativevit.strategies`` and every seed size (128x16, 336x336, 1000x600,
1920x1080, 1500x4500, 4000x3000): views, language-model tokens, encoder patches and forward FLOPs of
the packed Qwen2-VL encoder, and its measured forward time with the Qwen2-VL widths at ``--depth``
blocks, all views of an image in one packed batch, each distinct geometry timed once, all of them in
interleaved rounds; the roofline is ``torch.mm`` at the same dtype, measured in the same run.

    python benchmarks/bench_strategies.py                      # all strategies, fp32, 4 blocks
    python benchmarks/bench_strategies.py --dtype bf16 --iters 3 --strategies internvl qwen2_vl
    python benchmarks/bench_strategies.py --no-time             # counts and FLOPs only, no encoder runs
    python benchmarks/bench_strategies.py --out benchmarks/results   # update the committed results

Appends to ``<out>/<hardware>-strategies.csv`` and writes ``<hardware>-strategies.png`` beside it.
"""

from __future__ import annotations

import argparse
import sys

from nativevit import strategies
from nativevit.bench.args import (
    ArgumentParser,
    add_device_argument,
    add_dtype_argument,
    add_out_argument,
    check_attention_backend,
    check_out_dir,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from nativevit.bench.encoder import model_config
from nativevit.bench.env import DTYPES
from nativevit.bench.strategies import DEFAULT_DEPTH, StrategiesRun, run_strategies


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=strategies.NAMES, default=list(strategies.NAMES))
    p.add_argument("--depth", type=positive_int, default=DEFAULT_DEPTH, help="blocks of the tower")
    add_dtype_argument(p)
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument("--warmup", type=nonneg_int, default=0, help="untimed rounds (one warm-up call always)")
    p.add_argument("--iters", type=positive_int, default=1, help="timed rounds, geometries interleaved")
    p.add_argument("--no-time", action="store_true", help="skip the encoder runs: counts and FLOPs only")
    add_device_argument(p)
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    if not args.no_time:
        cfg = model_config("qwen2_vl", args.depth)
        try:
            check_attention_backend(
                args.backend,
                device=args.device,
                dtype=DTYPES[args.dtype],
                heads=cfg.num_heads,
                head_dim=cfg.head_dim,
            )
        except ValueError as e:
            p.error(f"argument --backend: {e}")
    run = StrategiesRun(
        strategies=list(dict.fromkeys(args.strategies)),
        depth=args.depth,
        dtype=args.dtype,
        device=str(args.device),
        backend=args.backend,
        warmup=args.warmup,
        iters=args.iters,
        time=not args.no_time,
    )

    def work():
        from nativevit.bench.plot import plot_strategies

        path = write_results(args.out, "strategies", run_strategies(run), device=args.device)
        print("plot written to", plot_strategies(path).resolve())

    return run_guarded("bench_strategies", work)


if __name__ == "__main__":
    sys.exit(main())
