"""A resolution strategy's views as the images a CLIP / SigLIP / InternViT tower takes.

    batch = tower_views(images, "llava_next", tower=enc)      # enc = nv.from_transformers(clip)
    feats = enc.forward_images(batch.images)                  # all views of all images, one packed batch
    per_image = batch.split(feats)                            # [[view features, ...], ...] per image

``ImageProcessor(strategy=...)`` gives the views as Qwen2-VL patch rows (14-px patches, sides resampled
to multiples of 28, the processor's mean/std). A CLIP / SigLIP / InternViT tower takes each view as a
normalised ``(3, H, W)`` image at the system's own size instead: a LLaVA-NeXT tile is 336 px, a
OneVision tile 384 px (its SigLIP sees 27x27 patches of 14 px), an InternVL tile 448 px. Here every
view keeps ``View.size`` (the pixels the strategy rendered, untouched), except native (Qwen2-VL)
views, whose sides are resampled (PIL bicubic) to the nearest multiple of the tower's patch size.
Normalisation is transformers' arithmetic: ``uint8 * (1/255)`` in float64, cast to float32, then
``(x - mean) / std`` in float32, with the tower's mean/std (each release's preset, or given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .. import strategies
from ..image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["TOWER_NORMALIZATION", "TowerViews", "tower_views"]

# (mean, std) of each tower kind's released processors: CLIP (LLaVA), SigLIP (LLaVA-OneVision,
# 0.5 / 0.5 as its release's preprocessor_config.json), InternViT (InternVL: ImageNet).
TOWER_NORMALIZATION = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "internvl": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class TowerViews:
    """The views of a list of images, as normalised tower inputs.

    ``images``: one ``(3, H, W)`` float tensor per view, all images' views in order (each image's in
    the order its language model reads them); ``views``: the matching ``strategies.View`` geometry;
    ``views_per_image``: how many views each input image has.
    """

    images: list[torch.Tensor]
    views: list[strategies.View]
    views_per_image: list[int]

    def split(self, outputs: Sequence) -> list[list]:
        """Per-view outputs (one per entry of ``images``) -> one list per input image."""
        if len(outputs) != len(self.images):
            raise ValueError(f"got {len(outputs)} outputs for {len(self.images)} views")
        out, start = [], 0
        for n in self.views_per_image:
            out.append(list(outputs[start : start + n]))
            start += n
        return out


def tower_views(
    images,
    strategy: str | strategies.Strategy,
    *,
    tower=None,
    patch_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    **options,
) -> TowerViews:
    """Each image's views under ``strategy``, as normalised ``(3, H, W)`` images for a ViT tower.

    Args:
        images: a list of images (PIL, ``(H, W, 3)`` uint8 arrays, paths; read by ``nativevit.image``).
        strategy: a name of ``nativevit.strategies`` (options as keyword arguments) or a ``Strategy``.
        tower: a ``from_transformers`` encoder, a transformers CLIP / SigLIP / InternViT vision model,
            or a kind name ("clip", "siglip", "internvl"): the defaults of ``patch_size`` and mean/std.
        patch_size: the tower's patch size (native views are resampled to multiples of it); default
            the tower's, else 14.
        image_mean, image_std: 3 values each; default the tower kind's release preset
            (``TOWER_NORMALIZATION``), else OpenAI CLIP's.
        dtype: of the returned tensors (computed in float32).
    """
    kind, tower_patch = _tower_defaults(tower)
    patch = patch_size or tower_patch or 14
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch!r}")
    mean0, std0 = TOWER_NORMALIZATION.get(kind, (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    mean = _channels("image_mean", mean0 if image_mean is None else image_mean)
    std = _channels("image_std", std0 if image_std is None else image_std)
    if not (std > 0).all():
        raise ValueError(f"image_std must be > 0 per channel, got {std.tolist()}")
    if isinstance(images, (str, PIL.Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of images")
    strat = strategies.get(strategy, **options)
    unit = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (unit[None, :] - mean[:, None]) / std[:, None]  # (3, 256) float32
    out, views, counts = [], [], []
    for i, image in enumerate(images):
        try:
            planned = strat.plan(image)
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
        for view in planned:
            pixels = view.image
            size = _native_size(view.size, patch) if view.kind == "native" else view.size
            if pixels.size != size:
                pixels = pixels.resize(size, PIL.Image.BICUBIC)
            rgb = np.asarray(pixels.convert("RGB"), dtype=np.intp)  # (H, W, 3)
            chw = np.stack([table[c].take(rgb[..., c]) for c in range(3)])  # (3, H, W) float32
            out.append(torch.from_numpy(chw).to(dtype))
            views.append(view)
        counts.append(len(planned))
    return TowerViews(out, views, counts)


def _native_size(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return tuple(max(patch, round(side / patch) * patch) for side in size)


def _channels(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (3,) or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
    return arr


def _tower_defaults(tower) -> tuple[str | None, int | None]:
    """``(kind, patch size)`` of a tower argument."""
    if tower is None:
        return None, None
    if isinstance(tower, str):
        if tower not in TOWER_NORMALIZATION:
            raise ValueError(f"unknown tower kind {tower!r}; choose from {sorted(TOWER_NORMALIZATION)}")
        return tower, None
    from .hf_vit import TransformersPackedEncoder, from_transformers

    if not isinstance(tower, TransformersPackedEncoder):
        tower = from_transformers(tower)
    return tower.kind, tower.patch_size
