"""Triton fused 2D RoPE against ``rope2d_ref`` (= ``nativevit.rope.rope_2d_ref``).

Head dims and the exact rotation are the shared ones of tests/kernel_cases.py."""

from __future__ import annotations

import kernel_cases as kc
import pytest
import torch
from flash_rule import check_rule
from nativevit.kernels import rope2d as rp

import nativevit as nv

pytestmark = pytest.mark.skipif(
    "triton" not in nv.ops.available_backends()["rope"],
    reason="triton rope backend unavailable (no GPU and no TRITON_INTERPRET=1)",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIMS = (*kc.HEAD_DIMS, 96)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRID = [(1, 4, 6), (2, 2, 2), (1, 6, 2)]  # 24 + 2*4 + 12 = 44 tokens, a video with two frames


def tables(head_dim, grid=GRID):
    cos, sin = nv.rope.rope_cos_sin(grid, head_dim, device=DEVICE)
    return cos, sin


def fused_qkv(total, heads, head_dim, dtype, seed=0):
    return kc.fused_qkv(total, heads, head_dim, dtype, seed=seed, device=DEVICE)


rotate_exact = kc.rotate_exact  # the exact value the fp32 kernel approximates


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_and_backward_match_reference(head_dim, dtype):
    cos, sin = tables(head_dim)
    qkv = fused_qkv(cos.shape[0], 3, head_dim, dtype).requires_grad_()
    q, k, _ = qkv.unbind(1)  # strided views: stride(0) = 3 * heads * head_dim
    grads = torch.randn(2, *q.shape, generator=torch.Generator().manual_seed(1)).to(qkv)
    outs = rp.rope2d(q, k, cos, sin)
    ref = rp.rope2d_ref(q, k, cos, sin)
    for name, out, r, x in zip(("q", "k"), outs, ref, (q, k), strict=True):
        assert out.dtype == dtype and out.shape == x.shape
        check_rule(f"{name}_rot {dtype} d={head_dim}", out, r, rotate_exact(x, cos, sin), 2)
        if DEVICE == "cpu":  # the interpreter does the reference's fp32 ops in the same order
            assert torch.equal(out, r), f"{name}_rot differs from the reference under the interpreter"
    (g_kernel,) = torch.autograd.grad(outs, qkv, tuple(grads))
    (g_ref,) = torch.autograd.grad(ref, qkv, tuple(grads))
    for i, name in enumerate(("dq", "dk")):
        exact = rotate_exact(grads[i], cos, -sin)  # the backward is the inverse rotation
        check_rule(f"{name} {dtype} d={head_dim}", g_kernel[:, i], g_ref[:, i], exact, 3)
    assert not g_kernel[:, 2].any(), "v received a gradient from rope"


def test_in_place_rotates_inside_the_fused_buffer():
    cos, sin = tables(80)
    qkv = fused_qkv(cos.shape[0], 2, 80, torch.float16)
    before = qkv.clone()
    q, k, v = qkv.unbind(1)
    ref_q, ref_k = rp.rope2d_ref(q, k, cos, sin)
    out_q, out_k = rp.rope2d_(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(qkv[:, 0], ref_q, rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, 1], ref_k, rtol=0, atol=0)
    assert torch.equal(qkv[:, 2], before[:, 2]), "in-place rope touched v"


def test_in_place_refuses_autograd():
    cos, sin = tables(64)
    q = torch.randn(cos.shape[0], 2, 64, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd"):
        rp.rope2d_(q, q.detach().clone(), cos, sin)


def test_inverse_rotation_restores_input():
    cos, sin = tables(96)
    q, k, _ = fused_qkv(cos.shape[0], 2, 96, torch.float32).unbind(1)
    qr, kr = rp.rope2d_fwd(q, k, cos, sin)
    q2, k2 = rp.rope2d_fwd(qr, kr, cos, sin, inverse=True)
    torch.testing.assert_close(q2, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, k, rtol=1e-5, atol=1e-5)


def test_expanded_grad_and_unused_output():
    """``.sum()`` gives a stride-0 gradient; using only q_rot leaves k_rot's gradient undefined."""
    cos, sin = tables(80)
    q = torch.randn(cos.shape[0], 2, 80, device=DEVICE, requires_grad=True)
    k = torch.randn(cos.shape[0], 3, 80, device=DEVICE, requires_grad=True)  # fewer q heads than k heads
    rp.rope2d(q, k, cos, sin)[0].sum().backward()
    gq, gk = q.grad.clone(), k.grad
    q.grad = None
    rp.rope2d_ref(q, k, cos, sin)[0].sum().backward()
    torch.testing.assert_close(gq, q.grad, rtol=1e-6, atol=1e-6)
    assert gk is None or not gk.any()


def test_no_tokens():
    cos, sin = torch.empty(0, 40, device=DEVICE), torch.empty(0, 40, device=DEVICE)
    q = torch.empty(0, 2, 80, device=DEVICE)
    qr, kr = rp.rope2d(q, q, cos, sin)
    assert qr.shape == (0, 2, 80) and kr.shape == (0, 2, 80)


def test_public_op_and_opcheck():
    cos, sin = tables(16, [(1, 2, 4)])
    qkv = fused_qkv(8, 2, 16, torch.float32)
    q, k, _ = qkv.unbind(1)
    out = nv.ops.apply_rope_2d(q, k, cos, sin, backend="triton")
    ref = nv.ops.apply_rope_2d(q, k, cos, sin, backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0 if DEVICE == "cpu" else 1e-6)
    torch.library.opcheck(torch.ops.nativevit.triton_rope2d.default, (q.requires_grad_(), k, cos, sin, False))
    torch.library.opcheck(torch.ops.nativevit.triton_rope2d.default, (q.detach(), k.detach(), cos, sin, True))
    qkv2 = qkv.detach().clone()
    torch.library.opcheck(
        torch.ops.nativevit.triton_rope2d_.default, (qkv2[:, 0], qkv2[:, 1], cos, sin, False)
    )


def test_torch_compile_fullgraph():
    cos, sin = tables(64, [(1, 2, 4)])
    q = torch.randn(8, 2, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(8, 2, 64, device=DEVICE)
    compiled = torch.compile(lambda q, k: rp.rope2d(q, k, cos, sin), fullgraph=True, backend="aot_eager")
    qr, kr = compiled(q, k)
    qr.square().sum().backward()
    ref_q, ref_k = rp.rope2d_ref(q, k, cos, sin)
    torch.testing.assert_close((qr, kr), (ref_q, ref_k), rtol=1e-6, atol=1e-6)
    grad, q.grad = q.grad.clone(), None
    ref_q.square().sum().backward()
    torch.testing.assert_close(grad, q.grad, rtol=1e-5, atol=1e-5)


def test_rejects_bad_input():
    """The public op validates once and names the problem; the backend declares what it refuses."""
    cos, sin = tables(64, [(1, 2, 2)])
    q = torch.randn(4, 2, 64, device=DEVICE)

    def rope(q, k, cos=cos, sin=sin):
        return nv.ops.apply_rope_2d(q, k, cos, sin, backend="triton")

    with pytest.raises(TypeError, match="cos must be float32"):
        rope(q, q, cos.double())
    with pytest.raises(ValueError, match="sin must have shape"):
        rope(q, q, sin=sin[:3])
    with pytest.raises(ValueError, match="even head_dim"):
        odd = torch.randn(4, 2, 63, device=DEVICE)
        rope(odd, odd)
    with pytest.raises(RuntimeError, match="cannot run.*fp16/bf16/fp32"):
        rope(q.double(), q.double())
    with pytest.raises(TypeError, match="q and k must have one dtype"):
        rope(q, q.half())
    with pytest.raises(ValueError, match="differ in tokens"):
        rope(q, q[:3])
    with pytest.raises(ValueError, match="same address"):
        rp.rope2d_(q, q, cos, sin)
    with pytest.raises(RuntimeError, match="no gradient for cos"):
        c = cos.clone().requires_grad_()
        rp.rope2d(q.requires_grad_(), q, c, sin)[0].sum().backward()
    # called directly, the ops assert the shapes that keep the kernel in bounds
    with pytest.raises(ValueError, match="sin must have shape"):
        torch.ops.nativevit.triton_rope2d(q, q, cos, sin[:3], False)
    with pytest.raises(ValueError, match="differ in tokens"):
        torch.ops.nativevit.triton_rope2d_(q, q[:3].clone(), cos, sin, False)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        rp.rope2d_(q.double(), q.double().clone(), cos, sin)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_image_sized(dtype):
    grid = [(1, 64, 64), (1, 34, 52), (2, 28, 28)]
    cos, sin = tables(80, grid)
    q, k, _ = fused_qkv(cos.shape[0], 16, 80, dtype).unbind(1)
    outs = rp.rope2d(q, k, cos, sin)
    for out, r, x in zip(outs, rp.rope2d_ref(q, k, cos, sin), (q, k), strict=True):
        check_rule(f"rope {dtype}", out, r, rotate_exact(x, cos, sin), 2)
