"""Shared test helpers: a tiny random transformers Qwen2-VL tower, written as a released checkpoint."""

from __future__ import annotations

import os
import shutil

# Without a GPU the Triton kernels run through the interpreter, which must be switched on before
# triton is first imported (nativevit imports it): so here, before torch and nativevit.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def hf_tower(depth=2, embed_dim=64, num_heads=4, hidden_size=48, seed=0, attn="sdpa"):
    """A transformers ``Qwen2VisionTransformerPretrainedModel`` in float64 with every parameter
    re-randomised (its default init zeroes biases and sets norms to one, which hides mistakes)."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    cfg = Qwen2VLVisionConfig(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        hidden_size=hidden_size,
        mlp_ratio=4,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        attn_implementation=attn,
    )
    model = Qwen2VisionTransformerPretrainedModel(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def write_released_checkpoint(hf_model, path: Path, *, prefix="visual.", n_shards=2, extra_keys=True) -> Path:
    """Write ``hf_model`` the way Qwen2-VL releases are laid out: config.json with ``vision_config``
    in the release's field names, sharded safetensors with an index, tower keys under ``prefix``,
    plus language-model keys that the loader must ignore."""
    path.mkdir(parents=True, exist_ok=True)
    c = hf_model.config
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": c.hidden_size,
        "vision_config": {
            "depth": c.depth,
            "embed_dim": c.embed_dim,
            "mlp_ratio": c.mlp_ratio,
            "num_heads": c.num_heads,
            "in_chans": 3,
            "hidden_size": c.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    if extra_keys:
        tensors["model.embed_tokens.weight"] = torch.randn(10, c.hidden_size, dtype=torch.float64)
        tensors["lm_head.weight"] = torch.randn(10, c.hidden_size, dtype=torch.float64)
    return write_shards(path, tensors, n_shards)


def write_shards(path: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> Path:
    """``tensors`` as ``n_shards`` safetensors files plus the index, as releases ship them."""
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {k: tensors[k] for k in keys[i::n_shards]}
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"
