"""Qwen2-VL image preprocessing: smart_resize, PIL bicubic, rescale + CLIP normalisation, patchify.

Bit-for-bit the pipeline of transformers' ``Qwen2VLImageProcessorPil``: RGB (alpha composited onto
white) -> PIL bicubic resize of the uint8 image to ``smart_resize`` size -> ``x * (1/255)`` in float64,
cast to float32 -> ``(x - mean) / std`` in float32 -> patch rows in 2x2 merge-block order, the frame
duplicated over the temporal patch (T=2). Videos (lists of frames) are padded to a multiple of T by
repeating the last frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import strategies
from .image import DEFAULT_MAX_INPUT_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_rgb, smart_resize
from .packing import PackedBatch, cu_seqlens_from_grid


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

    Call with a list whose items are images (PIL image, ``(H, W, 3)`` uint8 array, or a path; loaded by
    ``nativevit.image.load_rgb``) or videos (a list of such frames, or an ``(F, H, W, 3)`` uint8 array).
    Output order is input order.
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
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
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
        """``(height, width)`` in px, multiples of ``factor``, that a ``height x width`` input is resized
        to (``smart_resize``); ``ValueError`` if that is over ``pixel_cap`` pixels."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if h * w > self.pixel_cap:
            raise ValueError(
                f"a {height}x{width} (HxW) image would be resized to {h}x{w} = {h * w} pixels, over the "
                f"pixel cap of {self.pixel_cap}; raise ImageProcessor(pixel_cap=...) to allow it"
            )
        return h, w

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """``(1, h, w)`` patch grid of a still image of ``height x width`` px: ``h * w`` patch rows, and
        ``h * w // merge_size**2`` output tokens."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    # ---------------------------------------------------------------- pipeline

    def _resize_normalize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> ``(3, h, w)`` float32 with ``(h, w) = size``, resized and normalised."""
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
        """One image or video -> ``(rows, grid, size)``.

        ``rows``: ``(t * h * w, 3 * T * P * P)`` float32 numpy array (``T = temporal_patch_size``,
        ``P = patch_size``), patches in merge-block order; ``grid``: ``(t, h, w)``, with ``t`` the number
        of frames (padded to a multiple of ``T``) divided by ``T``; ``size``: the input's ``(height, width)``
        in px. ``where`` names the item in error messages.
        """
        if isinstance(item, np.ndarray) and item.ndim == 4:
            frames = [item[i] for i in range(item.shape[0])]
        elif isinstance(item, (list, tuple)):
            frames = list(item)
        else:
            frames = [item]
        if not frames:
            raise ValueError(f"{where}: a video needs at least one frame")
        rgb = [
            load_rgb(
                f,
                max_input_pixels=self.max_input_pixels,
                where=f"{where} frame {i}" if len(frames) > 1 else where,
            )
            for i, f in enumerate(frames)
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
        """A list of images and videos (or one image) -> one ``PackedBatch``, in input order.

        ``pixel_values``: ``(N, 3 * T * P * P)`` float32; ``grid_thw``: ``(B, 3)`` int64, one row per
        image, or per view with a strategy (``views_per_image`` then maps views back to images);
        ``cu_seqlens``: ``(S + 1,)`` int32, one segment per temporal patch (one per still image or view);
        ``max_seqlen``: python int.
        """
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
            rgb = load_rgb(item, max_input_pixels=self.max_input_pixels, where=where)
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


__all__ = ["ImageProcessor", "smart_resize"]
