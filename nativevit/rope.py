"""2D rotary position embedding of the Qwen2-VL vision tower.

Each patch has a (row, col) position in its image's grid. Of the ``head_dim/2`` rotation pairs
``(i, i + head_dim/2)`` the first half turn with the row and the second half with the column, each
with ``head_dim/4`` frequencies ``theta^(-4j/head_dim)``. The tables are built once per forward from
``grid_thw`` and shared by every layer.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``(head_dim//4,)`` float32 inverse frequencies, computed as transformers does (in float32)."""
    spatial_dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim))


def _axial_qwen(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(head_dim, theta)
    return inv_freq, inv_freq


def _axial_interleaved(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv_freq[0::2], inv_freq[1::2]


def _axial_kimi(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(head_dim, theta)
    quarter = head_dim // 4
    # rotation pair 2j turns with the column, 2j+1 with the row, both at frequency j
    order = torch.stack([torch.arange(quarter) + quarter, torch.arange(quarter)], dim=1).flatten()
    return inv_freq, inv_freq, order


# How a family spreads its frequencies over the two axes: name -> (head_dim, theta) -> (row freqs, col
# freqs), ``head_dim//4`` float32 each, and optionally a third element, the ``(head_dim//2,)`` column
# order of the table: which of the ``[row angles | col angles]`` each rotation pair takes (default
# that order itself). "qwen": the same ``theta^(-4j/head_dim)`` on both axes (Qwen, GLM, ERNIE,
# PaddleOCR-VL); "interleaved": the ``head_dim//2`` 1D frequencies ``theta^(-2j/head_dim)``, even ones
# to rows and odd ones to columns (Pixtral); "kimi": Qwen's frequencies, the pairs alternating column,
# row, column, ... (Kimi-K2.5's MoonViT: complex pairs ``(x[2i], x[2i+1])`` in its release; transformers'
# rotate-half copy keeps this order of angles).
ROPE_FREQUENCIES = {"qwen": _axial_qwen, "interleaved": _axial_interleaved, "kimi": _axial_kimi}


def rope_axis_freqs(
    head_dim: int, theta: float = 10000.0, kind: str = "qwen"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, col)`` inverse frequencies of the 2D rotary embedding ``kind`` (see ``ROPE_FREQUENCIES``)."""
    try:
        build = ROPE_FREQUENCIES[kind]
    except KeyError:
        raise ValueError(
            f"unknown rotary frequency layout {kind!r}; known: {sorted(ROPE_FREQUENCIES)}"
        ) from None
    return tuple(build(head_dim, theta)[:2])


def rope_position_ids(grid_thw: list[tuple[int, int, int]], merge_size: int = 2) -> torch.Tensor:
    """``(N, 2)`` int64 (row, col) of every patch, in the 2x2 merge-block row order of the processor."""
    ids = []
    for t, h, w in grid_thw:
        rows = (
            torch.arange(h)
            .view(h // merge_size, merge_size, 1, 1)
            .expand(-1, -1, w // merge_size, merge_size)
        )
        cols = (
            torch.arange(w)
            .view(1, 1, w // merge_size, merge_size)
            .expand(h // merge_size, merge_size, -1, -1)
        )
        # (h/m, m_h, w/m, m_w) -> block-major (h/m, w/m, m_h, m_w)
        pos = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
        ids.append(pos.repeat(t, 1))
    return torch.cat(ids)


def rope_cos_sin(
    grid_thw: list[tuple[int, int, int]],
    head_dim: int,
    *,
    theta: float = 10000.0,
    merge_size: int = 2,
    device: torch.device | str | None = None,
    kind: str = "qwen",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(N, head_dim//2)`` float32: ``[row angles | col angles]`` per patch, with
    the frequency layout ``kind`` (see ``ROPE_FREQUENCIES``)."""
    rows, cols = rope_axis_freqs(head_dim, theta, kind)
    longest = max(max(h, w) for _, h, w in grid_thw)
    steps = torch.arange(longest, dtype=torch.float32)[:, None]
    pos = rope_position_ids(grid_thw, merge_size)
    # (N, head_dim/4) row angles | (N, head_dim/4) col angles
    freqs = torch.cat([(steps * rows)[pos[:, 0]], (steps * cols)[pos[:, 1]]], dim=1)
    layout = ROPE_FREQUENCIES[kind](head_dim, theta)
    if len(layout) > 2:  # the family's column order
        freqs = freqs[:, layout[2]]
    return freqs.cos().to(device), freqs.sin().to(device)


def rope_2d_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    math_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotation in plain torch, rotate-half pairing ``(i, i + d/2)``.

    ``q``, ``k``: ``(total, heads, head_dim)``; ``cos``, ``sin``: ``(total, head_dim//2)``.
    ``out[..., :d/2] = x1*cos - x2*sin``; ``out[..., d/2:] = x2*cos + x1*sin`` in ``math_dtype``, cast
    back to the input dtype. The default is fp32 math even for fp64 inputs, exactly as the Qwen towers
    of transformers do, so fp64 parity holds; ``math_dtype=None`` rotates in the inputs' own dtype
    (towers that rotate in the input dtype: Pixtral; the float64 yardstick of the benchmarks).
    """
    dtype = q.dtype if math_dtype is None else math_dtype
    c = cos[:, None, :].to(dtype)
    s = sin[:, None, :].to(dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def position_table_taps(
    grid_thw: list[tuple[int, int, int]], side: int, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's resampling of a ``(side, side)`` learned table to every patch: bilinear with
    ``align_corners=True`` (row ``i`` of an ``h``-row grid reads source row ``i*(side-1)/(h-1)``,
    border-clamped), as 4 gather indices ``(N, 4)`` into the flattened table and their ``(N, 4)``
    weights, in the processor's 2x2 block row order and repeated over t. Weights are computed in
    float32, as the release does, so fp64 models match it exactly.
    """
    pos = rope_position_ids(grid_thw, merge_size)  # (N, 2) (row, col), block-major
    counts = torch.tensor([t * h * w for t, h, w in grid_thw])
    sizes = torch.tensor([[h, w] for _, h, w in grid_thw]).repeat_interleave(counts, dim=0)  # (N, 2)
    offsets = torch.arange(2)
    taps, weights = [], []
    for axis in (0, 1):
        src = pos[:, axis].float() * (side - 1) / (sizes[:, axis] - 1).clamp(min=1)
        lo = src.floor()
        taps.append((lo.long()[:, None] + offsets).clamp(max=side - 1))
        weights.append((1 - (src[:, None] - lo[:, None] - offsets).abs()).clamp(min=0))
    index = (taps[0][:, :, None] * side + taps[1][:, None, :]).flatten(1)
    weight = (weights[0][:, :, None] * weights[1][:, None, :]).flatten(1)
    return index, weight
