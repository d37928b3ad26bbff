"""Work sharing: the header scan and the decode/preprocess of token-budget batches run in ``DataLoader``
workers; items are spread over ranks by token count."""

from __future__ import annotations

import heapq
import time
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..preprocess import ImageProcessor
from .sources import INPUT_ERRORS, Opener, Record, Unit, message


def _identity(x):
    return x


def loader(dataset: Dataset, workers: int, *, pin_memory: bool = False) -> DataLoader:
    """One item of ``dataset`` at a time, in order, produced by ``workers`` processes (0: this one)."""
    workers = min(workers, len(dataset))
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
    )


class ScanUnits(Dataset):
    """Header scan: unit ``i`` -> ``(i, [Record, ...])``."""

    def __init__(self, units: Sequence[tuple[int, Unit]], proc: ImageProcessor, done: Collection[str]):
        self.units, self.proc, self.done = units, proc, done

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> tuple[int, list[Record]]:
        index, unit = self.units[i]
        return index, unit.scan(self.proc, self.done)


def assign_by_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Spread items over ``world_size`` ranks by token count: largest first, each to the rank with the
    fewest tokens so far (ties: the lower rank; equal items: the lower index). Returns each rank's item
    indices, ascending. Every rank computes the same answer from the same lengths."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [(0, r) for r in range(world_size)]
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(loads)
        out[r].append(i)
        heapq.heappush(loads, (load + int(lengths[i]), r))
    return [sorted(items) for items in out]


class Batches(Dataset):
    """Decode and preprocess of token-budget batches: batch ``b`` -> a dict with

    ``pixel_values`` ``(N, row_width)`` float32 and ``grid_thw`` ``(V, 3)`` int64 of the items that
    decoded, ``items`` ``[(record index, views, height, width), ...]`` in row order, ``errors``
    ``[(record index, message), ...]`` and ``seconds`` spent (in whichever process ran it)."""

    def __init__(self, records: Sequence[Record], batches: Sequence[Sequence[int]], proc: ImageProcessor):
        self.records, self.batches, self.proc = records, batches, proc
        self._open = Opener()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, Any]:
        start = time.perf_counter()
        pixels, grids, items, errors = [], [], [], []
        for i in self.batches[b]:
            record = self.records[i]
            try:
                out = self.proc([self._open(record.source)])
            except INPUT_ERRORS as e:
                errors.append((i, message(e)))
                continue
            pixels.append(out.pixel_values)
            grids.append(out.grid_thw)
            (height, width) = out.image_sizes[0]
            items.append((i, out.grid_thw.shape[0], int(height), int(width)))
        width = self.proc.row_width
        return {
            "pixel_values": torch.cat(pixels) if pixels else torch.empty(0, width),
            "grid_thw": torch.cat(grids) if grids else torch.empty(0, 3, dtype=torch.int64),
            "items": items,
            "errors": errors,
            "seconds": time.perf_counter() - start,
        }

    def close(self) -> None:
        """Close the tar shards this process opened (workers' handles end with the workers)."""
        self._open.close()


__all__ = ["Batches", "ScanUnits", "assign_by_tokens", "loader"]
