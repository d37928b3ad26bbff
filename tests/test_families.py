"""What every entry of the family table must do, checked for each one from its tiny tower.

A new family gets these for free from its ``Family`` entry: packed vs padded vs per-image equality,
every CPU backend, the release config round trip, the checkpoint round trip, the FLOP model, the
processor preset and the benchmark preset. Its parity with transformers lives in its own test file.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import nativevit as nv
from nativevit.bench.encoder import MODELS, model_config
from nativevit.config import FAMILIES

NAMES = sorted(FAMILIES)


def tiny(name: str) -> nv.VisionConfig:
    return nv.VisionConfig.preset(name, tiny=True)


def grids(cfg: nv.VisionConfig) -> list[list[int]]:
    """Images whose sides are not multiples of 4 merge blocks (nor of Qwen2.5-VL's windows), a 1-block
    image, and a 2-frame video for towers that take videos."""
    m = cfg.spatial_merge_size
    out = [[1, 3 * m, 5 * m], [1, m, m], [1, 7 * m, 2 * m]]
    if cfg.temporal_patch_size > 1:
        out.append([2, 2 * m, 3 * m])
    return out


def batch(cfg: nv.VisionConfig, grid: list[list[int]], seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in grid)
    return torch.randn(rows, cfg.patch_dim, generator=g, dtype=dtype), torch.tensor(grid)


def model(cfg: nv.VisionConfig, dtype=torch.float64, backend: str = "torch") -> nv.NativeViT:
    torch.manual_seed(0)
    m = nv.NativeViT(cfg, attn_backend=backend, rope_backend="torch").to(dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a part left out shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", NAMES)
def test_packed_equals_padded_and_per_image(name):
    cfg = tiny(name)
    m = model(cfg)
    grid = grids(cfg)
    px, thw = batch(cfg, grid)
    with torch.no_grad():
        packed = m(px, thw)
        padded = m(px, thw, layout="padded")
        alone = torch.cat([m(p, g[None]) for p, g in zip(px.split(thw.prod(-1).tolist()), thw)])
    assert packed.shape[0] == thw.prod(-1).sum() // cfg.merge_unit
    assert rel_err(padded, packed) < 1e-12
    assert rel_err(alone, packed) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_every_cpu_backend_runs_the_family(name):
    cfg = tiny(name)
    grid = grids(cfg)
    px, thw = batch(cfg, grid, dtype=torch.float32)
    ref = model(cfg, torch.float32)
    with torch.no_grad():
        expected = ref(px, thw)
        for backend in nv.ops.available_backends(px.device)["attention"]:
            if backend in ("triton",):  # interpreted: covered by tests/kernels
                continue
            ref.attn_backend = backend
            assert rel_err(ref(px, thw), expected) < 1e-4, backend


@pytest.mark.parametrize("name", NAMES)
def test_release_config_round_trip(name):
    cfg = tiny(name)
    again = nv.VisionConfig.from_hf_dict(cfg.to_hf_dict(), model_type=name, text_config=cfg.text_hf_dict())
    assert again == cfg


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_is_exact(name, tmp_path):
    cfg = tiny(name)
    m = model(cfg)
    m.save_pretrained(tmp_path)
    back = nv.NativeViT.from_pretrained(tmp_path, attn_backend="torch", rope_backend="torch")
    assert back.config == cfg
    state, again = m.state_dict(), back.state_dict()
    assert list(again) == list(state) and all(torch.equal(again[k], state[k]) for k in state)
    px, thw = batch(cfg, grids(cfg))
    with torch.no_grad():  # the same weights; GEMM blocking may depend on the buffers' alignment
        assert rel_err(back(px, thw), m(px, thw)) < 1e-14


@pytest.mark.parametrize("name", NAMES)
def test_flops_are_counted_for_every_part(name):
    cfg = tiny(name)
    m = model(cfg)
    grid = grids(cfg)
    packed = m.flops_per_batch(grid)
    padded = m.flops_per_batch(grid, layout="padded")
    assert packed["total"] == packed["linear"] + packed["attention"] > 0
    assert padded["attention"] > packed["attention"]
    # the count of linear FLOPs equals two per weight element per row that the weight sees
    rows = sum(t * h * w for t, h, w in grid)
    block = sum(p.numel() for p in m.blocks[0].parameters() if p.dim() >= 2)
    merged = rows // cfg.merge_unit
    mergers = [m.merger, *getattr(m, "deepstack_merger_list", [])]
    merger = sum(p.numel() for mod in mergers for p in mod.parameters() if p.dim() >= 2)
    patch = m.patch_embed.proj.weight.numel()
    assert packed["linear"] == 2 * (rows * (patch + cfg.depth * block) + merged * merger)


@pytest.mark.parametrize("name", NAMES)
def test_processor_preset_matches_the_tower(name):
    cfg = tiny(name)
    proc = nv.ImageProcessor.for_model(name)
    for model_type in FAMILIES[name].model_types:
        assert nv.ImageProcessor.for_model(model_type).__dict__.keys() == proc.__dict__.keys()
    release = nv.VisionConfig.preset(name)
    assert proc.patch_size == release.patch_size
    assert proc.merge_size == release.spatial_merge_size
    assert proc.row_width == release.patch_dim
    batch = proc([torch.randint(0, 256, (61, 97, 3), dtype=torch.uint8).numpy()])
    assert batch.pixel_values.shape[1] == cfg.patch_dim or cfg.patch_size != release.patch_size
    t, h, w = batch.grid_thw[0].tolist()
    assert h % release.spatial_merge_size == 0 and w % release.spatial_merge_size == 0


@pytest.mark.parametrize("name", NAMES)
def test_bench_presets_exist(name):
    assert name in MODELS and f"{name}_tiny" in MODELS
    assert model_config(f"{name}_tiny", 2).depth == 2
    assert model_config(name, 2).family.name == name
