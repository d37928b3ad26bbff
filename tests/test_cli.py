"""The command line: smoke runs on small inputs, and every bad argument or failed run ends in one line
with exit status 2 (bad arguments) or 1 (failed work), never a traceback or a claim of success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nativevit as nv
from nativevit.bench.images import synthetic_image
from nativevit.bench.results import CSV_COLUMNS, parse_shape, read_csv
from nativevit.cli import main

REPO = Path(__file__).resolve().parent.parent
# the width-64 test tower on small but mixed inputs: the seed set at most 16 merged tokens per image
SMALL = ["--model", "tiny", "--images", "seed", "--max-pixels", str(28 * 28 * 16)]


def _written_files(root: Path, since: float) -> list[Path]:
    """Results-like files under the source tree created or modified after ``since``."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".pytest_cache", "__pycache__")]
        for name in files:
            path = Path(folder, name)
            if path.suffix in (".csv", ".png", ".json") and path.stat().st_mtime >= since:
                found.append(path)
    return found


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bench_quick_writes_to_out_only(tmp_path):
    start = time.time() - 1
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "nativevit.cli", "bench", "--quick", *SMALL, "--dtype", "fp32", "bf16"]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (csv_path,) = out.glob("*-encoder.csv")
    assert str(csv_path.resolve()) in proc.stdout  # the path is printed
    rows = read_csv(csv_path)
    assert rows and set(rows[0]) == set(CSV_COLUMNS)
    metrics = {(r["backend"], r["metric"]) for r in rows}
    assert {("ratio", "work_ratio"), ("ratio", "speedup"), ("ratio", "peak_memory_ratio")} <= metrics
    assert any(b.startswith("packed:") for b, _ in metrics) and ("padded:padded", "latency") in metrics
    assert {parse_shape(r["shape"]).get("depth") for r in rows if r["metric"] == "latency"} == {"1"}
    assert {r["dtype"] for r in rows if r["metric"] == "speedup"} == {"fp32", "bf16"}  # one run per dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing else in the cwd
    assert _written_files(REPO, start) == []


def test_bench_default_out_is_in_the_current_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", *SMALL, "--iters", "2", "--compare", "transformers"]) == 0
    (csv_path,) = (tmp_path / "nativevit-results").glob("*-encoder.csv")
    out = capsys.readouterr().out
    assert "speedup packed vs padded" in out and "speedup packed vs transformers" in out
    assert str(csv_path.resolve()) in out
    metrics = {(r["backend"], r["metric"]) for r in read_csv(csv_path)}
    assert {("transformers:sdpa", "latency"), ("ratio", "speedup_vs_transformers")} <= metrics


def test_tokens(capsys):
    assert main(["tokens", "1920x1080", "336x336", "--strategy", "qwen2_vl", "--strategy", "llava15"]) == 0
    out = capsys.readouterr().out
    assert "qwen2_vl" in out and "llava15" in out and "1920x1080" in out


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    nv.NativeViT(nv.VisionConfig.tiny(depth=1)).save_pretrained(path)
    return path


def _own_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, (w, h) in enumerate([(90, 60), (40, 130)]):
        Image.fromarray(synthetic_image(w, h, seed=i)).save(folder / f"img{i}.png")
    return folder


def test_profile_writes_trace_table_and_summary_without_stray_lines(tmp_path):
    out = tmp_path / "prof"
    cmd = [sys.executable, "-m", "nativevit.cli", "profile", "--depth", "2", *SMALL, "--steps", "2"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # no profiler or GPU-probe log lines on a machine without a GPU
    (trace,) = out.glob("*-trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    for module in ("patch_embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "merger"):
        assert f"nativevit::{module}" in names, module  # the model's structure is in the trace
    (summary_path,) = [p for p in out.glob("*.json") if not p.name.endswith("-trace.json")]
    summary = json.loads(summary_path.read_text())
    modules = {m["name"]: m for m in summary["modules"]}
    assert set(modules) == {
        "patch_embed",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
        "merger",
    }
    assert all(m["seconds"] > 0 and m["calls"] == 1 for m in modules.values())
    assert sum(m["flops"] for m in modules.values()) == summary["forward_flops"]
    assert sum(m["seconds"] for m in modules.values()) <= summary["forward_s"]
    assert summary["peak_memory_bytes"] > 0 and summary["mm_peak_flops"] > 0
    assert "attn (all blocks)" in proc.stdout and "blocks.1.mlp" in proc.stdout
    rows = read_csv(next(out.glob("*-profile.csv")))
    by = {(parse_shape(r["shape"])["module"], r["metric"]) for r in rows}
    assert {("forward", "latency"), ("blocks.0.attn", "gflops"), ("merger", "mm_fraction")} <= by


def test_profile_compiled_own_images_and_checkpoint(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    images = _own_images(tmp_path / "pics")
    argv = [
        "profile",
        "--checkpoint",
        str(ckpt),
        "--images",
        str(images),
        "--compile",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled: first call" in out and "no recompile for the profiled batch" in out
    assert "no time per module" in out
    (summary_path,) = [p for p in (tmp_path / "o").glob("*.json") if not p.name.endswith("-trace.json")]
    summary = json.loads(summary_path.read_text())
    assert summary["images"] == "pics" and summary["batch"]["inputs"] == 2
    assert summary["model"]["label"] == "ckpt" and summary["model"]["depth"] == 1
    assert summary["graphs_compiled_for_the_batch"] == 0


@pytest.mark.parametrize("model", ["qwen2_5_vl_tiny", "qwen3_vl_tiny"])
def test_profile_every_family(model, tmp_path, capsys):
    argv = [
        "profile",
        "--model",
        model,
        "--depth",
        "3",
        "--images",
        "seed",
        "--max-pixels",
        str(256 * 256),  # Qwen3-VL's min_pixels
    ]
    assert main([*argv, "--backend", "padded", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "padded layout" in out and "blocks.2.attn" in out
    if model == "qwen3_vl_tiny":
        assert "deepstack mergers" in out


def test_bench_compiled_against_eager(tmp_path, capsys):
    argv = [
        "bench",
        "--quick",
        *SMALL,
        "--compile",
        "--dtype",
        "bf16",
        "--iters",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("speedup compiled vs eager (packed)") == 1
    assert out.count("no recompile during the 2 timed round(s)") == 1
    assert "first call" in out and "(the compilation)" in out
    rows = read_csv(next(tmp_path.glob("*-encoder.csv")))
    metrics = {(r["dtype"], r["backend"].split(":")[0], r["metric"]): r["value"] for r in rows}
    for dtype in ("bf16",):
        assert float(metrics[(dtype, "compiled", "compile_time")]) > 0
        assert metrics[(dtype, "compiled", "recompiles")] == "0"
        assert float(metrics[(dtype, "ratio", "compiled_speedup")]) > 0
        assert float(metrics[(dtype, "compiled", "latency")]) > 0


def test_bench_own_images_and_checkpoint(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    images = _own_images(tmp_path / "pics")
    argv = [
        "bench",
        "--checkpoint",
        str(ckpt),
        "--images",
        str(images),
        "seed",
        "--max-pixels",
        str(28 * 28 * 16),
    ]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {ckpt}" in out and "[pics] 2 input(s)" in out and "[seed] 6 input(s)" in out
    rows = read_csv(next((tmp_path / "o").glob("*-encoder.csv")))
    shapes = {parse_shape(r["shape"])["set"] for r in rows if r["metric"] == "latency"}
    assert shapes == {"pics", "seed"}
    assert {parse_shape(r["shape"])["model"] for r in rows if r["metric"] == "latency"} == {"ckpt"}


def test_gpu_suite_without_a_gpu_says_so_within_seconds(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.time()
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_suite: no" in proc.stderr and "GPU" in proc.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.slow
def test_gpu_suite_plumbing_on_a_cpu(tmp_path):
    """--smoke: every step of the suite at toy sizes on this CPU (no build; CUDA tests only collected)."""
    out = tmp_path / "smoke"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps["build"] == "skipped (smoke)"
    assert all(status == "ok" for name, status in steps.items() if name != "build"), steps
    text = (out / "summary.md").read_text()
    assert "## Encoder" in text and "## Kernels" in text and "compiled_speedup" in text
    assert list(out.glob("*-kernels.png")) and list(out.glob("*-encoder.png"))


def test_bench_scripts_write_to_out(tmp_path):
    for script, argv, name in (
        ("bench_packing.py", ["--mix-items", "100", "--budgets", "8192"], "packing"),
        ("bench_strategies.py", ["--no-time", "--strategies", "qwen2_vl", "llava15"], "strategies"),
    ):
        cmd = [sys.executable, str(REPO / "benchmarks" / script), *argv, "--out", str(tmp_path)]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        (csv_path,) = tmp_path.glob(f"*-{name}.csv")
        assert read_csv(csv_path)
        assert csv_path.with_suffix(".png").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--depth", "0"],
        ["bench", "--depth", "-1"],
        ["bench", "--backend", "nope"],
        ["bench", "--backend", "padded"],
        ["bench", "--device", "tpu"],
        ["bench", "--iters", "0"],
        ["bench", "--model", "qwen3_vl", "--compare", "transformers"],
        ["bench", "--images", "nope"],
        ["bench", "--checkpoint", "/nonexistent/ckpt"],
        ["bench", "--checkpoint", ".", "--model", "tiny"],
        ["bench", "--dtype"],
        ["profile", "--rows", "-1"],
        ["profile", "--depth", "0"],
        ["profile", "--device", "tpu"],
        ["profile", "--backend", "nope"],
        ["profile", "--steps", "0"],
        ["profile", "--model", "nope"],
        ["profile", "--images", "/nonexistent/folder"],
        ["profile", "--checkpoint", "/nonexistent/ckpt"],
        ["tokens", "0x0"],
        ["tokens", "1920x1080", "--strategy", "nope"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "no-command",
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    prog = " ".join(["nativevit", *argv[:1]])
    _one_error_line(captured.err, prog)
    assert "written" not in captured.out


def test_bad_out_paths_and_inputs_exit_2(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-ckpt").mkdir()
    for argv in (
        ["bench", "--out", str(a_file)],
        ["profile", "--out", str(a_file)],
        ["kernels", "--out", str(a_file)],
        ["bench", "--images", str(tmp_path / "empty")],
        ["profile", "--checkpoint", str(tmp_path / "not-a-ckpt")],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        _one_error_line(capsys.readouterr().err, " ".join(["nativevit", argv[0]]))


def test_failed_work_exits_1_with_one_line(tmp_path, capsys):
    fake = tmp_path / "not-an-image.jpg"
    fake.write_text("this is text")
    cases = [
        (["tokens", str(fake)], "not-an-image.jpg"),
        (["tokens", str(tmp_path / "missing.png")], "missing.png"),
        (["tokens", "1x1"], "refused"),
        (
            ["profile", "--model", "tiny", "--depth", "1", "--images", str(fake), "--out", str(tmp_path)],
            "not-an-image",
        ),
        (
            ["bench", "--model", "tiny", "--depth", "1", "--images", str(fake), "--out", str(tmp_path)],
            "not-an-image",
        ),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        line = _one_error_line(captured.err, f"nativevit {argv[0]}")
        assert expected in line
        assert "written" not in captured.out


def test_console_errors_have_no_traceback(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "nativevit.cli", "tokens", str(fake)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc.stderr, "nativevit tokens")
