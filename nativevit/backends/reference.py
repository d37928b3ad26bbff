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
    (video frames, uniform image sets) go through one batched call. Under ``torch.compile`` it runs as
    the custom op ``nativevit::torch_varlen_attention``, which reads the lengths when it runs, so the
    graph holds no host read and no per-layout guard.
    """
    if torch.compiler.is_compiling():
        return torch.ops.nativevit.torch_varlen_attention(
            q, k, v, segments.cu_seqlens, segments.max_seqlen, scale
        )
    return _per_segment_sdpa(q, k, v, segments.lengths, scale)


def _per_segment_sdpa(q, k, v, lengths, scale: float) -> torch.Tensor:
    outs = []
    start, i = 0, 0
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


def _equal_runs(lengths) -> list[tuple[int, int, int]]:
    """``(first row, segments, length)`` of each run of consecutive equal-length, non-empty segments."""
    runs, start, i = [], 0, 0
    while i < len(lengths):
        n, j = lengths[i], i
        while j < len(lengths) and lengths[j] == n:
            j += 1
        if n > 0:
            runs.append((start, j - i, n))
            start += n * (j - i)
        i = j
    return runs


def _per_segment_sdpa_bwd(grad, q, k, v, lengths, scale: float):
    """Gradients of :func:`_per_segment_sdpa` by the attention backward formulas, per run of equal
    segments, in at least fp32: ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``,
    ``dQ = scale * dS K``, ``dK = scale * dS^T Q``."""
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    acc = torch.promote_types(q.dtype, torch.float32)
    for start, count, n in _equal_runs(lengths):
        rows = slice(start, start + count * n)

        def heads_first(x, rows=rows, count=count, n=n):
            return x[rows].reshape(count, n, *x.shape[1:]).transpose(1, 2).to(acc)  # (G, H, n, D)

        qs, ks, vs, do = (heads_first(x) for x in (q, k, v, grad))
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        out = p @ vs
        ds = p * (do @ vs.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
        for dst, val in (
            (dq, ds @ ks * scale),
            (dk, ds.transpose(-1, -2) @ qs * scale),
            (dv, p.transpose(-1, -2) @ do),
        ):
            dst[rows] = val.transpose(1, 2).reshape(-1, *dst.shape[1:]).to(dst.dtype)
    return dq, dk, dv


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    offsets = cu_seqlens.tolist()
    return [b - a for a, b in zip(offsets[:-1], offsets[1:])]


@torch.library.custom_op("nativevit::torch_varlen_attention", mutates_args=())
def _torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    return _per_segment_sdpa(q, k, v, _lengths(cu_seqlens), scale)


@_torch_varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("nativevit::torch_varlen_attention_bwd", mutates_args=())
def _torch_varlen_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _per_segment_sdpa_bwd(grad, q, k, v, _lengths(cu_seqlens), scale)


@_torch_varlen_attention_bwd.register_fake
def _(grad, q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.nativevit.torch_varlen_attention_bwd(
        grad.contiguous(), q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return dq, dk, dv, None, None, None


_torch_varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """The ``padded`` baseline: segments padded to ``max_seqlen``, one SDPA with a key-padding mask.

    Packed inputs ``(total, heads, head_dim)`` are padded here and unpadded after; inputs already in
    the padded layout (``segments.padded``: ``(S' * max_seqlen, heads, head_dim)``, as the padded
    baseline encoder keeps them in every layer) are used as they are.
    """
    _, mask = segments.padded_layout()
    shape = (*mask.shape, *q.shape[1:])
    if segments.padded:
        out = _sdpa(q.view(shape), k.view(shape), v.view(shape), scale, mask=mask[:, None, None, :])
        return out.reshape(-1, *q.shape[1:])
    qp, kp, vp = (pad_segments(x, segments).view(shape) for x in (q, k, v))
    out = _sdpa(qp, kp, vp, scale, mask=mask[:, None, None, :])
    return unpad_segments(out.reshape(-1, *q.shape[1:]), segments)


register_backend("attention", Backend("torch", varlen_attention_ref))
register_backend("attention", Backend("padded", padded_attention, auto=False))
register_backend("rope", Backend("torch", rope_2d_ref))
