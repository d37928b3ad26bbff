"""NativeViT is the Qwen2-VL vision tower: fp64 parity with transformers through our own loader."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_tower, rel_err, write_released_checkpoint

import nativevit as nv

# several images, a video with t=2, grids that are not multiples of 4 (6, 10, 14), a 2x2 grid
GRID = torch.tensor([[1, 6, 10], [2, 4, 4], [1, 16, 8], [1, 2, 2], [1, 14, 6]])


def pixels(grid: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), 1176, generator=g, dtype=dtype)


@pytest.fixture(scope="module")
def tower():
    return hf_tower(depth=2, embed_dim=64, num_heads=4, hidden_size=48)


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_parity_with_transformers_fp64(tower, tmp_path, prefix):
    path = write_released_checkpoint(tower, tmp_path / "ckpt", prefix=prefix, n_shards=3)
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    assert next(model.parameters()).dtype == torch.float64
    px = pixels(GRID)
    with torch.no_grad():
        ref = tower(px, grid_thw=GRID)
        feats = model.forward_features(px, GRID)
        tokens = model(px, GRID)
    assert feats.shape == ref.last_hidden_state.shape == (int(GRID.prod(-1).sum()), 64)
    assert tokens.shape == ref.pooler_output.shape == (int(GRID.prod(-1).sum()) // 4, 48)
    e_feats, e_tokens = rel_err(feats, ref.last_hidden_state), rel_err(tokens, ref.pooler_output)
    print(f"fp64 relative error: last_hidden_state {e_feats:.2e}, pooler_output {e_tokens:.2e}")
    assert e_feats < 1e-10 and e_tokens < 1e-10


def test_parity_real_head_dim_and_eager(tmp_path):
    """Head dim 80 (the real tower's), 3 blocks; against transformers' eager attention too."""
    hf = hf_tower(depth=3, embed_dim=160, num_heads=2, hidden_size=96, seed=1, attn="eager")
    model = nv.NativeViT.from_pretrained(write_released_checkpoint(hf, tmp_path / "ckpt"))
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    px = pixels(grid, seed=3)
    with torch.no_grad():
        ref = hf(px, grid_thw=grid).pooler_output
        out = model(px, grid)
    # eager runs its softmax in float32, so it is only ~1e-7 close to any fp64 implementation
    assert rel_err(out, ref) < 1e-6


def test_vision_only_checkpoint_layout(tower, tmp_path):
    """transformers' own ``tower.save_pretrained`` layout (unprefixed keys, top-level config)."""
    tower.save_pretrained(tmp_path / "tower")
    model = nv.NativeViT.from_pretrained(tmp_path / "tower")
    px = pixels(GRID, seed=2)
    with torch.no_grad():
        assert rel_err(model(px, GRID), tower(px, grid_thw=GRID).pooler_output) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_runs_close_to_fp64(tower, tmp_path, dtype, tol):
    path = write_released_checkpoint(tower, tmp_path / "ckpt")
    ref_model = nv.NativeViT.from_pretrained(path)
    model = nv.NativeViT.from_pretrained(path, dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    px = pixels(GRID, seed=4)
    with torch.no_grad():
        ref = ref_model(px, GRID)
        out = model(px.float(), GRID)  # float32 pixels are cast to the weight dtype, as in transformers
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.double(), ref) < tol
