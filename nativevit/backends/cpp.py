"""The ``cpu`` and ``cuda`` backends: C++ and CUDA kernels of ``nativevit._C`` (built from ``csrc/``).

``csrc/ops.cpp`` declares the ops in the ``nativevit`` namespace (shared with the Triton custom ops,
which are prefixed ``triton_``) and registers the CPU kernels of ``csrc/cpu/``; ``csrc/cuda/``
registers the CUDA ones. This module adds what torch needs around them -- fake (meta)
implementations for ``torch.compile`` and ``opcheck``, and autograd:

* ``nativevit::cpp_rope2d``: the backward is the inverse rotation, the same kernel with ``inverse=True``.
* ``nativevit::cpp_bias_quick_gelu_``: in place, no autograd (``nativevit.model.Mlp`` calls it only
  when none records).
* ``nativevit::cpp_varlen_attention``: the backward is ``nativevit::cpp_varlen_attention_bwd``, a
  recompute per segment from q, k, v: on CPU torch's fused flash-attention forward + backward, on
  CUDA ATen matmuls in fp32 (exact, not fused; query-chunked so the score tile stays bounded). It
  reads ``cu_seqlens`` on the host once. ``max_seqlen`` is a ``SymInt`` in both schemas, so
  ``torch.compile(dynamic=True)`` keeps it symbolic (no graph per value); the fakes and the autograd
  formula only pass it on.

The C++ ops check only what keeps them in bounds; inputs are validated by the public ops.

Both backends register with the registry whether or not ``_C`` was built; when it was not, their
``unavailable`` says so and ``auto`` quietly uses the other backends. Importing this module never fails.
"""

from __future__ import annotations

import torch

from ..packing import Segments
from .registry import Backend, register_backend

try:
    from .. import _C  # noqa: F401  (loading the library runs the TORCH_LIBRARY registrations)

    _LOAD_ERROR: str | None = None
except ImportError as e:  # not built (pure-Python install), or built against another torch
    _LOAD_ERROR = (
        f"nativevit._C was not built or does not load ({e}); reinstall with "
        "`pip install --no-build-isolation -e .` after torch"
    )

ATTENTION_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
ROPE_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_HEADS = 65535  # a grid dimension of the CUDA attention kernel


def is_built() -> bool:
    """Whether ``nativevit._C`` loaded."""
    return _LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether ``nativevit._C`` was built with its CUDA kernels (visible without a GPU)."""
    return is_built() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "nativevit::cpp_varlen_attention", "CUDA"
    )


def cpu_isa() -> str:
    """The CPU attention microkernels in use: "avx512_bf16", "avx512" or "generic"."""
    if not is_built():
        raise RuntimeError(_LOAD_ERROR)
    return torch.ops.nativevit.cpu_isa()


# ------------------------------------------------------------------ fake and autograd registrations

if is_built():

    @torch.library.register_fake("nativevit::cpp_rope2d")
    def _rope2d_fake(q, k, cos, sin, inverse=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _rope2d_setup_context(ctx, inputs, output):
        q, k, cos, sin, inverse = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse = inverse
        ctx.shapes = ((q.shape, q.dtype), (k.shape, k.dtype))

    def _rope2d_backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        # a gradient may be None (output unused) or an expanded view with stride 0 (from .sum())
        grad_q, grad_k = (
            g.contiguous() if g is not None else torch.zeros(shape, dtype=dtype, device=cos.device)
            for g, (shape, dtype) in zip((grad_q, grad_k), ctx.shapes, strict=True)
        )
        dq, dk = torch.ops.nativevit.cpp_rope2d(grad_q, grad_k, cos, sin, not ctx.inverse)
        return dq, dk, None, None, None

    torch.library.register_autograd(
        "nativevit::cpp_rope2d", _rope2d_backward, setup_context=_rope2d_setup_context
    )

    @torch.library.register_fake("nativevit::cpp_varlen_attention")
    def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("nativevit::cpp_varlen_attention_bwd")
    def _varlen_attention_bwd_fake(grad_out, q, k, v, cu_seqlens, max_seqlen, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("nativevit::cpp_bias_quick_gelu_")
    def _bias_quick_gelu_fake(x, bias):  # in place; the model calls it only without autograd
        return None

    def _varlen_attention_setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, scale = inputs
        ctx.save_for_backward(q, k, v, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale

    def _varlen_attention_backward(ctx, grad_out):
        q, k, v, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.nativevit.cpp_varlen_attention_bwd(
            grad_out.contiguous(), q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale
        )
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(
        "nativevit::cpp_varlen_attention",
        _varlen_attention_backward,
        setup_context=_varlen_attention_setup_context,
    )


# ------------------------------------------------------------------ backends


def _unavailable_on(device: str):
    def unavailable(device_type: str) -> str | None:
        if not is_built():
            return _LOAD_ERROR
        if device_type != device:
            return f"the {device} backend runs on {device} tensors only"
        if device == "cuda" and not has_cuda_kernels():
            return "nativevit._C was built without its CUDA kernels (no CUDA toolkit, or NATIVEVIT_SKIP_CUDA)"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    return unavailable


def _rejects(dtypes, max_head_dim=None, max_heads=None):
    def rejects(x: torch.Tensor) -> str | None:
        if x.dtype not in dtypes:
            return f"takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}; got {x.dtype}"
        if max_head_dim is not None and x.shape[-1] > max_head_dim:
            return f"head_dim must be <= {max_head_dim}, got {x.shape[-1]}"
        if max_heads is not None and x.shape[1] > max_heads:
            return f"at most {max_heads} heads, got {x.shape[1]}"
        return None

    return rejects


def csrc_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """Backend fn of ``cpu``/``cuda`` attention.

    ``q, k, v``: ``(total, heads, head_dim)`` of one dtype with ``stride(-1) == 1``; ``segments``: the
    batch's packed ``Segments``. Returns ``(total, heads, head_dim)`` contiguous in q's dtype.
    """
    return torch.ops.nativevit.cpp_varlen_attention(q, k, v, segments.cu_seqlens, segments.max_seqlen, scale)


def csrc_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend fn of ``cpu``/``cuda`` rope: one pass over q and k, fp32 math, contiguous outputs.

    ``q``, ``k``: ``(total, heads_q, head_dim)``, ``(total, heads_k, head_dim)`` of one dtype;
    ``cos``, ``sin``: ``(total, head_dim // 2)`` float32. Returns ``(q_rot, k_rot)``, same shapes and dtype.
    """
    # the public op allows any last-dim stride; the kernels read rows with unit stride (an empty tensor
    # counts as contiguous whatever its strides, so .contiguous() would keep them: copy instead)
    q, k = (x if x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format) for x in (q, k))
    return torch.ops.nativevit.cpp_rope2d(q, k, cos, sin, False)


for _device in ("cpu", "cuda"):
    _limits = (CUDA_MAX_HEAD_DIM, CUDA_MAX_HEADS) if _device == "cuda" else ()
    register_backend(
        "attention",
        Backend(
            _device, csrc_attention, _unavailable_on(_device), _rejects(ATTENTION_DTYPES[_device], *_limits)
        ),
    )
    register_backend(
        "rope", Backend(_device, csrc_rope, _unavailable_on(_device), _rejects(ROPE_DTYPES[_device]))
    )
