"""Block-diagonal varlen flash attention (FlashAttention-2 algorithm), forward and backward.

What it computes: for packed ``q, k, v: (total, heads, head_dim)`` and segments ``cu_seqlens``, each
token attends to the tokens of its own segment only (non-causal), ``softmax(q k^T * scale) v``. No
mask exists in memory: a program only ever loads rows of its own segment.

Forward: online softmax in base 2 (``qk_scale = scale * log2(e)``), fp32 accumulators, ``lse``
(natural log, ``(heads, total)`` fp32) saved for the backward. Backward: three kernels, no atomics,
so it is deterministic (bitwise, run to run) by construction:
``delta = rowsum(o * do)``; dk/dv by a program that owns a block of keys and loops over the
queries of its segment; dq by a program that owns a block of queries and loops over the keys.

Grid (no host sync per layer, no ``n_segments x max_seqlen`` programs): a list of work items
``(segment, block)``, one per ``BLOCK``-row block of every non-empty segment, is built on the host
from ``Segments.lengths`` (host ints already) once per batch and block size, uploaded once and
cached in the Segments' per-batch cache; every layer then launches ``(n_work_items, heads)``
programs. Skew costs nothing extra: one 16k image plus a hundred 64-token images launch
``16384/B + 100`` items, not ``101 * 16384/B``. Items are ordered longest segment first (the FA3
scheduler's order) so the long programs start early and the short ones fill the tail.
Zero-length segments have no items; one-token segments are one masked item. Under
``torch.compile`` the lists must exist before the graph runs: ``varlen_attention_prepare`` (the
backend's ``prepare`` hook, called by a model's plan) builds both directions' lists eagerly.

Head dim: ``tl.arange`` and ``tl.dot`` need power-of-two extents, so the head dim is split as
``D = D0 + D1`` with ``D0`` the largest power of two <= D and ``D1`` the remainder rounded up to a
power of two (>= 16, the smallest ``tl.dot`` extent), computed as two dots summed (QK^T) and two
accumulators (PV, dq, dk, dv). 80 = 64 + 16 and 96 = 64 + 32 do exactly the needed work (padding 80
to 128 would waste 37.5% of every matmul); 72 = 64 + 16 with 8 masked lanes (90% useful); 64 and
128 have no tail (``D1 = 0`` compiles the tail away).

Block sizes: ``BLOCK`` rows per program (the work-list granularity), ``inner`` rows per loop step,
per direction (forward and backward have their own work lists, both cached per batch). CUDA,
16-bit, sm_90: forward 128/64 (64/64 above head dim 96), backward 64/32, 8 warps; sm_80: forward
128/32, backward 64/32. fp32: 64/32 and 32/32, 4 warps. These were picked so that ptxas reports
no register spills at head dims <= 96 (sm_90) / <= 80 (sm_80) -- checked without a GPU by
tests/kernels/test_gpu_codegen.py -- and are not tuned for speed: no GPU was at hand.
Under ``TRITON_INTERPRET=1``: forward 32/16, backward 16/32, so small test segments span several
blocks and partial ones, and the two work lists differ.

Interpreter trap: triton 3.8's interpreter computes ``tl.dot`` on bf16 operands wrongly, so under
the interpreter the launcher sets ``UPCAST`` and bf16 dot operands are cast to fp32 after the same
bf16 rounding the GPU path applies (P and dS are still rounded to bf16 first); it also truncates
fp32 -> bf16 casts, so under the interpreter ``cast_rounded`` rounds to nearest even by hand. fp32 inputs use
``input_precision="ieee"`` (no TF32), so fp32 means fp32.

Inputs are validated once by the public op (``nativevit.ops.varlen_attention``); the backend only
declares what it refuses (``varlen_attention_rejects``) and the launchers assert just the layout that
keeps the kernels in bounds. Ops: ``nativevit::triton_varlen_attention_fwd``,
``nativevit::triton_varlen_attention_bwd``.

Reference: ``varlen_attention_ref`` (= ``nativevit.backends.reference.varlen_attention_ref``,
per-segment SDPA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nativevit.backends.reference import varlen_attention_ref as varlen_attention_ref
from nativevit.backends.registry import triton_interpreted
from nativevit.packing import Segments

__all__ = [
    "varlen_attention",
    "varlen_attention_fwd",
    "varlen_attention_bwd",
    "varlen_attention_prepare",
    "varlen_attention_ref",
    "varlen_attention_rejects",
    "work_items",
    "head_dim_split",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Set when the kernels were decorated: TRITON_INTERPRET only takes effect before triton is imported.
INTERPRETED = triton_interpreted()

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------- kernels


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
    """``x.to(dtype)``; with ``BF16_RTNE`` (interpreter, bf16) the fp32 -> bf16 rounding is done by hand.

    Triton 3.8's interpreter truncates fp32 -> bf16 (round toward zero) where the GPU rounds to
    nearest even, which biases every bf16 result by up to an ulp. Rounding the fp32 bits to nearest
    even first makes the value exact in bf16, so the interpreter's truncating cast is then exact.
    """
    if BF16_RTNE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, rows, row_mask, stride_tok, head_off, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):  # fmt: skip
    """``(len(rows), WIDTH)`` tile of columns ``COL0 ..`` of one head; out-of-range rows/columns read 0."""
    cols = COL0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(ptr + rows[:, None] * stride_tok + head_off + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, val, rows, row_mask, stride_tok, head_off, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr, BF16_RTNE: tl.constexpr):  # fmt: skip
    cols = COL0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    val = cast_rounded(val, ptr.dtype.element_ty, BF16_RTNE)
    tl.store(ptr + rows[:, None] * stride_tok + head_off + cols[None, :], val, mask=mask)


@triton.jit
def _work_item(work_ptr, cu_ptr, BLOCK: tl.constexpr):
    """(first row of the segment, its length, offsets of this item's rows within the segment)."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(work_ptr + 2 * pid)
    blk = tl.load(work_ptr + 2 * pid + 1)
    seg_start = tl.load(cu_ptr + seg)
    seqlen = tl.load(cu_ptr + seg + 1) - seg_start
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    return seg_start.to(tl.int64), seqlen, offs


@triton.jit
def _varlen_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, work_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1).to(tl.int64)
    seg_start, seqlen, offs_m = _work_item(work_ptr, cu_ptr, BLOCK_M)
    mask_m = offs_m < seqlen
    rows_m = seg_start + offs_m
    q0 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, 0, D0, HEAD_DIM)
    q1 = tl.zeros([BLOCK_M, D1_TILE], dtype=q_ptr.dtype.element_ty)
    if D1 > 0:
        q1 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, D0, D1, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1_TILE], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        rows_n = seg_start + offs_n
        k0 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, 0, D0, HEAD_DIM)
        s = _dot(q0, tl.trans(k0), UPCAST, PRECISION)
        if D1 > 0:
            k1 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, D0, D1, HEAD_DIM)
            s += _dot(q1, tl.trans(k1), UPCAST, PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # exponentials against 0 while a row has seen only -inf scores (inf inputs): those keys weigh
        # exp2(-inf) = 0, where exp2(-inf - -inf) = NaN would poison a row that SDPA's math keeps finite
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lo = cast_rounded(p, v_ptr.dtype.element_ty, BF16_RTNE)
        v0 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, 0, D0, HEAD_DIM)
        acc0 = acc0 * alpha[:, None] + _dot(p_lo, v0, UPCAST, PRECISION)
        if D1 > 0:
            v1 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, D0, D1, HEAD_DIM)
            acc1 = acc1 * alpha[:, None] + _dot(p_lo, v1, UPCAST, PRECISION)
        m_i = m_new

    # Every item has >= 1 valid key (segments of the work list are non-empty), so l_i >= 1 (the row
    # maximum contributes exp2(0)) unless every score of the row is -inf: then l_i = 0 and acc = 0,
    # and the row is 0 as in SDPA's math. A NaN score left l_i = NaN: a NaN row.
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    o_off = head * stride_o_head
    _store_rows(o_ptr, acc0 / l_div[:, None], rows_m, mask_m, stride_o_tok, o_off, 0, D0, HEAD_DIM, BF16_RTNE)
    if D1 > 0:
        _store_rows(
            o_ptr, acc1 / l_div[:, None], rows_m, mask_m, stride_o_tok, o_off, D0, D1, HEAD_DIM, BF16_RTNE
        )
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + head * stride_lse_head + rows_m, lse, mask=mask_m)


@triton.jit
def _varlen_attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, n_tokens,
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head, stride_delta_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """``delta[h, t] = sum_d o[t, h, d] * do[t, h, d]`` in fp32."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = rows < n_tokens
    o = _load_rows(o_ptr, rows, mask_t, stride_o_tok, head * stride_o_head, 0, BLOCK_D, HEAD_DIM)
    do = _load_rows(do_ptr, rows, mask_t, stride_do_tok, head * stride_do_head, 0, BLOCK_D, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head * stride_delta_head + rows, delta, mask=mask_t)


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, work_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head,
    stride_lse_head,
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):  # fmt: skip
    """A program owns BLOCK_N keys of one segment and head; loops over the segment's queries."""
    head = tl.program_id(1).to(tl.int64)
    seg_start, seqlen, offs_n = _work_item(work_ptr, cu_ptr, BLOCK_N)
    mask_n = offs_n < seqlen
    rows_n = seg_start + offs_n
    dtype = k_ptr.dtype.element_ty
    k0 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, 0, D0, HEAD_DIM)
    v0 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, 0, D0, HEAD_DIM)
    k1 = tl.zeros([BLOCK_N, D1_TILE], dtype=dtype)
    v1 = tl.zeros([BLOCK_N, D1_TILE], dtype=dtype)
    if D1 > 0:
        k1 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, D0, D1, HEAD_DIM)
        v1 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, D0, D1, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1_TILE], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1_TILE], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        rows_m = seg_start + offs_m
        q0 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, 0, D0, HEAD_DIM)
        do0 = _load_rows(do_ptr, rows_m, mask_m, stride_do_tok, head * stride_do_head, 0, D0, HEAD_DIM)
        lse = tl.load(lse_ptr + head * stride_lse_head + rows_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + head * stride_lse_head + rows_m, mask=mask_m, other=0.0)
        s_t = _dot(k0, tl.trans(q0), UPCAST, PRECISION)  # (BLOCK_N, BLOCK_M): S^T
        if D1 > 0:
            q1 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, D0, D1, HEAD_DIM)
            do1 = _load_rows(do_ptr, rows_m, mask_m, stride_do_tok, head * stride_do_head, D0, D1, HEAD_DIM)
            s_t += _dot(k1, tl.trans(q1), UPCAST, PRECISION)
        p_t = tl.where(mask_m[None, :], tl.math.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        p_lo = cast_rounded(p_t, dtype, BF16_RTNE)
        dv0 += _dot(p_lo, do0, UPCAST, PRECISION)
        dp_t = _dot(v0, tl.trans(do0), UPCAST, PRECISION)
        if D1 > 0:
            dv1 += _dot(p_lo, do1, UPCAST, PRECISION)
            dp_t += _dot(v1, tl.trans(do1), UPCAST, PRECISION)
        ds_t = cast_rounded(p_t * (dp_t - delta[None, :]), dtype, BF16_RTNE)
        dk0 += _dot(ds_t, q0, UPCAST, PRECISION)
        if D1 > 0:
            dk1 += _dot(ds_t, q1, UPCAST, PRECISION)

    _store_rows(
        dk_ptr, dk0 * scale, rows_n, mask_n, stride_dk_tok, head * stride_dk_head, 0, D0, HEAD_DIM, BF16_RTNE
    )
    _store_rows(dv_ptr, dv0, rows_n, mask_n, stride_dv_tok, head * stride_dv_head, 0, D0, HEAD_DIM, BF16_RTNE)
    if D1 > 0:
        _store_rows(
            dk_ptr,
            dk1 * scale,
            rows_n,
            mask_n,
            stride_dk_tok,
            head * stride_dk_head,
            D0,
            D1,
            HEAD_DIM,
            BF16_RTNE,
        )
        _store_rows(
            dv_ptr, dv1, rows_n, mask_n, stride_dv_tok, head * stride_dv_head, D0, D1, HEAD_DIM, BF16_RTNE
        )


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, work_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head,
    stride_lse_head,
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):  # fmt: skip
    """A program owns BLOCK_M queries of one segment and head; loops over the segment's keys."""
    head = tl.program_id(1).to(tl.int64)
    seg_start, seqlen, offs_m = _work_item(work_ptr, cu_ptr, BLOCK_M)
    mask_m = offs_m < seqlen
    rows_m = seg_start + offs_m
    dtype = q_ptr.dtype.element_ty
    q0 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, 0, D0, HEAD_DIM)
    do0 = _load_rows(do_ptr, rows_m, mask_m, stride_do_tok, head * stride_do_head, 0, D0, HEAD_DIM)
    q1 = tl.zeros([BLOCK_M, D1_TILE], dtype=dtype)
    do1 = tl.zeros([BLOCK_M, D1_TILE], dtype=dtype)
    if D1 > 0:
        q1 = _load_rows(q_ptr, rows_m, mask_m, stride_q_tok, head * stride_q_head, D0, D1, HEAD_DIM)
        do1 = _load_rows(do_ptr, rows_m, mask_m, stride_do_tok, head * stride_do_head, D0, D1, HEAD_DIM)
    lse = tl.load(lse_ptr + head * stride_lse_head + rows_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + head * stride_lse_head + rows_m, mask=mask_m, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1_TILE], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        rows_n = seg_start + offs_n
        k0 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, 0, D0, HEAD_DIM)
        v0 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, 0, D0, HEAD_DIM)
        s = _dot(q0, tl.trans(k0), UPCAST, PRECISION)
        dp = _dot(do0, tl.trans(v0), UPCAST, PRECISION)
        if D1 > 0:
            k1 = _load_rows(k_ptr, rows_n, mask_n, stride_k_tok, head * stride_k_head, D0, D1, HEAD_DIM)
            v1 = _load_rows(v_ptr, rows_n, mask_n, stride_v_tok, head * stride_v_head, D0, D1, HEAD_DIM)
            s += _dot(q1, tl.trans(k1), UPCAST, PRECISION)
            dp += _dot(do1, tl.trans(v1), UPCAST, PRECISION)
        p = tl.where(mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = cast_rounded(p * (dp - delta[:, None]), dtype, BF16_RTNE)
        dq0 += _dot(ds, k0, UPCAST, PRECISION)
        if D1 > 0:
            dq1 += _dot(ds, k1, UPCAST, PRECISION)

    _store_rows(
        dq_ptr, dq0 * scale, rows_m, mask_m, stride_dq_tok, head * stride_dq_head, 0, D0, HEAD_DIM, BF16_RTNE
    )
    if D1 > 0:
        _store_rows(
            dq_ptr,
            dq1 * scale,
            rows_m,
            mask_m,
            stride_dq_tok,
            head * stride_dq_head,
            D0,
            D1,
            HEAD_DIM,
            BF16_RTNE,
        )


# ------------------------------------------------------------------------- launch configuration


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """``(D0, D1)``: power-of-two main part and power-of-two tail (0 if none) covering ``head_dim``."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


@dataclass(frozen=True)
class LaunchConfig:
    """``block``: rows a program owns (the work-list granularity); ``inner``: rows per loop step."""

    block: int
    inner: int
    num_warps: int
    num_stages: int


def _arch(device: torch.device) -> int:
    """Compute capability as ``10 * major + minor`` (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _config(head_dim: int, dtype: torch.dtype, arch: int) -> tuple[LaunchConfig, LaunchConfig]:
    """(forward, backward) launch configurations for a CUDA compute capability (0: not CUDA).

    Chosen so that ptxas reports no register spills (``ptxas -v``; checked by
    tests/kernels/test_gpu_codegen.py) for head dims up to 96 on sm_90 and up to 80 on sm_80; not
    tuned for speed (no GPU was at hand). Head dim 128 spills a little in the backward.
    """
    if INTERPRETED or arch == 0:
        return LaunchConfig(32, 16, 4, 1), LaunchConfig(16, 32, 4, 1)
    if dtype == torch.float32:
        return LaunchConfig(64, 32, 4, 1), LaunchConfig(32, 32, 4, 1)
    bwd = LaunchConfig(64, 32, 8, 2)
    if arch >= 90:
        return (LaunchConfig(128, 64, 8, 2) if head_dim <= 96 else LaunchConfig(64, 64, 8, 2)), bwd
    return LaunchConfig(128, 32, 8, 2), bwd


def _build_work_list(lengths: tuple[int, ...], block: int, device: torch.device) -> torch.Tensor:
    """The work list of :func:`work_items` from host lengths: plain Python, one item per block."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep batch order
    items = [(s, b) for s in order for b in range(-(-lengths[s] // block))]
    work = torch.tensor(items, dtype=torch.int32).view(-1, 2).to(device)
    if not torch.compiler.is_compiling():  # built eagerly (prepare), then read by compiled code:
        # its length is unrelated to every other size, so keep torch.compile from assuming it equals
        # one that happened to match in the first batch (duck sizing), which would recompile later
        torch._dynamo.decorators.mark_unbacked(work, 0)
    return work


def work_items(segments: Segments, block: int) -> torch.Tensor:
    """``(n_items, 2)`` int32 ``(segment, block index)`` on the segments' device, longest segment first.

    Built from the host lengths once per (batch, block size) and kept in the Segments' per-batch
    cache, so the layers of one forward (and its backward) share one upload and never sync. Under
    ``torch.compile`` only a prebuilt list is read (:func:`varlen_attention_prepare` builds them
    eagerly); segments with no host lengths (raw ``cu_seqlens`` under compile) raise ``RuntimeError``.
    """
    device = segments.device
    key = ("nativevit.kernels.varlen_attention.work", block, device)
    if segments.lengths is None:  # Segments.traced: device offsets only, and a cache of their own
        raise RuntimeError(_NO_HOST_LENGTHS)
    return segments.cached(key, lambda: _build_work_list(segments.lengths, block, device))


_NO_HOST_LENGTHS = (
    "the triton attention backend schedules its programs from the host lengths of the segments, and raw "
    "cu_seqlens under torch.compile have none: build the batch's Segments outside the compiled code "
    "(nativevit.Segments(lengths, device), or NativeViT's plan), call "
    "nativevit.ops.resolve_backend('attention', 'triton', q).prepare(segments, q) on them, and pass the "
    "Segments to varlen_attention instead of cu_seqlens (a NativeViT model does all of this itself)"
)


def varlen_attention_prepare(segments: Segments, like: torch.Tensor) -> None:
    """``Backend.prepare`` of the ``triton`` attention backend: build (eagerly, into ``segments.cached``)
    the forward and backward work lists that :func:`varlen_attention` will read for inputs like ``like``
    (``(tokens, heads, head_dim)``, any token count: only its dtype, head dim and device choose the
    launch configuration). A batch's plan calls it before the compiled blocks run, so compiled code
    never builds a work list (that would read host lengths inside the graph)."""
    fwd, bwd = _config(like.shape[-1], like.dtype, _arch(like.device))
    for block in {fwd.block, bwd.block}:
        work_items(segments, block)


def varlen_attention_rejects(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take tensors like ``x`` (dtype, head dim), or None."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the triton attention kernel takes fp16/bf16/fp32, got {x.dtype}"
    d = x.shape[-1]
    if d % 8 or not 16 <= d <= MAX_HEAD_DIM:
        return f"the triton attention kernel takes head_dim a multiple of 8 in [16, {MAX_HEAD_DIM}], got {d}"
    return None


def _common_meta(head_dim: int, dtype: torch.dtype) -> dict:
    d0, d1 = head_dim_split(head_dim)
    return dict(
        HEAD_DIM=head_dim, D0=d0, D1=d1, D1_TILE=max(d1, 1),
        UPCAST=INTERPRETED and dtype == torch.bfloat16,
        BF16_RTNE=INTERPRETED and dtype == torch.bfloat16,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip


def _check_bounds(block: int, work: torch.Tensor, cfg: LaunchConfig, *rows: torch.Tensor) -> None:
    """What keeps a direct call of the ops in bounds: one work-list layout, the ``(total, heads,
    head_dim)`` tensors of one shape with unit last stride, int32 work items."""
    if any(x.shape != rows[0].shape or x.dim() != 3 or x.stride(-1) != 1 for x in rows):
        raise ValueError(
            f"q, k, v (and out, dout) must be (total, heads, head_dim) of one shape with stride(-1) == 1, "
            f"got {[(tuple(x.shape), x.stride()) for x in rows]}"
        )
    if block != cfg.block:
        raise ValueError(f"work list was built for block {block} but this launch uses block {cfg.block}")
    if work.dtype != torch.int32 or work.dim() != 2 or work.shape[1] != 2:
        raise ValueError(f"work must be an (n, 2) int32 tensor, got {work.dtype} {tuple(work.shape)}")


def _launch_fwd(q, k, v, cu_seqlens, work, block, scale):
    total, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    cfg, _ = _config(head_dim, q.dtype, _arch(q.device))
    _check_bounds(block, work, cfg, q, k, v)
    if work.shape[0] == 0 or heads == 0:
        return out, lse
    _varlen_attn_fwd_kernel[(work.shape[0], heads)](
        q, k, v, out, lse, cu_seqlens, work,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * _LOG2E,
        BLOCK_M=block, BLOCK_N=cfg.inner, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_common_meta(head_dim, q.dtype),
    )  # fmt: skip
    return out, lse


def _launch_bwd(dout, q, k, v, out, lse, cu_seqlens, work, block, scale):
    total, heads, head_dim = q.shape
    if dout.stride(-1) != 1:  # gradients can be expanded views with stride 0 (e.g. from .sum())
        dout = dout.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _, cfg = _config(head_dim, q.dtype, _arch(q.device))
    _check_bounds(block, work, cfg, q, k, v, out, dout)
    if lse.shape != (heads, total):
        raise ValueError(f"lse must have shape (heads, total) = {(heads, total)}, got {tuple(lse.shape)}")
    if work.shape[0] == 0 or heads == 0:
        return dq, dk, dv
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    block_t = 16
    _varlen_attn_bwd_delta_kernel[(triton.cdiv(total, block_t), heads)](
        out, dout, delta, total,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    meta = dict(
        scale=scale, qk_scale=scale * _LOG2E, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_common_meta(head_dim, q.dtype),
    )  # fmt: skip
    grid = (work.shape[0], heads)
    _varlen_attn_bwd_dkdv_kernel[grid](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, work,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0),
        BLOCK_M=cfg.inner, BLOCK_N=block, **meta,
    )  # fmt: skip
    _varlen_attn_bwd_dq_kernel[grid](
        q, k, v, dout, lse, delta, dq, cu_seqlens, work,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        lse.stride(0),
        BLOCK_M=block, BLOCK_N=cfg.inner, **meta,
    )  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------------- registration


@torch.library.custom_op("nativevit::triton_varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, work: torch.Tensor,
    block: int, bwd_work: torch.Tensor, bwd_block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out (total, heads, head_dim) contiguous in q's dtype, lse (heads, total) fp32, natural log)``.

    ``q, k, v``: ``(total, heads, head_dim)``, one shape and dtype, ``stride(-1) == 1``;
    ``cu_seqlens``: ``(S+1,)`` int32; ``work``/``block``: :func:`work_items` for the forward's block;
    ``bwd_work``/``bwd_block`` the same for the backward's (kept for autograd, so the backward needs
    no host lengths)."""
    return _launch_fwd(q, k, v, cu_seqlens, work, block, scale)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, work, block, bwd_work, bwd_block, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("nativevit::triton_varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, work: torch.Tensor, block: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)``, each ``(total, heads, head_dim)`` contiguous in q's dtype; deterministic (no
    atomics). ``dout``, ``out``: ``(total, heads, head_dim)`` (``dout`` any strides); ``lse``:
    ``(heads, total)`` fp32 from the forward; ``work``/``block``: the backward's work list."""
    return _launch_bwd(dout, q, k, v, out, lse, cu_seqlens, work, block, scale)


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, work, block, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, _, _, bwd_work, bwd_block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, bwd_work)
    ctx.block, ctx.scale = bwd_block, scale
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, work = ctx.saved_tensors
    dq, dk, dv = torch.ops.nativevit.triton_varlen_attention_bwd(
        dout, q, k, v, out, lse, cu_seqlens, work, ctx.block, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(
    "nativevit::triton_varlen_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """The ``triton`` attention backend: block-diagonal attention with the Triton kernels.

    ``q, k, v``: ``(total, heads, head_dim)``, one dtype (fp16, bf16 or fp32), only ``stride(-1) == 1``
    required (views of one fused qkv buffer are fine); ``segments``: the batch's packed ``Segments``
    covering ``total`` tokens; ``scale``: the softmax scale. All validated by the public op. Returns
    ``(total, heads, head_dim)`` contiguous in q's dtype, differentiable in q, k and v.
    """
    fwd, bwd = _config(q.shape[-1], q.dtype, _arch(q.device))
    work, bwd_work = work_items(segments, fwd.block), work_items(segments, bwd.block)
    out, _ = torch.ops.nativevit.triton_varlen_attention_fwd(
        q, k, v, segments.cu_seqlens, work, fwd.block, bwd_work, bwd.block, scale
    )
    return out
