"""The main job: the packed encoder against the padded baseline (and optionally transformers' tower).

Every mode runs the same weights on the same images in the same process, timed in interleaved rounds
(``measure``): ``packed`` is the encoder with its varlen attention backend, ``padded`` the same model
with ``layout="padded"`` (every block sees a ``segments x max_seqlen`` batch with a key-padding mask),
``transformers`` is transformers' ``Qwen2VisionTransformerPretrainedModel`` (sdpa) loaded with those
weights, ``compiled`` the packed model under ``torch.compile(model, dynamic=True)``. Work comes from the
FLOP model (``NativeViT.flops_per_batch``); the work ratio is padded over packed FLOPs, and the
packed/padded speedup should approach it.

The compiled mode is compiled and warmed up on two batches of other layouts before any set is timed
(the compile time is reported on its own), then timed like the others; dynamo's graph counter is read
around every compiled call, so a recompile during the timed rounds is reported, never hidden in a median.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import FAMILIES, VisionConfig
from ..model import NativeViT
from ..ops import resolve_backend
from ..packing import PackedBatch, plan_batch
from ..preprocess import ImageProcessor
from .env import DTYPES, hardware_name, quiet_cpu_compile, synchronize
from .images import image_set, synthetic_image
from .measure import Case, Timing, format_bytes, measure, mm_peak_flops
from .results import Row, roofline_row, shape

MODES = ("packed", "padded", "transformers", "compiled")
# tower presets: a family's widths at any depth (its ``_shallow`` preset), or a family's tiny test
# tower (width 64 or 32) at any depth: "tiny" (Qwen2-VL), "qwen2_5_vl_tiny", "qwen3_vl_tiny"
# every family at its release widths (shallow: --depth blocks) and its tiny test tower; "tiny" is Qwen2-VL's
MODELS = (*FAMILIES, "tiny", *(f"{name}_tiny" for name in FAMILIES))
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# (width, height) of the two warm-up batches of the compiled mode: other image counts and sizes than
# any set, so the timed rounds show whether a new layout recompiles
COMPILE_WARMUP = (((112, 112), (224, 168)), ((280, 196), (56, 112), (168, 168)))


@dataclass
class Mode:
    """One way of encoding a batch, ready to time.

    ``backend``: the attention backend that runs (resolved, never "auto"); ``rows``: rows every block
    processes (the tokens, or ``segments x max_seqlen`` padded); ``tokens``: real patch tokens;
    ``flops``: forward FLOPs by term (``linear``, ``attention``, ``total``); ``step()`` runs it once.
    ``new_graphs``: compiled mode only, the graphs dynamo compiled during each call of ``step``.
    """

    name: str
    backend: str
    rows: int
    tokens: int
    flops: dict[str, int]
    step: Callable[[], object]
    new_graphs: list[int] | None = None


@dataclass
class ModeResult:
    mode: Mode
    timing: Timing

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def seconds(self) -> float:
        return self.timing.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.mode.tokens / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.mode.flops["total"] / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.mode.tokens / self.mode.rows


def model_config(name: str, depth: int) -> VisionConfig:
    """The config of preset ``name`` (see :data:`MODELS`) with ``depth`` blocks."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if name in ("tiny", "qwen2_vl_tiny"):
        return VisionConfig.tiny(depth=depth)
    if name == "qwen2_5_vl_tiny":  # windowed blocks, the last one full, as in the shallow preset
        return VisionConfig.qwen2_5_vl_tiny(depth=depth, fullatt_block_indexes=(depth - 1,))
    if name == "qwen3_vl_tiny":
        return VisionConfig.qwen3_vl_tiny(
            depth=depth, deepstack_visual_indexes=tuple(i for i in (0, 2) if i < depth)
        )
    if hasattr(VisionConfig, f"{name}_shallow"):
        return getattr(VisionConfig, f"{name}_shallow")(depth=depth)
    tiny = name.endswith("_tiny")
    return VisionConfig.preset(name.removesuffix("_tiny") if tiny else name, depth=depth, tiny=tiny)


def build_model(
    name: str,
    depth: int,
    *,
    backend: str = "auto",
    dtype: torch.dtype,
    device,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> NativeViT:
    """A random tower of preset ``name`` (see :data:`MODELS`) with ``depth`` blocks, or with
    ``checkpoint`` the tower of that checkpoint directory (``name`` and ``depth`` unused)."""
    if checkpoint is not None:
        model = NativeViT.from_pretrained(checkpoint, attn_backend=backend, dtype=dtype, device=device)
        return model.eval()
    cfg = model_config(name, depth)
    torch.manual_seed(seed)
    return NativeViT(cfg, attn_backend=backend).to(device=device, dtype=dtype).eval()


def model_label(run_model: str, checkpoint: str | Path | None) -> str:
    """The ``model`` field of CSV shapes: the preset, or the checkpoint folder's name."""
    if checkpoint is None:
        return run_model
    name = Path(checkpoint).resolve().name or "checkpoint"
    return name.replace(";", "_").replace("=", "_")


def resolved_attention_backend(model: NativeViT, dtype: torch.dtype, device) -> str:
    """The attention backend the packed model runs for ``dtype`` on ``device`` (raises if it cannot)."""
    cfg = model.config
    probe = torch.empty(1, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
    return resolve_backend("attention", model.attn_backend, probe).name


def encoder_mode(model: NativeViT, batch: PackedBatch, *, layout: str, device) -> Mode:
    """``model`` on ``batch`` in ``layout`` ("packed": its own attention backend; "padded": the baseline).

    The timed step is the whole forward as a user calls it (the per-batch plan included)."""
    dtype = next(model.parameters()).dtype
    px = batch.pixel_values.to(device=device, dtype=dtype)
    grid = batch.grid_thw
    cfg = model.config
    segments = plan_batch(
        grid, layout=layout, merge_size=cfg.spatial_merge_size, clip_attention=cfg.family.clip_attention
    ).segments

    def step():
        with torch.inference_mode():
            return model(px, grid, layout=layout)

    backend = "padded" if layout == "padded" else resolved_attention_backend(model, dtype, device)
    return Mode(
        layout,
        backend,
        segments.num_rows,
        segments.total,
        model.flops_per_batch(grid, layout=layout),
        step,
    )


def transformers_mode(model: NativeViT, batch: PackedBatch, *, device) -> Mode:
    """transformers' ``Qwen2VisionTransformerPretrainedModel`` (sdpa) with ``model``'s weights."""
    try:
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    except ImportError as e:
        raise RuntimeError(f"the transformers comparison needs transformers installed ({e})") from None
    if model.config.model_type != "qwen2_vl":
        raise ValueError(
            f"the transformers comparison runs Qwen2-VL towers only, not {model.config.model_type}"
        )
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
    return Mode("transformers", "sdpa", tokens, tokens, model.flops_per_batch(batch.grid_thw), step)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (``torch._dynamo`` counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Compiled:
    """``torch.compile(model, dynamic=True)`` after its warm-up.

    ``warmup_seconds``: wall time of the call on each warm-up batch (the first holds the compilation);
    ``warmup_graphs``: graphs compiled during the warm-up.
    """

    module: torch.nn.Module
    warmup_seconds: list[float] = field(default_factory=list)
    warmup_graphs: int = 0

    @property
    def compile_seconds(self) -> float:
        return self.warmup_seconds[0]


def compile_model(model: NativeViT, proc: ImageProcessor, *, device) -> Compiled:
    """Compile ``model`` (``dynamic=True``, the default inductor backend) and run it once on each batch
    of :data:`COMPILE_WARMUP`, timing each call."""
    quiet_cpu_compile(device)
    compiled = Compiled(torch.compile(model, dynamic=True))
    dtype = next(model.parameters()).dtype
    before = graph_count()
    for i, sizes in enumerate(COMPILE_WARMUP):
        batch = proc([synthetic_image(w, h, seed=100 + 10 * i + j) for j, (w, h) in enumerate(sizes)])
        px = batch.pixel_values.to(device=device, dtype=dtype)
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled.module(px, batch.grid_thw)
        synchronize(device)
        compiled.warmup_seconds.append(time.perf_counter() - t0)
    compiled.warmup_graphs = graph_count() - before
    return compiled


def compiled_mode(model: NativeViT, compiled: Compiled, batch: PackedBatch, *, device) -> Mode:
    """The packed ``model`` compiled (see :func:`compile_model`), on ``batch``; every call records the
    graphs compiled during it in ``Mode.new_graphs``."""
    eager = encoder_mode(model, batch, layout="packed", device=device)
    dtype = next(model.parameters()).dtype
    px = batch.pixel_values.to(device=device, dtype=dtype)
    grid = batch.grid_thw
    new_graphs: list[int] = []

    def step():
        before = graph_count()
        with torch.inference_mode():
            out = compiled.module(px, grid)
        new_graphs.append(graph_count() - before)
        return out

    return Mode("compiled", eager.backend, eager.rows, eager.tokens, eager.flops, step, new_graphs)


def make_modes(
    model: NativeViT,
    batch: PackedBatch,
    modes: Sequence[str],
    *,
    device,
    compiled: Compiled | None = None,
) -> list[Mode]:
    """The requested ``modes`` (names of :data:`MODES`) of ``model`` on ``batch``; ``compiled`` (from
    :func:`compile_model`) is needed for the compiled mode."""
    out = []
    for name in modes:
        if name == "transformers":
            out.append(transformers_mode(model, batch, device=device))
        elif name in ("packed", "padded"):
            out.append(encoder_mode(model, batch, layout=name, device=device))
        elif name == "compiled":
            if compiled is None:
                raise ValueError("the compiled mode needs the model compiled first (compile_model)")
            out.append(compiled_mode(model, compiled, batch, device=device))
        else:
            raise ValueError(f"unknown mode {name!r}; choose from {MODES}")
    return out


def run_modes(modes: Sequence[Mode], *, warmup: int, iters: int, device, desc: str = "") -> list[ModeResult]:
    """Time ``modes`` in interleaved rounds (see ``measure``), peak memory from the first round."""
    timings = measure(
        [Case(m.name, m.step) for m in modes], warmup=warmup, iters=iters, device=device, desc=desc
    )
    return [ModeResult(m, timings[m.name]) for m in modes]


def timed_new_graphs(result: ModeResult, warmup: int) -> int | None:
    """Graphs compiled during the timed rounds of a compiled mode (its calls after ``warmup``), or
    None for an eager mode."""
    graphs = result.mode.new_graphs
    return None if graphs is None else sum(graphs[warmup:])


def report(results: Sequence[ModeResult], peak_flops: float, dtype: str, *, warmup: int = 0) -> list[str]:
    """Table lines: one per mode, then the ratios between modes and the roofline. ``warmup``: untimed
    rounds before the timed ones (to tell a compiled mode's timed calls apart)."""
    lines = [
        f"{'mode':<13}{'backend':<9}{'tokens':>8}{'rows':>8}{'pad %':>7}{'GFLOP':>9}"
        f"{'time s':>9}{'tok/s':>9}{'GFLOP/s':>9}{'mm %':>6}{'peak mem':>11}"
    ]
    for r in results:
        m = r.mode
        lines.append(
            f"{m.name:<13}{m.backend:<9}{m.tokens:>8}{m.rows:>8}{100 * r.padding_fraction:>7.1f}"
            f"{m.flops['total'] / 1e9:>9.1f}{r.seconds:>9.3f}{r.tokens_per_s:>9.0f}"
            f"{r.flops_per_s / 1e9:>9.1f}"
            f"{100 * r.flops_per_s / peak_flops:>6.0f}{format_bytes(r.timing.peak_bytes):>11}"
        )
    by = {r.name: r for r in results}
    packed, padded, hf = by.get("packed"), by.get("padded"), by.get("transformers")
    if packed and padded:
        work = {k: padded.mode.flops[k] / packed.mode.flops[k] for k in ("linear", "attention", "total")}
        speedup = padded.seconds / packed.seconds
        lines += [
            "",
            f"work ratio padded/packed: total {work['total']:.2f}x (linear {work['linear']:.2f}x, "
            f"attention {work['attention']:.2f}x); "
            f"padded rows / tokens {padded.mode.rows / packed.mode.tokens:.2f}x",
            f"speedup packed vs padded: {speedup:.2f}x = {speedup / work['total']:.2f} of the work ratio",
            f"peak memory padded/packed: {padded.timing.peak_bytes / max(packed.timing.peak_bytes, 1):.2f}x",
        ]
    if packed and hf:
        lines.append(f"speedup packed vs transformers (sdpa): {hf.seconds / packed.seconds:.2f}x")
    compiled = by.get("compiled")
    if compiled:
        if packed:
            lines.append(
                f"speedup compiled vs eager (packed): {packed.seconds / compiled.seconds:.2f}x "
                f"(fastest rounds: {packed.timing.min_seconds / compiled.timing.min_seconds:.2f}x)"
            )
        graphs = timed_new_graphs(compiled, warmup)
        rounds = len(compiled.timing.samples)
        lines.append(
            f"compiled: no recompile during the {rounds} timed round(s) (dynamo graph count unchanged)"
            if graphs == 0
            else f"compiled: RECOMPILED during the timed rounds: {graphs} new graph(s) in {rounds} round(s)"
        )
    lines.append(f"torch.mm roofline at {dtype}: {peak_flops / 1e9:.1f} GFLOP/s (mm % = fraction reached)")
    return lines


def result_rows(
    results: Sequence[ModeResult],
    *,
    benchmark: str,
    dtype: str,
    peak_flops: float,
    model: str,
    set_label: str,
    depth: int,
    warmup: int = 0,
) -> list[Row]:
    """CSV rows of one image set: per mode, then ``backend="ratio"`` rows between modes (and for a
    compiled mode the graphs compiled during its timed rounds, ``recompiles``)."""
    tokens = results[0].mode.tokens
    where = shape(model=model, set=set_label, depth=depth, tokens=tokens)
    rows = []
    for r in results:
        m = r.mode

        def row(metric, value, unit="", backend=f"{m.name}:{m.backend}"):
            return Row(benchmark, backend, dtype, where, metric, value, unit)

        rows += [
            row("latency", r.seconds, "s"),
            row("min_latency", r.timing.min_seconds, "s"),
            row("tokens_per_s", r.tokens_per_s, "tok/s"),
            row("gflop", m.flops["total"] / 1e9, "GFLOP"),
            row("gflops", r.flops_per_s / 1e9, "GFLOP/s"),
            row("mm_fraction", r.flops_per_s / peak_flops),
            row("peak_memory", r.timing.peak_bytes, "B"),
            row("rows", m.rows, "rows"),
            row("padding_fraction", r.padding_fraction),
        ]
    by = {r.name: r for r in results}
    packed, padded, hf = by.get("packed"), by.get("padded"), by.get("transformers")

    def ratio(metric, value):
        return Row(benchmark, "ratio", dtype, where, metric, value, "x")

    if packed and padded:
        work = padded.mode.flops["total"] / packed.mode.flops["total"]
        rows += [
            ratio("work_ratio", work),
            ratio("speedup", padded.seconds / packed.seconds),
            ratio("speedup_of_work_ratio", padded.seconds / packed.seconds / work),
            ratio("peak_memory_ratio", padded.timing.peak_bytes / max(packed.timing.peak_bytes, 1)),
        ]
    if packed and hf:
        rows.append(ratio("speedup_vs_transformers", hf.seconds / packed.seconds))
    compiled = by.get("compiled")
    if compiled:
        backend = f"compiled:{compiled.mode.backend}"
        rows.append(
            Row(benchmark, backend, dtype, where, "recompiles", timed_new_graphs(compiled, warmup), "graphs")
        )
        if packed:
            rows.append(ratio("compiled_speedup", packed.seconds / compiled.seconds))
            rows.append(
                ratio("compiled_speedup_min", packed.timing.min_seconds / compiled.timing.min_seconds)
            )
    return rows


def compile_rows(
    compiled: Compiled, *, benchmark: str, dtype: str, backend: str, model: str, depth: int
) -> list[Row]:
    """The compiled mode's warm-up: compile time (first call), second warm-up call, graphs compiled."""
    where = shape(model=model, set="compile-warmup", depth=depth)
    name = f"compiled:{backend}"
    rows = [Row(benchmark, name, dtype, where, "compile_time", compiled.compile_seconds, "s")]
    rows += [
        Row(benchmark, name, dtype, where, f"warmup{i + 1}_time", s, "s")
        for i, s in enumerate(compiled.warmup_seconds[1:], start=1)
    ]
    rows.append(Row(benchmark, name, dtype, where, "warmup_graphs", compiled.warmup_graphs, "graphs"))
    return rows


@dataclass
class EncoderRun:
    """Settings of one encoder benchmark run (one dtype).

    ``model``: a preset of :data:`MODELS`, or with ``checkpoint`` (a checkpoint directory) only a label;
    ``sets``: ``(label, images, max_pixels)`` per batch, ``images`` a built-in set name or a list of
    inputs for the ``ImageProcessor`` (paths, arrays); ``modes``: names of :data:`MODES`.
    """

    model: str = "qwen2_vl"
    depth: int = 2
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "auto"
    sets: Sequence[tuple[str, str, int]] = (("seed", "seed", DEFAULT_MAX_PIXELS),)
    modes: Sequence[str] = ("packed", "padded")
    warmup: int = 0
    iters: int = 1
    seed: int = 0
    checkpoint: str | Path | None = None


def run_encoder(
    run: EncoderRun, *, benchmark: str = "encoder", title: str = "", echo: Callable[[str], None] = print
) -> list[Row]:
    """Build the tower, time every set of ``run`` in every mode, print the tables; returns the CSV rows
    (the roofline row first)."""
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    model = build_model(
        run.model,
        run.depth,
        backend=run.backend,
        dtype=dtype,
        device=device,
        seed=run.seed,
        checkpoint=run.checkpoint,
    )
    label = model_label(run.model, run.checkpoint)
    depth = model.config.depth
    peak = mm_peak_flops(dtype, device)
    what = (
        f"checkpoint {run.checkpoint} ({model.config.model_type})"
        if run.checkpoint
        else f"{run.model} widths"
    )
    echo(
        f"{title or benchmark}: {what}, {depth} block(s), {run.dtype}, {device}, "
        f"hardware {hardware_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    processors: dict[int, ImageProcessor] = {}

    def processor(max_pixels: int) -> ImageProcessor:
        if max_pixels not in processors:
            processors[max_pixels] = ImageProcessor.for_model(model.config.model_type, max_pixels=max_pixels)
        return processors[max_pixels]

    eager_modes = [m for m in run.modes if m != "compiled"]
    warm_up(model, processor(DEFAULT_MAX_PIXELS), eager_modes, device=device)
    rows = [roofline_row(benchmark, run.dtype, peak)]
    compiled = None
    if "compiled" in run.modes:
        compiled = compile_model(model, processor(DEFAULT_MAX_PIXELS), device=device)
        graphs = compiled.warmup_graphs
        echo(
            f"compiled (torch.compile(model, dynamic=True)): first call {compiled.compile_seconds:.1f} s "
            f"(the compilation), second warm-up batch "
            f"{', '.join(f'{s:.2f} s' for s in compiled.warmup_seconds[1:])}; "
            f"{graphs} graph(s) compiled during the warm-up"
        )
        backend = resolved_attention_backend(model, dtype, device)
        rows += compile_rows(
            compiled, benchmark=benchmark, dtype=run.dtype, backend=backend, model=label, depth=depth
        )
    for set_label, images, max_pixels in run.sets:
        batch = processor(max_pixels)(image_set(images) if isinstance(images, str) else images)
        echo(
            f"\n[{set_label}] {batch.num_images} input(s), {len(batch.cu_seqlens) - 1} segments, "
            f"{batch.num_tokens} patch tokens ({sum(batch.tokens_per_image)} merged), "
            f"longest {batch.max_seqlen}"
        )
        modes = make_modes(model, batch, run.modes, device=device, compiled=compiled)
        results = run_modes(
            modes, warmup=run.warmup, iters=run.iters, device=device, desc=f"{set_label} {run.dtype}"
        )
        echo("\n".join("  " + line for line in report(results, peak, run.dtype, warmup=run.warmup)))
        rows += result_rows(
            results,
            benchmark=benchmark,
            dtype=run.dtype,
            peak_flops=peak,
            model=label,
            set_label=set_label,
            depth=depth,
            warmup=run.warmup,
        )
    return rows


def warm_up(model: NativeViT, proc: ImageProcessor, modes: Sequence[str], *, device) -> None:
    """One small forward per mode, so one-time initialisation (thread pools, kernel caches) is not timed."""
    batch = proc([synthetic_image(112, 112, seed=0)])
    for mode in make_modes(model, batch, modes, device=device):
        mode.step()


__all__ = [
    "COMPILE_WARMUP",
    "DEFAULT_MAX_PIXELS",
    "MODELS",
    "MODES",
    "Compiled",
    "EncoderRun",
    "Mode",
    "ModeResult",
    "build_model",
    "compile_model",
    "compile_rows",
    "compiled_mode",
    "graph_count",
    "model_config",
    "model_label",
    "encoder_mode",
    "make_modes",
    "report",
    "resolved_attention_backend",
    "result_rows",
    "run_encoder",
    "run_modes",
    "timed_new_graphs",
    "transformers_mode",
]
