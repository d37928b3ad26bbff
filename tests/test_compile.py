"""torch.compile on batches that change every step: no new graph after warm-up, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import nativevit as nv
from nativevit.packing import cu_seqlens_from_lengths

# image counts, sizes and a video differ from batch to batch
GRIDS = [
    [[1, 4, 6], [1, 2, 2]],
    [[1, 6, 6], [2, 2, 4], [1, 2, 2]],
    [[1, 8, 4], [1, 4, 2], [1, 2, 6], [1, 2, 2]],
    [[3, 4, 4], [1, 10, 2]],
    [[1, 12, 8], [1, 2, 4], [2, 6, 2], [1, 2, 2]],
]
PRESETS = {
    "qwen2_vl": nv.VisionConfig.tiny,
    "qwen2_5_vl": nv.VisionConfig.qwen2_5_vl_tiny,
    "qwen3_vl": nv.VisionConfig.qwen3_vl_tiny,
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _backends() -> list[str]:
    return [b for b in ("torch", "cpu") if b in nv.ops.available_backends("cpu")["attention"]]


def _batch(grid, cfg, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grid)
    return torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, generator=g).to(dtype), grid


# every family in fp32; bf16 on the windowed family (the most metadata), to keep the suite fast
CASES = [(family, torch.float32) for family in sorted(PRESETS)] + [("qwen2_5_vl", torch.bfloat16)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("family, dtype", CASES)
def test_compiled_model_compiles_once_for_varied_batches(family, backend, dtype):
    torch.manual_seed(0)
    cfg = PRESETS[family]()
    model = nv.NativeViT(cfg, attn_backend=backend, rope_backend=backend).to(dtype)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True)
    graphs = []
    for i, grid in enumerate(GRIDS):
        px, grid = _batch(grid, cfg, dtype, i)
        model.zero_grad()
        out = compiled(px, grid)
        out.float().square().sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ref = model(px, grid)
        ref.float().square().sum().backward()
        torch.testing.assert_close(out, ref, **TOL[dtype])
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and len(got) > 0
        for name in got:
            torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=name)
        graphs.append(counter.frame_count)
    assert graphs[1:] == [graphs[1]] * (len(GRIDS) - 1), f"graphs compiled after each batch: {graphs}"


@pytest.mark.parametrize("backend", _backends())
def test_ops_trace_with_fullgraph_and_no_host_read(backend):
    counter = CompileCounterWithBackend("aot_eager")

    def block(q, k, v, cos, sin, cu_seqlens, max_seqlen):
        q, k = nv.ops.apply_rope_2d(q, k, cos, sin, backend=backend)
        return nv.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=backend)

    compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
    graphs = []
    for seed, lengths in enumerate([[7, 9], [3, 20, 1], [16, 0, 5, 11], [40], [2, 2, 2, 2, 2]]):
        g = torch.Generator().manual_seed(seed)
        n = sum(lengths)
        q, k, v = (torch.randn(n, 2, 16, generator=g, requires_grad=True) for _ in range(3))
        cos, sin = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
        cu = cu_seqlens_from_lengths(lengths)
        out = compiled(q, k, v, cos, sin, cu, max(lengths))
        ref = block(q, k, v, cos, sin, cu, max(lengths))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        graphs.append(counter.frame_count)
    assert graphs[1:] == [graphs[1]] * 4, f"graphs compiled after each layout: {graphs}"


def test_raw_cu_seqlens_under_compile_needs_max_seqlen():
    q = torch.randn(8, 1, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    compiled = torch.compile(
        lambda q, cu: nv.ops.varlen_attention(q, q, q, cu), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match="max_seqlen"):
        compiled(q, cu)


def test_inductor_compiled_encoder_equals_eager():
    """The default backend (inductor) on a tiny tower: what a user's torch.compile(model) runs."""
    torch.manual_seed(0)
    cfg = nv.VisionConfig.tiny()
    model = nv.NativeViT(cfg).eval()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for i, grid in enumerate(GRIDS[:3]):
            px, grid = _batch(grid, cfg, torch.float32, i)
            torch.testing.assert_close(compiled(px, grid), model(px, grid), rtol=1e-4, atol=1e-4)
