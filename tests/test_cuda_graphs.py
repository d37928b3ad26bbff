"""CUDAGraphEncoder: budgets, static buffers refreshed per call (the capture itself needs CUDA)."""

from __future__ import annotations

import pytest
import torch

import nativevit as nv
from nativevit.cuda_graphs import default_budgets


def _batch(grid, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grid)
    return torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, generator=g, dtype=torch.float64), grid


@pytest.mark.parametrize(
    "preset", [nv.VisionConfig.tiny, nv.VisionConfig.qwen2_5_vl_tiny, nv.VisionConfig.qwen3_vl_tiny]
)
def test_same_token_count_other_layout_comes_out_right(preset):
    """Two batches with the same total and different segments share a budget's buffers: both right."""
    torch.manual_seed(0)
    cfg = preset()
    model = nv.NativeViT(cfg).double().eval()
    encoder = nv.CUDAGraphEncoder(model, budgets=[64, 128])
    layouts = [[[1, 4, 8], [1, 4, 4]], [[1, 2, 2], [2, 2, 4], [1, 4, 6]], [[1, 8, 6]], [[3, 2, 2], [1, 6, 6]]]
    for seed, grid in enumerate(layouts):
        px, grid_t = _batch(grid, cfg, seed)
        assert encoder.budget_for(px.shape[0]) == 64
        with torch.no_grad():
            want = model(px, grid_t)
        got = encoder(px, grid_t)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert set(encoder._static) == {64}  # one budget's buffers served every layout


def test_budgets_and_eager_fallback():
    torch.manual_seed(0)
    cfg = nv.VisionConfig.tiny()
    model = nv.NativeViT(cfg).double().eval()
    encoder = nv.CUDAGraphEncoder(model, budgets=[32, 16])
    assert encoder.budgets == [16, 32]
    assert [encoder.budget_for(n) for n in (4, 16, 17, 32, 33)] == [16, 16, 32, 32, None]
    px, grid = _batch([[1, 6, 6]], cfg, 0)  # 36 tokens: above every budget, runs eagerly
    with torch.no_grad():
        torch.testing.assert_close(encoder(px, grid), model(px, grid), rtol=0, atol=0)
    assert default_budgets() == [1024, 2048, 4096, 8192, 16384]
    assert default_budgets(4096, 1000) == [1024, 2048, 4096]
    with pytest.raises(ValueError, match="multiples of the merge unit 4"):
        nv.CUDAGraphEncoder(model, budgets=[30])
    with pytest.raises(TypeError, match="NativeViT"):
        nv.CUDAGraphEncoder(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graph capture)")
@pytest.mark.cuda
def test_captured_graph_replays_new_layouts_on_cuda():
    torch.manual_seed(0)
    cfg = nv.VisionConfig.tiny(embed_dim=128, num_heads=2)
    model = nv.NativeViT(cfg, attn_backend="cuda").cuda().float().eval()
    encoder = nv.CUDAGraphEncoder(model, budgets=[64])
    for seed, grid in enumerate([[[1, 4, 8], [1, 4, 4]], [[1, 2, 2], [2, 2, 4], [1, 4, 6]]]):
        px, grid_t = _batch(grid, cfg, seed)
        px = px.float().cuda()
        with torch.no_grad():
            want = model(px, grid_t)
        torch.testing.assert_close(encoder(px, grid_t), want, rtol=1e-4, atol=1e-4)
    assert encoder.replays == 2
