"""Qwen2.5-VL and Qwen3-VL towers: fp64 parity with transformers through our loader, window layout,
backends on windowed layers, DeepStack, position-table resampling, configs, checkpoints, processors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, write_shards

import nativevit as nv
from nativevit import ops
from nativevit.packing import WindowLayout, window_partition
from nativevit.rope import position_table_taps, rope_position_ids

# 14-px grids (Qwen2.5-VL windows are 8x8 patches): smaller than a window (4x4, 2x2), an edge window
# (6x10), exactly two windows (16x8: the release pads a divisible side with an empty window), not
# divisible (18x22), videos with t=2 smaller and larger than a window.
GRID_25 = [[1, 6, 10], [2, 4, 4], [1, 16, 8], [1, 2, 2], [1, 18, 22], [2, 10, 12]]
# 16-px grids against an 8x8 learned table: down- and up-sampled, non-square, a video.
GRID_3 = [[1, 6, 10], [2, 4, 4], [1, 16, 8], [1, 2, 2], [1, 18, 22]]


def pixels(grid, patch_dim: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, patch_dim, generator=g, dtype=torch.float64).to(dtype)


def rerandomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits zero the biases and set norms to one, which hides mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def hf_qwen2_5(seed: int = 0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLVisionConfig(
        depth=4,
        hidden_size=64,
        num_heads=4,
        intermediate_size=96,
        out_hidden_size=48,
        fullatt_block_indexes=[1, 3],
        window_size=112,
        attn_implementation="sdpa",
    )
    return rerandomise(Qwen2_5_VisionTransformerPretrainedModel(cfg).double().eval(), seed)


def hf_qwen3(seed: int = 0):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cfg = Qwen3VLVisionConfig(
        depth=3,
        hidden_size=32,
        num_heads=4,
        intermediate_size=48,
        out_hidden_size=40,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 2],
        patch_size=16,
        attn_implementation="sdpa",
    )
    return rerandomise(Qwen3VLVisionModel(cfg).double().eval(), seed)


def release_vision_config(hf_model) -> tuple[str, dict]:
    """``(model_type, vision_config)`` with the field names (and ignored extras) of the Hub releases."""
    c = hf_model.config
    common = {
        "depth": c.depth,
        "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_heads": c.num_heads,
        "out_hidden_size": c.out_hidden_size,
        "patch_size": c.patch_size,
        "spatial_merge_size": c.spatial_merge_size,
        "temporal_patch_size": c.temporal_patch_size,
    }
    if c.model_type == "qwen2_5_vl_vision":
        extra = {
            "in_chans": 3,
            "spatial_patch_size": c.patch_size,
            "tokens_per_second": 2,
            "window_size": c.window_size,
            "fullatt_block_indexes": list(c.fullatt_block_indexes),
        }
        return "qwen2_5_vl", {**common, **extra}
    extra = {
        "model_type": "qwen3_vl",
        "in_channels": 3,
        "initializer_range": 0.02,
        "num_position_embeddings": c.num_position_embeddings,
        "deepstack_visual_indexes": list(c.deepstack_visual_indexes),
    }
    return "qwen3_vl", {**common, **extra}


def write_release(hf_model, path: Path, *, prefix: str, n_shards: int = 2) -> Path:
    """A released checkpoint directory: top-level model_type, vision_config in the release's field
    names, text_config, sharded safetensors with an index, tower under ``prefix``, LM keys besides."""
    path.mkdir(parents=True, exist_ok=True)
    model_type, vision_config = release_vision_config(hf_model)
    config = {
        "architectures": ["ReleasedForConditionalGeneration"],
        "model_type": model_type,
        "text_config": {"hidden_size": 24, "model_type": model_type + "_text"},
        "vision_config": vision_config,
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {prefix + k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.randn(10, 24, dtype=torch.float64)
    tensors["lm_head.weight"] = torch.randn(10, 24, dtype=torch.float64)
    return write_shards(path, tensors, n_shards)


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (ours - ref).abs()
    where = diff.amax(-1).argmax()
    return f"{name}: rel err {rel_err(ours, ref):.3e}, max |diff| {diff.max():.3e} at row {where}"


@pytest.fixture(scope="module")
def hf25():
    return hf_qwen2_5()


@pytest.fixture(scope="module")
def hf3():
    return hf_qwen3()


@pytest.fixture(scope="module")
def ours25(hf25, tmp_path_factory):
    return nv.NativeViT.from_pretrained(
        write_release(hf25, tmp_path_factory.mktemp("q25"), prefix="visual."), attn_backend="torch"
    )


# ----------------------------------------------------------------------------- Qwen2.5-VL


@pytest.mark.parametrize("grid", [GRID_25, [[1, 2, 2]], [[3, 16, 16]], [[1, 34, 2], [1, 2, 34]]])
def test_window_layout_matches_transformers(grid):
    from transformers.vision_utils import get_vision_window_index

    grid_t = torch.tensor(grid)
    ref_index, ref_cu = get_vision_window_index(grid_t, spatial_merge_size=2, window_size=112, patch_size=14)
    layout = WindowLayout.from_grid(grid, window=4, merge_size=2, device="cpu")
    merged, lengths = window_partition(grid, window=4, merge_size=2)
    assert torch.equal(merged, ref_index)
    assert torch.equal(layout.segments.cu_seqlens, ref_cu)
    assert layout.segments.lengths == tuple((ref_cu[1:] - ref_cu[:-1]).tolist()) == lengths
    assert torch.equal(layout.order[layout.inverse], torch.arange(layout.order.numel()))
    assert torch.equal(layout.order.view(-1, 4)[:, 0] // 4, ref_index)


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_qwen2_5_parity_fp64(hf25, tmp_path, prefix):
    from transformers.vision_utils import get_vision_window_index

    model = nv.NativeViT.from_pretrained(
        write_release(hf25, tmp_path / "ckpt", prefix=prefix), attn_backend="torch"
    )
    assert model.config.model_type == "qwen2_5_vl" and model.config.windowed_blocks == (
        True,
        False,
        True,
        False,
    )
    grid = torch.tensor(GRID_25)
    px = pixels(GRID_25, 3 * 2 * 14 * 14)
    with torch.no_grad():
        ref = hf25(px, grid_thw=grid)
        tokens = model(px, grid)
        feats = model.forward_features(px, grid)
    assert rel_err(tokens, ref.pooler_output) < 1e-10, report("pooler_output", tokens, ref.pooler_output)
    # transformers leaves last_hidden_state in window order; ours is in input order
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    ref_feats = ref.last_hidden_state.view(-1, 4, 64)[torch.argsort(window_index)].view(-1, 64)
    assert rel_err(feats, ref_feats) < 1e-10, report("last_hidden_state", feats, ref_feats)


def test_qwen2_5_windows_matter_and_pack_invariance(ours25):
    """The windowed tower differs from the same weights with full attention everywhere, and packing
    images together gives each the output it gets alone (window offsets per image are right)."""
    px = pixels(GRID_25, ours25.config.patch_dim, seed=1)
    grid = torch.tensor(GRID_25)
    full = nv.NativeViT(nv.VisionConfig.qwen2_5_vl_tiny(window_size=0), attn_backend="torch").double()
    full.load_state_dict(ours25.state_dict())
    with torch.no_grad():
        packed = ours25(px, grid)
        assert rel_err(full(px, grid), packed) > 1e-3
        rows = [t * h * w for t, h, w in GRID_25]
        alone = [ours25(p, grid[i : i + 1]) for i, p in enumerate(torch.split(px, rows))]
    assert rel_err(torch.cat(alone), packed) < 1e-12


def _backend_cases() -> list[str]:
    return [name for name in nv.ops.available_backends("cpu")["attention"] if name != "torch"]


@pytest.mark.parametrize("backend", _backend_cases())
def test_every_attention_backend_serves_windowed_layers(backend):
    """Each attention backend that runs here gives the torch reference's result on a windowed tower
    (head dim 80), in fp64 where it takes fp64, else fp32. Small, for interpreted Triton."""
    cfg = nv.VisionConfig.qwen2_5_vl_tiny(embed_dim=160, num_heads=2, depth=2, fullatt_block_indexes=(1,))
    model = rerandomise(nv.NativeViT(cfg, attn_backend="torch").double().eval(), seed=3)
    grid = [[1, 6, 10], [2, 4, 4]]
    probe = torch.zeros(1, 2, 80, dtype=torch.float64)
    try:
        ops.resolve_backend("attention", backend, probe)
        dtype, tol = torch.float64, 1e-12
    except RuntimeError:
        dtype, tol = torch.float32, 1e-5
        ops.resolve_backend("attention", backend, probe.float())  # must take fp32 then
    model = model.to(dtype)
    px = pixels(grid, cfg.patch_dim, seed=4, dtype=dtype)
    with torch.no_grad():
        ref = model(px, torch.tensor(grid))
        model.attn_backend = backend
        out = model(px, torch.tensor(grid))
    assert rel_err(out, ref) < tol, report(backend, out, ref)


def test_padded_baseline_runs_windowed_layers_on_windows(ours25, monkeypatch):
    """The padded baseline's windowed blocks attend on windows padded to the longest window, its
    full blocks on frames padded to the longest frame, and the result equals the packed one."""
    calls = []
    original = ops.varlen_attention

    def spy(q, k, v, segments, *args, **kwargs):
        calls.append((segments.padded, segments.max_seqlen, segments.num_segments, q.shape[0]))
        return original(q, k, v, segments, *args, **kwargs)

    monkeypatch.setattr(ops, "varlen_attention", spy)
    grid = torch.tensor(GRID_25)
    px = pixels(GRID_25, ours25.config.patch_dim, seed=2)
    with torch.no_grad():
        packed = ours25(px, grid)
        ours25.attn_backend = "padded"
        try:
            padded = ours25(px, grid)
        finally:
            ours25.attn_backend = "torch"
    assert rel_err(padded, packed) < 1e-12
    frames = [h * w for t, h, w in GRID_25 for _ in range(t)]
    windows = window_partition(GRID_25, window=4, merge_size=2)[1]
    packed_calls, padded_calls = calls[:4], calls[4:]
    n = sum(frames)
    assert packed_calls == [(False, 64, len(windows), n), (False, max(frames), len(frames), n)] * 2
    assert (
        padded_calls
        == [
            (True, 64, len(windows), 64 * len(windows)),
            (True, max(frames), len(frames), max(frames) * len(frames)),
        ]
        * 2
    )


def test_flops_count_window_attention(ours25):
    from transformers.vision_utils import get_vision_window_index

    cfg = ours25.config
    _, cu = get_vision_window_index(
        torch.tensor(GRID_25), spatial_merge_size=2, window_size=112, patch_size=14
    )
    windows = (cu[1:] - cu[:-1]).tolist()
    frames = [h * w for t, h, w in GRID_25 for _ in range(t)]
    d = cfg.embed_dim
    expected = 2 * sum(4 * n * n * d for n in windows) + 2 * sum(4 * n * n * d for n in frames)
    assert ours25.flops_per_batch(GRID_25)["attention"] == expected
    padded = 2 * len(windows) * 4 * max(windows) ** 2 * d + 2 * len(frames) * 4 * max(frames) ** 2 * d
    assert ours25.flops_per_batch(GRID_25, layout="padded")["attention"] == padded


# ----------------------------------------------------------------------------- Qwen3-VL


def test_qwen3_parity_fp64_with_deepstack(hf3, tmp_path):
    model = nv.NativeViT.from_pretrained(
        write_release(hf3, tmp_path / "ckpt", prefix="model.visual."), attn_backend="torch"
    )
    cfg = model.config
    assert (cfg.model_type, cfg.patch_size, cfg.patch_bias, cfg.deepstack_visual_indexes) == (
        "qwen3_vl",
        16,
        True,
        (0, 2),
    )
    grid = torch.tensor(GRID_3)
    px = pixels(GRID_3, 3 * 2 * 16 * 16)
    with torch.no_grad():
        ref = hf3(px, grid_thw=grid)
        tokens, deepstack = model(px, grid, return_deepstack=True)
        feats = model.forward_features(px, grid)
        plain = model(px, grid)
    assert rel_err(tokens, ref.pooler_output) < 1e-10, report("pooler_output", tokens, ref.pooler_output)
    assert rel_err(feats, ref.last_hidden_state) < 1e-10, report(
        "last_hidden_state", feats, ref.last_hidden_state
    )
    assert torch.equal(plain, tokens)
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for i, (a, b) in enumerate(zip(deepstack, ref.deepstack_features, strict=True)):
        assert a.shape == b.shape == tokens.shape
        assert rel_err(a, b) < 1e-10, report(f"deepstack[{i}]", a, b)


def test_qwen3_vl_moe_release_carries_the_qwen3_tower(tmp_path):
    """model_type qwen3_vl_moe (Qwen3-VL-30B-A3B, 235B-A22B): the same tower, transformers' MoE class."""
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    cfg = Qwen3VLMoeVisionConfig(
        depth=3,
        hidden_size=32,
        num_heads=4,
        intermediate_size=48,
        out_hidden_size=40,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 2],
        patch_size=16,
        attn_implementation="sdpa",
    )
    hf = rerandomise(Qwen3VLMoeVisionModel(cfg).double().eval(), seed=8)
    path = write_release(hf, tmp_path / "ckpt", prefix="model.visual.")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = config["vision_config"]["model_type"] = "qwen3_vl_moe"
    (path / "config.json").write_text(json.dumps(config))
    model = nv.NativeViT.from_pretrained(path, attn_backend="torch")
    assert model.config.model_type == "qwen3_vl"
    grid = torch.tensor(GRID_3[:3])
    px = pixels(grid.tolist(), 3 * 2 * 16 * 16, seed=9)
    with torch.no_grad():
        ref = hf(px, grid_thw=grid)
        tokens, deepstack = model(px, grid, return_deepstack=True)
    assert rel_err(tokens, ref.pooler_output) < 1e-10, report("pooler_output", tokens, ref.pooler_output)
    for a, b in zip(deepstack, ref.deepstack_features, strict=True):
        assert rel_err(a, b) < 1e-10, report("deepstack", a, b)


@pytest.mark.parametrize("grid", [[[1, 2, 2]], [[1, 8, 8]], [[2, 16, 6], [1, 4, 30]]])
def test_position_table_taps_are_bilinear_align_corners(grid):
    """Independent reference: F.interpolate of the whole table to each (h, w), then block order."""
    side, dim = 8, 5
    table = torch.randn(side * side, dim, dtype=torch.float64)
    index, weight = position_table_taps(grid, side, merge_size=2)
    ours = (table[index] * weight[..., None]).sum(1)
    refs = []
    image = table.T.reshape(1, dim, side, side)
    for t, h, w in grid:
        full = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)[0]  # (dim, h, w)
        pos = rope_position_ids([(t, h, w)], merge_size=2)
        refs.append(full[:, pos[:, 0], pos[:, 1]].T)
    # the taps' weights are float32, as the release computes them
    assert rel_err(ours, torch.cat(refs)) < 1e-6


def test_return_deepstack_without_mergers_is_empty(ours25):
    grid = torch.tensor([[1, 4, 4]])
    px = pixels(grid.tolist(), ours25.config.patch_dim)
    with torch.no_grad():
        tokens, deepstack = ours25(px, grid, return_deepstack=True)
    assert deepstack == [] and tokens.shape == (4, 48)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_checkpoint_round_trip_in_the_release_layout(family, tmp_path):
    """save_pretrained writes the family's layout: transformers builds the same tower from our
    config.json and loads our tensors strictly; our loader reads it back to identical outputs."""
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as HFConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as HFModel,
        )

        cfg, prefix, patch = nv.VisionConfig.qwen2_5_vl_tiny(), "visual.", 14
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig as HFConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFModel

        cfg, prefix, patch = nv.VisionConfig.qwen3_vl_tiny(), "model.visual.", 16
    model = rerandomise(nv.NativeViT(cfg, attn_backend="torch").double().eval(), seed=5)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and all(k.startswith(prefix) for k in index)

    vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    hf = HFModel(HFConfig(**vision, attn_implementation="sdpa")).double().eval()
    hf.load_state_dict(model.state_dict(), strict=True)  # our tower's keys are the release's
    loaded = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    assert loaded.config == cfg
    grid = torch.tensor([[1, 6, 10], [2, 4, 4], [1, 18, 22]])
    px = pixels(grid.tolist(), 3 * 2 * patch * patch, seed=6)
    with torch.no_grad():
        ours = model(px, grid)
        # same weights bit for bit; the output may differ in the last bits (BLAS paths follow alignment)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert rel_err(loaded(px, grid), ours) < 1e-14
        ref = hf(px, grid_thw=grid).pooler_output
    assert rel_err(ours, ref) < 1e-10, report("pooler_output", ours, ref)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_only_directories_load(family, hf25, hf3, tmp_path):
    """The towers' own transformers save_pretrained layout (model_type ``*_vision``, unprefixed keys)."""
    hf, grid, patch = (hf25, GRID_25, 14) if family == "qwen2_5_vl" else (hf3, GRID_3, 16)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family + "_vision"
    model = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch")
    px = pixels(grid, 3 * 2 * patch * patch, seed=7)
    with torch.no_grad():
        ours, ref = model(px, torch.tensor(grid)), hf(px, grid_thw=torch.tensor(grid)).pooler_output
    assert rel_err(ours, ref) < 1e-10, report("pooler_output", ours, ref)


def test_loader_rejects_unknown_family_and_foreign_fields(hf25, tmp_path):
    path = write_release(hf25, tmp_path / "ckpt", prefix="visual.")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen9_vl"}))
    with pytest.raises(ValueError, match="qwen9_vl"):
        nv.NativeViT.from_pretrained(path)
    # a Qwen2.5-VL vision_config under a Qwen2-VL model_type: its fields mean something else there
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        nv.NativeViT.from_pretrained(path)


# ----------------------------------------------------------------------------- configs


# vision_config of the Hub releases (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct)
QWEN2_5_VL_7B = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
QWEN3_VL_8B = {
    "deepstack_visual_indexes": [8, 16, 24],
    "depth": 27,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "in_channels": 3,
    "initializer_range": 0.02,
    "intermediate_size": 4304,
    "model_type": "qwen3_vl",
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "out_hidden_size": 4096,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def test_release_configs_give_the_presets():
    c25 = nv.VisionConfig.from_hf_dict(QWEN2_5_VL_7B, model_type="qwen2_5_vl")
    assert c25 == nv.VisionConfig.qwen2_5_vl()
    assert (c25.embed_dim, c25.out_hidden_size, c25.head_dim, c25.window_tokens) == (1280, 3584, 80, 4)
    assert (c25.norm_type, c25.mlp_type, c25.patch_bias) == ("rmsnorm", "swiglu", False)
    c3 = nv.VisionConfig.from_hf_dict(QWEN3_VL_8B)  # family read from vision_config.model_type
    assert c3 == nv.VisionConfig.qwen3_vl()
    assert (c3.embed_dim, c3.out_hidden_size, c3.head_dim, c3.patch_dim) == (1152, 4096, 72, 1536)
    assert (c3.norm_type, c3.mlp_type, c3.patch_bias) == ("layernorm", "mlp", True)
    # hidden_size is the ViT width in 2.5 and 3, the merger width in Qwen2-VL
    c2 = nv.VisionConfig.from_hf_dict({"hidden_size": 1536}, model_type="qwen2_vl")
    assert (c2.embed_dim, c2.out_hidden_size) == (1280, 1536)
    # absent fields: transformers' class defaults (hidden_size 3584 for 2.5), merger width from the LLM
    c25d = nv.VisionConfig.from_hf_dict({"window_size": 112}, model_type="qwen2_5_vl", text_hidden_size=2048)
    assert (c25d.embed_dim, c25d.out_hidden_size, c25d.fullatt_block_indexes) == (3584, 2048, (7, 15, 23, 31))
    for cfg in (c25, c3, nv.VisionConfig.qwen2_5_vl_tiny(), nv.VisionConfig.qwen3_vl_tiny()):
        assert nv.VisionConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_param_counts_match_the_releases():
    """Parameter counts of the full-size towers against transformers built on the meta device."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cases = [
        (
            nv.VisionConfig.qwen2_5_vl(),
            Qwen2_5_VisionTransformerPretrainedModel,
            Qwen2_5_VLVisionConfig(
                **{k: v for k, v in QWEN2_5_VL_7B.items() if k not in ("in_chans", "spatial_patch_size")}
            ),
        ),
        (
            nv.VisionConfig.qwen3_vl(),
            Qwen3VLVisionModel,
            Qwen3VLVisionConfig(**{k: v for k, v in QWEN3_VL_8B.items() if k != "model_type"}),
        ),
    ]
    for cfg, hf_cls, hf_cfg in cases:
        with torch.device("meta"):
            ours = {k: v.shape for k, v in nv.NativeViT(cfg).state_dict().items()}
            ref = {k: v.shape for k, v in hf_cls(hf_cfg).state_dict().items()}
        assert ours == ref


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_type="qwen4_vl"), "model_type"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(mlp_type="moe"), "mlp_type"),
        (dict(num_position_embeddings=60), "perfect square"),
        (dict(depth=4, fullatt_block_indexes=(1, 4)), "fullatt_block_indexes"),
        (dict(depth=4, deepstack_visual_indexes=(2, 2)), "repeats"),
        (dict(window_size=20), "window_size"),
        (dict(intermediate_size=0), "intermediate_size"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nv.VisionConfig(**kwargs)


def test_to_hf_dict_refuses_what_a_release_cannot_describe():
    with pytest.raises(ValueError, match="norm_type"):
        nv.VisionConfig.qwen3_vl_tiny(norm_type="rmsnorm").to_hf_dict()
    with pytest.raises(ValueError, match="window"):
        nv.VisionConfig.tiny(window_size=112).to_hf_dict()
    with pytest.raises(ValueError, match="fields nativevit does not know"):
        nv.VisionConfig.from_hf_dict({"window_size": 112, "hidden_size": 64}, model_type="qwen3_vl")


# ----------------------------------------------------------------------------- processors


def test_processor_presets_match_transformers_pil():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 410), (90, 1000)]]
    cases = [
        (
            nv.ImageProcessor.qwen3_vl(),
            dict(
                patch_size=16,
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
                min_pixels=65536,
                max_pixels=16777216,
            ),
        ),
        (nv.ImageProcessor.qwen2_5_vl(), dict(patch_size=14, min_pixels=3136, max_pixels=12845056)),
    ]
    for ours, hf_kwargs in cases:
        ref = Qwen2VLImageProcessorPil(**hf_kwargs)(images, return_tensors="pt")
        batch = ours(images)
        assert torch.equal(batch.grid_thw, ref["image_grid_thw"])
        assert torch.equal(batch.pixel_values, ref["pixel_values"])
    proc = nv.ImageProcessor.qwen3_vl()
    assert (proc.factor, proc.patch_size) == (32, 16)
    assert proc(images).pixel_values.shape[1] == nv.VisionConfig.qwen3_vl().patch_dim
    assert nv.ImageProcessor.for_model("qwen2_vl").factor == 28
    with pytest.raises(ValueError, match="no ImageProcessor preset"):
        nv.ImageProcessor.for_model("llava")
