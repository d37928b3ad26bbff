"""Pixtral towers (Mistral 3, and Pixtral-12B as a LLaVA): fp64 parity with transformers'
``PixtralVisionModel`` through our loader, the swap into Mistral 3 and LLaVA, checkpoints in the release
layout, the rotary tables, the image processor, backends, and the bench preset."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import rel_err, write_shards
from safetensors import safe_open
from safetensors.torch import load_file

import nativevit as nv
from nativevit.integrations.transformers import PixtralVisionTower
from nativevit.rope import rope_cos_sin

# (height, width) in px of padded images: patch multiples, sides that are not (the tower floors them,
# as transformers does), one patch, long thin ones.
SIZES = [(48, 80), (160, 32), (16, 16), (70, 45), (33, 250)]


def hf_pixtral_config(**overrides) -> T.PixtralVisionConfig:
    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=16,
        hidden_act="silu",
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return T.PixtralVisionConfig(**kwargs)


def rerandomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits set the norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_pixtral(seed: int = 0, **overrides) -> T.PixtralVisionModel:
    return rerandomise(T.PixtralVisionModel(hf_pixtral_config(**overrides)).double().eval(), seed)


def padded_images(sizes, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images zero-padded to one size, as the Pixtral processor batches them, and their sizes."""
    g = torch.Generator().manual_seed(seed)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    px = torch.zeros(len(sizes), 3, H, W, dtype=torch.float64)
    for i, (h, w) in enumerate(sizes):
        px[i, :, :h, :w] = torch.randn(3, h, w, generator=g, dtype=torch.float64)
    return px.to(dtype), torch.tensor(sizes)


def patchify(px: torch.Tensor, sizes, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded images -> ``(N, 3*P*P)`` rows in raster order (each image cut to whole patches) and grids."""
    rows, grid = [], []
    for image, (h, w) in zip(px, sizes.tolist()):
        gh, gw = h // patch, w // patch
        cut = image[:, : gh * patch, : gw * patch].reshape(3, gh, patch, gw, patch)
        rows.append(cut.permute(1, 3, 0, 2, 4).reshape(gh * gw, -1))
        grid.append([1, gh, gw])
    return torch.cat(rows), torch.tensor(grid)


def release_vision_config(c: T.PixtralVisionConfig) -> dict:
    """``vision_config`` as the Hub releases write it (Mistral-Small-3.1: ``rope_theta`` at the top,
    ``head_dim``, ``image_size``, ``attention_dropout``)."""
    return {
        "attention_dropout": 0.0,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size,
        "image_size": 1540,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "model_type": "pixtral",
        "num_attention_heads": c.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": c.num_hidden_layers,
        "patch_size": c.patch_size,
        "rope_theta": c.rope_parameters["rope_theta"],
    }


def write_release(hf: T.PixtralVisionModel, path: Path, *, prefix: str, model_type: str = "mistral3") -> Path:
    """A released directory: top-level ``model_type``, ``vision_config`` and ``text_config``, two shards
    with an index, the tower under ``prefix``, language-model keys besides."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": model_type,
        "text_config": {"hidden_size": 24, "model_type": "mistral"},
        "vision_config": release_vision_config(hf.config),
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    tensors["language_model.model.embed_tokens.weight"] = torch.randn(10, 24, dtype=torch.float64)
    tensors["multi_modal_projector.linear_1.weight"] = torch.randn(24, 64, dtype=torch.float64)
    return write_shards(path, tensors, 2)


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (ours - ref).abs()
    where = np.unravel_index(diff.argmax().item(), diff.shape)
    return f"{name}: rel err {rel_err(ours, ref):.3e}, max |diff| {diff.max():.3e} at {where}"


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "prefix, patch, theta",
    [("vision_tower.", 16, 10000.0), ("model.vision_tower.", 14, 1e9)],  # Pixtral-12B, Mistral-Small-3.1
)
def test_parity_fp64_through_the_loader(tmp_path, prefix, patch, theta):
    hf = hf_pixtral(patch_size=patch, rope_parameters={"rope_type": "axial", "rope_theta": theta})
    ours = nv.NativeViT.from_pretrained(write_release(hf, tmp_path / "release", prefix=prefix))
    cfg = ours.config
    assert (cfg.model_type, cfg.patch_size, cfg.rope_theta, cfg.norm_eps) == ("pixtral", patch, theta, 1e-5)
    assert ours.patch_embed.proj.weight.shape == (64, 3, patch, patch)  # the release's Conv2d kernel
    px, sizes = padded_images(SIZES)
    with torch.no_grad():
        ref = hf(px, image_sizes=sizes).last_hidden_state[0]
        rows, grid = patchify(px, sizes, patch)
        tokens = ours(rows, grid)
        feats = ours.forward_features(rows, grid)
    assert tokens.shape == ref.shape == (int(grid.prod(-1).sum()), 64)
    print(f"fp64 relative error: last_hidden_state {rel_err(tokens, ref):.2e}")
    assert rel_err(tokens, ref) < 1e-10, report("last_hidden_state", tokens, ref)
    assert torch.equal(feats, tokens)  # no merger in the tower


def test_transformers_save_pretrained_of_mistral3_loads(tmp_path):
    """The layout transformers writes for a whole Mistral 3 (``vision_tower.*``, ``rope_parameters``)."""
    model = mistral3_model()
    model.save_pretrained(tmp_path)
    ours = nv.NativeViT.from_pretrained(tmp_path, dtype=torch.float64)
    hf = model.model.vision_tower
    px, sizes = padded_images(SIZES[:3], seed=1)
    with torch.no_grad():
        ref = hf(px, image_sizes=sizes).last_hidden_state[0]
        out = ours(*patchify(px, sizes, 16))
    assert rel_err(out, ref) < 1e-10, report("mistral3 save_pretrained", out, ref)


def test_rope_tables_equal_transformers():
    """The "interleaved" layout: even 1D frequencies turn with the row, odd ones with the column, the
    tables float32 exactly as ``PixtralVisionRotaryEmbedding`` computes them, for any grid size (no
    largest-position table to outgrow)."""
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

    c = hf_pixtral_config(hidden_size=128, num_attention_heads=4, rope_parameters={"rope_theta": 1e9})
    emb = PixtralVisionRotaryEmbedding(c)
    grid = [(1, 3, 5), (1, 90, 2)]  # 90 rows: past image_size // patch_size of older releases
    ids = torch.cat(
        [torch.cartesian_prod(torch.arange(h), torch.arange(w)) for _, h, w in grid]
    )  # (N, 2) raster (row, col)
    cos_ref, sin_ref = emb(torch.zeros(1, dtype=torch.float32), ids)
    cos, sin = rope_cos_sin(grid, 32, theta=1e9, merge_size=1, kind="interleaved")
    assert torch.equal(torch.cat([cos, cos], -1), cos_ref)
    assert torch.equal(torch.cat([sin, sin], -1), sin_ref)


# ----------------------------------------------------------------------------- swap


# the language model of both VLMs: one small Mistral decoder layer
TINY_MISTRAL = dict(
    model_type="mistral",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
)


def mistral3_model(vision_feature_layer=-1, seed: int = 0) -> T.Mistral3ForConditionalGeneration:
    cfg = T.Mistral3Config(
        vision_config=hf_pixtral_config().to_dict(),
        text_config=dict(TINY_MISTRAL),
        image_token_index=10,
        spatial_merge_size=2,
        vision_feature_layer=vision_feature_layer,
        attn_implementation="sdpa",
    )
    return rerandomise(T.Mistral3ForConditionalGeneration(cfg).double().eval(), seed)


def llava_pixtral_model(vision_feature_layer=-1, seed: int = 0) -> T.LlavaForConditionalGeneration:
    cfg = T.LlavaConfig(
        vision_config=hf_pixtral_config().to_dict(),
        text_config=dict(TINY_MISTRAL),
        image_token_index=10,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        attn_implementation="sdpa",
    )
    return rerandomise(T.LlavaForConditionalGeneration(cfg).double().eval(), seed)


def vlm_inputs(tokens_per_image) -> dict:
    sizes = [(64, 96), (32, 160), (48, 48)]
    px, image_sizes = padded_images(sizes, seed=2)
    n = sum(tokens_per_image(h, w) for h, w in sizes)
    ids = torch.cat([torch.tensor([1, 2]), torch.full((n,), 10), torch.tensor([3, 4])])[None]
    return dict(input_ids=ids, pixel_values=px, image_sizes=image_sizes)


CASES = {
    "mistral3": (mistral3_model, lambda h, w: (h // 32) * (w // 32)),
    "llava": (llava_pixtral_model, lambda h, w: (h // 16) * (w // 16)),
}


@pytest.mark.parametrize(
    "name, layer",
    # (Mistral 3's projector norms the ViT width, so transformers itself takes one layer only)
    [("mistral3", -1), ("mistral3", -2), ("llava", -1), ("llava", [0, -1])],
)
def test_swap_keeps_logits_and_keys(name, layer):
    build, tokens = CASES[name]
    model = build(layer)
    inputs = vlm_inputs(tokens)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert nv.swap_vision_tower(model) is model
    assert isinstance(model.model.vision_tower, PixtralVisionTower)
    assert list(model.state_dict()) == keys
    # the same tensors (named here by nativevit's module names, in state_dict by the release's)
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}
    with torch.no_grad():
        out = model(**inputs).logits
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    assert rel_err(out, ref) <= 1e-10, report(f"{name} logits", out, ref)
    for a, b in zip(features, ref_features, strict=True):
        assert rel_err(a, b) <= 1e-10, report(f"{name} image features", a, b)


def test_swapped_tower_interface_and_round_trip(tmp_path):
    model = mistral3_model()
    reference = copy.deepcopy(model)
    nv.swap_vision_tower(model)
    tower = model.model.vision_tower
    assert nv.swap_vision_tower(model, attn_backend="padded") is model
    assert model.model.vision_tower is tower and tower.attn_backend == "padded"
    px, sizes = padded_images(SIZES, seed=3)
    with torch.no_grad():
        ref = reference.model.vision_tower(px, image_sizes=sizes, output_hidden_states=True)
        out = tower(px, image_sizes=sizes, output_hidden_states=True)
        plain = tower(px, image_sizes=sizes, return_dict=False)
    assert tower.patch_size == 16 and tower.dtype == torch.float64
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-10
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(plain[0], out.last_hidden_state)
    # the swapped model saves the original keys; the unswapped class reads them back
    model.save_pretrained(tmp_path)
    loaded = T.Mistral3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert set(loaded.state_dict()) == set(reference.state_dict())
    inputs = vlm_inputs(CASES["mistral3"][1])
    with torch.no_grad():
        assert rel_err(loaded(**inputs).logits, reference(**inputs).logits) <= 1e-10


def test_llava_release_of_a_pixtral_tower_loads(tmp_path):
    """Pixtral-12B is a LLaVA (top-level ``model_type`` "llava") with a Pixtral ``vision_config``."""
    model = llava_pixtral_model()
    model.save_pretrained(tmp_path)
    ours = nv.NativeViT.from_pretrained(tmp_path, dtype=torch.float64)
    px, sizes = padded_images(SIZES[:2], seed=4)
    with torch.no_grad():
        ref = model.model.vision_tower(px, image_sizes=sizes).last_hidden_state[0]
        out = ours(*patchify(px, sizes, 16))
    assert rel_err(out, ref) < 1e-10


def test_tower_only_save_pretrained_loads(tmp_path):
    """``PixtralVisionModel.save_pretrained``: model_type "pixtral" at the top, keys without a prefix."""
    hf = hf_pixtral(seed=8)
    hf.save_pretrained(tmp_path)
    ours = nv.NativeViT.from_pretrained(tmp_path)
    px, sizes = padded_images(SIZES[2:], seed=9)
    with torch.no_grad():
        ref = hf(px, image_sizes=sizes).last_hidden_state[0]
        out = ours(*patchify(px, sizes, 16))
    assert rel_err(out, ref) < 1e-10


def test_settings_nativevit_cannot_express_name_the_field():
    model = mistral3_model()
    model.model.vision_tower.config.hidden_act = "relu"
    with pytest.raises(ValueError, match="hidden_act"):
        nv.swap_vision_tower(model)
    assert not isinstance(model.model.vision_tower, PixtralVisionTower)


# ----------------------------------------------------------------------------- checkpoints, configs


def test_save_pretrained_writes_the_release_layout(tmp_path):
    hf = hf_pixtral(seed=5)
    ours = nv.NativeViT.from_pretrained(write_release(hf, tmp_path / "a", prefix="vision_tower."))
    ours.save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "mistral3"
    vc = config["vision_config"]
    assert {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels"} <= set(vc)
    assert not {"temporal_patch_size", "spatial_merge_size", "norm_eps"} & set(vc)
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("vision_tower.patch_conv.weight").get_shape() == [64, 3, 16, 16]
    assert keys == {"vision_tower." + k for k in hf.state_dict()}
    # transformers builds the tower from that vision_config and loads those tensors
    hf2 = T.PixtralVisionModel(T.PixtralVisionConfig(**vc, attn_implementation="sdpa")).double().eval()
    saved = load_file(str(tmp_path / "b" / "model.safetensors"))
    hf2.load_state_dict({k.removeprefix("vision_tower."): v for k, v in saved.items()})
    again = nv.NativeViT.from_pretrained(tmp_path / "b")
    px, sizes = padded_images(SIZES, seed=6)
    rows, grid = patchify(px, sizes, 16)
    with torch.no_grad():
        assert rel_err(again(rows, grid), ours(rows, grid)) < 1e-14
        ref = hf2(px, image_sizes=sizes).last_hidden_state[0]
        assert rel_err(ours(rows, grid), ref) < 1e-10


def test_presets_and_release_defaults():
    cfg = nv.VisionConfig.preset("pixtral")
    hf = T.PixtralVisionConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim, cfg.patch_size) == (
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.intermediate_size,
        hf.patch_size,
    )
    assert (cfg.out_hidden_size, cfg.temporal_patch_size, cfg.spatial_merge_size) == (1024, 1, 1)
    assert nv.VisionConfig.from_hf_dict({}, model_type="mistral3") == cfg
    with torch.device("meta"):
        ours = nv.NativeViT(cfg)
        theirs = T.PixtralVisionModel(hf)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    tiny = nv.VisionConfig.preset("pixtral", tiny=True)
    assert tiny.patch_dim == 3 * 16 * 16 and tiny.hidden_act == "silu"
    with pytest.raises(ValueError, match="norm_eps"):
        nv.VisionConfig.preset("pixtral", norm_eps=1e-6).to_hf_dict()
    with pytest.raises(ValueError, match="temporal_patch_size"):
        nv.VisionConfig.preset("pixtral", temporal_patch_size=2).to_hf_dict()
    with pytest.raises(ValueError, match="fields nativevit does not know"):
        nv.VisionConfig.from_hf_dict({"window_size": 112}, model_type="mistral3")


# ----------------------------------------------------------------------------- processor


@pytest.mark.parametrize(
    "overrides, hf_kwargs",
    [
        ({}, {}),  # Pixtral-12B: 16-px patches, longest edge 1024
        (
            dict(patch_size=14, resize_options={"longest_edge": 1540}),  # Mistral-Small-3.1
            dict(patch_size={"height": 14, "width": 14}, size={"longest_edge": 1540}),
        ),
    ],
)
def test_processor_matches_transformers_pil(overrides, hf_kwargs):
    """Bit-exact against ``PixtralImageProcessorPil``: its padded pixels cut to ``image_sizes`` and
    patchified in raster order are our rows. (The torchvision ``PixtralImageProcessor`` resizes with
    torchvision's bicubic and differs by a few uint8 levels; same sizes.)"""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    rng = np.random.default_rng(0)
    shapes = [(300, 410), (90, 1000), (2100, 700), (17, 33), (1024, 1024), (1500, 2000)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    proc = nv.ImageProcessor.for_model("mistral3", **overrides)
    p = proc.patch_size
    ours = proc(images)
    ref = PixtralImageProcessorPil(**hf_kwargs)(images, return_tensors="pt")
    rows, grid = patchify(ref["pixel_values"], ref["image_sizes"], p)
    assert torch.equal(ours.grid_thw, grid)
    assert torch.equal(ours.pixel_values, rows)
    assert ours.pixel_values.shape[1] == nv.VisionConfig.preset("pixtral", patch_size=p).patch_dim
    assert [proc.grid_for(h, w) for h, w in shapes] == [tuple(g) for g in grid.tolist()]


# ----------------------------------------------------------------------------- backends, bench


def _backends() -> list[str]:
    return [n for n in nv.ops.available_backends("cpu")["attention"] if n != "torch"]


@pytest.mark.parametrize("backend", _backends())
def test_backends_and_padded_layout(backend):
    cfg = nv.VisionConfig.preset("pixtral", tiny=True)
    model = rerandomise(nv.NativeViT(cfg, attn_backend="torch").double().eval(), seed=7)
    grid = torch.tensor([[1, 3, 5], [1, 7, 2], [1, 1, 1]])
    rows = torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, dtype=torch.float64)
    with torch.no_grad():
        ref = model(rows, grid)
        assert rel_err(model(rows, grid, layout="padded"), ref) < 1e-12
        model.attn_backend = backend
        try:
            out = model(rows, grid)
            tol = 1e-12
        except RuntimeError:  # a backend without fp64
            model.float()
            out, tol = model(rows.float(), grid).double(), 1e-5
    assert rel_err(out, ref) < tol, report(backend, out, ref)


def test_bench_preset():
    from nativevit.bench.encoder import MODELS, model_config

    assert "pixtral" in MODELS and "pixtral_tiny" in MODELS
    cfg = model_config("pixtral_tiny", 1)
    assert (cfg.model_type, cfg.depth, cfg.embed_dim) == ("pixtral", 1, 64)
    assert model_config("pixtral", 2).embed_dim == 1024
