"""The inputs of ``nativevit encode``: what INPUT names, the items in it, their keys, and each item's
token count from its header.

INPUT is one of

* a folder: every image file under it (recursive, by extension, symlinked folders not followed), keyed
  by its path relative to the folder, with ``/`` separators (``cats/001.jpg``);
* a text file listing one image path per line (blank lines and lines starting with ``#`` skipped;
  relative paths are relative to the list's folder), keyed by the line as written;
* webdataset tar shards: one ``.tar`` file or a brace pattern (``data-{000..015}.tar``, expanded as
  webdataset expands it); members are grouped into samples by webdataset's rule (the member name up to
  the first dot of its base name is the key, the rest the field), and each sample's image field is the
  item, keyed by the sample's key.

Items are listed in *units* (a chunk of listed paths, or one tar shard), the grain at which ranks and
``DataLoader`` workers share the header scan. A shard is indexed once (member offsets, read with
``tarfile``, which skips member data by seeking), so workers read any item of it at random with one
``seek`` + ``read``: the token-balanced assignment over ranks needs random access, which a streaming
reader cannot give. Compressed shards (``.tar.gz``) cannot be read that way and are refused.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..image import header_size
from ..preprocess import ImageProcessor

# Image file extensions, in the order a webdataset sample's image field is picked when it has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KINDS = ("folder", "list", "webdataset")
# Listed paths per scan unit: small enough to spread a folder over ranks and workers, large enough that
# a unit's overhead (one pickled result) is negligible next to its header reads.
UNIT_ITEMS = 256
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


class InputError(ValueError):
    """INPUT names nothing that can be read (a usage error: exit status 2)."""


@dataclass(frozen=True)
class InputSpec:
    """What INPUT names: ``kind`` (one of ``KINDS``) and ``path`` (absolute: a folder, a list file, or
    the shard pattern with an absolute folder)."""

    kind: str
    path: str

    def shards(self) -> list[str]:
        """The shard paths of a webdataset pattern, expanded as webdataset expands URLs."""
        from webdataset.shardlists import expand_urls

        return list(expand_urls(self.path))


def resolve_input(text: str) -> InputSpec:
    """Classify INPUT; ``InputError`` (naming it) when it is none of the accepted kinds."""
    if not text:
        raise InputError("INPUT is empty")
    if os.path.isdir(text):
        return InputSpec("folder", os.path.abspath(text))
    lowered = text.lower()
    if lowered.endswith(_COMPRESSED_TAR):
        raise InputError(
            f"{text!r}: compressed tar shards cannot be read at random; decompress them to plain .tar"
        )
    if lowered.endswith(".tar"):
        spec = InputSpec(
            "webdataset", os.path.join(os.path.abspath(os.path.dirname(text)), os.path.basename(text))
        )
        if "{" not in text and not os.path.isfile(text):
            raise InputError(f"no tar shard at {text!r}")
        if not any(os.path.isfile(s) for s in spec.shards()):
            raise InputError(f"no tar shard matches {text!r}")
        return spec
    if os.path.isfile(text):
        if _is_image(text):
            raise InputError(f"{text!r} is an image file; give a folder, a list file or .tar shards")
        return InputSpec("list", os.path.abspath(text))
    raise InputError(f"{text!r} is not a folder, a list file or .tar shards")


# ---------------------------------------------------------------------------- records


class Record(NamedTuple):
    """One item as the header scan found it. ``source`` is a file path, or ``(shard, offset, size)`` of
    a tar member's data; ``patches`` its encoder tokens (patch rows over all views); ``height`` and
    ``width`` its size in px; ``error`` why it cannot be encoded (then the numbers are 0)."""

    key: str
    source: str | tuple[str, int, int]
    patches: int
    views: int
    height: int
    width: int
    error: str | None = None


def measure(proc: ImageProcessor, image, where: str) -> tuple[int, int, int, int]:
    """``(patches, views, height, width)`` of an image file from its header alone (no pixel decoded),
    with every size rule of ``proc`` applied (``ValueError`` naming the file, or ``where``)."""
    width, height = header_size(image, max_input_pixels=proc.max_input_pixels, where=where)
    try:
        if proc.strategy is None:
            _, h, w = proc.grid_for(height, width)
            return h * w, 1, height, width
        views = proc.strategy.layout(width, height)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from None
    return sum(v.num_patches for v in views), len(views), height, width


def _failed(key: str, source, error: Exception | str) -> Record:
    return Record(key, source, 0, 0, 0, 0, message(error))


def message(error: Exception | str) -> str:
    """One line for the errors file: the error's text without the processor's ``images[0]: `` label."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.removeprefix("images[0]: ")


# Errors that mean "this input is unreadable or refused", as opposed to a bug.
INPUT_ERRORS = (ValueError, TypeError, OSError, tarfile.TarError, EOFError)


@dataclass(frozen=True)
class FileUnit:
    """Listed image files: ``items`` are ``(key, path)``."""

    items: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return "\n".join(key for key, _ in self.items)

    def scan(self, proc: ImageProcessor, done: Collection[str]) -> list[Record]:
        out = []
        for key, path in self.items:
            try:
                out.append(Record(key, path, *measure(proc, path, "")))
            except INPUT_ERRORS as e:
                out.append(_failed(key, path, e))
        return out


@dataclass(frozen=True)
class TarUnit:
    """One webdataset tar shard."""

    shard: str

    @property
    def name(self) -> str:
        return self.shard

    def scan(self, proc: ImageProcessor, done: Collection[str]) -> list[Record]:
        out: list[Record] = []
        try:
            tf = tarfile.open(self.shard, mode="r:")
        except INPUT_ERRORS as e:
            return [_failed(self.shard, self.shard, f"cannot read the tar shard: {message(e)}")]
        with tf:
            broken = None
            try:
                samples = _samples(tf)  # iterating reads the member headers, seeking past the data
            except INPUT_ERRORS as e:  # a truncated or corrupt shard: keep the samples before the damage
                samples, broken = _samples(tf.members), e
            for key, fields in samples:
                if key in done:
                    continue
                member = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
                where = f"{self.shard}:{key}"
                if member is None:
                    out.append(_failed(key, where, f"no image in the sample (fields: {sorted(fields)})"))
                    continue
                source = (self.shard, member.offset_data, member.size)
                try:
                    f = tf.extractfile(member)
                    out.append(Record(key, source, *measure(proc, f, "")))
                except INPUT_ERRORS as e:
                    out.append(_failed(key, source, e))
            if broken is not None:
                out.append(_failed(self.shard, self.shard, f"the tar shard is damaged: {message(broken)}"))
        return out


def _samples(members) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """``(key, {field: member})`` of each sample, grouped as webdataset groups a stream: consecutive
    members with one key are one sample; metadata members (``__name__``) are skipped."""
    from webdataset.tariterators import base_plus_ext

    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for member in members:
        if not member.isreg() or os.path.basename(member.name).startswith("__"):
            continue
        key, field = base_plus_ext(member.name)
        if key is None:
            continue
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1].setdefault(field.lower(), member)
    return samples


Unit = FileUnit | TarUnit


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def _folder_items(root: str) -> list[tuple[str, str]]:
    items = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if _is_image(name):
                path = os.path.join(folder, name)
                items.append((Path(os.path.relpath(path, root)).as_posix(), path))
    items.sort()
    return items


def _list_items(list_file: str) -> list[tuple[str, str]]:
    base = os.path.dirname(list_file)
    items = []
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{list_file}: not a text file of image paths ({e})") from None
    for line in lines:
        key = line.strip()
        if key and not key.startswith("#"):
            items.append((key, os.path.join(base, os.path.expanduser(key))))
    return items


def list_units(spec: InputSpec, done: Collection[str]) -> list[Unit]:
    """The scan units of an input, in a fixed order (every rank lists the same units). Listed files whose
    key is in ``done`` are left out; a shard's members are filtered when it is scanned."""
    if spec.kind == "webdataset":
        return [TarUnit(s) for s in spec.shards()]
    items = _folder_items(spec.path) if spec.kind == "folder" else _list_items(spec.path)
    items = [item for item in items if item[0] not in done]
    return [FileUnit(tuple(items[i : i + UNIT_ITEMS])) for i in range(0, len(items), UNIT_ITEMS)]


# ---------------------------------------------------------------------------- reading items


class Opener:
    """Opens a record's source for ``ImageProcessor``: a path as is, a tar member as its bytes. Shard
    files stay open (one handle per shard, per process)."""

    def __init__(self):
        self._files: dict[str, io.BufferedReader] = {}

    def __call__(self, source: str | tuple[str, int, int]):
        if isinstance(source, str):
            return source
        shard, offset, size = source
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(shard, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{shard}: the tar member at byte {offset} is cut short")
        out = io.BytesIO(data)
        out.name = f"{shard}@{offset}"
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_ERRORS",
    "KINDS",
    "FileUnit",
    "InputError",
    "InputSpec",
    "Opener",
    "Record",
    "TarUnit",
    "list_units",
    "measure",
    "message",
    "resolve_input",
]
