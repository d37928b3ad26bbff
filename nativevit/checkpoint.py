"""Checkpoint directories: read them as released, write them the same way. safetensors only.

A released Qwen2-VL, Qwen2.5-VL or Qwen3-VL directory holds ``config.json`` (the tower described by
``vision_config``, in the release's field names) and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tower tensors are keyed ``visual.*`` (Hub files) or ``model.visual.*``
(transformers 5 in-memory names, and the Qwen3-VL Hub files); the top-level ``model_type``
picks the family, and so the meaning of the ``vision_config`` fields; every other key (the language
model) is ignored and its shards are never opened. A vision-only directory (the towers' own
``save_pretrained`` in transformers: tower fields at the top level of config.json, ``model_type``
``qwen2_vl_vision`` / ``qwen2_5_vl_vision`` / ``qwen3_vl_vision``, unprefixed keys) loads too.

Nothing here unpickles: ``.bin``/``.pt`` files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FAMILIES, VisionConfig, family

if TYPE_CHECKING:
    from .model import NativeViT

TOWER_PREFIXES = ("visual.", "model.visual.")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Top-level model types of the releases that carry a supported tower, and of vision-only directories.
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)
VISION_ONLY_MODEL_TYPES = tuple(f"{t}_vision" for t in SUPPORTED_MODEL_TYPES)


def read_config(path: Path) -> tuple[VisionConfig, bool]:
    """``(config, vision_only)`` from a checkpoint directory's ``config.json``."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    model_type = raw.get("model_type")
    if "vision_config" in raw:
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{config_file}: model_type {model_type!r} is not supported; nativevit loads "
                f"{SUPPORTED_MODEL_TYPES} checkpoints"
            )
        text = raw.get("text_config") or raw
        cfg = VisionConfig.from_hf_dict(
            raw["vision_config"], text_hidden_size=text.get("hidden_size"), model_type=family(model_type).name
        )
        return cfg, False
    if model_type in VISION_ONLY_MODEL_TYPES:
        return VisionConfig.from_hf_dict(raw, model_type=family(model_type).name), True
    raise ValueError(
        f"{config_file}: neither a 'vision_config' entry nor a vision-tower model_type "
        f"{VISION_ONLY_MODEL_TYPES}; got model_type {model_type!r}"
    )


def _weight_files(path: Path) -> dict[str, list[str]]:
    """Map each safetensors file to the keys it holds (from the index when there is one)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        for fname in files:
            if not (path / fname).is_file():
                raise FileNotFoundError(f"{index} lists {fname}, which is not in {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" (found {pickled}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    )
    raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no {SINGLE_FILE}{hint}")


def tower_key(key: str, vision_only: bool) -> str | None:
    """The tower's own name for a checkpoint key, or None when the key is not part of the tower."""
    for prefix in TOWER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key if vision_only else None


def read_tower_state_dict(path: str | Path, vision_only: bool) -> dict[str, torch.Tensor]:
    """The tower's tensors, renamed to this model's keys; shards without tower keys are not opened."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for fname, keys in _weight_files(path).items():
        wanted = {k: name for k in keys if (name := tower_key(k, vision_only)) is not None}
        if not wanted:
            continue
        with safe_open(path / fname, framework="pt") as f:
            present = set(f.keys())
            for key, name in wanted.items():
                if key not in present:
                    raise ValueError(f"{path / fname}: index lists key {key!r}, but the file lacks it")
                if name in state:
                    raise ValueError(f"{path}: tower key {name!r} appears twice (e.g. under two prefixes)")
                state[name] = f.get_tensor(key)
    if not state:
        raise ValueError(
            f"{path}: no vision-tower tensors found (expected keys under {' or '.join(TOWER_PREFIXES)})"
        )
    return state


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], where: str) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError(f"{where}: checkpoint does not match the model config; " + "; ".join(problems))


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

    ``dtype`` defaults to the checkpoint's own dtype; ``device`` to the CPU.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    cfg, vision_only = read_config(path)
    state = read_tower_state_dict(path, vision_only)
    with torch.device("meta"):
        model = cls(cfg, attn_backend=attn_backend, rope_backend=rope_backend)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, str(path))
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_pretrained(model: NativeViT, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``config.json`` and safetensors shards (+ index when more than one) in the layout of the
    family's releases: top-level ``model_type`` and ``architectures``, ``vision_config`` in the
    release's field names, tower keys under ``visual.`` (Qwen2-VL, Qwen2.5-VL) or ``model.visual.``
    (Qwen3-VL)."""
    path = Path(path)
    fam = model.config.family
    architecture, prefix = fam.architecture, fam.key_prefix
    vision_config = model.config.to_hf_dict()
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": fam.name,
        "architectures": [architecture],
        "vision_config": vision_config,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][prefix + key] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
        "weight_map": weight_map,
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
