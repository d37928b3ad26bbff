"""Command line: ``nativevit bench | profile | tokens | encode``.

Exit status: 0 when the work was done and its results written, 2 for bad arguments (one line, as
argparse reports them), 1 when the work failed (one line saying why; no traceback for user errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bench.args import (
    ArgumentParser,
    add_device_argument,
    add_out_argument,
    check_attention_backend,
    check_out_dir,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from .bench.encoder import MODELS
from .bench.env import DTYPES
from .bench.images import IMAGE_SETS
from .encode import add_encode_arguments

BENCH_PRESETS = {
    # name: (depth, image sets, warmup, iters)
    "quick": (1, ("seed",), 0, 1),
    "default": (2, ("seed",), 0, 1),
    "full": (32, tuple(IMAGE_SETS), 1, 3),
}


# ----------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="packed vs padded encoder on built-in mixed-resolution image sets",
        description="Packed vs padded encoder (same weights, same images, one process), with the work "
        "ratio from the FLOP model and the torch.mm roofline; results appended to "
        "<out>/<hardware>-encoder.csv.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 block, seed images, 1 run (a smoke test)")
    g.add_argument("--full", action="store_true", help="the 32-block tower on every image set, median of 3")
    p.add_argument("--depth", type=positive_int, help="blocks (default 2, --quick 1, --full 32)")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="qwen2_vl",
        help="tower: a family's widths at --depth blocks, with its image processor; tiny: a width-64 "
        "test tower",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_device_argument(p)
    p.add_argument("--images", nargs="+", choices=sorted(IMAGE_SETS), help="image sets (default: seed)")
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode (default auto)")
    p.add_argument("--max-pixels", type=positive_int, default=28 * 28 * 1280, help="processor max_pixels")
    p.add_argument(
        "--warmup",
        type=nonneg_int,
        help="untimed runs per mode (default 0; a small warm-up batch always runs first)",
    )
    p.add_argument("--iters", type=positive_int, help="timed rounds, modes interleaved; medians reported")
    p.add_argument("--compare", choices=["transformers"], help="also time transformers' Qwen2-VL tower")
    add_out_argument(p)
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=run_bench, parser=p)


def run_bench(args: argparse.Namespace) -> int:
    from .bench.encoder import DEFAULT_MAX_PIXELS, EncoderRun, model_config, run_encoder

    p = args.parser
    preset = "quick" if args.quick else "full" if args.full else "default"
    depth, sets, warmup, iters = BENCH_PRESETS[preset]
    depth = depth if args.depth is None else args.depth
    cfg = model_config(args.model, depth)
    if args.compare == "transformers" and cfg.model_type != "qwen2_vl":
        p.error("--compare transformers times the Qwen2-VL tower only; use --model qwen2_vl")
    if not args.no_csv:
        check_out_dir(p, args.out)
    try:
        check_attention_backend(
            args.backend,
            device=args.device,
            dtype=DTYPES[args.dtype],
            heads=cfg.num_heads,
            head_dim=cfg.head_dim,
        )
    except ValueError as e:
        p.error(f"argument --backend: {e}")
    if not args.no_csv:
        args.out.mkdir(parents=True, exist_ok=True)  # fail before the run, not after it
    modes = ("packed", "padded") + (("transformers",) if args.compare else ())
    run = EncoderRun(
        model=args.model,
        depth=depth,
        dtype=args.dtype,
        device=str(args.device),
        backend=args.backend,
        sets=[(name, name, args.max_pixels) for name in (args.images or sets)],
        modes=modes,
        warmup=warmup if args.warmup is None else args.warmup,
        iters=iters if args.iters is None else args.iters,
        seed=args.seed,
    )
    label = preset if args.max_pixels == DEFAULT_MAX_PIXELS else f"{preset}, max_pixels {args.max_pixels}"
    rows = run_encoder(run, benchmark="encoder", title=f"nativevit bench ({label})")
    if not args.no_csv:
        print()
        write_results(args.out, "encoder", rows, device=args.device)
    return 0


# ----------------------------------------------------------------------------- profile


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="one encoder forward under torch.profiler: per-op table + Chrome trace"
    )
    p.add_argument("--depth", type=positive_int, default=2, help="number of blocks")
    p.add_argument("--model", choices=MODELS, default="qwen2_vl", help="tower (as in bench)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_device_argument(p)
    p.add_argument("--images", choices=sorted(IMAGE_SETS), default="seed")
    p.add_argument("--max-pixels", type=positive_int, default=28 * 28 * 1280, help="processor max_pixels")
    p.add_argument("--backend", default="auto", help="attention backend ('padded' profiles the baseline)")
    p.add_argument(
        "--trace",
        type=Path,
        default=Path("nativevit-trace.json"),
        help="Chrome trace output file (parent folders are created)",
    )
    p.add_argument("--rows", type=positive_int, default=20, help="ops in the table")
    p.set_defaults(func=run_profile, parser=p)


def run_profile(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .bench.encoder import model_config
    from .bench.images import image_set, synthetic_image
    from .model import NativeViT
    from .preprocess import ImageProcessor

    p = args.parser
    device, dtype = args.device, DTYPES[args.dtype]
    cfg = model_config(args.model, args.depth)
    try:
        backend = check_attention_backend(
            args.backend, device=device, dtype=dtype, heads=cfg.num_heads, head_dim=cfg.head_dim, packed=False
        )
    except ValueError as e:
        p.error(f"argument --backend: {e}")
    trace = args.trace
    if trace.is_dir():
        p.error(f"argument --trace: {str(trace)!r} is a folder; give a file name")
    try:  # fail before profiling, not after
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.unlink(missing_ok=True)  # a stale trace must not pass for this run's
    except OSError as e:
        raise OSError(f"cannot write the trace {str(trace)!r}: {e.strerror or e}") from None

    layout = "padded" if args.backend == "padded" else "packed"
    model = NativeViT(cfg, attn_backend="auto" if layout == "padded" else args.backend)
    model = model.to(device=device, dtype=dtype).eval()
    proc = ImageProcessor.for_model(cfg.model_type, max_pixels=args.max_pixels)
    batch = proc(image_set(args.images))
    warm = proc([synthetic_image(112, 112, seed=0)])
    px = batch.pixel_values.to(device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        # one-time initialisation is not profiled
        model(warm.pixel_values.to(device=device, dtype=dtype), warm.grid_thw, layout=layout)
        with profile(activities=activities, record_shapes=True) as prof:
            with record_function("nativevit.forward"):
                model(px, batch.grid_thw, layout=layout)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"{args.images}: {batch.num_tokens} patch tokens, {len(batch.cu_seqlens) - 1} segments, "
        f"{args.model}, depth {args.depth}, {args.dtype}, {device}, backend {backend}"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    prof.export_chrome_trace(str(trace))
    if not trace.is_file() or trace.stat().st_size == 0:
        raise RuntimeError(f"the profiler wrote no Chrome trace at {trace}")
    print(f"Chrome trace written to {trace.resolve()} (open in chrome://tracing or ui.perfetto.dev)")
    return 0


# ----------------------------------------------------------------------------- tokens


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
    p.set_defaults(func=run_tokens, parser=p)


def run_tokens(args: argparse.Namespace) -> int:
    from . import strategies
    from .config import VisionConfig
    from .costs import cost_table

    p = args.parser
    names = args.strategy or ["all"]
    names = list(strategies.NAMES) if "all" in names else list(dict.fromkeys(names))
    for name in names:
        if name not in strategies.NAMES:
            choices = ", ".join(strategies.NAMES)
            p.error(f"argument --strategy: unknown strategy {name!r}; choose from all, {choices}")
    images = []
    for text in args.images:
        size = strategies.parse_size(text)
        if size is not None and min(size) < 1:
            p.error(f"argument IMAGE: {text!r}: width and height must be >= 1")
        images.append(size or text)
    rows = cost_table(images, names, getattr(VisionConfig, args.model)())
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
    served = {r["image"] for r in rows if not r["error"]}
    unserved = list(dict.fromkeys(r["image"] for r in rows if r["image"] not in served))
    if unserved:
        raise ValueError(f"every strategy asked for refused {', '.join(unserved)}")
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="nativevit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_profile(sub)
    _add_tokens(sub)
    add_encode_arguments(sub.add_parser("encode", help="precompute native-resolution features of a dataset"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(f"nativevit {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
