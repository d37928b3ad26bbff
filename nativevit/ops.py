"""The public ops. Inputs are validated here, once; backends (``nativevit.backends``) only run them.

Two ops carry the encoder's non-GEMM work:

* ``varlen_attention(q, k, v, cu_seqlens, max_seqlen)`` -- block-diagonal (non-causal) attention
  over packed segments, ``q, k, v: (total, heads, head_dim)``.
* ``apply_rope_2d(q, k, cos, sin)`` -- the 2D rotary embedding, rotate-half convention.

``backend="auto"`` picks the fastest backend available for the tensors' device that accepts them;
an explicitly requested backend that cannot run raises an error that says why
(``backend_status()`` lists every backend and why it can or cannot run here).
"""

from __future__ import annotations

import math

import torch

from .backends import Backend, available_backends, backend_status, register_backend, resolve_backend
from .packing import Segments

__all__ = [
    "Backend",
    "apply_rope_2d",
    "available_backends",
    "backend_status",
    "register_backend",
    "resolve_backend",
    "varlen_attention",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last dimension, got {x.stride()}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Segments,
    max_seqlen: int | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-diagonal attention over packed segments.

    Args:
        q, k, v: ``(total, heads, head_dim)``, one floating dtype; only ``stride(-1) == 1`` is required.
        cu_seqlens: ``(S+1,)`` int32 offsets, any stride (validated here, one host read), or the
            batch's ``Segments`` (built once per batch, not re-validated: the encoder passes them to
            every layer).
        max_seqlen: longest segment; derived from ``cu_seqlens`` when omitted.
        scale: softmax scale, finite and > 0; default ``head_dim ** -0.5``.
        backend: "auto" or a name from ``available_backends()["attention"]``.

    Returns ``(total, heads, head_dim)`` in the dtype of ``q``.

    NaN and inf: every backend gives each segment what SDPA's math gives for that segment alone, and
    never touches another segment's rows: a row with a NaN or +inf score is NaN (a NaN query row; every
    row of a segment with a NaN key), a key scoring -inf weighs 0, a row whose every score is -inf is 0,
    and a NaN or inf value reaches its column of every row of its segment (details and the CUDA limits
    of ``torch``/``padded``: ``nativevit.backends.reference``).

    Under ``torch.compile`` the host-side checks (the contents of ``cu_seqlens``, its device, the
    row count of ``Segments``, ``scale``) are skipped, so nothing reads ``cu_seqlens`` inside the graph:
    pass ``max_seqlen`` as an int there. The tensor checks (shapes, dtypes, strides) still run.
    """
    _check_qkv(q, k, v)
    if torch.compiler.is_compiling():
        if isinstance(cu_seqlens, Segments):
            segments = cu_seqlens
        elif max_seqlen is None:
            raise ValueError(
                "under torch.compile pass max_seqlen (an int): it cannot be read from cu_seqlens"
            )
        else:
            segments = Segments.traced(cu_seqlens, max_seqlen)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return resolve_backend("attention", backend, q).fn(q, k, v, segments, scale)
    if isinstance(cu_seqlens, Segments):
        segments = cu_seqlens
        if segments.num_rows != q.shape[0]:
            raise ValueError(f"segments describe {segments.num_rows} rows but q has {q.shape[0]}")
        if segments.padded and backend != "padded":
            raise ValueError(f"padded-layout segments need backend='padded', got {backend!r}")
    else:
        segments = Segments.from_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if segments.device != q.device:
        raise ValueError(f"cu_seqlens is on {segments.device} but q is on {q.device}")
    scale = _check_scale(scale, q.shape[-1])
    return resolve_backend("attention", backend, q).fn(q, k, v, segments, scale)


def apply_rope_2d(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the 2D rotary embedding (rotate-half convention of Qwen2-VL).

    ``q``, ``k``: ``(total, heads, head_dim)`` floating, ``stride(-1) == 1`` not required (strided views
    of a fused qkv output are fine); ``cos``, ``sin``: ``(total, head_dim//2)`` float32 on q's device.
    ``out[..., :d/2] = x1*cos - x2*sin``, ``out[..., d/2:] = x2*cos + x1*sin`` in fp32 math.
    Returns ``(q_rot, k_rot)`` in the input dtypes and shapes.
    """
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if x.dim() != 3 or x.shape[-1] % 2:
            raise ValueError(f"{name} must have shape (total, heads, even head_dim), got {tuple(x.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in tokens or head_dim")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    expected = (q.shape[0], q.shape[-1] // 2)
    for name, x in (("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
        if tuple(x.shape) != expected:
            raise ValueError(
                f"{name} must have shape (total, head_dim//2) = {expected}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    return resolve_backend("rope", backend, q).fn(q, k, cos, sin)
