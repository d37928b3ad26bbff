"""The reference backends, in plain torch: ``torch`` (attention and rope) and ``padded`` (attention).

``torch`` is the reference every kernel is tested against; ``padded`` is the baseline every
benchmark compares with (what a padded ViT batch costs: every segment padded to the longest, one
batched SDPA with a key-padding mask).

NaN and inf, the rule of every attention backend (tests/test_nan.py): each segment gets what SDPA's
math (``scaled_dot_product_attention``'s math backend) gives for that segment alone, so a NaN or an
inf never reaches another segment's rows. Inside the segment it goes by the scores
``q k^T * scale``: a row with a NaN or a +inf score is NaN, a key scoring -inf weighs 0, and a row
whose every score is -inf is 0 (SDPA's convention for a row with nothing to attend to). So a NaN in
a query row makes that row NaN, a NaN in a key every row of the segment, an inf in a query row its
row NaN (or 0 if all its scores are -inf); a NaN or inf in a value reaches its column of every row
of the segment (NaN or inf). SDPA's fused kernels depart from its math on such rows; the ``torch``
and ``padded`` backends correct them on CPU (one read of q and k per call to look for NaN/inf); on
CUDA, with no host read per layer, ``torch`` enforces the rule for NaN only and ``padded`` not at all.
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


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA's math on ``(B, L, H, D)`` tensors, in at least fp32: ``softmax(q k^T * scale) v``, a row
    whose every score is -inf giving 0. Returns ``(B, L, H, D)`` in q's dtype. Materialises the
    ``(B, H, L, L)`` scores: only for the segments that hold a NaN or an inf."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (x.transpose(1, 2).to(acc) for x in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * scale
    p = torch.softmax(s, dim=-1).masked_fill((s == float("-inf")).all(-1, keepdim=True), 0.0)
    return (p @ vh).transpose(1, 2).to(q.dtype)


def _all_finite(*xs: torch.Tensor) -> bool:
    """Whether ``xs`` hold no NaN and no inf, by one read of each (a host read: only called on CPU). A
    NaN or an inf makes the sum non-finite; finite values whose sum overflows only cost a needless
    exact check (:func:`_non_finite_as_math`)."""
    sums = [x.sum(dtype=torch.float32 if x.dtype == torch.float16 else None) for x in xs]
    return bool(torch.stack([t.float() for t in sums]).sum().isfinite())


def _non_finite_as_math(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """SDPA's output ``out`` ``(B, L, H, D)`` for segments ``q, k, v`` ``(B, L, H, D)``, with every
    segment whose q or k holds a NaN or an inf recomputed by :func:`_math_attention`. Segment ``b`` is
    the first ``lengths[b]`` rows of entry ``b`` (padded batches), or all ``L`` rows when ``lengths``
    is None. Reads flags on the host: for CPU tensors, after :func:`_all_finite` said no.

    SDPA's fused kernels depart from its math on such segments: the CPU one reads a row whose every
    score is NaN (a NaN query row) as fully masked and returns zeros, in bf16 a row with a +inf score
    too.
    """
    bad = ~(q.isfinite().flatten(1).all(1) & k.isfinite().flatten(1).all(1))
    out = out.clone()
    for b in bad.nonzero().flatten().tolist():
        n = q.shape[1] if lengths is None else lengths[b]
        out[b, :n] = _math_attention(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], scale)[0]
    return out


def _nan_rows_as_nan(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Off the CPU, where a host check of the inputs would stall every layer: ``out`` ``(B, L, H, D)``
    of unpadded segments ``q, k`` ``(B, L, H, D)`` with the rule for NaN enforced without one (a NaN
    in a query row makes its row NaN, a NaN key every row of its segment); inf is left to SDPA."""
    nan_rows = q.isnan().any(-1) | k.isnan().any(-1).any(1, keepdim=True)  # (B, L, H)
    return out.masked_fill(nan_rows[..., None], float("nan"))


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
    on_cpu = q.device.type == "cpu"
    exact = on_cpu and not _all_finite(q, k)  # one check per call, not per run
    outs = []
    start, i = 0, 0
    while i < len(lengths):
        n, j = lengths[i], i
        while j < len(lengths) and lengths[j] == n:
            j += 1
        if n > 0:
            stop = start + n * (j - i)
            shape = (j - i, n, *q.shape[1:])
            qs, ks, vs = (x[start:stop].view(shape) for x in (q, k, v))  # (segments, n, heads, head_dim)
            out = _sdpa(qs, ks, vs, scale)
            if exact:
                out = _non_finite_as_math(out, qs, ks, vs, scale)
            elif not on_cpu:
                out = _nan_rows_as_nan(out, qs, ks)
            outs.append(out.reshape(-1, *q.shape[1:]))
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
    baseline encoder keeps them in every layer) are used as they are. Returns the layout it was given,
    in q's dtype. NaN and inf as in the module docstring on CPU in eager mode; under ``torch.compile``
    and on CUDA, SDPA's fused kernels as they are (no host check of the inputs).
    """
    _, mask = segments.padded_layout()
    shape = (*mask.shape, *q.shape[1:])
    if segments.padded:
        qp, kp, vp = (x.view(shape) for x in (q, k, v))
    else:
        qp, kp, vp = (pad_segments(x, segments).view(shape) for x in (q, k, v))
    out = _sdpa(qp, kp, vp, scale, mask=mask[:, None, None, :])
    # the host read of the check would stall CUDA and break a compiled graph: CPU, eager only
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not _all_finite(qp, kp):
        out = _non_finite_as_math(out, qp, kp, vp, scale, [n for n in segments.lengths if n > 0])
    out = out.reshape(-1, *q.shape[1:])
    return out if segments.padded else unpad_segments(out, segments)


register_backend("attention", Backend("torch", varlen_attention_ref))
register_backend("attention", Backend("padded", padded_attention, auto=False))
register_backend("rope", Backend("torch", rope_2d_ref))
