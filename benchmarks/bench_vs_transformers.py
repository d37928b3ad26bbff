"""nativevit vs transformers' Qwen2-VL vision tower: same random weights, same images, one run.

transformers runs ``Qwen2VisionTransformerPretrainedModel`` with ``attn_implementation="sdpa"`` (its
per-segment SDPA loop); nativevit runs its packed encoder (``nativevit.bench.encoder``). Reported:
tokens/s of each, their ratio, and each one's fraction of the ``torch.mm`` roofline at that dtype.

    python benchmarks/bench_vs_transformers.py                    # fp32 + bf16, seed set, depth 2
    python benchmarks/bench_vs_transformers.py --depth 32 --iters 3 --out benchmarks/results
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
from nativevit.bench.encoder import DEFAULT_MAX_PIXELS, EncoderRun, run_encoder
from nativevit.bench.images import IMAGE_SETS


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=positive_int, default=2)
    add_dtype_argument(p, default=["fp32", "bf16"], multiple=True)
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=["seed"])
    p.add_argument("--backend", default="auto", help="attention backend of nativevit")
    p.add_argument("--padded", action="store_true", help="also time nativevit's padded baseline")
    p.add_argument("--iters", type=positive_int, default=3, help="interleaved timed rounds; medians reported")
    p.add_argument("--warmup", type=nonneg_int, default=0)
    add_device_argument(p)
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    modes = ("packed", "padded", "transformers") if args.padded else ("packed", "transformers")

    def work():
        rows = []
        for dtype in args.dtypes:
            run = EncoderRun(
                depth=args.depth,
                dtype=dtype,
                device=str(args.device),
                backend=args.backend,
                sets=[(s, s, DEFAULT_MAX_PIXELS) for s in args.sets],
                modes=modes,
                warmup=args.warmup,
                iters=args.iters,
            )
            rows += run_encoder(run, benchmark="vs_transformers", title="bench_vs_transformers")
        write_results(args.out, "vs_transformers", rows, device=args.device)

    return run_guarded("bench_vs_transformers", work)


if __name__ == "__main__":
    sys.exit(main())
