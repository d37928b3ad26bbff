"""The main job: packed vs padded encoder on built-in image sets (``nativevit bench``).

Both modes run the same weights on the same images in the same process: ``packed`` is the encoder
with its varlen attention backend, ``padded`` the same model with ``attn_backend="padded"`` (every
block sees a ``segments x max_seqlen`` batch with a key-padding mask). The work ratio is the padded
FLOPs over the packed FLOPs from ``nativevit.model.flops``; the packed/padded speedup should approach it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import benchutil
from .config import VisionConfig
from .model import NativeViT
from .packing import PackedBatch
from .preprocess import ImageProcessor

# (width, height) of synthetic images. "seed" is the mixed-resolution set of the project brief.
IMAGE_SETS: dict[str, list[tuple[int, int]]] = {
    "seed": [(128, 16), (336, 336), (1000, 600), (1920, 1080), (1500, 4500), (4000, 3000)],
    "skewed": [(3000, 2000)] + [(160, 120)] * 15,
    "documents": [(1240, 3508), (1240, 1754), (850, 1100), (1100, 850)],
    "uniform": [(336, 336)] * 8,
    "video": [(640, 360)],  # 16 frames -> t = 8 temporal patches, 8 segments
}
VIDEO_FRAMES = 16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic ``HxWx3`` uint8 image: smooth gradients plus noise (content is irrelevant to speed)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    base = 255 * (0.5 + 0.25 * np.sin(6 * x + rng.uniform(0, 6, 3)) * np.cos(4 * y + rng.uniform(0, 6, 3)))
    noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def image_set(name: str) -> list:
    """The inputs of a built-in set: images, or for ``video`` one list of frames."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose from {sorted(IMAGE_SETS)}")
    if name == "video":
        ((w, h),) = IMAGE_SETS[name]
        return [[synthetic_image(w, h, seed=i) for i in range(VIDEO_FRAMES)]]
    return [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SETS[name])]


@dataclass
class ModeResult:
    mode: str
    backend: str
    rows: int  # rows each block processes (tokens, or segments x max_seqlen when padded)
    tokens: int  # real patch tokens
    flops: dict
    seconds: float
    peak_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.rows


@dataclass
class Mode:
    """One way of encoding a batch, ready to time: ``step()`` runs it once."""

    mode: str
    backend: str
    step: object
    rows: int
    tokens: int
    flops: dict


def encoder_mode(model: NativeViT, batch: PackedBatch, *, backend: str, padded: bool, device) -> Mode:
    """The packed encoder with ``backend``, or (``padded=True``) the same model as the padded baseline."""
    name = "padded" if padded else backend
    px = batch.pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    grid = batch.grid_thw

    def step():
        model.attn_backend = name
        with torch.inference_mode():
            return model(px, grid)

    lengths = [h * w for t, h, w in grid.tolist() for _ in range(t)]
    rows = len(lengths) * max(lengths) if padded else sum(lengths)
    resolved = "padded" if padded else _resolved_backend(backend, px, px.dtype)
    return Mode(
        "padded" if padded else "packed", resolved, step, rows, sum(lengths),
        model.flops_per_batch(grid, padded=padded),
    )  # fmt: skip


def measure(modes: list[Mode], *, warmup: int, iters: int, device) -> list[ModeResult]:
    """``warmup`` untimed calls per mode, then ``iters`` timed rounds that run every mode once each.

    Interleaving the modes round by round keeps a shared, noisy machine from favouring whichever
    mode happened to run while it was quiet; each mode's time is the median of its rounds. Peak
    memory is read during the first round.
    """
    for m in modes:
        for _ in range(warmup):
            m.step()
    samples: dict[str, list[float]] = {m.mode: [] for m in modes}
    peaks = {}
    for i in range(max(iters, 1)):
        for m in modes:
            with benchutil.peak_memory_tracker(device) as mem:
                samples[m.mode].append(benchutil.time_fn(m.step, warmup=0, iters=1, device=device))
            if i == 0:
                peaks[m.mode] = mem.peak
    return [
        ModeResult(
            m.mode, m.backend, m.rows, m.tokens, m.flops, statistics.median(samples[m.mode]), peaks[m.mode]
        )
        for m in modes
    ]


def run_mode(
    model: NativeViT, batch: PackedBatch, *, backend: str, padded: bool, warmup: int, iters: int, device
) -> ModeResult:
    """Time one mode alone (see :func:`measure`)."""
    mode = encoder_mode(model, batch, backend=backend, padded=padded, device=device)
    return measure([mode], warmup=warmup, iters=iters, device=device)[0]


def _resolved_backend(backend: str, px: torch.Tensor, dtype: torch.dtype) -> str:
    from . import ops

    probe = torch.empty(1, 1, 8, dtype=dtype, device=px.device)
    return ops.resolve_backend("attention", backend, probe).name


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report(results: list[ModeResult], peak_flops: float, dtype_name: str) -> list[str]:
    """Table lines: one per mode, then the packed/padded ratios."""
    lines = [
        f"{'mode':<8}{'backend':<11}{'tokens':>8}{'rows':>8}{'pad %':>7}{'GFLOP':>9}"
        f"{'time s':>9}{'tok/s':>9}{'GFLOP/s':>9}{'mm %':>6}{'peak mem':>11}"
    ]
    for r in results:
        rate = r.flops["total"] / r.seconds
        lines.append(
            f"{r.mode:<8}{r.backend:<11}{r.tokens:>8}{r.rows:>8}{100 * r.padding_fraction:>7.1f}"
            f"{r.flops['total'] / 1e9:>9.1f}{r.seconds:>9.3f}{r.tokens_per_s:>9.0f}{rate / 1e9:>9.1f}"
            f"{100 * rate / peak_flops:>6.0f}{format_bytes(r.peak_bytes):>11}"
        )
    by_mode = {r.mode: r for r in results}
    if "packed" in by_mode and "padded" in by_mode:
        p, q = by_mode["packed"], by_mode["padded"]
        work = {k: q.flops[k] / p.flops[k] for k in ("linear", "attention", "total")}
        speedup = q.seconds / p.seconds
        lines += [
            "",
            f"work ratio padded/packed: total {work['total']:.2f}x (linear {work['linear']:.2f}x, "
            f"attention {work['attention']:.2f}x); padded rows / tokens {q.rows / p.tokens:.2f}x",
            f"speedup packed vs padded: {speedup:.2f}x = {speedup / work['total']:.2f} of the work ratio",
            f"peak memory padded/packed: {q.peak_bytes / max(p.peak_bytes, 1):.2f}x",
        ]
    lines.append(
        f"torch.mm roofline at {dtype_name}: {peak_flops / 1e9:.1f} GFLOP/s (mm % = fraction reached)"
    )
    return lines


def csv_rows(
    results: list[ModeResult], *, image_set_name: str, dtype_name: str, depth: int, model: str = "qwen2_vl"
) -> list[dict]:
    rows = []
    family = "" if model == "qwen2_vl" else f"model={model};"
    for r in results:
        shape = f"{family}set={image_set_name};depth={depth};tokens={r.tokens};rows={r.rows}"
        common = {
            "benchmark": "encoder",
            "backend": f"{r.mode}:{r.backend}",
            "dtype": dtype_name,
            "shape": shape,
        }
        rows += [
            {**common, "metric": "latency", "value": f"{r.seconds:.6f}", "unit": "s"},
            {**common, "metric": "tokens_per_s", "value": f"{r.tokens_per_s:.1f}", "unit": "tok/s"},
            {
                **common,
                "metric": "gflops",
                "value": f"{r.flops['total'] / r.seconds / 1e9:.2f}",
                "unit": "GFLOP/s",
            },
            {**common, "metric": "peak_memory", "value": str(r.peak_bytes), "unit": "B"},
            {**common, "metric": "padding_fraction", "value": f"{r.padding_fraction:.4f}", "unit": ""},
        ]
    return rows


PRESETS = {
    # name: (depth, image sets, warmup, iters)
    "quick": (1, ["seed"], 0, 1),
    "default": (2, ["seed"], 0, 1),
    "full": (32, list(IMAGE_SETS), 1, 3),
}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 block, seed images, 1 run (a smoke test)")
    g.add_argument("--full", action="store_true", help="the 32-block tower on every image set, median of 3")
    p.add_argument("--depth", type=int, help="blocks (the family's widths; default 2, the towers have 27-32)")
    p.add_argument(
        "--model",
        choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"],
        default="qwen2_vl",
        help="tower family (shallow preset: its widths, --depth blocks) and its image processor",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", nargs="+", choices=sorted(IMAGE_SETS), help="image sets (default: seed)")
    p.add_argument("--backend", default="auto", help="attention backend of the packed mode (default auto)")
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280, help="processor max_pixels")
    p.add_argument(
        "--warmup", type=int, help="untimed runs per mode (default 0; a small warm-up batch runs first)"
    )
    p.add_argument("--iters", type=int, help="timed runs per mode; the median is reported")
    p.add_argument("--compare", choices=["transformers"], help="also time transformers' Qwen2-VL tower")
    p.add_argument("--no-csv", action="store_true", help="do not append results to benchmarks/results/")
    p.add_argument("--seed", type=int, default=0)


def run_bench(args: argparse.Namespace) -> int:
    preset = "quick" if args.quick else "full" if args.full else "default"
    depth, sets, warmup, iters = PRESETS[preset]
    depth = args.depth or depth
    sets = args.images or sets
    warmup = warmup if args.warmup is None else args.warmup
    iters = iters if args.iters is None else args.iters
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    if args.compare == "transformers" and args.model != "qwen2_vl":
        raise SystemExit("--compare transformers times the Qwen2-VL tower only; use --model qwen2_vl")
    cfg = getattr(VisionConfig, f"{args.model}_shallow")(depth=depth)
    model = NativeViT(cfg).to(device=device, dtype=dtype).eval()
    proc = ImageProcessor.for_model(args.model, max_pixels=args.max_pixels)
    peak = benchutil.mm_peak_flops(dtype, device)
    print(
        f"nativevit bench ({preset}): {args.model} widths, {depth} block(s), {args.dtype}, {device}, "
        f"hardware {benchutil.hardware_name(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    _warm_up(model, proc, device, dtype)
    all_rows = []
    for name in sets:
        batch = proc(image_set(name))
        print(
            f"\n[{name}] {batch.num_images} input(s), {len(batch.cu_seqlens) - 1} segments, "
            f"{batch.num_tokens} patch tokens ({sum(batch.tokens_per_image)} merged), "
            f"longest {batch.max_seqlen}"
        )
        modes = [
            encoder_mode(model, batch, backend=args.backend, padded=p, device=device) for p in (False, True)
        ]
        if args.compare == "transformers":
            modes.append(transformers_mode(model, batch, device=device))
        t0 = time.perf_counter()
        results = measure(modes, warmup=warmup, iters=iters, device=device)
        print(f"  ... measured in {time.perf_counter() - t0:.0f} s", flush=True)
        print("\n".join("  " + line for line in report(results, peak, args.dtype)))
        all_rows += csv_rows(
            results, image_set_name=name, dtype_name=args.dtype, depth=depth, model=args.model
        )
    model.attn_backend = args.backend
    if not args.no_csv:
        path = benchutil.append_csv(benchutil.results_path("encoder", device), all_rows)
        print(f"\nresults appended to {path}")
    return 0


def _warm_up(model: NativeViT, proc: ImageProcessor, device, dtype) -> None:
    """One small forward per mode so one-time initialisation is not timed."""
    batch = proc([synthetic_image(112, 112, seed=0)])
    backend = model.attn_backend
    with torch.inference_mode():
        for mode in (backend, "padded"):
            model.attn_backend = mode
            model(batch.pixel_values.to(device=device, dtype=dtype), batch.grid_thw)
    model.attn_backend = backend


def transformers_mode(model: NativeViT, batch: PackedBatch, *, device) -> Mode:
    """transformers' ``Qwen2VisionTransformerPretrainedModel`` (sdpa) with the same weights."""
    try:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    except ImportError as e:
        raise SystemExit(f"--compare transformers needs transformers installed: {e}") from e
    dtype = next(model.parameters()).dtype
    hf_cfg = Qwen2VLVisionConfig(**model.config.to_hf_dict(), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = Qwen2VisionTransformerPretrainedModel(hf_cfg)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.rotary_pos_emb.inv_freq = hf.rotary_pos_emb.compute_axial_rope_parameters(hf_cfg)[0].to(device)
    hf.eval()
    px = batch.pixel_values.to(device=device, dtype=dtype)
    grid = batch.grid_thw.to(device)

    def step():
        with torch.inference_mode():
            return hf(px, grid_thw=grid)

    tokens = batch.num_tokens
    return Mode("hf", "sdpa", step, tokens, tokens, model.flops_per_batch(batch.grid_thw))
