"""nativevit packed against timm's NaFlexViT padded path: same weights, same mixed-resolution images.

One timm ``NaFlexVit`` (random weights) runs two ways on the same images:

* ``timm-padded``: timm's own NaFlex path: each image patchified by ``timm.data``'s ``Patchify``,
  collated by ``NaFlexCollator`` into an ``(images, longest, P*P*C)`` batch padded to the longest
  image, then ``model.forward_features(patches, patch_coord, patch_valid)`` (SDPA with its mask).
* ``nativevit-packed``: ``nv.from_timm(model)``, all images in one varlen batch, block-diagonal
  attention through ``nativevit.ops`` (backend ``auto``).

Images are the built-in sets, each brought to at most ``max_seq_len`` patches the way NaFlex does it
(aspect kept) but never upsampled. Timed: the model forward only (patchify and collate are data-loader
work in both), the two modes in interleaved rounds. Peak memory of one call is measured per mode in a
fresh process (see :func:`peak_memory`). Work: :func:`~nativevit.bench.flops.vit_flops`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..timm_vit import from_timm
from .env import DTYPES, hardware_name
from .flops import vit_flops
from .images import IMAGE_SETS
from .measure import Case, PeakMemory, measure, mm_peak_flops
from .results import Row, roofline_row, shape

MODES = ("nativevit-packed", "timm-padded")
DEFAULT_MODEL = "naflexvit_base_patch16_gap"


@dataclass
class TimmRun:
    """Settings of one run. ``memory``: measure peak memory (two extra processes per set and dtype)."""

    model: str = DEFAULT_MODEL
    depth: int = 2
    sets: Sequence[str] = ("seed", "skewed")
    dtypes: Sequence[str] = ("fp32", "bf16")
    max_seq_len: int = 1024
    warmup: int = 0
    iters: int = 3
    memory: bool = True


def view_sizes(sizes: Sequence[tuple[int, int]], patch: int, max_seq_len: int) -> list[tuple[int, int]]:
    """``(H, W)`` of each ``(width, height)`` image after NaFlex's sequence-length fit, never upsampled."""
    from timm.data.naflex_transforms import get_image_size_for_seq

    return [get_image_size_for_seq((h, w), patch, max_seq_len, max_ratio=1.0)[1] for w, h in sizes]


def build(model_name: str, depth: int):
    """The timm NaFlexVit (random weights, fixed seed) and the packed encoder sharing them, warmed up."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, depth=depth).eval()
    with torch.no_grad():
        for p in model.parameters():  # timm zeroes biases: random weights exercise every term
            p.normal_(0, 0.02)
    enc = from_timm(model)
    patch = model.embeds.patch_size[0]
    with torch.inference_mode():  # start thread pools etc. before anything is measured
        tiny = torch.randn(3, 4 * patch, 4 * patch)
        enc.forward_images([tiny])
        model.forward_features(tiny[None])
    return model, enc


def _timm_padded_inputs(model, images: list[torch.Tensor], dtype: torch.dtype):
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    ph, pw = model.embeds.patch_size
    patchify = Patchify(model.embeds.patch_size, channels_last=model.embeds.channels_last)
    longest = max((img.shape[1] // ph) * (img.shape[2] // pw) for img in images)
    batch, _ = NaFlexCollator(max_seq_len=longest)([(patchify(img), 0) for img in images])
    return batch["patches"].to(dtype), batch["patch_coord"], batch["patch_valid"]


def set_views(model, set_name: str, max_seq_len: int) -> list[tuple[int, int]]:
    """``(H, W)`` of the images of a built-in set as NaFlex sizes them for ``model``."""
    return view_sizes(IMAGE_SETS[set_name], model.embeds.patch_size[0], max_seq_len)


def case(model, enc, sizes: Sequence[tuple[int, int]], dtype: torch.dtype) -> dict:
    """Random ``(3, H, W)`` images of ``sizes`` at ``dtype``: ``images``, ``tokens`` (patches), ``lengths``
    (tokens per image, prefix included), ``fns`` (the two modes as zero-argument callables) and ``flops``
    (:func:`~nativevit.bench.flops.vit_flops` per mode)."""
    model.to(dtype)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    rows, grids = enc.patchify([img.to(dtype) for img in images])
    padded_rows, coord, valid = _timm_padded_inputs(model, images, dtype)

    def packed():
        with torch.inference_mode():
            return enc(rows, grids)[0]

    def padded():
        with torch.inference_mode():
            return model.forward_features(padded_rows, patch_coord=coord, patch_valid=valid)["patches"]

    patches = [h * w for h, w in grids]  # per image
    lengths = [model.num_prefix_tokens + n for n in patches]
    proj = model.embeds.proj
    dims = dict(
        prefix_tokens=model.num_prefix_tokens,
        depth=len(model.blocks),
        dim=model.embed_dim,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        patch_dim=proj.in_features if model.embeds.is_linear else proj.weight[0].numel(),
    )
    return {
        "images": len(images),
        "tokens": sum(patches),
        "lengths": lengths,
        "fns": {"nativevit-packed": packed, "timm-padded": padded},
        "flops": {mode: vit_flops(patches, **dims, padded=mode == "timm-padded") for mode in MODES},
    }


def peak_memory(run: TimmRun, set_name: str, dtype: str, mode: str) -> int:
    """Peak memory (bytes) of one call of ``mode``, measured in a fresh process: the growth of its
    peak resident set over a warmed-up baseline. glibc is told to mmap every block over 64 KiB, so
    freed memory goes back to the OS and the high-water mark is the call's own peak."""
    code = (
        "import sys; from nativevit.bench.vs_timm import memory_child; sys.exit(memory_child(sys.argv[1:]))"
    )
    args = [mode, set_name, dtype, run.model, str(run.depth), str(run.max_seq_len)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory probe of {mode} on {set_name} ({dtype}) failed: {tail}")
    return int(out.stdout.split()[-1])


def memory_child(argv: Sequence[str]) -> int:
    """Entry of the memory probe process: ``mode set dtype model depth max_seq_len``; prints the bytes."""
    mode, set_name, dtype, model_name, depth, max_seq_len = argv
    model, enc = build(model_name, int(depth))
    fn = case(model, enc, set_views(model, set_name, int(max_seq_len)), DTYPES[dtype])["fns"][mode]
    with PeakMemory("cpu") as mem:
        fn()
    print(mem.peak)
    return 0


def run_vs_timm(run: TimmRun, *, echo: Callable[[str], None] = print) -> list[Row]:
    """Both modes on every set and dtype of ``run``; prints the tables, returns the CSV rows."""
    import timm

    model, enc = build(run.model, run.depth)
    echo(
        f"model {run.model} depth {run.depth}, hardware {hardware_name()}, torch {torch.__version__}, "
        f"timm {timm.__version__}"
    )
    rows, peaks = [], {}
    for dtype in run.dtypes:
        peaks[dtype] = mm_peak_flops(DTYPES[dtype])
        rows.append(roofline_row("vs_timm_naflex", dtype, peaks[dtype]))
    for set_name in run.sets:
        for dtype in run.dtypes:
            c = case(model, enc, set_views(model, set_name, run.max_seq_len), DTYPES[dtype])
            tokens, lengths, work = c["tokens"], c["lengths"], c["flops"]
            attn = model.blocks[0].attn
            probe = torch.empty(
                1, attn.num_heads, attn.head_dim, dtype=DTYPES[dtype]
            )  # a q like the encoder's
            backend = ops.resolve_backend("attention", "auto", probe).name
            outputs = {mode: fn() for mode, fn in c["fns"].items()}  # untimed first call, compared below
            timings = measure(
                [Case(m, fn) for m, fn in c["fns"].items()],
                warmup=run.warmup,
                iters=run.iters,
                memory=False,
                desc=f"{set_name} {dtype}",
            )
            memory = {mode: peak_memory(run, set_name, dtype, mode) if run.memory else 0 for mode in MODES}
            # same computation: the valid rows of timm's padded output == the packed output
            valid = torch.cat([outputs["timm-padded"][i, :n] for i, n in enumerate(lengths)]).float()
            parity = ((outputs["nativevit-packed"].float() - valid).norm() / valid.norm()).item()

            longest, peak = max(lengths), peaks[dtype]
            where = shape(set=set_name, images=c["images"], tokens=tokens, longest=longest, depth=run.depth)
            echo(
                f"[{set_name} {dtype}] {c['images']} images, {tokens} patch tokens, longest {longest} "
                f"(padding {100 * (1 - sum(lengths) / (len(lengths) * longest)):.0f}% of padded rows); "
                f"mm roofline {peak / 1e9:.0f} GFLOP/s; packed vs padded output rel err {parity:.1e}"
            )
            for mode in MODES:
                seconds = timings[mode].seconds
                rate = work[mode]["total"] / seconds
                name = f"{mode}:{backend}" if mode == "nativevit-packed" else f"{mode}:sdpa-mask"
                mem = f"  peak mem {memory[mode] / 2**20:8.1f} MiB" if run.memory else ""
                echo(
                    f"  {name:<24} {seconds:8.3f} s {tokens / seconds:9.0f} tok/s {rate / 1e9:7.1f} GFLOP/s "
                    f"({100 * rate / peak:3.0f}% of mm){mem}"
                )
                rows += [
                    Row("vs_timm_naflex", name, dtype, where, "latency", seconds, "s"),
                    Row("vs_timm_naflex", name, dtype, where, "tokens_per_s", tokens / seconds, "tok/s"),
                    Row("vs_timm_naflex", name, dtype, where, "gflop", work[mode]["total"] / 1e9, "GFLOP"),
                    Row("vs_timm_naflex", name, dtype, where, "mm_fraction", rate / peak),
                ]
                if run.memory:
                    rows.append(Row("vs_timm_naflex", name, dtype, where, "peak_memory", memory[mode], "B"))
            ratio = work["timm-padded"]["total"] / work["nativevit-packed"]["total"]
            speedup = timings["timm-padded"].seconds / timings["nativevit-packed"].seconds
            line = f"  speedup packed vs timm padded {speedup:.2f}x (work ratio {ratio:.2f}x)"
            rows += [
                Row("vs_timm_naflex", "ratio", dtype, where, "speedup", speedup, "x"),
                Row("vs_timm_naflex", "ratio", dtype, where, "work_ratio", ratio, "x"),
                Row("vs_timm_naflex", "ratio", dtype, where, "parity_rel_err", parity),
            ]
            if run.memory:
                mem_ratio = memory["timm-padded"] / max(memory["nativevit-packed"], 1)
                line += f"; peak memory padded/packed {mem_ratio:.2f}x"
                rows.append(Row("vs_timm_naflex", "ratio", dtype, where, "peak_memory_ratio", mem_ratio, "x"))
            echo(line)
    return rows


__all__ = [
    "DEFAULT_MODEL",
    "MODES",
    "TimmRun",
    "build",
    "case",
    "memory_child",
    "peak_memory",
    "run_vs_timm",
    "set_views",
    "view_sizes",
]
