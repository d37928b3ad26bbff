"""nativevit.ops: block-diagonal attention against a dense oracle, the registry, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import nativevit as nv
from nativevit.packing import cu_seqlens_from_lengths


def dense_block_diagonal_attention(q, k, v, cu_seqlens, scale=None):
    """Independent oracle: the full N x N score matrix with a block-diagonal mask (tests only)."""
    n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    seg = torch.zeros(n, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        seg[a:b] = i
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(seg[None, :, None] != seg[None, None, :], -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


LAYOUTS = {
    "mixed": [5, 17, 1, 33, 8],
    "empty_and_single": [0, 1, 0, 7, 1, 0],
    "many": [3, 1, 4, 1, 5, 9, 2, 6] * 20,
    "skew": [200] + [2] * 40,
    "uniform_runs": [16, 16, 16, 4, 4, 16],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["torch", "padded"])
def test_varlen_attention_matches_dense_oracle(layout, backend):
    lengths = LAYOUTS[layout]
    cu = cu_seqlens_from_lengths(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 3, 24, generator=g, dtype=torch.float64) for _ in range(3))
    out = nv.ops.varlen_attention(q, k, v, cu, backend=backend, scale=0.3)
    ref = dense_block_diagonal_attention(q, k, v, cu, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_varlen_attention_backward_and_strided_views():
    lengths = [7, 0, 1, 12]
    cu = torch.tensor([0, 7, 7, 8, 20], dtype=torch.int32)
    qkv = torch.randn(20, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)  # strided views of one fused buffer
    assert not q.is_contiguous()
    grads = {}
    for backend in ("torch", "padded"):
        out = nv.ops.varlen_attention(q, k, v, cu, backend=backend)
        (g,) = torch.autograd.grad(out.sum(), qkv)  # .sum() gives a stride-0 incoming gradient
        grads[backend] = g
    qd, kd, vd = (x.detach().clone().requires_grad_() for x in (q, k, v))
    dense_block_diagonal_attention(qd, kd, vd, cu).sum().backward()
    ref = torch.stack([qd.grad, kd.grad, vd.grad], 1)
    for backend, g in grads.items():
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=backend)
    assert sum(lengths) == 20


def test_bad_cu_seqlens():
    q = torch.randn(10, 2, 8)
    with pytest.raises(TypeError, match="int32"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="ends at 9"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([1, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([[0, 10]], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen"):
        nv.ops.varlen_attention(q, q, q, torch.tensor([0, 10], dtype=torch.int32), max_seqlen=4)


def test_bad_qkv_and_backends():
    cu = torch.tensor([0, 10], dtype=torch.int32)
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="same shape"):
        nv.ops.varlen_attention(q, q, torch.randn(10, 2, 4), cu)
    with pytest.raises(TypeError, match="same dtype"):
        nv.ops.varlen_attention(q, q, q.double(), cu)
    with pytest.raises(TypeError, match="floating-point"):
        nv.ops.varlen_attention(q.long(), q.long(), q.long(), cu)
    with pytest.raises(ValueError, match="stride 1"):
        nv.ops.varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, cu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        nv.ops.varlen_attention(q, q, q, cu, backend="nope")
    with pytest.raises(RuntimeError, match="flash_attn"):
        nv.ops.varlen_attention(q, q, q, cu, backend="flash_attn")
    with pytest.raises(TypeError, match="float32"):
        nv.ops.apply_rope_2d(q, q, torch.zeros(10, 4, dtype=torch.float64), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="head_dim//2"):
        nv.ops.apply_rope_2d(q, q, torch.zeros(10, 8), torch.zeros(10, 8))
    backends = nv.ops.available_backends()
    assert {"torch", "padded"} <= set(backends["attention"]) and "torch" in backends["rope"]


def _runnable(op: str) -> list[str]:
    """Backends of ``op`` that run on CPU tensors here (interpreted Triton included when enabled)."""
    return [name for name, why in nv.ops.backend_status("cpu")[op].items() if why is None]


@pytest.mark.parametrize("backend", _runnable("attention"))
def test_every_backend_reads_a_strided_cu_seqlens(backend):
    """An int32 column view as cu_seqlens: every backend gives the dense oracle's answer."""
    lengths = [16, 0, 1, 23]
    table = torch.zeros(5, 2, dtype=torch.int32)
    table[:, 0] = cu_seqlens_from_lengths(lengths)
    cu = table[:, 0]
    assert not cu.is_contiguous()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(3))
    out = nv.ops.varlen_attention(q, k, v, cu, backend=backend)
    ref = dense_block_diagonal_attention(q.double(), k.double(), v.double(), cu.contiguous())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _runnable("attention"))
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_finite_and_positive(backend, scale):
    q = torch.randn(4, 1, 16)
    with pytest.raises(ValueError, match="scale must be finite"):
        nv.ops.varlen_attention(
            q, q, q, torch.tensor([0, 4], dtype=torch.int32), scale=scale, backend=backend
        )


def test_backend_status_explains_itself():
    status = nv.ops.backend_status("cpu")
    assert set(status) == {"attention", "rope"}
    assert status["attention"]["torch"] is None and status["attention"]["padded"] is None
    assert "CUDA" in status["attention"]["flash_attn"]
    assert nv.ops.available_backends("cpu")["attention"] == _runnable("attention")
    q = torch.randn(4, 1, 16)
    auto = nv.ops.resolve_backend("attention", "auto", q)
    assert auto.name != "padded" and status["attention"][auto.name] is None
