"""swap_vision_tower: tiny random transformers VLMs of every supported family, built here (no downloads),
compared before and after the swap: logits (float64 1e-10, float32 1e-5, bfloat16 by FlashAttention's
rule against float64), greedy generate, shared parameters, state-dict keys, one packed batch per call."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import PIL.Image
import pytest
import torch
from flash_rule import check_rule

import nativevit as nv
from nativevit.integrations import QwenVisionTower, TransformersVisionTower, swap_vision_tower

T = pytest.importorskip("transformers")

IMG, VID, VSTART, VEND = 100, 101, 102, 103
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
VIT = ("llava", "llava_next", "llava_onevision", "internvl")
NAMES = QWEN + VIT
VIT_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
# encoder layers one forward runs, each once (one packed batch); LLaVA's -2 feature layer skips the last
LAYERS_RUN = {
    "qwen2_vl": 2,
    "qwen2_5_vl": 3,
    "qwen3_vl": 3,
    "qwen3_vl_moe": 3,
    "llava": 2,
    "llava_next": 2,
    "llava_onevision": 3,
    "internvl": 3,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _text(**overrides) -> dict:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_parameters=rope,
    )
    return {**base, **overrides}


def _qwen_model(name: str, **vision_overrides):
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=32, mlp_ratio=2)
        cls, config = T.Qwen2VLForConditionalGeneration, T.Qwen2VLConfig
    elif name == "qwen2_5_vl":
        # 56-px windows: 2x2 merged tokens, so the 4x6 and 6x4 grids have several windows
        vision = dict(
            depth=3,
            hidden_size=32,
            num_heads=4,
            intermediate_size=48,
            out_hidden_size=32,
            fullatt_block_indexes=[1],
            window_size=56,
        )
        cls, config = T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLConfig
    else:
        vision = dict(
            depth=3,
            hidden_size=32,
            num_heads=4,
            intermediate_size=48,
            out_hidden_size=32,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 2],
            patch_size=16,
        )
        cls, config = (
            (T.Qwen3VLForConditionalGeneration, T.Qwen3VLConfig)
            if name == "qwen3_vl"
            else (T.Qwen3VLMoeForConditionalGeneration, T.Qwen3VLMoeConfig)
        )
    text = _text()
    if name.startswith("qwen3"):
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    if name == "qwen3_vl_moe":
        text.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    cfg = config(text_config=text, vision_config={**vision, **vision_overrides}, **ids)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if name == "qwen3_vl_moe":
        model.set_experts_implementation("eager")  # float64 MoE needs the eager experts
    return model


def _qwen_inputs(name: str, patch: int) -> dict:
    """Three images of different grids and a 2-step video, in one prompt."""
    grid_i, grid_v = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]]), torch.tensor([[2, 4, 4]])
    ids, types = [1, 2], [0, 0]
    for g in grid_i:
        n = int(g.prod()) // 4
        ids += [VSTART] + [IMG] * n + [VEND, 3]
        types += [0] + [1] * n + [0, 0]
    t, h, w = grid_v[0].tolist()
    if name.startswith("qwen3"):  # a timestamp and a start/end pair per frame
        for f in range(t):
            ids += [5 + f, VSTART] + [VID] * (h * w // 4) + [VEND]
            types += [0, 0] + [2] * (h * w // 4) + [0]
    else:
        ids += [VSTART] + [VID] * (t * h * w // 4) + [VEND]
        types += [0] + [2] * (t * h * w // 4) + [0]
    ids, types = torch.tensor([ids + [4]]), torch.tensor([types + [0]])
    g = torch.Generator().manual_seed(1)
    row = 3 * 2 * patch * patch
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=torch.randn(int(grid_i.prod(-1).sum()), row, generator=g, dtype=torch.float64),
        image_grid_thw=grid_i,
        pixel_values_videos=torch.randn(int(grid_v.prod(-1).sum()), row, generator=g, dtype=torch.float64),
        video_grid_thw=grid_v,
    )


def _images():
    """Three images of different sizes, none a multiple of the tiles or the patches."""
    rng = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((45, 31), (28, 28), (20, 70))
    ]


def _vit_model(name: str):
    llama = T.LlamaConfig(**{k: v for k, v in _text().items() if k != "rope_parameters"})
    qwen2 = T.Qwen2Config(**{k: v for k, v in _text().items() if k not in ("rope_parameters", "head_dim")})
    clip = T.CLIPVisionConfig(**VIT_CFG, image_size=28, patch_size=7)
    if name == "llava":
        cfg = T.LlavaConfig(
            vision_config=clip,
            text_config=llama,
            image_token_id=IMG,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        proc = T.LlavaImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True
        )
        cls = T.LlavaForConditionalGeneration
    elif name == "llava_next":
        pins = [[28, 56], [56, 28], [56, 56]]
        cfg = T.LlavaNextConfig(
            vision_config=clip,
            text_config=llama,
            image_token_id=IMG,
            image_grid_pinpoints=pins,
            vision_feature_layer=[-2, -3],
            vision_feature_select_strategy="default",
        )
        proc = T.LlavaNextImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pins
        )
        cls = T.LlavaNextForConditionalGeneration
    elif name == "llava_onevision":
        # 30-px tiles of 7-px patches: the convolution drops 2 px, as SigLIP-384/14 drops 6
        pins = [[30, 30], [30, 60], [60, 30], [60, 60]]
        siglip = T.SiglipVisionConfig(**VIT_CFG, image_size=30, patch_size=7)
        cfg = T.LlavaOnevisionConfig(
            vision_config=siglip,
            text_config=qwen2,
            image_token_id=IMG,
            video_token_id=VID,
            image_grid_pinpoints=pins,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        proc = T.LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30}, image_grid_pinpoints=pins)
        cls = T.LlavaOnevisionForConditionalGeneration
    else:
        intern = T.InternVLVisionConfig(
            **VIT_CFG, image_size=[28, 28], patch_size=[7, 7], use_qk_norm=True, use_mean_pooling=True
        )
        cfg = T.InternVLConfig(
            vision_config=intern,
            text_config=qwen2,
            image_token_id=IMG,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        proc = T.GotOcr2ImageProcessorPil(
            size={"height": 28, "width": 28}, crop_to_patches=True, max_patches=4
        )
        cls = T.InternVLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval(), proc


def _vit_inputs(name: str, model, proc) -> dict:
    """Pixels from transformers' own image processor; as many placeholder tokens as the unswapped model
    makes features (per image, and for OneVision a 3-frame video)."""
    out = proc(_images(), return_tensors="pt")
    x = {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}
    x["pixel_values"] = x["pixel_values"].double()
    with torch.no_grad():
        feats = model.model.get_image_features(**x).pooler_output
    ids = [1, 2]
    for f in feats:
        ids += [IMG] * (f.shape[0] if f.dim() == 2 else f.shape[0] * f.shape[1]) + [3]
    if name == "llava_onevision":
        video = torch.randn(1, 3, 3, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            n = model.model.get_video_features(video).pooler_output.shape[1]
        ids += [VID] * n + [4]
        x["pixel_values_videos"] = video
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **x)


def _rerandomise(tower: torch.nn.Module) -> None:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.2)


@dataclass
class Case:
    model: torch.nn.Module  # float64, unswapped: copy it before swapping
    inputs: dict
    logits: torch.Tensor
    tokens: torch.Tensor


@functools.cache
def case(name: str) -> Case:
    if name in QWEN:
        model = _qwen_model(name)
        _rerandomise(model.model.visual)
        model = model.double()
        inputs = _qwen_inputs(name, model.config.vision_config.patch_size)
    else:
        model, proc = _vit_model(name)
        _rerandomise(model.model.vision_tower)
        model = model.double()
        inputs = _vit_inputs(name, model, proc)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return Case(model, inputs, logits, tokens)


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _tower(model):
    return model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower


@pytest.fixture
def count_attention(monkeypatch):
    """Counts calls of nv.ops.varlen_attention (every packed layer calls it once per batch)."""
    calls = []
    inner = nv.ops.varlen_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[0])
        return inner(q, *args, **kwargs)

    monkeypatch.setattr(nv.ops, "varlen_attention", counted)
    return calls


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_float64_logits_and_generate(name, count_attention):
    c = case(name)
    model = copy.deepcopy(c.model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert swap_vision_tower(model) is model
    assert isinstance(_tower(model), QwenVisionTower if name in QWEN else TransformersVisionTower)
    # the same tensors under the same keys
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    with torch.no_grad():
        logits = model(**c.inputs).logits
    err = rel_err(logits, c.logits)
    assert err <= 1e-10, f"{name}: float64 logits relative error {err:.2e}"
    # every image, tile and frame (the video too) in one packed batch: each layer attends once
    assert len(count_attention) == LAYERS_RUN[name], count_attention
    if name in QWEN:
        rows = c.inputs["pixel_values"].shape[0] + c.inputs["pixel_values_videos"].shape[0]
        assert count_attention == [rows] * LAYERS_RUN[name]
    with torch.no_grad():
        tokens = model.generate(**c.inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, c.tokens), (
        f"{name}: generate {tokens[0, -3:].tolist()} != {c.tokens[0, -3:].tolist()}"
    )


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision"])
def test_float32_and_bfloat16(name):
    c = case(name)
    for dtype in (torch.float32, torch.bfloat16):
        reference = copy.deepcopy(c.model).to(dtype)
        inputs = _cast(c.inputs, dtype)
        with torch.no_grad():
            hf = reference(**inputs).logits
            ours = swap_vision_tower(reference)(**inputs).logits
        assert ours.dtype == dtype
        if dtype == torch.float32:
            err = rel_err(ours, hf)
            assert err <= 1e-5, f"{name}: float32 logits relative error {err:.2e} vs transformers"
        else:
            check_rule(f"{name} bf16 logits", ours.float(), hf.float(), c.logits, factor=2)


def test_a_changed_tower_changes_the_logits():
    """The parity tests can fail: a swapped tower with one weight altered no longer matches."""
    c = case("qwen2_vl")
    model = swap_vision_tower(copy.deepcopy(c.model))
    with torch.no_grad():
        model.model.visual.blocks[1].attn.proj.bias[0] += 1
        assert rel_err(model(**c.inputs).logits, c.logits) > 1e-6


# ----------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name", QWEN)
def test_qwen_tower_outputs_equal_transformers(name):
    """The swapped tower returns what transformers' tower returns: pooler_output, last_hidden_state (in
    transformers' row order: window order for Qwen2.5-VL), DeepStack features, hidden_states."""
    hf = case(name).model.model.visual
    ours = QwenVisionTower.from_transformers(hf, "qwen3_vl" if name.startswith("qwen3") else name)
    c = case(name).inputs
    px, grid = c["pixel_values"], c["image_grid_thw"]
    with torch.no_grad():
        ref = hf(px, grid_thw=grid, output_hidden_states=True)
        out = ours(px, grid_thw=grid, output_hidden_states=True)
    assert type(out) is type(ref)
    assert rel_err(out.pooler_output, ref.pooler_output) <= 1e-12
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-12
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.depth + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_err(a, b) <= 1e-12
    for a, b in zip(
        getattr(out, "deepstack_features", []), getattr(ref, "deepstack_features", []), strict=True
    ):
        assert rel_err(a, b) <= 1e-12
    assert ours.spatial_merge_size == hf.spatial_merge_size and ours.dtype == torch.float64
    with pytest.raises(ValueError, match="output_attentions"):
        ours(px, grid_thw=grid, output_attentions=True)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_prefetch_serves_each_call_its_rows(name, count_attention):
    """Images and video encoded as one batch ahead of the model's two tower calls: each call gets exactly
    what transformers' tower gives it alone (window order and DeepStack included), with no new encoding."""
    hf = case(name).model.model.visual
    ours = QwenVisionTower.from_transformers(hf, name)
    c = case(name).inputs
    calls = [(c["pixel_values"], c["image_grid_thw"]), (c["pixel_values_videos"], c["video_grid_thw"])]
    with torch.no_grad():
        ours.prefetch(calls)
        assert len(count_attention) == ours.config.depth
        for px, grid in calls:
            ref, out = hf(px, grid_thw=grid), ours(px, grid_thw=grid)
            for field in ("pooler_output", "last_hidden_state"):
                assert rel_err(getattr(out, field), getattr(ref, field)) <= 1e-12
            for a, b in zip(getattr(out, "deepstack_features", []), getattr(ref, "deepstack_features", [])):
                assert rel_err(a, b) <= 1e-12
        assert len(count_attention) == ours.config.depth  # both served from the one batch
        ours(calls[0][0], grid_thw=calls[0][1])  # used up: a new call encodes anew
        assert len(count_attention) == 2 * ours.config.depth


def test_vit_tower_interface_and_sizes():
    """The swapped CLIP tower: hidden states selected by index (None elsewhere, later layers not run),
    transformers' refusal of other sizes without interpolate_pos_encoding, and its interpolation with."""
    hf = case("llava").model.model.vision_tower
    ours = TransformersVisionTower(copy.deepcopy(hf))
    px = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True)
        out = ours(px, output_hidden_states=-2)
        full = ours(px)
    assert out.last_hidden_state is None and out.hidden_states[-1] is None
    assert (
        out.hidden_states[-2] is not None and rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= 1e-12
    )
    assert rel_err(full.last_hidden_state, ref.last_hidden_state) <= 1e-12
    assert rel_err(full.pooler_output, ref.pooler_output) <= 1e-12
    other = torch.randn(2, 3, 35, 21, dtype=torch.float64)
    with pytest.raises(ValueError, match="doesn't match model"):
        ours(other)
    with torch.no_grad():
        ref = hf(other, interpolate_pos_encoding=True)
        out = ours(other, interpolate_pos_encoding=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 1e-12
    assert ours.patch_size == 7 and ours.dtype == torch.float64


def test_onevision_images_and_video_share_one_batch(count_attention):
    """OneVision encodes images and video in two calls of its tower; swapped, both come from one packed
    batch (tiles first, then frames): each layer attends once, over all of them."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    c = case("llava_onevision")
    cfg = c.model.config
    tiles = sum(
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for size in c.inputs["image_sizes"]
    )
    frames = c.inputs["pixel_values_videos"].shape[1]
    model = swap_vision_tower(copy.deepcopy(c.model))
    with torch.no_grad():
        model(**c.inputs)
    # 4x4 patches per 30-px view (SigLIP: no class token), 3 layers
    assert count_attention == [(tiles + frames) * 16] * 3


# ----------------------------------------------------------------------------- checkpoints and errors


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_next"])
def test_save_pretrained_round_trip(name, tmp_path):
    c = case(name)
    model = swap_vision_tower(copy.deepcopy(c.model))
    model.save_pretrained(tmp_path)
    loaded = type(c.model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not isinstance(_tower(loaded), (QwenVisionTower, TransformersVisionTower))
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert rel_err(loaded(**c.inputs).logits, c.logits) <= 1e-10
        assert rel_err(swap_vision_tower(loaded)(**c.inputs).logits, c.logits) <= 1e-10


def test_swap_is_idempotent_and_sets_the_backend():
    model = swap_vision_tower(copy.deepcopy(case("qwen2_vl").model))
    tower = _tower(model)
    assert swap_vision_tower(model, attn_backend="padded") is model
    assert _tower(model) is tower and tower.attn_backend == "padded"
    with torch.no_grad():
        assert rel_err(model(**case("qwen2_vl").inputs).logits, case("qwen2_vl").logits) <= 1e-10


def test_unsupported_models_are_a_type_error():
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration.*InternVLForConditionalGeneration"):
        swap_vision_tower(torch.nn.Linear(2, 2))
    llama = T.LlamaForCausalLM(T.LlamaConfig(**{k: v for k, v in _text().items() if k != "rope_parameters"}))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        swap_vision_tower(llama)


@pytest.mark.parametrize(
    "name, overrides, field",
    [
        ("qwen2_vl", {"hidden_act": "relu"}, "vision_config.hidden_act"),
        ("qwen3_vl", {"num_position_embeddings": 15}, "vision_config.num_position_embeddings"),
        ("qwen2_5_vl", {"window_size": 20}, "vision_config.window_size"),
        ("qwen2_vl", {"embed_dim": 24, "num_heads": 4}, "vision_config.num_heads"),
    ],
)
def test_settings_nativevit_cannot_express_name_the_field(name, overrides, field):
    model = _qwen_model(name, **overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        swap_vision_tower(model)
    assert not isinstance(model.model.visual, QwenVisionTower)  # left as it was


def test_unsupported_vision_tower_names_the_field():
    # (a Pixtral tower in a LLaVA is supported: tests/test_family_pixtral.py)
    dinov2 = T.Dinov2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    llama = T.LlamaConfig(**{k: v for k, v in _text().items() if k != "rope_parameters"})
    model = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=dinov2, text_config=llama))
    with pytest.raises(ValueError, match=r"vision_config\.model_type='dinov2'"):
        swap_vision_tower(model)


def test_public_names():
    assert nv.swap_vision_tower is swap_vision_tower
    assert nv.from_transformers is nv.integrations.from_transformers
