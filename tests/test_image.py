"""nativevit.image: loading from every accepted source, RGB conversion, input checks, layering."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import nativevit as nv
from nativevit import image, preprocess


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- loading


def test_path_pil_and_array_give_identical_pixels(tmp_path):
    arr = random_image(37, 53)
    path = tmp_path / "img.png"  # PNG is lossless, so the file holds exactly these pixels
    PIL.Image.fromarray(arr).save(path)
    assert image.load_rgb(arr) is arr  # an RGB uint8 array is checked, not copied
    for source in (PIL.Image.fromarray(arr), path, str(path)):
        out = image.load_rgb(source)
        assert out.dtype == np.uint8 and out.shape == (37, 53, 3), type(source)
        np.testing.assert_array_equal(out, arr, err_msg=f"source {type(source).__name__}")


def test_grayscale_and_palette_become_rgb():
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    out = image.load_rgb(PIL.Image.fromarray(grey, "L"))
    assert out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    arr = random_image(8, 9)
    pal = PIL.Image.fromarray(arr).quantize(colors=16)
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(image.load_rgb(pal), expected)


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[0] = (200, 100, 0, 255)  # opaque: kept
    rgba[1] = (200, 100, 0, 0)  # transparent: white, whatever the colour
    rgba[2] = (200, 100, 0, 128)  # half: out = a * colour + (1 - a) * 255
    rgba[3] = (10, 250, 90, 64)
    pil = PIL.Image.fromarray(rgba, "RGBA")
    path = tmp_path / "rgba.png"
    pil.save(path)
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = a * rgba[..., :3] + (1 - a) * 255
    for source in (pil,):
        out = image.load_rgb(source)
        assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
        np.testing.assert_array_equal(out[0], rgba[0, :, :3])
        np.testing.assert_array_equal(out[1], np.full((6, 3), 255))
        diff = np.abs(out.astype(np.float64) - expected).max()
        assert diff <= 1.0, f"{type(source).__name__}: max |diff| {diff} from a * colour + (1 - a) * white"
    # a file is decoded as transformers' load_image decodes a path: convert("RGB") drops the alpha band
    # (the parity tests below compare whole processor outputs with transformers)
    np.testing.assert_array_equal(image.load_rgb(path), rgba[..., :3])


def test_palette_transparency_key_is_composited_onto_white():
    pal = PIL.Image.new("P", (5, 5), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0, 0, 0] * 254)
    pal.putpixel((2, 2), 1)
    pal.info["transparency"] = 0  # palette index 0 is transparent
    out = image.load_rgb(pal)
    assert tuple(out[2, 2]) == (200, 0, 0)
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_image_size_reads_only_what_it_needs(tmp_path):
    path = tmp_path / "img.png"
    PIL.Image.fromarray(random_image(30, 70)).save(path)
    assert image.image_size(path) == (70, 30)  # (width, height)
    assert image.image_size(random_image(30, 70)) == (70, 30)
    assert image.image_size(PIL.Image.new("RGB", (70, 30))) == (70, 30)
    assert image.image_size((1920, 1080)) == (1920, 1080)
    with pytest.raises(ValueError, match="max_input_pixels"):
        image.image_size(path, max_input_pixels=1000)


# ---------------------------------------------------------------------------- validation


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match=r"images\[2\]: image arrays must be uint8.*float32"):
        image.load_rgb(np.zeros((5, 5, 3), np.float32), where="images[2]")
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\).*\(5, 5, 4\)"):
        image.load_rgb(np.zeros((5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\).*\(5, 5\)"):
        image.load_rgb(np.zeros((5, 5), np.uint8))
    with pytest.raises(TypeError, match="expected a PIL image.*got int"):
        image.load_rgb(42)
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="no image file at .*missing.png"):
        image.load_rgb(missing)
    with pytest.raises(ValueError, match=r"zero size \(10x0, WxH\)"):
        image.load_rgb(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"200x200 \(WxH\) = 40000 pixels, over max_input_pixels=10000"):
        image.load_rgb(random_image(200, 200), max_input_pixels=10_000)
    path = tmp_path / "img.png"
    PIL.Image.fromarray(random_image(200, 200)).save(path)
    with pytest.raises(ValueError, match=r"img\.png: image is 200x200.*decompression-bomb guard"):
        image.load_rgb(path, max_input_pixels=10_000)


def test_caller_size_rule_runs_before_conversion(tmp_path):
    seen = []

    def refuse(width, height):
        seen.append((width, height))
        raise ValueError("refused by the caller's rule")

    path = tmp_path / "img.png"
    PIL.Image.fromarray(random_image(20, 30)).save(path)
    for source in (random_image(20, 30), PIL.Image.new("RGB", (30, 20)), path):
        with pytest.raises(ValueError, match="caller's rule"):
            image.load_rgb(source, check=refuse)
    assert seen == [(30, 20)] * 3


def test_aspect_ratio_limit():
    image.check_aspect_ratio(1, image.MAX_ASPECT_RATIO)  # exactly the limit is accepted
    image.check_aspect_ratio(image.MAX_ASPECT_RATIO, 1)
    with pytest.raises(ValueError, match=r"image is 201x1 \(WxH\), aspect ratio 201.0 exceeds 200"):
        image.check_aspect_ratio(201, 1)
    with pytest.raises(ValueError, match="aspect ratio"):
        image.smart_resize(1, 201)
    with pytest.raises(ValueError, match="zero size"):
        image.smart_resize(0, 5)


# ---------------------------------------------------------------------------- one home for each name


def test_shared_names_have_one_definition():
    assert nv.smart_resize is image.smart_resize and preprocess.smart_resize is image.smart_resize
    proc = nv.ImageProcessor()
    np.testing.assert_array_equal(proc.image_mean, np.float32(image.OPENAI_CLIP_MEAN))
    np.testing.assert_array_equal(proc.image_std, np.float32(image.OPENAI_CLIP_STD))
    assert proc.max_input_pixels == image.DEFAULT_MAX_INPUT_PIXELS


def _imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function bodies included); relative imports
    as ``.name``, ``importlib`` calls as ``importlib``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.update([base] if node.module else [f"{base}{a.name}" for a in node.names])
    return names


def test_image_is_the_bottom_layer():
    """image.py imports nothing else of nativevit (and no torch): preprocessing never needs a model."""
    imported = _imported_modules(Path(image.__file__))
    assert not {m for m in imported if m.startswith((".", "nativevit", "torch", "importlib"))}, imported


def test_strategies_sit_on_image_alone():
    """strategies.py takes everything of nativevit from image.py: no preprocess, config or model."""
    from nativevit import strategies

    imported = _imported_modules(Path(strategies.__file__))
    ours = {m for m in imported if m.startswith((".", "nativevit", "importlib"))}
    assert ours == {".image"}, ours


# ---------------------------------------------------------------------------- files (as transformers reads)


def exif_jpeg(path: Path, orientation: int, h: int = 40, w: int = 70) -> Path:
    """A ``w x h`` px JPEG (as stored) whose EXIF orientation tag is ``orientation``."""
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(random_image(h, w, seed=orientation)).save(path, exif=exif.tobytes())
    return path


def transparent_pngs(tmp_path: Path) -> dict[str, Path]:
    """PNG files with transparency of every kind: RGBA, LA, palette with a transparent index (used by
    many pixels), RGB with a colour key (tRNS)."""
    rgba = random_image(37, 53, seed=1)
    alpha = np.random.default_rng(2).integers(0, 256, (37, 53), dtype=np.uint8)
    alpha[:5] = 0
    alpha[5:10] = 255
    rgba = np.dstack([rgba, alpha])
    files = {}
    for mode in ("RGBA", "LA"):
        files[mode] = tmp_path / f"{mode}.png"
        PIL.Image.fromarray(rgba, "RGBA").convert(mode).save(files[mode])
    pal = PIL.Image.fromarray(rgba[..., :3]).quantize(colors=16)
    files["P"] = tmp_path / "P.png"
    pal.save(files["P"], transparency=3)
    keyed = rgba[..., :3].copy()
    keyed[::3, ::4] = (10, 20, 30)
    files["RGB-key"] = tmp_path / "rgb_key.png"
    PIL.Image.fromarray(keyed).save(files["RGB-key"], transparency=(10, 20, 30))
    return files


def _transformers_pixels(path: Path) -> np.ndarray:
    """What transformers' Qwen2-VL PIL processor works on for a path: ``load_image`` (open, EXIF
    orientation, RGB), then its RGB conversion."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    return convert_to_rgb(load_image(str(path)), return_numpy=True)


def test_files_decode_as_transformers_reads_a_path(tmp_path):
    files = {f"exif{o}": exif_jpeg(tmp_path / f"exif{o}.jpg", o) for o in range(1, 9)}
    files.update(transparent_pngs(tmp_path))
    for name, path in files.items():
        ref = _transformers_pixels(path)
        for source in (path, str(path)):
            np.testing.assert_array_equal(image.load_rgb(source), ref, err_msg=name)
        with open(path, "rb") as f:
            np.testing.assert_array_equal(image.load_rgb(f), ref, err_msg=f"{name} as a file object")
            assert not f.closed  # the caller's file stays open
        np.testing.assert_array_equal(image.load_rgb(io.BytesIO(path.read_bytes())), ref, err_msg=name)


def test_exif_orientation_is_applied_to_files_only(tmp_path):
    path = exif_jpeg(tmp_path / "six.jpg", 6)
    decoded = np.asarray(PIL.Image.open(path).convert("RGB"))  # the JPEG's pixels as stored
    out = image.load_rgb(path)
    assert out.shape == (70, 40, 3)  # orientation 6: turned a quarter clockwise for display
    np.testing.assert_array_equal(out, np.rot90(decoded, k=-1))
    # a PIL image is taken as it is, as transformers' processor takes it (no orientation applied)
    assert image.load_rgb(PIL.Image.open(path)).shape == (40, 70, 3)
    # sizes from the header agree with the decoded pixels, orientation included
    assert image.image_size(path) == image.header_size(path) == (40, 70)
    assert image.image_size(PIL.Image.open(path)) == (70, 40)


def test_sizes_come_from_the_header_alone(tmp_path):
    """A JPEG cut right after its header has no pixels to decode: its size (orientation included) is
    still read, while loading it fails, naming the file."""
    path = exif_jpeg(tmp_path / "cut.jpg", 8, h=300, w=500)
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")  # start of scan: its header, then the entropy-coded pixels
    path.write_bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big") + 8])
    assert image.image_size(path) == (300, 500)
    assert image.header_size(path, where="images[0]") == (300, 500)
    with pytest.raises(
        ValueError, match=rf"^images\[0\]: {re.escape(str(path))}: cannot decode: .*truncated"
    ):
        image.load_rgb(path, where="images[0]")


def test_file_objects_that_cannot_seek_are_read_once(tmp_path):
    path = exif_jpeg(tmp_path / "five.jpg", 5)

    class Stream(io.RawIOBase):
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buf):
            return self.data.readinto(buf)

    stream = Stream(path.read_bytes())
    assert not stream.seekable()
    np.testing.assert_array_equal(image.load_rgb(stream, check=lambda w, h: None), _transformers_pixels(path))


def test_undecodable_files_name_the_input_and_the_path(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    full = tmp_path / "full.jpg"
    PIL.Image.fromarray(random_image(64, 64)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for path, why in ((text, "cannot identify"), (empty, "cannot identify"), (cut, "truncated")):
        with pytest.raises(
            ValueError, match=rf"^images\[3\]: {re.escape(str(path))}: cannot decode: .*{why}"
        ):
            image.load_rgb(path, where="images[3]")
        with (
            open(path, "rb") as f,
            pytest.raises(ValueError, match=rf"^images\[3\]: {re.escape(str(path))}: cannot decode"),
        ):
            image.load_rgb(f, where="images[3]")
    with pytest.raises(ValueError, match=r"^images\[1\]: <BytesIO>: cannot decode"):
        image.load_rgb(io.BytesIO(b"GIF89a"), where="images[1]")
