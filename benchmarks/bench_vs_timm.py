"""nativevit packed vs timm NaFlexViT padded: same weights, same mixed-resolution images.

    python benchmarks/bench_vs_timm.py                      # ViT-B/16 NaFlex, 2 blocks, fp32 + bf16
    python benchmarks/bench_vs_timm.py --depth 12 --iters 3

One timm ``NaFlexVit`` (random weights) is run two ways on the same images, on CPU:

* ``timm-padded``: timm's own NaFlex path -- each image patchified by ``timm.data`` ``Patchify``,
  collated by ``NaFlexCollator`` into a ``(images, longest, P*P*C)`` batch padded to the longest
  image, ``model.forward_features(patches, patch_coord, patch_valid)`` (SDPA with its mask).
* ``nativevit-packed``: ``nv.from_timm(model)``, all images in one varlen batch, block-diagonal
  attention through ``nativevit.ops`` (backend ``auto``).

Images are the project's mixed-resolution sets, each brought to at most ``--max-seq-len`` patches
the way NaFlex does it (``get_image_size_for_seq``, aspect kept) but never upsampled (native
resolution below the budget). Timed: the model forward only (patchify/collate are data-loader
work in both), runs of the two modes interleaved in one process. Reported: tokens/s (real patch
tokens), peak memory of one call (each mode in a fresh process, see ``peak_memory``), the work
ratio padded/packed from the FLOP model below, and the matmul roofline fraction at the same dtype.
Results go to ``benchmarks/results/<hardware>-vs_timm.csv``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch

import nativevit as nv
from nativevit import benchutil

# (width, height): the "seed" and "skewed" sets of ``nativevit bench``.
IMAGE_SETS = {
    "seed": [(128, 16), (336, 336), (1000, 600), (1920, 1080), (1500, 4500), (4000, 3000)],
    "skewed": [(3000, 2000)] + [(160, 120)] * 15,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def view_sizes(sizes: list[tuple[int, int]], patch: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(H, W) of each image after NaFlex's sequence-length fit, with upsampling disabled."""
    from timm.data.naflex_transforms import get_image_size_for_seq

    return [get_image_size_for_seq((h, w), patch, max_seq_len, max_ratio=1.0)[1] for w, h in sizes]


def vit_flops(model, lengths: list[int], patch_tokens: int, *, padded: bool) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of the transformer on segments of ``lengths`` (prefix
    tokens included). Padded: every segment runs at the longest length. Patch embedding counts
    real patches only (timm's padded rows are zeros but still multiplied: counted too if padded)."""
    d = model.embed_dim
    blk = model.blocks[0]
    hidden = blk.mlp.fc1.out_features
    patch_dim = (
        model.embeds.proj.in_features if model.embeds.is_linear else model.embeds.proj.weight[0].numel()
    )
    rows_lengths = [max(lengths)] * len(lengths) if padded else lengths
    rows = sum(rows_lengths)
    depth = len(model.blocks)
    linear = depth * rows * 2 * (4 * d * d + 2 * d * hidden)
    embed = 2 * (rows if padded else patch_tokens) * patch_dim * d
    attention = depth * sum(4 * n * n * d for n in rows_lengths)
    return {"linear": linear + embed, "attention": attention, "total": linear + embed + attention}


def timm_padded_inputs(model, images: list[torch.Tensor], dtype: torch.dtype):
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    patchify = Patchify(model.embeds.patch_size, channels_last=model.embeds.channels_last)
    longest = max((img.shape[1] // model.embeds.patch_size[0]) * (img.shape[2] // model.embeds.patch_size[1])
                  for img in images)  # fmt: skip
    batch, _ = NaFlexCollator(max_seq_len=longest)([(patchify(img), 0) for img in images])
    return batch["patches"].to(dtype), batch["patch_coord"], batch["patch_valid"]


def measure(fns: dict, *, warmup: int, iters: int) -> dict[str, tuple[float, object]]:
    """Median seconds and output of each fn. Runs are interleaved (a, b, a, b, ...) so that load
    from other processes on a shared machine hits both modes alike."""
    out, samples = {}, {name: [] for name in fns}
    with torch.inference_mode():
        for name, fn in fns.items():
            out[name] = fn()  # warm-up, and the output compared across modes
            for _ in range(warmup):
                fn()
        for _ in range(iters):
            for name, fn in fns.items():
                samples[name].append(benchutil.time_fn(fn, warmup=0, iters=1))
    return {name: (statistics.median(samples[name]), out[name]) for name in fns}


def build(args: argparse.Namespace):
    """The timm NaFlexVit (random weights, fixed seed) and the packed encoder sharing them, warmed up."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, depth=args.depth).eval()
    with torch.no_grad():
        for p in model.parameters():  # timm zeroes biases: random weights exercise every term
            p.normal_(0, 0.02)
    enc = nv.from_timm(model)
    patch = model.embeds.patch_size[0]
    with torch.inference_mode():  # start thread pools etc. before anything is measured
        tiny = torch.randn(3, 4 * patch, 4 * patch)
        enc.forward_images([tiny])
        model.forward_features(tiny[None])
    return model, enc


def case(model, enc, set_name: str, dtype: torch.dtype, max_seq_len: int) -> dict:
    """Inputs of one image set at one dtype, and the two modes as zero-argument callables."""
    model.to(dtype)
    patch = model.embeds.patch_size[0]
    sizes = view_sizes(IMAGE_SETS[set_name], patch, max_seq_len)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    rows, grids = enc.patchify([img.to(dtype) for img in images])
    patches, coord, valid = timm_padded_inputs(model, images, dtype)

    def packed():
        return enc(rows, grids)[0]

    def padded():
        return model.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]

    tokens = sum(h * w for h, w in grids)
    lengths = [model.num_prefix_tokens + h * w for h, w in grids]
    return {"images": len(images), "tokens": tokens, "lengths": lengths,
            "fns": {"nativevit-packed": packed, "timm-padded": padded}}  # fmt: skip


def peak_memory(args: argparse.Namespace, set_name: str, dtype_name: str, mode: str) -> int:
    """Peak memory (bytes) of one call of ``mode``, measured in a fresh process: the growth of its
    peak RSS over a warmed-up baseline. glibc is told to mmap every block over 64 KiB, so freed
    memory goes back to the OS and the high-water mark is the call's own peak."""
    cmd = [sys.executable, __file__, "--memory-of", mode, "--sets", set_name, "--dtypes", dtype_name]
    cmd += ["--model", args.model, "--depth", str(args.depth), "--max-seq-len", str(args.max_seq_len)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


def memory_child(args: argparse.Namespace) -> int:
    model, enc = build(args)
    fn = case(model, enc, args.sets[0], DTYPES[args.dtypes[0]], args.max_seq_len)["fns"][args.memory_of]
    with torch.inference_mode(), benchutil.peak_memory_tracker("cpu") as mem:
        fn()
    print(mem.peak)
    return 0


def run(args: argparse.Namespace) -> list[str]:
    import timm

    model, enc = build(args)
    csv, lines = [], []
    for set_name in args.sets:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            c = case(model, enc, set_name, dtype, args.max_seq_len)
            tokens, lengths = c["tokens"], c["lengths"]
            work = {
                mode: vit_flops(model, lengths, tokens, padded=(mode == "timm-padded"))
                for mode in ("nativevit-packed", "timm-padded")
            }
            attn = model.blocks[0].attn
            probe = torch.empty(1, attn.num_heads, attn.head_dim, dtype=dtype)  # a q like the encoder's
            backend = nv.ops.resolve_backend("attention", "auto", probe).name
            peak = benchutil.mm_peak_flops(dtype)
            results = measure(c["fns"], warmup=args.warmup, iters=args.iters)
            memory = {mode: peak_memory(args, set_name, dtype_name, mode) for mode in c["fns"]}
            # same computation: the valid rows of timm's padded output == the packed output
            packed_out, padded_out = results["nativevit-packed"][1], results["timm-padded"][1]
            valid_rows = torch.cat([padded_out[i, :n] for i, n in enumerate(lengths)])
            parity = ((packed_out.float() - valid_rows.float()).norm() / valid_rows.float().norm()).item()

            longest = max(lengths)
            shape = (
                f"set={set_name};images={c['images']};tokens={tokens};longest={longest};depth={args.depth}"
            )
            lines.append(
                f"[{set_name} {dtype_name}] {c['images']} images, {tokens} patch tokens, longest {longest} "
                f"(padding {100 * (1 - sum(lengths) / (len(lengths) * longest)):.0f}% of padded rows); "
                f"mm roofline {peak / 1e9:.0f} GFLOP/s; packed vs padded output rel err {parity:.1e}"
            )
            for mode, (seconds, _) in results.items():
                rate = work[mode]["total"] / seconds
                name = f"{mode}:{backend}" if mode == "nativevit-packed" else f"{mode}:sdpa-mask"
                lines.append(
                    f"  {name:<24} {seconds:8.3f} s {tokens / seconds:9.0f} tok/s {rate / 1e9:7.1f} GFLOP/s "
                    f"({100 * rate / peak:3.0f}% of mm)  peak mem {memory[mode] / 2**20:8.1f} MiB"
                )
                common = {"benchmark": "vs_timm_naflex", "backend": name, "dtype": dtype_name, "shape": shape}
                csv += [
                    {**common, "metric": "latency", "value": f"{seconds:.6f}", "unit": "s"},
                    {**common, "metric": "tokens_per_s", "value": f"{tokens / seconds:.1f}", "unit": "tok/s"},
                    {**common, "metric": "roofline_fraction", "value": f"{rate / peak:.4f}", "unit": ""},
                    {**common, "metric": "peak_memory", "value": str(memory[mode]), "unit": "B"},
                ]
            ratio = work["timm-padded"]["total"] / work["nativevit-packed"]["total"]
            speedup = results["timm-padded"][0] / results["nativevit-packed"][0]
            mem_ratio = memory["timm-padded"] / max(memory["nativevit-packed"], 1)
            lines.append(
                f"  speedup packed vs timm padded {speedup:.2f}x (work ratio {ratio:.2f}x); "
                f"peak memory padded/packed {mem_ratio:.2f}x"
            )
            common = {"benchmark": "vs_timm_naflex", "backend": "ratio", "dtype": dtype_name, "shape": shape}
            csv += [
                {**common, "metric": "speedup_vs_timm_padded", "value": f"{speedup:.3f}", "unit": "x"},
                {**common, "metric": "work_ratio", "value": f"{ratio:.3f}", "unit": "x"},
                {**common, "metric": "peak_memory_ratio", "value": f"{mem_ratio:.3f}", "unit": "x"},
                {**common, "metric": "parity_rel_err", "value": f"{parity:.2e}", "unit": ""},
            ]
    path = benchutil.append_csv(benchutil.results_path("vs_timm"), csv)
    lines.append(f"model {args.model} depth {args.depth}, hardware {benchutil.hardware_name()}, "
                 f"torch {torch.__version__}, timm {timm.__version__}; CSV: {path}")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="naflexvit_base_patch16_gap", help="a timm NaFlexVit model name")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks (ratios barely depend on it)")
    p.add_argument("--sets", nargs="+", default=list(IMAGE_SETS), choices=list(IMAGE_SETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--max-seq-len", type=int, default=1024, help="NaFlex patch budget per image")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs after the first (warm-up) run")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--memory-of", choices=("nativevit-packed", "timm-padded"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:
        return memory_child(args)
    for line in run(args):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
