"""Image-feature time of a transformers VLM before and after ``nv.swap_vision_tower``.

Each family's model is built with a full-width tower of ``--depth`` blocks (random weights, a one-layer
toy language model, which image features never touch); a deep copy is swapped, so both hold the same
weights. Timed: ``model.model.get_image_features`` (tower, projector, the model's own packing of tiles)
on a built-in image set, prepared as that model's processor would (Qwen2-VL: ``nv.ImageProcessor``,
bit-equal to transformers'; LLaVA-NeXT / OneVision / InternVL: the strategy's views for the tower,
``nativevit.integrations.tower_views``, bit-equal to their processors), the two in interleaved rounds.

Towers (widths of the releases): qwen2_vl (1280 wide, 16 heads of 80, 14-px patches), llava_next
(CLIP ViT-L/14-336), llava_onevision (SigLIP so400m/14-384), internvl (InternViT-300M, 448 px).
The feature layer is set to the last one, so both sides run every block (a release's LLaVA uses -2,
where the swapped tower also skips the last of its 24 blocks).

    python benchmarks/bench_swap.py                               # every family, seed set, 2 blocks
    python benchmarks/bench_swap.py --models qwen2_vl --sets seed video --dtypes bf16
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from nativevit.bench import DTYPES, Case, Row, image_set, measure, shape
from nativevit.bench.args import (
    ArgumentParser,
    add_out_argument,
    check_out_dir,
    nonneg_int,
    positive_int,
    run_guarded,
    write_results,
)
from nativevit.bench.images import IMAGE_SETS
from nativevit.integrations import swap_vision_tower, tower_views

MODELS = ("qwen2_vl", "llava_next", "llava_onevision", "internvl")
STRATEGY = {"llava_next": "llava_next", "llava_onevision": "llava_onevision", "internvl": "internvl"}
TOWER_KIND = {"llava_next": "clip", "llava_onevision": "siglip", "internvl": "internvl"}
QWEN_MAX_PIXELS = 28 * 28 * 1280  # transformers' class default


def build(name: str, depth: int):
    """The transformers model (eval, sdpa) with a full-width tower of ``depth`` blocks."""
    import transformers as T

    text = dict(
        vocab_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
    )
    if name == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
        cfg = T.Qwen2VLConfig(
            text_config=dict(text, hidden_size=1536, head_dim=128, rope_parameters=rope),
            vision_config=dict(depth=depth, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
        )
        cls = T.Qwen2VLForConditionalGeneration
    elif name == "llava_next":
        clip = T.CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=depth,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        cfg = T.LlavaNextConfig(
            vision_config=clip,
            text_config=T.LlamaConfig(**text, hidden_size=64),
            image_grid_pinpoints=pins,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        cls = T.LlavaNextForConditionalGeneration
    elif name == "llava_onevision":
        siglip = T.SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=depth,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
        )
        cfg = T.LlavaOnevisionConfig(
            vision_config=siglip,
            text_config=T.Qwen2Config(**text, hidden_size=64),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        cls = T.LlavaOnevisionForConditionalGeneration
    else:
        intern = T.InternVLVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=depth,
            num_attention_heads=16,
            image_size=[448, 448],
            patch_size=[14, 14],
            use_mean_pooling=True,
            layer_scale_init_value=0.1,
        )
        cfg = T.InternVLConfig(
            vision_config=intern,
            text_config=T.Qwen2Config(**text, hidden_size=64),
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        cls = T.InternVLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


def feature_inputs(name: str, set_name: str, dtype: torch.dtype, model) -> tuple[dict, int, int]:
    """``(get_image_features / get_video_features keyword arguments, views, patch tokens)``."""
    import nativevit as nv

    images = image_set(set_name)
    if name == "qwen2_vl":
        batch = nv.ImageProcessor.for_model("qwen2_vl", max_pixels=QWEN_MAX_PIXELS)(images)
        px, grid = batch.pixel_values.to(dtype), batch.grid_thw
        if set_name == "video":
            inputs = {"pixel_values_videos": px, "video_grid_thw": grid}
        else:
            inputs = {"pixel_values": px, "image_grid_thw": grid}
        return inputs, (int(grid[:, 0].sum()), px.shape[0])
    if set_name == "video":
        raise ValueError(f"{name}: the video set is run for qwen2_vl only")
    views = tower_views(images, STRATEGY[name], tower=TOWER_KIND[name])
    tokens = sum((v.shape[-2] // 14) * (v.shape[-1] // 14) for v in views.images)
    per_image = [torch.stack(v) for v in views.split(views.images)]
    if name == "internvl":
        return {"pixel_values": torch.cat(per_image).to(dtype)}, (len(views.images), tokens)
    longest = max(len(v) for v in per_image)
    padded = torch.zeros(len(per_image), longest, *per_image[0].shape[1:])
    for i, v in enumerate(per_image):
        padded[i, : len(v)] = v
    sizes = torch.tensor([[im.shape[0], im.shape[1]] for im in images])  # (height, width)
    check_tile_counts(name, model, sizes, [len(v) for v in per_image])
    return {"pixel_values": padded.to(dtype), "image_sizes": sizes}, (len(views.images), tokens)


def check_tile_counts(name: str, model, sizes: torch.Tensor, counts: list[int]) -> None:
    """The views must be the tiles the model expects for each image size (it slices them by count)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    expected = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes
    ]
    if expected != counts:
        raise ValueError(f"{name}: strategy views {counts} != the model's tile counts {expected}")


def run(args) -> list[Row]:
    rows = []
    for name in args.models:
        base = build(name, args.depth)
        for dtype_key in args.dtypes:
            dtype = DTYPES[dtype_key]
            original = copy.deepcopy(base).to(dtype)
            swapped = swap_vision_tower(copy.deepcopy(original), attn_backend=args.backend)
            for set_name in args.sets:
                if set_name == "video" and name != "qwen2_vl":
                    continue
                inputs, (views, tokens) = feature_inputs(name, set_name, dtype, original)
                video = "pixel_values_videos" in inputs

                def step(model, inputs=inputs, video=video):
                    with torch.inference_mode():
                        f = model.model.get_video_features if video else model.model.get_image_features
                        return f(**inputs)

                cases = [
                    Case("transformers", lambda m=original: step(m)),
                    Case("nativevit", lambda m=swapped: step(m)),
                ]
                t = measure(
                    cases, warmup=args.warmup, iters=args.iters, memory=False, desc=f"{name} {set_name}"
                )
                where = shape(model=name, set=set_name, depth=args.depth, views=views, tokens=tokens)
                hf, nv_ = t["transformers"].seconds, t["nativevit"].seconds
                rows += [
                    Row("swap", "transformers:sdpa", dtype_key, where, "latency", hf, "s"),
                    Row("swap", f"nativevit:{args.backend}", dtype_key, where, "latency", nv_, "s"),
                    Row("swap", "ratio", dtype_key, where, "speedup_vs_transformers", hf / nv_, "x"),
                ]
                print(
                    f"{name:16s} {dtype_key:5s} {set_name:9s} {views:3d} views {tokens:6d} tokens  "
                    f"transformers {hf:7.3f} s  nativevit {nv_:7.3f} s  speedup {hf / nv_:5.2f}x",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--depth", type=positive_int, default=2, help="tower blocks (ratios barely depend on it)")
    p.add_argument("--sets", nargs="+", choices=sorted(IMAGE_SETS), default=["seed"])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--backend", default="auto", help="attention backend of the swapped tower")
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--iters", type=positive_int, default=3, help="interleaved timed rounds; medians reported")
    add_out_argument(p)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)

    def work() -> None:
        write_results(args.out, "swap", run(args))

    return run_guarded("bench_swap", work)


if __name__ == "__main__":
    sys.exit(main())
