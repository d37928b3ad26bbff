"""``nativevit kernels``: our backends and the peers on the same batches, every row checked against the
FLOP formulas and a float64 reference; what cannot run is listed with its reason, never dropped."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from nativevit.bench import kernels
from nativevit.bench.flops import ATTENTION_BWD_FACTOR, attention_flops, rope_bytes
from nativevit.bench.peers import ATTENTION_PEERS, Problem, impls
from nativevit.bench.results import parse_shape, read_csv
from nativevit.cli import main

# a tiny problem: 2 heads of 16, the quick skewed mix (1024 + 16 x 64 tokens)
TINY = [
    "--dtypes",
    "fp32",
    "--head-dims",
    "16",
    "--heads",
    "2",
    "--sets",
    "mix-skewed",
    "--quick",
    "--device",
    "cpu",
]
LENGTHS = kernels.QUICK_MIXES["mix-skewed"]


def _rows(path):
    return [r for r in read_csv(path) if r["metric"] != "mm_peak"]


def test_kernels_command_times_ours_and_peers(tmp_path):
    out = tmp_path / "res"
    impls_ = ["cpu", "torch", "sdpa_per_image", "sdpa_padded", "hf_rotate_half"]
    impls_ += ["varlen_attn", "flash_attn_varlen_func", "xformers_blockdiag", "flash_attn_rotary"]
    cmd = [sys.executable, "-m", "nativevit.cli", "kernels", *TINY, "--iters", "2", "--impls", *impls_]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # no warnings, no stray log lines (e.g. kineto, inductor) on a CPU
    (csv_path,) = out.glob("*-kernels.csv")
    pytest.importorskip("matplotlib")
    assert csv_path.with_suffix(".png").is_file()
    rows = _rows(csv_path)
    got = {(r["benchmark"], r["backend"], r["metric"]): r for r in rows}
    elem = 4
    flop = attention_flops(LENGTHS, 2, 16)
    for impl in ("sdpa_per_image", "sdpa_padded") + (
        ("cpu",) if ("attention", "cpu", "fwd_latency") in got else ()
    ):
        for phase, factor in (("fwd", 1), ("bwd", ATTENTION_BWD_FACTOR)):
            latency = float(got[("attention", impl, f"{phase}_latency")]["value"])
            fastest = float(got[("attention", impl, f"{phase}_min_latency")]["value"])
            assert 0 < fastest <= latency
            rate = float(got[("attention", impl, f"{phase}_tflops")]["value"])
            assert rate == pytest.approx(factor * flop / latency / 1e12, rel=1e-4)
            assert float(got[("attention", impl, f"{phase}_max_err")]["value"]) < 1e-4  # fp32 vs fp64
    total = sum(LENGTHS)
    latency = float(got[("rope", "hf_rotate_half", "fwd_latency")]["value"])
    gbps = float(got[("rope", "hf_rotate_half", "fwd_gbps")]["value"])
    assert gbps == pytest.approx(rope_bytes(total, 2, 16, elem) / latency / 1e9, rel=1e-4)
    # every row describes the batch it ran on
    timed = [r for r in rows if r["metric"] == "fwd_latency"]
    assert {parse_shape(r["shape"])["tokens"] for r in timed} == {str(total)}
    assert {parse_shape(r["shape"])["longest"] for r in timed} == {str(max(LENGTHS))}
    # peers that cannot run on a CPU are listed with their reason, in the output and in the CSV
    skipped = {(r["benchmark"], r["backend"]): r["value"] for r in rows if r["metric"] == "skipped"}
    assert "CUDA" in skipped[("attention", "varlen_attn")]
    assert ("attention", "flash_attn_varlen_func") in skipped  # CUDA only, installed or not
    if importlib.util.find_spec("xformers") is None:
        assert "not installed" in skipped[("attention", "xformers_blockdiag")]
    assert ("rope", "flash_attn_rotary") in skipped
    assert "varlen_attn: unavailable" in proc.stdout
    assert "headline" in proc.stdout and "sdpa_per_image" in proc.stdout


def test_flex_attention_peer_runs_forward_and_says_why_not_backward(tmp_path, capsys):
    argv = [
        "kernels",
        *TINY,
        "--ops",
        "attention",
        "--impls",
        "flex_document",
        "sdpa_per_image",
        "--iters",
        "1",
    ]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (csv_path,) = tmp_path.glob("*-kernels.csv")
    rows = {(r["backend"], r["metric"]): r["value"] for r in _rows(csv_path)}
    assert float(rows[("flex_document", "fwd_max_err")]) < 1e-4
    assert float(rows[("flex_document", "setup_time")]) > 0  # the BlockMask, built outside the timed call
    # torch 2.14 has no FlexAttention backward on CPU: said, not hidden
    assert ("flex_document", "bwd_latency") not in rows
    assert "backward" in rows[("flex_document", "skipped")]
    assert "flex_document: backward failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "peer", [p.name for p in ATTENTION_PEERS if p.name in ("sdpa_per_image", "sdpa_padded")]
)
def test_attention_peers_match_the_reference_with_empty_segments(peer):
    """The peers' layouts (per image, padded) map back to the packed rows, gradients included."""
    impl = next(i for i in impls("attention") if i.name == peer)
    lengths = [5, 0, 17, 1, 9]
    p = Problem.make("attention", lengths, 2, 8, torch.float64, "cpu", grad=True, seed=3)
    dout = torch.randn(p.total, 2, 8, dtype=torch.float64)
    (want,), want_grad = kernels.reference(p, (dout,), True)
    prepared = impl.prepare(p)
    out = prepared.forward()
    (got,) = prepared.outputs(out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, prepared.inputs, prepared.grad_outputs((dout,)))
    torch.testing.assert_close(prepared.input_grads(grads), want_grad, rtol=1e-12, atol=1e-12)


def test_rope_peer_matches_the_reference():
    impl = next(i for i in impls("rope") if i.name == "hf_rotate_half")
    p = Problem.make("rope", [7, 3], 3, 10, torch.float64, "cpu", grad=False)
    (want_q, want_k), _ = kernels.reference(p, (), False)
    got_q, got_k = impl.prepare(p).forward()
    # transformers' rotation computes in fp32, as ours does: fp32 accuracy
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


def test_float64_reference_is_chunked_without_changing_it(monkeypatch):
    from nativevit.backends.reference import varlen_attention_ref

    p = Problem.make("attention", [5, 0, 37, 12], 3, 16, torch.float64, "cpu", grad=True)
    dout = torch.randn(p.total, 3, 16, dtype=torch.float64)
    monkeypatch.setattr(kernels, "REFERENCE_CHUNK", 3 * 7)  # 7 query rows per block
    (out,), grad = kernels.reference(p, (dout,), True)
    qkv = p.qkv.detach().clone().requires_grad_()
    q, k, v = qkv.unbind(1)
    want = varlen_attention_ref(q, k, v, p.segments, p.scale)
    (want_grad,) = torch.autograd.grad(want, qkv, dout)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


def test_headline_compares_with_the_baseline_peer():
    from nativevit.bench.results import Row, shape

    where = shape(heads=2, head_dim=80, set="seed")
    rows = [
        Row("attention", "sdpa_per_image", "fp32", where, "fwd_latency", 0.2, "s"),
        Row("attention", "cpu", "fp32", where, "fwd_latency", 0.1, "s"),
    ]
    (line,) = kernels.headline(rows)
    assert line.startswith("attention fp32 d80 seed fwd: cpu 100.00 ms (2.00x)")


@pytest.mark.parametrize(
    "argv",
    [
        ["kernels", "--impls", "nope"],
        ["kernels", "--head-dims", "81"],
        ["kernels", "--head-dims", "0"],
        ["kernels", "--sets", "nope"],
        ["kernels", "--dtypes", "fp64"],
        ["kernels", "--iters", "0"],
        ["kernels", "--device", "tpu"],
    ],
    ids=" ".join,
)
def test_bad_kernel_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nativevit kernels: error: "), lines
