"""The main job: the packed encoder against the padded baseline (and optionally transformers' tower).

Every mode runs the same weights on the same images in the same process, timed in interleaved rounds
(``measure``): ``packed`` is the encoder with its varlen attention backend, ``padded`` the same model
with ``layout="padded"`` (every block sees a ``segments x max_seqlen`` batch with a key-padding mask),
``transformers`` is transformers' ``Qwen2VisionTransformerPretrainedModel`` (sdpa) loaded with those
weights. Work comes from the FLOP model (``NativeViT.flops_per_batch``); the work ratio is padded over
packed FLOPs, and the packed/padded speedup should approach it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import VisionConfig
from ..model import NativeViT
from ..ops import resolve_backend
from ..packing import PackedBatch, plan_batch
from ..preprocess import ImageProcessor
from .env import DTYPES, hardware_name
from .images import image_set, synthetic_image
from .measure import Case, Timing, format_bytes, measure, mm_peak_flops
from .results import Row, roofline_row, shape

MODES = ("packed", "padded", "transformers")
# tower presets: a family's widths at any depth (its ``_shallow`` preset), or "tiny" (width 64, tests)
MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "tiny")
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclass
class Mode:
    """One way of encoding a batch, ready to time.

    ``backend``: the attention backend that runs (resolved, never "auto"); ``rows``: rows every block
    processes (the tokens, or ``segments x max_seqlen`` padded); ``tokens``: real patch tokens;
    ``flops``: forward FLOPs by term (``linear``, ``attention``, ``total``); ``step()`` runs it once.
    """

    name: str
    backend: str
    rows: int
    tokens: int
    flops: dict[str, int]
    step: Callable[[], object]


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
    if name == "tiny":
        return VisionConfig.tiny(depth=depth)
    return getattr(VisionConfig, f"{name}_shallow")(depth=depth)


def build_model(
    name: str, depth: int, *, backend: str = "auto", dtype: torch.dtype, device, seed: int = 0
) -> NativeViT:
    """A random tower of preset ``name`` (see :data:`MODELS`) with ``depth`` blocks."""
    cfg = model_config(name, depth)
    torch.manual_seed(seed)
    return NativeViT(cfg, attn_backend=backend).to(device=device, dtype=dtype).eval()


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
    segments = plan_batch(grid, layout=layout, merge_size=model.config.spatial_merge_size).segments

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


def make_modes(model: NativeViT, batch: PackedBatch, modes: Sequence[str], *, device) -> list[Mode]:
    """The requested ``modes`` (names of :data:`MODES`) of ``model`` on ``batch``."""
    out = []
    for name in modes:
        if name == "transformers":
            out.append(transformers_mode(model, batch, device=device))
        elif name in ("packed", "padded"):
            out.append(encoder_mode(model, batch, layout=name, device=device))
        else:
            raise ValueError(f"unknown mode {name!r}; choose from {MODES}")
    return out


def run_modes(modes: Sequence[Mode], *, warmup: int, iters: int, device, desc: str = "") -> list[ModeResult]:
    """Time ``modes`` in interleaved rounds (see ``measure``), peak memory from the first round."""
    timings = measure(
        [Case(m.name, m.step) for m in modes], warmup=warmup, iters=iters, device=device, desc=desc
    )
    return [ModeResult(m, timings[m.name]) for m in modes]


def report(results: Sequence[ModeResult], peak_flops: float, dtype: str) -> list[str]:
    """Table lines: one per mode, then the ratios between modes and the roofline."""
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
) -> list[Row]:
    """CSV rows of one image set: per mode, then ``backend="ratio"`` rows between modes."""
    tokens = results[0].mode.tokens
    where = shape(model=model, set=set_label, depth=depth, tokens=tokens)
    rows = []
    for r in results:
        m = r.mode

        def row(metric, value, unit="", backend=f"{m.name}:{m.backend}"):
            return Row(benchmark, backend, dtype, where, metric, value, unit)

        rows += [
            row("latency", r.seconds, "s"),
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
    return rows


@dataclass
class EncoderRun:
    """Settings of one encoder benchmark run (one dtype).

    ``model``: a preset of :data:`MODELS`; ``sets``: ``(label, image set name, max_pixels)`` per batch;
    ``modes``: names of :data:`MODES`.
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


def run_encoder(
    run: EncoderRun, *, benchmark: str = "encoder", title: str = "", echo: Callable[[str], None] = print
) -> list[Row]:
    """Build the tower, time every set of ``run`` in every mode, print the tables; returns the CSV rows
    (the roofline row first)."""
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    model = build_model(run.model, run.depth, backend=run.backend, dtype=dtype, device=device, seed=run.seed)
    peak = mm_peak_flops(dtype, device)
    echo(
        f"{title or benchmark}: {run.model} widths, {run.depth} block(s), {run.dtype}, {device}, "
        f"hardware {hardware_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    processors: dict[int, ImageProcessor] = {}

    def processor(max_pixels: int) -> ImageProcessor:
        if max_pixels not in processors:
            processors[max_pixels] = ImageProcessor.for_model(model.config.model_type, max_pixels=max_pixels)
        return processors[max_pixels]

    warm_up(model, processor(DEFAULT_MAX_PIXELS), run.modes, device=device)
    rows = [roofline_row(benchmark, run.dtype, peak)]
    for label, set_name, max_pixels in run.sets:
        batch = processor(max_pixels)(image_set(set_name))
        echo(
            f"\n[{label}] {batch.num_images} input(s), {len(batch.cu_seqlens) - 1} segments, "
            f"{batch.num_tokens} patch tokens ({sum(batch.tokens_per_image)} merged), "
            f"longest {batch.max_seqlen}"
        )
        modes = make_modes(model, batch, run.modes, device=device)
        results = run_modes(
            modes, warmup=run.warmup, iters=run.iters, device=device, desc=f"{label} {run.dtype}"
        )
        echo("\n".join("  " + line for line in report(results, peak, run.dtype)))
        rows += result_rows(
            results,
            benchmark=benchmark,
            dtype=run.dtype,
            peak_flops=peak,
            model=run.model,
            set_label=label,
            depth=run.depth,
        )
    return rows


def warm_up(model: NativeViT, proc: ImageProcessor, modes: Sequence[str], *, device) -> None:
    """One small forward per mode, so one-time initialisation (thread pools, kernel caches) is not timed."""
    batch = proc([synthetic_image(112, 112, seed=0)])
    for mode in make_modes(model, batch, modes, device=device):
        mode.step()


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MODELS",
    "MODES",
    "EncoderRun",
    "Mode",
    "ModeResult",
    "build_model",
    "model_config",
    "encoder_mode",
    "make_modes",
    "report",
    "resolved_attention_backend",
    "result_rows",
    "run_encoder",
    "run_modes",
    "transformers_mode",
]
