"""Whole encoder, packed vs padded: every image set, fp32 and bf16, plus a token-budget sweep.

Same weights, same images, same dtype, one process. Per mode: latency, tokens/s, peak memory,
padding fraction; per set: the work ratio (padded / packed FLOPs, linear and attention terms from
``nativevit.model.flops``) next to the measured packed/padded speedup.

    python benchmarks/bench_encoder.py                 # all sets, fp32 + bf16, depth 2
    python benchmarks/bench_encoder.py --depth 32 --dtypes bf16 --sets seed
    python benchmarks/plot_results.py                  # plots from the CSV
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from nativevit import benchutil
from nativevit.benchmark import DTYPES, IMAGE_SETS, csv_rows, encoder_mode, image_set, measure, report
from nativevit.config import VisionConfig
from nativevit.model import NativeViT
from nativevit.preprocess import ImageProcessor

# max merged tokens per image (max_pixels = budget * 28 * 28) for the sweep
SWEEP_BUDGETS = (256, 512, 1024, 2048)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=list(IMAGE_SETS))
    p.add_argument("--sweep", nargs="*", type=int, default=list(SWEEP_BUDGETS),
                   help="merged tokens per image, seed-set sweep; none to skip")  # fmt: skip
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    cases = [(name, 28 * 28 * 1280) for name in args.sets] + [("seed", 28 * 28 * b) for b in args.sweep]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        model = NativeViT(VisionConfig.qwen2_vl(depth=args.depth)).to(device=device, dtype=dtype).eval()
        peak = benchutil.mm_peak_flops(dtype, device)
        rows.append({"benchmark": "mm_peak", "backend": "torch.mm", "dtype": dtype_name, "shape": "2048^3",
                     "metric": "gflops", "value": f"{peak / 1e9:.2f}", "unit": "GFLOP/s"})  # fmt: skip
        for name, max_pixels in tqdm(cases, desc=f"encoder {dtype_name}"):
            batch = ImageProcessor(max_pixels=max_pixels)(image_set(name))
            label = name if max_pixels == 28 * 28 * 1280 else f"{name}@{max_pixels // 784}tok"
            modes = [
                encoder_mode(model, batch, backend=args.backend, padded=p, device=device)
                for p in (False, True)
            ]
            results = measure(modes, warmup=args.warmup, iters=args.iters, device=device)
            tqdm.write(f"\n[{label}] {dtype_name}, depth {args.depth}, {batch.num_tokens} tokens")
            tqdm.write("\n".join("  " + line for line in report(results, peak, dtype_name)))
            rows += csv_rows(results, image_set_name=label, dtype_name=dtype_name, depth=args.depth)
            packed, padded = results
            work = padded.flops["total"] / packed.flops["total"]
            shape = f"set={label};depth={args.depth}"
            rows += [
                {"benchmark": "encoder", "backend": "ratio", "dtype": dtype_name, "shape": shape,
                 "metric": "work_ratio", "value": f"{work:.4f}", "unit": "x"},
                {"benchmark": "encoder", "backend": "ratio", "dtype": dtype_name, "shape": shape,
                 "metric": "speedup", "value": f"{padded.seconds / packed.seconds:.4f}", "unit": "x"},
                {"benchmark": "encoder", "backend": "ratio", "dtype": dtype_name, "shape": shape,
                 "metric": "mm_fraction", "unit": "",
                 "value": f"{packed.flops['total'] / packed.seconds / peak:.4f}"},
            ]  # fmt: skip
    path = benchutil.append_csv(benchutil.results_path("encoder", device), rows)
    print(f"\nresults appended to {path}")


if __name__ == "__main__":
    main()
