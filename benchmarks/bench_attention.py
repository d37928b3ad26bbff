"""Varlen attention per backend: forward and backward TFLOP/s, GB/s and the fraction of the torch.mm peak.

Every backend of ``nv.ops.available_backends(device)["attention"]`` (torch, padded, triton, cpu, cuda,
flash_attn, whichever can run here; the others are listed with the reason) on:

* a seq-length sweep: batches of equal segments of length L, ``--total`` tokens each;
* the mixed batch (2304, 1220, 980, 400, 400, 20 tokens), 16 heads, head dim 80.

FLOPs (FlashAttention's convention, non-causal, useful work only -- the padded baseline is credited
with the same FLOPs, so its lower TFLOP/s is the cost of its padding):
forward ``4 * sum(L_i^2) * heads * head_dim`` (QK^T and PV, 2 FLOP per multiply-add), backward 2.5x
that (dV, dP, dS->dQ, dS->dK, plus the recomputed QK^T). Bytes: the compulsory HBM traffic of a fused
kernel, forward ``q, k, v`` read + ``out`` written (+ fp32 lse), backward ``q, k, v, out, dout`` read
+ ``dq, dk, dv`` written (+ lse read). The roofline fraction is against ``torch.mm`` at the same
dtype, measured in the same run.

    python benchmarks/bench_attention.py                     # CUDA: bf16, 16k tokens per batch
    python benchmarks/bench_attention.py --quick             # CPU-sized (what runs without a GPU)
    python benchmarks/bench_attention.py --dtype fp16 --head-dim 128 --no-backward
"""

from __future__ import annotations

import argparse

import torch

import nativevit as nv
from nativevit import benchutil

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED = (2304, 1220, 980, 400, 400, 20)
BWD_FLOP_FACTOR = 2.5


def attention_flops(lengths, heads: int, head_dim: int) -> float:
    """Forward FLOPs of block-diagonal attention: ``4 * sum(L^2) * heads * head_dim``."""
    return 4.0 * sum(n * n for n in lengths) * heads * head_dim


def attention_bytes(total: int, heads: int, head_dim: int, elem: int, *, backward: bool) -> float:
    """Compulsory traffic: fwd reads q,k,v and writes out (+ fp32 lse); bwd reads q,k,v,out,dout,lse
    and writes dq,dk,dv."""
    tensor = total * heads * head_dim * elem
    lse = total * heads * 4
    return (8 * tensor + lse) if backward else (4 * tensor + lse)


def row(benchmark, backend, dtype_name, shape, metric, value, unit) -> dict:
    """One CSV row in the shared schema of ``nativevit.benchutil``."""
    return {"benchmark": benchmark, "backend": backend, "dtype": dtype_name, "shape": shape,
            "metric": metric, "value": f"{value:.6g}", "unit": unit}  # fmt: skip


def segments_for(lengths, device) -> nv.Segments:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return nv.Segments.from_cu_seqlens(cu, sum(lengths))


def bench_case(label, lengths, backends, *, heads, head_dim, dtype, device, backward, warmup, iters, peak):
    total = sum(lengths)
    segments = segments_for(lengths, device)
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    q, k, v = qkv.unbind(1)  # strided views of one fused buffer, as in the encoder
    dout = torch.randn(total, heads, head_dim, device=device, dtype=dtype)
    fwd_flops = attention_flops(lengths, heads, head_dim)
    elem = torch.finfo(dtype).bits // 8
    shape = f"H{heads}xD{head_dim};{label}"
    dtype_name = str(dtype).split(".")[-1]
    rows, lines = [], []
    for name in backends:

        def fwd(name=name):
            return nv.ops.varlen_attention(q, k, v, segments, backend=name)

        try:
            nv.ops.resolve_backend("attention", name, q)
        except RuntimeError as e:  # a backend that cannot take this dtype/head dim says why
            lines.append(f"  {name:>10}: skipped ({e})")
            continue
        with torch.no_grad():
            seconds = {"fwd": benchutil.time_fn(fwd, warmup=warmup, iters=iters, device=device)}
        if backward:
            out = fwd()
            seconds["bwd"] = benchutil.time_fn(
                lambda out=out: torch.autograd.grad(out, qkv, dout, retain_graph=True),
                warmup=warmup, iters=iters, device=device,
            )  # fmt: skip
        parts = []
        for phase, s in seconds.items():
            flop = fwd_flops * (BWD_FLOP_FACTOR if phase == "bwd" else 1.0)
            nbytes = attention_bytes(total, heads, head_dim, elem, backward=phase == "bwd")
            metrics = {
                f"{phase}_ms": (s * 1e3, "ms"),
                f"{phase}_tflops": (flop / s / 1e12, "TFLOP/s"),
                f"{phase}_gbps": (nbytes / s / 1e9, "GB/s"),
                f"{phase}_mm_fraction": (flop / s / peak, ""),
            }
            rows += [
                row("attention", name, dtype_name, shape, m, val, unit)
                for m, (val, unit) in metrics.items()
            ]  # fmt: skip
            parts.append(
                f"{phase} {s * 1e3:9.3f} ms {flop / s / 1e12:8.4f} TFLOP/s {nbytes / s / 1e9:8.2f} GB/s "
                f"{100 * flop / s / peak:6.2f}% of mm"
            )
        lines.append(f"  {name:>10}: " + " | ".join(parts))
    padded_work = len(lengths) * max(lengths) ** 2 / sum(n * n for n in lengths)
    print(
        f"[{label}] {total} tokens, {len(lengths)} segments, padded/packed attention work {padded_work:.2f}x"
    )
    print("\n".join(lines))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument(
        "--total", type=int, default=None, help="tokens per batch in the sweep (16384; --quick 1024)"
    )
    p.add_argument("--seqlens", nargs="*", type=int, default=None,
                   help="segment lengths of the sweep (256 ... 16384; --quick 64 256 1024)")  # fmt: skip
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed batch")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--backends", nargs="*", default=None, help="default: every backend available here")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (2; --quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls, median reported (10; --quick 1)")
    p.add_argument("--quick", action="store_true", help="CPU-sized defaults: 1024-token sweep, 1 timed call")
    args = p.parse_args()
    defaults = (
        (1024, [64, 256, 1024], 1, 1)
        if args.quick
        else (16384, [256, 512, 1024, 2048, 4096, 8192, 16384], 2, 10)
    )
    for name, value in zip(("total", "seqlens", "warmup", "iters"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    available = nv.ops.available_backends(device)["attention"]
    for name in sorted(nv.ops._BACKENDS["attention"]):
        if name not in available:
            print(
                f"  {name:>10}: unavailable ({nv.ops._BACKENDS['attention'][name].unavailable(device.type)})"
            )
    backends = args.backends if args.backends is not None else available
    peak = benchutil.mm_peak_flops(dtype, device)
    print(f"torch.mm peak at {dtype}: {peak / 1e12:.4f} TFLOP/s on {benchutil.hardware_name(device)}")
    dtype_name = str(dtype).split(".")[-1]
    rows = [row("mm_peak", "torch.mm", dtype_name, "2048^3", "tflops", peak / 1e12, "TFLOP/s")]
    cases = [(f"L={n}x{max(1, args.total // n)}", [n] * max(1, args.total // n)) for n in args.seqlens]
    if not args.no_mixed:
        cases.append(("mixed=" + "+".join(map(str, MIXED)), list(MIXED)))
    for label, lengths in cases:
        rows += bench_case(
            label, lengths, backends, heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=device,
            backward=not args.no_backward, warmup=args.warmup, iters=args.iters, peak=peak,
        )  # fmt: skip
    path = benchutil.append_csv(benchutil.results_path("attention", device), rows)
    print(f"results appended to {path}")


if __name__ == "__main__":
    main()
