"""One rank's encode loop: batches from the ``DataLoader`` -> the encoder -> shards, written as it goes.

The loop keeps the encoder busy: decode and preprocessing happen in ``DataLoader`` workers (prefetched
batches), and a shard is saved by a background thread while the next batches are encoded (at most one
shard waits to be written, so memory stays bounded). ``wait_s`` is the time the encoder waited for data.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .loader import Batches, loader
from .sources import Record
from .store import SHARD_DIR, shard_name, write_shard

# Crash injection for the resume tests: "before:N" or "after:N" (optionally "@RANK") sends SIGKILL to
# this process just before or just after its N-th shard (from 1) is renamed into place.
KILL_ENV = "NATIVEVIT_ENCODE_TEST_KILL"


def _kill_point(rank: int) -> tuple[str, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    spec, _, only = spec.partition("@")
    if only and int(only) != rank:
        return None
    stage, _, n = spec.partition(":")
    return stage, int(n)


@dataclass
class RankStats:
    """What one rank did; times in seconds (``decode_s`` is spent in the workers, in parallel)."""

    rank: int = 0
    items: int = 0
    patches: int = 0
    rows: int = 0
    batches: int = 0
    shards: int = 0
    decode_s: float = 0.0
    encoder_s: float = 0.0
    wait_s: float = 0.0
    write_s: float = 0.0
    loop_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter:
    """Collects items and writes a shard every ``batches_per_shard`` batches, in a background thread."""

    def __init__(self, root: Path, *, digest: str, attempt: int, rank: int, batches_per_shard: int):
        self.root, self.digest, self.attempt, self.rank = root, digest, attempt, rank
        self.batches_per_shard = batches_per_shard
        self.shards = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nativevit-shards")
        self._future: Future | None = None
        self._kill = _kill_point(rank)
        self._reset()

    def _reset(self) -> None:
        self._keys: list[str] = []
        self._features: list[torch.Tensor] = []
        self._grids: list[torch.Tensor] = []
        self._sizes: list[tuple[int, int]] = []
        self._batches = 0

    def add(self, key: str, features: torch.Tensor, grid_thw: torch.Tensor, size: tuple[int, int]) -> None:
        self._keys.append(key)
        self._features.append(features)
        self._grids.append(grid_thw)
        self._sizes.append(size)

    def end_batch(self) -> None:
        self._batches += 1
        if self._batches >= self.batches_per_shard:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            items = (self._keys, self._features, self._grids, self._sizes)
            self._reset()
            self._wait()
            self.shards += 1
            self._future = self._pool.submit(self._write, self.shards, *items)
        self._batches = 0

    def _wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def _crash(self, stage: str, n: int) -> None:
        if self._kill == (stage, n):
            os.kill(os.getpid(), signal.SIGKILL)

    def _write(self, n: int, keys, features, grids, sizes) -> None:
        rows = torch.tensor([0] + [f.shape[0] for f in features]).cumsum(0)
        views = torch.tensor([0] + [g.shape[0] for g in grids]).cumsum(0)
        path = self.root / SHARD_DIR / shard_name(self.attempt, self.rank, n - 1)
        write_shard(
            path,
            keys=keys,
            features=torch.cat(features),
            offsets=rows,
            grid_thw=torch.cat(grids),
            view_offsets=views,
            sizes=torch.tensor(sizes, dtype=torch.int64).view(-1, 2),
            digest=self.digest,
            before_rename=lambda: self._crash("before", n),
        )
        self._crash("after", n)


def _forward(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, hidden: bool) -> torch.Tensor:
    with torch.inference_mode():
        out = model.forward_features(pixel_values, grid_thw) if hidden else model(pixel_values, grid_thw)
    return out.cpu()


def encode_batch(model, batch: dict[str, Any], *, hidden: bool, device: torch.device) -> list:
    """The encoder on one prepared batch: per item ``(features (rows, dim), grid_thw (views, 3))``, or an
    error message for an item that does not fit in memory even alone."""
    cfg = model.config
    dtype = model.patch_embed.proj.weight.dtype
    grid = batch["grid_thw"]
    views = [v for _, v, _, _ in batch["items"]]
    try:
        px = batch["pixel_values"].to(device=device, dtype=dtype, non_blocking=True)
        out = _forward(model, px, grid, hidden)
    except (torch.OutOfMemoryError, MemoryError) as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(views) == 1:
            return [f"out of memory encoding {batch['pixel_values'].shape[0]} patches alone: {e}"]
        # encode the items one by one: a batch that does not fit may still hold items that do
        patches = torch.split((grid[:, 0] * grid[:, 1] * grid[:, 2]), views)
        rows = torch.split(batch["pixel_values"], [int(p.sum()) for p in patches])
        grids = torch.split(grid, views)
        results = []
        for item, px_i, g in zip(batch["items"], rows, grids):
            results += encode_batch(
                model, {"pixel_values": px_i, "grid_thw": g, "items": [item]}, hidden=hidden, device=device
            )
        return results
    per_view = grid[:, 0] * grid[:, 1] * grid[:, 2]
    if not hidden:
        per_view = per_view // cfg.spatial_merge_size**2
    per_item = [int(p.sum()) for p in torch.split(per_view, views)]
    return list(zip(torch.split(out, per_item), torch.split(grid, views)))


def encode_rank(
    model,
    records: list[Record],
    batches: list[list[int]],
    proc,
    writer: ShardWriter,
    *,
    hidden: bool,
    device: torch.device,
    workers: int,
    progress: bool,
    desc: str,
) -> tuple[RankStats, list[tuple[Record, str]]]:
    """Encode this rank's ``batches`` (lists of indices into ``records``) into shards; returns the
    rank's stats and the items that failed, with why."""
    stats = RankStats(rank=writer.rank)
    errors: list[tuple[Record, str]] = []
    total = sum(len(b) for b in batches)
    start = time.perf_counter()
    dataset = Batches(records, batches, proc)
    it = iter(loader(dataset, workers, pin_memory=device.type == "cuda"))  # forks the workers first
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress or not total, smoothing=0.05)
    try:
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            stats.wait_s += time.perf_counter() - t
            if batch is None:
                break
            stats.decode_s += batch["seconds"]
            errors += [(records[i], why) for i, why in batch["errors"]]
            if batch["items"]:
                t = time.perf_counter()
                results = encode_batch(model, batch, hidden=hidden, device=device)
                stats.encoder_s += time.perf_counter() - t
                for (i, _, height, width), result in zip(batch["items"], results):
                    record = records[i]
                    if isinstance(result, str):
                        errors.append((record, result))
                        continue
                    features, grid = result
                    writer.add(record.key, features, grid, (height, width))
                    stats.items += 1
                    stats.patches += int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
                    stats.rows += features.shape[0]
                stats.batches += 1
                t = time.perf_counter()
                writer.end_batch()
                stats.write_s += time.perf_counter() - t
            bar.update(len(batch["items"]) + len(batch["errors"]))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.patches / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
        t = time.perf_counter()
        writer.close()
        stats.write_s += time.perf_counter() - t
    finally:
        bar.close()
        dataset.close()
    stats.shards = writer.shards
    stats.loop_s = time.perf_counter() - start
    return stats, errors


__all__ = ["KILL_ENV", "RankStats", "ShardWriter", "encode_batch", "encode_rank"]
