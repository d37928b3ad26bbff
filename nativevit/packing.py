"""Packed varlen batches.

Many images (or video frames) become one sequence of patch rows, ``(N, patch_dim)``, with
``cu_seqlens`` marking where each attention segment starts: one segment per frame, so tokens never
attend across images or across the temporal patches of a video. Nothing is padded.

``Segments`` is the per-batch attention metadata (device ``cu_seqlens``, host ``max_seqlen`` and
lengths). It is validated and built once per forward, so no layer ever syncs with the host.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .positions import position_kind
from .rope import rope_cos_sin


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


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``(S+1,)`` int32 offsets ``[0, l0, l0+l1, ...]`` of segments of the given host lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


class Segments:
    """Attention segments of one packed batch: what every layer's varlen attention needs.

    Built from host ``lengths`` (one source of truth): ``cu_seqlens`` ``(S+1,)`` int32 is derived from
    them on ``device`` (or written into ``out``, a static buffer), contiguous, and ``max_seqlen`` is the
    longest (or a given bound, e.g. a CUDA graph's). Per-batch derived data (the
    padded layout's index tensors, kernel work lists) is kept in :meth:`cached`, so every layer reuses it.

    ``padded=True`` describes the same segments laid out as a padded batch: ``(S', max_seqlen)`` rows,
    row-major, S' counting the non-empty segments (see :meth:`as_padded`).
    """

    __slots__ = ("lengths", "max_seqlen", "cu_seqlens", "padded", "_cache")

    def __init__(
        self,
        lengths: Sequence[int],
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ):
        lengths = tuple(int(n) for n in lengths)
        if not lengths:
            raise ValueError("a batch needs at least one segment")
        if min(lengths) < 0:
            raise ValueError(f"segment lengths must be >= 0, got {min(lengths)}")
        if max_seqlen is not None and max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest segment ({max(lengths)})")
        self.lengths = lengths
        self.max_seqlen = max(lengths) if max_seqlen is None else int(max_seqlen)
        if out is None:
            self.cu_seqlens = cu_seqlens_from_lengths(lengths, device)
        else:  # a static buffer (CUDA graphs): refreshed in place, same values
            if out.dtype != torch.int32 or out.shape != (len(lengths) + 1,) or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous int32 ({len(lengths) + 1},) tensor")
            self.cu_seqlens = out.copy_(cu_seqlens_from_lengths(lengths))
        self.padded = False
        self._cache: dict = {}

    def __setattr__(self, name, value):
        if hasattr(self, "_cache"):
            raise AttributeError(f"Segments are immutable (tried to set {name!r}); build new ones")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        layout = ", padded" if self.padded else ""
        return f"Segments({self.num_segments} segments, {self.total} tokens, max {self.max_seqlen}{layout})"

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None) -> Segments:
        """Validate user offsets against a token count (one host read) and build the segments.

        Any stride is fine: the segments keep their own contiguous copy on ``cu_seqlens``' device.
        ``max_seqlen``, when given, must be at least the longest segment.
        """
        offsets = check_cu_seqlens(cu_seqlens, total)
        segments = cls([b - a for a, b in zip(offsets[:-1], offsets[1:])], cu_seqlens.device)
        if max_seqlen is not None and max_seqlen < segments.max_seqlen:
            raise ValueError(
                f"max_seqlen={max_seqlen} is smaller than the longest segment ({segments.max_seqlen})"
            )
        return segments

    @classmethod
    def traced(cls, cu_seqlens: torch.Tensor, max_seqlen: int) -> Segments:
        """Segments known only on the device, for code traced by ``torch.compile``: no host read of
        ``cu_seqlens`` (nothing is validated, and ``lengths`` is None). Backends that need host lengths
        (the padded layout, Triton's work lists) need segments built eagerly instead."""
        out = object.__new__(Segments)
        for name, value in (("lengths", None), ("max_seqlen", max_seqlen), ("cu_seqlens", cu_seqlens)):
            object.__setattr__(out, name, value)
        object.__setattr__(out, "padded", False)
        object.__setattr__(out, "_cache", {})
        return out

    @classmethod
    def from_grid(
        cls, grid_thw: Sequence[tuple[int, int, int]], device: torch.device | str | None = None
    ) -> Segments:
        """One segment of ``h*w`` tokens per frame of each ``(t, h, w)`` grid (host ints)."""
        return cls([h * w for t, h, w in grid_thw for _ in range(t)], device)

    def as_padded(self) -> Segments:
        """The same segments in the padded layout, sharing this batch's cache. Only the ``padded``
        attention backend takes this layout; the padded baseline runs every layer on it."""
        out = object.__new__(Segments)
        for name in ("lengths", "max_seqlen", "cu_seqlens"):
            object.__setattr__(out, name, getattr(self, name))
        object.__setattr__(out, "padded", True)
        object.__setattr__(out, "_cache", self._cache)
        return out

    def cached(self, key, build: Callable[[], Any]) -> Any:
        """``build()`` once per batch and key (e.g. a kernel's work list), then the stored value.

        Code compiled by ``torch.compile`` only reads what was built eagerly (``BatchPlan`` builds what
        its backends need): building there would read host lengths inside the graph.
        """
        if key not in self._cache:
            if self.lengths is None:
                raise RuntimeError(
                    f"{key[0]!r} needs the host lengths of the segments, which raw cu_seqlens under "
                    "torch.compile do not have: pass the batch's Segments (or a model's plan) instead"
                )
            self._cache[key] = build()
        return self._cache[key]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

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

    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat, mask)``: ``flat`` ``(N,)`` int64, the row of every token in the ``(S', max_seqlen)``
        padded batch; ``mask`` ``(S', max_seqlen)`` bool, True on real keys; S' counts the non-empty
        segments (sizes are read from the tensors, so compiled code sees them as symbolic).

        Empty segments are left out of the padded batch: they have no queries, and an all-masked
        key row would only produce NaNs that nobody reads.
        """

        def build():
            lengths = torch.tensor([n for n in self.lengths if n > 0], dtype=torch.long)
            n_seg, width = lengths.numel(), self.max_seqlen
            seg = torch.repeat_interleave(torch.arange(n_seg), lengths)
            start = F.pad(lengths.cumsum(0), (1, 0))[:-1]
            flat = seg * width + torch.arange(int(lengths.sum())) - start[seg]
            mask = torch.arange(width)[None, :] < lengths[:, None]
            return flat.to(self.device), mask.to(self.device)

        return self.cached(("padded_layout", self.device), build)


def pad_segments(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``(N, ...)`` packed rows -> ``(S' * max_seqlen, ...)`` zero-padded rows (segment-major)."""
    flat, mask = segments.padded_layout()
    return x.new_zeros((mask.numel(), *x.shape[1:])).index_copy(0, flat, x)


def unpad_segments(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Inverse of :func:`pad_segments`: ``(S' * max_seqlen, ...)`` -> ``(N, ...)``."""
    flat, _ = segments.padded_layout()
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
        num_padding_images: trailing ``grid_thw`` rows that are padding (see :meth:`pad_to`), left out
            by :meth:`split` and :meth:`split_views`.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    image_sizes: list[tuple[int, int]] | None = None
    spatial_merge_size: int = 2
    views_per_image: list[int] | None = None
    num_padding_images: int = 0

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
        """Rows of ``grid_thw`` (padding images included)."""
        return self.grid_thw.shape[0]

    def pad_to(self, num_tokens: int) -> PackedBatch:
        """The batch with exactly ``num_tokens`` patch rows: a padding image of the missing rows is appended.

        The padding image is ``(t, m, m)`` (``m`` the merge size) of zero pixels: ``t`` frames of ``m*m``
        tokens, each its own attention segment, so it costs almost no attention and never touches the
        real images (attention is block-diagonal). :meth:`split` and :meth:`split_views` of the padded
        batch's outputs return only the real images. ``num_tokens`` below the batch's rows, or not a
        multiple of ``m*m`` away from them, is a ``ValueError``. Used to run batches of varying size
        at a few fixed token budgets (compiled shapes, CUDA graphs).
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
        extra = num_tokens - self.num_tokens
        unit = self.spatial_merge_size**2
        if extra < 0:
            raise ValueError(f"cannot pad to {num_tokens} tokens: the batch already has {self.num_tokens}")
        if extra % unit:
            raise ValueError(
                f"cannot pad {self.num_tokens} tokens to {num_tokens}: the padding ({extra} rows) must be a "
                f"multiple of the merge unit {unit}"
            )
        if extra == 0:
            return dataclasses.replace(self)
        m = self.spatial_merge_size
        pad_grid = torch.tensor(
            [[extra // unit, m, m]], dtype=self.grid_thw.dtype, device=self.grid_thw.device
        )
        pad_rows = self.pixel_values.new_zeros(extra, self.pixel_values.shape[1])
        pad_cu = self.cu_seqlens[-1] + unit * torch.arange(
            1, extra // unit + 1, dtype=self.cu_seqlens.dtype, device=self.cu_seqlens.device
        )
        return dataclasses.replace(
            self,
            pixel_values=torch.cat([self.pixel_values, pad_rows]),
            grid_thw=torch.cat([self.grid_thw, pad_grid]),
            cu_seqlens=torch.cat([self.cu_seqlens, pad_cu]),
            max_seqlen=max(self.max_seqlen, unit),
            num_padding_images=self.num_padding_images + 1,
        )

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
        parts = list(torch.split(x, sizes, dim=0))
        return parts[: len(parts) - self.num_padding_images]

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
            num_padding_images=self.num_padding_images,
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


# ----------------------------------------------------------------------------- windows


def window_partition(
    grid_thw: list[tuple[int, int, int]], *, window: int, merge_size: int = 2
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Qwen2.5-VL's windows of a batch: ``(order, lengths)``, host-side.

    Each frame's ``(h/m, w/m)`` grid of merged tokens is cut into ``window x window`` tiles (edge
    tiles smaller), raster over tiles and raster inside each. ``order`` ``(N/m^2,)`` int64 lists the
    merged tokens (batch indices) in window order; ``lengths`` the patches per window. The release
    (``get_vision_window_index``) pads a side that is already a multiple of the window by one more
    whole tile and then drops the resulting empty windows with ``unique_consecutive``; padding to the
    next multiple only gives the same windows.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 merged token, got {window}")
    orders, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        lh, lw = h // merge_size, w // merge_size
        nh, nw = -(-lh // window), -(-lw // window)
        idx = torch.arange(t * lh * lw).view(t, lh, lw)
        idx = F.pad(idx, (0, nw * window - lw, 0, nh * window - lh), value=-1)  # -1: outside the frame
        # (t, nh, window, nw, window) -> one row per tile, raster over tiles, raster inside
        tiles = idx.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        valid = tiles >= 0
        orders.append(tiles[valid] + offset)
        lengths.extend((valid.sum(1) * merge_size**2).tolist())
        offset += t * lh * lw
    return torch.cat(orders), tuple(lengths)


@dataclass(eq=False)
class WindowLayout:
    """Window attention metadata of one batch, built once per forward.

    ``order`` ``(N,)``: patch rows in window order (``x[order]``), whole 2x2 merge groups moved
    together; ``inverse`` undoes it; ``segments`` has one segment per window over the permuted rows.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    segments: Segments

    @classmethod
    def from_grid(
        cls, grid_thw: list[tuple[int, int, int]], *, window: int, merge_size: int, device: torch.device | str
    ) -> WindowLayout:
        merged, lengths = window_partition(grid_thw, window=window, merge_size=merge_size)
        unit = merge_size**2
        order = (merged[:, None] * unit + torch.arange(unit)).flatten()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return cls(order.to(device), inverse.to(device), Segments(lengths, device))


@dataclass(eq=False)
class PaddedWindows:
    """Padded baseline, windowed block: its rows are frames padded to the longest frame, its attention
    runs on windows padded to the longest window, so q, k, v go there and the output comes back."""

    frames: Segments
    windows: Segments

    def to_windows(self, x: torch.Tensor) -> torch.Tensor:
        return pad_segments(unpad_segments(x, self.frames), self.windows)

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return pad_segments(unpad_segments(x, self.windows), self.frames)


# ----------------------------------------------------------------------------- the per-batch plan

LAYOUTS = ("packed", "padded")


@dataclass(eq=False)
class BatchPlan:
    """Everything a forward derives from the batch's grids, built once by :func:`plan_batch` and shared
    by every layer (no layer touches the host).

    Attributes:
        layout: "packed" (rows are the real tokens) or "padded" (the padded baseline: every frame
            padded to the longest, ``S' * max_seqlen`` rows in every layer, key-padding mask).
        grid: ``(t, h, w)`` host ints per image (None when built from bare lengths).
        segments: one attention segment per frame, in ``layout``.
        windows: window attention (Qwen2.5-VL): the permutation that makes every window contiguous and
            one segment per window; None without windows.
        cos, sin: ``(N, head_dim//2)`` float32 rotary tables in the row order of the blocks (window order
            when there are windows), or None when no rotary embedding was asked for.
        positions: what a learned position table's kind (``nativevit.positions``) planned for this batch,
            tensors of one row per patch in input row order (Qwen3-VL: gather indices ``(N, 4)`` and
            weights ``(N, 4)``); None without a table.
    """

    layout: str
    grid: tuple[tuple[int, int, int], ...] | None
    segments: Segments
    windows: WindowLayout | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    positions: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        # everything layers read is built here, eagerly: compiled code only reads it
        self._windowed: tuple[Segments, PaddedWindows | None] | None = None
        if self.windows is not None:
            if self.padded:
                local = self.windows.segments.as_padded()
                self._windowed = (local, PaddedWindows(self.segments, self.windows.segments))
            else:
                self._windowed = (self.windows.segments, None)
        if self.padded:
            for segments in self.all_segments():
                segments.padded_layout()
        # Segment counts are unrelated sizes: keep torch.compile from assuming two of them equal because
        # they happened to be equal in the first batch (duck sizing), which would recompile later.
        for segments in self.all_segments():
            torch._dynamo.decorators.mark_unbacked(segments.cu_seqlens, 0)

    @property
    def padded(self) -> bool:
        return self.layout == "padded"

    @property
    def num_tokens(self) -> int:
        """Real tokens (rows of the input and the output)."""
        return self.segments.total

    def attention(self, windowed: bool) -> tuple[Segments, PaddedWindows | None]:
        """What a block attends over: ``(segments, relayout)``. ``relayout`` is set for windowed blocks
        of the padded baseline, whose rows are padded frames but whose attention runs on padded windows."""
        if not windowed or self.windows is None:
            return self.segments, None
        return self._windowed

    def all_segments(self) -> list[Segments]:
        """Every ``Segments`` a block of this batch attends over (frames, and windows if any)."""
        return [self.segments] + ([self.attention(True)[0]] if self.windows is not None else [])

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` rows in input order -> the blocks' rows (window order, padded if padded)."""
        if self.windows is not None:
            x = x.index_select(0, self.windows.order)
        return pad_segments(x, self.segments) if self.padded else x

    def to_input_order(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_layout`: the blocks' rows -> ``(N, ...)`` rows in input order."""
        if self.padded:
            x = unpad_segments(x, self.segments)
        return x.index_select(0, self.windows.inverse) if self.windows is not None else x

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` in the blocks' rows (padded if padded)."""
        if self.cos is None:
            raise ValueError("this plan was built without rotary tables (plan_batch(head_dim=...))")
        if self.padded:
            return pad_segments(self.cos, self.segments), pad_segments(self.sin, self.segments)
        return self.cos, self.sin


def plan_batch(
    grid_thw: Sequence[Sequence[int]] | torch.Tensor | None = None,
    *,
    lengths: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    layout: str = "packed",
    merge_size: int = 2,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    window: int = 0,
    pos_side: int = 0,
    pos_kind: str = "bilinear_taps",
    rope_kind: str = "qwen",
    clip_attention: bool = False,
) -> BatchPlan:
    """Build a batch's plan: segments (one per frame), window layout, rotary tables, learned-position
    taps, in ``layout`` ("packed" or "padded").

    Args:
        grid_thw: ``(B, 3)`` ``[t, h, w]`` patch grids (a tensor is validated and read once), or None
            with ``lengths`` (towers without grids, e.g. timm models: one segment per length).
        lengths: segment lengths when there is no grid.
        device: where the plan's tensors live.
        merge_size: the spatial merge size (2x2 blocks of the processor's row order).
        head_dim: build ``(N, head_dim//2)`` rotary tables (``rope_theta``, frequency layout
            ``rope_kind``, see ``nativevit.rope.ROPE_FREQUENCIES``) when set.
        window: window side in merged tokens (Qwen2.5-VL: 4); 0 for none.
        pos_side: side of a square learned position table to resample to every patch (the way
            ``pos_kind`` says, see ``nativevit.positions``); 0 for none.
        clip_attention: one attention segment per clip (all ``t`` frames, Kimi-K2.5) instead of per frame.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (grid_thw is None) == (lengths is None):
        raise ValueError("pass exactly one of grid_thw and lengths")
    if lengths is not None:
        segments = Segments(lengths, device)
        return BatchPlan(layout, None, segments.as_padded() if layout == "padded" else segments)
    if isinstance(grid_thw, torch.Tensor):
        grid = tuple(check_grid_thw(grid_thw, merge_size))
    else:
        grid = tuple(tuple(int(v) for v in row) for row in grid_thw)
    if clip_attention:
        segments = Segments([t * h * w for t, h, w in grid], device)
    else:
        segments = Segments.from_grid(grid, device)
    windows = None
    if window:
        windows = WindowLayout.from_grid(grid, window=window, merge_size=merge_size, device=device)
    cos = sin = None
    if head_dim is not None:
        cos, sin = rope_cos_sin(
            grid, head_dim, theta=rope_theta, merge_size=merge_size, device=device, kind=rope_kind
        )
        if windows is not None:
            cos, sin = cos.index_select(0, windows.order), sin.index_select(0, windows.order)
    positions = None
    if pos_side:
        positions = tuple(t.to(device) for t in position_kind(pos_kind).plan(grid, pos_side, merge_size))
    if layout == "padded":
        segments = segments.as_padded()
    return BatchPlan(layout, grid, segments, windows, cos, sin, positions)


# ----------------------------------------------------------------------------- token budgets


def pack_by_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy largest-first packing of items into batches of at most ``budget`` tokens.

    ``lengths``: token count of each item. Items are taken longest first (ties in index order) and each
    goes into the open batch with the most room if it fits there, else into a new batch (worst-fit
    decreasing: ``O(n log batches)``). Every index appears exactly once; an item longer than ``budget``
    is a batch of its own. Returns the batches as lists of indices, each in ascending index order, the
    batches in the order they were opened (largest items first).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    sizes = [int(n) for n in lengths]
    if any(n < 0 for n in sizes):
        raise ValueError(f"lengths must be >= 0, got {min(sizes)}")
    batches: list[list[int]] = []
    room: list[tuple[int, int]] = []  # max-heap of (-free tokens, batch index)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        n = sizes[i]
        if room and -room[0][0] >= n:
            free, b = heapq.heappop(room)
            batches[b].append(i)
            heapq.heappush(room, (free + n, b))
        else:
            batches.append([i])
            if n <= budget:  # a full batch still takes empty items
                heapq.heappush(room, (n - budget, len(batches) - 1))
    return [sorted(b) for b in batches]
