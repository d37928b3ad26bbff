"""What each resolution strategy costs: views, language-model tokens, encoder patches and FLOPs.

A layer above ``strategies`` (geometry, no model) and ``model`` (the FLOP formula), so that
preprocessing never imports the model. The table behind ``nativevit tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import strategies
from .config import VisionConfig
from .image import describe, image_size, is_file
from .model import flops


def cost_table(
    images, names: Sequence[str] = strategies.NAMES, cfg: VisionConfig | None = None
) -> list[dict]:
    """One row per (image, strategy), images outer, in the order given.

    ``images``: anything ``nativevit.image.image_size`` reads (a file is read from its header only,
    EXIF orientation included; a ``(width, height)`` pair needs no pixels). ``cfg``: the packed encoder
    whose forward FLOPs are counted (default ``VisionConfig.qwen2_vl()``, the full Qwen2-VL tower).
    An unreadable image raises ``ValueError`` naming it (``images[i]`` and its path).

    Each row: ``image`` (str: the path, or ``"WxH"``), ``size`` (str ``"WxH"``, as loaded),
    ``strategy`` (str), ``views`` (int), ``tokens`` (int, language-model tokens), ``patches`` (int,
    encoder patches over all views), ``flops`` (int, forward FLOPs over all views packed), ``error``
    (str: why the strategy refuses the image, else ``""``; a refused row has zeros).
    """
    cfg = cfg if cfg is not None else VisionConfig.qwen2_vl()
    rows = []
    for i, image in enumerate(images):
        w, h = image_size(image, where=f"images[{i}]")
        label = describe(image) if is_file(image) else f"{w}x{h}"
        for name in names:
            row = {"image": label, "size": f"{w}x{h}", "strategy": str(name)}
            try:
                strategy = strategies.get(name)
                views = strategy.layout(w, h)
                lengths = [v.num_patches for v in views]
                row.update(
                    views=len(views),
                    tokens=strategy.num_tokens(w, h),
                    patches=sum(lengths),
                    flops=flops(cfg, lengths)["total"],
                    error="",
                )
            except ValueError as e:
                row.update(views=0, tokens=0, patches=0, flops=0, error=str(e))
            rows.append(row)
    return rows


__all__ = ["cost_table"]
