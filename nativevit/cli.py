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

    p = sub.add_parser(
        "profile", help="one encoder forward under torch.profiler: per-op table + Chrome trace"
    )
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


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokens", help="views, language-model tokens and encoder FLOPs of each resolution strategy, per image"
    )
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files, or sizes written WxH (e.g. 1920x1080)"
    )
    p.add_argument(
        "--strategy", action="append", default=None, help="a strategy name, or 'all' (default); repeatable"
    )
    p.add_argument(
        "--model",
        choices=["qwen2_vl", "qwen2_vl_shallow"],
        default="qwen2_vl",
        help="tower whose FLOPs are counted",
    )
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.set_defaults(func=run_tokens)


def run_tokens(args: argparse.Namespace) -> int:
    from . import strategies
    from .config import VisionConfig

    names = args.strategy or ["all"]
    names = list(strategies.NAMES) if "all" in names else names
    for name in names:
        if name not in strategies.NAMES:
            choices = ", ".join(strategies.NAMES)
            raise SystemExit(f"nativevit tokens: unknown strategy {name!r}; choose from all, {choices}")
    images = [strategies.parse_size(x) or x for x in args.images]
    try:
        rows = strategies.cost_table(images, names, getattr(VisionConfig, args.model)())
    except (ValueError, TypeError) as e:
        raise SystemExit(f"nativevit tokens: {e}") from None
    head = ["image", "strategy", "views", "LM tokens", "encoder patches", "encoder GFLOPs"]
    table = [
        [r["image"], r["strategy"], "-", "-", "-", "refused"]
        if r["error"]
        else [r["image"], r["strategy"], r["views"], r["tokens"], r["patches"], f"{r['flops'] / 1e9:.1f}"]
        for r in rows
    ]
    print(f"encoder FLOPs: packed {args.model} tower, forward")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in table:
            print("| " + " | ".join(str(c) for c in row) + " |")
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(head, *table, strict=True)]
        for row in [head, *table]:
            pairs = enumerate(zip(row, widths, strict=True))
            cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in pairs]
            print("  ".join(cells).rstrip())
    for r in rows:
        if r["error"]:
            print(f"refused: {r['image']} by {r['strategy']}: {r['error']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nativevit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_profile(sub)
    _add_tokens(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
