"""Fused 2D RoPE: one launch rotates q and k of the Qwen2-VL vision tower.

What it fuses: the rotation of q and of k (read straight from the strided views of the fused qkv
output; only ``stride(-1) == 1`` is required), fp32 math, the cast back, for every head, in one
launch that reads each row of ``cos``/``sin`` once for all heads of q and k.

Convention (rotate-half, pairs ``(i, i + d/2)``), with ``cos, sin: (total, d/2)`` float32:
``out[..., :d/2] = x1*cos - x2*sin`` and ``out[..., d/2:] = x2*cos + x1*sin``. The backward is the
inverse rotation (``sin -> -sin``), so the same kernel serves both (``INVERSE``).

Grid: ``(cdiv(total, BLOCK_T),)``; a program owns ``BLOCK_T`` tokens and loops over the heads of q,
then of k, so cos/sin are loaded once per token. The half-dim tile is ``next_pow2(d/2)`` lanes with a
mask (``tl.arange`` needs powers of two): d=80 uses 64 lanes for 40 values, but the op is
memory-bound and masked lanes move no bytes, so nothing is paid for them in bandwidth.

Limits: fp16/bf16/fp32 inputs of one dtype, even head dim up to 512, q and k may have different head
counts. Inputs are validated by the public op (``nativevit.ops.apply_rope_2d``); the launcher only
asserts the shapes that keep the kernel in bounds.
Under the interpreter bf16 stores round by hand (``cast_rounded``: the interpreter truncates).
The in-place variant (``rope2d_``) writes through the views (into the qkv buffer); it has no
autograd (inference only). Ops: ``nativevit::triton_rope2d``, ``nativevit::triton_rope2d_``.
Reference: ``rope2d_ref`` (= ``nativevit.rope.rope_2d_ref``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nativevit.backends.registry import triton_interpreted
from nativevit.rope import rope_2d_ref as rope2d_ref

from .varlen_attention import cast_rounded

__all__ = ["rope2d", "rope2d_", "rope2d_fwd", "rope2d_ref", "SUPPORTED_DTYPES", "rope2d_rejects"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512

# Set when the kernels were decorated: TRITON_INTERPRET only takes effect before triton is imported.
INTERPRETED = triton_interpreted()


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, c, s, rows, mask, offs_d, n_heads,
    stride_x_tok, stride_x_head, stride_out_tok, stride_out_head,
    HALF: tl.constexpr, INVERSE: tl.constexpr, BF16_RTNE: tl.constexpr,
):  # fmt: skip
    for h in range(n_heads):
        x_base = x_ptr + rows[:, None] * stride_x_tok + h * stride_x_head + offs_d[None, :]
        x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + HALF, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            y1 = x1 * c + x2 * s
            y2 = x2 * c - x1 * s
        else:
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
        o_base = out_ptr + rows[:, None] * stride_out_tok + h * stride_out_head + offs_d[None, :]
        tl.store(o_base, cast_rounded(y1, out_ptr.dtype.element_ty, BF16_RTNE), mask=mask)
        tl.store(o_base + HALF, cast_rounded(y2, out_ptr.dtype.element_ty, BF16_RTNE), mask=mask)


@triton.jit
def _rope2d_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    n_tokens, n_heads_q, n_heads_k,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head,
    stride_cos_tok, stride_cos_d, stride_sin_tok, stride_sin_d,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, INVERSE: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (rows < n_tokens)[:, None] & (offs_d < HALF)[None, :]
    c = tl.load(
        cos_ptr + rows[:, None] * stride_cos_tok + offs_d[None, :] * stride_cos_d, mask=mask, other=0.0
    )
    s = tl.load(
        sin_ptr + rows[:, None] * stride_sin_tok + offs_d[None, :] * stride_sin_d, mask=mask, other=0.0
    )
    _rotate_heads(
        q_ptr, q_out_ptr, c, s, rows, mask, offs_d, n_heads_q,
        stride_q_tok, stride_q_head, stride_qo_tok, stride_qo_head, HALF, INVERSE, BF16_RTNE,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, c, s, rows, mask, offs_d, n_heads_k,
        stride_k_tok, stride_k_head, stride_ko_tok, stride_ko_head, HALF, INVERSE, BF16_RTNE,
    )  # fmt: skip


# ------------------------------------------------------------------------- launcher


def rope2d_rejects(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take q like ``x`` (dtype, head dim), or None. The public op has checked
    the rest: 3-D, even head dim, shapes and devices of k, cos and sin."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the triton rope kernel takes fp16/bf16/fp32, got {x.dtype}"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"the triton rope kernel takes head_dim <= {MAX_HEAD_DIM}, got {x.shape[-1]}"
    return None


def _check_same_dtype(q: torch.Tensor, k: torch.Tensor) -> None:
    # one dtype for q and k: what ``rejects`` (which sees q only) cannot say
    if q.dtype != k.dtype:
        raise TypeError(f"the triton rope kernel needs q and k of the same dtype, got {q.dtype}, {k.dtype}")


def _check_bounds(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The shapes the kernel indexes with, so that a direct call never reads out of bounds."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in tokens or head_dim")
    expected = (q.shape[0], q.shape[-1] // 2)
    for name, shape in (("cos", tuple(cos.shape)), ("sin", tuple(sin.shape))):
        if shape != expected:
            raise ValueError(f"{name} must have shape (total, head_dim//2) = {expected}, got {shape}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Gradients can arrive as expanded views (stride 0 everywhere, e.g. from ``.sum()``).
    return x if x.stride(-1) == 1 else x.contiguous()


def rope2d_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    inverse: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: rotate ``q``, ``k`` ``(total, heads, head_dim)`` (by ``-angle`` if ``inverse``)
    into ``q_out``/``k_out`` (new contiguous tensors when None; pass ``q``/``k`` themselves to rotate in
    place). ``cos``, ``sin``: ``(total, head_dim // 2)`` float32."""
    _check_bounds(q, k, cos, sin)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    n_tokens, head_dim = q.shape[0], q.shape[-1]
    if n_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_t = 16 if INTERPRETED else max(1, min(16, 2048 // triton.next_power_of_2(half)))
    _rope2d_fwd_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, q_out, k_out, cos, sin,
        n_tokens, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_T=block_t, INVERSE=inverse,
        BF16_RTNE=INTERPRETED and q.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


# ------------------------------------------------------------------------- registration


@torch.library.custom_op("nativevit::triton_rope2d", mutates_args=())
def _rope2d_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope2d_fwd(q, k, cos, sin, inverse=inverse)


@_rope2d_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope2d_setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope2d_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("nativevit::triton_rope2d has no gradient for cos/sin (they are position tables)")
    grad_q, grad_k = torch.ops.nativevit.triton_rope2d(grad_q, grad_k, cos, sin, not ctx.inverse)
    return grad_q, grad_k, None, None, None


torch.library.register_autograd(
    "nativevit::triton_rope2d", _rope2d_backward, setup_context=_rope2d_setup_context
)


@torch.library.custom_op("nativevit::triton_rope2d_", mutates_args=("q", "k"))
def _rope2d_inplace_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> None:
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("in-place rope needs stride(-1) == 1 for q and k")
    rope2d_fwd(q, k, cos, sin, inverse=inverse, q_out=q, k_out=k)


@_rope2d_inplace_op.register_fake
def _(q, k, cos, sin, inverse):
    return None


def rope2d(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``triton`` rope backend: out-of-place 2D RoPE, differentiable in q and k.

    ``q``, ``k``: ``(total, heads_q, head_dim)`` and ``(total, heads_k, head_dim)``, one dtype (fp16,
    bf16 or fp32), validated by the public op; ``cos``, ``sin``: ``(total, head_dim // 2)`` float32.
    Returns new contiguous ``(q_rot, k_rot)`` of the same shapes and dtype.
    """
    _check_same_dtype(q, k)
    return torch.ops.nativevit.triton_rope2d(q, k, cos, sin, False)


def rope2d_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place 2D RoPE: rotates ``q`` and ``k`` where they live (e.g. inside the fused qkv buffer).

    Same shapes and dtypes as :func:`rope2d`; not behind a public op, so it checks its inputs here.
    Inference only: raises if autograd would need to see the rotation. Returns ``(q, k)``.
    """
    for name, x in (("q", q), ("k", k)):
        why = rope2d_rejects(x)
        if why is not None:
            raise (TypeError if x.dtype not in SUPPORTED_DTYPES else ValueError)(f"{name}: {why}")
    _check_same_dtype(q, k)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("rope2d_ is in-place and has no autograd; use rope2d (out of place) for training")
    if q.data_ptr() == k.data_ptr() and q.numel():
        raise ValueError("rope2d_ got q and k at the same address: in place, k would be rotated twice")
    torch.ops.nativevit.triton_rope2d_(q, k, cos, sin, False)
    return q, k
