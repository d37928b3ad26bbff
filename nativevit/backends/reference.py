"""The reference backends, in plain torch: ``torch`` (attention and rope) and ``padded`` (attention).

``torch`` is the reference every kernel is tested against; ``padded`` is the baseline every
benchmark compares with (what a padded ViT batch costs: every segment padded to the longest, one
batched SDPA with a key-padding mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import Segments, pad_segments, unpad_segments
from ..rope import rope_2d_ref
from .registry import Backend, register_backend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """SDPA on ``(B, L, H, D)`` tensors; returns ``(B, L, H, D)``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def varlen_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """The ``torch`` backend: one SDPA call per run of equal-length consecutive segments.

    ``q, k, v``: ``(total, heads, head_dim)``; returns the same shape in q's dtype. Never builds an
    N x N mask: memory is that of SDPA on the longest segment. Consecutive segments of the same length
    (video frames, uniform image sets) go through one batched call.
    """
    outs = []
    start, i, lengths = 0, 0, segments.lengths
    while i < len(lengths):
        n, j = lengths[i], i
        while j < len(lengths) and lengths[j] == n:
            j += 1
        if n > 0:
            stop = start + n * (j - i)
            shape = (j - i, n, *q.shape[1:])
            outs.append(
                _sdpa(
                    q[start:stop].view(shape), k[start:stop].view(shape), v[start:stop].view(shape), scale
                ).reshape(-1, *q.shape[1:])
            )
            start = stop
        i = j
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """The ``padded`` baseline: segments padded to ``max_seqlen``, one SDPA with a key-padding mask.

    Packed inputs ``(total, heads, head_dim)`` are padded here and unpadded after; inputs already in
    the padded layout (``segments.padded``: ``(S' * max_seqlen, heads, head_dim)``, as the padded
    baseline encoder keeps them in every layer) are used as they are.
    """
    _, mask, n_seg = segments.padded_layout()
    shape = (n_seg, segments.max_seqlen, *q.shape[1:])
    if segments.padded:
        out = _sdpa(q.view(shape), k.view(shape), v.view(shape), scale, mask=mask[:, None, None, :])
        return out.reshape(-1, *q.shape[1:])
    qp, kp, vp = (pad_segments(x, segments).view(shape) for x in (q, k, v))
    out = _sdpa(qp, kp, vp, scale, mask=mask[:, None, None, :])
    return unpad_segments(out.reshape(-1, *q.shape[1:]), segments)


register_backend("attention", Backend("torch", varlen_attention_ref))
register_backend("attention", Backend("padded", padded_attention, auto=False))
register_backend("rope", Backend("torch", rope_2d_ref))
