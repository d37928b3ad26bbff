"""Images in: loading, RGB conversion, input checks, ``smart_resize`` and the constants they share.

The bottom layer of the image side: ``preprocess`` (``ImageProcessor``) and ``strategies`` (resolution
strategies) read every image through here. This module imports no other part of nativevit and no
torch, so preprocessing never needs a model.

An image is accepted as a file (a path, ``str`` or ``os.PathLike``, or a binary file object), a PIL
image of any mode, or an ``(H, W, 3)`` uint8 RGB array. The pixels are those transformers' Qwen2-VL
image processor (its PIL backend) computes from the same input:

* a file is decoded as transformers' ``load_image`` decodes a path: PIL opens it, the EXIF orientation
  is applied (``PIL.ImageOps.exif_transpose``), the result is converted to ``"RGB"`` with PIL's
  ``convert`` (an alpha band is dropped, not composited), and then the processor's RGB rule below runs
  on that (it matters only where a transparency key survives the conversion, e.g. a palette image with
  a transparent index: pixels of the key's colour become white);
* a PIL image is taken as it is, as the processor takes it: no EXIF orientation, and transparency (an
  alpha band, or a palette or grey-level transparency key) composited onto white;
* an array is taken as it is.

A file is opened lazily: its size is read from the header and checked (``max_input_pixels``) before any
pixel is decoded. Every error names the input (``where``, e.g. ``images[3]``) and the file's path.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL's smart_resize refuses an image whose long side is more than 200x its short side. Every
# input path applies the same limit, so no resolution strategy accepts what the native processor refuses.
MAX_ASPECT_RATIO = 200

# Inputs with more pixels than this are refused; for files, from the header, before decoding, so a
# small file that claims a huge size (a decompression bomb) costs nothing. 2**28 pixels of RGB uint8
# are 768 MiB.
DEFAULT_MAX_INPUT_PIXELS = 1 << 28

_ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5..8 turn the image by a quarter, swapping its sides


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


# ---------------------------------------------------------------------------- sources


def is_file(source) -> bool:
    """Whether ``source`` is read as an image file: a path (``str``, ``os.PathLike``) or an object with
    a ``read`` method (a binary file object)."""
    return isinstance(source, (str, os.PathLike)) or (
        not isinstance(source, PIL.Image.Image) and callable(getattr(source, "read", None))
    )


def describe(source, where: str = "") -> str:
    """How errors name an input: ``where`` (e.g. ``"images[3]"``), then the path of a file, joined by
    ``": "``: ``"images[3]: /data/cat.jpg"``. A file object is named by its ``name`` attribute when it
    has a string one, else by its type."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
    elif is_file(source):
        name = getattr(source, "name", None)
        path = name if isinstance(name, str) else f"<{type(source).__name__}>"
    return ": ".join(str(p) for p in (where, path) if p)


def rewindable(source):
    """``source`` itself, unless it is a file object that cannot seek: then its bytes, read once, as an
    ``io.BytesIO``, so that it can be opened more than once (header first, pixels later)."""
    if not is_file(source) or isinstance(source, (str, os.PathLike)):
        return source
    try:
        seekable = source.seekable()
    except AttributeError:
        seekable = callable(getattr(source, "seek", None))
    return source if seekable else io.BytesIO(source.read())


# ---------------------------------------------------------------------------- checks


def check_input_size(
    width: int, height: int, *, max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS, where: str = ""
) -> None:
    """Raise ``ValueError`` if a side is not positive, or the image has more than ``max_input_pixels``
    pixels (None: no limit). ``where`` names the input in the message (e.g. ``"images[3]"``)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"{_prefix(where)}image has zero size ({width}x{height}, WxH)")
    if max_input_pixels is not None and width * height > max_input_pixels:
        raise ValueError(
            f"{_prefix(where)}image is {width}x{height} (WxH) = {width * height} pixels, over "
            f"max_input_pixels={max_input_pixels} (a decompression-bomb guard); raise it to allow such inputs"
        )


def check_aspect_ratio(width: int, height: int, *, where: str = "") -> None:
    """Raise ``ValueError`` if the long side is more than ``MAX_ASPECT_RATIO`` times the short side
    (exactly ``MAX_ASPECT_RATIO`` is accepted). Both sides must be positive."""
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{_prefix(where)}image is {width}x{height} (WxH), aspect ratio {ratio:.1f} exceeds "
            f"{MAX_ASPECT_RATIO} (Qwen2-VL's limit, applied to every input); crop or split the image first"
        )


# ---------------------------------------------------------------------------- sizes


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's target ``(height, width)`` in px for an image of ``height x width`` px: multiples of
    ``factor``, pixel count in ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible.

    Rounding is exactly Qwen2-VL's: Python's half-to-even ``round`` first (70 / 28 = 2.5 -> 56 px,
    98 / 28 = 3.5 -> 112 px); if the result has too many pixels, floor after scaling down (never below
    ``factor``); if too few, ceil after scaling up. Raises ``ValueError`` for a side <= 0 and for an
    aspect ratio over ``MAX_ASPECT_RATIO``. Swapping the sides swaps the result.
    """
    check_input_size(width, height, max_input_pixels=None)
    check_aspect_ratio(width, height)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_size(
    image, *, max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS, where: str = ""
) -> tuple[int, int]:
    """``(width, height)`` in px of an input as ``load_rgb`` will return it, without decoding pixels.

    ``image``: a PIL image, an ``(H, W, C)`` array, an image file (its header only, EXIF orientation
    included; the ``max_input_pixels`` guard applies) or a ``(width, height)`` pair (returned as
    given). One limit of reading headers only: an EXIF block stored after a PNG's pixel data (PNG
    allows it, writers rarely do it) is seen when decoding but not here.
    """
    if isinstance(image, PIL.Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"{_prefix(where)}image arrays must have shape (H, W, C), got {image.shape}")
        return image.shape[1], image.shape[0]
    if is_file(image):
        return _file_size(image, max_input_pixels=max_input_pixels, where=where)
    if isinstance(image, (tuple, list)) and len(image) == 2:
        return image[0], image[1]
    raise TypeError(
        f"{_prefix(where)}expected a PIL image, an HxWx3 uint8 array, a path or file object, or a "
        f"(width, height) pair, got {type(image).__name__}"
    )


def header_size(
    image, *, max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS, where: str = ""
) -> tuple[int, int]:
    """``(width, height)`` in px that ``load_rgb(image, ...)`` will return, after every check of
    ``load_rgb`` that needs no pixels (type, array dtype and shape, zero size, ``max_input_pixels``),
    without decoding anything: a file's header only, EXIF orientation included (see ``image_size``
    for the one limit). A file object that cannot seek is consumed: pass it through ``rewindable``
    first. Raises as ``load_rgb`` does."""
    label = describe(image, where)
    if is_file(image):
        return _file_size(image, max_input_pixels=max_input_pixels, where=where)
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
    elif isinstance(image, np.ndarray):
        _check_array(image, label)
        width, height = image.shape[1], image.shape[0]
    else:
        raise _type_error(image, label)
    check_input_size(width, height, max_input_pixels=max_input_pixels, where=label)
    return width, height


def _check_array(image: np.ndarray, label: str) -> None:
    if image.dtype != np.uint8:
        raise TypeError(f"{_prefix(label)}image arrays must be uint8 (0..255), got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"{_prefix(label)}image arrays must have shape (H, W, 3) with 3 RGB channels, got "
            f"{image.shape}; pass a PIL image for grayscale or RGBA input"
        )


def _type_error(image, label: str) -> TypeError:
    return TypeError(
        f"{_prefix(label)}expected a PIL image, an HxWx3 uint8 array, a path or a file object, got "
        f"{type(image).__name__}"
    )


def _file_size(source, *, max_input_pixels: int | None, where: str) -> tuple[int, int]:
    with open_image(source, max_input_pixels=max_input_pixels, where=where) as im:
        width, height = im.size
        try:
            # The base class's reader looks at the header's EXIF and XMP only; PNG's own override
            # would decode the whole image to look for an EXIF block after the pixel data.
            orientation = PIL.Image.Image.getexif(im).get(_ORIENTATION_TAG, 1)
        except MemoryError:
            raise
        except Exception as e:
            raise ValueError(f"{describe(source, where)}: cannot read its EXIF orientation: {e}") from e
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ---------------------------------------------------------------------------- loading


def open_image(
    source, *, max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS, where: str = ""
) -> PIL.Image.Image:
    """Open an image file (a path or a binary file object) lazily: PIL reads the header only. Refuse
    it, before any pixel is decoded, if it is empty or has more than ``max_input_pixels`` pixels (None:
    no limit). Raises ``ValueError`` naming ``where`` and the path for a missing file, a file PIL cannot
    identify, and a refused size. The caller closes the returned image (use it as a context manager);
    a file object passed in stays open."""
    label = describe(source, where)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{_prefix(where)}no image file at {str(path)!r}")
    try:
        im = PIL.Image.open(source)
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{label}: refused as a decompression bomb by PIL ({e})") from None
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"{label}: cannot decode: {e}") from e
    try:
        check_input_size(*im.size, max_input_pixels=max_input_pixels, where=label)
    except ValueError:
        im.close()
        raise
    return im


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A mode ``"RGB"`` copy of ``image`` (same size). Transparency (an alpha band, or a palette or
    grey-level transparency key) is composited onto white, as transformers' image processors do."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """``to_rgb(image)`` as an ``(H, W, 3)`` uint8 array, without a second copy when ``image`` is
    already plain RGB."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return np.asarray(image)
    return np.asarray(to_rgb(image))


def decode_file(image: PIL.Image.Image) -> np.ndarray:
    """The pixels of a lazily opened image file as an ``(H, W, 3)`` uint8 array, decoded as
    transformers decodes a path: EXIF orientation applied, ``convert("RGB")``, then ``to_rgb``.
    ``image`` is transposed in place."""
    PIL.ImageOps.exif_transpose(image, in_place=True)
    # convert("RGB") of an RGB image is a plain copy (transparency key included): skip it
    return _rgb_array(image if image.mode == "RGB" else image.convert("RGB"))


def load_rgb(
    image,
    *,
    max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS,
    where: str = "",
    check: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The pixels of a file (path or file object), PIL image or ``(H, W, 3)`` uint8 array, as an
    ``(H, W, 3)`` uint8 RGB array (see the module docstring for each source's rule).

    An array is checked and returned as is (not copied). ``check(width, height)`` is the caller's size
    rule, run before the pixels are decoded or converted, on the size the result will have (a file's
    EXIF orientation included); by default ``check_input_size`` with ``max_input_pixels``. A file is
    refused past ``max_input_pixels`` from its header either way. Raises ``TypeError`` for other types
    and non-uint8 arrays, ``ValueError`` for a missing or undecodable file, a wrong array shape or a
    size the check refuses; messages start with ``where`` and the file's path.
    """
    label = describe(image, where)
    if is_file(image):
        image = rewindable(image)
        if check is not None:  # the caller's rule, on the size after orientation, from the header
            check(*_file_size(image, max_input_pixels=max_input_pixels, where=where))
        with open_image(image, max_input_pixels=max_input_pixels, where=where) as im:
            return _decoded(lambda: decode_file(im), label)
    if check is None:

        def check(width: int, height: int) -> None:
            check_input_size(width, height, max_input_pixels=max_input_pixels, where=label)

    if isinstance(image, PIL.Image.Image):
        check(*image.size)
        return _decoded(lambda: _rgb_array(image), label)
    if isinstance(image, np.ndarray):
        _check_array(image, label)
        check(image.shape[1], image.shape[0])
        return image
    raise _type_error(image, label)


def _decoded(decode: Callable[[], np.ndarray], label: str) -> np.ndarray:
    """Run ``decode``; PIL's errors (truncated or corrupt data, ...) become a ``ValueError`` that names
    the input."""
    try:
        return decode()
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"{_prefix(label)}cannot decode: {e}") from e


__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS",
    "MAX_ASPECT_RATIO",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "check_aspect_ratio",
    "check_input_size",
    "decode_file",
    "describe",
    "header_size",
    "image_size",
    "is_file",
    "load_rgb",
    "open_image",
    "rewindable",
    "smart_resize",
    "to_rgb",
]
