"""GLM-4.1V / GLM-4.5V / GLM-4.6V (``glm4v``) and GLM-OCR (``glm_ocr``) towers: fp64 parity with
transformers through our loader (images of sizes that are no multiple of anything, and videos), the
bicubic grid_sample position table, release configs and keys, save/load, the swap into a tiny
transformers VLM (logits unchanged in fp64), the GLM image processor, backends and the padded layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit.integrations import QwenVisionTower, swap_vision_tower
from nativevit.positions import grid_sample_coords, position_kind

T = pytest.importorskip("transformers")

# 14-px patch grids: odd merged sizes, non-square both ways, smaller and larger than the 8x8 table, one
# merged token, and a video of 2 temporal patches (4 frames).
GRID = [[1, 6, 10], [1, 2, 2], [1, 18, 8], [2, 4, 6], [1, 10, 22]]
ROW = 3 * 2 * 14 * 14
SMALL = [[1, 6, 10], [2, 2, 4]]  # for the triton interpreter


def pixels(grid, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, ROW, generator=g, dtype=torch.float64)


def per_frame(grid) -> torch.Tensor:
    """transformers' GLM towers take videos as one [1, h, w] grid per temporal patch (its
    ``get_video_features`` splits them so; a grid with t > 1 mis-sizes its position table)."""
    return torch.tensor([[1, h, w] for t, h, w in grid for _ in range(t)])


def rerandomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


VISION = {
    "glm4v": dict(
        depth=2,
        hidden_size=32,
        num_heads=2,  # head dim 16, as the triton kernels take
        out_hidden_size=48,
        intermediate_size=40,
        image_size=112,  # an 8x8 table of 14-px patches
    ),
    "glm_ocr": dict(depth=2, hidden_size=32, num_heads=2, out_hidden_size=24, intermediate_size=40),
}


def hf_tower(name: str, **overrides):
    if name == "glm4v":
        from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig as C
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel as M
    else:
        from transformers.models.glm_ocr.configuration_glm_ocr import GlmOcrVisionConfig as C
        from transformers.models.glm_ocr.modeling_glm_ocr import GlmOcrVisionModel as M
    cfg = C(**{**VISION[name], **overrides}, attn_implementation="sdpa")
    return rerandomise(M(cfg).double().eval())


def release_config(hf_model, model_type: str) -> dict:
    """config.json as the GLM releases write it: vision_config in transformers' field names, extras
    included (hidden_dropout_prob, initializer_range, model_type)."""
    vision = {
        k: v
        for k, v in hf_model.config.to_diff_dict().items()
        if k not in ("transformers_version", "rope_parameters")
    }
    vision["hidden_dropout_prob"] = 0.0
    return {
        "architectures": ["ReleasedForConditionalGeneration"],
        "model_type": model_type,
        "text_config": {"hidden_size": 24, "model_type": model_type + "_text"},
        "vision_config": vision,
    }


def write_release(hf_model, path: Path, model_type: str, prefix: str = "model.visual.") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(release_config(hf_model, model_type)))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.randn(10, 24, dtype=torch.float64)
    tensors["lm_head.weight"] = torch.randn(10, 24, dtype=torch.float64)
    return write_shards(path, tensors, 2)


def check_parity(model: nv.NativeViT, hf, grid=GRID, **kwargs) -> float:
    """``model`` against transformers' tower on ``grid`` (videos as per-frame grids for transformers):
    merged tokens (pooler_output) and the downsampled states (last_hidden_state). Returns the worst
    relative error."""
    px = pixels(grid)
    with torch.no_grad():
        ref = hf(px, grid_thw=per_frame(grid))
        tokens = model(px, torch.tensor(grid), **kwargs)
        feats = model.merger.reduce(model.forward_features(px, torch.tensor(grid), **kwargs))
    errs = [rel_err(tokens, ref.pooler_output), rel_err(feats, ref.last_hidden_state)]
    assert tokens.shape == ref.pooler_output.shape and feats.shape == ref.last_hidden_state.shape
    print(f"fp64 relative error (pooler_output, last_hidden_state): {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= 1e-10, f"pooler_output / last_hidden_state rel err {errs}"
    return max(errs)


@pytest.fixture(scope="module")
def glm4v():
    return hf_tower("glm4v")


@pytest.fixture(scope="module")
def ours4v(glm4v, tmp_path_factory):
    path = write_release(glm4v, tmp_path_factory.mktemp("glm4v"), "glm4v")
    return nv.NativeViT.from_pretrained(path, attn_backend="torch")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "name, model_type, overrides",
    [
        ("glm4v", "glm4v", {}),
        ("glm4v", "glm4v_moe", {"attention_bias": True, "rms_norm_eps": 1e-6}),
        ("glm4v", "glm46v", {}),
        ("glm_ocr", "glm_ocr", {}),
        ("glm_ocr", "glm_ocr", {"attention_bias": False}),
    ],
)
def test_parity_fp64(name, model_type, overrides, tmp_path):
    hf = hf_tower(name, **overrides)
    model = nv.NativeViT.from_pretrained(write_release(hf, tmp_path, model_type), attn_backend="torch")
    cfg = model.config
    bias = overrides.get("attention_bias", name == "glm_ocr")
    assert cfg.model_type == name and cfg.qkv_bias == bias
    assert cfg.proj_bias == cfg.mlp_bias == (bias and name == "glm_ocr")
    assert cfg.norm_eps == overrides.get("rms_norm_eps", 1e-5)
    if name == "glm4v":  # the block MLP is out_hidden_size wide, the merger's SwiGLU intermediate_size
        assert (cfg.mlp_hidden_dim, cfg.merger_intermediate_size, cfg.num_position_embeddings) == (48, 40, 64)
    else:  # the merger's SwiGLU is out_hidden_size * in_channels wide
        assert (cfg.mlp_hidden_dim, cfg.merger_intermediate_size, cfg.num_position_embeddings) == (40, 72, 0)
    check_parity(model, hf)


def test_glm4v_moe_vision_config_is_the_glm4v_tower():
    """GLM-4.5V's Glm4vMoeVisionModel: the same modules and keys as Glm4vVisionModel."""
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeVisionConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeVisionModel

    hf = rerandomise(Glm4vMoeVisionModel(Glm4vMoeVisionConfig(**VISION["glm4v"])).double().eval())
    cfg = nv.VisionConfig.from_hf_dict(hf.config.to_diff_dict(), model_type="glm4v_moe")
    model = nv.NativeViT(cfg, attn_backend="torch").double().eval()
    model.load_state_dict({cfg.family.model_key(k): v for k, v in hf.state_dict().items()})
    check_parity(model, hf, grid=GRID[:3])


def test_video_equals_its_frames(ours4v):
    """A [t, h, w] video is t frames of [1, h, w]: the same rows, positions and segments."""
    grid = [[3, 4, 6], [1, 2, 4]]
    px = pixels(grid, seed=3)
    with torch.no_grad():
        a = ours4v(px, torch.tensor(grid))
        b = ours4v(px, per_frame(grid))
    assert torch.equal(a, b)


def check_backends(model: nv.NativeViT, hf, grid) -> None:
    """Every CPU attention and RoPE backend in float32 (the "cpu" kernels take no float64) against
    transformers' float64 output."""
    px = pixels(grid)
    with torch.no_grad():
        ref = hf(px, grid_thw=per_frame(grid)).pooler_output
    model = copy.deepcopy(model).float()
    for op, names in nv.ops.available_backends("cpu").items():
        for backend in names:
            model.attn_backend, model.rope_backend = ("torch", "torch")
            setattr(model, f"{'attn' if op == 'attention' else op}_backend", backend)
            with torch.no_grad():
                out = model(px.float(), torch.tensor(grid))
            assert rel_err(out, ref) <= 1e-4, f"{op} backend {backend}: rel err {rel_err(out, ref):.2e}"


def test_padded_layout_and_cpu_backends(ours4v, glm4v):
    check_parity(ours4v, glm4v, layout="padded")
    check_backends(ours4v, glm4v, SMALL)


def test_ocr_backends_and_padded():
    hf = hf_tower("glm_ocr")
    cfg = nv.VisionConfig.from_hf_dict(hf.config.to_diff_dict(), model_type="glm_ocr")
    model = nv.NativeViT(cfg, attn_backend="torch").double().eval()
    model.load_state_dict({cfg.family.model_key(k): v for k, v in hf.state_dict().items()})
    check_parity(model, hf, grid=GRID[:3], layout="padded")
    check_backends(model, hf, SMALL)


def test_grid_sample_position_kind_matches_transformers():
    """The planned coordinates and the fp32 bicubic grid_sample, against Glm4vVisionEmbeddings."""
    from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionEmbeddings
    from transformers.vision_utils import get_vision_position_ids

    emb = Glm4vVisionEmbeddings(Glm4vVisionConfig(hidden_size=16, image_size=84)).double()  # 6x6 table
    rerandomise(emb)
    grid = per_frame([[1, 2, 14], [2, 8, 4], [1, 12, 12]])
    pos = get_vision_position_ids(grid, 2)
    lengths = grid.prod(-1)
    zeros = torch.zeros(int(lengths.sum()), 16, dtype=torch.float64)
    with torch.no_grad():
        ref = emb(zeros, lengths, grid, pos[:, 0], pos[:, 1])
        kind = position_kind("bicubic_grid_sample")
        ours = kind.apply(emb.position_embedding.weight, grid_sample_coords(grid.tolist(), 6, 2))
    assert ours.dtype == torch.float64
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- configs, checkpoints


def test_release_config_fields_and_round_trip(ours4v, glm4v, tmp_path):
    release = release_config(glm4v, "glm4v")["vision_config"]
    written = ours4v.config.to_hf_dict()
    for key in ("hidden_size", "out_hidden_size", "intermediate_size", "image_size", "attention_bias"):
        assert written[key] == release[key], key
    assert written["rms_norm_eps"] == release["rms_norm_eps"]
    ours4v.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("glm4v", ["Glm4vForConditionalGeneration"])
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {"model.visual." + k for k in glm4v.state_dict()}
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    assert loaded.config == ours4v.config
    check_parity(loaded, glm4v, grid=GRID[:2])


def test_ocr_round_trip_and_release_fields(tmp_path):
    cfg = nv.VisionConfig.preset("glm_ocr", tiny=True)
    model = nv.NativeViT(cfg).double()
    model.save_pretrained(tmp_path)
    vc = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    assert vc["attention_bias"] is True and "image_size" not in vc
    assert vc["intermediate_size"] == cfg.mlp_hidden_dim
    loaded = nv.NativeViT.from_pretrained(tmp_path)
    assert loaded.config == cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_configs_glm_releases_cannot_describe_are_refused():
    with pytest.raises(ValueError, match="derives it"):
        nv.VisionConfig.preset("glm4v", tiny=True, intermediate_size=64).to_hf_dict()
    with pytest.raises(ValueError, match="derives it"):
        nv.VisionConfig.preset("glm_ocr", tiny=True, merger_intermediate_size=64).to_hf_dict()
    with pytest.raises(ValueError, match="cannot differ"):
        nv.VisionConfig.preset("glm_ocr", tiny=True, proj_bias=False).to_hf_dict()
    with pytest.raises(ValueError, match="proj_bias"):
        nv.VisionConfig.preset("glm4v", tiny=True, proj_bias=True).to_hf_dict()
    with pytest.raises(ValueError, match="does not know"):
        nv.VisionConfig.from_hf_dict({"num_position_embeddings": 64}, model_type="glm_ocr")


def test_release_defaults_are_transformers_defaults():
    from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig
    from transformers.models.glm_ocr.configuration_glm_ocr import GlmOcrVisionConfig

    for name, hf_cfg in (("glm4v", Glm4vVisionConfig()), ("glm_ocr", GlmOcrVisionConfig())):
        assert nv.VisionConfig.from_hf_dict({}, model_type=name) == nv.VisionConfig.preset(name)
        assert nv.VisionConfig.from_hf_dict(hf_cfg.to_diff_dict(), model_type=name) == nv.VisionConfig.preset(
            name
        )
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel
    from transformers.models.glm_ocr.modeling_glm_ocr import GlmOcrVisionModel

    for name, cls, hf_cfg in (
        ("glm4v", Glm4vVisionModel, Glm4vVisionConfig(depth=1)),
        ("glm_ocr", GlmOcrVisionModel, GlmOcrVisionConfig(depth=1)),
    ):
        with torch.device("meta"):
            hf = cls(hf_cfg)
            ours = nv.NativeViT(nv.VisionConfig.preset(name, depth=1))
        hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        fam = ours.config.family
        assert {fam.release_key(k): tuple(v.shape) for k, v in ours.state_dict().items()} == hf_shapes


# ----------------------------------------------------------------------------- swap


IMG, VSTART, VEND, ISTART, IEND = 100, 101, 102, 103, 104


def _glm_model(name: str):
    from transformers.models.glm46v.configuration_glm46v import Glm46VConfig

    cls, config = {
        "glm4v": (T.Glm4vForConditionalGeneration, T.Glm4vConfig),
        "glm4v_moe": (T.Glm4vMoeForConditionalGeneration, T.Glm4vMoeConfig),
        "glm46v": (T.Glm46VForConditionalGeneration, Glm46VConfig),
        "glm_ocr": (T.GlmOcrForConditionalGeneration, T.GlmOcrConfig),
    }[name]
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    if name == "glm_ocr":
        text["head_dim"] = 8
    if name == "glm4v_moe":  # GLM-4.5V: rotates half the head dim
        text["rope_parameters"]["partial_rotary_factor"] = 0.5
        text.update(
            head_dim=16,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
        )
    vision = {**VISION["glm_ocr" if name == "glm_ocr" else "glm4v"], "out_hidden_size": 32}
    cfg = config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMG,
        video_token_id=IMG + 10,
        image_start_token_id=ISTART,
        image_end_token_id=IEND,
        video_start_token_id=VSTART,
        video_end_token_id=VEND,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if name == "glm4v_moe":
        model.set_experts_implementation("eager")  # float64 MoE needs the eager experts
    rerandomise(model.model.visual, seed=1)
    return model.double()


def _prompt(grids, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mm_token_type_ids: GLM marks image and video frames with the image token."""
    ids, types = [1, 2], [0, 0]
    for t, h, w in grids:
        for _ in range(t):
            n = h * w // 4
            ids += [ISTART if kind == 1 else VSTART] + [IMG] * n + [IEND if kind == 1 else VEND, 3]
            types += [0] + [kind] * n + [0, 0]
    return torch.tensor([ids + [4]]), torch.tensor([types + [0]])


def _inputs(video: bool) -> dict:
    g = torch.Generator().manual_seed(2)
    if video:
        grid = torch.tensor([[2, 4, 6]])
        ids, types = _prompt(grid.tolist(), 2)
        px = torch.randn(int(grid.prod(-1).sum()), ROW, generator=g, dtype=torch.float64)
        return dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=types,
            pixel_values_videos=px,
            video_grid_thw=grid,
        )
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 10]])
    ids, types = _prompt(grid.tolist(), 1)
    px = torch.randn(int(grid.prod(-1).sum()), ROW, generator=g, dtype=torch.float64)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=px,
        image_grid_thw=grid,
    )


@pytest.mark.parametrize("name", ["glm4v", "glm4v_moe", "glm46v", "glm_ocr"])
def test_swap_keeps_logits_keys_and_parameters(name, tmp_path):
    model = _glm_model(name)
    cases = [_inputs(video=False), _inputs(video=True)]
    with torch.no_grad():
        before = [model(**inputs).logits for inputs in cases]
        hf_out = model.model.visual(cases[0]["pixel_values"], grid_thw=cases[0]["image_grid_thw"])
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    assert swap_vision_tower(model) is model
    tower = model.model.visual
    assert isinstance(tower, QwenVisionTower) and tower.config.model_type == nv.config.family(name).name
    assert list(model.state_dict()) == keys
    # the same parameter objects (named_parameters() gives nativevit's module names, e.g.
    # visual.merger.downsample for transformers' visual.downsample; state_dict() gives transformers')
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}
    with torch.no_grad():
        for inputs, ref in zip(cases, before, strict=True):
            err = rel_err(model(**inputs).logits, ref)
            assert err <= 1e-10, f"{name}: fp64 logits rel err {err:.2e}"
        out = tower(cases[0]["pixel_values"], grid_thw=cases[0]["image_grid_thw"])
    assert rel_err(out.last_hidden_state, hf_out.last_hidden_state) <= 1e-10
    assert rel_err(out.pooler_output, hf_out.pooler_output) <= 1e-10
    with torch.no_grad():  # the tower matters: a changed parameter changes the logits
        tower.merger.downsample.weight.mul_(1.01)
        assert rel_err(model(**cases[0]).logits, before[0]) > 1e-6
        tower.merger.downsample.weight.div_(1.01)
    if name in ("glm4v_moe", "glm46v"):
        return
    # the swapped model saves transformers' layout, which transformers loads back
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not isinstance(loaded.model.visual, QwenVisionTower)
    with torch.no_grad():
        assert rel_err(loaded(**cases[0]).logits, before[0]) <= 1e-10


# ----------------------------------------------------------------------------- processor


def _images():
    rng = np.random.default_rng(0)
    sizes = [(300, 410), (90, 1000), (20, 50), (56, 57), (13, 300), (2000, 1500)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("model_type", ["glm4v", "glm4v_moe", "glm46v", "glm_ocr"])
def test_processor_matches_transformers_pil(model_type):
    """Bit-exact against Glm4vImageProcessorPil / Glm46VImageProcessorPil (GLM's smart_resize: small
    sides scaled up first, pixel bounds over both temporal patches)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    hf = Glm46VImageProcessorPil() if model_type == "glm46v" else Glm4vImageProcessorPil()
    images = _images()
    ref = hf(images, return_tensors="pt")
    batch = nv.ImageProcessor.for_model(model_type)(images)
    assert torch.equal(batch.grid_thw, ref["image_grid_thw"])
    assert torch.equal(batch.pixel_values, ref["pixel_values"])
    assert batch.pixel_values.shape[1] == nv.VisionConfig.preset(model_type).patch_dim
    if model_type == "glm4v":  # the max_pixels bound (over T * h * w): the 2000x1500 image is scaled down
        ref = Glm4vImageProcessorPil(size={"shortest_edge": 12544, "longest_edge": 4_000_000})(
            images, return_tensors="pt"
        )
        batch = nv.ImageProcessor.for_model(model_type, max_pixels=4_000_000)(images)
        assert ref["image_grid_thw"][-1].prod() * 14 * 14 * 2 <= 4_000_000
        assert torch.equal(batch.grid_thw, ref["image_grid_thw"])
        assert torch.equal(batch.pixel_values, ref["pixel_values"])


def test_processor_grids_match_the_torchvision_processor():
    """The auto mapping's default (torchvision) Glm4vImageProcessor sizes images alike; its pixels come
    from torch's bicubic resize, not PIL's, so only the grids are compared exactly."""
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor

    images = _images()
    ref = Glm4vImageProcessor()(images, return_tensors="pt")
    batch = nv.ImageProcessor.for_model("glm4v")(images)
    assert torch.equal(batch.grid_thw, ref["image_grid_thw"])


def test_processed_images_run_through_the_tower(ours4v, glm4v):
    batch = nv.ImageProcessor.for_model("glm4v")(_images()[:3])
    px = batch.pixel_values.double()
    with torch.no_grad():
        ref = glm4v(px, grid_thw=batch.grid_thw).pooler_output
        ours = ours4v(px, batch.grid_thw)
    assert rel_err(ours, ref) <= 1e-10


def test_bicubic_grid_sample_reference_formula():
    """The coordinates are pixel centres normalised to [-1, 1], whatever the table size."""
    (coords,) = grid_sample_coords([(1, 2, 4)], 6, 2)
    # merge-block order: block (0,0) = (0,0),(0,1),(1,0),(1,1); then block (0,1)
    expect = torch.tensor([[-0.75, -0.5], [-0.25, -0.5], [-0.75, 0.5], [-0.25, 0.5]])
    assert torch.equal(coords[:4], expect)
    table = torch.randn(36, 5, dtype=torch.float64)
    out = position_kind("bicubic_grid_sample").apply(table, (coords,))
    image = table.view(6, 6, 5).permute(2, 0, 1)[None].float()
    ref = F.grid_sample(
        image, coords[None, :, None], mode="bicubic", align_corners=False, padding_mode="border"
    )
    assert torch.equal(out, ref[0, :, :, 0].t().double())
