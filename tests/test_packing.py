"""Packed batches: block-diagonal attention, pack invariance, packed == padded, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import nativevit as nv
from nativevit.packing import Segments, cu_seqlens_from_grid, pad_segments, unpad_segments


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
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
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


def test_rope_reference_matches_transformers():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from nativevit.rope import rope_cos_sin

    grid = [(1, 4, 6), (2, 2, 4)]
    cos, sin = rope_cos_sin(grid, 80)
    assert cos.shape == (40, 40) and cos.dtype == torch.float32
    q, k = torch.randn(40, 3, 80), torch.randn(40, 3, 80)
    ours = nv.ops.apply_rope_2d(q, k, cos, sin, backend="torch")
    theirs = apply_rotary_pos_emb_vision(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_rope_tables_match_transformers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    from nativevit.rope import rope_cos_sin

    grid = torch.tensor([[1, 6, 10], [2, 4, 4], [1, 16, 8]])
    rot = Qwen2VLVisionRotaryEmbedding(Qwen2VLVisionConfig(embed_dim=1280, num_heads=16))
    hf_cos, hf_sin = rot(torch.zeros(1), get_vision_position_ids(grid, 2))
    cos, sin = rope_cos_sin(grid.tolist(), 80)
    assert torch.equal(torch.cat([cos, cos], -1), hf_cos) and torch.equal(torch.cat([sin, sin], -1), hf_sin)


# ------------------------------------------------------------------ encoder-level invariants


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = nv.NativeViT(nv.VisionConfig.tiny(depth=3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


GRID = torch.tensor([[1, 6, 10], [2, 4, 4], [1, 2, 2], [1, 16, 8]])


def test_pack_invariance(model):
    """Each image gets the same output in a packed batch as when encoded alone."""
    px = torch.randn(int(GRID.prod(-1).sum()), model.config.patch_dim, dtype=torch.float64)
    batch = nv.PackedBatch.from_grid(px, GRID)
    with torch.no_grad():
        packed = batch.split(model(px, GRID))
        for i, (rows, out) in enumerate(zip(batch.split(px), packed)):
            alone = model(rows, GRID[i : i + 1])
            torch.testing.assert_close(out, alone, rtol=1e-12, atol=1e-12)


def test_packed_equals_padded(model):
    px = torch.randn(int(GRID.prod(-1).sum()), model.config.patch_dim, dtype=torch.float64)
    with torch.no_grad():
        model.attn_backend = "torch"
        packed = model(px, GRID), model.forward_features(px, GRID)
        model.attn_backend = "padded"
        padded = model(px, GRID), model.forward_features(px, GRID)
        model.attn_backend = "torch"
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_padded_gradients_equal_packed(model):
    px = torch.randn(int(GRID.prod(-1).sum()), model.config.patch_dim, dtype=torch.float64)
    grads = []
    for backend in ("torch", "padded"):
        model.attn_backend = backend
        model.zero_grad()
        model(px, GRID).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.attn_backend = "torch"
    model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_segments_and_padding_roundtrip():
    grid = torch.tensor([[2, 2, 4], [1, 4, 4]])
    cu = cu_seqlens_from_grid(grid)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 8, 16, 32]
    seg = Segments.from_cu_seqlens(cu, 32)
    assert seg.lengths == (8, 8, 16) and seg.max_seqlen == 16
    x = torch.arange(32.0)[:, None]
    padded = pad_segments(x, seg)
    assert padded.shape == (48, 1) and padded[8:16].abs().sum() == 0
    assert torch.equal(unpad_segments(padded, seg), x)


# ------------------------------------------------------------------ bad input


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


def test_bad_model_inputs(model):
    grid = torch.tensor([[1, 4, 4]])
    px = torch.randn(16, model.config.patch_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="rows but grid_thw"):
        model(px[:15], grid)
    with pytest.raises(ValueError, match="divisible by the spatial merge size"):
        model(torch.randn(15, model.config.patch_dim), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match=r"\(N, 1176\)"):
        model(torch.randn(16, 2 * 2 * 14 * 14), grid)  # 2 channels instead of 3
    with pytest.raises(TypeError, match="integer"):
        model(px, grid.float())
    with pytest.raises(ValueError, match="shape \\(num_images, 3\\)"):
        model(px, torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="empty"):
        model(px, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating point"):
        model(px.long(), grid)
