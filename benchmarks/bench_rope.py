"""Fused 2D RoPE per backend: forward and backward GB/s and GFLOP/s.

Every backend of ``nv.ops.available_backends(device)["rope"]`` (torch, triton, cpu, cuda, whichever
can run here; the others are listed with the reason) rotates q and k taken as strided views of one
fused qkv buffer, as in the encoder, over a token-count sweep and the mixed batch
(2304, 1220, 980, 400, 400, 20 tokens), 16 heads, head dim 80.

The op is memory-bound, so GB/s is the number to read. Bytes (compulsory traffic of a fused kernel):
q and k read and written, ``4 * total * heads * head_dim * elem``, plus the fp32 cos and sin tables,
``2 * total * head_dim/2 * 4``. FLOPs: 3 per output element (two multiplies, one add),
``6 * total * heads * head_dim`` for q and k. The backward (the inverse rotation) moves the same bytes.
The roofline fraction of the FLOPs against ``torch.mm`` at the same dtype is reported for the schema's
sake; for this op it is tiny by nature.

    python benchmarks/bench_rope.py              # CUDA: bf16, 1k .. 64k tokens
    python benchmarks/bench_rope.py --quick      # CPU-sized
"""

from __future__ import annotations

import argparse

import torch

import nativevit as nv
from nativevit import benchutil

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED = (2304, 1220, 980, 400, 400, 20)


def rope_bytes(total: int, heads: int, head_dim: int, elem: int) -> float:
    """q and k read + written, cos and sin (fp32, ``head_dim/2`` each) read once."""
    return 4 * total * heads * head_dim * elem + 2 * total * (head_dim // 2) * 4


def rope_flops(total: int, heads: int, head_dim: int) -> float:
    """3 FLOP per rotated element (x1*c - x2*s), q and k."""
    return 6 * total * heads * head_dim


def row(benchmark, backend, dtype_name, shape, metric, value, unit) -> dict:
    """One CSV row in the shared schema of ``nativevit.benchutil``."""
    return {"benchmark": benchmark, "backend": backend, "dtype": dtype_name, "shape": shape,
            "metric": metric, "value": f"{value:.6g}", "unit": unit}  # fmt: skip


def tables(total: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of a 2D grid covering ``total`` tokens (the values do not change the speed)."""
    angles = torch.rand(total, head_dim // 2, device=device) * 100
    return angles.cos(), angles.sin()


def bench_case(label, total, backends, *, heads, head_dim, dtype, device, warmup, iters, peak):
    cos, sin = tables(total, head_dim, device)
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    q, k, _ = qkv.unbind(1)  # strided views of one fused buffer, as in the encoder
    grads = (torch.randn(total, heads, head_dim, device=device, dtype=dtype),) * 2
    elem = torch.finfo(dtype).bits // 8
    nbytes, flop = rope_bytes(total, heads, head_dim, elem), rope_flops(total, heads, head_dim)
    dtype_name = str(dtype).split(".")[-1]
    shape = f"H{heads}xD{head_dim};{label}"
    rows, lines = [], []
    for name in backends:
        try:
            nv.ops.resolve_backend("rope", name, q)
        except RuntimeError as e:  # a backend that cannot take this dtype/head dim says why
            lines.append(f"  {name:>8}: skipped ({e})")
            continue

        def fwd(name=name):
            return nv.ops.apply_rope_2d(q, k, cos, sin, backend=name)

        with torch.no_grad():
            seconds = {"fwd": benchutil.time_fn(fwd, warmup=warmup, iters=iters, device=device)}
        outs = fwd()
        seconds["bwd"] = benchutil.time_fn(
            lambda outs=outs: torch.autograd.grad(outs, qkv, grads, retain_graph=True),
            warmup=warmup, iters=iters, device=device,
        )  # fmt: skip
        parts = []
        for phase, s in seconds.items():
            metrics = {
                f"{phase}_ms": (s * 1e3, "ms"),
                f"{phase}_gbps": (nbytes / s / 1e9, "GB/s"),
                f"{phase}_gflops": (flop / s / 1e9, "GFLOP/s"),
                f"{phase}_mm_fraction": (flop / s / peak, ""),
            }
            rows += [row("rope", name, dtype_name, shape, m, val, unit) for m, (val, unit) in metrics.items()]
            parts.append(
                f"{phase} {s * 1e3:9.3f} ms {nbytes / s / 1e9:8.2f} GB/s {flop / s / 1e9:8.2f} GFLOP/s"
            )
        lines.append(f"  {name:>8}: " + " | ".join(parts))
    print(f"[{label}] {total} tokens, {heads} heads, head dim {head_dim}")
    print("\n".join(lines))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument(
        "--totals", nargs="*", type=int, default=None, help="token counts (1k..64k; --quick 1k, 4k)"
    )
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed batch")
    p.add_argument("--backends", nargs="*", default=None, help="default: every backend available here")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (3; --quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls, median reported (20; --quick 3)")
    p.add_argument("--quick", action="store_true", help="CPU-sized defaults")
    args = p.parse_args()
    defaults = ([1024, 4096], 1, 3) if args.quick else ([1024, 4096, 16384, 65536], 3, 20)
    for name, value in zip(("totals", "warmup", "iters"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    available = nv.ops.available_backends(device)["rope"]
    for name, backend in sorted(nv.ops._BACKENDS["rope"].items()):
        if name not in available:
            print(f"  {name:>8}: unavailable ({backend.unavailable(device.type)})")
    backends = args.backends if args.backends is not None else available
    peak = benchutil.mm_peak_flops(dtype, device)
    print(f"torch.mm peak at {dtype}: {peak / 1e12:.4f} TFLOP/s on {benchutil.hardware_name(device)}")
    dtype_name = str(dtype).split(".")[-1]
    rows = [row("mm_peak", "torch.mm", dtype_name, "2048^3", "tflops", peak / 1e12, "TFLOP/s")]
    cases = [(f"total={n}", n) for n in args.totals]
    if not args.no_mixed:
        cases.append(("mixed=" + "+".join(map(str, MIXED)), sum(MIXED)))
    for label, total in cases:
        rows += bench_case(
            label, total, backends, heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=device,
            warmup=args.warmup, iters=args.iters, peak=peak,
        )  # fmt: skip
    path = benchutil.append_csv(benchutil.results_path("rope", device), rows)
    print(f"results appended to {path}")


if __name__ == "__main__":
    main()
