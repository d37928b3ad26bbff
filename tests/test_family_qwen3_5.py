"""Qwen3.5 / Qwen3.5-MoE (``qwen3_5``): the Qwen3-VL tower without DeepStack. fp64 parity with
transformers' Qwen3_5VisionModel through our loader (images and a video), release config and keys,
save/load, the swap into tiny Qwen3.5 VLMs (logits unchanged in fp64), the processor, backends."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit.integrations import QwenVisionTower, swap_vision_tower

T = pytest.importorskip("transformers")

# 16-px grids against an 8x8 table: down- and up-sampled, non-square, one merged token, a video
GRID = [[1, 6, 10], [2, 4, 4], [1, 18, 8], [1, 2, 2], [1, 10, 22]]
SMALL = [[1, 6, 10], [2, 2, 4]]  # for the triton interpreter
ROW = 3 * 2 * 16 * 16
VISION = dict(
    depth=3,
    hidden_size=32,
    num_heads=2,  # head dim 16, as the triton kernels take
    intermediate_size=48,
    out_hidden_size=40,
    num_position_embeddings=64,
    patch_size=16,
)


def pixels(grid, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grid), ROW, generator=g, dtype=torch.float64)


def rerandomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_tower(moe: bool = False):
    if moe:
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeVisionConfig as C
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel as M
    else:
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig as C
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel as M
    return rerandomise(M(C(**VISION, attn_implementation="sdpa")).double().eval())


def write_release(hf_model, path: Path, model_type: str) -> Path:
    """A release directory: vision_config in the release's names (extras included), keys under
    ``model.visual.``, language-model keys besides."""
    path.mkdir(parents=True, exist_ok=True)
    vision = {k: v for k, v in hf_model.config.to_diff_dict().items() if k != "transformers_version"}
    vision.update(model_type=model_type, initializer_range=0.02)
    config = {
        "architectures": ["ReleasedForConditionalGeneration"],
        "model_type": model_type,
        "text_config": {"hidden_size": 24, "model_type": model_type + "_text"},
        "vision_config": vision,
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {"model.visual." + k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.randn(10, 24, dtype=torch.float64)
    return write_shards(path, tensors, 2)


def check_parity(model, hf, grid=GRID, **kwargs) -> float:
    px, g = pixels(grid), torch.tensor(grid)
    with torch.no_grad():
        ref = hf(px, grid_thw=g)
        tokens, deepstack = model(px, g, return_deepstack=True, **kwargs)
        feats = model.forward_features(px, g, **kwargs)
    assert deepstack == [] and not hasattr(ref, "deepstack_features")
    errs = [rel_err(tokens, ref.pooler_output), rel_err(feats, ref.last_hidden_state)]
    print(f"fp64 relative error (pooler_output, last_hidden_state): {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= 1e-10, f"pooler_output / last_hidden_state rel err {errs}"
    return max(errs)


@pytest.fixture(scope="module")
def hf():
    return hf_tower()


@pytest.fixture(scope="module")
def ours(hf, tmp_path_factory):
    return nv.NativeViT.from_pretrained(
        write_release(hf, tmp_path_factory.mktemp("q35"), "qwen3_5"), attn_backend="torch"
    )


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_parity_fp64(model_type, tmp_path):
    hf = hf_tower(moe=model_type == "qwen3_5_moe")
    model = nv.NativeViT.from_pretrained(write_release(hf, tmp_path, model_type), attn_backend="torch")
    cfg = model.config
    assert (cfg.model_type, cfg.patch_bias, cfg.deepstack_visual_indexes, cfg.num_position_embeddings) == (
        "qwen3_5",
        True,
        (),
        64,
    )
    assert not hasattr(model, "deepstack_merger_list")
    check_parity(model, hf)


def test_padded_layout_and_cpu_backends(ours, hf):
    check_parity(ours, hf, layout="padded")
    px = pixels(SMALL)
    with torch.no_grad():
        ref = hf(px, grid_thw=torch.tensor(SMALL)).pooler_output
    model = copy.deepcopy(ours).float()
    for op, names in nv.ops.available_backends("cpu").items():
        for backend in names:
            model.attn_backend, model.rope_backend = "torch", "torch"
            setattr(model, "attn_backend" if op == "attention" else "rope_backend", backend)
            with torch.no_grad():
                out = model(px.float(), torch.tensor(SMALL))
            assert rel_err(out, ref) <= 1e-4, f"{op} backend {backend}"


def test_release_config_and_round_trip(ours, hf, tmp_path):
    written = ours.config.to_hf_dict()
    assert "deepstack_visual_indexes" not in written
    for key, value in VISION.items():
        assert written[key] == value, key
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen3_5", ["Qwen3_5ForConditionalGeneration"])
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    assert loaded.config == ours.config
    check_parity(loaded, hf, grid=GRID[:2])
    with pytest.raises(ValueError, match="does not know"):
        nv.VisionConfig.from_hf_dict({"deepstack_visual_indexes": [0]}, model_type="qwen3_5")


def test_release_defaults_are_transformers_defaults():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig

    preset = nv.VisionConfig.preset("qwen3_5")
    assert nv.VisionConfig.from_hf_dict({}, model_type="qwen3_5") == preset
    assert nv.VisionConfig.from_hf_dict(Qwen3_5VisionConfig().to_diff_dict(), model_type="qwen3_5") == preset
    # the Qwen3-VL tower's numbers, without DeepStack
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    with torch.device("meta"):
        hf = Qwen3_5VisionModel(Qwen3_5VisionConfig(depth=1))
        ours = nv.NativeViT(nv.VisionConfig.preset("qwen3_5", depth=1))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in hf.state_dict().items()
    }
    q3 = nv.VisionConfig.preset("qwen3_vl")
    for name in (
        "embed_dim",
        "depth",
        "num_heads",
        "intermediate_size",
        "patch_size",
        "num_position_embeddings",
    ):
        assert getattr(preset, name) == getattr(q3, name)


# ----------------------------------------------------------------------------- swap

IMG, VID, VSTART, VEND = 100, 101, 102, 103


def _model(moe: bool):
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "partial_rotary_factor": 1.0,
        },
    )
    if moe:
        text.update(
            moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
        cls, config = T.Qwen3_5MoeForConditionalGeneration, T.Qwen3_5MoeConfig
    else:
        cls, config = T.Qwen3_5ForConditionalGeneration, T.Qwen3_5Config
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    vision = {**VISION, "out_hidden_size": 32, "num_position_embeddings": 16}
    cfg = config(text_config=text, vision_config=vision, **ids)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if moe:
        model.set_experts_implementation("eager")
    rerandomise(model.model.visual, seed=1)
    return model.double()


def _inputs() -> dict:
    grid_i, grid_v = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]]), torch.tensor([[2, 4, 4]])
    ids, types = [1, 2], [0, 0]
    for g in grid_i:
        n = int(g.prod()) // 4
        ids += [VSTART] + [IMG] * n + [VEND, 3]
        types += [0] + [1] * n + [0, 0]
    t, h, w = grid_v[0].tolist()
    for f in range(t):  # a timestamp and a start/end pair per frame, as Qwen3-VL
        ids += [5 + f, VSTART] + [VID] * (h * w // 4) + [VEND]
        types += [0, 0] + [2] * (h * w // 4) + [0]
    ids, types = torch.tensor([ids + [4]]), torch.tensor([types + [0]])
    g = torch.Generator().manual_seed(1)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=torch.randn(int(grid_i.prod(-1).sum()), ROW, generator=g, dtype=torch.float64),
        image_grid_thw=grid_i,
        pixel_values_videos=torch.randn(int(grid_v.prod(-1).sum()), ROW, generator=g, dtype=torch.float64),
        video_grid_thw=grid_v,
    )


@pytest.mark.parametrize("moe", [False, True])
def test_swap_keeps_logits_keys_and_parameters(moe, tmp_path):
    model = _model(moe)
    inputs = _inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    assert swap_vision_tower(model) is model
    assert isinstance(model.model.visual, QwenVisionTower)
    assert model.model.visual.config.model_type == "qwen3_5"
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    with torch.no_grad():
        err = rel_err(model(**inputs).logits, before)
    assert err <= 1e-10, f"fp64 logits rel err {err:.2e}"
    if not moe:
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
        with torch.no_grad():
            assert rel_err(loaded(**inputs).logits, before) <= 1e-10


# ----------------------------------------------------------------------------- processor


def test_processor_matches_transformers_pil():
    """The auto mapping gives Qwen2VLImageProcessor for qwen3_5 / qwen3_5_moe; the releases'
    preprocessor_config sets Qwen3-VL's values (16-px patches, 65536..16777216 px, mean = std = 0.5)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 410), (90, 1000), (40, 40)]]
    ref = Qwen2VLImageProcessorPil(
        patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=65536, max_pixels=16777216
    )(images, return_tensors="pt")
    for model_type in ("qwen3_5", "qwen3_5_moe"):
        batch = nv.ImageProcessor.for_model(model_type)(images)
        assert torch.equal(batch.grid_thw, ref["image_grid_thw"])
        assert torch.equal(batch.pixel_values, ref["pixel_values"])
    from nativevit.config import FAMILIES

    assert FAMILIES["qwen3_5"].processor == FAMILIES["qwen3_vl"].processor
