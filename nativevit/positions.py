"""Learned position tables resampled to each image, one entry per way the families do it.

A family with a learned ``(side, side)`` table (``VisionConfig.num_position_embeddings = side**2``)
names its kind in ``Family.position``. A kind has two halves: ``plan`` runs on the host once per batch
(in ``plan_batch``) and returns tensors with one row per patch, in the input row order; ``apply`` runs in
the forward and turns the table ``(side * side, D)`` and those tensors into ``(N, D)`` embeddings, which
the model adds after the patch embedding (and its ``embed_norm``). Adding a kind is one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rope import position_table_taps, rope_position_ids


@dataclass(frozen=True)
class PositionKind:
    """``plan(grid, side, merge_size) -> tuple of (N, ...) tensors``;
    ``apply(table (side*side, D), planned) -> (N, D)``."""

    plan: Callable[[list[tuple[int, int, int]], int, int], tuple[torch.Tensor, ...]]
    apply: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]
    # the table's module, built from (entries, dim): its ``weight`` is the table ``apply`` gets
    table: Callable[[int, int], torch.nn.Module] = torch.nn.Embedding


def _gather_taps(table: torch.Tensor, planned: tuple[torch.Tensor, ...]) -> torch.Tensor:
    index, weight = planned
    return (table[index] * weight[:, :, None]).sum(1)  # (N, taps, D) -> (N, D)


def half_pixel_taps(
    grid_thw: list[tuple[int, int, int]], side: int, merge_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling of a ``(side, side)`` table with ``align_corners=False`` (half-pixel centres:
    row ``i`` of an ``h``-row grid reads source row ``(i + 0.5) * side / h - 0.5``, taps clamped to the
    border, as ``F.interpolate`` does), as 4 gather indices ``(N, 4)`` into the flattened table and their
    ``(N, 4)`` weights, in the processor's row order (``merge_size`` 1: raster) repeated over t. The
    weights are computed in float32 with transformers' operations in its order (PaddleOCR-VL), so float64
    towers match it exactly."""
    pos = rope_position_ids(grid_thw, merge_size)  # (N, 2) (row, col)
    counts = torch.tensor([t * h * w for t, h, w in grid_thw])
    sizes = torch.tensor([[h, w] for _, h, w in grid_thw]).repeat_interleave(counts, dim=0)  # (N, 2)
    offsets = torch.arange(2)
    taps, weights = [], []
    for axis in (0, 1):
        src = (pos[:, axis].float() + 0.5) * side / sizes[:, axis] - 0.5
        lo = src.floor()
        taps.append((lo.long()[:, None] + offsets).clamp(0, side - 1))
        weights.append((1 - (src[:, None] - lo[:, None] - offsets).abs()).clamp(min=0))
    index = (taps[0][:, :, None] * side + taps[1][:, None, :]).flatten(1)
    weight = (weights[0][:, :, None] * weights[1][:, None, :]).flatten(1)
    return index, weight


def resize_antialias_weights(
    grid_thw: list[tuple[int, int, int]], side: int, merge_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP2 NaFlex's resize of a ``(side, side)`` table to each ``h x w`` grid: the separable weights of
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` (a triangle filter widened by
    the downscale factor, renormalised at the borders), per patch: row weights ``(N, side)`` and column
    weights ``(N, side)``, rows in raster order (``merge_size`` must be 1), repeated over t.

    Computed per image in float32 with the very operations of transformers'
    ``Siglip2VisionEmbeddings.resize_positional_embeddings`` (which builds these weights for the padded
    batch), so every real patch gets bit-identical weights whatever else is in the batch.
    """
    if merge_size != 1:
        raise ValueError(f"resize_antialias tables are in raster order (merge_size 1), got {merge_size}")
    rows, cols = [], []
    source = torch.arange(side, dtype=torch.float32)
    for t, h, w in grid_thw:
        size = torch.tensor([[h, w]], dtype=torch.float32)  # (1, 2)
        flat = torch.arange(h * w, dtype=torch.float32)[:, None]  # (L, 1)
        row = torch.div(flat, size[:, 1:], rounding_mode="floor")
        index = torch.cat([row, flat - row * size[:, 1:]], dim=-1)  # (L, 2) (row, col)
        scale = side / size
        support = scale.clamp(min=1)
        center = (index + 0.5) * scale - 0.5
        weight = (1 - (source - center[..., None]).abs_().div_(support[..., None])).clamp_(min=0)
        weight = weight / weight.sum(-1, keepdim=True)  # (L, 2, side)
        rows.append(weight[:, 0].repeat(t, 1))
        cols.append(weight[:, 1].repeat(t, 1))
    return torch.cat(rows), torch.cat(cols)


def _resize_antialias(table: torch.Tensor, planned: tuple[torch.Tensor, ...]) -> torch.Tensor:
    rows, cols = planned
    n = rows.shape[0]
    weights = (rows[:, :, None] * cols[:, None, :]).flatten(1)  # (N, side * side)
    # float32 whatever the table's dtype, cast back: what transformers computes (fp64 models included).
    # The rows are padded to a multiple of 64: a float32 GEMM rounds a row differently when it falls in
    # a partial row block or a tiny-M (gemv) call, and an image's rows must not depend on what else is
    # in the batch (measured on the CPU: unpadded, a 1x1 image alone differs from the same image in a
    # batch in ~0.1% of its values; padded, every row equals transformers' padded-batch result).
    weights = F.pad(weights, (0, 0, 0, -n % 64))
    return (weights @ table.float())[:n].to(table.dtype)


def grid_sample_coords(
    grid_thw: list[tuple[int, int, int]], side: int, merge_size: int = 2
) -> tuple[torch.Tensor]:
    """GLM-4V's sampling points in a learned table for every patch: ``(N, 2)`` float32 ``(x, y)`` in
    ``grid_sample``'s normalised ``[-1, 1]`` coordinates, patch ``(i, j)`` of an ``h x w`` grid at
    ``((j + 0.5) / w * 2 - 1, (i + 0.5) / h * 2 - 1)`` (pixel centres, ``align_corners=False``; the table
    side does not enter), computed in float32 in transformers' order, in the processor's merge-block
    row order, repeated over t."""
    pos = rope_position_ids(grid_thw, merge_size)  # (N, 2) (row, col)
    counts = torch.tensor([t * h * w for t, h, w in grid_thw])
    sizes = torch.tensor([[h, w] for _, h, w in grid_thw]).repeat_interleave(counts, dim=0).float()
    norm = ((pos + 0.5) / sizes) * 2 - 1  # (N, 2) (y, x), float32
    return (norm.flip(-1).contiguous(),)


def _grid_sample_bicubic(table: torch.Tensor, planned: tuple[torch.Tensor, ...]) -> torch.Tensor:
    (coords,) = planned
    side = math.isqrt(table.shape[0])
    image = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # (1, D, side, side)
    # float32 whatever the table's dtype, cast back, as transformers does (fp64 models included)
    out = F.grid_sample(
        image, coords[None, :, None, :], mode="bicubic", align_corners=False, padding_mode="border"
    )  # (1, D, N, 1)
    return out[0, :, :, 0].t().to(table.dtype)


class GridTable(torch.nn.Module):
    """A learned position table kept as the ``(side, side, D)`` grid its release stores (Kimi-K2.5's
    ``pos_emb``), so checkpoints load unchanged; built from ``(side * side, D)`` like ``nn.Embedding``."""

    def __init__(self, entries: int, dim: int):
        super().__init__()
        side = math.isqrt(entries)
        self.weight = torch.nn.Parameter(torch.empty(side, side, dim))
        torch.nn.init.normal_(self.weight)


def bicubic_frame_taps(
    grid_thw: list[tuple[int, int, int]], side: int, merge_size: int = 2
) -> tuple[torch.Tensor, ...]:
    """Kimi-K2.5 (MoonViT): bicubic resampling (Keys kernel, ``a = -0.75``, ``align_corners=False``,
    taps clamped to the border, no antialias: ``F.interpolate(mode="bicubic")``) of a ``(side, side)``
    table to each ``h x w`` grid as 16 gather indices ``(N, 16)`` and float32 weights ``(N, 16)``, in
    the processor's row order (``merge_size`` blocks) repeated over t; and for the time table each
    patch's frame ``(N,)`` float32 and whether its clip has more than one frame ``(N,)`` float32 (a
    still image gets no time term). Weights are computed with transformers' float32 operations in its
    order, so float64 towers match it exactly."""
    pos = rope_position_ids(grid_thw, merge_size)  # (N, 2) (row, col)
    counts = torch.tensor([t * h * w for t, h, w in grid_thw])
    sizes = torch.tensor([[h, w] for _, h, w in grid_thw]).repeat_interleave(counts, dim=0)  # (N, 2)
    offsets = torch.arange(-1, 3)
    a = -0.75
    taps, weights = [], []
    for axis in (0, 1):
        src = (pos[:, axis].to(torch.float32) + 0.5) * side / sizes[:, axis] - 0.5
        lo = torch.floor(src)
        taps.append((lo.long()[:, None] + offsets).clamp(0, side - 1))
        d = (src[:, None] - lo[:, None] - offsets).abs()
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        weights.append(torch.where(d <= 1, near, far))
    index = (taps[0][:, :, None] * side + taps[1][:, None, :]).flatten(1)
    weight = (weights[0][:, :, None] * weights[1][:, None, :]).flatten(1)
    frame = torch.cat([torch.arange(t, dtype=torch.float32).repeat_interleave(h * w) for t, h, w in grid_thw])
    clip = torch.cat([torch.full((t * h * w,), float(t > 1)) for t, h, w in grid_thw])
    return index, weight, frame, clip


def _bicubic_frame(table: torch.Tensor, planned: tuple[torch.Tensor, ...]) -> torch.Tensor:
    index, weight, frame, clip = planned
    dim = table.shape[-1]
    table = table.reshape(-1, dim)  # (side*side, D)
    spatial = (table[index] * weight.to(table.dtype)[:, :, None]).sum(1)  # (N, 16, D) -> (N, D)
    # frame f of a multi-frame clip adds the sinusoid of position f, [sin | cos], computed in float32
    # as the release's buffer is
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=frame.device).float() / dim))
    angles = frame[:, None] * inv_freq[None, :]  # (N, D/2)
    time = torch.cat([angles.sin(), angles.cos()], dim=1) * clip[:, None]
    return spatial + time.to(table.dtype)


POSITION_KINDS: dict[str, PositionKind] = {
    # Qwen3-VL, Qwen3.5: bilinear, align_corners=True, as 4 gather taps and weights
    "bilinear_taps": PositionKind(position_table_taps, _gather_taps),
    # SigLIP2 NaFlex: bilinear, align_corners=False, antialias=True, in float32, raster order
    "resize_antialias": PositionKind(resize_antialias_weights, _resize_antialias),
    # PaddleOCR-VL: bilinear, align_corners=False (half-pixel centres), raster order
    "bilinear_half_pixel": PositionKind(half_pixel_taps, _gather_taps),
    # GLM-4.1V / GLM-4.5V: bicubic F.grid_sample at pixel centres, border padding, in float32
    "bicubic_grid_sample": PositionKind(grid_sample_coords, _grid_sample_bicubic),
    # Kimi-K2.5: bicubic, align_corners=False, a (side, side, D) grid, plus a sinusoid per video frame
    "bicubic_frames": PositionKind(bicubic_frame_taps, _bicubic_frame, table=GridTable),
}


def position_kind(name: str) -> PositionKind:
    try:
        return POSITION_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown position table kind {name!r}; known: {sorted(POSITION_KINDS)}") from None
