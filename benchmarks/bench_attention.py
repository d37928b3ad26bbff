"""Varlen attention per backend: forward and backward GFLOP/s, GB/s and the fraction of the torch.mm peak.

Every backend of ``varlen_attention`` that can run on the device (the others are listed with the
reason) on a seq-length sweep (batches of equal segments of length L, ``--total`` tokens each) and the
mixed batch (``nativevit.bench.images.KERNEL_MIX``); 16 heads of 80 by default. FLOPs and bytes:
``nativevit.bench.flops.attention_flops`` / ``attention_bytes`` (useful work only: the padded backend
is credited with the same FLOPs, so its lower rate is the cost of its padding).

    python benchmarks/bench_attention.py                     # CUDA: bf16, 16k tokens per batch
    python benchmarks/bench_attention.py --quick             # CPU-sized (what runs without a GPU)
    python benchmarks/bench_attention.py --dtype fp16 --head-dim 128 --no-backward
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
from nativevit.bench.kernels import run_kernel_script, sweep_cases

FULL = {"total": 16384, "seqlens": [256, 512, 1024, 2048, 4096, 8192, 16384], "warmup": 2, "iters": 10}
QUICK = {"total": 1024, "seqlens": [64, 256, 1024], "warmup": 1, "iters": 1}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(p)
    add_dtype_argument(p, default=None)
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument("--head-dim", type=positive_int, default=80)
    p.add_argument("--total", type=positive_int, help="tokens per batch in the sweep (16384; --quick 1024)")
    p.add_argument(
        "--seqlens",
        nargs="*",
        type=positive_int,
        help="segment lengths of the sweep (256 ... 16384; --quick 64 256 1024)",
    )
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed batch")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--backends", nargs="*", help="default: every backend that can run on the device")
    p.add_argument("--warmup", type=nonneg_int, help="untimed rounds (2; --quick 1)")
    p.add_argument("--iters", type=positive_int, help="timed rounds, backends interleaved (10; --quick 1)")
    p.add_argument("--quick", action="store_true", help="CPU-sized defaults: 1024-token sweep, 1 timed round")
    add_out_argument(p)
    return run_kernel_script(
        "attention", p, argv, quick=QUICK, full=FULL, cases=lambda o: sweep_cases(o["seqlens"], o["total"])
    )


if __name__ == "__main__":
    sys.exit(main())
