"""Encoder cost of each resolution strategy on the seed image sizes: the "context explosion" of tiling.

For every strategy of ``nativevit.strategies`` and every seed size (128x16, 336x336, 1000x600,
1920x1080, 1500x4500, 4000x3000): views, language-model tokens (the system's own count), encoder
patches and forward FLOPs of our packed Qwen2-VL encoder (``nativevit.costs.cost_table``), and its measured
forward time with a shallow tower (``VisionConfig.qwen2_vl_shallow()``), all views of an image in one
packed batch. The roofline fraction is against ``torch.mm`` at the same dtype, measured in the same run.

The encoder's time depends only on the batch geometry (the list of view grids), not on pixel values,
so each distinct geometry is timed once and reported for every (strategy, size) that has it (e.g.
LLaVA-1.5 and the DeepSeek-OCR native modes make the same view whatever the image size).

    python benchmarks/bench_strategies.py                      # all strategies, fp32, CPU-sized defaults
    python benchmarks/bench_strategies.py --dtype bf16 --iters 3 --strategies internvl qwen2_vl
    python benchmarks/bench_strategies.py --no-time             # counts and FLOPs only, no encoder runs

Writes ``benchmarks/results/<hardware>-strategies.csv`` (shared schema of ``nativevit.benchutil``)
and ``<hardware>-strategies.png``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

import nativevit as nv
from nativevit import benchutil
from nativevit import strategies as S
from nativevit.costs import cost_table

SEED_SIZES = ((128, 16), (336, 336), (1000, 600), (1920, 1080), (1500, 4500), (4000, 3000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seed_image(width: int, height: int) -> np.ndarray:
    """A deterministic ``HxWx3`` uint8 image (gradients plus noise; the content does not affect timing)."""
    rng = np.random.default_rng(width * 10007 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def row(backend, dtype_name, shape, metric, value, unit) -> dict:
    return {"benchmark": "strategies", "backend": backend, "dtype": dtype_name, "shape": shape,
            "metric": metric, "value": f"{value:.6g}", "unit": unit}  # fmt: skip


def plot(results: list[dict], names: list[str], sizes, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any(r.get("time_s") is not None for r in results)
    panels = [("tokens", "language-model tokens"), ("gflops", "encoder GFLOPs (packed)")]
    if timed:
        panels.append(("time_s", "measured encoder time (s)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.4 * len(panels)), squeeze=False)
    width = 0.8 / len(sizes)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    lookup = {(r["strategy"], r["size"]): r for r in results}
    for ax, (key, label) in zip(axes[:, 0], panels, strict=True):
        for j, (w, h) in enumerate(sizes):
            vals = [lookup.get((n, f"{w}x{h}"), {}).get(key) or np.nan for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(sizes) - 1) / 2) * width, vals, width,
                   label=f"{w}x{h}", color=colors[j])  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=len(sizes), fontsize=8, title="image W x H")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=S.NAMES, default=list(S.NAMES))
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the qwen2_vl_shallow preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="attention backend")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument(
        "--warmup", type=int, default=0, help="untimed runs per geometry (one global warm-up always)"
    )
    p.add_argument("--no-time", action="store_true", help="skip the encoder runs: counts and FLOPs only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = nv.VisionConfig.qwen2_vl_shallow(**({} if args.depth is None else {"depth": args.depth}))
    torch.manual_seed(0)
    model = nv.NativeViT(cfg, attn_backend=args.backend).to(device=device, dtype=dtype).eval()
    peak = None if args.no_time else benchutil.mm_peak_flops(dtype, device)
    rows = (
        [] if peak is None else [row("torch.mm", args.dtype, "2048^3", "peak_tflops", peak / 1e12, "TFLOP/s")]
    )
    if not args.no_time:
        warm = nv.ImageProcessor()([seed_image(224, 224)])
        with torch.inference_mode():
            model(warm.pixel_values.to(device, dtype), warm.grid_thw.to(device))

    results, timings = [], {}
    cases = [(size, name) for size in SEED_SIZES for name in args.strategies]
    costs = cost_table(SEED_SIZES, args.strategies, cfg)  # same order: sizes outer, strategies inner
    for ((w, h), name), c in tqdm(zip(cases, costs, strict=True), total=len(cases), desc="strategies"):
        if c["error"]:
            raise SystemExit(f"strategy {name} refuses the seed size {w}x{h}: {c['error']}")
        res = {"strategy": name, "size": f"{w}x{h}", "views": c["views"], "tokens": c["tokens"],
               "patches": c["patches"], "gflops": c["flops"] / 1e9, "time_s": None}  # fmt: skip
        if not args.no_time:
            batch = nv.ImageProcessor(strategy=name)([seed_image(w, h)])
            key = tuple(sorted(map(tuple, batch.grid_thw.tolist())))
            if key not in timings:
                px, grid = batch.pixel_values.to(device, dtype), batch.grid_thw.to(device)
                with torch.inference_mode():
                    timings[key] = benchutil.time_fn(
                        lambda px=px, grid=grid: model(px, grid),
                        warmup=args.warmup,
                        iters=args.iters,
                        device=device,
                    )
            res["time_s"] = timings[key]
        results.append(res)

    qwen_time = {r["size"]: r["time_s"] for r in results if r["strategy"] == "qwen2_vl"}
    for r in results:
        shape = f"{r['strategy']};{r['size']};depth={cfg.depth}"
        rows += [
            row("-", args.dtype, shape, "views", r["views"], "count"),
            row("-", args.dtype, shape, "lm_tokens", r["tokens"], "count"),
            row("-", args.dtype, shape, "encoder_patches", r["patches"], "count"),
            row("-", args.dtype, shape, "encoder_gflops", r["gflops"], "GFLOP"),
        ]
        if r["time_s"] is not None:
            achieved = r["gflops"] * 1e9 / r["time_s"]
            rows += [
                row(args.backend, args.dtype, shape, "time", r["time_s"], "s"),
                row(args.backend, args.dtype, shape, "tflops", achieved / 1e12, "TFLOP/s"),
                row(args.backend, args.dtype, shape, "roofline_fraction", achieved / peak, "x"),
            ]
            if qwen_time.get(r["size"]):
                rows.append(
                    row(
                        args.backend,
                        args.dtype,
                        shape,
                        "time_vs_qwen2_vl",
                        r["time_s"] / qwen_time[r["size"]],
                        "x",
                    )
                )

    head = f"{'size':>9}  {'strategy':<20}{'views':>6}{'LM tok':>8}{'patches':>9}{'GFLOPs':>9}"
    print(f"\nencoder: qwen2_vl_shallow depth {cfg.depth}, {args.dtype}, {device.type}, attn {args.backend}")
    print(head + ("" if args.no_time else f"{'time s':>9}{'x qwen':>8}{'mm frac':>9}"))
    for r in results:
        line = f"{r['size']:>9}  {r['strategy']:<20}{r['views']:>6}{r['tokens']:>8}"
        line += f"{r['patches']:>9}{r['gflops']:>9.0f}"
        if r["time_s"] is not None:
            rel = r["time_s"] / qwen_time[r["size"]] if qwen_time.get(r["size"]) else float("nan")
            frac = r["gflops"] * 1e9 / r["time_s"] / peak
            line += f"{r['time_s']:>9.3f}{rel:>8.2f}{frac:>9.2f}"
        print(line)
    csv_path = benchutil.append_csv(benchutil.results_path("strategies", device), rows)
    png = csv_path.with_suffix(".png")
    hardware = benchutil.hardware_name(device)
    title = f"resolution strategies through one packed encoder ({hardware}, depth {cfg.depth}, {args.dtype})"
    plot(results, args.strategies, SEED_SIZES, png, title)
    print(f"results appended to {csv_path}; plot {png}")


if __name__ == "__main__":
    main()
