"""Command line: ``nativevit bench | profile | tokens``."""

from __future__ import annotations

import argparse
import sys


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .benchmark import add_bench_arguments, run_bench

    p = sub.add_parser("bench", help="packed vs padded encoder on a built-in mixed-resolution image set")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from .benchmark import DTYPES, IMAGE_SETS

    p = sub.add_parser("profile", help="one encoder forward under torch.profiler: per-op table + Chrome trace")
    p.add_argument("--depth", type=int, default=2, help="number of blocks (Qwen2-VL widths)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--images", choices=sorted(IMAGE_SETS), default="seed")
    p.add_argument("--backend", default="auto", help="attention backend ('padded' profiles the baseline)")
    p.add_argument("--trace", default="nativevit-trace.json", help="Chrome trace output file")
    p.add_argument("--rows", type=int, default=20, help="ops in the table")
    p.set_defaults(func=run_profile)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_profile(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .benchmark import DTYPES, image_set
    from .config import VisionConfig
    from .model import NativeViT
    from .preprocess import ImageProcessor

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = NativeViT(VisionConfig.qwen2_vl(depth=args.depth), attn_backend=args.backend)
    model = model.to(device=device, dtype=dtype).eval()
    batch = ImageProcessor()(image_set(args.images))
    px = batch.pixel_values.to(device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        model(px[: 4 * 16], torch.tensor([[1, 8, 8]]))  # warm-up: one-time initialisation is not profiled
        with profile(activities=activities, record_shapes=True) as prof:
            with record_function("nativevit.forward"):
                model(px, batch.grid_thw)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"{args.images}: {batch.num_tokens} patch tokens, {len(batch.cu_seqlens) - 1} segments, "
        f"depth {args.depth}, {args.dtype}, backend {model.attn_backend}"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    prof.export_chrome_trace(args.trace)
    print(f"Chrome trace written to {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nativevit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
