"""Checkpoint directories: released layout in, our layout out, strict checks, safetensors only."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


# ---------------------------------------------------------------- saving over an earlier checkpoint


def _tiny(seed: int, **overrides) -> nv.NativeViT:
    torch.manual_seed(seed)
    return nv.NativeViT(nv.VisionConfig.tiny(**overrides)).eval()


def _assert_same_weights(model: nv.NativeViT, path) -> None:
    loaded = nv.NativeViT.from_pretrained(path)
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def _listing(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "first_shard_bytes, second_shard_bytes", [(20_000, None), (20_000, 60_000), (None, 20_000)]
)
def test_save_over_an_earlier_save_replaces_it(tmp_path, first_shard_bytes, second_shard_bytes):
    """A fine-tune saved over its base loads as the fine-tune: files of the earlier save that the new
    one does not list are gone, files the writer does not own are kept."""
    out = tmp_path / "out"
    big = {} if first_shard_bytes is None else {"max_shard_bytes": first_shard_bytes}
    _tiny(0).save_pretrained(out, **big)
    (out / "notes.txt").write_text("mine")
    (out / "preprocessor_config.json").write_text("{}")
    (out / "adapter.safetensors").write_bytes(b"not ours")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"not ours either")
    before = set(p.name for p in out.iterdir())
    new = _tiny(1)
    small = {} if second_shard_bytes is None else {"max_shard_bytes": second_shard_bytes}
    new.save_pretrained(out, **small)
    _assert_same_weights(new, out)
    names = set(p.name for p in out.iterdir())
    assert {"notes.txt", "preprocessor_config.json", "adapter.safetensors", "sub"} <= names
    assert (out / "sub" / "model.safetensors").read_bytes() == b"not ours either"
    if second_shard_bytes is None:
        written = {"model.safetensors"}
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        written = set(index["weight_map"].values()) | {"model.safetensors.index.json"}
    ours = names - {"notes.txt", "preprocessor_config.json", "adapter.safetensors", "sub", "config.json"}
    assert ours == written, f"left behind: {sorted(ours - written)} (before: {sorted(before)})"


@pytest.mark.parametrize("old_shard_bytes", [None, 20_000])
def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, old_shard_bytes):
    import nativevit.checkpoint as ckpt

    out = tmp_path / "out"
    old = _tiny(0)
    old.save_pretrained(out, **({} if old_shard_bytes is None else {"max_shard_bytes": old_shard_bytes}))
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    real_save_file = ckpt.save_file
    calls = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        _tiny(1, depth=3).save_pretrained(out, max_shard_bytes=20_000)
    assert len(calls) == 2
    assert _listing(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary left behind
    _assert_same_weights(old, out)


def test_save_failing_while_moving_files_in_puts_the_old_back(tmp_path, monkeypatch):
    """The last rename (the new config.json) fails: every earlier file goes back where it was."""
    import nativevit.checkpoint as ckpt

    out = tmp_path / "out"
    old = _tiny(0)
    old.save_pretrained(out, max_shard_bytes=20_000)
    before = _listing(out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).parent.name == "new" and Path(src).name == "config.json":
            raise PermissionError("no")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(PermissionError):
        _tiny(1).save_pretrained(out)
    monkeypatch.undo()
    assert _listing(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    _assert_same_weights(old, out)


def test_save_that_cannot_undo_keeps_the_old_files_aside(tmp_path, monkeypatch):
    """If even putting the old files back fails, they are not deleted: the error says where they are."""
    import nativevit.checkpoint as ckpt

    out = tmp_path / "out"
    _tiny(0).save_pretrained(out)
    old_config = (out / "config.json").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out / "config.json":
            raise PermissionError("no")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="could not be put back") as err:
        _tiny(1).save_pretrained(out)
    monkeypatch.undo()
    (aside,) = out.glob(".nativevit-save-*")
    assert str(aside / "old") in str(err.value)
    assert (aside / "old" / "config.json").read_bytes() == old_config
    with pytest.raises(FileNotFoundError, match="interrupted or running save_pretrained"):
        nv.NativeViT.from_pretrained(out)


# ---------------------------------------------------------------- an untrusted directory


def _shard_name(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][
        "visual.merger.ln_q.weight"
    ]


def _point_index_at(path, target: str) -> None:
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    old = _shard_name(path)
    index["weight_map"] = {k: (target if v == old else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))


def _no_opening(monkeypatch):
    import nativevit.checkpoint as ckpt

    def refuse(*args, **kwargs):
        raise AssertionError(f"a weight file was opened: {args}")

    monkeypatch.setattr(ckpt, "safe_open", refuse)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "symlinked_dir"])
def test_shards_must_stay_inside_the_directory(tmp_path, monkeypatch, where):
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt")
    shard = path / _shard_name(path)
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)  # a loadable shard, outside the checkpoint directory
    if where == "parent":
        _point_index_at(path, "../outside.safetensors")
    elif where == "absolute":
        _point_index_at(path, str(outside))
    elif where == "symlink":
        shard.symlink_to(outside)
    else:
        (tmp_path / "elsewhere").mkdir()
        outside.rename(tmp_path / "elsewhere" / "outside.safetensors")
        (path / "sub").symlink_to(tmp_path / "elsewhere")
        _point_index_at(path, "sub/outside.safetensors")
    _no_opening(monkeypatch)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        nv.NativeViT.from_pretrained(path)


def test_hub_cache_snapshot_symlinks_load(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> are symlinks to ../../blobs/<hash>."""
    hf = hf_tower()
    plain = write_released_checkpoint(hf, tmp_path / "plain")
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(plain.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    model = nv.NativeViT.from_pretrained(snapshot)
    want = hf.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    # ... but only the snapshot's own repository: a blob of another repository is refused
    other = tmp_path / "hub" / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    shard = snapshot / _shard_name(snapshot)
    target = shard.resolve()
    target.rename(other / target.name)
    shard.unlink()
    shard.symlink_to(other / target.name)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        nv.NativeViT.from_pretrained(snapshot)


def _corrupt(path, what):
    config_file, index_file = path / "config.json", path / "model.safetensors.index.json"
    shard = path / _shard_name(path)
    if what == "config_list":
        config_file.write_text("[1, 2]")
        return config_file, "JSON object"
    if what == "config_utf8":
        config_file.write_bytes(b'{"model_type": "qwen2_vl\xff"}')
        return config_file, "UTF-8"
    if what == "vision_config_list":
        config_file.write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": [1]}))
        return config_file, "vision_config"
    if what == "text_config_list":
        config = json.loads(config_file.read_text())
        config["text_config"] = [1]
        config_file.write_text(json.dumps(config))
        return config_file, "text_config"
    if what == "config_bad_value":
        config = json.loads(config_file.read_text())
        config["vision_config"]["depth"] = "two"
        config_file.write_text(json.dumps(config))
        return config_file, "depth"
    if what == "config_bad_rope":
        config = json.loads(config_file.read_text())
        config["vision_config"]["rope_parameters"] = [10000]
        config_file.write_text(json.dumps(config))
        return config_file, "rope_parameters"
    if what == "index_list":
        index_file.write_text("[]")
        return index_file, "JSON object"
    if what == "index_utf8":
        index_file.write_bytes(b'{"weight_map": {"\xff": 1}}')
        return index_file, "UTF-8"
    if what == "index_json":
        index_file.write_text('{"weight_map": ')
        return index_file, "not valid JSON"
    if what == "index_non_string_file":
        index = json.loads(index_file.read_text())
        index["weight_map"]["visual.merger.ln_q.weight"] = 3
        index_file.write_text(json.dumps(index))
        return index_file, "visual.merger.ln_q.weight"
    if what == "shard_truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        return shard, "not a valid safetensors file"
    if what == "shard_garbage":
        shard.write_bytes(b"\x80\x04garbage" * 50)
        return shard, "not a valid safetensors file"
    if what == "shard_empty":
        shard.write_bytes(b"")
        return shard, "not a valid safetensors file"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "config_list",
        "config_utf8",
        "vision_config_list",
        "text_config_list",
        "config_bad_value",
        "config_bad_rope",
        "index_list",
        "index_utf8",
        "index_json",
        "index_non_string_file",
        "shard_truncated",
        "shard_garbage",
        "shard_empty",
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path, what):
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt")
    bad_file, problem = _corrupt(path, what)
    with pytest.raises(ValueError) as err:
        nv.NativeViT.from_pretrained(path)
    assert type(err.value) is ValueError
    assert str(bad_file) in str(err.value) and problem in str(err.value)


def test_single_file_corrupt_names_the_file(tmp_path):
    _tiny(0).save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip pickle, say
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        nv.NativeViT.from_pretrained(tmp_path / "out")


def test_absurd_depth_is_refused_quickly_from_the_headers(tmp_path, monkeypatch):
    """depth 100000 over weights for 2 blocks: refused from the safetensors headers, at once, with a
    short message (not 1.2 M key names), before any tensor is read or any model is built."""
    import time

    import nativevit.checkpoint as ckpt

    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["depth"] = 100_000
    (path / "config.json").write_text(json.dumps(config))
    real_safe_open = ckpt.safe_open

    class NoData:
        def __init__(self, *args, **kwargs):
            self.f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return self.f.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError("tensor data read before the checks")

    monkeypatch.setattr(ckpt, "safe_open", NoData)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        nv.NativeViT.from_pretrained(path)
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert elapsed < 3.0, elapsed
    assert len(msg) < 2000, len(msg)
    n_missing = (100_000 - 2) * 12  # 12 tensors per Qwen2-VL block
    assert f"missing keys ({n_missing}): ['blocks.2." in msg and "more" in msg
    assert "100000" in msg and "2 blocks" in msg


def test_mismatch_message_is_summarised(tmp_path):
    """Many unexpected keys: counted, the first few named, not all of them."""
    path = write_released_checkpoint(hf_tower(), tmp_path / "ckpt", n_shards=1)
    shard = path / "model-00001-of-00001.safetensors"
    state = load_file(str(shard))
    for i in range(500):
        state[f"visual.extra.{i}.weight"] = torch.zeros(1)
    save_file(state, str(shard))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, shard.name)})
    )
    with pytest.raises(
        ValueError, match=r"unexpected keys \(500\): \['extra\.0\.weight', 'extra\.1\.weight'"
    ) as err:
        nv.NativeViT.from_pretrained(path)
    assert len(str(err.value)) < 1000


def test_save_refuses_to_overwrite_a_full_release(tmp_path):
    """Saving the tower into a released VLM directory would delete its language model: refused."""
    path = write_released_checkpoint(hf_tower(), tmp_path / "release", extra_keys=True)
    before = sorted(p.name for p in path.iterdir())
    model = nv.NativeViT.from_pretrained(path)
    with pytest.raises(ValueError, match="full model checkpoint"):
        model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == before
