"""Qwen2-VL image preprocessing: smart_resize, PIL bicubic, rescale + normalisation, patchify.

Bit-for-bit the pipeline of transformers' ``Qwen2VLImageProcessorPil``: RGB (``nativevit.image``: files
decoded as transformers decodes a path, EXIF orientation included) -> PIL bicubic resize of the uint8
image to ``smart_resize`` size -> ``x * (1/255)`` in float64, cast to float32 -> ``(x - mean) / std``
in float32 -> patch rows in 2x2 merge-block order, the frame duplicated over the temporal patch (T=2).
Videos (lists of frames) are padded to a multiple of T by repeating the last frame.

A call runs in two passes. The first reads every input's size (a file's header only, no pixel decoded),
applies every size rule (zero size, ``max_input_pixels``, aspect ratio, ``pixel_cap``, the per-call
budget ``max_patches_per_call``) and sizes the output. The second decodes, resizes and normalises one
frame at a time straight into that preallocated ``pixel_values``: a uint8 value has 256 possible
normalised values per channel, so normalising is a table look-up with the exact float32 results of the
arithmetic above, and no float copy of a whole image or video is ever made. The peak memory of a call
is about its output plus one decoded frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from . import strategies
from .config import FAMILIES
from .config import family as config_family
from .image import (
    DEFAULT_MAX_INPUT_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_aspect_ratio,
    describe,
    header_size,
    is_file,
    load_rgb,
    rewindable,
    smart_resize,
)
from .packing import PackedBatch, cu_seqlens_from_grid

# Patch rows one call may produce, over all its images, videos and views. 2**18 rows of a 14-px
# tower are 2**18 * 1176 float32 values = 1.15 GiB of pixel_values (1.5 GiB with 16-px patches);
# that is four images at the released checkpoints' largest size (65536 patches each), while a 64-frame
# 1920x1080 video at that size (344448 rows, 1.5 GiB) is refused before anything is decoded.
DEFAULT_MAX_PATCHES_PER_CALL = 1 << 18


def _int_setting(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "a positive int or None" if allow_none else "a positive int"
        raise TypeError(f"ImageProcessor {name} must be {kind}, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"ImageProcessor {name} must be a positive int, got {value}")


def _channel_setting(name: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ImageProcessor {name} must be 3 numbers (R, G, B), got {value!r}") from e
    if arr.shape != (3,):
        raise ValueError(f"ImageProcessor {name} needs one value per RGB channel, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"ImageProcessor {name} must be finite as float32, got {arr.tolist()}")
    return arr


@dataclass
class _Plan:
    """One input of a call as read from its header: where it is, its frames, its size, its rows."""

    where: str
    frames: list
    size: tuple[int, int]  # (height, width) in px, before resizing
    rows: int  # patch rows it is expected to produce


class _Rows:
    """The preallocated ``(rows, width)`` float32 output, handed out in consecutive slices.

    The first pass sizes it from the inputs' headers. A file that decodes to another size than its
    header said (a file changed between the passes, or an EXIF block after a PNG's pixel data) makes
    its own slice: the buffer grows, within the budget."""

    def __init__(self, rows: int, width: int, budget: int | None):
        self.buffer = np.empty((rows, width), dtype=np.float32)
        self.used = 0
        self.budget = budget

    def take(self, n: int, where: str) -> np.ndarray:
        end = self.used + n
        if self.budget is not None and end > self.budget:
            raise ValueError(
                f"{where}: decoded to a larger size than its header said; the call now needs {end} patch "
                f"rows, over max_patches_per_call={self.budget}"
            )
        if end > len(self.buffer):
            grown = np.empty((end, self.buffer.shape[1]), dtype=np.float32)
            grown[: self.used] = self.buffer[: self.used]
            self.buffer = grown
        out = self.buffer[self.used : end]
        self.used = end
        return out

    def result(self) -> np.ndarray:
        if self.used == len(self.buffer):
            return self.buffer
        return self.buffer[: self.used].copy()


def _smart_resize(height: int, width: int, proc: ImageProcessor) -> tuple[int, int]:
    return smart_resize(height, width, proc.factor, proc.min_pixels, proc.max_pixels)


def _longest_edge(height: int, width: int, proc: ImageProcessor) -> tuple[int, int]:
    """Pixtral's rule: scale down (never up) to fit a ``longest_edge`` square (option, default 1024),
    flooring each side, then round each side up to a multiple of ``factor``."""
    longest = proc.resize_options.get("longest_edge", 1024)
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    f = proc.factor
    return -(-height // f) * f, -(-width // f) * f


def _naflex(height: int, width: int, proc: ImageProcessor) -> tuple[int, int]:
    """SigLIP2 NaFlex's rule: the largest scale (bisected in floats down to 1e-5, as transformers'
    ``get_image_size_for_max_num_patches`` does) at which both sides, each rounded up to a multiple of
    ``factor`` (at least one), give at most ``max_num_patches`` patches (option, default 256)."""
    budget = proc.resize_options.get("max_num_patches", 256)
    f = proc.factor

    def sides(scale: float) -> tuple[int, int]:
        return tuple(max(f, math.ceil(n * scale / f) * f) for n in (height, width))

    eps = 1e-5
    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        h, w = sides(mid)
        if (h / f) * (w / f) <= budget:
            lo = mid
        else:
            hi = mid
    return sides(lo)


def _paddleocr_vl_resize(height: int, width: int, proc: ImageProcessor) -> tuple[int, int]:
    """PaddleOCR-VL's rule: a side shorter than ``factor`` (option, default the processor's; 28 for the
    release, whose merge happens in the projector) is first scaled up to it, the other side scaled
    alike and rounded, then Qwen2-VL's ``smart_resize`` at that factor."""
    f = proc.resize_options.get("factor", proc.factor)
    if height < f:
        height, width = f, round(width * f / height)
    if width < f:
        height, width = round(height * f / width), f
    return smart_resize(height, width, f, proc.min_pixels, proc.max_pixels)


def _glm_resize(height: int, width: int, proc: ImageProcessor) -> tuple[int, int]:
    """GLM-4V's ``smart_resize``: a side shorter than ``factor`` first scales the image up (truncating
    both sides), then Qwen's rounding, except that the pixel bounds count the ``temporal_patch_size``
    frames an image is repeated over (``T * h * w`` against ``min_pixels`` / ``max_pixels``)."""
    f, t = proc.factor, proc.temporal_patch_size
    if height < f or width < f:
        scale = max(f / height, f / width)
        height, width = int(height * scale), int(width * scale)
    check_aspect_ratio(width, height)
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if t * h_bar * w_bar > proc.max_pixels:
        beta = math.sqrt((t * height * width) / proc.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif t * h_bar * w_bar < proc.min_pixels:
        beta = math.sqrt(proc.min_pixels / (t * height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return h_bar, w_bar


def _navit(height: int, width: int, proc: ImageProcessor) -> tuple[int, int, int, int]:
    """Kimi-K2.5's rule (``navit_resize``): scale down (never up) to at most ``max_patches`` patches
    (option, default 16384) and ``max_size_per_side`` patches a side (option, default 512), truncating
    each side; the image is resized to that and zero-padded (bottom, right) to multiples of ``factor``.
    Returns the padded ``(h, w)`` and the resized ``(content_h, content_w)``."""
    p, f = proc.patch_size, proc.factor
    budget = proc.resize_options.get("max_patches", 16384)
    side = proc.resize_options.get("max_size_per_side", 512)
    patches = max(1.0, height // p) * max(1.0, width // p)
    scale = min(1.0, math.sqrt(budget / patches), side * p / height, side * p / width)
    h = min(max(1, int(height * scale)), side * p)
    w = min(max(1, int(width * scale)), side * p)
    return -(-h // f) * f, -(-w // f) * f, h, w


def _torch_bicubic(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's antialiased bicubic resize of the uint8 image itself (transformers' torchvision backend:
    ``tvF.resize`` runs ``F.interpolate(mode="bicubic", antialias=True)`` natively on uint8 on the CPU)."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W)
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _torch_bilinear(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's antialiased bilinear resize of the uint8 image itself (SigLIP2's torchvision processor)."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W)
    out = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# The resize filters, by name: PIL's, or a function ``(rgb, (h, w)) -> rgb`` ("bicubic_torch": torch's
# uint8 antialiased bicubic, Kimi-K2.5's torchvision processor; "bilinear_torch": the same in bilinear,
# SigLIP2's torchvision processor).
RESAMPLE = {
    "bicubic": PIL.Image.BICUBIC,
    "bilinear": PIL.Image.BILINEAR,
    "bicubic_torch": _torch_bicubic,
    "bilinear_torch": _torch_bilinear,
}

# How uint8 values are normalised: "rescale" (``v * (1/255)`` in float64, cast to float32, then
# ``(x - mean) / std`` in float32: the PIL processors) or "fused" (``(v - mean * 255) / (std * 255)`` in
# float32: transformers' torchvision backend, which folds the rescale into mean and std).
NORMALIZE = ("rescale", "fused")

# How a patch is flattened into its row; the axes that take a strip of merge blocks, read as
# (m_h, P_h, block, m_w, P_w, channel), to one temporal slot of the rows (block, m_h, m_w, ...).
ROW_LAYOUTS = ("ctpp", "tppc")
_STRIP_AXES = {"ctpp": (2, 0, 3, 5, 1, 4), "tppc": (2, 0, 3, 1, 4, 5)}

# How a family sizes an image: name -> (height, width, processor) -> (h, w) in px, multiples of the
# processor's ``factor``; a rule reads the processor's settings (``resize_options`` for its own).
# "smart": Qwen2-VL's ``smart_resize`` between ``min_pixels`` and ``max_pixels``; "longest_edge": Pixtral's;
# "naflex": SigLIP2's, at most ``resize_options["max_num_patches"]`` patches.
RESIZE_RULES: dict[str, Callable[[int, int, ImageProcessor], tuple[int, int]]] = {
    "smart": _smart_resize,
    "longest_edge": _longest_edge,
    "naflex": _naflex,
    "paddleocr_vl": _paddleocr_vl_resize,
    "navit": _navit,
    "glm": _glm_resize,
}


class ImageProcessor:
    """Images (and videos) -> one ``PackedBatch``, with Qwen2-VL semantics.

    Args:
        min_pixels, max_pixels: pixel-count bounds of ``smart_resize`` (transformers' class defaults;
            the released checkpoints' ``preprocessor_config.json`` uses ``max_pixels=12845056``).
        patch_size, temporal_patch_size, merge_size: the tower's patching (14, 2, 2 for Qwen2-VL).
        image_mean, image_std: normalisation, 3 values each (OpenAI CLIP); finite, ``image_std > 0``.
        pixel_cap: refuse any image whose resized size would exceed this many pixels.
        max_input_pixels: refuse inputs larger than this before decoding them (decompression bombs);
            None: no limit.
        max_patches_per_call: refuse a call whose output would have more patch rows than this
            (``DEFAULT_MAX_PATCHES_PER_CALL`` = 262144, about 1.15 GiB of float32 ``pixel_values`` with
            14-px patches), before anything is decoded; None: no limit.
        resize: how images are sized, a name in ``RESIZE_RULES`` ("smart": Qwen2-VL's
            ``smart_resize``); ``resize_options``: that rule's own settings (a dict).
        resample: the PIL filter of the resize, a name in ``RESAMPLE`` ("bicubic": Qwen; "bilinear":
            SigLIP2).
        normalize: how uint8 values are normalised, one of ``NORMALIZE`` ("rescale": the PIL processors;
            "fused": transformers' torchvision backend). ``clip_frames``: cut videos into clips of this
            many frames, each its own grid (Kimi-K2.5: 4), ``views_per_image`` mapping them back; None:
            one grid per video.
        row_layout: how a patch is flattened into its row, one of ``ROW_LAYOUTS``: "ctpp" (channel,
            time, row, column: the Conv3d towers) or "tppc" (time, row, column, channel: SigLIP2's
            linear patch embedding over ``(P, P, C)`` patches).
        strategy: None (Qwen2-VL native, the default) or a resolution strategy of
            ``nativevit.strategies`` (a name such as ``"llava_next"``, ``"internvl"``, or a
            ``Strategy``): each image becomes that strategy's views (global / tiles / native), each
            view one patch grid, and all views of all images pack into one batch; ``views_per_image``
            and ``split_views`` map them back. ``"qwen2_vl"`` gives the default output.

    Every setting is checked here: a wrong type is a ``TypeError``, a wrong value a ``ValueError``,
    each naming the setting.

    Call with a list whose items are images (a path, a binary file object, a PIL image, or an
    ``(H, W, 3)`` uint8 array; read by ``nativevit.image``) or videos (a list of such frames, or an
    ``(F, H, W, 3)`` uint8 array). Output order is input order. Errors name the input
    (``images[3]``, ``images[3] frame 7``) and the file's path.
    """

    def __init__(
        self,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        *,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        pixel_cap: int = 16384 * 28 * 28,
        max_input_pixels: int | None = DEFAULT_MAX_INPUT_PIXELS,
        max_patches_per_call: int | None = DEFAULT_MAX_PATCHES_PER_CALL,
        resize: str = "smart",
        resize_options: dict | None = None,
        strategy=None,
        resample: str = "bicubic",
        row_layout: str = "ctpp",
        normalize: str = "rescale",
        clip_frames: int | None = None,
    ):
        for name, value in (
            ("min_pixels", min_pixels),
            ("max_pixels", max_pixels),
            ("patch_size", patch_size),
            ("temporal_patch_size", temporal_patch_size),
            ("merge_size", merge_size),
            ("pixel_cap", pixel_cap),
        ):
            _int_setting(name, value)
        _int_setting("max_input_pixels", max_input_pixels, allow_none=True)
        _int_setting("max_patches_per_call", max_patches_per_call, allow_none=True)
        if not min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = _channel_setting("image_mean", image_mean)
        self.image_std = _channel_setting("image_std", image_std)
        if not (self.image_std > 0).all():
            raise ValueError(
                f"ImageProcessor image_std must be > 0 per channel, got {self.image_std.tolist()}"
            )
        _int_setting("clip_frames", clip_frames, allow_none=True)
        self.clip_frames = clip_frames
        if normalize not in NORMALIZE:
            raise ValueError(f"ImageProcessor normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        self._table()  # refuses a mean/std pair whose normalised values overflow float32
        if resize not in RESIZE_RULES:
            raise ValueError(f"ImageProcessor resize must be one of {sorted(RESIZE_RULES)}, got {resize!r}")
        if resize_options is not None and not isinstance(resize_options, dict):
            raise TypeError(
                f"ImageProcessor resize_options must be a dict, got {type(resize_options).__name__}"
            )
        self.resize = resize
        self.resize_options = dict(resize_options or {})
        if resample not in RESAMPLE:
            raise ValueError(f"ImageProcessor resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        if row_layout not in ROW_LAYOUTS:
            raise ValueError(f"ImageProcessor row_layout must be one of {ROW_LAYOUTS}, got {row_layout!r}")
        self.resample = resample
        self.row_layout = row_layout
        self.pixel_cap = pixel_cap
        self.max_input_pixels = max_input_pixels
        self.max_patches_per_call = max_patches_per_call
        self.strategy = None
        if strategy is not None:
            if self.factor != strategies.ENCODE_FACTOR:
                raise ValueError(
                    f"resolution strategies make views of multiples of {strategies.ENCODE_FACTOR} px; "
                    f"this processor's patch_size*merge_size is {self.factor}"
                )
            opts = {"max_input_pixels": max_input_pixels}
            if strategy == "qwen2_vl":
                opts.update(min_pixels=min_pixels, max_pixels=max_pixels)
            self.strategy = strategies.get(strategy, **(opts if isinstance(strategy, str) else {}))

    # ---------------------------------------------------------------- family presets
    # Each family's released ``preprocessor_config.json`` (what ``from_pretrained`` of an official
    # checkpoint gives), not transformers' class defaults (max_pixels 28*28*1280 for Qwen2-VL), as
    # the family table of ``nativevit.config`` lists them.

    @classmethod
    def for_model(cls, model_type: str, **overrides) -> ImageProcessor:
        """The preset of a tower family: ``nativevit.config.family(model_type).processor``, with
        ``overrides`` on top. ``model_type`` is a family ("qwen2_vl"), a release's ``model_type``
        ("qwen3_vl_moe") or a tower's ("qwen2_5_vl_vision"); others raise ``ValueError`` listing the
        known ones."""
        try:
            fam = config_family(model_type)
        except ValueError:
            known = sorted({t for f in FAMILIES.values() for t in (f.name, *f.model_types)})
            raise ValueError(
                f"no ImageProcessor preset for model_type {model_type!r}; known: {known} "
                "(and each with a '_vision' suffix)"
            ) from None
        return cls(**{**fam.processor, **overrides})

    @classmethod
    def qwen2_vl(cls, **overrides) -> ImageProcessor:
        """Qwen2-VL releases: 14-px patches (factor 28), 3136..12845056 pixels, OpenAI CLIP mean/std."""
        return cls.for_model("qwen2_vl", **overrides)

    @classmethod
    def qwen2_5_vl(cls, **overrides) -> ImageProcessor:
        """Qwen2.5-VL releases: the same processor as Qwen2-VL."""
        return cls.for_model("qwen2_5_vl", **overrides)

    @classmethod
    def qwen3_vl(cls, **overrides) -> ImageProcessor:
        """Qwen3-VL releases: 16-px patches (factor 32), 65536..16777216 pixels, mean = std = 0.5."""
        return cls.for_model("qwen3_vl", **overrides)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def row_width(self) -> int:
        """Values per patch row: ``3 * temporal_patch_size * patch_size**2`` (1176 for Qwen2-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    # ---------------------------------------------------------------- sizes

    def target_size(self, height: int, width: int, *, where: str = "") -> tuple[int, int]:
        """``(height, width)`` in px, multiples of ``factor``, that a ``height x width`` input is resized
        to (``smart_resize``); ``ValueError`` (naming ``where``) for an aspect ratio over 200 or a
        result over ``pixel_cap`` pixels."""
        check_aspect_ratio(width, height, where=where)
        h, w = RESIZE_RULES[self.resize](height, width, self)[:2]
        if h * w > self.pixel_cap:
            raise ValueError(
                f"{where}{': ' if where else ''}a {height}x{width} (HxW) image would be resized to "
                f"{h}x{w} = {h * w} pixels, over the pixel cap of {self.pixel_cap}; raise "
                "ImageProcessor(pixel_cap=...) to allow it"
            )
        return h, w

    def tower_views(self, images, *, tower=None, patch_size=None, image_mean=None, image_std=None):
        """This processor's strategy views in the form a CLIP / SigLIP / InternViT tower takes: normalised
        ``(3, H, W)`` float32 images, the tower's patch size and mean/std (``tower``: an encoder from
        ``nv.from_transformers``), returned as ``nativevit.integrations.TowerViews`` (``.images``,
        ``.split``). Needs ``ImageProcessor(strategy=...)``."""
        if self.strategy is None:
            raise ValueError("tower_views needs ImageProcessor(strategy=...)")
        from .integrations.views import tower_views

        return tower_views(
            images,
            self.strategy,
            tower=tower,
            patch_size=patch_size,
            image_mean=image_mean,
            image_std=image_std,
        )

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """``(1, h, w)`` patch grid of a still image of ``height x width`` px: ``h * w`` patch rows, and
        ``h * w // merge_size**2`` output tokens."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    # ---------------------------------------------------------------- pixels

    def _table(self) -> np.ndarray:
        """``(3 * 256,)`` float32: entry ``256 * c + v`` is channel ``c``'s normalised value of the uint8
        value ``v``, computed exactly as transformers does (``v * (1/255)`` in float64, cast to float32,
        then ``(x - mean) / std`` in float32)."""
        unit = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        if self.normalize == "fused":
            unit = np.arange(256, dtype=np.float32)
            scale = np.float32(1.0 / (1 / 255))
            mean, std = mean * scale, std * scale
        with np.errstate(over="ignore"):
            table = ((unit[None, :] - mean) / std).reshape(-1)
        if not np.isfinite(table).all():
            raise ValueError(
                f"ImageProcessor image_mean {mean.ravel().tolist()} and image_std {std.ravel().tolist()} "
                "give normalised values that overflow float32"
            )
        return table

    def _resize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8, ``(h, w) = size``, with the ``resample`` filter;
        a resize rule that pads (Kimi-K2.5's) resizes to its content size and zero-pads to ``size``."""
        h, w = size
        sizes = RESIZE_RULES[self.resize](*rgb.shape[:2], self)
        # a rule that pads gives the resized size too; only for the size it chose (not strategy views)
        content = tuple(sizes[2:]) if len(sizes) == 4 and tuple(sizes[:2]) == (h, w) else (h, w)
        resample = RESAMPLE[self.resample]
        if callable(resample):
            resized = resample(rgb, content)
        else:
            resized = np.asarray(PIL.Image.fromarray(rgb).resize(content[::-1], resample=resample))
        if content == (h, w):
            return resized
        canvas = np.zeros((h, w, 3), dtype=np.uint8)  # zero pixels, normalised like any other
        canvas[: content[0], : content[1]] = resized
        return canvas

    def _resize_normalize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` float32 with ``(h, w) = size``, resized and normalised."""
        resized = self._resize(rgb, size)
        x = self._table().take(resized.astype(np.intp) + np.arange(0, 768, 256))
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def _normalize_into(self, resized: np.ndarray, dest: np.ndarray, table: np.ndarray) -> None:
        """Write the ``(h, w, 3)`` uint8 frame ``resized``, normalised, into ``dest``: a
        ``(h/(m*P), w/(m*P), m, m, 3, P, P)`` ("ctpp") or ``(h/(m*P), w/(m*P), m, m, P, P, 3)`` ("tppc")
        float32 view of the output (one temporal slot of the frame's patch rows), one strip of merge
        blocks at a time."""
        p, m = self.patch_size, self.merge_size
        strip = m * p
        offsets = np.arange(0, 768, 256)
        for r in range(dest.shape[0]):
            idx = resized[r * strip : (r + 1) * strip].astype(np.intp)
            idx += offsets
            vals = table.take(idx)  # (m*P, w, 3): rows (m_h, P_h), cols (block, m_w, P_w), channel
            vals = vals.reshape(m, p, dest.shape[1], m, p, 3)
            dest[r] = vals.transpose(_STRIP_AXES[self.row_layout])

    def _fill(
        self, dest: np.ndarray, load: Callable[[int], np.ndarray], n_frames: int, size: tuple[int, int]
    ) -> None:
        """Resize and normalise frames ``load(0) .. load(n_frames - 1)`` (each ``(H, W, 3)`` uint8, one
        size) to ``size = (h, w)`` px, one at a time, into ``dest``, their ``(t * h/P * w/P, row_width)``
        float32 rows; the last temporal patch is filled up by repeating the last frame."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = size
        gt = -(-n_frames // t)
        grid = (gt, h // (m * p), w // (m * p), m, m)
        if self.row_layout == "ctpp":
            blocks = dest.reshape(*grid, 3, t, p, p).swapaxes(5, 6)  # (..., t, 3, p, p) view
        else:
            blocks = dest.reshape(*grid, t, p, p, 3)
        table = self._table()
        for f in range(n_frames):
            rgb = load(f)
            q, slot = divmod(f, t)
            self._normalize_into(self._resize(rgb, size), blocks[q, :, :, :, :, slot], table)
            del rgb
        q, last = divmod(n_frames - 1, t)
        for slot in range(last + 1, t):  # a still image is its own second frame
            blocks[q, :, :, :, :, slot] = blocks[q, :, :, :, :, last]

    # ---------------------------------------------------------------- pipeline

    def _frames(self, item, where: str) -> list:
        if isinstance(item, np.ndarray) and item.ndim == 4:
            frames = [item[i] for i in range(item.shape[0])]
        elif isinstance(item, (list, tuple)):
            frames = [rewindable(f) for f in item]
        else:
            frames = [rewindable(item)]
        if not frames:
            raise ValueError(f"{where}: a video needs at least one frame")
        return frames

    @staticmethod
    def _frame_where(where: str, frames: list, i: int) -> str:
        return f"{where} frame {i}" if len(frames) > 1 else where

    def _plan(self, item, where: str) -> _Plan:
        """Header pass of one image or video: frames, input size, expected rows; every size rule."""
        frames = self._frames(item, where)
        sizes = [
            header_size(f, max_input_pixels=self.max_input_pixels, where=self._frame_where(where, frames, i))
            for i, f in enumerate(frames)
        ]
        width, height = sizes[0]
        for i, (w, h) in enumerate(sizes[1:], 1):
            if (w, h) != (width, height):
                raise ValueError(
                    f"{describe(frames[i], self._frame_where(where, frames, i))}: all frames of a video "
                    f"must have one size; frame 0 is {height}x{width}, frame {i} is {h}x{w} (HxW)"
                )
        th, tw = self.target_size(height, width, where=describe(frames[0], where))
        t = -(-len(frames) // self.temporal_patch_size)
        return _Plan(where, frames, (height, width), t * (th // self.patch_size) * (tw // self.patch_size))

    def _check_budget(self, plans: list[_Plan]) -> None:
        total = sum(p.rows for p in plans)
        budget = self.max_patches_per_call
        if budget is None or total <= budget:
            return
        big = max(plans, key=lambda p: p.rows)
        h, w = big.size
        frames = f"{len(big.frames)} frames of " if len(big.frames) > 1 else ""
        gib = total * self.row_width * 4 / 2**30
        raise ValueError(
            f"this call asks for {total} patch rows ({gib:.2f} GiB of float32 pixel_values) from "
            f"{len(plans)} input(s), over max_patches_per_call={budget}; the largest is {big.where} "
            f"({frames}{h}x{w} px, HxW: {big.rows} rows). Nothing was decoded: split the call, lower "
            "max_pixels, or raise ImageProcessor(max_patches_per_call=...)"
        )

    def _encode(self, plan: _Plan, out: _Rows) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """Decode pass of one planned input into ``out``: its grid and its decoded ``(height, width)``."""
        frames, where = plan.frames, plan.where

        def load(i: int) -> np.ndarray:
            at = self._frame_where(where, frames, i)
            rgb = load_rgb(frames[i], max_input_pixels=self.max_input_pixels, where=at)
            if i and rgb.shape != (height, width, 3):
                raise ValueError(
                    f"{describe(frames[i], at)}: all frames of a video must have one size; frame 0 is "
                    f"{height}x{width}, frame {i} is {rgb.shape[0]}x{rgb.shape[1]} (HxW)"
                )
            return rgb

        decoded = [load(0)]  # frame 0 tells the size; _fill takes it from here, so it is not kept
        height, width = decoded[0].shape[:2]
        size = self.target_size(height, width, where=describe(frames[0], where))
        t = -(-len(frames) // self.temporal_patch_size)
        grid = (t, size[0] // self.patch_size, size[1] // self.patch_size)
        dest = out.take(math.prod(grid), where)
        self._fill(dest, lambda i: decoded.pop() if i == 0 else load(i), len(frames), size)
        return grid, (height, width)

    def preprocess(
        self, item, where: str = "input"
    ) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int]]:
        """One image or video -> ``(rows, grid, size)``.

        ``rows``: ``(t * h * w, 3 * T * P * P)`` float32 numpy array (``T = temporal_patch_size``,
        ``P = patch_size``), patches in merge-block order; ``grid``: ``(t, h, w)``, with ``t`` the number
        of frames (padded to a multiple of ``T``) divided by ``T``; ``size``: the input's ``(height, width)``
        in px. ``where`` names the item in error messages. The call budget applies.
        """
        plan = self._plan(item, where)
        self._check_budget([plan])
        out = _Rows(plan.rows, self.row_width, self.max_patches_per_call)
        grid, size = self._encode(plan, out)
        return out.result(), grid, size

    def __call__(self, images) -> PackedBatch:
        """A list of images and videos (or one image) -> one ``PackedBatch``, in input order.

        ``pixel_values``: ``(N, 3 * T * P * P)`` float32 (``N`` = sum of ``t * h * w``); ``grid_thw``:
        ``(B, 3)`` int64, one row per image, or per view with a strategy (``views_per_image`` then maps
        views back to images); ``cu_seqlens``: ``(S + 1,)`` int32, one segment per temporal patch (one
        per still image or view); ``max_seqlen``: python int; ``image_sizes``: ``(height, width)`` of each
        input. Size rules and the ``max_patches_per_call`` budget are applied to every input's header
        before anything is decoded.
        """
        if (
            isinstance(images, PIL.Image.Image)
            or is_file(images)
            or (isinstance(images, np.ndarray) and images.ndim == 3)
        ):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"expected a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("empty image list: nothing to encode")
        if self.strategy is not None:
            return self._pack_views(images)
        items, counts = [], []
        for i, item in enumerate(images):
            clips = self._clips(item)
            where = (
                [f"images[{i}]"] if len(clips) == 1 else [f"images[{i}] clip {j}" for j in range(len(clips))]
            )
            items += zip(clips, where)
            counts.append(len(clips))
        plans = [self._plan(item, where) for item, where in items]
        self._check_budget(plans)
        out = _Rows(sum(p.rows for p in plans), self.row_width, self.max_patches_per_call)
        grids, sizes = [], []
        for plan in plans:
            grid, size = self._encode(plan, out)
            grids.append(grid)
            sizes.append(size)
        if all(n == 1 for n in counts):
            return self._packed(out.result(), grids, sizes)
        firsts = np.cumsum([0, *counts[:-1]])
        return self._packed(out.result(), grids, [sizes[j] for j in firsts], views_per_image=counts)

    def _clips(self, item) -> list:
        """``item`` cut into clips of ``clip_frames`` frames when it is a video and the processor cuts
        videos (Kimi-K2.5: clips of 4 frames, each its own grid), else ``[item]``."""
        if not self.clip_frames:
            return [item]
        if isinstance(item, np.ndarray) and item.ndim == 4:
            frames = list(item)
        elif isinstance(item, (list, tuple)):
            frames = list(item)
        else:
            return [item]
        c = self.clip_frames
        return [frames[i : i + c] for i in range(0, len(frames), c)] or [item]

    def _packed(self, rows: np.ndarray, grids, sizes, views_per_image=None) -> PackedBatch:
        """``(N, row_width)`` float32 patch rows and the ``(t, h, w)`` grids of every image (or view) ->
        one ``PackedBatch`` (the rows are shared, not copied)."""
        grid_thw = torch.tensor(grids, dtype=torch.int64)
        return PackedBatch(
            pixel_values=torch.from_numpy(rows),
            grid_thw=grid_thw,
            cu_seqlens=cu_seqlens_from_grid(grid_thw),
            max_seqlen=max(h * w for _, h, w in grids),
            image_sizes=sizes,
            spatial_merge_size=self.merge_size,
            views_per_image=views_per_image,
        )

    def _views_plan(self, item, where: str) -> _Plan:
        """Header pass of one image under the strategy: its views' rows; every size rule."""
        if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
            raise TypeError(f"{where}: strategy {self.strategy.name!r} takes still images, not videos")
        item = rewindable(item)
        label = describe(item, where)
        width, height = header_size(item, max_input_pixels=self.max_input_pixels, where=where)
        try:
            views = self.strategy.layout(width, height)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        for v in views:
            self._check_view(v, label)
        return _Plan(where, [item], (height, width), sum(v.num_patches for v in views))

    def _check_view(self, view, label: str) -> None:
        w, h = view.encode_size
        if w * h > self.pixel_cap:
            raise ValueError(
                f"{label}: a {view.kind} view of {w}x{h} (WxH) px is over the pixel cap {self.pixel_cap}"
            )

    def _pack_views(self, images) -> PackedBatch:
        """Each image -> its strategy's views, each resampled to its encode size; all views packed."""
        plans = [self._views_plan(item, f"images[{i}]") for i, item in enumerate(images)]
        self._check_budget(plans)
        out = _Rows(sum(p.rows for p in plans), self.row_width, self.max_patches_per_call)
        grids, sizes, counts = [], [], []
        for plan in plans:
            (item,), label = plan.frames, describe(plan.frames[0], plan.where)
            rgb = load_rgb(item, max_input_pixels=self.max_input_pixels, where=plan.where)
            try:
                views = self.strategy.plan(rgb)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
            for v in views:
                self._check_view(v, label)
                w, h = v.encode_size
                dest = out.take(v.num_patches, label)
                self._fill(dest, lambda _, v=v: np.asarray(v.image), 1, (h, w))
                grids.append(v.grid)
            sizes.append(rgb.shape[:2])
            counts.append(len(views))
        return self._packed(out.result(), grids, sizes, views_per_image=counts)


__all__ = ["DEFAULT_MAX_PATCHES_PER_CALL", "ImageProcessor", "smart_resize"]
