"""Learned position tables resampled to each image, one entry per way the families do it.

A family with a learned ``(side, side)`` table (``VisionConfig.num_position_embeddings = side**2``)
names its kind in ``Family.position``. A kind has two halves: ``plan`` runs on the host once per batch
(in ``plan_batch``) and returns tensors with one row per patch, in the input row order; ``apply`` runs in
the forward and turns the table ``(side * side, D)`` and those tensors into ``(N, D)`` embeddings, which
the model adds after the patch embedding (and its ``embed_norm``). Adding a kind is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rope import position_table_taps


@dataclass(frozen=True)
class PositionKind:
    """``plan(grid, side, merge_size) -> tuple of (N, ...) tensors``;
    ``apply(table (side*side, D), planned) -> (N, D)``."""

    plan: Callable[[list[tuple[int, int, int]], int, int], tuple[torch.Tensor, ...]]
    apply: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def _gather_taps(table: torch.Tensor, planned: tuple[torch.Tensor, ...]) -> torch.Tensor:
    index, weight = planned
    return (table[index] * weight[:, :, None]).sum(1)  # (N, taps, D) -> (N, D)


POSITION_KINDS: dict[str, PositionKind] = {
    # Qwen3-VL, Qwen3.5: bilinear, align_corners=True, as 4 gather taps and weights
    "bilinear_taps": PositionKind(position_table_taps, _gather_taps),
}


def position_kind(name: str) -> PositionKind:
    try:
        return POSITION_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown position table kind {name!r}; known: {sorted(POSITION_KINDS)}") from None
