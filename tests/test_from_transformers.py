"""from_transformers: tiny random transformers CLIP / SigLIP / InternViT vision models (built here) run as
packed native-resolution encoders, each image at its own grid, against the transformers model run on
each image alone; and the strategies' views in the form these towers take."""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from flash_rule import check_rule

import nativevit as nv
from nativevit.integrations import TransformersPackedEncoder, from_transformers, tower_views
from nativevit.integrations.views import TOWER_NORMALIZATION

T = pytest.importorskip("transformers")

VIT_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
# (H, W) px: native (28), square off-native, non-square, one patch tall, not multiples of the patch
SIZES = [(28, 28), (35, 35), (21, 42), (7, 56), (30, 45), (29, 28)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def vision_model(kind: str, **overrides) -> torch.nn.Module:
    """A tiny transformers vision model (28-px images of 7-px patches), every parameter re-randomised."""
    if kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**VIT_CFG, image_size=28, patch_size=7, **overrides))
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**VIT_CFG, image_size=28, patch_size=7, **overrides))
    else:
        cfg = dict(
            image_size=[28, 28],
            patch_size=[7, 7],
            use_qk_norm=True,
            attention_bias=True,
            use_mean_pooling=False,
        )
        model = T.InternVLVisionModel(T.InternVLVisionConfig(**VIT_CFG, **{**cfg, **overrides}))
    model.config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.double().eval()


def images(sizes=SIZES, dtype=torch.float64, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]


def alone(model, img: torch.Tensor, layer: int | None) -> torch.Tensor:
    """transformers on one image, interpolating its position table (InternViT always does)."""
    kw = {} if isinstance(model, T.InternVLVisionModel) else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        out = model(img[None], output_hidden_states=True, **kw)
    return (out.last_hidden_state if layer is None else out.hidden_states[layer])[0]


KINDS = ["clip", "siglip", "internvl"]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return vision_model(request.param)


@pytest.mark.parametrize("layer", [None, -2, 0, 3])
def test_packed_equals_transformers_alone(model, layer):
    imgs = images()
    enc = from_transformers(model, layer=layer)
    outs = enc.forward_images(imgs)
    assert len(outs) == len(imgs)
    for (h, w), img, out in zip(SIZES, imgs, outs, strict=True):
        ref = alone(model, img, layer)
        assert out.shape == ref.shape == ((h // 7) * (w // 7) + enc.num_prefix_tokens, 32)
        err = rel_err(out, ref)
        assert err <= 1e-12, f"{enc.kind} layer={layer} {h}x{w}: relative error {err:.2e}"


def test_one_packed_batch_and_shared_parameters(model, monkeypatch):
    """One varlen call per layer for all images; the encoder's keys and tensors are the model's."""
    enc = from_transformers(model)
    assert isinstance(enc, TransformersPackedEncoder)
    assert list(enc.state_dict()) == list(model.state_dict())
    ours = dict(enc.named_parameters())
    assert all(ours[k] is p for k, p in model.named_parameters())
    calls = []
    inner = nv.ops.varlen_attention
    monkeypatch.setattr(
        nv.ops, "varlen_attention", lambda q, *a, **k: calls.append(q.shape[0]) or inner(q, *a, **k)
    )
    enc.forward_images(images())
    rows = sum((h // 7) * (w // 7) + enc.num_prefix_tokens for h, w in SIZES)
    assert calls == [rows] * 3


def test_padded_layout_and_backends_agree(model):
    imgs = images()
    packed = from_transformers(model, attn_backend="torch").forward_images(imgs)
    padded = from_transformers(model, attn_backend="padded").forward_images(imgs)
    for a, b in zip(packed, padded, strict=True):
        assert rel_err(a, b) <= 1e-12


def test_prefix_tokens_dropped():
    model = vision_model("clip")
    full = from_transformers(model, layer=-2).forward_images(images())
    cropped = from_transformers(model, layer=-2, prefix_tokens=False).forward_images(images())
    for a, b in zip(full, cropped, strict=True):
        assert torch.equal(a[1:], b)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_flash_rule(kind):
    """bf16 encoder vs float64: within 2x the error of transformers' own bf16 run (plus half an ulp)."""
    ref_model = vision_model(kind)
    bf16 = copy.deepcopy(ref_model).to(torch.bfloat16)
    imgs = images()
    outs = from_transformers(bf16).forward_images([i.to(torch.bfloat16) for i in imgs])
    for img, out in zip(imgs, outs, strict=True):
        ref = alone(ref_model, img, None)
        hf = alone(bf16, img.to(torch.bfloat16), None)
        assert out.dtype == torch.bfloat16
        check_rule(f"{kind} bf16 {tuple(img.shape)}", out.float(), hf.float(), ref, factor=2)


def test_models_holding_a_vision_model():
    clip = T.CLIPModel(
        T.CLIPConfig(
            vision_config=dict(**VIT_CFG, image_size=28, patch_size=7),
            text_config=dict(**VIT_CFG, vocab_size=64),
        )
    )
    enc = from_transformers(clip)
    assert enc.kind == "clip" and enc.embeddings is clip.vision_model.embeddings


def test_bad_input_is_refused():
    model = vision_model("siglip")
    with pytest.raises(TypeError, match="CLIPVisionModel, SiglipVisionModel, InternVLVisionModel"):
        from_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        from_transformers(model, layer=4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        from_transformers(model, attn_backend="nope")
    enc = from_transformers(model)
    with pytest.raises(TypeError, match="list"):
        enc.forward_images(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="empty"):
        enc.forward_images([])
    with pytest.raises(ValueError, match=r"images\[1\] must have shape \(3, H, W\)"):
        enc.forward_images(
            [torch.zeros(3, 28, 28, dtype=torch.float64), torch.zeros(28, 28, dtype=torch.float64)]
        )
    with pytest.raises(TypeError, match="floating-point"):
        enc.forward_images([torch.zeros(3, 28, 28, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least the patch size"):
        enc.forward_images([torch.zeros(3, 6, 28, dtype=torch.float64)])


def test_training_attention_dropout_is_refused():
    model = vision_model("clip", attention_dropout=0.1).train()
    with pytest.raises(RuntimeError, match="attention_dropout"):
        from_transformers(model).forward_images(images())
    model.eval()
    from_transformers(model).forward_images(images())


# ----------------------------------------------------------------------------- strategies' views


def _image(w, h, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["llava15", "llava_next", "llava_onevision", "internvl"])
def test_views_equal_transformers_processors(name):
    """Each view as transformers' image processor of that system gives it, bit for bit, normalised with
    the tower's release mean/std (SigLIP's 0.5 for OneVision, ImageNet's for InternVL)."""
    clip, siglip, imagenet = (TOWER_NORMALIZATION[k] for k in ("clip", "siglip", "internvl"))
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    procs = {
        "llava15": (
            T.LlavaImageProcessorPil(
                size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True
            ),
            "clip",
        ),
        "llava_next": (
            T.LlavaNextImageProcessorPil(
                size={"shortest_edge": 336},
                crop_size={"height": 336, "width": 336},
                image_grid_pinpoints=pins,
            ),
            "clip",
        ),
        "llava_onevision": (
            T.LlavaOnevisionImageProcessorPil(image_mean=siglip[0], image_std=siglip[1]),
            "siglip",
        ),
        "internvl": (
            T.GotOcr2ImageProcessorPil(
                size={"height": 448, "width": 448},
                max_patches=12,
                image_mean=imagenet[0],
                image_std=imagenet[1],
            ),
            "internvl",
        ),
    }
    assert clip == (nv.image.OPENAI_CLIP_MEAN, nv.image.OPENAI_CLIP_STD)
    proc, kind = procs[name]
    imgs = [_image(400, 300, 1), _image(90, 500, 2)]
    batch = tower_views(imgs, name, tower=kind)
    assert len(batch.images) == sum(batch.views_per_image) == len(batch.views)
    for img, views in zip(imgs, batch.split(batch.images), strict=True):
        out = proc(img, **({"crop_to_patches": True} if name == "internvl" else {}))["pixel_values"]
        ref = np.stack(out) if name == "internvl" else np.asarray(out[0])
        ref = torch.from_numpy(ref.reshape(-1, *ref.shape[-3:]))
        ours = torch.stack(views)
        assert ours.shape == ref.shape and torch.equal(ours, ref.float()), f"{name}: views differ"


def test_views_through_a_tower_end_to_end():
    """InternVL tiles (28-px tiles here) and Qwen2-VL native views, rendered for a 7-px-patch tower and
    encoded as one packed batch, equal the tower on each view alone."""
    model = vision_model("internvl")
    enc = from_transformers(model)
    imgs = [_image(60, 30, 3), _image(23, 41, 4)]
    tiles = tower_views(imgs, "internvl", tower=enc, tile=28, max_tiles=4, dtype=torch.float64)
    native = tower_views(
        imgs, "qwen2_vl", tower=enc, min_pixels=28 * 28, max_pixels=56 * 56, dtype=torch.float64
    )
    assert all(v.shape[-2] % 7 == 0 and v.shape[-1] % 7 == 0 for v in native.images)
    assert tiles.views_per_image == [3, 3]  # 2x1 and 1x2 tiles, each + a thumbnail
    views = tiles.images + native.images
    outs = enc.forward_images(views)
    for view, out in zip(views, outs, strict=True):
        assert rel_err(out, alone(model, view, None)) <= 1e-12


def test_views_arguments():
    with pytest.raises(ValueError, match="unknown tower kind"):
        tower_views([_image(50, 50)], "llava15", tower="vit")
    with pytest.raises(ValueError, match="image_std"):
        tower_views([_image(50, 50)], "llava15", image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match=r"images\[0\]"):
        tower_views([_image(2, 50)], "llava15")
    with pytest.raises(ValueError, match="got 1 outputs for 2 views"):
        tower_views([_image(50, 50), _image(60, 40)], "llava15").split([0])


def test_processor_strategy_views_for_a_tower():
    """ImageProcessor(strategy=...) gives its views in the tower's own form, equal to tower_views."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (300, 500, 3), dtype=np.uint8),
        rng.integers(0, 256, (90, 60, 3), dtype=np.uint8),
    ]
    proc = nv.ImageProcessor(strategy="llava_next")
    views = proc.tower_views(images, patch_size=14, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    ref = nv.integrations.tower_views(
        images, "llava_next", patch_size=14, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
    )
    assert len(views.images) == len(ref.images) > 2
    for a, b in zip(views.images, ref.images):
        assert a.shape[0] == 3 and a.shape[1] % 14 == 0 and torch.equal(a, b)
    with pytest.raises(ValueError, match="strategy"):
        nv.ImageProcessor().tower_views(images)
