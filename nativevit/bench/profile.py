"""``nativevit profile``: encoder forwards under ``torch.profiler``, with the model's structure in the trace.

Forward hooks registered here (the model code is untouched) open a ``record_function`` range around
the patch embedding, each block's attention and MLP, and the merger(s), so the Chrome trace shows
``nativevit::blocks.3.attn`` with the ops it ran inside. From the profiled steps come:

* a per-module table: time per forward, FLOPs (:func:`~nativevit.bench.flops.module_flops`, the FLOP
  model split by module) and the achieved rate against the ``torch.mm`` roofline of the same run;
* the attention op alone (the varlen kernel, or SDPA for the reference and padded backends);
* the op table of the profiler, peak memory of one forward, and whether anything recompiled.

A compiled model (``compile=True``) has no module boundaries left (inductor fuses across them), so it
gets the forward's time, the op table and the FLOPs per module, but no time per module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..model import NativeViT
from ..preprocess import ImageProcessor
from .encoder import (
    DEFAULT_MAX_PIXELS,
    build_model,
    compile_model,
    graph_count,
    model_label,
    resolved_attention_backend,
)
from .env import DTYPES, hardware_name, synchronize
from .flops import module_flops
from .images import synthetic_image
from .measure import PeakMemory, format_bytes, mm_peak_flops
from .results import Row, shape

RANGE_PREFIX = "nativevit::"
FORWARD_RANGE = RANGE_PREFIX + "forward"
# ops that are the attention itself: our custom ops, flash-attn's, or SDPA (reference and padded)
ATTENTION_OPS = (
    re.compile(r"^nativevit::\w*varlen_attention(_fwd)?$"),
    re.compile(r"^flash_attn::_flash_attn_varlen_forward$"),
)
SDPA_OP = "aten::scaled_dot_product_attention"


def profiled_modules(model: NativeViT) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module that gets a range, in forward order; names as in
    ``model.named_modules()``."""
    mods = [("patch_embed", model.patch_embed)]
    for i, blk in enumerate(model.blocks):
        mods += [(f"blocks.{i}.attn", blk.attn), (f"blocks.{i}.mlp", blk.mlp)]
    for j, merger in enumerate(getattr(model, "deepstack_merger_list", None) or ()):
        mods.append((f"deepstack_merger_list.{j}", merger))
    mods.append(("merger", model.merger))
    return mods


class ModuleRanges:
    """Context manager: a ``record_function`` range named ``nativevit::<module name>`` around every
    call of each module of :func:`profiled_modules`, through forward pre- and post-hooks."""

    def __init__(self, model: NativeViT):
        self.modules = profiled_modules(model)
        self.handles: list = []
        self.open: list = []

    def __enter__(self) -> ModuleRanges:
        for name, module in self.modules:
            self.handles.append(module.register_forward_pre_hook(self._enter(RANGE_PREFIX + name)))
            # always_call: a forward that raises still closes its range
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        while self.open:
            self.open.pop().__exit__(None, None, None)

    def _enter(self, name: str) -> Callable:
        def hook(module, args):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            self.open.append(rf)

        return hook

    def _exit(self, module, args, output) -> None:
        if self.open:
            self.open.pop().__exit__(None, None, None)


@dataclass
class ProfileRun:
    """Settings of one profile.

    ``images``: ``(label, images)`` input sets (see ``images.input_sets``), encoded as one batch;
    ``backend``: the attention backend, "padded" for the padded baseline; ``warmup`` / ``steps``: the
    profiler schedule's warm-up and active steps (one forward each); ``checkpoint``: a checkpoint
    directory instead of the random preset ``model`` at ``depth``.
    """

    model: str = "qwen2_vl"
    depth: int = 2
    checkpoint: str | Path | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "auto"
    compile: bool = False
    images: Sequence[tuple[str, list]] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    warmup: int = 1
    steps: int = 1
    op_rows: int = 20
    seed: int = 0


@dataclass
class ModuleStat:
    """One line of the module table: time per forward (None when not measured), forward FLOPs."""

    name: str
    calls: int
    seconds: float | None
    flops: int

    def rate(self) -> float | None:
        return self.flops / self.seconds if self.seconds else None


@dataclass
class ProfileResult:
    rows: list[Row]
    summary: dict
    trace: Path
    summary_path: Path


def _time_of(evt, cuda: bool) -> float:
    """Seconds of an averaged profiler event summed over its calls: device time on CUDA (kernels of the
    range and its children), CPU wall time otherwise."""
    micros = evt.device_time_total if cuda else evt.cpu_time_total
    return micros / 1e6


def _is_cpu_event(evt) -> bool:
    device_type = getattr(evt, "device_type", None)
    return device_type is None or str(device_type).endswith("CPU")


def run_profile(run: ProfileRun, out: Path, *, echo: Callable[[str], None] = print) -> ProfileResult:
    """Profile ``run``; writes the Chrome trace and the JSON summary under ``out`` and returns them with
    the CSV rows (written by the caller)."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    cuda = device.type == "cuda"
    layout = "padded" if run.backend == "padded" else "packed"
    model = build_model(
        run.model,
        run.depth,
        backend="auto" if layout == "padded" else run.backend,
        dtype=dtype,
        device=device,
        seed=run.seed,
        checkpoint=run.checkpoint,
    )
    cfg = model.config
    backend = "padded" if layout == "padded" else resolved_attention_backend(model, dtype, device)
    label = model_label(run.model, run.checkpoint)
    set_label = "+".join(name for name, _ in run.images) or "none"
    proc = ImageProcessor.for_model(cfg.model_type, max_pixels=run.max_pixels)
    batch = proc([image for _, images in run.images for image in images])
    px = batch.pixel_values.to(device=device, dtype=dtype)
    grid = batch.grid_thw

    warm = proc([synthetic_image(112, 112, seed=0)])
    with torch.inference_mode():  # one-time initialisation is not profiled
        model(warm.pixel_values.to(device=device, dtype=dtype), warm.grid_thw, layout=layout)
    compiled = compile_model(model, proc, device=device) if run.compile else None
    fn = compiled.module if compiled is not None else model

    def forward():
        with torch.inference_mode():
            return fn(px, grid, layout=layout)

    graphs_before = graph_count()  # a compiled model must not recompile for the profiled batch
    with PeakMemory(device) as mem:
        forward()
        synchronize(device)
    peak = mm_peak_flops(dtype, device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not cuda:
        # kineto (this torch is a CUDA build) otherwise logs start/stop lines and "gpuGetDeviceCount
        # failed" to stderr on a machine without a GPU; read when the profiler first starts
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    ranges = ModuleRanges(model) if compiled is None else None
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=run.warmup, active=run.steps, repeat=1),
        record_shapes=True,
    ) as prof:
        if ranges is not None:
            ranges.__enter__()
        try:
            for _ in range(run.warmup + run.steps):
                with record_function(FORWARD_RANGE):
                    forward()
                synchronize(device)
                prof.step()
        finally:
            if ranges is not None:
                ranges.__exit__(None, None, None)
    new_graphs = graph_count() - graphs_before

    events = [e for e in prof.key_averages() if _is_cpu_event(e)]
    by_key = {e.key: e for e in events}
    plan_lengths, window_lengths = _lengths(model, grid)
    flops = module_flops(cfg, plan_lengths, padded=layout == "padded", window_lengths=window_lengths)
    stats = []
    for name, _ in profiled_modules(model):
        evt = by_key.get(RANGE_PREFIX + name)
        seconds = _time_of(evt, cuda) / run.steps if evt is not None else None
        calls = evt.count // run.steps if evt is not None else 0
        stats.append(ModuleStat(name, calls, seconds, flops[name]))
    fwd = by_key.get(FORWARD_RANGE)
    if fwd is None:
        raise RuntimeError("the profiler recorded no forward range; nothing to report")
    forward_s = _time_of(fwd, cuda) / run.steps
    total_flops = sum(flops.values())
    attention = _attention_op(events, cuda, run.steps)
    attention_term = model.flops_per_batch(grid, layout=layout)["attention"]

    tag = "-".join([label, set_label, run.dtype, backend] + (["compiled"] if compiled else []))
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", tag)
    hw = hardware_name(device)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"{hw}-profile-{tag}-trace.json"
    trace.unlink(missing_ok=True)  # a stale trace must not pass for this run's
    prof.export_chrome_trace(str(trace))
    if not trace.is_file() or trace.stat().st_size == 0:
        raise RuntimeError(f"the profiler wrote no Chrome trace at {trace}")

    sort = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ranges = {FORWARD_RANGE} | {RANGE_PREFIX + name for name, _ in profiled_modules(model)}
    ops = sorted((e for e in events if e.key not in ranges), key=sort, reverse=True)
    op_table = [
        {
            "op": e.key,
            "calls_per_forward": e.count / run.steps,
            "self_s": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6 / run.steps,
            "total_s": _time_of(e, cuda) / run.steps,
        }
        for e in ops[: run.op_rows]
    ]
    summary = {
        "hardware": hw,
        "torch": torch.__version__,
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items() if k != "images"
        },
        "images": set_label,
        "batch": {
            "inputs": batch.num_images,
            "segments": len(batch.cu_seqlens) - 1,
            "patch_tokens": batch.num_tokens,
            "longest": batch.max_seqlen,
        },
        "model": {"label": label, "model_type": cfg.model_type, "depth": cfg.depth, "backend": backend},
        "layout": layout,
        "time_source": "CUDA kernels" if cuda else "CPU wall time",
        "forward_s": forward_s,
        "forward_flops": total_flops,
        "mm_peak_flops": peak,
        "peak_memory_bytes": mem.peak,
        "graphs_compiled_for_the_batch": new_graphs if compiled is not None else None,
        "compile_s": compiled.compile_seconds if compiled is not None else None,
        "modules": [asdict(s) for s in stats],
        "attention_op": None if attention is None else {"op": attention[0], "seconds": attention[1]},
        "attention_flops": attention_term,
        "ops": op_table,
        "trace": str(trace),
    }
    summary_path = out / f"{hw}-profile-{tag}.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    echo(
        f"profile: {label} ({cfg.model_type}), {cfg.depth} block(s), {run.dtype}, {device}, "
        f"{layout} layout, attention backend {backend}{', compiled' if compiled else ''}; "
        f"hardware {hw}, torch {torch.__version__}"
    )
    echo(
        f"images {set_label}: {batch.num_images} input(s), {len(batch.cu_seqlens) - 1} segments, "
        f"{batch.num_tokens} patch tokens, longest {batch.max_seqlen}; {run.steps} profiled step(s) "
        f"after {run.warmup} profiler warm-up step(s); times per forward ({summary['time_source']})"
    )
    echo("")
    for line in module_table(stats, forward_s, total_flops, peak, attention, attention_term, run.dtype):
        echo(line)
    echo("")
    echo(f"peak memory of one forward: {format_bytes(mem.peak)}")
    if compiled is not None:
        echo(
            f"compiled: first call {compiled.compile_seconds:.1f} s (the compilation); "
            + (
                "no recompile for the profiled batch (dynamo graph count unchanged since the warm-up)"
                if new_graphs == 0
                else f"RECOMPILED for the profiled batch: {new_graphs} new graph(s) after the warm-up"
            )
        )
    echo("")
    echo(f"top {len(op_table)} ops by self time per forward:")
    width = max((len(o["op"]) for o in op_table), default=10)
    echo(f"  {'op':<{width}} {'calls':>7} {'self ms':>10} {'total ms':>10}")
    for o in op_table:
        echo(
            f"  {o['op']:<{width}} {o['calls_per_forward']:>7.0f} {1e3 * o['self_s']:>10.3f} "
            f"{1e3 * o['total_s']:>10.3f}"
        )
    echo("")
    echo(f"Chrome trace written to {trace.resolve()} (open in chrome://tracing or ui.perfetto.dev)")
    echo(f"summary written to {summary_path.resolve()}")

    rows = profile_rows(
        stats,
        benchmark="profile",
        backend=("compiled:" if compiled else f"{layout}:") + backend,
        dtype=run.dtype,
        where=dict(model=label, set=set_label, depth=cfg.depth, tokens=batch.num_tokens),
        forward_s=forward_s,
        total_flops=total_flops,
        peak_flops=peak,
        peak_memory=mem.peak,
        attention=attention,
        attention_flops=attention_term,
    )
    return ProfileResult(rows, summary, trace, summary_path)


def _lengths(model: NativeViT, grid) -> tuple[list[int], list[int] | None]:
    """The batch's frame segment lengths and (windowed towers) window lengths, packed."""
    plan = model.plan(grid, layout="packed", device="cpu")
    windows = list(plan.windows.segments.lengths) if plan.windows is not None else None
    return list(plan.segments.lengths), windows


def _attention_op(events, cuda: bool, steps: int) -> tuple[str, float] | None:
    """``(op name, seconds per forward)`` of the attention op: our or flash-attn's varlen op, else SDPA."""
    for patterns in (ATTENTION_OPS, (re.compile("^" + re.escape(SDPA_OP) + "$"),)):
        found = [e for e in events if any(p.match(e.key) for p in patterns)]
        if found:
            name = ", ".join(sorted({e.key for e in found}))
            return name, sum(_time_of(e, cuda) for e in found) / steps
    return None


def group_stats(stats: Sequence[ModuleStat]) -> list[ModuleStat]:
    """The module table's summary lines: patch embedding, all attention, all MLP, the mergers."""
    groups: dict[str, list[ModuleStat]] = {}
    for s in stats:
        if s.name.startswith("blocks."):
            key = "attn (all blocks)" if s.name.endswith(".attn") else "mlp (all blocks)"
        elif s.name.startswith("deepstack_merger_list."):
            key = "deepstack mergers"
        else:
            key = s.name
        groups.setdefault(key, []).append(s)
    out = []
    for key, members in groups.items():
        times = [m.seconds for m in members]
        seconds = None if any(t is None for t in times) else sum(times)
        out.append(ModuleStat(key, sum(m.calls for m in members), seconds, sum(m.flops for m in members)))
    return out


def module_table(
    stats: Sequence[ModuleStat],
    forward_s: float,
    total_flops: int,
    peak_flops: float,
    attention: tuple[str, float] | None,
    attention_flops: int,
    dtype: str,
) -> list[str]:
    """The printed table: groups, then each block's modules (up to 8 blocks), the rest of the forward."""
    head = f"{'module':<28}{'ms':>10}{'share':>8}{'GFLOP':>10}{'GFLOP/s':>10}{'mm %':>7}"

    def line(name: str, seconds: float | None, flops: int | None) -> str:
        if seconds is None:
            return f"{name:<28}{'-':>10}{'-':>8}{(flops or 0) / 1e9:>10.2f}{'-':>10}{'-':>7}"
        rate = flops / seconds if flops and seconds else 0.0
        gflop = f"{flops / 1e9:>10.2f}" if flops is not None else f"{'-':>10}"
        rate_s = (
            f"{rate / 1e9:>10.1f}{100 * rate / peak_flops:>7.1f}"
            if flops is not None
            else f"{'-':>10}{'-':>7}"
        )
        return f"{name:<28}{1e3 * seconds:>10.2f}{100 * seconds / forward_s:>7.1f}%{gflop}{rate_s}"

    lines = [head]
    grouped = group_stats(stats)
    for g in grouped:
        lines.append(line(g.name, g.seconds, g.flops))
    if attention is not None:
        lines.append(line("  attention op", attention[1], attention_flops))
    measured = [s.seconds for s in stats if s.seconds is not None]
    if len(measured) == len(stats):
        lines.append(line("other (plan, norms, adds)", forward_s - sum(measured), None))
    lines.append(line("forward", forward_s, total_flops))
    blocks = [s for s in stats if s.name.startswith("blocks.")]
    if blocks and len(blocks) <= 16 and all(s.seconds is not None for s in blocks):
        lines.append("per block:")
        lines += [line("  " + s.name, s.seconds, s.flops) for s in blocks]
    elif any(s.seconds is None for s in stats):
        lines.append("(compiled: inductor fuses across modules, so there is no time per module)")
    lines.append(f"torch.mm roofline at {dtype}: {peak_flops / 1e9:.1f} GFLOP/s (mm % = fraction reached)")
    return lines


def profile_rows(
    stats: Sequence[ModuleStat],
    *,
    benchmark: str,
    backend: str,
    dtype: str,
    where: dict,
    forward_s: float,
    total_flops: int,
    peak_flops: float,
    peak_memory: int,
    attention: tuple[str, float] | None,
    attention_flops: int,
) -> list[Row]:
    """CSV rows: per module (and the forward, and the attention op) time, GFLOP, GFLOP/s, mm fraction."""
    rows = []

    def add(module: str, seconds: float | None, flops: int | None):
        at = shape(**where, module=module)
        if seconds is not None:
            rows.append(Row(benchmark, backend, dtype, at, "latency", seconds, "s"))
        if flops is not None:
            rows.append(Row(benchmark, backend, dtype, at, "gflop", flops / 1e9, "GFLOP"))
            if seconds:
                rows.append(Row(benchmark, backend, dtype, at, "gflops", flops / seconds / 1e9, "GFLOP/s"))
                rows.append(Row(benchmark, backend, dtype, at, "mm_fraction", flops / seconds / peak_flops))

    add("forward", forward_s, total_flops)
    rows.append(
        Row(benchmark, backend, dtype, shape(**where, module="forward"), "peak_memory", peak_memory, "B")
    )
    for s in stats:
        add(s.name, s.seconds, s.flops)
    if attention is not None:
        add("attention_op", attention[1], attention_flops)
    return rows


__all__ = [
    "ModuleRanges",
    "ModuleStat",
    "ProfileResult",
    "ProfileRun",
    "group_stats",
    "module_table",
    "profile_rows",
    "profiled_modules",
    "run_profile",
]
