"""nativevit.bench: the CSV schema, interleaved timing, FLOP accounting, image sets, kernel runs."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nativevit as nv
from nativevit.bench import encoder, kernels, packing, results
from nativevit.bench import strategies as strategies_bench
from nativevit.bench.env import DTYPES, dtype_name, parse_device
from nativevit.bench.flops import attention_flops, module_flops, padded_lengths, vit_flops
from nativevit.bench.images import (
    IMAGE_SETS,
    VIDEO_FRAMES,
    image_set,
    input_sets,
    set_segments,
    synthetic_image,
)
from nativevit.bench.measure import Case, Timing, measure, time_fn
from nativevit.bench.plot import encoder_ratios
from nativevit.bench.profile import profiled_modules
from nativevit.bench.summary import summary
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
        impls=["torch", "padded"],
        warmup=0,
        iters=2,
    )
    rows = kernels.run_kernels(run, echo=lambda line: None)
    got = {(r.backend, r.metric): r.value for r in rows}
    assert {b for b, _ in got} == {"torch.mm", "torch", "padded"}
    for backend in ("torch", "padded"):
        for phase, factor in (("fwd", 1), ("bwd", 2.5)):
            s = got[(backend, f"{phase}_latency")]
            assert 0 < got[(backend, f"{phase}_min_latency")] <= s
            flop = factor * attention_flops(lengths, 2, 8)
            assert got[(backend, f"{phase}_tflops")] == pytest.approx(flop / s / 1e12)
            assert got[(backend, f"{phase}_mm_fraction")] == pytest.approx(flop / s / 1e9)
            assert got[(backend, f"{phase}_max_err")] < 1e-5  # fp32 against the float64 reference
    assert rows[1].shape == "heads=2;head_dim=8;set=5+3+1;tokens=9;segments=3;longest=5"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        kernels.run_kernels(kernels.KernelRun("attention", impls=["nope"], cases=[]), echo=lambda line: None)


def test_kernel_run_lists_what_cannot_run():
    """A backend that cannot run on the device, or refuses the input, gets a ``skipped`` row saying why."""
    run = kernels.KernelRun(
        "attention", heads=1, head_dim=8, cases=[("t", [4])], impls=["cuda", "torch"], iters=1, errors=False
    )
    lines = []
    rows = kernels.run_kernels(run, echo=lines.append, peak_flops=1e9)
    skipped = {r.backend: r.value for r in rows if r.metric == "skipped"}
    if not torch.cuda.is_available():
        assert "cuda" in skipped and "unavailable" in skipped["cuda"]
        assert any(line.strip().startswith("cuda: unavailable") for line in lines)
    assert any(r.backend == "torch" and r.metric == "fwd_latency" for r in rows)
    assert not any(r.metric.endswith("max_err") for r in rows)  # errors=False


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


def test_plot_strategies_packing_kernels(tmp_path):
    pytest.importorskip("matplotlib")
    from nativevit.bench import plot

    strategies_csv = tmp_path / "hw-strategies.csv"
    rows = []
    for name, size, tokens in (("qwen2_vl", "336x336", 144), ("llava15", "336x336", 576)):
        where = results.shape(strategy=name, size=size, depth=1)
        rows += [
            results.Row("strategies", "-", "fp32", where, "lm_tokens", tokens, "count"),
            results.Row("strategies", "-", "fp32", where, "encoder_gflop", 1.5, "GFLOP"),
        ]
    results.write_csv(strategies_csv, rows)
    assert plot.strategy_values(strategies_csv)["lm_tokens"][("llava15", "336x336")] == 576
    packing_csv = tmp_path / "hw-packing.csv"
    results.write_csv(packing_csv, packing.rows(*_study()))
    labels, sets, data = plot.packing_fractions(packing_csv)
    assert labels[0] == "budget 64" and "all" not in sets and data[("fixed k=2", "s")] == pytest.approx(0.2)
    kernels_csv = tmp_path / "hw-kernels.csv"
    where = results.shape(heads=2, head_dim=80, set="seed", tokens=10, segments=2, longest=6)
    results.write_csv(
        kernels_csv,
        [
            results.Row("attention", "cpu", "fp32", where, "fwd_tflops", 0.5, "TFLOP/s"),
            results.Row("rope", "cpu", "fp32", where, "bwd_gbps", 20.0, "GB/s"),
        ],
    )
    rates = plot.kernel_rates(kernels_csv)
    assert rates[("attention", "fp32", "fwd")] == {"cpu": {"seed": 0.5}}
    assert rates[("rope", "fp32", "bwd")] == {"cpu": {"seed": 20.0}}
    results.write_csv(
        tmp_path / "old-strategies.csv", [results.Row("strategies", "-", "fp32", "a;b", "x", 1)]
    )
    written, skipped = plot.plot_folder(tmp_path)
    assert sorted(p.name for p in written) == ["hw-kernels.png", "hw-packing.png", "hw-strategies.png"]
    assert len(skipped) == 1 and "old-strategies.csv" in skipped[0]  # rows it cannot plot: said, not fatal
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


# ----------------------------------------------------------------------------- packing study


def _study():
    sets = [("s", [3, 1, 2, 2])]
    return packing.study(sets, budgets=[64], batch_sizes=[2]), sets


def test_padding_of_each_way_of_batching():
    lengths = [3, 1, 2, 2]
    # fixed k=2 in dataset order: [3, 1] -> 2 x 3, [2, 2] -> 2 x 2: 8 real of 10 computed
    assert packing.fixed_padding(lengths, 2).fraction == pytest.approx(1 - 8 / 10)
    # bucket k=2 sorted: [1, 2] -> 2 x 2, [2, 3] -> 2 x 3: 8 of 10 as well; k=4: one batch padded to 3
    assert packing.bucket_padding(lengths, 2).computed == 10
    assert packing.bucket_padding(lengths, 4).fraction == pytest.approx(1 - 8 / 12)
    # budget 4: pack_by_budget gives [3, 1] and [2, 2], each exactly full
    b = packing.budget_padding(lengths, 4)
    assert (b.batches, b.computed, b.fraction, b.oversize) == (2, 8, 0.0, 0)
    # budget 5: two batches padded to 5 -> 8 of 10; an item over the budget counts at its own size
    assert packing.budget_padding(lengths, 5).fraction == pytest.approx(0.2)
    big = packing.budget_padding([7, 1], 4)
    assert (big.oversize, big.computed) == (1, 7 + 4)
    results_, sets = _study()
    rows = packing.rows(results_, sets)
    got = {(r.backend, r.shape, r.metric): r.value for r in rows}
    assert got[("fixed", "set=s;items=4;k=2", "padding_fraction")] == pytest.approx(0.2)
    assert got[("budget", "set=s;items=4;budget=64", "oversize_items")] == 0
    assert all(r.dtype == "-" for r in rows)
    table = packing.table(results_, markdown=True)
    assert table[0] == "| batching | s |" and "| fixed k=2 | 20.0% |" in table


def test_packing_item_sets_are_the_image_sets_and_a_seeded_mix():
    proc = nv.ImageProcessor()
    sets = dict(packing.item_sets(proc, mix_items=50, seed=3))
    assert list(sets)[: len(IMAGE_SETS)] == list(IMAGE_SETS)
    union = [n for name in IMAGE_SETS for n in sets[name]]
    assert sets["all"] == union
    assert len(sets["mix-50"]) == 50 and set(sets["mix-50"]) <= set(union)
    assert dict(packing.item_sets(proc, mix_items=50, seed=3))["mix-50"] == sets["mix-50"]
    # an item is an image, or a whole video clip (all its frames)
    assert sets["video"] == [sum(set_segments("video", proc)[0])]
    assert sets["seed"] == [n for (n,) in set_segments("seed", proc)]


# ----------------------------------------------------------------------------- FLOPs per module, inputs


@pytest.mark.parametrize("preset", ["tiny", "qwen2_5_vl_tiny", "qwen3_vl_tiny"])
def test_module_flops_split_the_flop_model(preset):
    cfg = getattr(nv.VisionConfig, preset)()
    model = nv.NativeViT(cfg)
    grid = [[1, 8, 12], [2, 4, 4], [1, 16, 20]]
    plan = model.plan(grid, layout="packed", device="cpu")
    windows = list(plan.windows.segments.lengths) if plan.windows is not None else None
    for layout in ("packed", "padded"):
        split = module_flops(
            cfg, list(plan.segments.lengths), padded=layout == "padded", window_lengths=windows
        )
        assert sum(split.values()) == model.flops_per_batch(grid, layout=layout)["total"]
        assert set(split) == {name for name, _ in profiled_modules(model)}


def test_input_sets(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i, size in enumerate([(60, 40), (30, 90)]):
        Image.fromarray(synthetic_image(*size, seed=i)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    loose = tmp_path / "one.jpg"
    Image.fromarray(synthetic_image(50, 50, seed=5)).save(loose)
    sets = input_sets(["seed", str(folder), str(loose), str(folder / "0.png")])
    assert [label for label, _ in sets] == ["seed", "pics", "files"]
    assert sets[1][1] == [str(folder / "0.png"), str(folder / "1.png")]
    assert sets[2][1] == [str(loose), str(folder / "0.png")]
    batch = nv.ImageProcessor()(sets[1][1])
    assert batch.num_images == 2
    assert input_sets([str(loose)])[0][0] == "one.jpg"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        input_sets([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="not a built-in image set"):
        input_sets([str(tmp_path / "missing")])


def test_set_segments_are_the_processor_grids():
    proc = nv.ImageProcessor(max_pixels=28 * 28 * 64)
    for name in ("seed", "video"):  # stills, and a clip of several frames
        batch = proc(image_set(name))
        segs = [n for item in set_segments(name, proc) for n in item]
        assert segs == torch.diff(batch.cu_seqlens).tolist(), name


# ----------------------------------------------------------------------------- compiled mode, strategies


def test_compiled_mode_reports_recompiles_in_the_timed_rounds_only():
    torch.manual_seed(0)
    model = nv.NativeViT(nv.VisionConfig.tiny(depth=1)).eval()
    batch = _batch([(100, 60), (56, 56)])
    eager = encoder.encoder_mode(model, batch, layout="packed", device="cpu")
    compiled = encoder.encoder_mode(model, batch, layout="packed", device="cpu")
    compiled.name, compiled.new_graphs = "compiled", [2, 0, 0]  # the first call was a warm-up round
    fake = [
        encoder.ModeResult(eager, Timing("packed", [2.0, 2.0], [2.0, 2.0])),
        encoder.ModeResult(compiled, Timing("compiled", [1.0, 1.0], [1.0, 1.0])),
    ]
    assert encoder.timed_new_graphs(fake[1], warmup=1) == 0
    assert encoder.timed_new_graphs(fake[1], warmup=0) == 2
    assert encoder.timed_new_graphs(fake[0], warmup=0) is None
    kw = dict(benchmark="encoder", dtype="fp32", peak_flops=1e12, model="tiny", set_label="t", depth=1)
    rows = {(r.backend.split(":")[0], r.metric): r.value for r in encoder.result_rows(fake, warmup=1, **kw)}
    assert rows[("ratio", "compiled_speedup")] == pytest.approx(2.0)
    assert rows[("compiled", "recompiles")] == 0
    lines = encoder.report(fake, 1e12, "fp32", warmup=1)
    assert "speedup compiled vs eager (packed): 2.00x (fastest rounds: 2.00x)" in lines
    assert rows[("ratio", "compiled_speedup_min")] == pytest.approx(2.0)
    assert any("no recompile during the 2 timed round(s)" in line for line in lines)
    assert any("RECOMPILED" in line for line in encoder.report(fake, 1e12, "fp32", warmup=0))


def test_strategies_counts_and_times(monkeypatch):
    monkeypatch.setattr(strategies_bench, "mm_peak_flops", lambda dtype, device: 1e12)
    run = strategies_bench.StrategiesRun(
        strategies=["qwen2_vl", "llava15"], model="tiny", depth=1, sizes=[(56, 56), (112, 84)], iters=1
    )
    rows = strategies_bench.run_strategies(run, echo=lambda line: None)
    got = {
        (r.metric, results.parse_shape(r.shape)["strategy"], results.parse_shape(r.shape)["size"]): r
        for r in rows
        if r.metric != "mm_peak"
    }
    assert got[("views", "llava15", "56x56")].value == 1
    assert got[("lm_tokens", "llava15", "112x84")].value == 576
    assert got[("time_vs_qwen2_vl", "qwen2_vl", "56x56")].value == pytest.approx(1.0)
    # llava15 makes the same 336x336 view for every size: one geometry, one timing
    assert got[("latency", "llava15", "56x56")].value == got[("latency", "llava15", "112x84")].value
    counted = strategies_bench.run_strategies(
        strategies_bench.StrategiesRun(strategies=["llava15"], sizes=[(56, 56)], time=False),
        echo=lambda line: None,
    )
    assert {r.metric for r in counted} == {"views", "lm_tokens", "encoder_patches", "encoder_gflop"}


# ----------------------------------------------------------------------------- summary


def test_summary_of_a_results_folder(tmp_path):
    where = results.shape(model="qwen2_vl", set="seed", depth=32, tokens=100)
    results.write_csv(
        tmp_path / "gpu-encoder.csv",
        [
            results.Row("encoder", "packed:triton", "bf16", where, "latency", 0.01, "s"),
            results.Row("encoder", "compiled:triton", "bf16", where, "latency", 0.008, "s"),
            results.Row("encoder", "compiled:triton", "bf16", where, "recompiles", 0, "graphs"),
            results.Row("encoder", "ratio", "bf16", where, "compiled_speedup", 1.25, "x"),
        ],
    )
    k = results.shape(heads=16, head_dim=80, set="seed", tokens=10, segments=2, longest=6)
    results.write_csv(
        tmp_path / "gpu-kernels.csv",
        [
            results.Row("attention", "triton", "bf16", k, "fwd_latency", 0.001, "s"),
            results.Row("attention", "triton", "bf16", k, "fwd_tflops", 300.0, "TFLOP/s"),
            results.Row("attention", "triton", "bf16", k, "fwd_max_err", 0.002),
            results.Row(
                "attention", "xformers_blockdiag", "bf16", "heads=16;head_dim=80", "skipped", "not installed"
            ),
        ],
    )
    (tmp_path / "steps.tsv").write_text("build\tok\t42\n")
    text = summary(tmp_path)
    assert "| build | ok | 42 |" in text
    assert "| compiled:triton | 8.00 ms |" in text and "compiled_speedup 1.25x" in text
    assert "| triton | 300 / - (2e-03) |" in text
    assert "- `xformers_blockdiag`: not installed" in text
