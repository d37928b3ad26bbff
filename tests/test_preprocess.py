"""ImageProcessor: Qwen2-VL semantics, checked live against transformers' PIL processor."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import nativevit as nv
from nativevit.preprocess import smart_resize

HUB_MAX = 12845056  # max_pixels in the released preprocessor_config.json
CLASS_MAX = 28 * 28 * 1280  # transformers' class default


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# (H, W) -> smart_resize with transformers' class default max_pixels, and with the released checkpoints',
# worked out by hand from Qwen2-VL's published algorithm.
SPEC_TABLE = [
    ((224, 224), (224, 224), (224, 224)),
    ((480, 640), (476, 644), (476, 644)),
    ((1000, 1000), (980, 980), (1008, 1008)),
    ((1080, 1920), (728, 1316), (1092, 1932)),
    ((2000, 3000), (812, 1204), (1988, 2996)),
    ((4000, 3000), (1148, 840), (4004, 2996)),
    ((50, 50), (56, 56), (56, 56)),
    ((27, 27), (56, 56), (56, 56)),
    ((3000, 20), (2996, 28), (2996, 28)),
]


@pytest.mark.parametrize("hw, class_default, hub", SPEC_TABLE)
def test_smart_resize_spec_table(hw, class_default, hub):
    assert smart_resize(*hw, max_pixels=CLASS_MAX) == class_default
    assert smart_resize(*hw, max_pixels=HUB_MAX) == hub


def test_smart_resize_half_to_even_and_aspect_limit():
    # 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4, 126/28 = 4.5 -> 4 (banker's rounding)
    assert smart_resize(70, 2800)[0] == 56
    assert smart_resize(98, 2800)[0] == 112
    assert smart_resize(126, 2800)[0] == 112
    assert smart_resize(1, 200) == (28, 812)  # exactly 200 is accepted
    assert smart_resize(10, 1000) == (28, 560)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201)


def test_smart_resize_matches_transformers_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 6000, size=(400, 2))]
    sizes += [(h, w) for h in (14, 27, 28, 29, 42, 70, 98, 126, 140) for w in (14, 56, 70, 3000)]
    for max_pixels in (CLASS_MAX, HUB_MAX):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, 3136, max_pixels) == hf_smart_resize(h, w, 28, 3136, max_pixels), (
                h,
                w,
            )


@pytest.mark.parametrize("max_pixels", [CLASS_MAX, HUB_MAX])
def test_processor_matches_transformers_pil(max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sizes = [(37, 53), (224, 224), (301, 199), (17, 640), (480, 644), (1001, 999)]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ours = nv.ImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)(images)
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)(images, return_tensors="pt")
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"])
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    diff = (ours.pixel_values - ref["pixel_values"]).abs().max().item()
    assert diff <= 1e-6, f"max |diff| {diff}"


def test_processor_batch_fields():
    batch = nv.ImageProcessor()([random_image(56, 84), random_image(112, 56, seed=1)])
    assert batch.grid_thw.tolist() == [[1, 4, 6], [1, 8, 4]]
    assert batch.grid_thw.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 24, 56]
    assert batch.max_seqlen == 32 and isinstance(batch.max_seqlen, int)
    assert batch.tokens_per_image == [6, 8]
    assert batch.image_sizes == [(56, 84), (112, 56)]
    # a still image fills both temporal halves of every patch
    v = batch.pixel_values.view(-1, 3, 2, 14, 14)
    assert torch.equal(v[:, :, 0], v[:, :, 1])


def test_rows_are_in_merge_block_order():
    """Row r of the output is the patch at the block-major position the RoPE ids use."""
    img = random_image(56, 84)
    proc = nv.ImageProcessor()
    batch = proc([img])
    x = proc._resize_normalize(img, (56, 84))  # (3, 56, 84)
    from nativevit.rope import rope_position_ids

    pos = rope_position_ids([(1, 4, 6)])
    for r, (i, j) in enumerate(pos.tolist()):
        patch = x[:, 14 * i : 14 * i + 14, 14 * j : 14 * j + 14]
        row = batch.pixel_values[r].view(3, 2, 14, 14)[:, 0].numpy()
        np.testing.assert_array_equal(row, patch)


def test_inputs_pil_array_path_agree(tmp_path):
    arr = random_image(90, 130)
    path = tmp_path / "img.png"
    PIL.Image.fromarray(arr).save(path)
    proc = nv.ImageProcessor()
    a = proc([arr]).pixel_values
    b = proc([PIL.Image.fromarray(arr)]).pixel_values
    c = proc([str(path)]).pixel_values
    d = proc([path]).pixel_values
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)  # fully transparent black
    out = nv.ImageProcessor()([PIL.Image.fromarray(rgba, "RGBA")])
    white = nv.ImageProcessor()([np.full((56, 56, 3), 255, dtype=np.uint8)])
    assert torch.equal(out.pixel_values, white.pixel_values)


def test_video_frames_and_temporal_padding():
    frames = [random_image(56, 56, seed=i) for i in range(3)]
    proc = nv.ImageProcessor()
    batch = proc([frames, random_image(56, 56, seed=9)])
    assert batch.grid_thw.tolist() == [[2, 4, 4], [1, 4, 4]]  # 3 frames padded to 4 -> t = 2
    assert batch.cu_seqlens.tolist() == [0, 16, 32, 48]  # one segment per temporal index
    v = batch.pixel_values[:32].view(2, 16, 3, 2, 14, 14)
    single = [proc([f]).pixel_values.view(16, 3, 2, 14, 14)[:, :, 0] for f in frames]
    assert torch.equal(v[0, :, :, 0], single[0]) and torch.equal(v[0, :, :, 1], single[1])
    assert torch.equal(v[1, :, :, 0], single[2]) and torch.equal(
        v[1, :, :, 1], single[2]
    )  # last frame repeated
    as_array = proc([np.stack(frames)])
    assert torch.equal(as_array.pixel_values, batch.pixel_values[:32])


def test_split_helpers():
    batch = nv.ImageProcessor()([random_image(56, 84), random_image(112, 56, seed=1)])
    feats = torch.arange(batch.num_tokens, dtype=torch.float32)[:, None]
    parts = batch.split(feats)
    assert [p.shape[0] for p in parts] == [24, 32]
    merged = batch.split(torch.zeros(14, 5))
    assert [p.shape[0] for p in merged] == [6, 8]
    with pytest.raises(ValueError, match="cannot split"):
        batch.split(torch.zeros(13, 5))


# ------------------------------------------------------------------ bad input


def test_bad_inputs(tmp_path):
    proc = nv.ImageProcessor()
    with pytest.raises(ValueError, match="empty image list"):
        proc([])
    with pytest.raises(ValueError, match="zero size"):
        proc([np.zeros((0, 10, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="aspect ratio"):
        proc([random_image(2, 500)])
    with pytest.raises(ValueError, match="3 RGB channels"):
        proc([np.zeros((30, 30, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match="3 RGB channels"):
        proc([np.zeros((30, 30), dtype=np.uint8)])
    with pytest.raises(TypeError, match="uint8"):
        proc([np.zeros((30, 30, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="PIL image"):
        proc([42])
    with pytest.raises(ValueError, match="no image file"):
        proc([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="one size"):
        proc([[random_image(56, 56), random_image(28, 56)]])
    with pytest.raises(ValueError, match="at least one frame"):
        proc([[]])
    with pytest.raises(ValueError, match="min_pixels"):
        nv.ImageProcessor(min_pixels=10, max_pixels=5)


def test_pixel_cap_and_input_cap():
    with pytest.raises(ValueError, match="pixel cap"):
        nv.ImageProcessor(min_pixels=56 * 56, max_pixels=HUB_MAX, pixel_cap=500_000)(
            [random_image(1000, 1000)]
        )
    with pytest.raises(ValueError, match="max_input_pixels"):
        nv.ImageProcessor(max_input_pixels=10_000)([random_image(200, 200)])
    # a lazily opened huge PNG is refused before it is decoded
    big = PIL.Image.new("RGB", (3000, 3000))
    with pytest.raises(ValueError, match="decompression"):
        nv.ImageProcessor(max_input_pixels=1_000_000)([big])
