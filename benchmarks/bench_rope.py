"""Fused 2D RoPE per backend: forward and backward GB/s and GFLOP/s.

Every backend of ``apply_rope_2d`` that can run on the device (the others are listed with the reason)
rotates q and k taken as strided views of one fused qkv buffer, as in the encoder, over a token-count
sweep and the mixed batch (``nativevit.bench.images.KERNEL_MIX``), 16 heads of 80 by default. The op is
memory-bound, so GB/s is the number to read (``nativevit.bench.flops.rope_bytes``; FLOPs
``rope_flops``, whose roofline fraction is tiny by nature).

    python benchmarks/bench_rope.py              # CUDA: bf16, 1k .. 64k tokens
    python benchmarks/bench_rope.py --quick      # CPU-sized
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
from nativevit.bench.images import KERNEL_MIX
from nativevit.bench.kernels import KernelRun, check_impls, mix_case, run_kernels, total_cases

FULL = {"totals": [1024, 4096, 16384, 65536], "warmup": 3, "iters": 20}
QUICK = {"totals": [1024, 4096], "warmup": 1, "iters": 3}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(p)
    add_dtype_argument(p, default=None)
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--head-dim", type=positive_int, default=80)
    p.add_argument("--totals", nargs="*", type=positive_int, help="token counts (1k..64k; --quick 1k, 4k)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed batch")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--backends", nargs="*", help="default: every backend that can run on the device")
    p.add_argument("--warmup", type=nonneg_int, help="untimed rounds (3; --quick 1)")
    p.add_argument("--iters", type=positive_int, help="timed rounds, backends interleaved (20; --quick 3)")
    p.add_argument("--quick", action="store_true", help="CPU-sized defaults")
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    defaults = QUICK if args.quick else FULL
    opt = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    if args.backends is not None:
        try:
            check_impls("rope", args.backends, peers=False)
        except ValueError as e:
            p.error(f"argument --backends: {e}")
    cases = total_cases(opt["totals"]) + ([] if args.no_mixed else [mix_case(KERNEL_MIX)])
    run = KernelRun(
        "rope",
        device=str(args.device),
        dtype=args.dtype or ("bf16" if args.device.type == "cuda" else "fp32"),
        heads=args.heads,
        head_dim=args.head_dim,
        cases=cases,
        impls=args.backends,
        backward=not args.no_backward,
        warmup=opt["warmup"],
        iters=opt["iters"],
    )

    def work():
        write_results(args.out, "rope", run_kernels(run), device=args.device)

    return run_guarded("bench_rope", work)


if __name__ == "__main__":
    sys.exit(main())
