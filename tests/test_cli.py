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
    cmd = [sys.executable, "-m", "nativevit.cli", "bench", "--quick", *SMALL, "--out", str(out)]
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


def test_profile_tiny(tmp_path, capsys):
    trace = tmp_path / "missing" / "dir" / "t.json"
    argv = ["profile", "--depth", "1", *SMALL, "--rows", "3"]
    assert main([*argv, "--trace", str(trace)]) == 0
    assert trace.is_file()
    json.loads(trace.read_text())
    assert "Chrome trace written" in capsys.readouterr().out


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
        ["profile", "--rows", "-1"],
        ["profile", "--depth", "0"],
        ["profile", "--device", "tpu"],
        ["profile", "--backend", "nope"],
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


def test_bad_out_and_trace_paths_exit_2(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for argv in (["bench", "--out", str(a_file)], ["profile", "--trace", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        _one_error_line(capsys.readouterr().err, " ".join(["nativevit", argv[0]]))


def test_failed_work_exits_1_with_one_line(tmp_path, capsys):
    fake = tmp_path / "not-an-image.jpg"
    fake.write_text("this is text")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    trace = a_file / "t.json"  # its parent is a file: the trace cannot be written
    cases = [
        (["tokens", str(fake)], "not-an-image.jpg"),
        (["tokens", str(tmp_path / "missing.png")], "missing.png"),
        (["tokens", "1x1"], "refused"),
        (["profile", "--depth", "1", "--trace", str(trace)], "trace"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        line = _one_error_line(captured.err, f"nativevit {argv[0]}")
        assert expected in line
        assert "written" not in captured.out
    assert not trace.exists()


def test_console_errors_have_no_traceback(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "nativevit.cli", "tokens", str(fake)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc.stderr, "nativevit tokens")
