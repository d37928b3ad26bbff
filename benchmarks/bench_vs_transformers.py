"""nativevit vs transformers' Qwen2-VL vision tower: same random weights, same images, one run.

transformers runs ``Qwen2VisionTransformerPretrainedModel`` with ``attn_implementation="sdpa"`` (its
per-segment SDPA loop); nativevit runs its packed encoder with the ``auto`` backend. Reported: tokens/s
of each, their ratio, and each one's fraction of the ``torch.mm`` roofline at that dtype.

    python benchmarks/bench_vs_transformers.py                    # fp32 + bf16, seed set, depth 2
    python benchmarks/bench_vs_transformers.py --depth 32 --iters 3
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from nativevit import benchutil
from nativevit.benchmark import DTYPES, IMAGE_SETS, encoder_mode, image_set, measure, transformers_mode
from nativevit.config import VisionConfig
from nativevit.model import NativeViT
from nativevit.preprocess import ImageProcessor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=["seed"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=3, help="interleaved timed rounds; medians are reported")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        model = NativeViT(VisionConfig.qwen2_vl(depth=args.depth)).to(device=device, dtype=dtype).eval()
        peak = benchutil.mm_peak_flops(dtype, device)
        for name in tqdm(args.sets, desc=f"vs transformers {dtype_name}"):
            batch = ImageProcessor()(image_set(name))
            modes = [
                encoder_mode(model, batch, backend=args.backend, padded=False, device=device),
                transformers_mode(model, batch, device=device),
            ]
            ours, hf = measure(modes, warmup=args.warmup, iters=args.iters, device=device)
            ratio = hf.seconds / ours.seconds
            frac = {r.mode: r.flops["total"] / r.seconds / peak for r in (ours, hf)}
            tqdm.write(
                f"[{name}] {dtype_name} depth {args.depth}: "
                f"nativevit ({ours.backend}) {ours.tokens_per_s:.0f} tok/s "
                f"({100 * frac['packed']:.0f}% of mm peak), transformers sdpa {hf.tokens_per_s:.0f} tok/s "
                f"({100 * frac['hf']:.0f}%), ratio {ratio:.2f}x; mm peak {peak / 1e9:.0f} GFLOP/s"
            )
            shape = f"set={name};depth={args.depth};tokens={ours.tokens}"
            for r in (ours, hf):
                backend = "nativevit:" + r.backend if r is ours else "transformers:sdpa"
                rows += [
                    {"benchmark": "vs_transformers", "backend": backend, "dtype": dtype_name, "shape": shape,
                     "metric": "tokens_per_s", "value": f"{r.tokens_per_s:.1f}", "unit": "tok/s"},
                    {"benchmark": "vs_transformers", "backend": backend, "dtype": dtype_name, "shape": shape,
                     "metric": "mm_fraction", "value": f"{frac[r.mode]:.4f}", "unit": ""},
                ]  # fmt: skip
            rows.append({"benchmark": "vs_transformers", "backend": "ratio", "dtype": dtype_name,
                         "shape": shape,
                         "metric": "speedup", "value": f"{ratio:.4f}", "unit": "x"})  # fmt: skip
    path = benchutil.append_csv(benchutil.results_path("vs_transformers", device), rows)
    print(f"results appended to {path}")


if __name__ == "__main__":
    main()
