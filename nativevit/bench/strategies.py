"""Encoder cost of each resolution strategy on the seed image sizes: the "context explosion" of tiling.

For every strategy of ``nativevit.strategies`` and every size of the ``seed`` set: views, language-model
tokens (the system's own count), encoder patches and forward FLOPs of the packed Qwen2-VL encoder
(``nativevit.costs.cost_table``), and, unless only counting, the measured forward time of a tower with
the Qwen2-VL widths, all views of an image in one packed batch, against the ``torch.mm`` rate of the run.

The encoder's time depends only on the batch geometry (the list of view grids), not on pixel values,
so each distinct geometry is timed once, all geometries in interleaved rounds, and reported for every
(strategy, size) that has it (LLaVA-1.5 and the DeepSeek-OCR native modes make the same view whatever
the image size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import strategies as S
from ..costs import cost_table
from ..preprocess import ImageProcessor
from .encoder import build_model, model_config, resolved_attention_backend
from .env import DTYPES, hardware_name
from .images import IMAGE_SETS, synthetic_image
from .measure import Case, measure, mm_peak_flops
from .results import Row, roofline_row, shape

SIZES: tuple[tuple[int, int], ...] = IMAGE_SETS["seed"]
DEFAULT_DEPTH = 4


@dataclass
class StrategiesRun:
    """``strategies``: names of ``nativevit.strategies.NAMES``; ``time``: run the encoder (else counts
    and FLOPs only); the tower: a Qwen2-VL preset of ``nativevit.bench.encoder.MODELS`` ("qwen2_vl"
    widths, or the width-64 "tiny") at ``depth`` blocks."""

    strategies: Sequence[str] = S.NAMES
    model: str = "qwen2_vl"
    depth: int = DEFAULT_DEPTH
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "auto"
    warmup: int = 0
    iters: int = 1
    time: bool = True
    sizes: Sequence[tuple[int, int]] = SIZES


def run_strategies(run: StrategiesRun, *, echo: Callable[[str], None] = print) -> list[Row]:
    """Count (and time) every strategy on every size; prints the table, returns the CSV rows."""
    for name in run.strategies:
        if name not in S.NAMES:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(S.NAMES)}")
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    cfg = model_config(run.model, run.depth)
    if cfg.model_type != "qwen2_vl":
        raise ValueError(
            f"the strategies make Qwen2-VL views (14-px patches); {run.model} is a {cfg.model_type}"
        )
    costs = cost_table(run.sizes, run.strategies, cfg)  # sizes outer, strategies inner
    for c in costs:
        if c["error"]:
            raise ValueError(f"strategy {c['strategy']} refuses the size {c['size']}: {c['error']}")
    rows: list[Row] = []
    seconds: dict[tuple[str, str], float] = {}
    peak = None
    backend = "-"
    if run.time:
        model = build_model(run.model, run.depth, backend=run.backend, dtype=dtype, device=device)
        backend = resolved_attention_backend(model, dtype, device)
        peak = mm_peak_flops(dtype, device)
        rows.append(roofline_row("strategies", run.dtype, peak))
        seconds = _time_geometries(model, run, dtype, device)
    where = {
        (c["strategy"], c["size"]): shape(strategy=c["strategy"], size=c["size"], depth=run.depth)
        for c in costs
    }
    qwen = {size: s for (name, size), s in seconds.items() if name == "qwen2_vl"}
    for c in costs:
        at = where[(c["strategy"], c["size"])]

        def row(metric, value, unit="", backend_name="-", at=at):
            return Row("strategies", backend_name, run.dtype, at, metric, value, unit)

        rows += [
            row("views", c["views"], "count"),
            row("lm_tokens", c["tokens"], "count"),
            row("encoder_patches", c["patches"], "count"),
            row("encoder_gflop", c["flops"] / 1e9, "GFLOP"),
        ]
        s = seconds.get((c["strategy"], c["size"]))
        if s is not None:
            name = f"packed:{backend}"
            rows += [
                row("latency", s, "s", name),
                row("gflops", c["flops"] / s / 1e9, "GFLOP/s", name),
                row("mm_fraction", c["flops"] / s / peak, "", name),
            ]
            if c["size"] in qwen:
                rows.append(row("time_vs_qwen2_vl", s / qwen[c["size"]], "x", name))

    echo(
        f"resolution strategies through one packed encoder: {run.model} preset, {run.depth} block(s), "
        f"{run.dtype}, {device}, attention {backend}, hardware {hardware_name(device)}"
    )
    head = f"{'size':>9}  {'strategy':<20}{'views':>6}{'LM tok':>8}{'patches':>9}{'GFLOP':>9}"
    echo(head + (f"{'time s':>9}{'x qwen':>8}{'mm %':>7}" if seconds else ""))
    for c in costs:
        line = f"{c['size']:>9}  {c['strategy']:<20}{c['views']:>6}{c['tokens']:>8}{c['patches']:>9}"
        line += f"{c['flops'] / 1e9:>9.1f}"
        s = seconds.get((c["strategy"], c["size"]))
        if s is not None:
            rel = s / qwen[c["size"]] if c["size"] in qwen else float("nan")
            line += f"{s:>9.3f}{rel:>8.2f}{100 * c['flops'] / s / peak:>7.1f}"
        echo(line)
    return rows


def _time_geometries(model, run: StrategiesRun, dtype, device) -> dict[tuple[str, str], float]:
    """Median seconds of a forward per (strategy, "WxH"), each distinct geometry timed once."""
    geometry: dict[tuple[str, str], tuple] = {}
    steps: dict[tuple, Callable] = {}
    for i, (w, h) in enumerate(run.sizes):
        image = synthetic_image(w, h, seed=i)
        for name in run.strategies:
            batch = ImageProcessor(strategy=name)([image])
            key = tuple(sorted(map(tuple, batch.grid_thw.tolist())))
            geometry[(name, f"{w}x{h}")] = key
            if key not in steps:
                px, grid = batch.pixel_values.to(device=device, dtype=dtype), batch.grid_thw

                def step(px=px, grid=grid):
                    with torch.inference_mode():
                        return model(px, grid)

                steps[key] = step
    warm = ImageProcessor()([synthetic_image(224, 224, seed=0)])
    with torch.inference_mode():  # one-time initialisation is not timed
        model(warm.pixel_values.to(device=device, dtype=dtype), warm.grid_thw)
    names = {key: f"geometry {i}" for i, key in enumerate(steps)}
    timings = measure(
        [Case(names[key], step) for key, step in steps.items()],
        warmup=run.warmup,
        iters=run.iters,
        device=device,
        memory=False,
        desc="strategies",
    )
    return {case: timings[names[key]].seconds for case, key in geometry.items()}


__all__ = ["DEFAULT_DEPTH", "SIZES", "StrategiesRun", "run_strategies"]
