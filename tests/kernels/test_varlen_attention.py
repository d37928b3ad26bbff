"""Triton varlen flash attention against ``varlen_attention_ref`` (FlashAttention's error rule).

On a machine without a GPU these run through the Triton interpreter (``TRITON_INTERPRET=1`` is set by
tests/conftest.py), so shapes are small; the CUDA tests at the bottom use realistic ones. Segment
layouts and head dims are the shared ones of tests/kernel_cases.py (the C++ kernels run them too).
"""

from __future__ import annotations

import subprocess
import sys

import kernel_cases as kc
import pytest
import torch
from flash_rule import check_rule
from nativevit.kernels import varlen_attention as va

import nativevit as nv

pytestmark = pytest.mark.skipif(
    "triton" not in nv.ops.available_backends()["attention"],
    reason="triton attention backend unavailable (no GPU and no TRITON_INTERPRET=1)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 96 = 64 + 32: the one head-dim split with a 32-wide tail
HEAD_DIMS = (*kc.HEAD_DIMS, 96)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def segments_of(lengths, device=DEVICE) -> nv.Segments:
    return kc.segments_of(lengths, device)


def fused_qkv(total, heads, head_dim, dtype, seed=0):
    """q, k, v as strided views of one (total, 3, heads, head_dim) buffer, as the encoder makes them."""
    return kc.fused_qkv(total, heads, head_dim, dtype, seed=seed, device=DEVICE).requires_grad_()


def run(fn, qkv, segments, dout, scale):
    """Forward and backward of ``fn`` on views of ``qkv``; returns (out, dq, dk, dv)."""
    q, k, v = qkv.unbind(1)
    out = fn(q, k, v, segments, scale)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    return (out, *grad.unbind(1))


def check_against_reference(lengths, heads, head_dim, dtype, *, seed=0, scale=None) -> dict[str, float]:
    segments = segments_of(lengths)
    total = sum(lengths)
    scale = head_dim**-0.5 if scale is None else scale
    qkv = fused_qkv(total, heads, head_dim, dtype, seed)
    dout = torch.randn(total, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(qkv)
    kernel = run(va.varlen_attention, qkv, segments, dout, scale)
    torch_same = run(va.varlen_attention_ref, qkv, segments, dout, scale)
    exact = run(
        va.varlen_attention_ref, qkv.detach().double().requires_grad_(), segments, dout.double(), scale
    )
    ratios = {}
    for name, a, b, r, factor in zip(
        ("out", "dq", "dk", "dv"), kernel, torch_same, exact, (2, 3, 3, 3), strict=True
    ):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}, expected {dtype}"
        ratios[name] = check_rule(f"{name} {dtype} d={head_dim} lengths={lengths}", a, b, r, factor)
    return ratios


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_matches_reference(head_dim, dtype):
    check_against_reference(kc.LAYOUTS["awkward"], 2, head_dim, dtype)


@pytest.mark.parametrize("layout", list(kc.LAYOUTS))
def test_segment_layouts(layout):
    # one head: the interpreter pays per program, and the head offsets are covered above
    check_against_reference(kc.LAYOUTS[layout], 1, 80, torch.float16, seed=3)


def test_softmax_scale_and_one_head():
    check_against_reference([29, 7], 1, 64, torch.float32, scale=0.3)


def test_expanded_grad_from_sum():
    """``out.sum()`` hands the backward a stride-0 expanded gradient; it must be read as ones."""
    segments = segments_of([21, 1, 12])
    qkv = fused_qkv(34, 2, 80, torch.float32)
    q, k, v = qkv.unbind(1)
    va.varlen_attention(q, k, v, segments, 80**-0.5).sum().backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    va.varlen_attention_ref(q, k, v, segments, 80**-0.5).sum().backward()
    torch.testing.assert_close(grad, qkv.grad, rtol=1e-4, atol=1e-5)


def test_backward_is_deterministic():
    segments = segments_of([40, 3, 17])
    qkv = fused_qkv(60, 2, 80, torch.float16)
    dout = torch.randn(60, 2, 80).to(qkv)
    first = run(va.varlen_attention, qkv, segments, dout, 0.1)
    second = run(va.varlen_attention, qkv, segments, dout, 0.1)
    for a, b, name in zip(first, second, ("out", "dq", "dk", "dv"), strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_matches_through_public_op_and_cu_seqlens():
    """``nv.ops.varlen_attention(..., backend="triton")`` with a raw cu_seqlens tensor."""
    lengths = [9, 0, 30]
    qkv = fused_qkv(39, 2, 64, torch.float32).detach()
    q, k, v = qkv.unbind(1)
    cu = segments_of(lengths).cu_seqlens
    out = nv.ops.varlen_attention(q, k, v, cu, backend="triton")
    ref = nv.ops.varlen_attention(q, k, v, cu, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- grid / work list


@pytest.mark.parametrize("block", [16, 32, 128])
def test_work_items_cover_every_block_once_longest_first(block):
    lengths = [5, 0, 200, 1, 33, 0, 64, 65]
    segments = segments_of(lengths)
    work = va.work_items(segments, block).cpu()
    expected = {(s, b) for s, n in enumerate(lengths) for b in range(-(-n // block))}
    items = [tuple(row) for row in work.tolist()]
    assert len(items) == len(expected) and set(items) == expected
    seg_lengths = [lengths[s] for s, _ in items]
    assert seg_lengths == sorted(seg_lengths, reverse=True), "work items are not longest segment first"
    assert va.work_items(segments, block) is va.work_items(segments, block), "work list is not cached"


def test_skew_launches_no_segments_times_max_programs():
    lengths = [4096] + [16] * 300
    work = va.work_items(segments_of(lengths, "cpu"), 128)
    assert work.shape[0] == 4096 // 128 + 300  # a (segments x max_seqlen/128) grid would be 301 * 32


@pytest.mark.parametrize("head_dim,split", [(64, (64, 0)), (72, (64, 16)), (80, (64, 16)), (96, (64, 32)),
                                            (128, (128, 0)), (16, (16, 0)), (40, (32, 16))])  # fmt: skip
def test_head_dim_split_does_no_more_work_than_needed(head_dim, split):
    d0, d1 = va.head_dim_split(head_dim)
    assert (d0, d1) == split
    assert d0 + d1 >= head_dim and d0 & (d0 - 1) == 0 and (d1 == 0 or d1 & (d1 - 1) == 0)


# ------------------------------------------------------------------------- registration


def fwd_args(q, k, v, segments, scale):
    fwd, bwd = va._config(q.shape[-1], q.dtype, va._arch(q.device))
    work, bwd_work = va.work_items(segments, fwd.block), va.work_items(segments, bwd.block)
    return (q, k, v, segments.cu_seqlens, work, fwd.block, bwd_work, bwd.block, scale)


def test_opcheck_forward_and_backward():
    segments = segments_of([9, 0, 1, 20])
    qkv = fused_qkv(30, 1, 16, torch.float32)
    q, k, v = qkv.unbind(1)
    args = fwd_args(q, k, v, segments, 0.25)
    torch.library.opcheck(torch.ops.nativevit.triton_varlen_attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.nativevit.triton_varlen_attention_fwd(*args)
        qd, kd, vd = (x.detach() for x in (q, k, v))
    bwd_work, bwd_block = args[6], args[7]
    bwd_args = (torch.randn_like(out), qd, kd, vd, out, lse, segments.cu_seqlens, bwd_work, bwd_block, 0.25)
    torch.library.opcheck(torch.ops.nativevit.triton_varlen_attention_bwd.default, bwd_args)


def test_work_list_of_another_block_size_is_refused():
    segments = segments_of([9, 20])
    q, k, v = fused_qkv(29, 1, 16, torch.float32).detach().unbind(1)
    args = list(fwd_args(q, k, v, segments, 0.25))
    args[5] *= 2
    with pytest.raises(ValueError, match="work list was built for block"):
        torch.ops.nativevit.triton_varlen_attention_fwd(*args)


def test_raw_ops_refuse_layouts_that_leave_bounds():
    """Called directly (no public op in front), the ops still never index out of bounds."""
    segments = segments_of([9, 20])
    q, k, v = fused_qkv(29, 1, 16, torch.float32).detach().unbind(1)
    args = list(fwd_args(q, k, v, segments, 0.25))
    with pytest.raises(ValueError, match="one shape"):
        torch.ops.nativevit.triton_varlen_attention_fwd(q, k[:20], *args[2:])
    with pytest.raises(ValueError, match="stride"):
        wide = torch.randn(29, 1, 32, device=DEVICE)[..., ::2]
        torch.ops.nativevit.triton_varlen_attention_fwd(wide, wide, wide, *args[3:])


def test_lse_is_the_log_sum_exp():
    segments = segments_of([13, 0, 6])
    q, k, v = fused_qkv(19, 2, 16, torch.float32).detach().unbind(1)
    _, lse = torch.ops.nativevit.triton_varlen_attention_fwd(*fwd_args(q, k, v, segments, 0.5))
    expected = []
    for a, b in ((0, 13), (13, 19)):
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[a:b].double()) * 0.5
        expected.append(scores.logsumexp(-1))
    torch.testing.assert_close(lse.double(), torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    segments = segments_of([11, 0, 20])
    qkv = fused_qkv(31, 2, 80, torch.float32)
    q, k, v = qkv.unbind(1)
    compiled = torch.compile(
        lambda q, k, v: va.varlen_attention(q, k, v, segments, 80**-0.5), fullgraph=True, backend="aot_eager"
    )
    out = compiled(q, k, v)
    out.square().sum().backward()
    grad, qkv.grad = qkv.grad.clone(), None
    ref = va.varlen_attention_ref(q, k, v, segments, 80**-0.5)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, qkv.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- bad input


def test_rejects_bad_input():
    """The public op validates once and names the problem; the backend declares what it refuses."""
    segments = segments_of([4, 4])
    q = torch.randn(8, 2, 64, device=DEVICE)

    def attend(q, k, v, cu=segments):
        return nv.ops.varlen_attention(q, k, v, cu, backend="triton")

    with pytest.raises(RuntimeError, match="cannot run.*fp16/bf16/fp32"):
        attend(q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match="head_dim a multiple of 8"):
        odd = torch.randn(8, 2, 12, device=DEVICE)
        attend(odd, odd, odd)
    with pytest.raises(ValueError, match="stride 1"):
        t = torch.randn(8, 2, 128, device=DEVICE)[..., ::2]
        attend(t, t, t)
    with pytest.raises(ValueError, match="segments describe 8 rows but q has 7"):
        attend(q[:7], q[:7], q[:7])
    with pytest.raises(ValueError, match="same shape"):
        attend(q, q, q[:, :1])
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        attend(q, q, q, [0, 4, 8])


def test_auto_never_picks_the_interpreter_on_cpu():
    q = torch.randn(4, 1, 16)
    assert nv.ops.resolve_backend("attention", "auto", q).name != "triton"
    assert nv.ops.resolve_backend("rope", "auto", q).name != "triton"


# ------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_realistic_lengths(head_dim, dtype):
    """Tensor-core path (bf16 dots are not upcast on the GPU) on image-sized segments."""
    check_against_reference(kc.GPU_LAYOUTS["image-sized"], 16, head_dim, dtype)


@cuda
@pytest.mark.cuda
def test_cuda_mixed_batch_and_auto_backend():
    check_against_reference(kc.GPU_LAYOUTS["mixed-batch"], 16, 80, torch.bfloat16)
    q = torch.randn(8, 2, 80, device="cuda", dtype=torch.bfloat16)
    assert nv.ops.resolve_backend("attention", "auto", q).name in ("flash_attn", "triton")


@cuda
@pytest.mark.cuda
def test_cuda_skew_one_long_many_short():
    check_against_reference(kc.GPU_LAYOUTS["skew-8k"], 2, 80, torch.bfloat16)


def test_import_without_triton_registers_a_backend_that_says_why():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, nativevit as nv\n"
        "assert 'triton' not in nv.ops.available_backends()['attention']\n"
        "try:\n"
        "    nv.ops.resolve_backend('attention', 'triton', torch.randn(2, 1, 16))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton cannot be imported" in proc.stdout, proc.stdout
