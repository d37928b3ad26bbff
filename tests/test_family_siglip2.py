"""SigLIP2 NaFlex towers: fp64 parity with transformers' Siglip2VisionModel through our loader (packed
here, padded with a mask there), the position-table resize, release layouts (Siglip2Model, a bare
Siglip2VisionModel, LFM2-VL), swaps (Siglip2Model, LFM2-VL), save/load, the NaFlex image processor."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit.integrations import swap_vision_tower
from nativevit.positions import POSITION_KINDS

PATCH = 4  # tiny towers: 4-px patches, an 8x8 learned table (num_patches 64)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,  # head dim 16: the smallest the Triton kernel takes
    patch_size=PATCH,
    num_patches=64,
)
# (h, w) in patches: smaller and larger than the 8x8 table on each side, one patch, square, skewed
GRIDS = [(3, 5), (7, 2), (11, 9), (1, 1), (8, 8), (2, 13)]


def rerandomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_siglip2(**vision):
    from transformers import Siglip2Config, Siglip2Model

    text = dict(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    cfg = Siglip2Config(vision_config={**VISION, **vision}, text_config=text)
    return rerandomise(Siglip2Model(cfg).double().eval())


def padded_inputs(grids, seed: int = 1, extra: int = 3):
    """Packed ``(N, P*P*C)`` rows and transformers' padded form of them: ``(B, L, P*P*C)`` pixel_values,
    ``(B, L)`` mask and ``(B, 2)`` spatial_shapes."""
    g = torch.Generator().manual_seed(seed)
    counts = [h * w for h, w in grids]
    rows = torch.randn(sum(counts), PATCH * PATCH * 3, generator=g, dtype=torch.float64)
    length = max(counts) + extra
    pv = torch.zeros(len(grids), length, rows.shape[1], dtype=torch.float64)
    mask = torch.zeros(len(grids), length, dtype=torch.long)
    for i, part in enumerate(torch.split(rows, counts)):
        pv[i, : len(part)] = part
        mask[i, : len(part)] = 1
    return rows, dict(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=torch.tensor(grids))


def real_rows(padded: torch.Tensor, grids) -> torch.Tensor:
    return torch.cat([padded[i, : h * w] for i, (h, w) in enumerate(grids)])


def grid_thw(grids) -> torch.Tensor:
    return torch.tensor([(1, h, w) for h, w in grids])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random Siglip2Model saved by transformers (``vision_model.*`` and ``text_model.*`` keys),
    and its vision model's outputs on GRIDS."""
    hf = hf_siglip2()
    path = tmp_path_factory.mktemp("siglip2")
    hf.save_pretrained(path)
    rows, inputs = padded_inputs(GRIDS)
    with torch.no_grad():
        out = hf.vision_model(**inputs, output_hidden_states=True)
    return hf, path, rows, inputs, out


# ---------------------------------------------------------------- configs


def test_release_config_reads_and_writes_back(release):
    _, path, *_ = release
    vc = json.loads((path / "config.json").read_text())["vision_config"]
    cfg = nv.VisionConfig.from_hf_dict(vc, model_type="siglip2")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.intermediate_size) == (32, 2, 2, 48)
    assert (cfg.num_position_embeddings, cfg.patch_size, cfg.norm_eps) == (64, PATCH, 1e-6)
    assert (cfg.temporal_patch_size, cfg.spatial_merge_size, cfg.out_hidden_size) == (1, 1, 32)
    back = cfg.to_hf_dict()
    for key in VISION:
        assert back[key] == vc[key], key
    assert back["layer_norm_eps"] == vc["layer_norm_eps"] and "rope_parameters" not in back
    assert cfg.pooling_head and back["vision_use_head"] is True
    headless = nv.VisionConfig.from_hf_dict(dict(vc, vision_use_head=False), model_type="siglip2")
    assert not headless.pooling_head and headless.to_hf_dict()["vision_use_head"] is False
    assert nv.VisionConfig.from_hf_dict(back, model_type="siglip2") == cfg


def test_presets():
    full = nv.VisionConfig.preset("siglip2")  # transformers' Siglip2VisionConfig defaults (base, patch 16)
    assert (full.embed_dim, full.depth, full.num_heads, full.intermediate_size) == (768, 12, 12, 3072)
    assert (full.patch_size, full.num_position_embeddings, full.hidden_act) == (16, 256, "gelu_pytorch_tanh")
    tiny = nv.NativeViT(nv.VisionConfig.preset("siglip2", tiny=True))
    assert tiny.patch_embed.proj.weight.shape == (32, 3 * 16 * 16)  # a Linear over (P, P, C) rows
    assert nv.config.family("siglip2_vision_model").name == "siglip2"
    assert nv.config.family("lfm2_vl").name == "siglip2"


# ---------------------------------------------------------------- parity


def test_position_resize_matches_transformers_bit_for_bit():
    """The per-image weights give exactly transformers' padded-batch resize, for up- and downsampling."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    kind = POSITION_KINDS["resize_antialias"]
    for side in (4, 16):
        table = torch.randn(side * side, 24, dtype=torch.float64)
        grids = [(3, 5), (7, 2), (20, 13), (1, 1), (side, side)]
        ref = Siglip2VisionEmbeddings.resize_positional_embeddings(
            table.view(side, side, -1), torch.tensor(grids), max(h * w for h, w in grids) + 5
        )
        ours = kind.apply(table, kind.plan([(1, h, w) for h, w in grids], side, 1))
        assert torch.equal(ours, real_rows(ref, grids))


@pytest.mark.parametrize("backend", ["torch", "padded"])
def test_float64_parity_through_the_loader(release, backend):
    """Every real token of last_hidden_state (after post_layernorm) within 1e-10 of transformers, and
    the pooling head's one vector per image (pooler_output)."""
    _, path, rows, _, out = release
    model = nv.NativeViT.from_pretrained(path, attn_backend=backend)
    assert model.patch_embed.proj.weight.dtype == torch.float64
    with torch.no_grad():
        ours = model.forward_features(rows, grid_thw(GRIDS))
        merged = model(rows, grid_thw(GRIDS))  # no merger: the same states
        pooled = model.pool(ours, grid_thw(GRIDS))
    ref = real_rows(out.last_hidden_state, GRIDS)
    print(f"fp64 relative error: last_hidden_state {rel_err(ours, ref):.2e}")
    assert rel_err(ours, ref) <= 1e-10
    assert torch.equal(merged, ours)
    assert pooled.shape == out.pooler_output.shape
    assert rel_err(pooled, out.pooler_output) <= 1e-10


def test_pool_needs_a_head_and_matching_rows(release):
    _, path, rows, _, _ = release
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    with pytest.raises(ValueError, match="states of grid_thw"):
        model.pool(rows[:5, :32], grid_thw(GRIDS))
    headless = nv.NativeViT(nv.VisionConfig.preset("siglip2", tiny=True, pooling_head=False))
    assert headless.head is None and not any(k.startswith("head.") for k in headless.state_dict())
    with pytest.raises(ValueError, match="no pooling head"):
        headless.pool(torch.zeros(4, 32), torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize("backend", nv.ops.available_backends("cpu")["attention"])
def test_every_cpu_backend(release, backend):
    """Each attention backend that runs here, in float64 where it takes it (1e-10), else float32
    against the float64 reference (1e-5)."""
    _, path, rows, _, out = release
    probe = torch.zeros(1, 2, 16, dtype=torch.float64)
    try:
        nv.ops.resolve_backend("attention", backend, probe)
        dtype, tol = torch.float64, 1e-10
    except RuntimeError:
        dtype, tol = torch.float32, 1e-5
    model = nv.NativeViT.from_pretrained(path, attn_backend=backend, dtype=dtype)
    with torch.no_grad():
        ours = model.forward_features(rows.to(dtype), grid_thw(GRIDS))
    assert ours.dtype == dtype
    assert rel_err(ours.double(), real_rows(out.last_hidden_state, GRIDS)) <= tol


def test_padded_layout_matches(release):
    _, path, rows, _, out = release
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    with torch.no_grad():
        ours = model.forward_features(rows, grid_thw(GRIDS), layout="padded")
    assert rel_err(ours, real_rows(out.last_hidden_state, GRIDS)) <= 1e-10


def test_images_do_not_see_each_other(release):
    """Each image alone gives the rows it gets in the batch (block-diagonal attention, a per-image
    table resize whose float32 rows do not depend on the batch: a 1x1 image included)."""
    _, path, rows, _, _ = release
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    kind = POSITION_KINDS["resize_antialias"]
    table = model.pos_embed.weight
    with torch.no_grad():
        batch = model.forward_features(rows, grid_thw(GRIDS))
        counts = [h * w for h, w in GRIDS]
        positions = kind.apply(table, kind.plan([(1, h, w) for h, w in GRIDS], 8, 1))
        for i, (part, states) in enumerate(zip(rows.split(counts), batch.split(counts))):
            alone = model.forward_features(part, grid_thw(GRIDS[i : i + 1]))
            assert rel_err(alone, states) <= 1e-12, GRIDS[i]
            own = kind.apply(table, kind.plan([(1, *GRIDS[i])], 8, 1))
            assert torch.equal(own, positions.split(counts)[i]), GRIDS[i]


# ---------------------------------------------------------------- release layouts


def test_vision_only_directory_loads(tmp_path, release):
    """``Siglip2VisionModel.save_pretrained``: model_type ``siglip2_vision_model`` at the top level,
    unprefixed keys."""
    hf, _, rows, _, out = release
    hf.vision_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip2_vision_model"
    model = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    with torch.no_grad():
        ours = model.forward_features(rows, grid_thw(GRIDS))
        pooled = model.pool(ours, grid_thw(GRIDS))
    assert rel_err(ours, real_rows(out.last_hidden_state, GRIDS)) <= 1e-10
    assert rel_err(pooled, out.pooler_output) <= 1e-10


def test_lfm2_vl_layout_loads(tmp_path, release):
    """An LFM2-VL release: the tower (without head) under ``model.vision_tower.``, the language model
    ignored."""
    hf, _, rows, _, out = release
    vc = dict(json.loads(hf.config.vision_config.to_json_string()), vision_use_head=False)
    config = {"model_type": "lfm2_vl", "vision_config": vc, "text_config": {"hidden_size": 24}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = hf.vision_model.state_dict()
    tensors = {"model.vision_tower." + k: v.clone() for k, v in state.items() if not k.startswith("head.")}
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(5, 24, dtype=torch.float64)
    write_shards(tmp_path, tensors, 2)
    model = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    with torch.no_grad():
        ours = model.forward_features(rows, grid_thw(GRIDS))
    assert rel_err(ours, real_rows(out.last_hidden_state, GRIDS)) <= 1e-10


def test_save_pretrained_round_trip(tmp_path, release):
    """Our save is the release layout (``vision_model.*`` keys, the release's field names): nativevit
    reads it back, and so does transformers' Siglip2VisionModel."""
    from transformers import Siglip2VisionModel

    _, path, rows, _, out = release
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "siglip2" and saved["vision_config"]["num_patches"] == 64
    again = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    with torch.no_grad():
        a = model.forward_features(rows, grid_thw(GRIDS))
        b = again.forward_features(rows, grid_thw(GRIDS))
    assert torch.equal(a, b)
    hf = Siglip2VisionModel.from_pretrained(tmp_path).double().eval()
    _, inputs = padded_inputs(GRIDS)
    with torch.no_grad():
        ref = hf(**inputs)
    assert rel_err(a, real_rows(ref.last_hidden_state, GRIDS)) <= 1e-10
    assert rel_err(ref.pooler_output, out.pooler_output) <= 1e-10


# ---------------------------------------------------------------- swap


def test_swap_siglip2_model(release):
    """Siglip2Model's vision_model swapped: same keys, same last_hidden_state (real rows), same
    pooler_output (transformers' head over our states), same image features and hidden states."""
    hf, _, _, inputs, out = release
    model = swap_vision_tower(copy.deepcopy(hf), attn_backend="torch")
    assert type(model.vision_model).__name__ == "Siglip2VisionTower"
    assert list(model.state_dict()) == list(hf.state_dict())
    with torch.no_grad():
        got = model.vision_model(**inputs, output_hidden_states=True)
        ref_features = hf.get_image_features(**inputs).pooler_output
        features = model.get_image_features(**inputs).pooler_output
    grids = inputs["spatial_shapes"].tolist()
    assert got.last_hidden_state.shape == out.last_hidden_state.shape
    assert rel_err(real_rows(got.last_hidden_state, grids), real_rows(out.last_hidden_state, grids)) <= 1e-10
    assert rel_err(got.pooler_output, out.pooler_output) <= 1e-10
    assert rel_err(features, ref_features) <= 1e-10
    assert len(got.hidden_states) == len(out.hidden_states) == VISION["num_hidden_layers"] + 1
    for a, b in zip(got.hidden_states, out.hidden_states):
        assert rel_err(real_rows(a, grids), real_rows(b, grids)) <= 1e-10
    assert swap_vision_tower(model, attn_backend="padded") is model  # idempotent, sets the backend
    assert model.vision_model.attn_backend == "padded"
    with torch.no_grad():
        again = model.vision_model(**inputs).last_hidden_state
    assert rel_err(real_rows(again, grids), real_rows(out.last_hidden_state, grids)) <= 1e-10


def test_swap_refuses_a_mask_that_disagrees_with_spatial_shapes(release):
    hf, _, _, inputs, _ = release
    model = swap_vision_tower(copy.deepcopy(hf), attn_backend="torch")
    bad = dict(inputs, pixel_attention_mask=inputs["pixel_attention_mask"].clone())
    bad["pixel_attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        model.vision_model(**bad)


def test_swap_lfm2_vl_logits():
    """LFM2-VL (Siglip2VisionModel tower without head): logits unchanged in float64."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    text = dict(
        model_type="lfm2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        layer_types=["full_attention", "conv"],
    )
    vision = dict(VISION, model_type="siglip2_vision_model", vision_use_head=False)
    cfg = Lfm2VlConfig(vision_config=vision, text_config=text, projector_hidden_size=40, image_token_id=7)
    torch.manual_seed(0)
    hf = rerandomise(Lfm2VlForConditionalGeneration(cfg).double().eval())
    grids = [(6, 4), (2, 10), (8, 8)]  # even sides: LFM2-VL's projector unshuffles 2x2 blocks
    _, inputs = padded_inputs(grids)
    n_tokens = sum(h // 2 * (w // 2) for h, w in grids)
    ids = torch.cat([torch.tensor([1, 2]), torch.full((n_tokens,), 7), torch.tensor([3])])[None]
    model = swap_vision_tower(copy.deepcopy(hf), attn_backend="torch")
    assert type(model.model.vision_tower).__name__ == "Siglip2VisionTower"
    assert list(model.state_dict()) == list(hf.state_dict())
    with torch.no_grad():
        ref = hf(input_ids=ids, **inputs).logits
        got = model(input_ids=ids, **inputs).logits
    assert rel_err(got, ref) <= 1e-10


# ---------------------------------------------------------------- processor


def _images():
    rng = np.random.default_rng(0)
    sizes = [(37, 91), (120, 64), (16, 16), (300, 17), (224, 224), (5, 700), (1000, 800)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
def test_processor_matches_transformers(max_num_patches):
    """Grids and rows bit-exact: ``ImageProcessor.for_model("siglip2")`` against the PIL processor (PIL
    bilinear on uint8, rescale then normalise), and with ``resample="bilinear_torch"``,
    ``normalize="fused"`` against the torchvision one (the AutoImageProcessor default: torch's uint8
    antialiased bilinear, rescale folded into mean and std)."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
    from transformers.models.siglip2.image_processing_siglip2 import Siglip2ImageProcessor

    images = _images()
    options = {"max_num_patches": max_num_patches}
    cases = (
        (Siglip2ImageProcessorPil, {}),
        (Siglip2ImageProcessor, dict(resample="bilinear_torch", normalize="fused")),
    )
    for cls, overrides in cases:
        batch = nv.ImageProcessor.for_model("siglip2", resize_options=options, **overrides)(images)
        ref = cls(max_num_patches=max_num_patches)(images, return_tensors="pt")
        shapes = ref["spatial_shapes"].tolist()
        assert batch.grid_thw.tolist() == [[1, h, w] for h, w in shapes], cls.__name__
        mask = ref["pixel_attention_mask"].bool()
        rows = torch.cat([ref["pixel_values"][i][mask[i]] for i in range(len(images))])
        assert torch.equal(rows, batch.pixel_values), cls.__name__


def test_processor_rows_feed_the_tower(release):
    """Processor rows (P=4 here) through our tower equal transformers' processor + tower."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    hf, path, *_ = release
    images = _images()[:4]
    ours = nv.ImageProcessor.for_model("siglip2", patch_size=PATCH, resize_options={"max_num_patches": 64})
    batch = ours(images)
    inputs = Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=64)(images, return_tensors="pt")
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    with torch.no_grad():
        ref = hf.vision_model(**{k: v.double() if k == "pixel_values" else v for k, v in inputs.items()})
        got = model.forward_features(batch.pixel_values.double(), batch.grid_thw)
    grids = inputs["spatial_shapes"].tolist()
    assert rel_err(got, real_rows(ref.last_hidden_state, grids)) <= 1e-10
