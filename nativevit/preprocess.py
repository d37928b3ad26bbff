"""Qwen2-VL image preprocessing: smart_resize, PIL bicubic, rescale + CLIP normalisation, patchify.

Bit-for-bit the pipeline of transformers' ``Qwen2VLImageProcessorPil``: RGB (alpha composited onto
white) -> PIL bicubic resize of the uint8 image to ``smart_resize`` size -> ``x * (1/255)`` in float64,
cast to float32 -> ``(x - mean) / std`` in float32 -> patch rows in 2x2 merge-block order, the frame
duplicated over the temporal patch (T=2). Videos (lists of frames) are padded to a multiple of T by
repeating the last frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .packing import PackedBatch, cu_seqlens_from_grid

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, pixel count in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible.

    Rounding is exactly Qwen2-VL's: Python's half-to-even ``round`` first; if too large, floor after
    scaling down (never below ``factor``); if too small, ceil after scaling up.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width):.1f} for a {height}x{width} (HxW) image"
        )
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


class ImageProcessor:
    """Images (and videos) -> one ``PackedBatch``, with Qwen2-VL semantics.

    Args:
        min_pixels, max_pixels: pixel-count bounds of ``smart_resize`` (transformers' class defaults;
            the released checkpoints' ``preprocessor_config.json`` uses ``max_pixels=12845056``).
        patch_size, temporal_patch_size, merge_size: the tower's patching (14, 2, 2 for Qwen2-VL).
        image_mean, image_std: normalisation (OpenAI CLIP).
        pixel_cap: refuse any image whose resized size would exceed this many pixels.
        max_input_pixels: refuse inputs larger than this before decoding them (decompression bombs).
        strategy: None (Qwen2-VL native, the default) or a resolution strategy of
            ``nativevit.strategies`` (a name such as ``"llava_next"``, ``"internvl"``, or a
            ``Strategy``): each image becomes that strategy's views (global / tiles / native), each
            view one patch grid, and all views of all images pack into one batch; ``views_per_image``
            and ``split_views`` map them back. ``"qwen2_vl"`` gives the default output.

    Call with a list whose items are images (PIL image, ``HxWx3`` uint8 array, or a path) or videos
    (a list of such frames, or a ``TxHxWx3`` uint8 array). Output order is input order.
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
        max_input_pixels: int = 1 << 28,
        strategy=None,
    ):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.pixel_cap = pixel_cap
        self.max_input_pixels = max_input_pixels
        self.strategy = None
        if strategy is not None:
            from . import strategies

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
    # checkpoint gives), not transformers' class defaults (max_pixels 28*28*1280 for Qwen2-VL).

    @classmethod
    def qwen2_vl(cls, **overrides) -> ImageProcessor:
        """Qwen2-VL releases: 14-px patches (factor 28), 3136..12845056 pixels, OpenAI CLIP mean/std."""
        base = dict(min_pixels=56 * 56, max_pixels=16384 * 28 * 28, patch_size=14)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_5_vl(cls, **overrides) -> ImageProcessor:
        """Qwen2.5-VL releases: the same processor as Qwen2-VL."""
        return cls.qwen2_vl(**overrides)

    @classmethod
    def qwen3_vl(cls, **overrides) -> ImageProcessor:
        """Qwen3-VL releases: 16-px patches (factor 32), 65536..16777216 pixels, mean = std = 0.5."""
        base = dict(
            min_pixels=65536,
            max_pixels=16777216,
            patch_size=16,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            pixel_cap=16777216,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def for_model(cls, model_type: str, **overrides) -> ImageProcessor:
        """The preset of a tower family (``VisionConfig.model_type``)."""
        presets = {"qwen2_vl": cls.qwen2_vl, "qwen2_5_vl": cls.qwen2_5_vl, "qwen3_vl": cls.qwen3_vl}
        if model_type not in presets:
            raise ValueError(
                f"no ImageProcessor preset for model_type {model_type!r}; known: {sorted(presets)}"
            )
        return presets[model_type](**overrides)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    # ---------------------------------------------------------------- sizes

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized ``(height, width)`` of an input, with the pixel cap enforced."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if h * w > self.pixel_cap:
            raise ValueError(
                f"a {height}x{width} (HxW) image would be resized to {h}x{w} = {h * w} pixels, over the "
                f"pixel cap of {self.pixel_cap}; raise ImageProcessor(pixel_cap=...) to allow it"
            )
        return h, w

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of a single image of this size (tokens = product // 4)."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    # ---------------------------------------------------------------- loading

    def _load(self, image, where: str) -> np.ndarray:
        """Any accepted image -> ``HxWx3`` uint8 RGB array."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ValueError(f"{where}: no image file at {str(path)!r}")
            try:
                im = PIL.Image.open(path)
            except PIL.Image.DecompressionBombError as e:
                raise ValueError(f"{where}: {path} refused as a decompression bomb ({e})") from None
            with im:
                self._check_input_size(im.height, im.width, where)
                return _pil_to_rgb(im)
        if isinstance(image, PIL.Image.Image):
            self._check_input_size(image.height, image.width, where)
            return _pil_to_rgb(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"{where}: image arrays must be uint8 (0..255), got {image.dtype}")
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(
                    f"{where}: image arrays must have shape (H, W, 3) with 3 RGB channels, got "
                    f"{image.shape}; pass a PIL image for grayscale or RGBA input"
                )
            self._check_input_size(image.shape[0], image.shape[1], where)
            return image
        raise TypeError(
            f"{where}: expected a PIL image, an HxWx3 uint8 array or a path, got {type(image).__name__}"
        )

    def _check_input_size(self, height: int, width: int, where: str) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"{where}: image has zero size ({height}x{width}, HxW)")
        if height * width > self.max_input_pixels:
            raise ValueError(
                f"{where}: image is {height}x{width} = {height * width} pixels, over max_input_pixels="
                f"{self.max_input_pixels} (a decompression-bomb guard); raise it to allow such inputs"
            )

    # ---------------------------------------------------------------- pipeline

    def _resize_normalize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``HxWx3`` uint8 -> ``3xhxw`` float32, resized and normalised."""
        h, w = size
        resized = np.asarray(PIL.Image.fromarray(rgb).resize((w, h), resample=PIL.Image.BICUBIC))
        x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - self.image_mean) / self.image_std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def _patchify(self, frames: np.ndarray) -> np.ndarray:
        """``(F, 3, H, W)`` float32 frames, F a multiple of T -> ``(F/T * gh * gw, 3*T*P*P)`` rows."""
        n_frames, c, height, width = frames.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = n_frames // t, height // p, width // p
        x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
        # -> (gt, gh/m, gw/m, m_h, m_w, C, T, P_h, P_w): block-major rows, (C, T, P, P) features
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * t * p * p)

    def preprocess(
        self, item, where: str = "input"
    ) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int]]:
        """One image or video -> (patch rows, (t, h, w) grid, original (height, width))."""
        if isinstance(item, np.ndarray) and item.ndim == 4:
            frames = [item[i] for i in range(item.shape[0])]
        elif isinstance(item, (list, tuple)):
            frames = list(item)
        else:
            frames = [item]
        if not frames:
            raise ValueError(f"{where}: a video needs at least one frame")
        rgb = [
            self._load(f, f"{where} frame {i}" if len(frames) > 1 else where) for i, f in enumerate(frames)
        ]
        height, width = rgb[0].shape[:2]
        for i, r in enumerate(rgb[1:], 1):
            if r.shape[:2] != (height, width):
                raise ValueError(
                    f"{where}: all frames of a video must have one size; frame 0 is {height}x{width}, "
                    f"frame {i} is {r.shape[0]}x{r.shape[1]}"
                )
        size = self.target_size(height, width)
        normed = [self._resize_normalize(r, size) for r in rgb]
        t = self.temporal_patch_size
        normed += [normed[-1]] * (-len(normed) % t)  # a still image is its own second frame
        rows = self._patchify(np.stack(normed))
        grid = (len(normed) // t, size[0] // self.patch_size, size[1] // self.patch_size)
        return rows, grid, (height, width)

    def __call__(self, images) -> PackedBatch:
        if isinstance(images, (PIL.Image.Image, str, Path)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        ):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"expected a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("empty image list: nothing to encode")
        if self.strategy is not None:
            return self._pack_views(images)
        rows, grids, sizes = [], [], []
        for i, item in enumerate(images):
            r, g, s = self.preprocess(item, where=f"images[{i}]")
            rows.append(r)
            grids.append(g)
            sizes.append(s)
        return self._packed(rows, grids, sizes)

    def _packed(self, rows, grids, sizes, views_per_image=None) -> PackedBatch:
        """Patch rows and ``(t, h, w)`` grids of every image (or view) -> one ``PackedBatch``."""
        grid_thw = torch.tensor(grids, dtype=torch.int64)
        return PackedBatch(
            pixel_values=torch.from_numpy(np.concatenate(rows)),
            grid_thw=grid_thw,
            cu_seqlens=cu_seqlens_from_grid(grid_thw),
            max_seqlen=max(h * w for _, h, w in grids),
            image_sizes=sizes,
            spatial_merge_size=self.merge_size,
            views_per_image=views_per_image,
        )

    def _pack_views(self, images) -> PackedBatch:
        """Each image -> its strategy's views, each resampled to its encode size; all views packed."""
        rows, grids, sizes, counts = [], [], [], []
        for i, item in enumerate(images):
            where = f"images[{i}]"
            if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
                raise TypeError(f"{where}: strategy {self.strategy.name!r} takes still images, not videos")
            rgb = self._load(item, where)
            try:
                views = self.strategy.plan(rgb)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            for v in views:
                w, h = v.encode_size
                if w * h > self.pixel_cap:
                    raise ValueError(
                        f"{where}: a {v.kind} view of {w}x{h} (WxH) px is over the pixel cap {self.pixel_cap}"
                    )
                normed = self._resize_normalize(np.asarray(v.image), (h, w))
                rows.append(self._patchify(np.stack([normed] * self.temporal_patch_size)))
                grids.append((1, h // self.patch_size, w // self.patch_size))
            sizes.append(rgb.shape[:2])
            counts.append(len(views))
        return self._packed(rows, grids, sizes, views_per_image=counts)


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """RGB array of a PIL image; transparency is composited onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
