"""Packed varlen batches.

Many images (or video frames) become one sequence of patch rows, ``(N, patch_dim)``, with
``cu_seqlens`` marking where each attention segment starts: one segment per frame, so tokens never
attend across images or across the temporal patches of a video. Nothing is padded.

``Segments`` is the per-batch attention metadata (device ``cu_seqlens``, host ``max_seqlen`` and
lengths). It is validated and built once per forward, so no layer ever syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def check_grid_thw(grid_thw: torch.Tensor, merge_size: int = 2) -> list[tuple[int, int, int]]:
    """Validate a ``(B, 3)`` grid of ``[t, h, w]`` patch counts and return it as host ints."""
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"grid_thw must be a torch.Tensor, got {type(grid_thw).__name__}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw must be an integer tensor, got {grid_thw.dtype}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_images, 3), got {tuple(grid_thw.shape)}")
    if grid_thw.shape[0] == 0:
        raise ValueError("grid_thw is empty: a batch needs at least one image")
    rows = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    for i, (t, h, w) in enumerate(rows):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: t, h and w must all be >= 1")
        if h % merge_size or w % merge_size:
            raise ValueError(
                f"grid_thw[{i}] = {[t, h, w]}: h and w must be divisible by the spatial merge size "
                f"{merge_size} (the patch merger groups {merge_size}x{merge_size} patches)"
            )
    return rows


def cu_seqlens_from_grid(grid_thw: torch.Tensor) -> torch.Tensor:
    """``(S+1,)`` int32 segment offsets, one segment of ``h*w`` tokens per temporal index."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """Validate ``cu_seqlens`` against a token count; return the host offsets (one sync)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (the flash-attention convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries (0 and the token count), got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    bad = next((i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must be non-decreasing: cu_seqlens[{bad}]={offsets[bad]} < "
            f"cu_seqlens[{bad - 1}]={offsets[bad - 1]}"
        )
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]} but there are {total} tokens")
    return offsets


@dataclass(eq=False)
class Segments:
    """Attention segments of one packed batch: what every layer's varlen attention needs.

    ``cu_seqlens`` lives on the compute device; ``lengths`` and ``max_seqlen`` are host ints read
    once. The index tensors of the padded layout are built on first use and then reused by every layer.
    """

    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    max_seqlen: int
    padded: bool = False
    _pad_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None) -> Segments:
        offsets = check_cu_seqlens(cu_seqlens, total)
        lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
        longest = max(lengths)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest segment ({longest})")
        return cls(cu_seqlens, lengths, longest)

    @classmethod
    def from_grid(cls, grid_thw: list[tuple[int, int, int]], device: torch.device | str) -> Segments:
        lengths = tuple(h * w for t, h, w in grid_thw for _ in range(t))
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        return cls(cu, lengths, max(lengths))

    def as_padded(self) -> Segments:
        """The same segments, laid out as a padded batch: ``(S', max_seqlen)`` rows, row-major, where S'
        counts the non-empty segments. Only the ``padded`` attention backend takes this layout; the
        padded baseline encoder runs every layer on it (see ``NativeViT.forward_features``)."""
        return Segments(self.cu_seqlens, self.lengths, self.max_seqlen, True, self._pad_cache)

    @property
    def num_rows(self) -> int:
        """Rows of the tensors this layout describes: the token count, or ``S' * max_seqlen`` if padded."""
        if self.padded:
            return sum(1 for n in self.lengths if n > 0) * self.max_seqlen
        return self.total

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(flat index of every token in a ``(S', max_seqlen)`` padded batch, key mask ``(S', L)``, S').

        Empty segments are left out of the padded batch: they have no queries, and an all-masked
        key row would only produce NaNs that nobody reads.
        """
        device = self.cu_seqlens.device
        if device not in self._pad_cache:
            lengths = torch.tensor([n for n in self.lengths if n > 0], dtype=torch.long)
            n_seg, width = lengths.numel(), self.max_seqlen
            seg = torch.repeat_interleave(torch.arange(n_seg), lengths)
            start = F.pad(lengths.cumsum(0), (1, 0))[:-1]
            pos = torch.arange(int(lengths.sum())) - start[seg]
            flat = seg * width + pos
            mask = torch.arange(width)[None, :] < lengths[:, None]
            self._pad_cache[device] = (flat.to(device), mask.to(device), n_seg)
        return self._pad_cache[device]


def pad_segments(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``(N, ...)`` packed rows -> ``(S' * max_seqlen, ...)`` zero-padded rows (segment-major)."""
    flat, _, n_seg = segments.padded_layout()
    return x.new_zeros((n_seg * segments.max_seqlen, *x.shape[1:])).index_copy(0, flat, x)


def unpad_segments(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Inverse of :func:`pad_segments`: ``(S' * max_seqlen, ...)`` -> ``(N, ...)``."""
    flat, _, _ = segments.padded_layout()
    return x.index_select(0, flat)


@dataclass
class PackedBatch:
    """Images (and video frames) packed into one varlen batch, in Qwen2-VL row order.

    Attributes:
        pixel_values: ``(N, C*T*P*P)`` float32 patch rows; rows of an image are ordered by 2x2
            merge block, then by position inside the block (the order the patch merger expects).
        grid_thw: ``(B, 3)`` int64 ``[t, h, w]`` patch grid of each image.
        cu_seqlens: ``(S+1,)`` int32 segment offsets, one segment per frame (``t*h*w`` split by t).
        max_seqlen: longest segment, a host int.
        image_sizes: ``(height, width)`` of each input before resizing, when known.
        views_per_image: with a resolution strategy (``ImageProcessor(strategy=...)``), how many
            consecutive ``grid_thw`` rows (views) belong to each input image; None means one each.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    image_sizes: list[tuple[int, int]] | None = None
    spatial_merge_size: int = 2
    views_per_image: list[int] | None = None

    @classmethod
    def from_grid(
        cls,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        *,
        image_sizes: list[tuple[int, int]] | None = None,
        spatial_merge_size: int = 2,
    ) -> PackedBatch:
        rows = check_grid_thw(grid_thw, spatial_merge_size)
        total = sum(t * h * w for t, h, w in rows)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != total:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw needs {total} rows "
                "(sum of t*h*w)"
            )
        cu = cu_seqlens_from_grid(grid_thw)
        return cls(
            pixel_values,
            grid_thw,
            cu,
            max(h * w for _, h, w in rows),
            image_sizes=image_sizes,
            spatial_merge_size=spatial_merge_size,
        )

    @property
    def num_images(self) -> int:
        return self.grid_thw.shape[0]

    @property
    def num_tokens(self) -> int:
        """Patch rows (pre-merger tokens)."""
        return self.pixel_values.shape[0]

    @property
    def patches_per_image(self) -> list[int]:
        return [t * h * w for t, h, w in self.grid_thw.tolist()]

    @property
    def tokens_per_image(self) -> list[int]:
        """Merged tokens per image: what the language model sees (``<|image_pad|>`` count)."""
        unit = self.spatial_merge_size**2
        return [n // unit for n in self.patches_per_image]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split encoder output per image.

        Works on ``forward_features`` output (``N`` rows) and on merged ``forward`` output
        (``N / merge_size**2`` rows).
        """
        if x.shape[0] == self.num_tokens:
            sizes = self.patches_per_image
        elif x.shape[0] * self.spatial_merge_size**2 == self.num_tokens:
            sizes = self.tokens_per_image
        else:
            raise ValueError(
                f"cannot split {x.shape[0]} rows: the batch has {self.num_tokens} patch rows and "
                f"{self.num_tokens // self.spatial_merge_size**2} merged tokens"
            )
        return list(torch.split(x, sizes, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move to a device; ``dtype`` converts ``pixel_values`` only."""
        return PackedBatch(
            self.pixel_values.to(device=device, dtype=dtype),
            self.grid_thw.to(device),
            self.cu_seqlens.to(device),
            self.max_seqlen,
            image_sizes=self.image_sizes,
            spatial_merge_size=self.spatial_merge_size,
            views_per_image=self.views_per_image,
        )

    def split_views(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Split encoder output per input image, then per view (``split`` grouped by ``views_per_image``)."""
        per_view = self.split(x)
        counts = self.views_per_image if self.views_per_image is not None else [1] * len(per_view)
        if sum(counts) != len(per_view):
            raise ValueError(f"views_per_image sums to {sum(counts)} but the batch has {len(per_view)} views")
        out, start = [], 0
        for n in counts:
            out.append(per_view[start : start + n])
            start += n
        return out

    def padded_tokens(self) -> int:
        """Rows a padded batch of the same segments holds (``S * max_seqlen``)."""
        return (self.cu_seqlens.numel() - 1) * self.max_seqlen
