"""The output folder of ``nativevit encode``: shards, manifest, settings, and ``load_features``.

    DIR/
      encode.json                settings the features depend on (model and weights digest, dtype,
                                 features, strategy, processor, input); a rerun must match them
      shards/shard-AAAA-RRRRR-SSSSSS.safetensors
                                 attempt AAAA, rank RRRRR, sequence SSSSSS; each holds the features of
                                 a few token-budget batches
      manifest.parquet           one row per item: key, shard, offset, rows, grid, views, height, width
      errors.jsonl               one JSON object per input that was not encoded: key, source, error
      summary.json               the last run: items, tokens, items/s, tokens/s, packer padding, errors

A shard is a safetensors file with ``features`` ``(rows, dim)`` (every item's rows, concatenated),
``offsets`` ``(n+1,)`` int64 (item ``i`` is rows ``offsets[i]:offsets[i+1]``), ``grid_thw`` ``(views, 3)``
int64 (every item's views), ``view_offsets`` ``(n+1,)`` int64, ``sizes`` ``(n, 2)`` int64 (height, width
of the input); its metadata holds the ``keys`` (a JSON list) and the digest of the settings. A shard
describes itself, so it is the unit of completion: it is written under a temporary name beside its
final one and renamed into place when complete, and ``manifest.parquet`` is rebuilt from the shards on
disk (the rows of shards it already lists are reused, only new shards' headers are read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "nativevit-features"
FORMAT_VERSION = 1
SETTINGS_FILE = "encode.json"
MANIFEST_FILE = "manifest.parquet"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "summary.json"
SHARD_DIR = "shards"
LOCK_FILE = ".encode.lock"
TMP_SUFFIX = ".tmp"
SHARD_NAME = re.compile(r"shard-(\d{4,})-(\d{5,})-(\d{6,})\.safetensors")
COLUMNS = ("key", "shard", "offset", "rows", "grid", "views", "height", "width")
_OPEN_SHARDS = 32  # shard files a FeatureStore keeps open (memory-mapped) at once
_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), restored at once
os.umask(_UMASK)


def shard_name(attempt: int, rank: int, seq: int) -> str:
    return f"shard-{attempt:04d}-{rank:05d}-{seq:06d}.safetensors"


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: Path, write: Callable[[Path], None], *, before_rename: Callable[[], None] | None = None
):
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then rename it into place:
    readers (and a rerun after a crash) see the whole file or none of it."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would create it (some writers make files 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


# ----------------------------------------------------------------------------- shards


def write_shard(
    path: Path,
    *,
    keys: list[str],
    features: torch.Tensor,
    offsets: torch.Tensor,
    grid_thw: torch.Tensor,
    view_offsets: torch.Tensor,
    sizes: torch.Tensor,
    digest: str,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Write one shard atomically (see the module docstring for its tensors)."""
    tensors = {
        "features": features.contiguous(),
        "offsets": offsets,
        "grid_thw": grid_thw,
        "view_offsets": view_offsets,
        "sizes": sizes,
    }
    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "settings": digest,
        "keys": json.dumps(keys),
    }
    write_atomic(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), before_rename=before_rename
    )


def read_shard_rows(path: Path, rel: str, digest: str | None) -> dict[str, list]:
    """Manifest rows (column -> values) of one shard, from its header and small index tensors, checked
    for consistency; ``ValueError`` naming the shard when it is not a complete shard of these settings."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not a nativevit features shard")
            if digest is not None and meta.get("settings") != digest:
                raise ValueError("made with other settings than this folder's encode.json")
            keys = json.loads(meta["keys"])
            rows = f.get_slice("features").get_shape()[0]
            offsets = f.get_tensor("offsets").tolist()
            grid = f.get_tensor("grid_thw").tolist()
            view_offsets = f.get_tensor("view_offsets").tolist()
            sizes = f.get_tensor("sizes").tolist()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # safetensors reports a damaged header with its own exception class
        raise ValueError(f"{path}: unreadable shard ({e})") from None
    n = len(keys)
    if (
        len(offsets) != n + 1
        or len(view_offsets) != n + 1
        or len(sizes) != n
        or offsets[0] != 0
        or offsets[-1] != rows
        or view_offsets[-1] != len(grid)
        or any(a >= b for a, b in zip(offsets, offsets[1:]))
    ):
        raise ValueError(f"{path}: inconsistent shard index")
    return {
        "key": keys,
        "shard": [rel] * n,
        "offset": offsets[:-1],
        "rows": [b - a for a, b in zip(offsets, offsets[1:])],
        "grid": [grid[a:b] for a, b in zip(view_offsets, view_offsets[1:])],
        "views": [b - a for a, b in zip(view_offsets, view_offsets[1:])],
        "height": [s[0] for s in sizes],
        "width": [s[1] for s in sizes],
    }


def shard_files(root: Path) -> list[str]:
    """Complete shards on disk, as paths relative to ``root``, sorted."""
    folder = root / SHARD_DIR
    if not folder.is_dir():
        return []
    return sorted(f"{SHARD_DIR}/{name}" for name in os.listdir(folder) if SHARD_NAME.fullmatch(name))


# ----------------------------------------------------------------------------- manifest


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("offset", pa.int64()),
            ("rows", pa.int64()),
            ("grid", pa.list_(pa.list_(pa.int64(), 3))),
            ("views", pa.int64()),
            ("height", pa.int64()),
            ("width", pa.int64()),
        ]
    )


def collect_manifest(root: Path, *, digest: str | None = None, write: bool = False, on_corrupt=None):
    """The manifest (a pyarrow Table, one row per item, sorted by shard and offset) of the shards on
    disk: ``manifest.parquet``'s rows of shards still there, plus the rows of shards it does not list
    yet (read from their headers). ``digest``: refuse shards of other settings. ``write``: save it as
    ``manifest.parquet`` when it changed. ``on_corrupt(rel, error)``: called for an unreadable shard,
    which is then left out (default: raise ``ValueError``). A key in two shards raises ``ValueError``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = _schema()
    manifest = root / MANIFEST_FILE
    on_disk = shard_files(root)
    old = schema.empty_table()
    if manifest.is_file():
        try:
            old = pq.read_table(manifest)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{manifest}: cannot read: {e}") from None
        if old.schema.names != list(COLUMNS):
            raise ValueError(f"{manifest}: unexpected columns {old.schema.names}")
        old = old.cast(schema)
    listed = set(old.column("shard").to_pylist()) if old.num_rows else set()
    kept = old.filter(pc.is_in(old.column("shard"), pa.array(on_disk, pa.string())))
    parts = [kept]
    for rel in on_disk:
        if rel in listed:
            continue
        try:
            parts.append(pa.table(read_shard_rows(root / rel, rel, digest), schema=schema))
        except ValueError as e:
            if on_corrupt is None:
                raise
            on_corrupt(rel, e)
    table = pa.concat_tables(parts).combine_chunks()
    if table.num_rows:
        table = table.take(pc.sort_indices(table, [("shard", "ascending"), ("offset", "ascending")]))
        keys = table.column("key")
        if pc.count_distinct(keys).as_py() != table.num_rows:
            counts = pc.value_counts(keys)
            twice = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
            raise ValueError(f"{root}: item {twice!r} is in more than one shard")
    changed = len(parts) > 1 or kept.num_rows != old.num_rows or not manifest.is_file()
    if write and changed:
        write_atomic(manifest, lambda tmp: pq.write_table(table, tmp))
    return table


# ----------------------------------------------------------------------------- reading


class FeatureStore(Mapping):
    """A read-only mapping over an encode output folder: ``store[key] -> (features, grid_thw)``.

    ``features``: ``(rows, dim)`` tensor of the item, sliced from its memory-mapped shard (a copy of
    those rows only; nothing else is read); ``grid_thw``: ``(views, 3)`` int64. ``len`` is the number of
    items encoded; iteration gives the keys in manifest order. Shards written after the last
    ``manifest.parquet`` (a run that was stopped) are read too. Picklable (open shards are reopened
    lazily), so it can serve a ``DataLoader``'s workers.

    Attributes: ``root``, ``settings`` (``encode.json``), ``manifest`` (the pyarrow Table).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        settings_file = self.root / SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{self.root}: no {SETTINGS_FILE}; not a nativevit encode output folder")
        self.settings = read_json(settings_file)
        self.manifest = collect_manifest(self.root)
        m = self.manifest
        self._keys: list[str] = m.column("key").to_pylist()
        self._index = {k: i for i, k in enumerate(self._keys)}
        shard = m.column("shard").dictionary_encode().combine_chunks()
        self._shards: list[str] = shard.dictionary.to_pylist()
        self._shard = shard.indices.to_numpy(zero_copy_only=False)
        self._offset = m.column("offset").to_numpy()
        self._rows = m.column("rows").to_numpy()
        grid = m.column("grid").combine_chunks()
        self._grid_offsets = grid.offsets.to_numpy()
        self._grid = grid.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 3)
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _handle(self, shard: int):
        f = self._open.get(shard)
        if f is None:
            f = safe_open(str(self.root / self._shards[shard]), framework="pt")
            self._open[shard] = f
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return f

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[key]
        start = int(self._offset[i])
        features = self._handle(int(self._shard[i])).get_slice("features")[start : start + int(self._rows[i])]
        a, b = self._grid_offsets[i], self._grid_offsets[i + 1]
        return features, torch.from_numpy(np.array(self._grid[a:b], dtype=np.int64))

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {len(self)} items)"


def load_features(root: str | os.PathLike) -> FeatureStore:
    """The features that ``nativevit encode ... --out root`` wrote: a lazy, read-only mapping from key to
    ``(features, grid_thw)``; see :class:`FeatureStore`."""
    return FeatureStore(root)


__all__ = [
    "COLUMNS",
    "ERRORS_FILE",
    "FORMAT",
    "MANIFEST_FILE",
    "SETTINGS_FILE",
    "SHARD_DIR",
    "SUMMARY_FILE",
    "FeatureStore",
    "collect_manifest",
    "load_features",
    "read_shard_rows",
    "shard_files",
    "shard_name",
    "write_atomic",
    "write_shard",
]
