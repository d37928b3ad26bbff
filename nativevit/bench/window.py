"""Qwen2.5-VL window attention: windowed against all-full layers, packed against padded.

Two levels, same images and dtype, one process:

* ``attention``: one attention layer (``varlen_attention``, Qwen2.5-VL's heads) over the batch's frame
  segments (a full-attention layer) or its window segments (a windowed layer), with the packed backend
  and with the ``padded`` backend.
* ``encoder``: the Qwen2.5-VL tower at ``depth`` blocks (the shallow preset: every block windowed but
  the last) against the same weights with full attention in every block (``window_size=0``), each
  packed and padded (``layout="padded"``: frames padded to the longest frame in every block, windows
  padded to the longest window in the windowed blocks).

Work: the attention level counts :func:`~nativevit.bench.flops.attention_flops`, the encoder level the
FLOP model (``NativeViT.flops_per_batch``). All cases of a level are timed in interleaved rounds; wall,
minimum and process CPU time are reported (on a shared machine other jobs stretch the wall time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..config import VisionConfig
from ..model import NativeViT
from ..packing import PackedBatch, plan_batch
from ..preprocess import ImageProcessor
from .encoder import DEFAULT_MAX_PIXELS, encoder_mode
from .env import DTYPES, hardware_name
from .flops import attention_flops
from .images import image_set
from .measure import Case, Timing, measure, mm_peak_flops
from .results import Row, roofline_row, shape

VARIANTS = ("windowed", "full")
LAYOUTS = ("packed", "padded")

# (a, b): a's time over b's, both (variant, layout)
PAIRS = (
    (("full", "packed"), ("windowed", "packed")),
    (("full", "padded"), ("windowed", "padded")),
    (("windowed", "padded"), ("windowed", "packed")),
    (("full", "padded"), ("full", "packed")),
    (("full", "padded"), ("windowed", "packed")),
)


@dataclass
class WindowResult:
    level: str  # "attention" | "encoder"
    variant: str  # "windowed" | "full"
    layout: str  # "packed" | "padded"
    backend: str
    flops: int
    tokens: int
    timing: Timing


def bench_attention(
    grid: Sequence[tuple[int, int, int]],
    cfg: VisionConfig,
    *,
    backend: str,
    dtype,
    device,
    warmup: int,
    iters: int,
) -> list[WindowResult]:
    """One attention layer over frame segments and over window segments, packed backend and padded."""
    plan = plan_batch(grid, device=device, merge_size=cfg.spatial_merge_size, window=cfg.window_tokens)
    n = plan.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(n, cfg.num_heads, cfg.head_dim, generator=g).to(device=device, dtype=dtype)
        for _ in range(3)
    )
    packed = ops.resolve_backend("attention", backend, q).name
    layers = {"full": plan.segments, "windowed": plan.windows.segments}
    cases = {}
    for variant in VARIANTS:
        for layout in LAYOUTS:
            name = "padded" if layout == "padded" else packed

            def step(segments=layers[variant], name=name):
                return ops.varlen_attention(q, k, v, segments, backend=name)

            cases[(variant, layout)] = (name, step)
    timings = measure(
        [Case(f"{v}:{lay}", step) for (v, lay), (_, step) in cases.items()],
        warmup=warmup,
        iters=iters,
        device=device,
        desc="attention",
    )
    return [
        WindowResult(
            "attention",
            variant,
            layout,
            name,
            attention_flops(layers[variant].lengths, cfg.num_heads, cfg.head_dim, padded=layout == "padded"),
            n,
            timings[f"{variant}:{layout}"],
        )
        for (variant, layout), (name, _) in cases.items()
    ]


def window_models(depth: int, *, backend: str, dtype, device, seed: int = 0) -> dict[str, NativeViT]:
    """The windowed Qwen2.5-VL tower and the same weights with full attention in every block."""
    torch.manual_seed(seed)
    windowed = NativeViT(VisionConfig.qwen2_5_vl_shallow(depth=depth), attn_backend=backend)
    full = NativeViT(VisionConfig.qwen2_5_vl_shallow(depth=depth, window_size=0), attn_backend=backend)
    full.load_state_dict(windowed.state_dict())
    return {
        name: m.to(device=device, dtype=dtype).eval() for name, m in (("windowed", windowed), ("full", full))
    }


def bench_encoder(
    batch: PackedBatch, models: dict[str, NativeViT], *, layouts: Sequence[str], device, iters: int
) -> list[WindowResult]:
    """Both towers in every layout of ``layouts``, after one small untimed forward each."""
    small = ImageProcessor.qwen2_5_vl()([image_set("uniform")[0]])
    modes = {}
    for variant, model in models.items():
        for layout in layouts:
            encoder_mode(model, small, layout=layout, device=device).step()
            modes[(variant, layout)] = encoder_mode(model, batch, layout=layout, device=device)
    timings = measure(
        [Case(f"{v}:{lay}", m.step) for (v, lay), m in modes.items()],
        iters=iters,
        device=device,
        desc="encoder",
    )
    return [
        WindowResult("encoder", v, lay, m.backend, m.flops["total"], m.tokens, timings[f"{v}:{lay}"])
        for (v, lay), m in modes.items()
    ]


def summary(results: Sequence[WindowResult]) -> list[str]:
    """Per level: the table, then the time and work ratios of :data:`PAIRS`."""
    lines = []
    for level in ("attention", "encoder"):
        rows = {(r.variant, r.layout): r for r in results if r.level == level}
        if not rows:
            continue
        lines.append(
            f"{level}: {'variant':<9}{'mode':<7}{'backend':<9}{'time s':>9}{'cpu s':>9}{'GFLOP':>9}"
            f"{'GFLOP/s':>9}{'peak MiB':>10}"
        )
        for (variant, layout), r in rows.items():
            t = r.timing
            lines.append(
                f"{'':<{len(level) + 2}}{variant:<9}{layout:<7}{r.backend:<9}{t.seconds:>9.3f}"
                f"{t.cpu_seconds:>9.3f}{r.flops / 1e9:>9.1f}{r.flops / t.seconds / 1e9:>9.1f}"
                f"{t.peak_bytes / 2**20:>10.1f}"
            )
        for a, b in PAIRS:
            if a in rows and b in rows:
                ta, tb = rows[a].timing, rows[b].timing
                lines.append(
                    f"  {a[0]} {a[1]} / {b[0]} {b[1]}: {ta.seconds / tb.seconds:.2f}x time, "
                    f"{ta.min_seconds / tb.min_seconds:.2f}x min time, "
                    f"{ta.cpu_seconds / tb.cpu_seconds:.2f}x cpu time "
                    f"({rows[a].flops / rows[b].flops:.2f}x work)"
                )
        lines.append("")
    return lines


def result_rows(results: Sequence[WindowResult], *, dtype: str, set_label: str, depth: int) -> list[Row]:
    """CSV rows: per case, then ``ratio:<a>/<b>`` rows for :data:`PAIRS` (time, CPU time, work)."""
    rows = []
    for level in ("attention", "encoder"):
        level_results = {(r.variant, r.layout): r for r in results if r.level == level}
        if not level_results:
            continue
        tokens = next(iter(level_results.values())).tokens
        where = shape(model="qwen2_5_vl", set=set_label, level=level, depth=depth, tokens=tokens)
        for (variant, layout), r in level_results.items():
            t, backend = r.timing, f"{variant}:{layout}:{r.backend}"
            rows += [
                Row("window", backend, dtype, where, "latency", t.seconds, "s"),
                Row("window", backend, dtype, where, "latency_min", t.min_seconds, "s"),
                Row("window", backend, dtype, where, "process_cpu_time", t.cpu_seconds, "s"),
                Row("window", backend, dtype, where, "gflop", r.flops / 1e9, "GFLOP"),
                Row("window", backend, dtype, where, "gflops", r.flops / t.seconds / 1e9, "GFLOP/s"),
                Row("window", backend, dtype, where, "peak_memory", t.peak_bytes, "B"),
            ]
        for a, b in PAIRS:
            if a in level_results and b in level_results:
                ra, rb = level_results[a], level_results[b]
                backend = f"ratio:{a[0]}:{a[1]}/{b[0]}:{b[1]}"
                rows += [
                    Row(
                        "window",
                        backend,
                        dtype,
                        where,
                        "time_ratio",
                        ra.timing.seconds / rb.timing.seconds,
                        "x",
                    ),
                    Row(
                        "window",
                        backend,
                        dtype,
                        where,
                        "cpu_time_ratio",
                        ra.timing.cpu_seconds / rb.timing.cpu_seconds,
                        "x",
                    ),
                    Row("window", backend, dtype, where, "work_ratio", ra.flops / rb.flops, "x"),
                ]
    return rows


@dataclass
class WindowRun:
    """Settings of one window benchmark run. ``depth`` 0 skips the encoder level."""

    sets: Sequence[str] = ("seed",)
    depth: int = 4
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    attention: bool = True
    warmup: int = 1
    iters: int = 5
    encoder_iters: int = 1
    encoder_layouts: Sequence[str] = LAYOUTS


def run_window(run: WindowRun, *, echo: Callable[[str], None] = print) -> list[Row]:
    """Both levels on every set of ``run``; prints the tables, returns the CSV rows."""
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    cfg = VisionConfig.qwen2_5_vl()
    proc = ImageProcessor.qwen2_5_vl(max_pixels=run.max_pixels)
    peak = mm_peak_flops(dtype, device)
    echo(
        f"window: Qwen2.5-VL, {run.dtype}, {device}, hardware {hardware_name(device)}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; torch.mm {peak / 1e9:.1f} GFLOP/s"
    )
    models = window_models(run.depth, backend=run.backend, dtype=dtype, device=device) if run.depth else {}
    rows = [roofline_row("window", run.dtype, peak)]
    for name in run.sets:
        batch = proc(image_set(name))
        grid = [tuple(g) for g in batch.grid_thw.tolist()]
        plan = plan_batch(grid, merge_size=cfg.spatial_merge_size, window=cfg.window_tokens)
        windows = plan.windows.segments
        echo(
            f"\n[{name}] {batch.num_images} input(s), {batch.num_tokens} patch tokens; "
            f"{plan.segments.num_segments} frames (longest {plan.segments.max_seqlen}), "
            f"{windows.num_segments} windows (longest {windows.max_seqlen})"
        )
        results = []
        if run.attention:
            results += bench_attention(
                grid, cfg, backend=run.backend, dtype=dtype, device=device, warmup=run.warmup, iters=run.iters
            )
        if models:
            results += bench_encoder(
                batch, models, layouts=run.encoder_layouts, device=device, iters=run.encoder_iters
            )
        echo("\n".join("  " + line for line in summary(results)))
        rows += result_rows(results, dtype=run.dtype, set_label=name, depth=run.depth)
    return rows


__all__ = [
    "LAYOUTS",
    "PAIRS",
    "VARIANTS",
    "WindowResult",
    "WindowRun",
    "bench_attention",
    "bench_encoder",
    "result_rows",
    "run_window",
    "summary",
    "window_models",
]
