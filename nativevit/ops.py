"""Public ops and backend resolution, in one place.

Two ops carry the encoder's non-GEMM work:

* ``varlen_attention(q, k, v, cu_seqlens, max_seqlen)`` -- block-diagonal (non-causal) attention
  over packed segments, ``q, k, v: (total, heads, head_dim)``.
* ``apply_rope_2d(q, k, cos, sin)`` -- the 2D rotary embedding, rotate-half convention.

Each op has several backends (see the table in the README). ``backend="auto"`` picks the first
available backend in ``_AUTO_ORDER`` for the tensors' device that accepts them; an explicitly
requested backend that cannot run raises an error that says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import Segments, pad_segments, unpad_segments
from .rope import rope_2d_ref

# ------------------------------------------------------------------------- reference backends


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

    Never builds an N x N mask: memory is that of SDPA on the longest segment. Consecutive
    segments of the same length (video frames, uniform image sets) go through one batched call.
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
    """The ``padded`` baseline: every segment padded to ``max_seqlen``, one batched SDPA with a
    key-padding mask. What a padded ViT batch (e.g. timm NaFlexViT) costs.

    Packed inputs are padded here and unpadded after; inputs already in the padded layout
    (``segments.padded``, as the padded baseline encoder keeps them in every layer) are used as they are.
    """
    _, mask, n_seg = segments.padded_layout()
    shape = (n_seg, segments.max_seqlen, *q.shape[1:])
    if segments.padded:
        out = _sdpa(q.view(shape), k.view(shape), v.view(shape), scale, mask=mask[:, None, None, :])
        return out.reshape(-1, *q.shape[1:])
    qp, kp, vp = (pad_segments(x, segments).view(shape) for x in (q, k, v))
    out = _sdpa(qp, kp, vp, scale, mask=mask[:, None, None, :])
    return unpad_segments(out.reshape(-1, *q.shape[1:]), segments)


# ------------------------------------------------------------------------- backend registry


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``fn`` takes ``(q, k, v, segments, scale)`` for attention and ``(q, k, cos, sin)`` for rope.
    ``unavailable(device_type)`` returns why the backend cannot run there, or None.
    ``rejects(tensor)`` returns why it cannot take this input (dtype, head dim), or None.
    """

    name: str
    fn: Callable
    unavailable: Callable[[str], str | None]
    rejects: Callable[[torch.Tensor], str | None] = lambda x: None


def _anywhere(device_type: str) -> str | None:
    return None


_BACKENDS: dict[str, dict[str, Backend]] = {
    "attention": {
        "torch": Backend("torch", varlen_attention_ref, _anywhere),
        "padded": Backend("padded", padded_attention, _anywhere),
    },
    "rope": {
        "torch": Backend("torch", rope_2d_ref, _anywhere),
    },
}

# Fastest first. ``auto`` never picks ``padded`` (a baseline) or an interpreted Triton kernel.
_AUTO_ORDER = {
    "attention": {"cuda": ("flash_attn", "triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "rope": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
}


def register_backend(op: str, backend: Backend) -> None:
    """Add (or replace) a backend of ``op`` ("attention" or "rope")."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_BACKENDS)}")
    _BACKENDS[op][backend.name] = backend


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """Backends of each op that can run on ``device`` (default: this machine, any device)."""
    device_types = [torch.device(device).type] if device is not None else _device_types()
    return {
        op: [name for name, b in backends.items() if any(b.unavailable(dt) is None for dt in device_types)]
        for op, backends in _BACKENDS.items()
    }


def _device_types() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> Backend:
    """The backend that will run ``op`` on tensors like ``x``."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_BACKENDS)}")
    device_type = x.device.type
    if backend == "auto":
        for name in _AUTO_ORDER[op].get(device_type, ("torch",)):
            b = _BACKENDS[op].get(name)
            if b is not None and b.unavailable(device_type) is None and b.rejects(x) is None:
                return b
        return _BACKENDS[op]["torch"]
    b = _BACKENDS[op].get(backend)
    if b is None:
        raise ValueError(f"unknown {op} backend {backend!r}; known: {sorted(_BACKENDS[op])} (or 'auto')")
    why = b.unavailable(device_type) or b.rejects(x)
    if why is not None:
        raise RuntimeError(f"{op} backend {backend!r} cannot run on {device_type} tensors: {why}")
    return b


# ------------------------------------------------------------------------- public ops


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
        q, k, v: ``(total, heads, head_dim)``; only ``stride(-1) == 1`` is required.
        cu_seqlens: ``(S+1,)`` int32 offsets (validated here, one host read), or a ``Segments``
            built once per batch (not re-validated: the encoder passes this in every layer).
        max_seqlen: longest segment; derived from ``cu_seqlens`` when omitted.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: "auto" or a name from ``available_backends()["attention"]``.

    Returns ``(total, heads, head_dim)`` in the dtype of ``q``.
    """
    _check_qkv(q, k, v)
    if isinstance(cu_seqlens, Segments):
        segments = cu_seqlens
        if segments.num_rows != q.shape[0]:
            raise ValueError(f"segments describe {segments.num_rows} rows but q has {q.shape[0]}")
        if segments.padded and backend != "padded":
            raise ValueError(f"padded-layout segments need backend='padded', got {backend!r}")
    else:
        segments = Segments.from_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if segments.cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {segments.cu_seqlens.device} but q is on {q.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return resolve_backend("attention", backend, q).fn(q, k, v, segments, scale)


def apply_rope_2d(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by the 2D rotary embedding (rotate-half convention of Qwen2-VL).

    ``q``, ``k``: ``(total, heads, head_dim)`` (strided views of a fused qkv output are fine);
    ``cos``, ``sin``: ``(total, head_dim//2)`` float32. Returns ``(q_rot, k_rot)`` in the input dtype.
    """
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if x.dim() != 3 or x.shape[-1] % 2:
            raise ValueError(f"{name} must have shape (total, heads, even head_dim), got {tuple(x.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in tokens or head_dim")
    expected = (q.shape[0], q.shape[-1] // 2)
    for name, x in (("cos", cos), ("sin", sin)):
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
        if tuple(x.shape) != expected:
            raise ValueError(
                f"{name} must have shape (total, head_dim//2) = {expected}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    return resolve_backend("rope", backend, q).fn(q, k, cos, sin)


# ------------------------------------------------------------------------- optional backends


def _flash_attn_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return "flash_attn runs on CUDA GPUs only"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash_attn package is not installed"
    return None


def _flash_attn_rejects(x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn takes fp16/bf16 only, got {x.dtype}"
    return None


def _flash_attn(q, k, v, segments: Segments, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens
    return flash_attn_varlen_func(
        q, k, v, cu, cu, segments.max_seqlen, segments.max_seqlen, softmax_scale=scale
    )


register_backend(
    "attention", Backend("flash_attn", _flash_attn, _flash_attn_unavailable, _flash_attn_rejects)
)


def _load_builtin_backends() -> None:
    """Import the modules that register the kernel backends. Each registers its backends even when
    it cannot run here (their ``unavailable`` says why), so an explicit request explains itself."""
    import importlib

    for module in ("nativevit.kernels", "nativevit.csrc"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


_load_builtin_backends()
