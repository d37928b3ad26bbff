"""PaddleOCR-VL's tower: fp64 parity with transformers through our loader (release and vision-only
layouts), the half-pixel position resampling, release configs, checkpoints, the swap into
``PaddleOCRVLForConditionalGeneration``, the image processor, backends and the bench preset."""

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
from nativevit import ops
from nativevit.integrations import swap_vision_tower
from nativevit.integrations.transformers import PaddleOCRVisionTower
from nativevit.positions import half_pixel_taps

T = pytest.importorskip("transformers")

# 14-px grids against an 8x8 learned table (image_size 112): down- and up-sampled, non-square, odd
# sides (the tower takes any grid: PaddleOCR-VL merges 2x2 in its projector), one patch, a 2-frame clip.
GRID = [[1, 6, 10], [1, 4, 4], [1, 18, 22], [1, 1, 1], [1, 9, 5], [1, 16, 8], [2, 4, 6]]
VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=112,
    patch_size=14,
)


def pixels(grid, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 14 * 14, generator=g, dtype=torch.float64).to(dtype)


def rerandomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_tower(seed: int = 0, **overrides):
    from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel

    cfg = T.PaddleOCRVisionConfig(**{**VISION, **overrides}, attn_implementation="sdpa")
    return rerandomise(PaddleOCRVisionModel(cfg).double().eval(), seed)


def hf_features(hf, px: torch.Tensor, grid) -> torch.Tensor:
    """transformers' tower over ``(N, C*P*P)`` rows, given as the model gives them: ``(1, N, C, P, P)``."""
    with torch.no_grad():
        return hf(px.view(1, -1, 3, 14, 14), grid_thw=torch.tensor(grid)).last_hidden_state


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (ours - ref).abs()
    where = diff.amax(-1).argmax()
    return f"{name}: rel err {rel_err(ours, ref):.3e}, max |diff| {diff.max():.3e} at row {where}"


def write_release(hf, path: Path, *, prefix: str) -> Path:
    """A Hub-style PaddleOCR-VL directory: ``vision_config`` with the release's fields (the unused
    ``temporal_patch_size`` and the projector's ``spatial_merge_size`` included), the tower under
    ``prefix``, the unused SigLIP head and packing table the release carries, the projector
    (``mlp_AR``) and language-model keys besides."""
    path.mkdir(parents=True, exist_ok=True)
    c = hf.config
    vision = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "paddleocr_vl",
        "attention_dropout": 0.0,
        "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size,
        "image_size": c.image_size,
        "intermediate_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps,
        "num_attention_heads": c.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": c.num_hidden_layers,
        "pad_token_id": 0,
        "patch_size": c.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "torch_dtype": "bfloat16",
    }
    config = {
        "architectures": ["PaddleOCRVLForConditionalGeneration"],
        "model_type": "paddleocr_vl",
        "hidden_size": 24,
        "vision_config": vision,
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    d = c.hidden_size
    tensors[prefix + "vision_model.head.probe"] = torch.randn(1, 1, d, dtype=torch.float64)
    tensors[prefix + "vision_model.head.attention.in_proj_weight"] = torch.randn(
        3 * d, d, dtype=torch.float64
    )
    tensors[prefix + "vision_model.embeddings.packing_position_embedding.weight"] = torch.randn(
        32768, 4, dtype=torch.float64
    )
    tensors["mlp_AR.linear_1.weight"] = torch.randn(4 * d, 4 * d, dtype=torch.float64)
    tensors["model.embed_tokens.weight"] = torch.randn(10, 24, dtype=torch.float64)
    return write_shards(path, tensors, 2)


@pytest.fixture(scope="module")
def hf():
    return hf_tower()


@pytest.fixture(scope="module")
def ours(hf, tmp_path_factory):
    path = write_release(hf, tmp_path_factory.mktemp("paddle"), prefix="visual.")
    return nv.NativeViT.from_pretrained(path, attn_backend="torch")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_parity_fp64_through_the_loader(hf, tmp_path, prefix):
    model = nv.NativeViT.from_pretrained(
        write_release(hf, tmp_path / "ckpt", prefix=prefix), attn_backend="torch"
    )
    cfg = model.config
    assert (cfg.model_type, cfg.temporal_patch_size, cfg.spatial_merge_size) == ("paddleocr_vl", 1, 1)
    assert (cfg.num_position_embeddings, cfg.norm_eps, cfg.patch_bias) == (64, 1e-6, True)
    assert model.patch_embed.proj.weight.shape == (64, 3, 14, 14)  # the release's Conv2d
    px = pixels(GRID)
    ref = hf_features(hf, px, GRID)
    with torch.no_grad():
        feats = model.forward_features(px, torch.tensor(GRID))
        tokens = model(px, torch.tensor(GRID))
    print(f"fp64 relative error: last_hidden_state {rel_err(feats, ref):.2e}")
    assert rel_err(feats, ref) < 1e-10, report("last_hidden_state", feats, ref)
    assert torch.equal(tokens, feats)  # no merger in the tower: the projector merges


def test_each_image_alone_equals_the_packed_batch(ours, hf):
    px = pixels(GRID, seed=1)
    with torch.no_grad():
        packed = ours(px, torch.tensor(GRID))
    start = 0
    for g in GRID:
        n = g[0] * g[1] * g[2]
        with torch.no_grad():
            alone = ours(px[start : start + n], torch.tensor([g]))
        assert rel_err(alone, packed[start : start + n]) < 1e-12, g
        start += n


def test_vision_only_directory_loads(hf, tmp_path):
    """``PaddleOCRVisionModel.save_pretrained``: model_type ``paddleocr_vl_vision``, unprefixed keys."""
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "paddleocr_vl_vision"
    model = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    px = pixels(GRID, seed=2)
    with torch.no_grad():
        out = model(px, torch.tensor(GRID))
    ref = hf_features(hf, px, GRID)
    assert rel_err(out, ref) < 1e-10, report("last_hidden_state", out, ref)


@pytest.mark.parametrize("grid", [GRID, [[1, 27, 27]], [[1, 2, 40], [1, 40, 2]], [[3, 5, 7]]])
def test_half_pixel_taps_are_transformers_and_interpolate(grid):
    """The taps equal transformers' (bit for bit) and resample like ``F.interpolate(bilinear,
    align_corners=False)`` of the square table, in raster order."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    side = 27 if grid == [[1, 27, 27]] else 8
    index, weight = half_pixel_taps(grid, side)
    ref_index, ref_weight = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), side, mode="bilinear", align_corners=False, spatial_merge_size=1
    )
    assert torch.equal(index, ref_index) and torch.equal(weight, ref_weight)
    table = torch.randn(side * side, 5, dtype=torch.float64)
    out = (table[index] * weight[:, :, None]).sum(1)
    start = 0
    for t, h, w in grid:
        image = table.T.reshape(1, 5, side, side)
        want = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)[0].flatten(1).T
        for _ in range(t):
            assert rel_err(out[start : start + h * w], want) < 1e-6  # float32 weights
            start += h * w


# ----------------------------------------------------------------------------- configs and checkpoints


def test_release_config_gives_the_preset():
    """transformers' default vision config reads as the preset (transformers' defaults); the Hub fields
    the tower does not use are accepted, others refused."""
    vc = T.PaddleOCRVisionConfig()
    fields = {k: getattr(vc, k) for k in (*VISION, "num_channels", "hidden_act", "layer_norm_eps")}
    fields.update(spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, attention_dropout=0.0)
    cfg = nv.VisionConfig.from_hf_dict(fields, model_type="paddleocr_vl")
    assert cfg == nv.VisionConfig.preset("paddleocr_vl")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_position_embeddings) == (1152, 27, 16, 729)
    assert nv.VisionConfig.from_hf_dict({}, model_type="paddleocr_vl") == cfg
    with pytest.raises(ValueError, match="fields nativevit does not know"):
        nv.VisionConfig.from_hf_dict({"window_size": 112}, model_type="paddleocr_vl")
    from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel

    with torch.device("meta"):
        n_hf = sum(p.numel() for p in PaddleOCRVisionModel(vc).parameters())
        n_ours = sum(p.numel() for p in nv.NativeViT(cfg).parameters())
    assert n_ours == n_hf


def test_checkpoint_round_trip_in_the_release_layout(tmp_path):
    """save_pretrained writes the release layout: transformers builds the same tower from our
    config.json and loads our tensors strictly; our loader reads it back to identical outputs."""
    from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel

    cfg = nv.VisionConfig.preset("paddleocr_vl", tiny=True)
    model = rerandomise(nv.NativeViT(cfg, attn_backend="torch").double().eval(), seed=5)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "paddleocr_vl"
    assert config["architectures"] == ["PaddleOCRVLForConditionalGeneration"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and all(k.startswith("visual.vision_model.") for k in index)

    full = T.PaddleOCRVLConfig(vision_config=config["vision_config"])  # as transformers reads a release
    assert full.vision_config.image_size // full.vision_config.patch_size == 8
    hf = PaddleOCRVisionModel(full.vision_config).double().eval()
    state = {cfg.family.release_key(k): v for k, v in model.state_dict().items()}
    assert set(state) == set(hf.state_dict())
    hf.load_state_dict(state, strict=True)
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    assert loaded.config == cfg
    px = pixels(GRID, seed=6)
    with torch.no_grad():
        out = model(px, torch.tensor(GRID))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert rel_err(loaded(px, torch.tensor(GRID)), out) < 1e-14
    ref = hf_features(hf, px, GRID)
    assert rel_err(out, ref) < 1e-10, report("last_hidden_state", out, ref)


# ----------------------------------------------------------------------------- backends


def _backend_cases() -> list[str]:
    return [name for name in nv.ops.available_backends("cpu")["attention"] if name != "torch"]


@pytest.mark.parametrize("backend", _backend_cases())
def test_every_attention_backend_runs_it(ours, backend):
    """Each attention backend that runs here (the padded baseline included) gives the torch reference's
    result, in fp64 where it takes fp64, else fp32. Small, for interpreted Triton."""
    grid = [[1, 6, 10], [1, 3, 5]]
    model = copy.deepcopy(ours)
    probe = torch.zeros(1, 4, 16, dtype=torch.float64)
    try:
        ops.resolve_backend("attention", backend, probe)
        dtype, tol = torch.float64, 1e-12
    except RuntimeError:
        dtype, tol = torch.float32, 1e-5
        ops.resolve_backend("attention", backend, probe.float())  # must take fp32 then
    model = model.to(dtype)
    px = pixels(grid, seed=4, dtype=dtype)
    with torch.no_grad():
        ref = model(px, torch.tensor(grid))
        model.attn_backend = backend
        out = model(px, torch.tensor(grid))
    assert rel_err(out, ref) < tol, report(backend, out, ref)


def test_padded_layout_and_rope_backends(ours, hf):
    px = pixels(GRID, seed=8)
    ref = hf_features(hf, px, GRID)
    with torch.no_grad():
        padded = ours(px, torch.tensor(GRID), layout="padded")
    assert rel_err(padded, ref) < 1e-10, report("padded", padded, ref)
    model = copy.deepcopy(ours).float()
    grid = [[1, 6, 10], [1, 3, 5]]  # small, for interpreted Triton
    px = pixels(grid, seed=9)
    ref = hf_features(hf, px, grid)
    for rope in nv.ops.available_backends("cpu")["rope"]:
        model.rope_backend = rope
        with torch.no_grad():
            out = model(px.float(), torch.tensor(grid))
        assert rel_err(out, ref) < 1e-5, report(f"rope {rope}", out, ref)


# ----------------------------------------------------------------------------- swap


IMG, VSTART, VEND = 100, 102, 103


def _vlm():
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    cfg = T.PaddleOCRVLConfig(
        text_config=text,
        vision_config=dict(VISION),
        image_token_id=IMG,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = T.PaddleOCRVLForConditionalGeneration(cfg).eval()
    return rerandomise(model, 1).double()


def _vlm_inputs() -> dict:
    """Three images of different (even) grids in one prompt, patches as the processor gives them."""
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 10, 4]])
    ids, types = [1, 2], [0, 0]
    for g in grid:
        n = int(g.prod()) // 4
        ids += [VSTART] + [IMG] * n + [VEND, 3]
        types += [0] + [1] * n + [0, 0]
    ids, types = torch.tensor([ids + [4]]), torch.tensor([types + [0]])
    g = torch.Generator().manual_seed(1)
    px = torch.randn(int(grid.prod(-1).sum()), 3, 14, 14, generator=g, dtype=torch.float64)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=px,
        image_grid_thw=grid,
    )


@pytest.fixture(scope="module")
def vlm():
    model, inputs = _vlm(), _vlm_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return model, inputs, logits, tokens


def test_swap_keeps_logits_generate_parameters_and_keys(vlm, monkeypatch):
    base, inputs, logits, tokens = vlm
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert swap_vision_tower(model) is model
    tower = model.model.visual
    assert isinstance(tower, PaddleOCRVisionTower) and tower.config.model_type == "paddleocr_vl"
    assert list(model.state_dict()) == keys  # the same keys, in the same order
    # the same tensors (named_parameters() gives nativevit's module names; state_dict the release's)
    assert {id(p) for p in model.parameters()} == {id(p) for p in params.values()}
    state = model.state_dict()
    assert all(state[k].data_ptr() == p.data_ptr() for k, p in params.items())
    calls = []
    inner = nv.ops.varlen_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[0])
        return inner(q, *args, **kwargs)

    monkeypatch.setattr(nv.ops, "varlen_attention", counted)
    with torch.no_grad():
        err = rel_err(model(**inputs).logits, logits)
    assert err <= 1e-10, f"float64 logits relative error {err:.2e}"
    assert calls == [inputs["pixel_values"].shape[0]] * 2  # every image in one packed batch, per layer
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)
    # the tower's own output, and the hidden states transformers records
    rows, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        ref = base.model.visual(pixel_values=rows[None], grid_thw=grid, output_hidden_states=True)
        out = tower(pixel_values=rows[None], grid_thw=grid, output_hidden_states=True)
    assert out.pooler_output is None and rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-10
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(out.hidden_states, ref.hidden_states))


def test_swap_save_load_round_trip_and_idempotence(vlm, tmp_path):
    base, inputs, logits, _ = vlm
    model = swap_vision_tower(copy.deepcopy(base))
    tower = model.model.visual
    assert swap_vision_tower(model, attn_backend="padded") is model
    assert model.model.visual is tower and tower.attn_backend == "padded"
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, logits) <= 1e-10  # the padded baseline
    model.save_pretrained(tmp_path)
    loaded = T.PaddleOCRVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not isinstance(loaded.model.visual, PaddleOCRVisionTower)
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert rel_err(loaded(**inputs).logits, logits) <= 1e-10
        assert rel_err(swap_vision_tower(loaded)(**inputs).logits, logits) <= 1e-10
    # transformers' own save of the whole model (tower under "visual.", projector "mlp_AR.") loads
    tower = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    rows, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        ref = base.model.visual(pixel_values=rows[None], grid_thw=grid).last_hidden_state
        assert rel_err(tower(rows.flatten(1), grid), ref) < 1e-10


def test_swap_in_float32(vlm):
    base, inputs, _, _ = vlm
    ref = copy.deepcopy(base).float()
    model = swap_vision_tower(copy.deepcopy(ref))
    inputs = {**inputs, "pixel_values": inputs["pixel_values"].float()}
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) <= 1e-5


def test_swap_refuses_what_it_cannot_express():
    from nativevit.integrations.transformers import paddleocr_vision_config

    vc = T.PaddleOCRVisionConfig(**{**VISION, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="hidden_act"):
        paddleocr_vision_config(vc)


# ----------------------------------------------------------------------------- processor


def test_processor_matches_transformers_pil():
    """``ImageProcessor.for_model("paddleocr_vl")`` is the release's preprocessor_config.json (mean = std
    = 0.5, 147384..2822400 px, factor 28) through transformers' PIL processor, bit for bit: raster
    rows of (C, P, P), T = 1, the short-side rule for sides under 28 px included."""
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    sizes = [(300, 410), (20, 500), (700, 15), (1900, 1600), (384, 384)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    ref = PaddleOCRVLImageProcessorPil(
        min_pixels=147384, max_pixels=2822400, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )(images, return_tensors="pt")
    proc = nv.ImageProcessor.for_model("paddleocr_vl")
    batch = proc(images)
    assert torch.equal(batch.grid_thw, ref["image_grid_thw"])
    assert torch.equal(batch.pixel_values, ref["pixel_values"].flatten(1))
    assert batch.pixel_values.shape[1] == nv.VisionConfig.preset("paddleocr_vl").patch_dim == 588
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in batch.grid_thw.tolist())  # the projector's 2x2
    assert proc.grid_for(20, 500) == (1, 6, 138)


# ----------------------------------------------------------------------------- bench


def test_bench_preset():
    from nativevit.bench.encoder import MODELS, build_model

    assert {"paddleocr_vl", "paddleocr_vl_tiny"} <= set(MODELS)
    model = build_model("paddleocr_vl_tiny", 1, dtype=torch.float32, device="cpu")
    grid = [[1, 6, 10], [1, 4, 4]]
    with torch.no_grad():
        out = model(pixels(grid, dtype=torch.float32), torch.tensor(grid))
    assert out.shape == (76, 64)
    assert model.flops_per_batch(grid)["total"] > 0
