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
    nonneg_int,
    positive_int,
)
from nativevit.bench.kernels import run_kernel_script, total_cases

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
    return run_kernel_script(
        "rope", p, argv, quick=QUICK, full=FULL, cases=lambda o: total_cases(o["totals"])
    )


if __name__ == "__main__":
    sys.exit(main())
