"""Command line: ``nativevit bench | profile | kernels | tokens | encode``.

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
    add_images_argument,
    add_model_arguments,
    add_out_argument,
    check_attention_backend,
    check_out_dir,
    image_choice,
    model_choice,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from .bench.env import DTYPES
from .bench.images import IMAGE_SETS
from .encode import add_encode_arguments

BENCH_PRESETS = {
    # name: (depth, image sets, warmup, iters)
    "quick": (1, ("seed",), 0, 1),
    "default": (2, ("seed",), 0, 1),
    "full": (32, tuple(IMAGE_SETS), 1, 3),
}
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def _plot(plot, path: Path) -> None:
    """Write the plot of ``path`` beside it; without matplotlib say so (the CSV is the result)."""
    try:
        print(f"plot written to {plot(path).resolve()}")
    except RuntimeError as e:
        if "matplotlib" not in str(e):
            raise
        print(f"no plot: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="packed vs padded encoder on mixed-resolution image sets (built-in or your own)",
        description="Packed vs padded encoder (same weights, same images, one process, interleaved rounds), "
        "with the work ratio from the FLOP model and the torch.mm roofline; --compile adds the packed "
        "encoder under torch.compile(dynamic=True). Results appended to <out>/<hardware>-encoder.csv.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 block, seed images, 1 run (a smoke test)")
    g.add_argument("--full", action="store_true", help="the 32-block tower on every image set, median of 3")
    add_model_arguments(p, default_depth=2)
    p.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"], help="one or more (default fp32)"
    )
    add_device_argument(p)
    add_images_argument(p, default=["seed"])
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode (default auto)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="processor max_pixels")
    p.add_argument(
        "--warmup",
        type=nonneg_int,
        help="untimed rounds per mode (default 0; a small warm-up batch always runs first)",
    )
    p.add_argument("--iters", type=positive_int, help="timed rounds, modes interleaved; medians reported")
    p.add_argument("--compare", choices=["transformers"], help="also time transformers' Qwen2-VL tower")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the packed encoder under torch.compile(model, dynamic=True): compiled after a "
        "warm-up on two other batches (compile time reported apart), recompiles during the timed rounds "
        "counted",
    )
    add_out_argument(p)
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=run_bench, parser=p)


def run_bench(args: argparse.Namespace) -> int:
    from .bench.encoder import EncoderRun, run_encoder

    p = args.parser
    preset = "quick" if args.quick else "full" if args.full else "default"
    depth, sets, warmup, iters = BENCH_PRESETS[preset]
    cfg, model, depth, checkpoint = model_choice(p, args, default_depth=depth)
    if args.compare == "transformers" and cfg.model_type != "qwen2_vl":
        p.error("--compare transformers times the Qwen2-VL tower only; use a qwen2_vl model")
    if not args.no_csv:
        check_out_dir(p, args.out)
    images = image_choice(p, args.images or sets)
    dtypes = list(dict.fromkeys(args.dtype))
    for dtype in dtypes:
        try:
            check_attention_backend(
                args.backend,
                device=args.device,
                dtype=DTYPES[dtype],
                heads=cfg.num_heads,
                head_dim=cfg.head_dim,
            )
        except ValueError as e:
            p.error(f"argument --backend: {e}")
    if not args.no_csv:
        args.out.mkdir(parents=True, exist_ok=True)  # fail before the run, not after it
    modes = ("packed", "padded")
    modes += ("transformers",) if args.compare else ()
    modes += ("compiled",) if args.compile else ()
    label = preset if args.max_pixels == DEFAULT_MAX_PIXELS else f"{preset}, max_pixels {args.max_pixels}"
    rows = []
    for dtype in dtypes:
        run = EncoderRun(
            model=model,
            depth=depth,
            dtype=dtype,
            device=str(args.device),
            backend=args.backend,
            sets=[(name, images_, args.max_pixels) for name, images_ in images],
            modes=modes,
            warmup=warmup if args.warmup is None else args.warmup,
            iters=iters if args.iters is None else args.iters,
            seed=args.seed,
            checkpoint=checkpoint,
        )
        rows += run_encoder(run, benchmark="encoder", title=f"nativevit bench ({label})")
        print()
    if not args.no_csv:
        write_results(args.out, "encoder", rows, device=args.device)
    return 0


# ----------------------------------------------------------------------------- profile


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="encoder forwards under torch.profiler: per-module table (time, FLOPs, roofline), op table, "
        "Chrome trace",
        description="Encoder forwards under torch.profiler, with a range per module (patch embedding, each "
        "block's attention and MLP, the mergers) in the Chrome trace; a per-module table of time, FLOPs "
        "(the FLOP model) and achieved rate against the torch.mm roofline; peak memory; the op table. "
        "All --images go into one batch. "
        "Writes the trace and a JSON summary to --out and appends rows to <out>/<hardware>-profile.csv.",
    )
    add_model_arguments(p, default_depth=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_device_argument(p)
    add_images_argument(p, default=["seed"])
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="processor max_pixels")
    p.add_argument("--backend", default="auto", help="attention backend ('padded' profiles the baseline)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="profile torch.compile(model, dynamic=True), compiled and warmed up first (no time per module: "
        "inductor fuses across modules)",
    )
    p.add_argument("--steps", type=positive_int, default=1, help="profiled forwards (default 1), averaged")
    p.add_argument(
        "--warmup", type=nonneg_int, default=1, help="profiler warm-up forwards, not recorded (default 1)"
    )
    p.add_argument("--rows", type=positive_int, default=20, help="ops in the op table")
    add_out_argument(p, what="the Chrome trace, the JSON summary and <hardware>-profile.csv")
    p.set_defaults(func=run_profile, parser=p)


def run_profile(args: argparse.Namespace) -> int:
    from .bench.profile import ProfileRun, run_profile

    p = args.parser
    cfg, model, depth, checkpoint = model_choice(p, args, default_depth=2)
    check_out_dir(p, args.out)
    try:
        check_attention_backend(
            args.backend,
            device=args.device,
            dtype=DTYPES[args.dtype],
            heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            packed=False,
        )
    except ValueError as e:
        p.error(f"argument --backend: {e}")
    images = image_choice(p, args.images or ["seed"])
    try:  # fail before profiling, not after
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output folder {str(args.out)!r}: {e.strerror or e}") from None
    run = ProfileRun(
        model=model,
        depth=depth,
        checkpoint=checkpoint,
        dtype=args.dtype,
        device=str(args.device),
        backend=args.backend,
        compile=args.compile,
        images=images,
        max_pixels=args.max_pixels,
        warmup=args.warmup,
        steps=args.steps,
        op_rows=args.rows,
    )
    result = run_profile(run, args.out)
    write_results(args.out, "profile", result.rows, device=args.device)
    return 0


# ----------------------------------------------------------------------------- kernels

KERNEL_PRESETS = {
    # name: (dtypes, head dims, sets, max merged tokens per image, warmup, iters)
    # the first call of each implementation (its error check, and FlexAttention's compilation) is untimed
    # whatever --warmup says, so the quick run times straight away
    "quick": (("fp32", "bf16"), (80,), ("seed", "mix-skewed"), 128, 0, 3),
    "full": (
        ("fp32", "bf16", "fp16"),
        (64, 72, 80, 128),
        (*IMAGE_SETS, "mix-uniform", "mix-skewed"),
        1280,
        2,
        10,
    ),
}


def _add_kernels(sub: argparse._SubParsersAction) -> None:
    from .bench.kernels import MIXES, OPS
    from .bench.peers import impl_names

    p = sub.add_parser(
        "kernels",
        help="varlen attention and RoPE, forward and backward: our backends against the peers",
        description="Varlen attention and 2D RoPE, forward and backward, through our backends and every peer "
        "that runs on the device (SDPA per image, padded SDPA with a key-padding mask, FlexAttention with "
        "a document BlockMask, torch varlen_attn, flash-attn, xformers), in one process with interleaved "
        "rounds. Per row: median and min time, TFLOP/s, GB/s, fraction of the same-dtype torch.mm rate "
        "of the run, max error against float64. Those that cannot run are listed with the reason. "
        "Appends to <out>/<hardware>-kernels.csv and plots it.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a minute or two on a CPU: head dim 80, fp32 and bf16, the seed set (<= 128 merged tokens per "
        "image) and a small skewed mix (1024 + 16 x 64), 3 rounds",
    )
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument(
        "--dtypes", nargs="+", choices=sorted(set(DTYPES) - {"fp64"}), help="default fp32 bf16 fp16"
    )
    p.add_argument("--head-dims", nargs="+", type=positive_int, help="default 64 72 80 128")
    p.add_argument("--heads", type=positive_int, default=16)
    p.add_argument(
        "--sets",
        nargs="+",
        choices=[*IMAGE_SETS, *MIXES],
        help="segment lengths: built-in image sets (one segment per frame) and mixes (mix-uniform: 16 x "
        "1024; mix-skewed: 16384 + 32 x 256; smaller with --quick); default all",
    )
    p.add_argument(
        "--max-pixels", type=positive_int, help="processor max_pixels of the image sets (default 28*28*1280)"
    )
    p.add_argument(
        "--impls",
        nargs="+",
        help="implementations (default every one that runs): "
        + ", ".join(dict.fromkeys(impl_names("attention") + impl_names("rope"))),
    )
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument(
        "--warmup",
        type=nonneg_int,
        help="untimed rounds (2; --quick 0) after the first call, which checks the error and is never timed",
    )
    p.add_argument(
        "--iters", type=positive_int, help="timed rounds, implementations interleaved (10; --quick 3)"
    )
    add_device_argument(p)
    add_out_argument(p, what="<hardware>-kernels.csv and its plot")
    p.add_argument("--no-csv", action="store_true", help="print only, write no CSV or plot")
    p.set_defaults(func=run_kernels_command, parser=p)


def run_kernels_command(args: argparse.Namespace) -> int:
    from .bench.kernels import MIXES, QUICK_MIXES, KernelSuite, headline, run_suite, set_cases
    from .bench.peers import impl_names

    p = args.parser
    dtypes, head_dims, sets, tokens, warmup, iters = KERNEL_PRESETS["quick" if args.quick else "full"]
    if args.impls is not None:
        known = set(impl_names("attention")) | set(impl_names("rope"))
        for name in args.impls:
            if name not in known:
                p.error(
                    f"argument --impls: unknown implementation {name!r}; known: {', '.join(sorted(known))}"
                )
    for d in args.head_dims or ():
        if d % 2:
            p.error(f"argument --head-dims: RoPE needs even head dims, got {d}")
    if not args.no_csv:
        check_out_dir(p, args.out)
        args.out.mkdir(parents=True, exist_ok=True)
    max_pixels = args.max_pixels or 28 * 28 * tokens
    names = args.sets or list(sets)
    mixes = QUICK_MIXES if args.quick else MIXES
    cases = set_cases([n for n in names if n in IMAGE_SETS], max_pixels)
    cases += [(n, mixes[n]) for n in names if n in mixes]
    suite = KernelSuite(
        ops=args.ops,
        device=str(args.device),
        dtypes=list(dict.fromkeys(args.dtypes or dtypes)),
        head_dims=list(dict.fromkeys(args.head_dims or head_dims)),
        heads=args.heads,
        cases=cases,
        impls=args.impls,
        backward=not args.no_backward,
        warmup=warmup if args.warmup is None else args.warmup,
        iters=iters if args.iters is None else args.iters,
    )
    rows = run_suite(suite)
    print(
        "\nheadline (fastest first; x: speed against SDPA per image for attention, transformers' rotation "
        "for RoPE)"
    )
    for line in headline(rows):
        print("  " + line)
    if not args.no_csv:
        print()
        path = write_results(args.out, "kernels", rows, device=args.device)
        from .bench.plot import plot_kernels

        _plot(plot_kernels, path)
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
    _add_kernels(sub)
    _add_tokens(sub)
    add_encode_arguments(sub.add_parser("encode", help="precompute native-resolution features of a dataset"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(f"nativevit {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
