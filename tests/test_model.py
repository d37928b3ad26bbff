"""NativeViT: pack invariance, packed == padded (values and gradients), bad input."""

from __future__ import annotations

import pytest
import torch

import nativevit as nv


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


def test_padded_layout_without_touching_the_backend(model):
    """The padded baseline as a layout of the plan: same numbers, the model's backend untouched."""
    px = torch.randn(int(GRID.prod(-1).sum()), model.config.patch_dim, dtype=torch.float64)
    backend = model.attn_backend
    with torch.no_grad():
        packed = model(px, GRID)
        plan = model.plan(GRID, layout="padded")
        assert plan.segments.padded and model.attn_backend == backend != "padded"
        padded = model(px, GRID, plan=plan)
        torch.testing.assert_close(model(px, GRID, layout="padded"), padded, rtol=0, atol=0)
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="built for 'padded'"):
        model(px, GRID, plan=plan, layout="packed")
    with pytest.raises(ValueError, match="another grid_thw"):
        model(px[:60], GRID[:1], plan=plan)
    packed_flops = model.flops_per_batch(GRID)
    padded_flops = model.flops_per_batch(GRID, layout="padded")
    assert padded_flops["attention"] > packed_flops["attention"]


@pytest.mark.parametrize("family", sorted(nv.config.FAMILIES))
def test_every_family_builds_from_its_table_and_round_trips(family):
    cfg = nv.VisionConfig.preset(family, tiny=True)
    fam = nv.config.FAMILIES[family]
    assert cfg.family is fam and cfg.norm_type == fam.norm and cfg.patch_bias == fam.patch_bias
    model = nv.NativeViT(cfg)
    assert isinstance(model.blocks[0].mlp, nv.model.mlp_layer_for(cfg))
    assert isinstance(model.merger, nv.model.MERGER_LAYERS[fam.merger])
    assert hasattr(model, "deepstack_merger_list") == fam.deepstack
    assert (model.pos_embed is not None) == fam.position_table
    # a release's text_config may size the merger too (ERNIE-4.5-VL: text_hf_dict; empty for most)
    again = nv.VisionConfig.from_hf_dict(cfg.to_hf_dict(), model_type=family, text_config=cfg.text_hf_dict())
    assert again == cfg
    for release_type in fam.model_types:
        assert nv.config.family(release_type) is fam and nv.config.family(f"{release_type}_vision") is fam
    with pytest.raises(ValueError, match="not a supported tower family"):
        nv.config.family("llava")
