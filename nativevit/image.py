"""Images in: loading, RGB conversion, input checks, ``smart_resize`` and the constants they share.

The bottom layer of the image side: ``preprocess`` (``ImageProcessor``) and ``strategies`` (resolution
strategies) read every image through here. This module imports no other part of nativevit and no
torch, so preprocessing never needs a model.

An image is accepted as a path (``str`` or ``Path``; opened lazily, so its size is checked from the
header before any pixel is decoded), a PIL image of any mode, or an ``(H, W, 3)`` uint8 RGB array.
Transparency is composited onto white, as transformers' image processors do. Pixels are taken as
stored: EXIF orientation is not applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL's smart_resize refuses an image whose long side is more than 200x its short side. Every
# input path applies the same limit, so no resolution strategy accepts what the native processor refuses.
MAX_ASPECT_RATIO = 200

# Inputs with more pixels than this are refused; for files, from the header, before decoding, so a
# small file that claims a huge size (a decompression bomb) costs nothing. 2**28 pixels of RGB uint8
# are 768 MiB.
DEFAULT_MAX_INPUT_PIXELS = 1 << 28


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


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
    aspect ratio over ``MAX_ASPECT_RATIO``.
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


def image_size(image, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> tuple[int, int]:
    """``(width, height)`` in px of a PIL image, an ``(H, W, C)`` array, an image file (its header only:
    nothing is decoded, and the ``max_input_pixels`` guard applies) or a ``(width, height)`` pair
    (returned as given)."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"image arrays must have shape (H, W, C), got {image.shape}")
        return image.shape[1], image.shape[0]
    if isinstance(image, (str, Path)):
        with open_image(image, max_input_pixels=max_input_pixels) as im:
            return im.size
    if isinstance(image, (tuple, list)) and len(image) == 2:
        return image[0], image[1]
    raise TypeError(
        "expected a PIL image, an HxWx3 uint8 array, a path or a (width, height) pair, got "
        f"{type(image).__name__}"
    )


# ---------------------------------------------------------------------------- loading


def open_image(
    path: str | Path, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, where: str = ""
) -> PIL.Image.Image:
    """Open an image file lazily (PIL reads the header only) and refuse it, before any pixel is decoded,
    if it is empty or has more than ``max_input_pixels`` pixels. The caller closes the returned image
    (use it as a context manager)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{_prefix(where)}no image file at {str(path)!r}")
    try:
        im = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{_prefix(where)}{path}: refused as a decompression bomb by PIL ({e})") from None
    try:
        check_input_size(*im.size, max_input_pixels=max_input_pixels, where=f"{_prefix(where)}{path}")
    except ValueError:
        im.close()
        raise
    return im


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A mode ``"RGB"`` copy of ``image`` (same size). Transparency (an alpha band, or a palette or
    grey-level transparency key) is composited onto white, as transformers does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    image,
    *,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    where: str = "",
    check: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The pixels of a path, PIL image or ``(H, W, 3)`` uint8 array, as an ``(H, W, 3)`` uint8 RGB array.

    An array is checked and returned as is (not copied). ``check(width, height)`` is the caller's size
    rule, run before the pixels are decoded or converted; by default ``check_input_size`` with
    ``max_input_pixels``. A file is refused past ``max_input_pixels`` from its header either way.
    Raises ``TypeError`` for other types and non-uint8 arrays, ``ValueError`` for a missing file, a
    wrong array shape or a size the check refuses; messages start with ``where``.
    """
    if check is None:

        def check(width: int, height: int) -> None:
            check_input_size(width, height, max_input_pixels=max_input_pixels, where=where)

    if isinstance(image, (str, Path)):
        with open_image(image, max_input_pixels=max_input_pixels, where=where) as im:
            check(*im.size)
            return np.asarray(to_rgb(im))
    if isinstance(image, PIL.Image.Image):
        check(*image.size)
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{_prefix(where)}image arrays must be uint8 (0..255), got {image.dtype}")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"{_prefix(where)}image arrays must have shape (H, W, 3) with 3 RGB channels, got "
                f"{image.shape}; pass a PIL image for grayscale or RGBA input"
            )
        check(image.shape[1], image.shape[0])
        return image
    raise TypeError(
        f"{_prefix(where)}expected a PIL image, an HxWx3 uint8 array or a path, got {type(image).__name__}"
    )


__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS",
    "MAX_ASPECT_RATIO",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "check_aspect_ratio",
    "check_input_size",
    "image_size",
    "load_rgb",
    "open_image",
    "smart_resize",
    "to_rgb",
]
