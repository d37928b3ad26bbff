"""``nativevit encode`` and ``nv.load_features``: every item's features equal the model's output on that
image alone (whatever the input kind, token budget, worker count, process count or point of
resumption); bad inputs are listed and skipped; a stopped run resumes without losing or doubling an
item; a folder made with other settings is refused; bad arguments exit 2 with one line."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch

import nativevit as nv
from nativevit.encode import assign_by_tokens, load_features, main
from nativevit.encode.runner import KILL_ENV

REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 28 * 28 * 16  # at most 16 merged tokens per image: small, but every image a different grid
TINY = ["--preset", "tiny", "--max-pixels", str(MAX_PIXELS), "--quiet"]
# (width, height): square, wide, tall, tiny (upscaled to min_pixels), prime sides, long strip
SIZES = [(64, 64), (200, 120), (84, 140), (20, 20), (131, 97), (300, 40), (150, 150), (90, 60)]


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode_image(width: int, height: int, seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(_pixels(width, height, seed)).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path) -> dict[str, Path]:
    """Images under ``root`` (nested, PNG and JPEG, one with an EXIF rotation), plus a non-image file."""
    paths = {}
    for i, (w, h) in enumerate(SIZES):
        folder = ("", "sub/", "sub/deeper/")[i % 3]
        key = f"{folder}img{i}.{'png' if i % 2 else 'jpg'}"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode_image(w, h, i, "PNG" if i % 2 else "JPEG"))
        paths[key] = path
    rotated = root / "rotated.jpg"  # stored 40x100, decoded 100x40: the header scan must see that too
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(_pixels(40, 100, 99)).save(rotated, exif=exif)
    paths["rotated.jpg"] = rotated
    (root / "notes.txt").write_text("not an image")
    return paths


def tiny_model(seed: int = 0) -> nv.NativeViT:
    """The weights of ``--preset tiny --seed seed``, as documented: manual_seed, then NativeViT(cfg)."""
    torch.manual_seed(seed)
    return nv.NativeViT(nv.VisionConfig.tiny()).eval()


def reference(model, proc, sources: dict[str, object], *, hidden: bool = False) -> dict:
    """Each image encoded alone: ``{key: (features, grid_thw)}``, the views' rows concatenated."""
    out = {}
    for key, source in sources.items():
        batch = proc([source])
        with torch.no_grad():
            y = (model.forward_features if hidden else model)(batch.pixel_values, batch.grid_thw)
        out[key] = (torch.cat(batch.split(y)), batch.grid_thw)
    return out


def assert_same_features(store, expected: dict) -> None:
    assert len(store) == len(expected)
    assert sorted(store) == sorted(expected)
    for key, (features, grid) in expected.items():
        got, got_grid = store[key]
        assert got_grid.dtype == torch.int64 and got_grid.tolist() == grid.tolist(), key
        assert got.shape == features.shape, key
        torch.testing.assert_close(got, features, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def run(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    return root, make_folder(root)


# ----------------------------------------------------------------------------- inputs


def test_folder_matches_model_on_each_image(folder, tmp_path, capsys):
    root, paths = folder
    out = tmp_path / "out"
    # a small budget and one batch per shard: many batches and shards; one worker process decodes
    argv = [root, "--out", out, *TINY, "--max-tokens", 96, "--batches-per-shard", 1, "--workers", 1]
    assert run(argv) == 0
    assert capsys.readouterr().out == ""  # --quiet

    store = load_features(out)
    proc = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=MAX_PIXELS)
    assert_same_features(store, reference(tiny_model(), proc, paths))
    assert "notes.txt" not in store and len(store) == len(paths)

    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.column_names == ["key", "shard", "offset", "rows", "grid", "views", "height", "width"]
    rows = {r["key"]: r for r in manifest.to_pylist()}
    assert rows["rotated.jpg"]["height"] == 40 and rows["rotated.jpg"]["width"] == 100  # EXIF applied
    assert rows["sub/img1.png"]["height"] == 120 and rows["sub/img1.png"]["width"] == 200
    assert all(r["rows"] == store[k][0].shape[0] and r["views"] == 1 for k, r in rows.items())
    assert len({r["shard"] for r in rows.values()}) > 2  # written as it went, a few batches a shard
    assert (out / "errors.jsonl").read_text() == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == len(paths) and summary["errors"] == 0
    assert summary["tokens"] == sum(int(g.prod(-1).sum()) for _, g in (store[k] for k in store))
    assert summary["items_per_s"] > 0 and summary["tokens_per_s"] > 0 and 0 <= summary["padding"] < 1

    # the mapping is read-only and lazy, and survives pickling (DataLoader workers)
    with pytest.raises(TypeError):
        store["rotated.jpg"] = None
    again = pickle.loads(pickle.dumps(store))
    assert torch.equal(again["rotated.jpg"][0], store["rotated.jpg"][0])
    with pytest.raises(KeyError):
        store["missing.jpg"]


def test_hidden_features(folder, tmp_path):
    root, paths = folder
    out = tmp_path / "hidden"
    assert run([root, "--out", out, *TINY, "--features", "hidden", "--workers", 0]) == 0
    proc = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=MAX_PIXELS)
    assert_same_features(load_features(out), reference(tiny_model(), proc, paths, hidden=True))


def test_strategy_views_are_one_item(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    paths = {}
    for i, (w, h) in enumerate([(500, 300), (200, 600)]):
        paths[f"{i}.png"] = root / f"{i}.png"
        paths[f"{i}.png"].write_bytes(_encode_image(w, h, i, "PNG"))
    out = tmp_path / "out"
    argv = [root, "--out", out, "--preset", "tiny", "--quiet", "--strategy", "internvl", "--workers", 0]
    assert run([*argv, "--max-tokens", 3000]) == 0
    store = load_features(out)
    proc = nv.ImageProcessor.for_model("qwen2_vl", strategy="internvl")
    expected = reference(tiny_model(), proc, paths)
    assert_same_features(store, expected)
    assert all(store[k][1].shape[0] > 1 for k in store)  # tiles + thumbnail: (views, 3) grids


def test_list_file(folder, tmp_path):
    root, paths = folder
    listing = tmp_path / "lists" / "items.txt"
    listing.parent.mkdir()
    lines = [
        "# images to encode",
        "",
        "../images/img0.jpg",
        str(paths["sub/img1.png"]),
        "  ../images/rotated.jpg  ",
    ]
    lines += ["../images/missing.png"]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run([listing, "--out", out, *TINY, "--workers", 0]) == 0
    store = load_features(out)
    keys = ["../images/img0.jpg", str(paths["sub/img1.png"]), "../images/rotated.jpg"]
    proc = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=MAX_PIXELS)
    expected = reference(tiny_model(), proc, {k: listing.parent / k for k in keys})
    assert_same_features(store, expected)
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "../images/missing.png" and "no image file" in error["error"]


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    images = {}
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"data-{s:03d}.tar")) as tar:
            for i in range(3):
                key = f"shard{s}/{i:04d}"
                w, h = SIZES[(3 * s + i) % len(SIZES)]
                images[key] = _encode_image(w, h, 10 * s + i, "PNG" if i % 2 else "JPEG")
                tar.write(
                    {"__key__": key, "png" if i % 2 else "jpg": images[key], "json": b'{"caption": "x"}'}
                )
            tar.write({"__key__": f"shard{s}/caption-only", "txt": b"no image here"})
    out = tmp_path / "out"
    assert run([tmp_path / "data-{000..001}.tar", "--out", out, *TINY, "--workers", 1]) == 0
    proc = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=MAX_PIXELS)
    expected = reference(tiny_model(), proc, {k: io.BytesIO(v) for k, v in images.items()})
    assert_same_features(load_features(out), expected)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == ["shard0/caption-only", "shard1/caption-only"]
    assert all("no image" in e["error"] for e in errors)


def _png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` (its pixel data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_corrupt_inputs_are_listed_and_skipped(folder, tmp_path, capsys):
    root, paths = folder
    good = _encode_image(120, 90, 5, "JPEG")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])  # header fine, pixel data cut
    (root / "garbage.png").write_bytes(b"this is not a png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # refused from its header
    (root / "strip.png").write_bytes(_encode_image(1000, 4, 0, "PNG"))  # aspect ratio 250 > 200
    bad = {"truncated.jpg", "garbage.png", "empty.jpg", "bomb.png", "strip.png"}
    out = tmp_path / "out"
    assert run([root, "--out", out, *TINY, "--workers", 1]) == 0
    err = capsys.readouterr().err
    assert "5 inputs were not encoded" in one_line(err)
    store = load_features(out)
    assert sorted(store) == sorted(paths)
    errors = {e["key"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == bad
    assert "truncated" in errors["truncated.jpg"]["error"]
    assert "decompression" in errors["bomb.png"]["error"]
    assert "aspect ratio" in errors["strip.png"]["error"]
    assert json.loads((out / "summary.json").read_text())["errors"] == 5

    # --strict: the same run (nothing left to encode but the bad inputs, tried again) exits 1, one line
    assert run([root, "--out", out, *TINY, "--workers", 0, "--strict"]) == 1
    assert "5 inputs were not encoded" in one_line(capsys.readouterr().err)
    assert sorted(load_features(out)) == sorted(paths)


# ----------------------------------------------------------------------------- resumption


def test_killed_run_resumes_to_the_uninterrupted_result(folder, tmp_path):
    root, paths = folder
    args = [*TINY, "--max-tokens", 64, "--batches-per-shard", 1, "--workers", 0]
    out = tmp_path / "out"
    # SIGKILL just before the second shard is renamed: one shard complete, one half-written
    env = {**os.environ, KILL_ENV: "before:2"}
    cmd = [sys.executable, "-m", "nativevit.encode", str(root), "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    (first,) = sorted((out / "shards").glob("*.safetensors"))
    assert [p.name for p in (out / "shards").glob("*.tmp")] == ["shard-0001-00000-000001.safetensors.tmp"]
    survived = load_features(out)  # what a stopped run keeps is readable
    assert 0 < len(survived) < len(paths)
    done = {k: survived[k][0].clone() for k in survived}
    stamp = first.stat().st_mtime_ns

    assert run([root, "--out", out, *args]) == 0  # the same command again
    assert first.stat().st_mtime_ns == stamp  # the finished shard was kept, not recomputed
    assert not list((out / "shards").glob("*.tmp"))
    store = load_features(out)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == len(set(manifest.column("key").to_pylist())) == len(paths)  # nothing doubled
    assert json.loads((out / "summary.json").read_text())["items"] == len(paths) - len(done)
    for key, features in done.items():
        assert torch.equal(store[key][0], features)

    whole = tmp_path / "whole"  # the uninterrupted run, with another budget and worker count
    assert run([root, "--out", whole, *TINY, "--workers", 1]) == 0
    uninterrupted = load_features(whole)
    assert sorted(store) == sorted(uninterrupted)
    for key in store:
        assert torch.equal(store[key][1], uninterrupted[key][1])
        torch.testing.assert_close(store[key][0], uninterrupted[key][0], rtol=1e-4, atol=1e-5)


def test_refuses_an_output_folder_of_other_settings(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "out"
    base = [root, "--out", out, *TINY, "--workers", 0]
    assert run(base) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    capsys.readouterr()
    for other in (
        ["--dtype", "bf16"],
        ["--features", "hidden"],
        ["--seed", "1"],
        ["--max-pixels", 28 * 28 * 8],
    ):
        assert run([*base, *other]) == 1, other  # (the last --max-pixels wins)
        line = one_line(capsys.readouterr().err)
        assert line.startswith("nativevit encode: error: ") and "--overwrite" in line, line
    assert run([root, "--out", out, "--preset", "qwen2_5_vl_tiny", "--quiet", "--workers", 0]) == 1
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before  # untouched

    # options that do not change the features are not "other settings": the rerun has nothing to do
    assert run([*base, "--max-tokens", 77, "--workers", 1, "--batches-per-shard", 2]) == 0
    assert json.loads((out / "summary.json").read_text())["items"] == 0

    assert run([*base, "--dtype", "bf16", "--overwrite"]) == 0
    store = load_features(out)
    assert store.settings["settings"]["dtype"] == "bf16"
    assert store[next(iter(store))][0].dtype == torch.bfloat16
    assert all(before.get(p.name) != p.stat().st_mtime_ns for p in (out / "shards").iterdir())  # rewritten


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["{root}", "--out", "{out}"], "one of the arguments --checkpoint --preset is required"),
        (["{root}", "--out", "{out}", "--preset", "nope"], "argument --preset"),
        (["{root}", "--out", "{out}", "--preset", "tiny", "--checkpoint", "{root}"], "not allowed with"),
        (["{tmp}/missing", "--out", "{out}", "--preset", "tiny"], "argument INPUT"),
        (["{root}", "--out", "{root}/img0.jpg", "--preset", "tiny"], "argument --out"),
        (["{root}", "--out", "{out}", "--checkpoint", "{tmp}/nockpt"], "argument --checkpoint"),
        (["{root}", "--out", "{out}", "--preset", "tiny", "--max-tokens", "0"], "argument --max-tokens"),
        (["{root}", "--out", "{out}", "--preset", "tiny", "--backend", "nope"], "argument --backend"),
        (["{root}", "--out", "{out}", "--preset", "tiny", "--device", "cuda:7"], "argument --device"),
        (["{root}", "--out", "{out}", "--preset", "tiny", "--features", "pooled"], "argument --features"),
        (["{root}", "--out", "{out}", "--preset", "qwen3_vl_tiny", "--strategy", "internvl"], "--strategy"),
        (["{tmp}/x.tar.gz", "--out", "{out}", "--preset", "tiny"], "compressed"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(folder, tmp_path, capsys, argv, needle):
    root, _ = folder
    values = {"root": root, "out": tmp_path / "out", "tmp": tmp_path}
    with pytest.raises(SystemExit) as e:
        run([a.format(**values) for a in argv])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("nativevit encode: error: ") and needle in line, line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- models and processes


def test_checkpoint_and_its_processor(folder, tmp_path):
    root, paths = folder
    model = tiny_model(seed=7)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    (ckpt / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 9})
    )
    out = tmp_path / "out"
    assert run([root, "--out", out, "--checkpoint", ckpt, "--quiet", "--workers", 0]) == 0
    loaded = nv.NativeViT.from_pretrained(ckpt)
    proc = nv.ImageProcessor.for_model("qwen2_vl", min_pixels=3136, max_pixels=28 * 28 * 9)
    assert_same_features(load_features(out), reference(loaded, proc, paths))


@pytest.mark.parametrize("family", ["pixtral", "siglip2", "glm4v", "ernie4_5_vl_moe"])
def test_checkpoints_of_other_families(family, folder, tmp_path):
    """Towers whose processors size images otherwise (Pixtral's longest edge, SigLIP2's patch budget,
    GLM's T-counting bounds) or whose merger takes the batch's grids (ERNIE's resampler)."""
    root, paths = folder
    torch.manual_seed(0)
    nv.NativeViT(nv.VisionConfig.preset(family, tiny=True)).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert run([root, "--out", out, "--checkpoint", tmp_path / "ckpt", "--quiet", "--workers", 0]) == 0
    loaded = nv.NativeViT.from_pretrained(tmp_path / "ckpt")
    assert_same_features(load_features(out), reference(loaded, nv.ImageProcessor.for_model(family), paths))


def test_a_batch_out_of_memory_is_encoded_item_by_item(folder):
    from nativevit.encode.runner import encode_batch

    class Small(nv.NativeViT):  # runs out of memory past 64 patch rows
        def forward(self, pixel_values, grid_thw, **kw):
            if pixel_values.shape[0] > 64:
                raise torch.OutOfMemoryError("test: over 64 rows")
            return super().forward(pixel_values, grid_thw, **kw)

    torch.manual_seed(0)
    model = Small(nv.VisionConfig.tiny()).eval()
    proc = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=MAX_PIXELS)
    _, paths = folder
    keys = ["img0.jpg", "sub/img1.png", "img6.jpg"]  # 16, 60 and 36 patch rows: together over 64
    batches = [proc([paths[k]]) for k in keys]
    batch = {
        "pixel_values": torch.cat([b.pixel_values for b in batches]),
        "grid_thw": torch.cat([b.grid_thw for b in batches]),
        "items": [(i, 1, 0, 0) for i in range(len(keys))],
    }
    results = encode_batch(model, batch, hidden=False, device=torch.device("cpu"))
    expected = reference(tiny_model(), proc, {k: paths[k] for k in keys})
    for key, (features, grid) in zip(keys, results):
        torch.testing.assert_close(features, expected[key][0], rtol=1e-4, atol=1e-5)
        assert grid.tolist() == expected[key][1].tolist()
    too_big = {
        "pixel_values": torch.zeros(68, 1176),
        "grid_thw": torch.tensor([[1, 2, 34]]),
        "items": [(0, 1, 0, 0)],
    }
    (alone,) = encode_batch(model, too_big, hidden=False, device=torch.device("cpu"))
    assert alone.startswith("out of memory encoding 68 patches alone")  # listed as that item's error


def test_assign_by_tokens_balances_tokens_not_files():
    lengths = [1000, 10, 10, 10, 10, 10, 400, 400, 200]
    ranks = assign_by_tokens(lengths, 2)
    assert sorted(i for r in ranks for i in r) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert abs(loads[0] - loads[1]) <= 10  # 1030 and 1020: the big image alone against many small ones
    assert ranks[0][0] == 0 and len(ranks[0]) < len(ranks[1])
    assert assign_by_tokens(lengths, 2) == ranks  # every rank computes the same split
    assert assign_by_tokens([], 3) == [[], [], []]


def test_torchrun_two_processes_equal_one(folder, tmp_path):
    root, paths = folder
    args = [*TINY, "--max-tokens", 96, "--batches-per-shard", 1, "--workers", 1]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nativevit.encode", str(root), "--out", str(two), *map(str, args)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    assert run([root, "--out", one, *args]) == 0

    a, b = load_features(two), load_features(one)
    assert sorted(a) == sorted(b) == sorted(paths)
    for key in b:
        assert torch.equal(a[key][1], b[key][1])
        torch.testing.assert_close(a[key][0], b[key][0], rtol=1e-4, atol=1e-5)
    ranks = {p.name.split("-")[2] for p in (two / "shards").glob("*.safetensors")}
    assert ranks == {"00000", "00001"}  # each rank wrote its own shards; one manifest covers all
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["items"] == len(paths)
    tokens = [r["patches"] for r in summary["ranks"]]
    assert abs(tokens[0] - tokens[1]) <= max(int(g.prod(-1).sum()) for _, g in (b[k] for k in b))
