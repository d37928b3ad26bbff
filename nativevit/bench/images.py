"""The benchmarks' inputs: built-in image sets (synthetic pixels, real geometries) and the kernel mix.

The encoder's speed depends on the batch geometry (each image's patch grid), never on pixel values,
so the sets are synthetic images of chosen sizes. ``seed`` is the project's mixed-resolution set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# (width, height) of the images of each set.
IMAGE_SETS: dict[str, tuple[tuple[int, int], ...]] = {
    "seed": ((128, 16), (336, 336), (1000, 600), (1920, 1080), (1500, 4500), (4000, 3000)),
    "skewed": ((3000, 2000),) + ((160, 120),) * 15,
    "documents": ((1240, 3508), (1240, 1754), (850, 1100), (1100, 850)),
    "uniform": ((336, 336),) * 8,
    "video": ((640, 360),),  # one clip of VIDEO_FRAMES frames: t = 8 temporal patches, 8 segments
}
VIDEO_FRAMES = 16

# Segment lengths (tokens) of the kernel benchmarks' mixed batch: one large image, a few medium and
# small ones, one tiny, as a packed encoder batch looks to the attention and RoPE kernels.
KERNEL_MIX: tuple[int, ...] = (2304, 1220, 980, 400, 400, 20)


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic ``(height, width, 3)`` uint8 image: smooth gradients plus noise."""
    if width < 1 or height < 1:
        raise ValueError(f"image sides must be >= 1, got {width}x{height}")
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    phase_x, phase_y = rng.uniform(0, 6, (2, 3)).astype(np.float32)
    image = rng.standard_normal((height, width, 3), dtype=np.float32)  # noise, then the gradients on top
    image *= 12
    image += 255 * (0.5 + 0.25 * np.sin(6 * x + phase_x) * np.cos(4 * y + phase_y))
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def image_set(name: str) -> list:
    """The inputs of a built-in set for ``ImageProcessor``: ``(H, W, 3)`` uint8 arrays, or for ``video``
    one list of ``VIDEO_FRAMES`` frames."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose from {sorted(IMAGE_SETS)}")
    if name == "video":
        ((w, h),) = IMAGE_SETS[name]
        return [[synthetic_image(w, h, seed=i) for i in range(VIDEO_FRAMES)]]
    return [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SETS[name])]


def set_segments(name: str, processor) -> list[list[int]]:
    """Per item of built-in set ``name``, the token counts of its segments (one per frame) as
    ``processor`` (an ``ImageProcessor``) grids it: ``[h*w]`` for a still, ``[h*w] * t`` for a clip.
    Only the geometry is computed; no pixels are made."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose from {sorted(IMAGE_SETS)}")
    items = []
    for w, h in IMAGE_SETS[name]:
        _, gh, gw = processor.grid_for(h, w)
        frames = VIDEO_FRAMES // processor.temporal_patch_size if name == "video" else 1
        items.append([gh * gw] * frames)
    return items


# Files taken from a folder given as an image input (lower-case suffixes).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def input_sets(items: Sequence[str]) -> list[tuple[str, list]]:
    """``(label, images)`` per input set of the command-line ``--images`` items.

    An item is a built-in set name (see :data:`IMAGE_SETS`; a name wins over a path of the same name:
    write ``./seed`` for the folder), a folder (its image files, by name, not recursing), or an image
    file; consecutive files form one set labelled ``files``. Images of folders and files are paths,
    decoded by the ``ImageProcessor``. ``ValueError`` names an item that is none of these, or a folder
    without image files.
    """
    sets: list[tuple[str, list]] = []
    files: list[str] = []

    def flush():
        if files:
            sets.append(("files" if len(files) > 1 else _label(Path(files[0]).name), list(files)))
            files.clear()

    for item in items:
        path = Path(item)
        if item in IMAGE_SETS:
            flush()
            sets.append((item, image_set(item)))
        elif path.is_dir():
            flush()
            found = sorted(
                str(f) for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(f"folder {item!r} has no image files ({', '.join(IMAGE_SUFFIXES)})")
            sets.append((_label(path.resolve().name or "folder"), found))
        elif path.is_file():
            files.append(item)
        else:
            raise ValueError(
                f"{item!r} is not a built-in image set ({', '.join(sorted(IMAGE_SETS))}), a folder or a file"
            )
    flush()
    return sets


def _label(name: str) -> str:
    """``name`` usable as a CSV shape value (no ``;`` or ``=``)."""
    return name.replace(";", "_").replace("=", "_") or "images"


__all__ = [
    "IMAGE_SETS",
    "IMAGE_SUFFIXES",
    "KERNEL_MIX",
    "VIDEO_FRAMES",
    "image_set",
    "input_sets",
    "set_segments",
    "synthetic_image",
]
