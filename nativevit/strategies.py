"""Resolution strategies of the VLM literature as lists of views for one packed encoder.

LLaVA-1.5 (fixed 336, pad to square), LLaVA-NeXT AnyRes (336 tiles + squashed base, unpad +
newline), LLaVA-OneVision ``anyres_max_9`` (384 tiles, bilinear pooling past 9 tiles), InternVL
dynamic tiling (448 tiles + thumbnail), Qwen2-VL native resolution (``smart_resize``) and the
DeepSeek-OCR modes (Tiny/Small squash, Base/Large pad, Gundam = 640 tiles + padded 1024 global) each
turn an image into *views*. Every view is one patch grid, so the views of many images pack into one
varlen batch and the block-diagonal attention keeps each view on its own.

Two numbers per image, kept apart on purpose:

* ``num_tokens(name, width, height)``: the placeholder tokens the language model sees, exactly as the
  system's reference counts them (its own vision tower, its own patch size). Where transformers
  implements the system this is the processor's ``_get_num_multimodal_tokens`` count: LLaVA-NeXT and
  OneVision include the newline features, InternVL includes ``<img>``/``</img>`` (+2), Qwen2-VL
  counts ``<|image_pad|>`` only (the chat template adds ``<|vision_start|>``/``<|vision_end|>``).
  DeepSeek-OCR (not in transformers) counts as its released code: per-row newlines and the view
  separator included.
* ``View.grid``: the grid our Qwen2-VL encoder runs on. A view of the system's own size is resampled
  (PIL bicubic, no crop, no pad) to the nearest multiple of 28 px per side (``encode_side``):
  336 -> 336 (24x24 patches) and 448 -> 448 (32x32) are exact; OneVision's 384 -> 392 (28x28, where
  SigLIP sees 27x27, which the 2x2 merge cannot group); DeepSeek's 512 -> 504, 640 -> 644,
  1024 -> 1036, 1280 -> 1288. A native (Qwen2-VL) view is already a multiple of 28 and is resampled
  once, from the original image, exactly as ``ImageProcessor`` does. Pad colours are each system's
  (in pixel space); normalisation is our encoder's (the processor's mean/std), not the system's.

Views are listed in the order the language model reads their features: LLaVA base first, InternVL
thumbnail last, DeepSeek Gundam tiles before the global view.

Images are read by ``nativevit.image`` (files with their EXIF orientation applied, as transformers
reads a path). Bad input raises ``ValueError``: sides under ``MIN_SIDE`` px, aspect ratios over
``MAX_ASPECT_RATIO`` (``nativevit.image``: Qwen2-VL's limit, applied to all) or past a strategy's own
limit (LLaVA-NeXT's unpadded feature grid would be empty), and more than ``max_input_pixels`` pixels
(decompression bombs; checked from the header, before decoding). Nothing is cropped silently.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageOps

from .image import (
    DEFAULT_MAX_INPUT_PIXELS,
    OPENAI_CLIP_MEAN,
    check_aspect_ratio,
    check_input_size,
    image_size,
    load_rgb,
    smart_resize,
)

ENCODE_FACTOR = 28  # patch 14 x merge 2 of the packed Qwen2-VL encoder
ENCODER_PATCH = 14
MIN_SIDE = 4

LLAVA15_PAD_COLOR = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # (122, 116, 104): expand2square background
DEEPSEEK_PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): DeepSeek-OCR normalises with mean 0.5

# transformers' (height, width) pinpoint lists, in transformers' order. When two canvases tie on both
# effective and wasted pixels, the first listed wins (select_best_resolution), so the order decides
# the canvas of small non-square images: listing them (width, height), as the original LLaVA code
# does, picks the transposed canvas and changes their token counts (200x100 px: 1752 here, 876 there).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((i * 384, j * 384) for i in range(1, 7) for j in range(1, 7))


def encode_side(side: int) -> int:
    """Side in px our encoder sees for a view side of ``side`` px: nearest multiple of 28 (half-to-even)."""
    return max(ENCODE_FACTOR, round(side / ENCODE_FACTOR) * ENCODE_FACTOR)


class TokenCount(NamedTuple):
    """Language-model tokens of one image: ``total = content + newline + special``."""

    total: int
    content: int
    newline: int
    special: int


@dataclass(frozen=True)
class View:
    """One view of an image: what one pass of the system's vision tower sees.

    Attributes:
        kind: ``"global"`` (whole image, squashed or padded), ``"tile"``, ``"thumbnail"`` (InternVL's
            whole-image view after the tiles) or ``"native"`` (Qwen2-VL).
        size: ``(width, height)`` in the system's own pixels (e.g. 336x336 for a CLIP-336 tile).
        fit: how the image becomes this view: ``"pad"`` (aspect kept, padded), ``"squash"`` (resized to
            the view's aspect), ``"tile"`` (a crop of a resized canvas, see ``canvas``) or ``"native"``.
        encode_size: ``(width, height)`` our encoder sees, multiples of 28 (see ``encode_side``).
        tile: ``(row, col)`` of a tile in its grid, else None.
        canvas: ``(width, height)`` of the canvas the tiles are cut from, else None.
        image: the pixels to resample to ``encode_size`` (None when planned from a size alone). For a
            native view this is the original image, so it is resampled once.
    """

    kind: str
    size: tuple[int, int]
    fit: str
    encode_size: tuple[int, int]
    tile: tuple[int, int] | None = None
    canvas: tuple[int, int] | None = None
    image: PIL.Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid in our encoder (``t = 1``: a still image)."""
        w, h = self.encode_size
        return 1, h // ENCODER_PATCH, w // ENCODER_PATCH

    @property
    def num_patches(self) -> int:
        """Encoder patches of this view, ``h * w`` of ``grid``."""
        _, h, w = self.grid
        return h * w

    @property
    def position_offset(self) -> tuple[int, int]:
        """``(row, col)`` of this view's first patch in the whole tile canvas, in encoder patches.

        Tiles of one canvas partition it, so tile ``(r, c)`` at offset ``(r * h, c * w)`` has the 2D
        positions of its patches in the canvas; other views start at ``(0, 0)``. This is metadata for
        consumers that relate views (e.g. a language model's M-RoPE). Our encoder attends within each
        view only, and 2D RoPE scores depend on position *differences*, so shifting a whole view by a
        constant offset leaves its encoding unchanged (up to fp32 angle rounding): the default of each
        view's own grid loses nothing, and no model hook is needed.
        """
        if self.tile is None:
            return 0, 0
        _, h, w = self.grid
        return self.tile[0] * h, self.tile[1] * w


# ---------------------------------------------------------------------------- input checks


def check_size(
    width: int, height: int, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, name: str = ""
) -> None:
    """Raise ``TypeError`` unless both sides are ints, ``ValueError`` for a side under ``MIN_SIDE`` px,
    an aspect ratio over ``MAX_ASPECT_RATIO`` (``nativevit.image``) or more than ``max_input_pixels``
    pixels: the sizes no strategy accepts."""
    for label, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"image {label} must be an int, got {type(v).__name__}")
    where = f"strategy {name!r}" if name else ""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(
            f"{where}{': ' if where else ''}image is {width}x{height} (WxH); both sides must be at least "
            f"{MIN_SIDE} px (a 1-3 px side has no 2D extent to tile or resample, and transformers' "
            "processors read such arrays' channel axis ambiguously)"
        )
    check_aspect_ratio(width, height, where=where)
    check_input_size(width, height, max_input_pixels=max_input_pixels, where=where)


# ---------------------------------------------------------------------------- shared geometry


def select_best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT canvas ``(h, w)`` in px: the most effective pixels (the image's pixels that survive
    an aspect-kept fit into the canvas, never more than it has), then the least waste (canvas pixels
    left over); the first of equally good canvases wins.

    ``pinpoints`` are ``(height, width)`` in px, in transformers' order, which breaks the ties.
    """
    best, max_eff, min_waste = None, 0, float("inf")
    for ch, cw in pinpoints:
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (ch, cw), eff, waste
    return best


def resized_within(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Aspect-kept ``(h, w)`` in px of an image fitted inside a ``target_h x target_w`` canvas.

    The scale is a float64 ratio and the scaled side is ``ceil(side * scale)``, as transformers does:
    ``ceil(3000 * (672 / 4000)) = 505``, where exact integer arithmetic gives 504. The side differs, and
    with it the pixels of the padded canvas, so the order of the float operations is kept.
    """
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """InternVL's candidate ``(cols, rows)`` grids with ``min_num..max_num`` tiles, in InternVL's order:
    by tile count, and within one count in the iteration order of a Python set of the grids, as its code
    builds them (the order decides exact ties in ``closest_grid``)."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def closest_grid(width: int, height: int, ratios: Sequence[tuple[int, int]], tile: int) -> tuple[int, int]:
    """InternVL ``find_closest_aspect_ratio``: the ``(cols, rows)`` grid whose aspect ratio is closest
    to the image's. Only exactly equal float differences tie, and a tie goes to the later grid only when
    the image has more than half as many pixels as that grid of ``tile x tile`` tiles (strict ``>``),
    so a small image is not spread over many tiles."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def _tiles(canvas: PIL.Image.Image, tile: int, cols: int, rows: int) -> list[PIL.Image.Image]:
    return [
        canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


def _tile_views(tile: int, cols: int, rows: int) -> list[View]:
    enc = (encode_side(tile), encode_side(tile))
    canvas = (cols * tile, rows * tile)
    return [View("tile", (tile, tile), "tile", enc, (r, c), canvas) for r in range(rows) for c in range(cols)]


def _square_view(kind: str, side: int, fit: str) -> View:
    return View(kind, (side, side), fit, (encode_side(side), encode_side(side)))


# ---------------------------------------------------------------------------- strategies


class Strategy(ABC):
    """A resolution strategy: ``layout`` (geometry), ``render`` (pixels) and ``count`` (LM tokens)."""

    name: str = ""

    def __init__(self, *, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS):
        self.max_input_pixels = max_input_pixels

    def check(self, width: int, height: int) -> None:
        check_size(width, height, max_input_pixels=self.max_input_pixels, name=self.name)

    def count(self, width: int, height: int) -> TokenCount:
        self.check(width, height)
        return self._count(width, height)

    def layout(self, width: int, height: int) -> list[View]:
        self.check(width, height)
        return self._layout(width, height)

    def num_tokens(self, width: int, height: int) -> int:
        return self.count(width, height).total

    def plan(self, image) -> list[View]:
        """Views of an image (pixels attached), or of a ``(width, height)`` pair (geometry only); see
        the module-level ``plan``."""
        if isinstance(image, (tuple, list)):
            return self.layout(*image_size(image))
        img = PIL.Image.fromarray(load_rgb(image, max_input_pixels=self.max_input_pixels, check=self.check))
        views = self.layout(*img.size)
        pixels = self._render(img, views)
        return [replace(v, image=p) for v, p in zip(views, pixels, strict=True)]

    @abstractmethod
    def _count(self, width: int, height: int) -> TokenCount:
        """Token count of a checked size."""

    @abstractmethod
    def _layout(self, width: int, height: int) -> list[View]:
        """Views (geometry only) of a checked size."""

    @abstractmethod
    def _render(self, img: PIL.Image.Image, views: list[View]) -> list[PIL.Image.Image]:
        """Pixels of each view of ``layout(*img.size)``, in the same order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Llava15(Strategy):
    """LLaVA-1.5: pad to square with the CLIP mean colour (floor offset), resize to 336; 576 tokens."""

    name = "llava15"

    def __init__(self, *, size: int = 336, patch: int = 14, **kw):
        super().__init__(**kw)
        self.size, self.patch = size, patch

    def _count(self, width, height):
        n = (self.size // self.patch) ** 2
        return TokenCount(n, n, 0, 0)

    def _layout(self, width, height):
        return [_square_view("global", self.size, "pad")]

    def _render(self, img, views):
        w, h = img.size
        if w == h:
            square = img
        else:
            side = max(w, h)
            square = PIL.Image.new("RGB", (side, side), LLAVA15_PAD_COLOR)
            square.paste(img, ((side - w) // 2, (side - h) // 2))
        return [square.resize((self.size, self.size), PIL.Image.BICUBIC)]


class LlavaNext(Strategy):
    """LLaVA-NeXT AnyRes in transformers' convention: canvas from the pinpoints, black pad, tiles,
    squashed base view first; tokens = base + unpadded grid + one newline per row.

    ``max_anyres`` (OneVision's ``anyres_max_N``) bilinearly pools the unpadded grid when it holds more
    than 1.1^2 N tiles' worth of features.
    """

    name = "llava_next"

    def __init__(
        self,
        *,
        tile: int = 336,
        patch: int = 14,
        pinpoints: Sequence[tuple[int, int]] = LLAVA_NEXT_PINPOINTS,
        max_anyres: int | None = None,
        **kw,
    ):
        super().__init__(**kw)
        for ch, cw in pinpoints:
            if ch % tile or cw % tile:
                raise ValueError(f"pinpoint {(ch, cw)} (h, w) is not a multiple of the tile size {tile}")
        self.tile, self.patch, self.pinpoints, self.max_anyres = tile, patch, tuple(pinpoints), max_anyres

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        """``(cols, rows)`` of the tile grid."""
        ch, cw = select_best_resolution(height, width, self.pinpoints)
        return cw // self.tile, ch // self.tile

    def feature_grid(self, width: int, height: int) -> tuple[int, int]:
        """``(rows, cols)`` of the tile features after unpadding (and pooling), before newlines."""
        cols, rows = self.canvas(width, height)
        g = self.tile // self.patch
        cur_h, cur_w = rows * g, cols * g
        if width / height > cur_w / cur_h:
            # rounding to 7 places before truncating, as transformers does, keeps float error from
            # dropping a row: 110 * (48 / 352) = 14.999999999999998 counts as 15
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        if cur_h <= 0 or cur_w <= 0:
            raise ValueError(
                f"strategy {self.name!r}: a {width}x{height} (WxH) image is too elongated: its unpadded "
                f"feature grid on the {cols}x{rows}-tile canvas would be {cur_h}x{cur_w} (empty)"
            )
        if self.max_anyres is not None:
            t = math.sqrt(cur_h * cur_w / (self.max_anyres * g * g))
            if t > 1.1:
                cur_h, cur_w = int(cur_h // t), int(cur_w // t)
        return cur_h, cur_w

    def _count(self, width, height):
        g = self.tile // self.patch
        r, c = self.feature_grid(width, height)
        return TokenCount(g * g + r * c + r, g * g + r * c, r, 0)

    def _layout(self, width, height):
        self.feature_grid(width, height)  # raises for images past the strategy's limit
        cols, rows = self.canvas(width, height)
        return [_square_view("global", self.tile, "squash"), *_tile_views(self.tile, cols, rows)]

    def _render(self, img, views):
        w, h = img.size
        cols, rows = self.canvas(w, h)
        cw, ch = cols * self.tile, rows * self.tile
        nh, nw = resized_within(h, w, ch, cw)
        canvas = PIL.Image.new("RGB", (cw, ch), (0, 0, 0))
        canvas.paste(img.resize((nw, nh), PIL.Image.BICUBIC), ((cw - nw) // 2, (ch - nh) // 2))
        base = img.resize((self.tile, self.tile), PIL.Image.BICUBIC)
        return [base, *_tiles(canvas, self.tile, cols, rows)]


class LlavaOneVision(LlavaNext):
    name = "llava_onevision"

    def __init__(self, *, max_anyres: int = 9, **kw):
        kw.setdefault("tile", 384)
        kw.setdefault("pinpoints", ONEVISION_PINPOINTS)
        super().__init__(max_anyres=max_anyres, **kw)


class InternVL(Strategy):
    """InternVL ``dynamic_preprocess``: squash to the closest ``cols x rows`` grid of 448 tiles, plus
    a squashed thumbnail last when there is more than one tile; 256 tokens per 448 image, +2 for
    ``<img>``/``</img>``. ``max_tiles`` defaults to 12, InternVL's usual setting (6 is also common)."""

    name = "internvl"

    def __init__(
        self,
        *,
        max_tiles: int = 12,
        min_tiles: int = 1,
        tile: int = 448,
        tokens_per_tile: int = 256,
        thumbnail: bool = True,
        wrapper_tokens: int = 2,
        **kw,
    ):
        super().__init__(**kw)
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}")
        self.max_tiles, self.min_tiles, self.tile = max_tiles, min_tiles, tile
        self.tokens_per_tile, self.thumbnail, self.wrapper_tokens = tokens_per_tile, thumbnail, wrapper_tokens

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        """``(cols, rows)`` of the tile grid."""
        return closest_grid(width, height, target_ratios(self.min_tiles, self.max_tiles), self.tile)

    def _num_images(self, width, height) -> int:
        cols, rows = self.grid_for(width, height)
        return cols * rows + (self.thumbnail and cols * rows > 1)

    def _count(self, width, height):
        content = self.tokens_per_tile * self._num_images(width, height)
        return TokenCount(content + self.wrapper_tokens, content, 0, self.wrapper_tokens)

    def _layout(self, width, height):
        cols, rows = self.grid_for(width, height)
        views = _tile_views(self.tile, cols, rows)
        if len(views) == 1:
            return [replace(views[0], kind="global", fit="squash", tile=None, canvas=None)]
        if self.thumbnail:
            views.append(_square_view("thumbnail", self.tile, "squash"))
        return views

    def _render(self, img, views):
        cols, rows = self.grid_for(*img.size)
        canvas = img.resize((cols * self.tile, rows * self.tile), PIL.Image.BICUBIC)
        out = _tiles(canvas, self.tile, cols, rows)
        if len(views) > len(out):
            out.append(img.resize((self.tile, self.tile), PIL.Image.BICUBIC))
        return out


class Qwen2VL(Strategy):
    """Qwen2-VL native resolution: one view of ``smart_resize`` size; tokens = merged 2x2 patches.

    ``max_pixels`` defaults to transformers' class default (28*28*1280); the released checkpoints'
    ``preprocessor_config.json`` uses 12845056, so pass that to count tokens as a released checkpoint does
    (1920x1080 px: 1222 tokens with the class default, 2691 with the released value)."""

    name = "qwen2_vl"

    def __init__(self, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, **kw):
        super().__init__(**kw)
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def target(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` in px, multiples of 28, after ``smart_resize``."""
        h, w = smart_resize(height, width, ENCODE_FACTOR, self.min_pixels, self.max_pixels)
        return w, h

    def _count(self, width, height):
        w, h = self.target(width, height)
        n = (w // ENCODE_FACTOR) * (h // ENCODE_FACTOR)
        return TokenCount(n, n, 0, 0)

    def _layout(self, width, height):
        size = self.target(width, height)
        return [View("native", size, "native", size)]

    def _render(self, img, views):
        return [img]  # resampled once, to encode_size, by the processor


def _deepseek_q(side: int) -> int:
    """DeepSeek-OCR features per side: 16 px patches, then the 16x compressor (two stride-2 convs)."""
    return math.ceil((side // 16) / 4)


class DeepSeekOCR(Strategy):
    """DeepSeek-OCR native modes and Gundam, counted as the released inference code counts placeholders.

    Native: one ``base`` view, squashed (Tiny 512, Small 640) or ``ImageOps.pad``-ed with grey 127
    (Base 1024, Large 1280); tokens ``q(q+1) + 1`` with ``q = ceil((S//16)/4)``. Gundam: InternVL
    tiling with 2..``max_crops`` 640 tiles (no thumbnail; none when both sides are <= 640) before a
    padded 1024 global view; tokens ``q_b(q_b+1) + 1 + (r q_l)(c q_l + 1)``.
    """

    MODES = {
        # mode: (base_size, global fit, tile size or None)
        "tiny": (512, "squash", None),
        "small": (640, "squash", None),
        "base": (1024, "pad", None),
        "large": (1280, "pad", None),
        "gundam": (1024, "pad", 640),
    }

    def __init__(self, mode: str, *, max_crops: int = 6, min_crops: int = 2, **kw):
        super().__init__(**kw)
        if mode not in self.MODES:
            raise ValueError(f"unknown DeepSeek-OCR mode {mode!r}; choose from {sorted(self.MODES)}")
        if not 1 <= min_crops <= max_crops:
            raise ValueError(f"need 1 <= min_crops <= max_crops, got {min_crops} and {max_crops}")
        self.mode = mode
        self.name = f"deepseek_ocr_{mode}"
        self.base, self.fit, self.tile = self.MODES[mode]
        self.max_crops, self.min_crops = max_crops, min_crops

    def grid_for(self, width: int, height: int) -> tuple[int, int] | None:
        """Gundam ``(cols, rows)``, or None when there are no tiles."""
        if self.tile is None or (width <= self.tile and height <= self.tile):
            return None
        return closest_grid(width, height, target_ratios(self.min_crops, self.max_crops), self.tile)

    def _count(self, width, height):
        qb = _deepseek_q(self.base)
        content, newline = qb * qb, qb
        grid = self.grid_for(width, height)
        if grid is not None:
            cols, rows = grid
            ql = _deepseek_q(self.tile)
            content += rows * ql * cols * ql
            newline += rows * ql
        return TokenCount(content + newline + 1, content, newline, 1)

    def _layout(self, width, height):
        grid = self.grid_for(width, height)
        tiles = _tile_views(self.tile, *grid) if grid is not None else []
        return [*tiles, _square_view("global", self.base, self.fit)]

    def _render(self, img, views):
        out = []
        grid = self.grid_for(*img.size)
        if grid is not None:
            cols, rows = grid
            out = _tiles(
                img.resize((cols * self.tile, rows * self.tile), PIL.Image.BICUBIC), self.tile, cols, rows
            )
        if self.fit == "pad":
            out.append(PIL.ImageOps.pad(img, (self.base, self.base), color=DEEPSEEK_PAD_COLOR))
        else:
            out.append(img.resize((self.base, self.base), PIL.Image.BICUBIC))
        return out


# ---------------------------------------------------------------------------- registry and contract

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "llava15": Llava15,
    "llava_next": LlavaNext,
    "llava_onevision": LlavaOneVision,
    "internvl": InternVL,
    "qwen2_vl": Qwen2VL,
    **{f"deepseek_ocr_{m}": functools.partial(DeepSeekOCR, m) for m in DeepSeekOCR.MODES},
}
NAMES = tuple(STRATEGIES)


def get(name: str | Strategy, **options) -> Strategy:
    """A strategy by name, with options (e.g. ``get("internvl", max_tiles=6)``); a Strategy passes through."""
    if isinstance(name, Strategy):
        if options:
            raise ValueError(f"options {sorted(options)} given with an already built strategy {name!r}")
        return name
    if not isinstance(name, str):
        raise TypeError(f"strategy must be a name or a Strategy, got {type(name).__name__}")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(NAMES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError as e:
        raise TypeError(f"strategy {name!r}: {e}") from e


def num_tokens(name: str | Strategy, width: int, height: int, **options) -> int:
    """Language-model tokens (a python int) of a ``width x height`` px image under a strategy, counted
    as the system itself counts them (see the module docstring)."""
    return get(name, **options).num_tokens(width, height)


def count(name: str | Strategy, width: int, height: int, **options) -> TokenCount:
    """``num_tokens`` split into content, newline and special tokens."""
    return get(name, **options).count(width, height)


def plan(name: str | Strategy, image, **options) -> list[View]:
    """The views of ``image``, in the order the language model reads them.

    ``image``: a PIL image, an ``(H, W, 3)`` uint8 array, a path or a binary file object (read by
    ``nativevit.image.load_rgb``: a file's EXIF orientation is applied, as transformers applies it), or
    a ``(width, height)`` pair for geometry only. Each ``View.image`` is an RGB PIL image of
    ``View.size`` px (a native view: the original image), or None for a pair.
    """
    return get(name, **options).plan(image)


def parse_size(text: str) -> tuple[int, int] | None:
    """``"1920x1080"`` -> ``(1920, 1080)``; None when ``text`` is not a ``WxH`` size."""
    parts = text.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


__all__ = [
    "DeepSeekOCR",
    "InternVL",
    "Llava15",
    "LlavaNext",
    "LlavaOneVision",
    "NAMES",
    "Qwen2VL",
    "STRATEGIES",
    "Strategy",
    "TokenCount",
    "View",
    "count",
    "encode_side",
    "get",
    "num_tokens",
    "parse_size",
    "plan",
]
