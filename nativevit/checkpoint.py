"""Checkpoint directories: read them as released, write them the same way. safetensors only.

A released directory of any family of ``nativevit.config.FAMILIES`` holds ``config.json`` (the tower
described by ``vision_config``, in the release's field names) and either ``model.safetensors`` or
shards listed by ``model.safetensors.index.json``. The top-level ``model_type`` picks the family (or,
for a LLaVA release, ``vision_config.model_type``), and so the meaning of the ``vision_config`` fields,
the prefixes under which the tower is keyed (``Family.prefixes``: ``visual.*`` / ``model.visual.*`` for
the Qwen releases, ``vision_tower.*`` for Mistral 3, ...) and how its keys map onto this model's
(``Family.key_renames``); every other key (the language model) is ignored and its shards are never
opened. A vision-only directory (the towers' own ``save_pretrained`` in transformers: tower fields at
the top level of config.json, ``model_type`` ``qwen2_vl_vision``, ``siglip2_vision_model``, ...,
unprefixed keys) loads too.

The directory is not trusted. Every weight file must resolve (symlinks followed) inside it, or, for a
``huggingface_hub`` cache snapshot (``models--*/snapshots/<revision>/``), to that repository's own
``blobs/``; otherwise nothing is opened. Malformed files raise ``ValueError`` naming the file. The
config is checked against the safetensors headers (names and shapes, no tensor data) before a tensor
is read or the model is built, so a config that disagrees with the weights fails at once.

Saving is atomic: the new files are written in a temporary folder inside the target, then renamed into
place. A save that fails leaves the earlier checkpoint as it was; one that succeeds removes the files
of an earlier save that it does not write itself (``config.json``, ``model.safetensors``, the index
and ``model-XXXXX-of-YYYYY.safetensors`` shards only: other files are never touched).

Nothing here unpickles: ``.bin``/``.pt`` files are refused.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import FAMILIES, Family, VisionConfig, family

if TYPE_CHECKING:
    from .model import NativeViT

# Every prefix under which some family's releases key their tower.
TOWER_PREFIXES = tuple(dict.fromkeys(p for f in FAMILIES.values() for p in (*f.prefixes, *f.merger_prefixes)))
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Top-level model types of the releases that carry a supported tower, and of vision-only directories.
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)
# (``<release>_vision``: the Qwen towers; ``<release>_vision_model``: SigLIP2's ``siglip2_vision_model``)
VISION_ONLY_MODEL_TYPES = tuple(
    f"{t}{suffix}" for t in SUPPORTED_MODEL_TYPES for suffix in ("_vision", "_vision_model")
)

_SHARD_FILE = re.compile(r"model-[0-9]{5,}-of-[0-9]{5,}\.safetensors")
_BLOCK_KEY = re.compile(r"blocks\.(0|[1-9][0-9]{0,17})\.(.+)")
_SAVE_DIR_PREFIX = ".nativevit-save-"
_SHOWN = 5  # keys named per kind of mismatch in an error message


# ---------------------------------------------------------------- reading files


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; ``ValueError`` naming the file for anything else."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid UTF-8 ({e})") from e
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got a JSON {type(raw).__name__}")
    return raw


def _interrupted_save_hint(path: Path) -> str:
    left = sorted(p.name for p in path.glob(_SAVE_DIR_PREFIX + "*") if p.is_dir())
    if not left:
        return ""
    return (
        f" (an interrupted or running save_pretrained left {left}: the earlier checkpoint's files are in "
        "'old' there)"
    )


def _vision_config(config_file: Path, vision: Any, **kwargs: Any) -> VisionConfig:
    if not isinstance(vision, dict):
        raise ValueError(f"{config_file}: 'vision_config' must be a JSON object, got {type(vision).__name__}")
    rope = vision.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"{config_file}: 'rope_parameters' must be a JSON object, got {type(rope).__name__}")
    try:
        return VisionConfig.from_hf_dict(vision, **kwargs)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_file}: {e}") from e


def read_config(path: Path) -> tuple[VisionConfig, bool]:
    """``(config, vision_only)`` from a checkpoint directory's ``config.json``.

    Raises ``FileNotFoundError`` when there is none and ``ValueError`` (naming the file) when it is not
    a supported tower's config.
    """
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json{_interrupted_save_hint(path)}")
    raw = _read_json_object(config_file)
    model_type = raw.get("model_type")
    if "vision_config" in raw:
        vision = raw["vision_config"]
        vision_type = vision.get("model_type") if isinstance(vision, dict) else None
        if model_type not in SUPPORTED_MODEL_TYPES and vision_type in SUPPORTED_MODEL_TYPES:
            # a generic VLM (LLaVA) around a supported tower (Pixtral-12B): the tower's type decides
            model_type = vision_type
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{config_file}: model_type {model_type!r} is not supported; nativevit loads "
                f"{SUPPORTED_MODEL_TYPES} checkpoints"
            )
        text = raw.get("text_config") or raw
        if not isinstance(text, dict):
            raise ValueError(f"{config_file}: 'text_config' must be a JSON object, got {type(text).__name__}")
        cfg = _vision_config(
            config_file,
            raw["vision_config"],
            text_hidden_size=text.get("hidden_size"),
            model_type=family(model_type).name,
            text_config=text,
        )
        return cfg, False
    # a tower's own save: "<type>_vision", or a supported type without a vision_config (Pixtral's tower
    # config is model_type "pixtral")
    if isinstance(model_type, str) and model_type in VISION_ONLY_MODEL_TYPES + SUPPORTED_MODEL_TYPES:
        return _vision_config(config_file, raw, model_type=family(model_type).name), True
    raise ValueError(
        f"{config_file}: neither a 'vision_config' entry nor a vision-tower model_type "
        f"{VISION_ONLY_MODEL_TYPES}; got model_type {model_type!r}"
    )


def _allowed_roots(path: Path) -> tuple[Path, Path | None]:
    """``(checkpoint directory, hub blobs folder or None)``, both resolved."""
    root = path.resolve()
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--"):
        return root, repo / "blobs"
    return root, None


def _resolve_inside(path: Path, fname: str, roots: tuple[Path, Path | None], listed_in: Path) -> Path:
    """``path / fname`` with symlinks resolved; ``ValueError`` when that lies outside the checkpoint."""
    try:
        resolved = (path / fname).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, NUL bytes
        raise ValueError(f"{listed_in}: cannot resolve {fname!r} ({e})") from e
    root, blobs = roots
    if (resolved != root and resolved.is_relative_to(root)) or (
        blobs is not None and resolved.parent == blobs
    ):
        return resolved
    raise ValueError(
        f"{listed_in}: {fname!r} resolves to {resolved}, outside the checkpoint directory {root}; "
        "refusing to load it"
    )


def _weight_files(path: Path) -> dict[str, tuple[Path, list[str] | None]]:
    """Each safetensors file (as named in the directory) -> (its resolved path, the keys the index
    lists for it, or None for ``model.safetensors`` without an index: all its keys). Every file is
    checked to lie inside the checkpoint before any is opened."""
    roots = _allowed_roots(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        keys: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise ValueError(f"{index}: weight_map[{key!r}] must be a file name, got {fname!r}")
            keys.setdefault(fname, []).append(key)
        files = {fname: (_resolve_inside(path, fname, roots, index), k) for fname, k in keys.items()}
        for fname, (resolved, _) in files.items():
            if not resolved.is_file():
                raise FileNotFoundError(f"{index} lists {fname}, which is not in {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {SINGLE_FILE: (_resolve_inside(path, SINGLE_FILE, roots, path), None)}
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    )
    raise FileNotFoundError(
        f"{path}: no {INDEX_FILE} and no {SINGLE_FILE}{hint}{_interrupted_save_hint(path)}"
    )


def _open(file: Path, shown: Path):
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{shown}: not a valid safetensors file ({e})") from e


def tower_key(key: str, vision_only: bool, fam: Family) -> str | None:
    """This model's name for a checkpoint key of a ``fam`` release, or None when the key is not part of
    the tower (release names are mapped through ``fam.key_renames``)."""
    for prefix in fam.merger_prefixes:  # a merger keyed beside the tower (ERNIE-4.5-VL's resampler)
        if key.startswith(prefix):
            return fam.model_key("merger." + key[len(prefix) :])
    for prefix in fam.prefixes:
        if key.startswith(prefix):
            return _tower_name(key[len(prefix) :], fam)
    return _tower_name(key, fam) if vision_only else None


def _tower_name(key: str, fam: Family) -> str | None:
    """This model's name for the release tower key ``key`` (prefix removed); None for a key the release
    carries but the tower does not use (``fam.ignored_keys``)."""
    if any(key == p or key.startswith(p + ".") for p in fam.ignored_keys):
        return None
    return fam.model_key(key)


# (name shown in messages, resolved file, {checkpoint key: tower key}) per file holding tower tensors
_Sources = list[tuple[Path, Path, dict[str, str]]]


def _read_tower_shapes(
    path: str | Path, vision_only: bool, fam: Family
) -> tuple[dict[str, tuple[int, ...]], _Sources]:
    """The tower's tensor shapes, by this model's keys, from the safetensors headers (no data read),
    and where each tensor is. Shards without tower keys are not opened."""
    path = Path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    sources: _Sources = []
    for fname, (file, listed) in _weight_files(path).items():
        shown = path / fname
        if listed is not None and not any(tower_key(k, vision_only, fam) is not None for k in listed):
            continue
        with _open(file, shown) as f:
            present = f.keys()
            candidates = present if listed is None else listed
            wanted = {k: n for k in candidates if (n := tower_key(k, vision_only, fam)) is not None}
            present = set(present)
            for key, name in wanted.items():
                if key not in present:
                    raise ValueError(f"{shown}: index lists key {key!r}, but the file lacks it")
                if name in shapes:
                    raise ValueError(f"{path}: tower key {name!r} appears twice (e.g. under two prefixes)")
                try:
                    shapes[name] = tuple(f.get_slice(key).get_shape())
                except SafetensorError as e:
                    raise ValueError(f"{shown}: cannot read the header of {key!r} ({e})") from e
        if wanted:
            sources.append((shown, file, wanted))
    if not shapes:
        raise ValueError(
            f"{path}: no vision-tower tensors found (expected keys under {' or '.join(fam.prefixes)})"
        )
    return shapes, sources


def _read_tensors(sources: _Sources) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shown, file, wanted in sources:
        with _open(file, shown) as f:
            for key, name in wanted.items():
                try:
                    state[name] = f.get_tensor(key)
                except (SafetensorError, RuntimeError, TypeError) as e:
                    raise ValueError(f"{shown}: cannot read tensor {key!r} ({e})") from e
    return state


def read_tower_state_dict(path: str | Path, vision_only: bool, fam: Family) -> dict[str, torch.Tensor]:
    """The tower's tensors, renamed to this model's keys; shards without tower keys are not opened."""
    return _read_tensors(_read_tower_shapes(path, vision_only, fam)[1])


# ---------------------------------------------------------------- checking names and shapes


def _natural(key: str) -> tuple[str | tuple[int, str], ...]:
    """Sort key that puts ``blocks.2.`` before ``blocks.10.`` (digit runs compared by length, then text)."""
    return tuple((len(p), p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", key)))


@dataclasses.dataclass
class _Expected:
    """The model's keys and shapes: ``fixed`` plus, for each of ``depth`` blocks, ``per_block`` under
    ``blocks.{i}.`` (so a config's 100000 blocks need not be built, or listed, to be compared)."""

    fixed: dict[str, tuple[int, ...]]
    per_block: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    depth: int = 0

    def __len__(self) -> int:
        return len(self.fixed) + self.depth * len(self.per_block)

    def shape(self, key: str) -> tuple[int, ...] | None:
        if key in self.fixed:
            return self.fixed[key]
        m = _BLOCK_KEY.fullmatch(key)
        if m is not None and int(m[1]) < self.depth:
            return self.per_block.get(m[2])
        return None

    def keys(self) -> Iterator[str]:
        """Every key, lazily, in natural order."""
        suffixes = sorted(self.per_block, key=_natural)
        blocks = (f"blocks.{i}.{s}" for i in range(self.depth) for s in suffixes)
        return heapq.merge(sorted(self.fixed, key=_natural), blocks, key=_natural)


def _listing(kind: str, count: int, shown: list[str]) -> str:
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return f"{kind} ({count}): {shown}{more}"


def _check(expected: _Expected, found: dict[str, tuple[int, ...]], where: str, note: str = "") -> None:
    """Raise one ``ValueError`` counting missing keys, unexpected keys and shape mismatches and naming
    the first few of each."""
    unexpected, mismatched, matched = [], [], 0
    for key in sorted(found, key=_natural):
        shape = expected.shape(key)
        if shape is None:
            unexpected.append(key)
            continue
        matched += 1
        if tuple(shape) != tuple(found[key]):
            mismatched.append(f"{key}: checkpoint {tuple(found[key])} vs model {tuple(shape)}")
    n_missing = len(expected) - matched
    missing = list(islice((k for k in expected.keys() if k not in found), _SHOWN)) if n_missing else []
    problems = []
    if n_missing:
        problems.append(_listing("missing keys", n_missing, missing))
    if unexpected:
        problems.append(_listing("unexpected keys", len(unexpected), unexpected[:_SHOWN]))
    if mismatched:
        problems.append(_listing("shape mismatches", len(mismatched), mismatched[:_SHOWN]))
    if problems:
        note = f" ({note})" if note else ""
        raise ValueError(f"{where}: checkpoint does not match the model config{note}; " + "; ".join(problems))


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], where: str) -> None:
    """Raise one ``ValueError`` counting every missing key, unexpected key and shape mismatch and naming
    the first few of each."""
    _check(
        _Expected({k: tuple(s) for k, s in expected.items()}),
        {k: tuple(v.shape) for k, v in state.items()},
        where,
    )


def _block_template(cls: type[NativeViT], cfg: VisionConfig) -> _Expected:
    """Expected keys and shapes of ``cfg``'s tower from a model of at most a few blocks, on the meta
    device: the blocks are all alike, so one block's keys stand for each of ``cfg.depth``."""
    n_stack = len(cfg.deepstack_visual_indexes)
    small = dataclasses.replace(
        cfg, depth=max(1, n_stack), deepstack_visual_indexes=tuple(range(n_stack)), fullatt_block_indexes=()
    )
    with torch.device("meta"):
        model = cls(small)
    fixed, per_block = {}, {}
    for key, tensor in model.state_dict().items():
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:
            fixed[key] = tuple(tensor.shape)
        elif m[1] == "0":
            per_block[m[2]] = tuple(tensor.shape)
    return _Expected(fixed, per_block, cfg.depth)


# ---------------------------------------------------------------- loading


def load_pretrained(
    cls: type[NativeViT],
    path: str | Path,
    *,
    attn_backend: str = "auto",
    rope_backend: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> NativeViT:
    """Build the tower described by ``path/config.json`` and load its weights strictly.

    ``dtype`` defaults to the checkpoint's own dtype (that of its first tower tensor); ``device`` to the
    CPU. Names and shapes are checked against the safetensors headers before any tensor is read.
    Raises ``FileNotFoundError`` (no directory, config or weights) or ``ValueError`` (malformed files,
    weights outside the directory, a config that does not match the weights).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    cfg, vision_only = read_config(path)
    shapes, sources = _read_tower_shapes(path, vision_only, cfg.family)
    blocks = {int(m[1]) for key in shapes if (m := _BLOCK_KEY.fullmatch(key))}
    if len(blocks) != cfg.depth or (blocks and max(blocks) != cfg.depth - 1):
        # the config's depth disagrees with the weights: say so without building cfg.depth blocks
        held = f"blocks {min(blocks)}..{max(blocks)}" if blocks else "none"
        note = f"config.json gives depth {cfg.depth}; the weights hold {len(blocks)} blocks ({held})"
        _check(_block_template(cls, cfg), shapes, str(path), note)
    with torch.device("meta"):
        model = cls(cfg, attn_backend=attn_backend, rope_backend=rope_backend)
    _check(_Expected({k: tuple(v.shape) for k, v in model.state_dict().items()}), shapes, str(path))
    state = _read_tensors(sources)
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------- saving


def _owned(name: str) -> bool:
    """Is ``name`` a file that ``save_pretrained`` writes (and so may replace or remove)?"""
    return name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name) is not None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    _fsync(file)


class _UndoFailed(OSError):
    """A save failed and the earlier checkpoint could not be put back (its files are kept aside)."""


def _swap_in(path: Path, new: Path, old: Path, names: list[str]) -> None:
    """Move ``names`` from ``new`` into ``path`` and the earlier save's files from ``path`` into ``old``.

    Order: the old ``config.json`` leaves first and the new one arrives last, so a reader sees the old
    checkpoint, then no checkpoint (no config.json), then the new one: never a mix. On failure the
    earlier files are put back.
    """
    leaving = [p.name for p in path.iterdir() if _owned(p.name) and (p.is_file() or p.is_symlink())]
    leaving.sort(key=lambda n: (n != CONFIG_FILE, n != INDEX_FILE, n))
    arriving = sorted(names, key=lambda n: (n == CONFIG_FILE, n == INDEX_FILE, n))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in leaving:
            os.replace(path / name, old / name)
            moved_out.append(name)
        for name in arriving:
            os.replace(new / name, path / name)
            moved_in.append(name)
    except BaseException as e:
        try:
            for name in reversed(moved_in):
                os.replace(path / name, new / name)
            for name in reversed(moved_out):
                os.replace(old / name, path / name)
        except OSError as undo:
            raise _UndoFailed(
                f"save_pretrained into {path} failed ({e}) and the earlier checkpoint could not be put "
                f"back ({undo}): its files are in {old}"
            ) from e
        raise
    _fsync(path)


def _foreign_tensors(path: Path) -> int:
    """How many tensors of the checkpoint already in ``path`` are not the tower's (a full VLM release's
    language model): a tower-only save over it would delete them. Unreadable files count as none."""
    try:
        index = path / INDEX_FILE
        if index.is_file():
            keys = list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        elif (path / SINGLE_FILE).is_file():
            with safe_open(path / SINGLE_FILE, framework="pt") as f:
                keys = list(f.keys())
        else:
            return 0
    except Exception:  # noqa: BLE001  (a broken earlier save is replaced, as before)
        return 0
    return sum(1 for k in keys if not k.startswith(TOWER_PREFIXES))


def release_checkpoint_key(key: str, fam: Family) -> str:
    """The release's full checkpoint key for this model's parameter ``key``: under ``fam.key_prefix``,
    or under ``fam.merger_prefixes[0]`` for a merger keyed beside the tower."""
    name = fam.release_key(key)
    if fam.merger_prefixes and name.startswith("merger."):
        return fam.merger_prefixes[0] + name[len("merger.") :]
    return fam.key_prefix + name


def save_pretrained(model: NativeViT, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``config.json`` and safetensors shards (+ index when more than one) in the layout of the
    family's releases: top-level ``model_type`` and ``architectures``, ``vision_config`` in the
    release's field names, tower keys under ``visual.`` (Qwen2-VL, Qwen2.5-VL) or ``model.visual.``
    (Qwen3-VL).

    Atomic: the files are written in a temporary folder inside ``path`` and renamed into place; if
    anything fails the earlier checkpoint in ``path`` is left as it was. Files of an earlier save that
    this one does not write (``config.json``, ``model.safetensors``, ``model.safetensors.index.json``,
    ``model-XXXXX-of-YYYYY.safetensors``) are removed; other files in ``path`` are kept. A directory
    holding a full model (tensors outside the tower, e.g. a released VLM's language model) is refused:
    saving the tower there would delete them.
    """
    path = Path(path)
    foreign = _foreign_tensors(path) if path.is_dir() else 0
    if foreign:
        raise ValueError(
            f"{path} holds a full model checkpoint ({foreign} tensors outside the vision tower); "
            "save_pretrained writes a tower-only checkpoint and would delete them: "
            "save into another directory"
        )
    fam = model.config.family
    config = {
        "model_type": fam.model_types[0],  # the release's (Pixtral's is "mistral3")
        "architectures": [fam.architecture],
        "vision_config": model.config.to_hf_dict(),
    }
    if fam.text_fields:
        config["text_config"] = model.config.text_hf_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][release_checkpoint_key(key, fam)] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        files = {SINGLE_FILE: shards[0]}
    else:
        files = {f"model-{i:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards, 1)}

    path.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_SAVE_DIR_PREFIX, dir=path))
    keep_work = False
    try:
        new, old = work / "new", work / "old"
        new.mkdir()
        old.mkdir()
        for fname, shard in files.items():
            save_file(shard, str(new / fname), metadata={"format": "pt"})
            _fsync(new / fname)
        names = [CONFIG_FILE, *files]
        if len(files) > 1:
            index = {
                "metadata": {
                    "total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())
                },
                "weight_map": {key: fname for fname, shard in files.items() for key in shard},
            }
            _write_json(new / INDEX_FILE, index)
            names.append(INDEX_FILE)
        _write_json(new / CONFIG_FILE, config)
        try:
            _swap_in(path, new, old, names)
        except _UndoFailed:
            keep_work = True
            raise
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
