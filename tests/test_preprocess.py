"""ImageProcessor: Qwen2-VL semantics, checked live against transformers' PIL processor."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

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


# ------------------------------------------------------------------ files, as transformers reads them


@pytest.fixture(scope="module")
def hf_pil():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=CLASS_MAX)


def _exif_jpeg(path, orientation, h=90, w=150):
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(random_image(h, w, seed=orientation)).save(path, exif=exif.tobytes())
    return path


def _transparent_pngs(tmp_path):
    rgba = np.dstack([random_image(61, 97, seed=1), random_image(61, 97, seed=2)[..., 0]])
    rgba[:8, :, 3] = 0  # fully transparent rows, whatever their colour
    files = {}
    for mode in ("RGBA", "LA"):
        files[mode] = tmp_path / f"{mode}.png"
        PIL.Image.fromarray(rgba, "RGBA").convert(mode).save(files[mode])
    files["P"] = tmp_path / "P.png"
    PIL.Image.fromarray(rgba[..., :3]).quantize(colors=16).save(files["P"], transparency=5)
    return files


def _assert_same(ours, ref, what):
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"]), what
    diff = (ours.pixel_values - ref["pixel_values"]).abs().max().item()
    assert torch.equal(ours.pixel_values, ref["pixel_values"]), f"{what}: max |diff| {diff}"


def test_files_match_transformers_exif_orientations(tmp_path, hf_pil):
    """JPEGs with EXIF orientations 1-8, as paths and as open file objects: transformers rotates them
    (``load_image``), so must we; pixel_values identical."""
    proc = nv.ImageProcessor()
    for o in range(1, 9):
        path = _exif_jpeg(tmp_path / f"o{o}.jpg", o)
        ref = hf_pil([str(path)], return_tensors="pt")
        _assert_same(proc([str(path)]), ref, f"orientation {o} as str")
        _assert_same(proc([path]), ref, f"orientation {o} as Path")
        with open(path, "rb") as f:
            _assert_same(proc([f]), ref, f"orientation {o} as a file object")
        assert ref["image_grid_thw"].tolist() == ([[1, 10, 6]] if o >= 5 else [[1, 6, 10]])
    # a video of oriented frames: every frame turned
    frames = [str(_exif_jpeg(tmp_path / f"v{i}.jpg", 6, h=56, w=84)) for i in range(3)]
    assert nv.ImageProcessor()([frames]).grid_thw.tolist() == [[2, 6, 4]]


def test_files_match_transformers_transparency(tmp_path, hf_pil):
    """RGBA / LA / palette-with-transparency files, as paths and file objects: alpha handled exactly as
    transformers does for a path (dropped by its RGB conversion; a palette transparency key whitens
    the key's colour); pixel_values identical."""
    proc = nv.ImageProcessor()
    for mode, path in _transparent_pngs(tmp_path).items():
        ref = hf_pil([str(path)], return_tensors="pt")
        _assert_same(proc([str(path)]), ref, f"{mode} as a path")
        with open(path, "rb") as f:
            _assert_same(proc([f]), ref, f"{mode} as a file object")


def test_pil_images_and_arrays_match_transformers_as_given(tmp_path, hf_pil):
    """A PIL image is taken as it is, by transformers too: no EXIF orientation, transparency composited
    onto white; arrays likewise."""
    proc = nv.ImageProcessor()
    files = {**_transparent_pngs(tmp_path), "exif6": _exif_jpeg(tmp_path / "o6.jpg", 6)}
    for name, path in files.items():
        ref = hf_pil([PIL.Image.open(path)], return_tensors="pt")
        _assert_same(proc([PIL.Image.open(path)]), ref, f"{name} as a PIL image")
    arr = random_image(61, 97, seed=4)
    _assert_same(proc([arr]), hf_pil([arr], return_tensors="pt"), "array")


# ------------------------------------------------------------------ settings and budgets


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(patch_size=0), ValueError, "patch_size must be a positive int, got 0"),
        (dict(merge_size=0), ValueError, "merge_size must be a positive int, got 0"),
        (dict(temporal_patch_size=0), ValueError, "temporal_patch_size must be a positive int, got 0"),
        (dict(patch_size=-14), ValueError, "patch_size"),
        (dict(patch_size=14.0), TypeError, "patch_size must be a positive int, got float"),
        (dict(merge_size=True), TypeError, "merge_size"),
        (dict(min_pixels=0), ValueError, "min_pixels"),
        (dict(pixel_cap=0), ValueError, "pixel_cap"),
        (dict(max_input_pixels=0), ValueError, "max_input_pixels"),
        (dict(max_patches_per_call=0), ValueError, "max_patches_per_call"),
        (dict(image_std=0), ValueError, "image_std needs one value per RGB channel"),
        (dict(image_std=(0.5, 0.0, 0.5)), ValueError, "image_std must be > 0"),
        (dict(image_std=(0.5, -0.5, 0.5)), ValueError, "image_std must be > 0"),
        (dict(image_std=(1e-45, 1.0, 1.0)), ValueError, "image_std"),
        (dict(image_mean=(float("nan"), 0.5, 0.5)), ValueError, "image_mean must be finite"),
        (dict(image_mean=(0.5, float("inf"), 0.5)), ValueError, "image_mean must be finite"),
        (dict(image_mean=(0.5, 0.5)), ValueError, "image_mean needs one value per RGB channel"),
        (dict(image_mean="abc"), ValueError, "image_mean"),
    ],
)
def test_settings_are_checked_when_built(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        nv.ImageProcessor(**kwargs)


def test_settings_that_pass_give_finite_pixels():
    proc = nv.ImageProcessor(image_mean=(1.0, 0.0, 0.5), image_std=(1e-3, 2.0, 0.01), max_input_pixels=None)
    assert torch.isfinite(proc([random_image(56, 56)]).pixel_values).all()
    assert nv.ImageProcessor(max_patches_per_call=None)([random_image(56, 56)]).pixel_values.shape[0] == 16


def _header_only_jpeg(path, w, h):
    """A JPEG of ``w x h`` px cut right after its headers: its size can be read, its pixels cannot."""
    PIL.Image.new("RGB", (w, h), (40, 90, 160)).save(path)
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big") + 8])
    return path


def test_call_budget_refuses_before_decoding(tmp_path):
    """A 64-frame 1920x1080 video at the released Qwen2-VL size is 32 x 78 x 138 = 344448 patch rows
    (1.5 GiB of pixel_values): over the default budget, refused from the headers alone."""
    assert nv.preprocess.DEFAULT_MAX_PATCHES_PER_CALL == 262144
    proc = nv.ImageProcessor.qwen2_vl()
    assert proc.max_patches_per_call == 262144
    frame = _header_only_jpeg(tmp_path / "frame.jpg", 1920, 1080)  # decoding it would fail
    expected = r"344448 patch rows .*max_patches_per_call=262144.*images\[0\] \(64 frames of 1080x1920"
    with pytest.raises(ValueError, match=expected):
        proc([[frame] * 64])
    # arrays: refused without allocating anything near the output's size
    arr = np.zeros((1080, 1920, 3), np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=expected):
            proc([[arr] * 64])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak / 2**20:.1f} MiB allocated before refusing"
    # the budget counts every input of the call, views of strategies too
    small = nv.ImageProcessor(max_patches_per_call=100)
    assert small([random_image(56, 84)] * 4).pixel_values.shape == (96, 1176)
    with pytest.raises(
        ValueError, match=r"120 patch rows .* from 5 input\(s\), over max_patches_per_call=100"
    ):
        small([random_image(56, 84)] * 5)
    with pytest.raises(ValueError, match="max_patches_per_call=1000"):
        nv.ImageProcessor(strategy="internvl", max_patches_per_call=1000)([tmp_path / "frame.jpg"])
    with pytest.raises(ValueError, match="max_patches_per_call=10"):
        nv.ImageProcessor(max_patches_per_call=10).preprocess(random_image(56, 84))


_PEAK_SCRIPT = """
import gc, json, numpy as np, nativevit as nv

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

proc = nv.ImageProcessor.qwen2_vl()
proc([np.zeros((56, 56, 3), np.uint8)])  # warm up
rng = np.random.default_rng(0)
video = rng.integers(0, 256, (6, 1080, 1920, 3), dtype=np.uint8)
images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((700, 900), (1500, 500))]
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak (VmHWM) from the current RSS
batch = proc([video, *images])
print(json.dumps({"peak": status("VmHWM") - base, "out": batch.pixel_values.numel() * 4}))
"""


def test_peak_memory_is_about_the_output():
    """Peak RSS growth of a call (6 frames of 1920x1080 and two images, inputs not counted) against its
    output (177 MiB of pixel_values): the output plus about one decoded frame, measured in a fresh
    process (Linux: /proc/self/status, VmHWM reset through /proc/self/clear_refs)."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure the peak RSS")
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = res["peak"] / res["out"]
    assert res["out"] > 150 * 2**20
    assert ratio <= 1.5, f"peak {res['peak'] / 2**20:.0f} MiB = {ratio:.2f} x the output"


# ------------------------------------------------------------------ errors name the input


def test_errors_name_the_index_and_the_path(tmp_path):
    good = tmp_path / "good.png"
    PIL.Image.fromarray(random_image(64, 64)).save(good)
    full = tmp_path / "full.jpg"
    PIL.Image.fromarray(random_image(64, 64)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    text = tmp_path / "text.jpg"
    text.write_text("hello\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    strip = tmp_path / "strip.png"
    PIL.Image.fromarray(random_image(4, 1000)).save(strip)
    proc = nv.ImageProcessor()
    cases = [
        ([good, cut], rf"^images\[1\]: {re.escape(str(cut))}: cannot decode: .*truncated"),
        ([good, good, text], rf"^images\[2\]: {re.escape(str(text))}: cannot decode: cannot identify"),
        ([empty], rf"^images\[0\]: {re.escape(str(empty))}: cannot decode: cannot identify"),
        ([good, np.zeros((0, 10, 3), np.uint8)], r"^images\[1\]: image has zero size \(10x0, WxH\)"),
        ([good] * 3 + [random_image(2, 500)], r"^images\[3\]: image is 500x2 \(WxH\), aspect ratio 250.0"),
        ([good, strip], rf"^images\[1\]: {re.escape(str(strip))}: image is 1000x4 \(WxH\), aspect ratio"),
        ([[good, good, cut]], rf"^images\[0\] frame 2: {re.escape(str(cut))}: cannot decode"),
        (
            [[good, strip]],
            rf"^images\[0\] frame 1: {re.escape(str(strip))}: all frames of a video must have one size",
        ),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            proc(images)
    with open(cut, "rb") as f, pytest.raises(ValueError, match=rf"^images\[0\]: {re.escape(str(cut))}"):
        proc([f])
    with pytest.raises(ValueError, match=r"^images\[0\]: .*pixel cap"):
        nv.ImageProcessor(max_pixels=HUB_MAX, pixel_cap=500_000)([random_image(1000, 1000)])
    for name in ("internvl", "llava_next"):
        with pytest.raises(ValueError, match=rf"^images\[1\]: {re.escape(str(cut))}: cannot decode"):
            nv.ImageProcessor(strategy=name)([good, cut])
        with pytest.raises(ValueError, match=rf"^images\[1\]: {re.escape(str(strip))}: .*aspect ratio"):
            nv.ImageProcessor(strategy=name)([good, strip])


# ------------------------------------------------------------------ family presets


def test_for_model_reads_the_family_table(monkeypatch):
    from nativevit import config

    for fam in config.FAMILIES.values():
        proc = nv.ImageProcessor.for_model(fam.name)
        for key, value in fam.processor.items():
            ours = np.asarray(getattr(proc, key))
            np.testing.assert_array_equal(ours, np.asarray(value, ours.dtype), err_msg=f"{fam.name}.{key}")
    # release and tower names map to their family
    assert nv.ImageProcessor.for_model("qwen3_vl_moe").patch_size == 16
    assert nv.ImageProcessor.for_model("qwen2_5_vl_vision").max_pixels == 12845056
    # the table is the one source: a change there shows in every entry point
    monkeypatch.setitem(config.family("qwen2_vl").processor, "max_pixels", 28 * 28 * 77)
    assert nv.ImageProcessor.for_model("qwen2_vl").max_pixels == 28 * 28 * 77
    assert nv.ImageProcessor.qwen2_vl().max_pixels == 28 * 28 * 77
    assert nv.ImageProcessor.qwen2_vl(max_pixels=28 * 28 * 5).max_pixels == 28 * 28 * 5  # overrides win
    with pytest.raises(
        ValueError, match=r"no ImageProcessor preset for model_type 'llava'; known: .*qwen3_vl_moe"
    ):
        nv.ImageProcessor.for_model("llava")
