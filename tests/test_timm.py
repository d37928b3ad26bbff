"""timm ViTs as packed encoders (nativevit.timm_vit): parity with timm in float64.

The oracle is timm itself: ``forward_features`` on one image at a time (``dynamic_img_size=True``
for non-native sizes), ``forward_intermediates`` for earlier layers, and NaFlexVit's own padded
NaFlex forward (patches / patch_coord / patch_valid) for a batch of different sizes. Every model
is tiny (width 64, depth 2) with all parameters re-randomised: timm zeroes biases and sets norms
to one, which would hide a missing bias or a norm applied in the wrong place.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import nativevit as nv
from nativevit import ops
from nativevit.timm_vit import TimmPackedEncoder

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import ResPostBlock  # noqa: E402

TINY = dict(embed_dim=64, depth=2, num_heads=4)
FP64_TOL = 1e-12


def randomised(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.double().eval()


def tiny(name, seed=0, **kwargs):
    return randomised(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}), seed)


def images(grids, patch, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * patch, w * patch, generator=g, dtype=dtype) for h, w in grids]


def assert_close(actual, expected, tol, what):
    err = rel_err(actual, expected)
    diff = (actual - expected).abs()
    where = divmod(int(diff.argmax()), diff.shape[-1]) if diff.dim() == 2 else int(diff.argmax())
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err <= tol, (
        f"{what}: rel err {err:.2e} > {tol:.0e} "
        f"(max abs diff {diff.max():.2e} at {where}, mean {diff.mean():.2e})"
    )


# Native grid first; then non-square, 1x1, tall, and a grid larger than native.
GRIDS = [(4, 4), (3, 5), (1, 1), (6, 2), (5, 6)]

# name, kwargs, native grid side: CLIP (class token, norm_pre), SigLIP (no class token, MAP head),
# DINOv2 (4 registers, layer scale, no_embed_class), and a ViT with class + register tokens that
# DO get position rows, qk-norm and inner attention/MLP norms.
VIT_CASES = {
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64), 16),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64), 16),
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=56), 14),
    "vit_qknorm_reg": (
        "vit_base_patch16_224",
        dict(img_size=64, reg_tokens=2, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True),
        16,
    ),
}


@pytest.mark.parametrize("case", sorted(VIT_CASES))
def test_vit_parity_mixed_sizes(case):
    """One packed batch of five sizes == timm one image at a time: the fixed-size model at the
    native size, the same weights with dynamic_img_size=True elsewhere."""
    name, kwargs, patch = VIT_CASES[case]
    fixed = tiny(name, **kwargs)
    dynamic = tiny(name, dynamic_img_size=True, **kwargs)
    dynamic.load_state_dict(fixed.state_dict())
    imgs = images(GRIDS, patch)

    enc = nv.from_timm(fixed, attn_backend="torch")
    out = enc.forward_images(imgs)

    assert len(out) == len(imgs)
    with torch.no_grad():
        for i, (img, grid) in enumerate(zip(imgs, GRIDS, strict=True)):
            ref_model = fixed if i == 0 else dynamic
            ref = ref_model.forward_features(img[None])[0]
            assert out[i].shape == (fixed.num_prefix_tokens + grid[0] * grid[1], 64)
            assert_close(out[i], ref, FP64_TOL, f"{case} image {i} grid {grid}")


def test_gated_attention_parity():
    """timm Attention with its sigmoid output gate (GenLIP-style ``gated=True``)."""
    model = tiny("vit_base_patch16_clip_224", img_size=64, dynamic_img_size=True)
    for blk in model.blocks:
        blk.attn.gate = torch.nn.Linear(64, 64, dtype=torch.float64)
    randomised(model, seed=2)
    imgs = images(GRIDS, 16, seed=19)
    out = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    with torch.no_grad():
        for i, img in enumerate(imgs):
            assert_close(out[i], model.forward_features(img[None])[0], FP64_TOL, f"gated image {i}")


def naflex_padded_forward(model, imgs):
    """timm NaFlexVit's own padded NaFlex forward: patchify each image with timm, zero-pad to the
    longest, patch_coord / patch_valid as its collator builds them. Returns each image's valid rows."""
    from timm.data.naflex_transforms import patchify_image

    emb = model.embeds
    parts = [patchify_image(img, emb.patch_size, channels_last=emb.channels_last) for img in imgs]
    longest = max(p[0].shape[0] for p in parts)
    b, dim = len(parts), parts[0][0].shape[1]
    patches = torch.zeros(b, longest, dim, dtype=imgs[0].dtype)
    coord = torch.zeros(b, longest, 2, dtype=torch.long)
    valid = torch.zeros(b, longest, dtype=torch.bool)
    for i, (p, c, v) in enumerate(parts):
        patches[i, : len(p)], coord[i, : len(p)], valid[i, : len(p)] = p, c, v
    with torch.no_grad():
        out = model.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]
    pre = model.num_prefix_tokens
    return [out[i, : pre + len(p[0])] for i, p in enumerate(parts)]


# learned bicubic (gap), aspect-ratio preserving (par), factorized + AR preserving (parfac),
# SigLIP-2 NaFlex (bilinear, MAP head), grid_sample position sampling, class + register tokens.
NAFLEX_CASES = {
    "gap": ("naflexvit_base_patch16_gap", dict()),
    "par_gap": ("naflexvit_base_patch16_par_gap", dict()),
    "parfac_gap": ("naflexvit_base_patch16_parfac_gap", dict()),
    "siglip": ("naflexvit_base_patch16_siglip", dict()),
    "grid_sample": ("naflexvit_base_patch16_gap", dict(pos_embed_use_grid_sample=True)),
    "cls_reg": ("naflexvit_base_patch16_gap", dict(class_token=True, reg_tokens=2, pre_norm=True)),
}


@pytest.mark.parametrize("case", sorted(NAFLEX_CASES))
def test_naflex_parity_with_its_padded_forward(case):
    name, kwargs = NAFLEX_CASES[case]
    model = tiny(name, pos_embed_grid_size=(4, 4), **kwargs)
    imgs = images(GRIDS, 16)
    out = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    refs = naflex_padded_forward(model, imgs)
    for i, (o, r) in enumerate(zip(out, refs, strict=True)):
        assert_close(o, r, FP64_TOL, f"naflex {case} image {i} grid {GRIDS[i]}")


@pytest.mark.parametrize("proj", ["linear", "conv"])
def test_naflex_parity_with_image_forward(proj):
    """NaFlexVit on plain (1, 3, H, W) images (the contract's forward_features(image[None])),
    including the conv patch projection, which has no padded NaFlex mode."""
    model = tiny("naflexvit_base_patch16_gap", pos_embed_grid_size=(4, 4), embed_proj_type=proj, reg_tokens=1)
    imgs = images(GRIDS, 16, seed=3)
    out = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    with torch.no_grad():
        for i, img in enumerate(imgs):
            assert_close(out[i], model.forward_features(img[None])[0], FP64_TOL, f"naflex {proj} image {i}")


@pytest.mark.parametrize("case", ["clip", "dinov2"])
def test_pack_invariance(case):
    """Each image's output does not depend on what else is in the batch, nor on its position."""
    name, kwargs, patch = VIT_CASES[case]
    enc = nv.from_timm(tiny(name, dynamic_img_size=True, **kwargs), attn_backend="torch")
    imgs = images(GRIDS, patch, seed=5)
    together = enc.forward_images(imgs)
    reversed_ = enc.forward_images(imgs[::-1])[::-1]
    for i, img in enumerate(imgs):
        (alone,) = enc.forward_images([img])
        assert_close(together[i], alone, 1e-13, f"{case} image {i} packed vs alone")
        assert_close(reversed_[i], alone, 1e-13, f"{case} image {i} reversed batch vs alone")


def test_packed_equals_padded_backend():
    """The padded baseline (every layer on images x longest rows) gives the packed result."""
    name, kwargs, patch = VIT_CASES["dinov2"]
    model = tiny(name, dynamic_img_size=True, **kwargs)
    imgs = images(GRIDS, patch, seed=7)
    packed = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    padded = nv.from_timm(model, attn_backend="padded").forward_images(imgs)
    for i, (a, b) in enumerate(zip(padded, packed, strict=True)):
        assert_close(a, b, 1e-13, f"padded vs packed image {i}")


def test_every_available_attention_backend_serves_the_encoder():
    """Whatever attention backends this machine has (torch, padded, cpu, ...) give the reference
    result in float32; at least the two pure-torch ones must run."""
    name, kwargs, patch = VIT_CASES["clip"]
    model = tiny(name, dynamic_img_size=True, **kwargs)
    imgs = images(GRIDS, patch, seed=9)
    ref = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    model.float()
    imgs = [i.float() for i in imgs]
    probe = torch.empty(1, model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim)  # a float32 q
    ran = []
    for backend in ops.available_backends("cpu")["attention"]:
        try:
            ops.resolve_backend("attention", backend, probe)
        except RuntimeError:  # registered but not for float32 / this head dim: nothing to compare
            continue
        out = nv.from_timm(model, attn_backend=backend).forward_images(imgs)
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            assert_close(o.double(), r, 1e-5, f"backend {backend} image {i}")
        ran.append(backend)
    assert {"torch", "padded"} <= set(ran), ran


def test_bf16_backends_within_twice_the_torch_error():
    """bf16 encoder, every available backend that takes bf16: error vs the fp64 result at most twice
    that of the torch backend in bf16 (FlashAttention's rule), plus a small floor."""
    name, kwargs, patch = VIT_CASES["dinov2"]
    model = tiny(name, dynamic_img_size=True, **kwargs)
    imgs = images(GRIDS, patch, seed=17)
    ref = nv.from_timm(model, attn_backend="torch").forward_images(imgs)
    model.bfloat16()
    imgs = [i.bfloat16() for i in imgs]
    probe = torch.empty(
        1, model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim, dtype=torch.bfloat16
    )

    def errors(backend):
        out = nv.from_timm(model, attn_backend=backend).forward_images(imgs)
        return [rel_err(o.double(), r) for o, r in zip(out, ref, strict=True)]

    base = errors("torch")
    assert max(base) < 0.05, base  # bf16 is bf16, not garbage
    for backend in ops.available_backends("cpu")["attention"]:
        try:
            ops.resolve_backend("attention", backend, probe)
        except RuntimeError:
            continue
        for i, (err, b) in enumerate(zip(errors(backend), base, strict=True)):
            assert err <= 2 * b + 1e-3, f"backend {backend} image {i}: bf16 error {err:.2e} vs torch {b:.2e}"


@pytest.mark.parametrize(
    "layer, norm, prefix",
    [(-2, None, False), (-2, True, True), (0, None, True), (-1, None, False), (None, False, True)],
)
def test_output_layer_choice(layer, norm, prefix):
    """``layer`` / ``norm`` / ``prefix_tokens`` == timm forward_intermediates. LLaVA's choice is
    (-2, un-normed, class token dropped): one row per patch."""
    name, kwargs, patch = VIT_CASES["clip"]
    model = tiny(name, dynamic_img_size=True, **{**kwargs, "depth": 3})
    imgs = images(GRIDS, patch, seed=11)
    enc = nv.from_timm(model, layer=layer, norm=norm, prefix_tokens=prefix, attn_backend="torch")
    out = enc.forward_images(imgs)
    index = len(model.blocks) - 1 if layer is None else layer
    apply_norm = (layer is None) if norm is None else norm
    with torch.no_grad():
        for i, img in enumerate(imgs):
            patches, prefix_rows = model.forward_intermediates(
                img[None],
                indices=[index],
                norm=apply_norm,
                return_prefix_tokens=True,
                output_fmt="NLC",
                intermediates_only=True,
            )[0]
            ref = torch.cat([prefix_rows[0], patches[0]]) if prefix else patches[0]
            assert_close(out[i], ref, FP64_TOL, f"layer {layer} norm {norm} prefix {prefix} image {i}")
    if not prefix:
        assert [o.shape[0] for o in out] == [h * w for h, w in GRIDS]


def test_parameters_are_shared_not_copied():
    model = tiny("vit_base_patch16_clip_224", img_size=64, dynamic_img_size=True)
    enc = nv.from_timm(model, attn_backend="torch")
    assert {id(p) for p in enc.parameters()} == {id(p) for p in model.parameters()}
    imgs = images([(2, 3), (4, 4)], 16, seed=13)
    enc.forward_images(imgs)[0].sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.norm.weight.mul_(2.0)
        assert_close(
            enc.forward_images(imgs[1:])[0], model.forward_features(imgs[1][None])[0], FP64_TOL, "after edit"
        )


def test_from_name_and_local_safetensors(tmp_path):
    from safetensors.torch import save_file

    kwargs = dict(img_size=56, dynamic_img_size=True, **TINY)
    source = randomised(
        timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **kwargs)
    ).float()
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    enc = nv.from_timm("vit_small_patch14_reg4_dinov2", path, attn_backend="torch", **kwargs)
    assert not enc.training
    enc.double()
    source.double()
    imgs = images([(4, 4), (2, 5)], 14, seed=15)
    out = enc.forward_images(imgs)
    with torch.no_grad():
        for i, img in enumerate(imgs):
            assert_close(out[i], source.forward_features(img[None])[0], FP64_TOL, f"loaded image {i}")

    bad = tmp_path / "bad.safetensors"
    state = source.state_dict()
    state.pop("reg_token")
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ValueError, match="missing.*reg_token"):
        nv.from_timm("vit_small_patch14_reg4_dinov2", bad, **kwargs)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        nv.from_timm("vit_small_patch14_reg4_dinov2", tmp_path / "weights.pt", **kwargs)
    with pytest.raises(FileNotFoundError):
        nv.from_timm("vit_small_patch14_reg4_dinov2", tmp_path / "absent.safetensors", **kwargs)


def test_refuses_hybrid_cnn_stem():
    # R+ViT-Ti/16 (ResNet stem, then 8x8 patches of its feature map): the cheapest timm hybrid
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, **TINY)
    with pytest.raises(
        ValueError, match=r"patch_embed\.backbone \(Sequential in HybridEmbed\) is a CNN stem"
    ):
        nv.from_timm(model)


@pytest.mark.parametrize(
    "name, kwargs, part",
    [
        ("naflexvit_base_patch16_gap", dict(rope_type="axial"), r"rope \(RotaryEmbeddingCat\)"),
        ("vit_base_patch16_rope_reg1_gap_256", dict(), "class Eva"),
        ("deit_tiny_distilled_patch16_224", dict(), "dist_token"),
        ("vit_base_patch16_224", dict(block_fn=ResPostBlock), r"blocks\[0\] is ResPostBlock"),
        ("vit_base_patch16_224", dict(attn_layer="diff"), r"blocks\[0\]\.attn is DiffAttention"),
    ],
)
def test_refuses_unsupported_parts(name, kwargs, part):
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs})
    with pytest.raises(ValueError, match=part):
        nv.from_timm(model)


def test_bad_input_is_named():
    model = tiny("vit_base_patch16_clip_224", img_size=64, dynamic_img_size=True)
    enc = nv.from_timm(model, attn_backend="torch")
    good = torch.randn(3, 32, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"images\[1\] is 32x40.*multiples of the patch size 16x16"):
        enc.forward_images([good, torch.randn(3, 32, 40, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \(3, H, W\)"):
        enc.forward_images([torch.randn(1, 3, 32, 32, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"images\[0\].*floating-point"):
        enc.forward_images([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(TypeError, match="list of"):
        enc.forward_images(good)
    with pytest.raises(ValueError, match="empty"):
        enc.forward_images([])
    with pytest.raises(ValueError, match="layer 2 is out of range for a 2-block model"):
        nv.from_timm(model, layer=2)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        nv.from_timm(model, attn_backend="nope")
    with pytest.raises(TypeError, match="only apply when a timm model name is given"):
        nv.from_timm(model, img_size=64)
    with pytest.raises(TypeError, match="timm model or a timm model name"):
        nv.from_timm(3)


def test_training_mode_refuses_per_sample_regularisers():
    model = tiny("vit_base_patch16_clip_224", img_size=64, dynamic_img_size=True, drop_path_rate=0.1)
    enc = nv.from_timm(model, attn_backend="torch")
    imgs = images([(2, 2)], 16)
    enc.eval()
    (ref,) = enc.forward_images(imgs)
    assert_close(ref, model.forward_features(imgs[0][None])[0], FP64_TOL, "eval with drop_path_rate")
    enc.train()
    with pytest.raises(RuntimeError, match=r"blocks\[1\]\.drop_path1 \(stochastic depth"):
        enc.forward_images(imgs)


def test_is_exported():
    assert isinstance(nv.from_timm(tiny("vit_base_patch16_siglip_224", img_size=32)), TimmPackedEncoder)


def test_llava_next_tiles_through_clip_l14_336_in_one_packed_batch():
    """Strategies x encoders: LLaVA-NeXT AnyRes views (squashed base + 336 px tiles) of two images of
    different aspect through a CLIP-L/14-336 architecture (width/depth shrunk), all views in one
    packed batch, LLaVA's feature choice (penultimate block, class token dropped)."""
    import numpy as np
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from nativevit import strategies

    model = tiny("vit_large_patch14_clip_336", depth=3)  # native 336 px = 24x24 patches of 14
    enc = nv.from_timm(model, layer=-2, prefix_tokens=False, attn_backend="torch")
    rng = np.random.default_rng(0)
    pictures = [
        rng.integers(0, 256, (500, 1000, 3), dtype=np.uint8),
        rng.integers(0, 256, (900, 400, 3), dtype=np.uint8),
    ]
    views = [v for pic in pictures for v in strategies.plan("llava_next", pic)]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64)[:, None, None]
    pixels = [
        (torch.from_numpy(np.array(v.image)).permute(2, 0, 1).double() / 255 - mean) / std for v in views
    ]
    llava = strategies.get("llava_next")
    expected_views = sum(
        1 + cols * rows for cols, rows in (llava.canvas(p.shape[1], p.shape[0]) for p in pictures)
    )
    assert len(views) == expected_views and all(p.shape == (3, 336, 336) for p in pixels)

    rows, grids = enc.patchify(pixels)
    _, segments = enc(rows, grids)
    assert segments.num_segments == len(views) and segments.lengths == (1 + 24 * 24,) * len(views)

    out = enc.forward_images(pixels)
    with torch.no_grad():
        for i, px in enumerate(pixels):
            (ref,) = model.forward_intermediates(
                px[None], indices=[-2], norm=False, output_fmt="NLC", intermediates_only=True
            )
            assert out[i].shape == (576, 64)
            assert_close(out[i], ref[0], FP64_TOL, f"llava_next view {i} ({views[i].kind} {views[i].tile})")
