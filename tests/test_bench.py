"""nativevit.bench: the CSV schema, interleaved timing, FLOP accounting, image sets, kernel runs."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nativevit as nv
from nativevit.bench import encoder, kernels, results
from nativevit.bench.env import DTYPES, dtype_name, parse_device
from nativevit.bench.flops import attention_flops, padded_lengths, vit_flops
from nativevit.bench.images import IMAGE_SETS, VIDEO_FRAMES, image_set, synthetic_image
from nativevit.bench.measure import Case, Timing, measure, time_fn
from nativevit.bench.plot import encoder_ratios
from nativevit.model import flops as model_flops

# ----------------------------------------------------------------------------- CSV schema


def test_csv_round_trip_and_append(tmp_path):
    path = tmp_path / "sub" / "hw-encoder.csv"
    first = [
        results.Row(
            "encoder", "packed:cpu", "fp32", results.shape(set="seed", depth=2), "latency", 1.25, "s"
        ),
        results.Row(
            "encoder", "packed:cpu", "fp32", results.shape(set="seed", depth=2), "peak_memory", 12345, "B"
        ),
    ]
    second = [results.Row("encoder", "ratio", "bf16", "set=skewed", "speedup", 2.0 / 3.0, "x")]
    assert results.write_csv(path, first) == path
    results.write_csv(path, second)

    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == results.CSV_COLUMNS
    assert sum(1 for line in lines if tuple(line) == results.CSV_COLUMNS) == 1  # one header after an append

    rows = results.read_csv(path)
    assert [{k: r[k] for k in results.ROW_FIELDS} for r in rows] == [r.as_dict() for r in first + second]
    assert rows[0]["value"] == "1.25" and rows[1]["value"] == "12345"
    assert float(rows[2]["value"]) == pytest.approx(2.0 / 3.0, rel=1e-5)
    for r in rows:
        assert all(r[k] for k in results.STAMP_FIELDS), r
        assert r["torch"] == torch.__version__


def test_csv_refuses_another_schema(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="schema"):
        results.write_csv(path, [results.Row("x", "y", "fp32", "", "m", 1.0)])
    with pytest.raises(ValueError, match="schema"):
        results.read_csv(path)
    with pytest.raises(TypeError):
        results.write_csv(tmp_path / "new.csv", [{"benchmark": "x"}])
    with pytest.raises(TypeError):
        results.Row("x", "y", "fp32", "", "m", True).as_dict()


def test_shape_round_trip():
    text = results.shape(model="qwen2_vl", set="seed@256tok", depth=2, tokens=18308, skipped=None)
    assert text == "model=qwen2_vl;set=seed@256tok;depth=2;tokens=18308"
    assert results.parse_shape(text) == {
        "model": "qwen2_vl",
        "set": "seed@256tok",
        "depth": "2",
        "tokens": "18308",
    }
    with pytest.raises(ValueError):
        results.shape(set="a;b")


def test_results_path_is_under_out(tmp_path):
    path = results.results_path(tmp_path, "encoder")
    assert path.parent == tmp_path and path.name.endswith("-encoder.csv")
    assert not results.DEFAULT_OUT.is_absolute()


# ----------------------------------------------------------------------------- measurement


def test_measure_interleaves_rounds():
    calls = []
    cases = [Case(name, lambda name=name: calls.append(name)) for name in ("a", "b", "c")]
    timings = measure(cases, warmup=2, iters=3, memory=False)
    assert calls == ["a", "b", "c"] * 5  # 2 warm-up rounds, then 3 timed rounds, cases in turn
    assert list(timings) == ["a", "b", "c"]
    for t in timings.values():
        assert len(t.samples) == 3 and len(t.cpu_samples) == 3
        assert t.seconds == sorted(t.samples)[1]


def test_measure_times_each_case():
    timings = measure(
        [Case("short", lambda: time.sleep(0.01)), Case("long", lambda: time.sleep(0.05))],
        iters=3,
        memory=False,
    )
    assert 0.01 <= timings["short"].seconds < timings["long"].seconds
    assert timings["long"].min_seconds >= 0.05
    assert timings["long"].cpu_seconds < 0.05  # sleeping is not CPU time
    assert time_fn(lambda: time.sleep(0.01), warmup=0, iters=1) >= 0.01


def test_measure_tracks_peak_memory_of_first_round():
    def allocate():
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        return x.sum()

    t = measure([Case("alloc", allocate)], iters=2)["alloc"]
    assert t.peak_bytes >= 32 << 20


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unique"):
        measure([Case("a", lambda: None), Case("a", lambda: None)])
    with pytest.raises(ValueError, match="iters"):
        measure([Case("a", lambda: None)], iters=0)


# ----------------------------------------------------------------------------- FLOPs


def _batch(sizes, max_pixels=28 * 28 * 16):
    proc = nv.ImageProcessor(max_pixels=max_pixels)
    return proc([synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])


def test_attention_flops_match_the_flop_model():
    cfg = nv.VisionConfig.tiny(depth=3)
    lengths = [64, 16, 0, 36, 100]
    for padded in (False, True):
        per_layer = attention_flops(lengths, cfg.num_heads, cfg.head_dim, padded=padded)
        assert model_flops(cfg, lengths, padded=padded)["attention"] == cfg.depth * per_layer
    assert padded_lengths(lengths) == [100] * 4
    assert attention_flops([3, 5], 2, 8) == 4 * (9 + 25) * 2 * 8


def test_encoder_rows_report_the_flop_model():
    """The GFLOP, GFLOP/s and work-ratio rows are the FLOP model's numbers (fake timings: no run)."""
    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny(depth=2)).eval()
    batch = _batch([(100, 60), (300, 200), (56, 56)])
    modes = [
        encoder.encoder_mode(model, batch, layout=layout, device="cpu") for layout in ("packed", "padded")
    ]
    fake = [encoder.ModeResult(m, Timing(m.name, [2.0], [2.0], 1000)) for m in modes]
    rows = encoder.result_rows(
        fake, benchmark="encoder", dtype="fp32", peak_flops=1e12, model="qwen2_vl", set_label="t", depth=2
    )
    got = {(r.backend.split(":")[0], r.metric): r.value for r in rows}
    lengths = [h * w for t, h, w in batch.grid_thw.tolist() for _ in range(t)]
    for layout in ("packed", "padded"):
        expected = model_flops(model.config, lengths, padded=layout == "padded")["total"]
        assert expected == model.flops_per_batch(batch.grid_thw, layout=layout)["total"]
        assert got[(layout, "gflop")] == pytest.approx(expected / 1e9)
        assert got[(layout, "gflops")] == pytest.approx(expected / 2.0 / 1e9)
        assert got[(layout, "mm_fraction")] == pytest.approx(expected / 2.0 / 1e12)
    work = (
        model_flops(model.config, lengths, padded=True)["total"] / model_flops(model.config, lengths)["total"]
    )
    assert got[("ratio", "work_ratio")] == pytest.approx(work)
    assert got[("ratio", "speedup")] == pytest.approx(1.0)
    assert modes[0].rows == sum(lengths)
    assert modes[1].rows == len(lengths) * max(lengths)
    assert modes[0].backend != "padded" and modes[1].backend == "padded"


def test_flop_model_linear_term_matches_flop_counter():
    """An independent count: torch's FLOP counter sees every GEMM (not the attention kernels)."""
    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny(depth=2), attn_backend="torch").eval()
    batch = _batch([(100, 60), (300, 200), (56, 56)])
    for layout in ("packed", "padded"):
        mode = encoder.encoder_mode(model, batch, layout=layout, device="cpu")
        with FlopCounterMode(display=False) as counter:
            mode.step()
        assert counter.get_total_flops() == mode.flops["linear"], layout


def test_vit_flops_linear_term_matches_flop_counter():
    timm = pytest.importorskip("timm")
    from nativevit.bench import vs_timm

    torch.manual_seed(0)
    model = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=64, num_heads=4
    )
    model.eval()
    enc = nv.from_timm(model)
    sizes = vs_timm.view_sizes(((64, 32), (48, 80), (16, 16)), 16, 64)
    c = vs_timm.case(model, enc, sizes, torch.float32)
    for mode, fn in c["fns"].items():
        with FlopCounterMode(display=False) as counter:
            fn()
        assert counter.get_total_flops() == c["flops"][mode]["linear"], mode
    lengths = c["lengths"]
    assert c["flops"]["nativevit-packed"]["attention"] == attention_flops(lengths, 1, 64)
    assert c["flops"]["timm-padded"]["attention"] == attention_flops(lengths, 1, 64, padded=True)
    prefix = model.num_prefix_tokens
    patches = [n - prefix for n in lengths]
    dims = dict(prefix_tokens=prefix, depth=2, dim=64, mlp_hidden=256, patch_dim=768)
    assert vit_flops(patches, **dims)["attention"] == 2 * attention_flops(lengths, 1, 64)
    assert vit_flops(patches, **dims, padded=True)["attention"] == 2 * attention_flops(
        lengths, 1, 64, padded=True
    )


# ----------------------------------------------------------------------------- inputs, env


@pytest.mark.parametrize("name", sorted(IMAGE_SETS))
def test_image_sets(name):
    images = image_set(name)
    if name == "video":
        ((w, h),) = IMAGE_SETS[name]
        assert len(images) == 1 and len(images[0]) == VIDEO_FRAMES
        assert all(f.shape == (h, w, 3) for f in images[0])
    else:
        assert [(a.shape[1], a.shape[0]) for a in images] == list(IMAGE_SETS[name])
        assert all(a.dtype.name == "uint8" for a in images)
    with pytest.raises(ValueError, match="unknown image set"):
        image_set("nope")


def test_synthetic_image_is_deterministic():
    a, b = synthetic_image(17, 9, seed=3), synthetic_image(17, 9, seed=3)
    assert a.shape == (9, 17, 3) and (a == b).all()
    assert not (a == synthetic_image(17, 9, seed=4)).all()


def test_dtypes_and_devices():
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    assert parse_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "not a device"):
        with pytest.raises(ValueError):
            parse_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            parse_device("cuda")


# ----------------------------------------------------------------------------- kernels, plots


def test_kernel_run_rows(monkeypatch):
    monkeypatch.setattr(kernels, "mm_peak_flops", lambda dtype, device: 1e9)
    lengths = [5, 3, 1]
    run = kernels.KernelRun(
        "attention",
        heads=2,
        head_dim=8,
        cases=[kernels.mix_case(lengths)],
        backends=["torch", "padded"],
        warmup=0,
        iters=1,
    )
    rows = kernels.run_kernels(run, echo=lambda line: None)
    got = {(r.backend, r.metric): r.value for r in rows}
    assert {b for b, _ in got} == {"torch.mm", "torch", "padded"}
    for backend in ("torch", "padded"):
        s = got[(backend, "fwd_latency")]
        assert got[(backend, "fwd_gflops")] == pytest.approx(attention_flops(lengths, 2, 8) / s / 1e9)
        assert got[(backend, "bwd_gflops")] == pytest.approx(
            2.5 * attention_flops(lengths, 2, 8) / got[(backend, "bwd_latency")] / 1e9
        )
    assert rows[1].shape == "heads=2;head_dim=8;segments=5+3+1"
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.run_kernels(
            kernels.KernelRun("attention", backends=["nope"], cases=[]), echo=lambda line: None
        )


def test_encoder_ratios_for_plots(tmp_path):
    path = tmp_path / "hw-encoder.csv"
    rows = []
    for set_name, work, speed in (("seed", 1.5, 1.4), ("skewed", 4.0, 3.0)):
        where = results.shape(model="qwen2_vl", set=set_name, depth=2, tokens=100)
        rows += [
            results.Row("encoder", "ratio", "fp32", where, "work_ratio", work, "x"),
            results.Row("encoder", "ratio", "fp32", where, "speedup", speed, "x"),
        ]
    results.write_csv(path, rows)
    results.write_csv(path, [results.Row("encoder", "ratio", "fp32", rows[0].shape, "speedup", 1.45, "x")])
    assert encoder_ratios(path) == {"fp32": [("seed", 1.5, 1.45), ("skewed", 4.0, 3.0)]}
    assert math.isclose(encoder_ratios(path)["fp32"][1][1], 4.0)


def test_plot_encoder(tmp_path):
    pytest.importorskip("matplotlib")
    from nativevit.bench.plot import plot_encoder

    path = tmp_path / "hw-encoder.csv"
    where = results.shape(model="qwen2_vl", set="seed", depth=2, tokens=100)
    results.write_csv(
        path,
        [
            results.Row("encoder", "ratio", "fp32", where, "work_ratio", 1.5, "x"),
            results.Row("encoder", "ratio", "fp32", where, "speedup", 1.4, "x"),
        ],
    )
    out = plot_encoder(path, tmp_path / "plots" / "encoder.png")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no encoder ratio rows"):
        plot_encoder(results.write_csv(tmp_path / "empty-encoder.csv", []))
