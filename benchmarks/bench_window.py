"""Qwen2.5-VL window attention: windowed vs all-full layers, packed vs padded, on one image set.

Two levels, same images, same dtype, one process:

* ``attention``: one attention layer (``nv.ops.varlen_attention``, Qwen2.5-VL's 16 heads of 80) over
  the batch's frame segments (a full-attention layer) or its window segments (a windowed layer),
  with the packed backend and with the ``padded`` baseline backend.
* ``encoder``: the Qwen2.5-VL tower at ``--depth`` blocks (the shallow preset: every block windowed
  but the last) against the same weights with full attention in every block (``window_size=0``),
  each packed and padded (``attn_backend="padded"``: frames padded to the longest frame in every
  block, windows padded to the longest window in the windowed blocks).

Each row carries its work from the FLOP model (``nativevit.model.flops``) next to the measured time,
so a speedup can be read against the work ratio. Results are appended to
``benchmarks/results/<hardware>-window.csv``.

    python benchmarks/bench_window.py                         # seed set, depth 4, fp32
    python benchmarks/bench_window.py --sets documents --depth 8 --iters 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nativevit import benchutil, ops
from nativevit.benchmark import DTYPES, IMAGE_SETS, image_set, run_mode
from nativevit.config import VisionConfig
from nativevit.model import NativeViT, WindowLayout
from nativevit.packing import Segments
from nativevit.preprocess import ImageProcessor


def attention_flops(lengths, heads: int, head_dim: int, *, padded: bool) -> int:
    """QK^T and PV of one layer: ``4 * L^2 * heads * head_dim`` per segment (every segment padded to
    the longest one for the padded baseline)."""
    if padded:
        lengths = [max(lengths)] * sum(1 for n in lengths if n > 0)
    return sum(4 * n * n * heads * head_dim for n in lengths)


def bench_attention(
    grid, cfg: VisionConfig, *, backend: str, dtype, device, warmup: int, iters: int
) -> list[dict]:
    """One attention layer over frame segments vs window segments, packed backend vs padded; the
    four cases run round-robin ``iters`` times (this machine is shared: interleaving spreads the
    noise evenly) and each reports its median."""
    n = sum(t * h * w for t, h, w in grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(n, cfg.num_heads, cfg.head_dim, generator=g).to(device=device, dtype=dtype)
        for _ in range(3)
    )
    frames = Segments.from_grid(grid, device)
    windows = WindowLayout.from_grid(
        grid, window=cfg.window_tokens, merge_size=cfg.spatial_merge_size, device=device
    )
    packed = ops.resolve_backend("attention", backend, q).name
    cases = [(layer, segments, name) for layer, segments in (("full", frames), ("windowed", windows.segments))
             for name in (packed, "padded")]  # fmt: skip
    samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    peaks = {}
    for round_ in range(warmup + iters):
        for i, (_, segments, name) in enumerate(cases):
            with benchutil.peak_memory_tracker(device) as mem:
                seconds = benchutil.time_fn(
                    lambda: ops.varlen_attention(q, k, v, segments, backend=name),  # noqa: B023
                    warmup=0, iters=1, device=device,
                )  # fmt: skip
            if round_ >= warmup:
                samples[i].append(seconds)
                peaks[i] = max(peaks.get(i, 0), mem.peak)
    results = []
    for i, (layer, segments, name) in enumerate(cases):
        work = attention_flops(segments.lengths, cfg.num_heads, cfg.head_dim, padded=name == "padded")
        results.append(dict(level="attention", variant=layer, mode="padded" if name == "padded" else "packed",
                            backend=name, seconds=statistics.median(samples[i]), flops=work, tokens=n,
                            peak=peaks[i]))  # fmt: skip
    return results


def bench_encoder(
    batch, depth: int, *, backend: str, dtype, device, iters: int, modes=("packed", "padded")
) -> list[dict]:
    """The windowed tower and the same weights with full attention everywhere, packed and padded,
    round-robin ``iters`` times after one small untimed forward per case; medians."""
    torch.manual_seed(0)
    windowed = NativeViT(VisionConfig.qwen2_5_vl_shallow(depth=depth)).to(device=device, dtype=dtype).eval()
    full = NativeViT(VisionConfig.qwen2_5_vl_shallow(depth=depth, window_size=0)).to(
        device=device, dtype=dtype
    )
    full.load_state_dict(windowed.state_dict())
    full.eval()
    cases = [(variant, model, mode == "padded") for variant, model in (("windowed", windowed), ("full", full))
             for mode in modes]  # fmt: skip
    small = ImageProcessor.qwen2_5_vl()([image_set("uniform")[0]])
    for _, model, padded in cases:
        run_mode(model, small, backend=backend, padded=padded, warmup=0, iters=1, device=device)
    runs: dict[int, list] = {i: [] for i in range(len(cases))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(iters):
        for i, (variant, model, padded) in enumerate(cases):
            # CPU time of this process too: on a shared machine other jobs stretch the wall time
            c0 = time.process_time()
            runs[i].append(
                run_mode(model, batch, backend=backend, padded=padded, warmup=0, iters=1, device=device)
            )
            cpu[i].append(time.process_time() - c0)
            r = runs[i][-1]
            print(
                f"    encoder {variant:<8} {r.mode:<6} {r.seconds:8.2f} s wall, {cpu[i][-1]:8.2f} s cpu",
                flush=True,
            )
    results = []
    for i, (variant, _, _) in enumerate(cases):
        r = runs[i][0]
        results.append(dict(level="encoder", variant=variant, mode=r.mode, backend=r.backend,
                            seconds=statistics.median(x.seconds for x in runs[i]), flops=r.flops["total"],
                            tokens=r.tokens, peak=max(x.peak_bytes for x in runs[i]),
                            min_seconds=min(x.seconds for x in runs[i]),
                            cpu_seconds=statistics.median(cpu[i])))  # fmt: skip
    return results


def summary(results: list[dict]) -> list[str]:
    """Per level: the table, then windowed-vs-full and packed-vs-padded ratios (time and work)."""
    lines = []
    for level in ("attention", "encoder"):
        rows = {(r["variant"], r["mode"]): r for r in results if r["level"] == level}
        if not rows:
            continue
        header = (
            f"{'variant':<9}{'mode':<7}{'backend':<9}{'time s':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'peak MiB':>10}"
        )
        lines.append(f"{level}: {header}")
        for (variant, mode), r in rows.items():
            lines.append(
                f"{'':<{len(level) + 2}}{variant:<9}{mode:<7}{r['backend']:<9}{r['seconds']:>9.3f}"
                f"{r['flops'] / 1e9:>9.1f}{r['flops'] / r['seconds'] / 1e9:>9.1f}{r['peak'] / 2**20:>10.1f}"
            )

        pairs = [
            ("full / windowed, packed", ("full", "packed"), ("windowed", "packed")),
            ("full / windowed, padded", ("full", "padded"), ("windowed", "padded")),
            ("padded / packed, windowed", ("windowed", "padded"), ("windowed", "packed")),
            ("padded / packed, full", ("full", "padded"), ("full", "packed")),
            ("padded full / packed windowed", ("full", "padded"), ("windowed", "packed")),
        ]
        for label, a, b in pairs:
            if a in rows and b in rows:
                ra, rb = rows[a], rows[b]
                line = f"  {label}: {ra['seconds'] / rb['seconds']:.2f}x time"
                if "cpu_seconds" in ra:
                    line += f", {ra['min_seconds'] / rb['min_seconds']:.2f}x min time"
                    line += f", {ra['cpu_seconds'] / rb['cpu_seconds']:.2f}x cpu time"
                lines.append(f"{line} ({ra['flops'] / rb['flops']:.2f}x work)")
        lines.append("")
    return lines


def csv_rows(results: list[dict], *, image_set_name: str, dtype_name: str, depth: int) -> list[dict]:
    rows = []
    for r in results:
        shape = f"model=qwen2_5_vl;set={image_set_name};level={r['level']};depth={depth};tokens={r['tokens']}"
        common = {"benchmark": "window", "backend": f"{r['variant']}:{r['mode']}:{r['backend']}",
                  "dtype": dtype_name, "shape": shape}  # fmt: skip
        rows += [
            {**common, "metric": "latency", "value": f"{r['seconds']:.6f}", "unit": "s"},
            {**common, "metric": "gflop", "value": f"{r['flops'] / 1e9:.3f}", "unit": "GFLOP"},
            {
                **common,
                "metric": "gflops",
                "value": f"{r['flops'] / r['seconds'] / 1e9:.2f}",
                "unit": "GFLOP/s",
            },
            {**common, "metric": "peak_memory", "value": str(r["peak"]), "unit": "B"},
        ]
        if "cpu_seconds" in r:
            rows += [
                {**common, "metric": "latency_min", "value": f"{r['min_seconds']:.6f}", "unit": "s"},
                {**common, "metric": "process_cpu_time", "value": f"{r['cpu_seconds']:.6f}", "unit": "s"},
            ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=["seed"])
    p.add_argument("--depth", type=int, default=4, help="encoder blocks (all windowed but the last); 0 skips")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280, help="processor max_pixels")
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of the attention cases")
    p.add_argument(
        "--iters", type=int, default=5, help="timed rounds of the attention cases (median reported)"
    )
    p.add_argument("--encoder-iters", type=int, default=1, help="timed rounds of the encoder cases (median)")
    p.add_argument("--encoder-modes", nargs="+", choices=["packed", "padded"], default=["packed", "padded"])
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True, help="attention level")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = VisionConfig.qwen2_5_vl()
    proc = ImageProcessor.qwen2_5_vl(max_pixels=args.max_pixels)
    peak = benchutil.mm_peak_flops(dtype, device)
    print(
        f"bench_window: Qwen2.5-VL, {args.dtype}, {device}, hardware {benchutil.hardware_name(device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; torch.mm {peak / 1e9:.1f} GFLOP/s"
    )
    rows = [{"benchmark": "mm_peak", "backend": "torch.mm", "dtype": args.dtype, "shape": "2048^3",
             "metric": "gflops", "value": f"{peak / 1e9:.2f}", "unit": "GFLOP/s"}]  # fmt: skip
    for name in args.sets:
        batch = proc(image_set(name))
        grid = [tuple(g) for g in batch.grid_thw.tolist()]
        windows = WindowLayout.from_grid(grid, window=cfg.window_tokens, merge_size=2, device="cpu").segments
        print(
            f"\n[{name}] {batch.num_images} input(s), {batch.num_tokens} patch tokens; "
            f"{len(batch.cu_seqlens) - 1} frames (longest {batch.max_seqlen}), "
            f"{windows.num_segments} windows (longest {windows.max_seqlen})",
            flush=True,
        )
        results = []
        if args.attention:
            results += bench_attention(grid, cfg, backend=args.backend, dtype=dtype, device=device,
                                       warmup=args.warmup, iters=args.iters)  # fmt: skip
        if args.depth:
            results += bench_encoder(batch, args.depth, backend=args.backend, dtype=dtype, device=device,
                                     iters=args.encoder_iters, modes=args.encoder_modes)  # fmt: skip
        print("\n".join("  " + line for line in summary(results)))
        rows += csv_rows(results, image_set_name=name, dtype_name=args.dtype, depth=args.depth)
    if not args.no_csv:
        path = benchutil.append_csv(benchutil.results_path("window", device), rows)
        print(f"results appended to {path}")


if __name__ == "__main__":
    main()
