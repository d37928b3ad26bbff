"""Kimi-K2.5 (MoonViT) tower: fp64 parity with transformers through our loader (images and video clips),
the release layout (fused ``wqkv`` with complex rope pairs, ``(side, side, D)`` position grid), swap,
round trip, processor, backends."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit.integrations.transformers import block_order
from nativevit.rope import rope_cos_sin

pytest.importorskip("transformers.models.kimi_k25")

from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig  # noqa: E402
from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25VisionModel  # noqa: E402

VISION = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=96,
    pos_emb_height=8,
    pos_emb_width=8,
    pos_emb_time=4,
)
# 14-px grids against an 8x8 table: down- and up-sampled, non-square, sides that are no multiple of 4,
# the smallest image, and video clips of 4, 3 and 2 frames (attention spans the clip, frames averaged).
GRID = [[1, 6, 10], [1, 2, 2], [1, 18, 22], [1, 14, 8], [4, 4, 6], [3, 2, 4], [2, 6, 2]]
RELEASE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "hidden_act",
    "merge_kernel_size",
    "pos_emb_height",
    "pos_emb_width",
    "pos_emb_time",
    "rope_parameters",
    "model_type",
)


def rerandomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_kimi(seed: int = 0) -> Kimi_K25VisionModel:
    cfg = Kimi_K25VisionConfig(**VISION, attn_implementation="sdpa")
    return rerandomise(Kimi_K25VisionModel(cfg).double().eval(), seed)


def _complex_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows (i, i + hd/2) -> the release's complex pairs (2i, 2i+1)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_HUB = [
    (r"layers\.(\d+)\.norm1", r"encoder.blocks.\1.norm0"),
    (r"layers\.(\d+)\.norm2", r"encoder.blocks.\1.norm1"),
    (r"layers\.(\d+)\.mlp\.fc1", r"encoder.blocks.\1.mlp.fc0"),
    (r"layers\.(\d+)\.mlp\.fc2", r"encoder.blocks.\1.mlp.fc1"),
    (r"layers\.(\d+)\.attn\.qkv", r"encoder.blocks.\1.wqkv"),
    (r"layers\.(\d+)\.attn\.proj", r"encoder.blocks.\1.wo"),
    (r"final_layernorm", "encoder.final_layernorm"),
    (r"patch_embed\.pos_emb\.position_embeddings", "patch_embed.pos_emb.weight"),
]


def release_tensors(hf: Kimi_K25VisionModel) -> dict[str, torch.Tensor]:
    """The tower as Kimi-K2.5 releases key it: ``vision_tower.encoder.blocks.{i}.wqkv`` (q and k rows in
    complex pairs), ``norm0``/``norm1``, ``mlp.fc0``/``fc1``, ``wo``, ``patch_embed.pos_emb.weight``."""
    state, heads = hf.state_dict(), hf.config.num_attention_heads
    out = {k: v for k, v in state.items() if not re.search(r"\.attn\.[qkv]_proj\.", k)}
    for i in range(hf.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            q, k, v = (state[f"layers.{i}.attn.{n}_proj.{kind}"] for n in "qkv")
            out[f"layers.{i}.attn.qkv.{kind}"] = torch.cat(
                [_complex_pairs(q, heads), _complex_pairs(k, heads), v]
            )
    tensors = {}
    for key, value in out.items():
        for pattern, target in _HUB:
            key = re.sub("^" + pattern, target, key)
        tensors["vision_tower." + key] = value.contiguous()
    return tensors


def write_release(hf: Kimi_K25VisionModel, path, n_shards: int = 2):
    path.mkdir(parents=True, exist_ok=True)
    vision = {k: v for k, v in hf.config.to_dict().items() if k in RELEASE_FIELDS}
    config = {
        "model_type": "kimi_k25",
        "architectures": ["Kimi_K25ForConditionalGeneration"],
        "vision_config": vision,
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = release_tensors(hf)
    tensors["language_model.model.embed_tokens.weight"] = torch.randn(10, 8, dtype=torch.float64)
    return write_shards(path, tensors, n_shards)


def raster_pixels(grid, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 14 * 14, generator=g, dtype=torch.float64)


def run_both(hf, ours, grid, seed=0):
    """transformers' tower on raster rows, ours on the same rows in merge-block order (as our processor
    writes them): ``(ours features, theirs in block order, our tokens, their pooler_output)``."""
    rows = raster_pixels(grid, seed)
    grid_t = torch.tensor(grid)
    order = block_order([tuple(g) for g in grid], 2)
    with torch.no_grad():
        ref = hf(rows.view(-1, 3, 14, 14), grid_t)
        feats = ours.forward_features(rows[order], grid_t)
        tokens = ours(rows[order], grid_t)
    return feats, ref.last_hidden_state[order], tokens, ref.pooler_output.reshape(tokens.shape)


@pytest.fixture(scope="module")
def hf():
    return hf_kimi()


@pytest.fixture(scope="module")
def ours(hf, tmp_path_factory):
    path = write_release(hf, tmp_path_factory.mktemp("kimi"))
    return nv.NativeViT.from_pretrained(path, attn_backend="torch", dtype=torch.float64).eval()


def test_parity_fp64_images_and_clips(hf, ours):
    feats, ref_feats, tokens, ref_tokens = run_both(hf, ours, GRID)
    print(
        f"fp64 relative error: features {rel_err(feats, ref_feats):.2e}, "
        f"merged {rel_err(tokens, ref_tokens):.2e}"
    )
    assert rel_err(feats, ref_feats) < 1e-10
    assert rel_err(tokens, ref_tokens) < 1e-10
    assert tokens.shape == (sum(h * w // 4 for _, h, w in GRID), 4 * 64)


@pytest.mark.parametrize("grid", [[[1, 6, 10]], [[4, 4, 6]], [[1, 2, 2], [3, 2, 4]]])
def test_parity_fp64_each_size(hf, ours, grid):
    feats, ref_feats, tokens, ref_tokens = run_both(hf, ours, grid, seed=1)
    assert rel_err(feats, ref_feats) < 1e-10
    assert rel_err(tokens, ref_tokens) < 1e-10


def test_clips_attend_across_frames_and_frames_get_time_embeddings(ours):
    """A 2-frame clip is not two images: frames see each other and the second gets its sinusoid."""
    rows = raster_pixels([[2, 4, 4]], seed=2)[block_order([(2, 4, 4)], 2)]
    with torch.no_grad():
        clip = ours.forward_features(rows, torch.tensor([[2, 4, 4]]))
        apart = ours.forward_features(rows, torch.tensor([[1, 4, 4], [1, 4, 4]]))
    assert rel_err(clip, apart) > 1e-3


def test_more_frames_than_the_time_table_are_refused(ours):
    rows = raster_pixels([[5, 2, 2]])
    with pytest.raises(ValueError, match="max_frames"):
        ours(rows, torch.tensor([[5, 2, 2]]))


def test_rope_layout_matches_transformers(hf):
    """The "kimi" frequency layout: pairs alternate column, row at Qwen's frequencies."""
    from transformers.vision_utils import get_vision_position_ids

    grid = [(1, 6, 10), (2, 4, 4)]
    pos = get_vision_position_ids(torch.tensor(grid), spatial_merge_size=2)
    cos, sin = hf.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    ours_cos, ours_sin = rope_cos_sin(grid, 16, merge_size=2, kind="kimi")
    assert torch.equal(torch.cat([ours_cos, ours_cos], -1), cos)
    assert torch.equal(torch.cat([ours_sin, ours_sin], -1), sin)


def tiny_full_model(seed: int = 0):
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    text = dict(
        model_type="deepseek_v3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
    )
    vision = {**VISION, "hidden_size": 32}
    torch.manual_seed(seed)
    cfg = Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=32, image_token_id=5, video_token_id=6
    )
    model = Kimi_K25ForConditionalGeneration(cfg).double().eval()
    rerandomise(model.model.vision_tower, seed + 1)
    return model


def test_transformers_save_pretrained_loads(tmp_path):
    """What transformers writes for a Kimi-K2.5 model (the release layout) loads as the same tower."""
    model = tiny_full_model()
    model.save_pretrained(tmp_path)
    ours = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch", dtype=torch.float64)
    feats, ref_feats, tokens, ref_tokens = run_both(model.model.vision_tower, ours, GRID[:5])
    assert rel_err(feats, ref_feats) < 1e-10
    assert rel_err(tokens, ref_tokens) < 1e-10


def test_swap_keeps_logits_and_state_dict_keys():
    model = tiny_full_model()
    image_grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    video_grid = torch.tensor([[4, 2, 4], [2, 2, 2]])
    pixels = raster_pixels(image_grid.tolist(), seed=3).view(-1, 3, 14, 14)
    videos = raster_pixels(video_grid.tolist(), seed=4).view(-1, 3, 14, 14)
    ids = torch.tensor([[1, 2] + [5] * 7 + [3] + [6] * 3 + [4]])
    inputs = dict(
        input_ids=ids,
        pixel_values=pixels,
        image_grid_thw=image_grid,
        pixel_values_videos=videos,
        video_grid_thw=video_grid,
    )
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs).logits
        other = model(**{**inputs, "pixel_values": pixels + 1}).logits
        features = model.model.get_image_features(pixels, image_grid).pooler_output
        nv.swap_vision_tower(model, attn_backend="torch")
        assert type(model.model.vision_tower).__name__ == "KimiVisionTower"
        out = model(**inputs).logits
        swapped = model.model.get_image_features(pixels, image_grid).pooler_output
    assert rel_err(other, ref) > 1e-6  # the images matter
    assert rel_err(out, ref) < 1e-10
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(swapped, features))
    assert list(model.state_dict()) == keys
    model.load_state_dict(model.state_dict())


def test_swapped_tower_hidden_states_match(hf):
    from nativevit.integrations.transformers import KimiVisionTower

    tower = KimiVisionTower.from_transformers(hf, attn_backend="torch")
    grid = torch.tensor([[1, 6, 10], [3, 2, 4]])
    rows = raster_pixels(grid.tolist(), seed=5).view(-1, 3, 14, 14)
    with torch.no_grad():
        ref = hf(rows, grid, output_hidden_states=True)
        out = tower(rows, grid, output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-10
    assert rel_err(out.pooler_output, ref.pooler_output) < 1e-10
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a, b) < 1e-10


def test_save_load_round_trip_in_the_release_layout(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "config.json").read_text())
    assert index["model_type"] == "kimi_k25"
    assert index["vision_config"]["merge_kernel_size"] == [2, 2]
    assert index["vision_config"]["pos_emb_height"] == 8
    from safetensors import safe_open

    keys = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    assert "vision_tower.encoder.blocks.0.wqkv.weight" in keys
    assert "vision_tower.patch_embed.pos_emb.weight" in keys
    assert "vision_tower.patch_embed.proj.weight" in keys
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch", dtype=torch.float64)
    assert loaded.config == ours.config
    for (k, a), (k2, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_config_round_trip_and_refusals():
    cfg = nv.VisionConfig.preset("kimi_k25", tiny=True)
    assert nv.VisionConfig.from_hf_dict(cfg.to_hf_dict(), model_type="kimi_k25") == cfg
    full = nv.VisionConfig.preset("kimi_k25")
    assert (full.embed_dim, full.depth, full.num_position_embeddings, full.max_frames) == (1152, 27, 4096, 4)
    with pytest.raises(ValueError, match="square"):
        nv.VisionConfig.from_hf_dict({**cfg.to_hf_dict(), "pos_emb_width": 6}, model_type="kimi_k25")
    import dataclasses

    with pytest.raises(ValueError, match="rope_pairs"):
        dataclasses.replace(cfg, rope_pairs="half").to_hf_dict()


def test_hub_remote_code_config_reads_as_the_release():
    """moonshotai/Kimi-K2.5's config.json names the tower fields for its remote code (vt_*, init_*)."""
    remote = {
        "patch_size": 14,
        "init_pos_emb_height": 64,
        "init_pos_emb_width": 64,
        "init_pos_emb_time": 4,
        "pos_emb_type": "divided_fixed",
        "vt_num_attention_heads": 16,
        "vt_num_hidden_layers": 27,
        "vt_hidden_size": 1152,
        "vt_intermediate_size": 4304,
        "merge_kernel_size": [2, 2],
        "video_attn_type": "spatial_temporal",
        "merge_type": "sd2_tpool",
        "mm_projector_type": "patchmerger",
        "mm_hidden_size": 1152,
        "projector_ln_eps": 1e-5,
        "text_hidden_size": 7168,
    }
    cfg = nv.VisionConfig.from_hf_dict(remote, model_type="kimi_k25")
    assert cfg == nv.VisionConfig.preset("kimi_k25")
    assert set(cfg.to_hf_dict()) >= {"hidden_size", "num_hidden_layers", "pos_emb_height", "pos_emb_time"}


def test_processor_matches_transformers():
    """Bit-exact against transformers' Kimi-K2.5 processor (torchvision backend): navit_resize, torch's
    uint8 antialiased bicubic, zero padding to multiples of 28, fused rescale and normalise; the rows
    are the same, ours in merge-block order."""
    pytest.importorskip("torchvision")
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(50, 70), (300, 200), (33, 517), (13, 20)]
    ]
    for budget in (16384, 256):  # as released, and a budget that scales the larger images down
        ref = Kimi_K25ImageProcessor(max_patches=budget)(images=images, return_tensors="pt")
        proc = nv.ImageProcessor.for_model("kimi_k25", resize_options={"max_patches": budget})
        batch = proc(images)
        assert batch.grid_thw.tolist() == ref["image_grid_thw"].tolist()
        order = block_order([tuple(g) for g in batch.grid_thw.tolist()], 2)
        assert torch.equal(batch.pixel_values, ref["pixel_values"].reshape(len(order), -1)[order])


def test_video_processor_matches_transformers():
    """Videos cut into clips of 4 frames, each its own grid, bit-exact against transformers' Kimi-K2.5
    video processor (frames given, not sampled; its budget of 4096 patches a frame)."""
    pytest.importorskip("torchvision")
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    rng = np.random.default_rng(1)
    videos = [
        rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
        for f, h, w in [(6, 50, 70), (4, 100, 90), (1, 30, 44)]
    ]
    ref = Kimi_K25VideoProcessor()(
        videos=[torch.from_numpy(v).permute(0, 3, 1, 2) for v in videos],
        do_sample_frames=False,
        return_tensors="pt",
    )
    batch = nv.ImageProcessor.for_model("kimi_k25", resize_options={"max_patches": 4096})(videos)
    assert (
        batch.grid_thw.tolist()
        == ref["video_grid_thw"].tolist()
        == [[4, 4, 6], [2, 4, 6], [4, 8, 8], [1, 4, 4]]
    )
    assert batch.views_per_image == ref["num_chunks_per_video"].tolist()
    order = block_order([tuple(g) for g in batch.grid_thw.tolist()], 2)
    assert torch.equal(batch.pixel_values, ref["pixel_values_videos"].reshape(len(order), -1)[order])


SMALL = [[1, 6, 10], [3, 2, 4], [1, 2, 2]]


def test_padded_baseline(ours):
    grid = torch.tensor(SMALL)
    rows = raster_pixels(SMALL, seed=6)[block_order([tuple(g) for g in SMALL], 2)]
    with torch.no_grad():
        ref = ours(rows, grid)
        ours.attn_backend = "padded"
        try:
            out = ours(rows, grid)
        finally:
            ours.attn_backend = "torch"
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize(
    "backend", [b for b in nv.ops.available_backends("cpu")["attention"] if b != "torch"]
)
def test_cpu_backends(ours, backend):
    """Every attention backend that runs here, in float32 (the Triton kernels under the interpreter)."""
    grid = torch.tensor(SMALL)
    rows = raster_pixels(SMALL, seed=7)[block_order([tuple(g) for g in SMALL], 2)].float()
    model = nv.NativeViT(ours.config, attn_backend="torch").float().eval()
    model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = model(rows, grid)
        model.attn_backend = backend
        out = model(rows, grid)
    assert rel_err(out, ref) < 1e-4


def test_bench_preset_builds():
    from nativevit.bench.encoder import MODELS

    assert "kimi_k25_tiny" in MODELS and "kimi_k25" in MODELS
