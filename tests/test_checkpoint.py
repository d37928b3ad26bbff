"""Checkpoint directories: released layout in, our layout out, strict checks, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_tower, write_released_checkpoint
from safetensors.torch import load_file, save_file

import nativevit as nv


def test_round_trip_sharded(tmp_path):
    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny()).eval()
    model.save_pretrained(tmp_path / "out", max_shard_bytes=20_000)  # forces several shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all(k.startswith("visual.") for k in index["weight_map"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["vision_config"]["embed_dim"] == 64
    loaded = nv.NativeViT.from_pretrained(tmp_path / "out")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_single_file_round_trip_loads_into_transformers(tmp_path):
    """What we write is a released-style directory: transformers reads the tower weights back."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny()).double().eval()
    model.save_pretrained(tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]
    hf = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**cfg)).double().eval()
    hf.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()}, strict=True)
    grid = torch.tensor([[1, 4, 6]])
    px = torch.randn(24, 1176, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(px, grid), hf(px, grid_thw=grid).pooler_output, rtol=1e-10, atol=1e-12
        )


def test_dtype_and_device_arguments(tmp_path):
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt")
    model = nv.NativeViT.from_pretrained(path, dtype=torch.bfloat16, device="cpu", attn_backend="padded")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.attn_backend == "padded" and not model.training


def test_missing_and_mismatched_keys_are_named(tmp_path):
    hf = hf_tower()
    path = write_released_checkpoint(hf, tmp_path / "ckpt", n_shards=1)
    shard = path / "model-00001-of-00001.safetensors"
    state = load_file(str(shard))
    del state["visual.blocks.1.mlp.fc2.bias"]
    state["visual.blocks.0.attn.qkv.weight"] = state["visual.blocks.0.attn.qkv.weight"][:-1]
    state["visual.blocks.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(shard))
    index = {"weight_map": dict.fromkeys(state, shard.name)}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        nv.NativeViT.from_pretrained(path)
    msg = str(err.value)
    assert "missing keys (1): ['blocks.1.mlp.fc2.bias']" in msg
    assert "unexpected keys (1): ['blocks.0.extra.weight']" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (191, 64) vs model (192, 64)" in msg


def test_config_that_disagrees_with_weights(tmp_path):
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["depth"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['blocks\.2\."):
        nv.NativeViT.from_pretrained(path)


def test_refuses_pickles_and_other_models(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        nv.NativeViT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vision_config": {}}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        nv.NativeViT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="vision_config"):
        nv.NativeViT.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nv.NativeViT.from_pretrained(tmp_path / "nowhere")


def test_no_tower_keys(tmp_path):
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt", prefix="vision_tower.", n_shards=1)
    with pytest.raises(ValueError, match="no vision-tower tensors"):
        nv.NativeViT.from_pretrained(path)


def test_config_from_release_fields():
    # Qwen2-VL-7B-Instruct's vision_config sets only these; the rest are the 7B defaults
    cfg = nv.VisionConfig.from_hf_dict({"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14})
    assert cfg == nv.VisionConfig.qwen2_vl()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.out_hidden_size) == (
        1280,
        32,
        16,
        80,
        3584,
    )
    two_b = nv.VisionConfig.from_hf_dict({"hidden_size": 1536, "num_hidden_layers": 32})
    assert two_b.out_hidden_size == 1536
    with pytest.raises(ValueError, match="does not know"):
        nv.VisionConfig.from_hf_dict({"window_size": 112})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nv.VisionConfig(embed_dim=100, num_heads=16)


def test_qwen2_vl_parameter_count():
    with torch.device("meta"):
        model = nv.NativeViT(nv.VisionConfig.qwen2_vl())
    assert sum(p.numel() for p in model.parameters()) == 675_759_104  # transformers' count for the 7B tower
