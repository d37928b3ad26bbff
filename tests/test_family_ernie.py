"""ERNIE-4.5-VL (``ernie4_5_vl_moe``): the tower and its resampler against transformers in float64,
through our loader on the release layouts; the swap into the transformers model; checkpoints; the
processor preset; backends and the padded baseline; the bench preset."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit.integrations import swap_vision_tower
from nativevit.integrations.transformers import ErnieResampler, ErnieVisionTower, ernie_vision_config

IMG, VID, ISTART, IEND, VSTART, VEND = 100, 101, 102, 103, 104, 105
# patch grids (merge blocks of 2x2): non-square, one merge block, an 18x22 image, videos of 2 and 4 frames
GRID = [[1, 6, 10], [2, 4, 4], [1, 2, 2], [1, 18, 22], [4, 2, 6]]
VISION = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96)


def _config():
    from transformers import Ernie4_5_VLMoeConfig

    text = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=3e-5,  # not the tower's 1e-6: the resampler's last norm must read the text eps
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 2]},
        moe_intermediate_size=[16, 16],
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        mlp_layer_types=["dense", "sparse"],
    )
    ids = dict(
        image_token_id=IMG,
        video_token_id=VID,
        image_start_token_id=ISTART,
        image_end_token_id=IEND,
        video_start_token_id=VSTART,
        video_end_token_id=VEND,
    )
    cfg = Ernie4_5_VLMoeConfig(text_config=text, vision_config=dict(VISION), **ids)
    cfg._attn_implementation = "sdpa"
    return cfg


def _inputs() -> dict:
    """Two images and a 2-frame video in one prompt, text between them."""
    grid_i, grid_v = torch.tensor([[1, 4, 6], [1, 6, 4]]), torch.tensor([[2, 4, 4]])
    ids, types = [1, 2], [0, 0]
    for g in grid_i:
        n = int(g.prod()) // 4
        ids += [ISTART] + [IMG] * n + [IEND, 3]
        types += [0] + [1] * n + [0, 0]
    n = int(grid_v.prod()) // 4 // 2
    ids += [VSTART] + [VID] * n + [VEND, 4]
    types += [0] + [2] * n + [0, 0]
    ids, types = torch.tensor([ids]), torch.tensor([types])
    g = torch.Generator().manual_seed(1)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=torch.randn(int(grid_i.prod(-1).sum()), 588, generator=g, dtype=torch.float64),
        image_grid_thw=grid_i,
        pixel_values_videos=torch.randn(int(grid_v.prod(-1).sum()), 588, generator=g, dtype=torch.float64),
        video_grid_thw=grid_v,
    )


@pytest.fixture(scope="module")
def ernie():
    """A tiny random transformers ERNIE-4.5-VL in float64 (tower and resampler re-randomised: default
    inits zero the biases and set the norms to one, which hides mistakes), its inputs and logits."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(0)
    model = Ernie4_5_VLMoeForConditionalGeneration(_config()).double().eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for p in [*model.model.vision_tower.parameters(), *model.model.resampler_model.parameters()]:
            p.normal_(0, 0.2)
    inputs = _inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


def _pixels(grid, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 588, generator=g, dtype=torch.float64).to(dtype)


def _reference(model, px, grid):
    """transformers' tower ``last_hidden_state`` and resampler output (the image/video features)."""
    inner = model.model
    with torch.no_grad():
        last = inner.vision_tower(px, grid).last_hidden_state
        return last, inner.resampler_model(last, grid)


def _write(model, path, layout: str):
    """The tower and resampler of ``model`` as a checkpoint: "save_pretrained" (transformers' writer:
    ``model.vision_model.*``, ``spatial_linear.0/2/3``, the language model too), or transformers'
    in-memory names under ``model.vision_tower.`` / top-level ``vision_model.`` with a language-model key."""
    if layout == "save_pretrained":
        model.save_pretrained(path)
        return path
    path.mkdir(parents=True)
    config = json.loads(model.config.to_json_string())
    (path / "config.json").write_text(json.dumps(config))
    inner = model.model
    prefix = "model.vision_tower." if layout == "in_memory" else "vision_model."
    tensors = {prefix + k: v.clone() for k, v in inner.vision_tower.state_dict().items()}
    tensors.update(
        {"model.resampler_model." + k: v.clone() for k, v in inner.resampler_model.state_dict().items()}
    )
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(128, 48, dtype=torch.float64)
    return write_shards(path, tensors, 2)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["save_pretrained", "in_memory", "top_level"])
def test_tower_and_resampler_match_transformers_fp64(ernie, tmp_path, layout):
    model = ernie[0]
    ours = nv.NativeViT.from_pretrained(_write(model, tmp_path / "ckpt", layout), attn_backend="torch")
    cfg = ours.config
    assert (cfg.model_type, cfg.out_hidden_size, cfg.merger_norm_eps, cfg.temporal_patch_size) == (
        "ernie4_5_vl_moe",
        48,
        3e-5,
        1,
    )
    assert ours.patch_embed.proj.weight.dtype == torch.float64
    grid = torch.tensor(GRID)
    px = _pixels(GRID)
    last, tokens = _reference(model, px, grid)
    with torch.no_grad():
        feats = ours.forward_features(px, grid)
        out = ours(px, grid)
    # one token per merge block of an image, per merge block of each pair of frames of a video
    assert out.shape == tokens.shape == (sum(h * w // 4 * max(1, t // 2) for t, h, w in GRID), 48)
    print(
        f"fp64 relative error: last_hidden_state {rel_err(feats, last):.2e}, "
        f"resampler {rel_err(out, tokens):.2e}"
    )
    assert rel_err(feats, last) <= 1e-10, f"last_hidden_state rel err {rel_err(feats, last):.2e}"
    assert rel_err(out, tokens) <= 1e-10, f"resampler output rel err {rel_err(out, tokens):.2e}"


def test_each_image_alone_equals_the_packed_batch(ernie, tmp_path):
    ours = nv.NativeViT.from_pretrained(
        _write(ernie[0], tmp_path / "ckpt", "in_memory"), attn_backend="torch"
    )
    px = _pixels(GRID, seed=2)
    rows = [t * h * w for t, h, w in GRID]
    with torch.no_grad():
        packed = ours(px, torch.tensor(GRID))
        alone = [ours(p, torch.tensor([g])) for p, g in zip(torch.split(px, rows), GRID)]
    assert rel_err(torch.cat(alone), packed) < 1e-12


def test_video_with_an_odd_frame_count_is_refused():
    model = nv.NativeViT(nv.VisionConfig.preset("ernie4_5_vl_moe", tiny=True), attn_backend="torch")
    with pytest.raises(ValueError, match="even number of frames"):
        model(_pixels([[3, 2, 2]], dtype=torch.float32), torch.tensor([[3, 2, 2]]))


@pytest.mark.parametrize("backend", nv.ops.available_backends("cpu")["attention"])
def test_backends_and_padded_layout(ernie, tmp_path, backend):
    """Every CPU attention backend, and the padded baseline (``layout="padded"``), give transformers'
    output: in float64 where the backend takes it, else float32."""
    model = ernie[0]
    ours = nv.NativeViT.from_pretrained(_write(model, tmp_path / "ckpt", "in_memory"), attn_backend=backend)
    grid = [[1, 6, 10], [2, 4, 4], [1, 2, 2]]
    px = _pixels(grid, seed=3)
    _, ref = _reference(model, px, torch.tensor(grid))
    probe = torch.zeros(1, 4, 16, dtype=torch.float64)
    try:
        nv.ops.resolve_backend("attention", backend, probe)
        dtype, tol = torch.float64, 1e-10
    except RuntimeError:
        dtype, tol = torch.float32, 1e-5
    ours = ours.to(dtype)
    with torch.no_grad():
        out = ours(px.to(dtype), torch.tensor(grid))
        padded = ours(px.to(dtype), torch.tensor(grid), layout="padded")
    assert rel_err(out, ref) <= tol
    assert rel_err(padded, ref) <= tol


# ----------------------------------------------------------------------------- swap


def test_swap_keeps_logits_and_state_dict_keys(ernie, monkeypatch):
    model, inputs, logits = ernie
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert swap_vision_tower(model) is model
    inner = model.model
    assert isinstance(inner.vision_tower, ErnieVisionTower) and isinstance(
        inner.resampler_model, ErnieResampler
    )
    assert list(model.state_dict()) == keys
    # the same tensors (our module names differ: ``ln`` is ``post_norm``; state_dict keeps the release's)
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}
    calls = []
    attention = nv.ops.varlen_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[0])
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(nv.ops, "varlen_attention", counted)
    with torch.no_grad():
        out = model(**inputs).logits
    err = rel_err(out, logits)
    assert err <= 1e-10, f"float64 logits relative error {err:.2e}"
    # the images and the video go through the tower as one packed batch: each block attends once
    rows = inputs["pixel_values"].shape[0] + inputs["pixel_values_videos"].shape[0]
    assert calls == [rows] * VISION["depth"]
    assert swap_vision_tower(model, attn_backend="padded") is model
    assert inner.vision_tower.attn_backend == "padded"
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, logits) <= 1e-10


def test_swapped_model_saves_the_release_layout(ernie, tmp_path):
    model, inputs, logits = ernie
    swapped = swap_vision_tower(copy.deepcopy(model))
    swapped.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    loaded.set_experts_implementation("eager")
    assert not isinstance(loaded.model.vision_tower, ErnieVisionTower)
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert rel_err(loaded(**inputs).logits, logits) <= 1e-10
    tower = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    px = _pixels(GRID[:2])
    with torch.no_grad():
        assert (
            rel_err(tower(px, torch.tensor(GRID[:2])), _reference(model, px, torch.tensor(GRID[:2]))[1])
            <= 1e-10
        )


# ----------------------------------------------------------------------------- checkpoints, configs


def test_save_pretrained_round_trip_in_the_release_layout(tmp_path):
    cfg = nv.VisionConfig.preset("ernie4_5_vl_moe", tiny=True, merger_norm_eps=2e-5)
    model = nv.NativeViT(cfg, attn_backend="torch").double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ernie4_5_vl_moe"
    assert config["text_config"] == {"hidden_size": 48, "rms_norm_eps": 2e-5}
    assert "temporal_patch_size" not in config["vision_config"]
    assert config["vision_config"]["rms_norm_eps"] == 1e-6
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.vision_model.ln.weight" in keys and "model.vision_model.patch_embed.proj.weight" in keys
    assert "model.resampler_model.spatial_linear.0.weight" in keys
    assert "model.resampler_model.after_norm.weight" in keys
    assert not any(k.startswith("model.vision_model.merger") for k in keys)
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    assert loaded.config == cfg
    px = _pixels(GRID)
    with torch.no_grad():
        assert torch.equal(loaded(px, torch.tensor(GRID)), model(px, torch.tensor(GRID)))


def test_release_defaults_are_transformers_defaults():
    from transformers import Ernie4_5_VLMoeConfig

    assert ernie_vision_config(Ernie4_5_VLMoeConfig()) == nv.VisionConfig.preset("ernie4_5_vl_moe")
    cfg = ernie_vision_config(_config())
    assert cfg == nv.VisionConfig.preset("ernie4_5_vl_moe", tiny=True, merger_norm_eps=3e-5)
    again = nv.VisionConfig.from_hf_dict(
        cfg.to_hf_dict(), model_type="ernie4_5_vl_moe", text_config=cfg.text_hf_dict()
    )
    assert again == cfg


def test_swap_refuses_what_the_resampler_cannot_express(ernie):
    model = copy.deepcopy(ernie[0])
    model.config.vision_config.temporal_merge_size = 3
    with pytest.raises(ValueError, match="temporal_merge_size"):
        swap_vision_tower(model)


# ----------------------------------------------------------------------------- processor, bench


def test_processor_preset_matches_transformers_pil():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    sizes = [(97, 143), (300, 41), (1000, 1500), (20, 30)]  # none a multiple of 28; one scaled down, one up
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    ours = nv.ImageProcessor.for_model("ernie4_5_vl_moe", max_pixels=600 * 800)
    ref = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 600 * 800})
    out, expected = ours(images), ref(images, return_tensors="pt")
    assert torch.equal(out.grid_thw, expected["image_grid_thw"])
    assert torch.equal(out.pixel_values, expected["pixel_values"])  # bit-exact
    default = nv.ImageProcessor.for_model("ernie4_5_vl_moe")
    hf = Ernie4_5_VLMoeImageProcessorPil()
    assert default.max_pixels == hf.size["longest_edge"] and default.min_pixels == hf.size["shortest_edge"]
    assert (default.patch_size, default.merge_size, default.temporal_patch_size) == (14, 2, 1)
    assert default.row_width == nv.VisionConfig.preset("ernie4_5_vl_moe").patch_dim == 588
    assert default.grid_for(1000, 1500) == (1, 72, 108)  # 1008 x 1512 px
    assert hf.get_number_of_image_patches(1000, 1500) == 72 * 108


def test_bench_presets():
    from nativevit.bench.encoder import MODELS, model_config

    assert {"ernie4_5_vl_moe", "ernie4_5_vl_moe_tiny"} <= set(MODELS)
    tiny = model_config("ernie4_5_vl_moe_tiny", 2)
    assert (tiny.model_type, tiny.embed_dim, tiny.depth, tiny.patch_dim) == ("ernie4_5_vl_moe", 64, 2, 588)
    full = model_config("ernie4_5_vl_moe", 2)
    assert (full.embed_dim, full.out_hidden_size, full.depth) == (1280, 2560, 2)
