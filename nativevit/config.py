"""Vision tower configuration, presets, and the family table.

``FAMILIES`` describes each tower family once: its layers (norm, MLP, merger, patch bias, learned
position table, DeepStack, window attention), how its releases name and default the ``vision_config``
fields, how they key the tower's tensors, and its image processor preset. ``VisionConfig`` holds one
tower's hyper-parameters; ``model_type`` names its family. Adding a family is one ``Family`` entry
(plus a layer class in ``model.py`` if it needs a new kind of layer) and its tests.

Field names follow the releases with one deliberate exception: the ViT width is ``embed_dim`` and
the merger output width (the language model's width) is ``out_hidden_size`` here, in every family.
The releases call the ViT width ``embed_dim`` (Qwen2-VL) or ``hidden_size`` (Qwen2.5-VL, Qwen3-VL),
and the merger width ``hidden_size`` (Qwen2-VL) or ``out_hidden_size`` (2.5, 3); ``from_hf_dict``
and ``to_hf_dict`` translate, reading the family table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Fields of a released ``vision_config`` that carry no information for the tower.
_IGNORED_HF_FIELDS = {
    "model_type",
    "in_chans",
    "spatial_patch_size",
    "initializer_range",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "architectures",
    "transformers_version",
    "_attn_implementation_autoset",
    "tokens_per_second",
}

_HF_ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}


# The image processor of the Qwen2-VL and Qwen2.5-VL releases: 14-px patches (factor 28), 56*56 to
# 16384*28*28 pixels, OpenAI CLIP mean/std.
QWEN2_VL_PROCESSOR: dict[str, Any] = dict(
    min_pixels=56 * 56,
    max_pixels=16384 * 28 * 28,
    patch_size=14,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
)


# The image processor of GLM-4.1V / GLM-4.5V (transformers' Glm4vImageProcessor defaults): 14-px patches
# (factor 28), GLM's smart_resize (it counts the pixels of both temporal patches: 12544..11760000 over
# T=2), OpenAI CLIP mean/std.
GLM4V_PROCESSOR: dict[str, Any] = dict(
    min_pixels=112 * 112,
    max_pixels=28 * 28 * 15000,
    patch_size=14,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    resize="glm",
)


# Where the Qwen releases key their tower: ``visual.`` (Qwen2-VL, Qwen2.5-VL in transformers < 4.52),
# ``model.visual.`` (later saves, Qwen3-VL).
_QWEN_PREFIXES = ("visual.", "model.visual.")
# Qwen3-VL's image processor (16 px patches, factor 32, mean = std = 0.5), which Qwen3.5 reuses
_QWEN3_PROCESSOR = dict(
    min_pixels=65536,
    max_pixels=16777216,
    patch_size=16,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    pixel_cap=16777216,
)


@dataclass(frozen=True)
class Family:
    """One tower family, described once.

    Layers: ``norm`` ("layernorm" | "rmsnorm"), ``mlp`` ("mlp": ``fc1``/``fc2``; "linear_mlp":
    ``linear_fc1``/``linear_fc2``; "swiglu": ``gate_proj``/``up_proj``/``down_proj``), ``merger``
    ("qwen2": norm then 2x2 shuffle, ``ln_q``/``mlp``; "qwen3": ``norm``/``linear_fc1``/``linear_fc2``),
    ``patch_bias``, and the optional parts ``position_table`` (a learned square table resampled to each
    image), ``deepstack`` (extra mergers after some blocks), ``windows`` (window attention).

    Releases: ``vit_width_field`` / ``merger_width_field`` / ``mlp_width_field`` are the release's
    names for the ViT width, the merger output width and the MLP width (``mlp_ratio`` or
    ``intermediate_size``); ``release_defaults`` are transformers' class defaults for fields a
    release leaves out (in this module's names); ``model_types`` the top-level ``model_type`` values
    whose checkpoints carry this tower; ``architecture`` and ``key_prefix`` what ``save_pretrained``
    writes (the tower's tensors are keyed ``visual.*`` or ``model.visual.*``).

    ``processor``: the ``ImageProcessor`` preset of the releases (keyword arguments).

    Layer details, defaulting to the Qwen towers': ``qkv`` ("fused": one ``attn.qkv``; "separate":
    ``attn.q_proj``/``k_proj``/``v_proj``), ``qkv_bias`` / ``proj_bias`` / ``mlp_bias`` (biases of the
    q/k/v, output and MLP projections), ``qk_norm`` (a per-head norm of q and k before the rotation,
    ``attn.q_norm``/``k_norm``), ``embed_norm`` (a norm after the patch embedding) and ``post_norm``
    (after the last block), both of kind ``norm``; ``rope`` the 2D rotary frequency layout
    (``nativevit.rope.ROPE_FREQUENCIES``, or "none"); ``rope_fp32`` whether the rotation runs in float32
    whatever the input dtype (Qwen) or in the input dtype; ``position`` how the learned position table is
    resampled to each image (``nativevit.positions.POSITION_KINDS``).

    Release naming: ``key_renames`` maps this model's parameter names to the release's, as pairs of
    dotted prefixes ``(ours, release)`` where ``{i}`` stands for a block index (first match wins, in
    both directions); ``read_prefixes`` are the further prefixes under which a release may key the
    tower besides ``key_prefix``; ``field_renames`` maps ``vision_config`` field names of the release
    to this module's (``{"num_channels": "in_channels"}``); ``ignored_fields`` are release fields that
    carry nothing for the tower; ``fixed`` are settings the family always has and its releases do not
    write (``{"temporal_patch_size": 1}``).

    ``tiny``: overrides of ``release_defaults`` giving a small tower of the family for tests and quick
    benchmarks (``VisionConfig.preset(name, tiny=True)``).

    ``patch_conv``: the patch embedding's kernel as released, a key of ``nativevit.model.PATCH_LAYERS``:
    "conv3d" (weight ``(D, C, T, P, P)``, the Qwen towers) or "conv2d" (``(D, C, P, P)``, still-image
    towers with ``temporal_patch_size`` 1, e.g. Pixtral); either runs as one matmul over the same rows.
    "linear" (``(D, C*P*P)``, SigLIP2) is a linear layer over rows in ``(P, P, C)`` order (the
    processor's ``row_layout="tppc"``).

    ``position_field``: the release's field that sizes the learned position table:
    "num_position_embeddings" (its entry count) or "image_size" (the pretraining image in px, SigLIP
    style: a table of ``(image_size // patch_size) ** 2`` entries; written back as ``side * patch_size``).
    ``ignored_keys``: dotted prefixes of release tower keys (without the tower prefix) that the release
    carries but the tower never uses (PaddleOCR-VL's SigLIP pooling head); the loader skips them.

    ``derived``: ``(field, fn)`` pairs, settings of ``VisionConfig`` that the family computes from the
    others instead of reading them from its releases (GLM-4V's block MLP is ``out_hidden_size`` wide:
    ``("intermediate_size", lambda c: c.out_hidden_size)``); ``VisionConfig`` fills a field left None
    with ``fn(config)``, and ``to_hf_dict`` refuses a config where it differs. A ``field_renames``
    target may also be a tuple of fields that one release field sets together (GLM-OCR's
    ``attention_bias`` is the bias of q/k/v, the output projection and the MLP).

    ``merger_prefixes``: where a release keys a merger that is a module of its own beside the tower
    (ERNIE-4.5-VL's resampler: ``model.resampler_model.``), the first one written; the merger's
    ``key_renames`` then start with ``merger.`` on both sides. Empty: the merger is keyed with the tower.
    ``text_fields``: ``text_config`` fields of the release that set tower fields (release -> ours), for
    a merger sized by the language model (ERNIE: ``{"hidden_size": "out_hidden_size", "rms_norm_eps":
    "merger_norm_eps"}``); ``save_pretrained`` writes them in a ``text_config``.

    ``rope_pairs``: how the release pairs q/k features for the rotation: "half" (``(i, i + d/2)``,
    rotate-half) or "interleaved" (``(2i, 2i+1)``, complex pairs: Kimi-K2.5's fused ``wqkv``); the model
    de-interleaves q and k (one permutation of their head features, exact: attention scores are
    invariant to a common permutation of q and k features) and rotates them rotate-half.
    ``clip_attention``: attention spans every frame of a clip (Kimi-K2.5) instead of one frame.
    ``VisionConfig.qkv`` / ``rope_pairs`` may override ``qkv`` / ``rope_pairs`` for transformers'
    in-memory layout of a tower whose release differs (Kimi-K2.5: separate q/k/v, already permuted).
    ``position_field`` "pos_emb": the table is sized by ``pos_emb_height`` and ``pos_emb_width`` (equal:
    transformers reads the height as the side of both axes) and written back so.

    ``pooling_head``: the optional part ``VisionConfig.pooling_head``, an attention-pooling head after
    the blocks (SigLIP2's multihead attention pooling, ``head.*``: ``NativeViT.pool``).
    """

    name: str
    norm: str
    mlp: str
    merger: str
    patch_bias: bool
    position_table: bool
    deepstack: bool
    windows: bool
    vit_width_field: str
    merger_width_field: str
    mlp_width_field: str
    release_defaults: dict[str, Any]
    model_types: tuple[str, ...]
    architecture: str
    key_prefix: str
    processor: dict[str, Any]
    qkv: str = "fused"
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False
    embed_norm: bool = False
    post_norm: bool = False
    rope: str = "qwen"
    rope_fp32: bool = True
    position: str = "bilinear_taps"
    key_renames: tuple[tuple[str, str], ...] = ()
    read_prefixes: tuple[str, ...] = ()
    field_renames: dict[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    ignored_fields: tuple[str, ...] = ()
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    tiny: dict[str, Any] = dataclasses.field(default_factory=dict)
    patch_conv: str = "conv3d"
    position_field: str = "num_position_embeddings"
    ignored_keys: tuple[str, ...] = ()
    derived: tuple[tuple[str, Any], ...] = ()
    merger_prefixes: tuple[str, ...] = ()
    text_fields: dict[str, str] = dataclasses.field(default_factory=dict)
    rope_pairs: str = "half"
    clip_attention: bool = False
    pooling_head: bool = False

    def __post_init__(self) -> None:
        if self.qkv not in ("fused", "separate"):
            raise ValueError(f"Family {self.name}: qkv must be 'fused' or 'separate', got {self.qkv!r}")
        compiled = []
        for ours, theirs in self.key_renames:
            compiled.append((_prefix_pattern(ours), theirs, _prefix_pattern(theirs), ours))
        object.__setattr__(self, "_renames", tuple(compiled))

    @property
    def mlp_type(self) -> str:
        """The MLP kind ``VisionConfig.mlp_type`` takes by default: "swiglu" or "mlp"."""
        return "swiglu" if self.mlp == "swiglu" else "mlp"

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Every prefix under which a release keys the tower (``key_prefix`` first)."""
        return (self.key_prefix, *(p for p in self.read_prefixes if p != self.key_prefix))

    def release_key(self, key: str) -> str:
        """The release's name (without prefix) for this model's parameter ``key``."""
        return _rename(key, ((ours, theirs) for ours, theirs, _, _ in self._renames))

    def model_key(self, key: str) -> str:
        """This model's parameter name for the release's tower key ``key`` (without prefix)."""
        return _rename(key, ((theirs, ours) for _, _, theirs, ours in self._renames))


def _prefix_pattern(prefix: str) -> re.Pattern:
    """A dotted prefix with ``{i}`` placeholders -> a regex matching it at the start of a key, followed
    by a dot or the end of the key; each ``{i}`` captures a block index."""
    body = "([0-9]+)".join(re.escape(part) for part in prefix.split("{i}"))
    return re.compile(body + r"(?=\.|$)")


def _rename(key: str, rules) -> str:
    for pattern, target in rules:
        m = pattern.match(key)
        if m is not None:
            parts = target.split("{i}")
            new = parts[0] + "".join(g + p for g, p in zip(m.groups(), parts[1:]))
            return new + key[m.end() :]
    return key


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2_vl",
            norm="layernorm",
            mlp="mlp",
            merger="qwen2",
            patch_bias=False,
            position_table=False,
            deepstack=False,
            windows=False,
            vit_width_field="embed_dim",
            merger_width_field="hidden_size",
            mlp_width_field="mlp_ratio",
            release_defaults={},
            model_types=("qwen2_vl",),
            tiny=dict(embed_dim=64, depth=2, num_heads=4, out_hidden_size=48),
            architecture="Qwen2VLForConditionalGeneration",
            key_prefix="visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=QWEN2_VL_PROCESSOR,
        ),
        Family(
            name="qwen2_5_vl",
            norm="rmsnorm",
            mlp="swiglu",
            merger="qwen2",
            patch_bias=False,
            position_table=False,
            deepstack=False,
            windows=True,
            vit_width_field="hidden_size",
            merger_width_field="out_hidden_size",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=3584,
                depth=32,
                num_heads=16,
                intermediate_size=3420,
                out_hidden_size=3584,
                hidden_act="silu",
                window_size=112,
                fullatt_block_indexes=(7, 15, 23, 31),
            ),
            model_types=("qwen2_5_vl",),
            tiny=dict(
                embed_dim=64,
                depth=4,
                num_heads=4,
                intermediate_size=96,
                out_hidden_size=48,
                fullatt_block_indexes=(1, 3),
            ),
            architecture="Qwen2_5_VLForConditionalGeneration",
            key_prefix="visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=QWEN2_VL_PROCESSOR,
        ),
        Family(
            name="qwen3_vl",
            norm="layernorm",
            mlp="linear_mlp",
            merger="qwen3",
            patch_bias=True,
            position_table=True,
            deepstack=True,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="out_hidden_size",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1152,
                depth=27,
                num_heads=16,
                intermediate_size=4304,
                out_hidden_size=3584,
                hidden_act="gelu_pytorch_tanh",
                patch_size=16,
                num_position_embeddings=2304,
                deepstack_visual_indexes=(8, 16, 24),
            ),
            model_types=("qwen3_vl", "qwen3_vl_moe"),
            tiny=dict(
                embed_dim=32,
                depth=3,
                num_heads=4,
                intermediate_size=48,
                out_hidden_size=40,
                num_position_embeddings=64,
                deepstack_visual_indexes=(0, 2),
            ),
            architecture="Qwen3VLForConditionalGeneration",
            key_prefix="model.visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=_QWEN3_PROCESSOR,
        ),
        # Pixtral (Mistral 3, and Pixtral-12B as a LLaVA): RMSNorm (eps 1e-5) after a bias-free Conv2d
        # patch embedding, no position table, 2D RoPE with the 1D frequencies alternating between rows
        # and columns, rotated in the input dtype; bias-free q/k/v/o and SwiGLU; no merger in the tower
        # (Mistral 3's patch merger is part of its projector), rows in raster order.
        Family(
            name="pixtral",
            norm="rmsnorm",
            mlp="swiglu",
            merger="none",
            patch_bias=False,
            position_table=False,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1024,
                out_hidden_size=1024,
                depth=24,
                num_heads=16,
                intermediate_size=4096,
                hidden_act="gelu",
                patch_size=16,
            ),
            model_types=("mistral3", "pixtral"),
            tiny=dict(
                embed_dim=64,
                out_hidden_size=64,
                depth=2,
                num_heads=4,
                intermediate_size=96,
                hidden_act="silu",
            ),
            architecture="Mistral3ForConditionalGeneration",
            key_prefix="vision_tower.",  # the Hub files and transformers' save_pretrained
            read_prefixes=("vision_tower.", "model.vision_tower."),
            processor=dict(
                patch_size=16,
                temporal_patch_size=1,
                merge_size=1,
                resize="longest_edge",
                resize_options={"longest_edge": 1024},
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            ),
            qkv="separate",
            qkv_bias=False,
            proj_bias=False,
            mlp_bias=False,
            embed_norm=True,
            rope="interleaved",
            rope_fp32=False,
            patch_conv="conv2d",
            key_renames=(
                ("patch_embed.proj", "patch_conv"),
                ("embed_norm", "ln_pre"),
                ("blocks.{i}.norm1", "transformer.layers.{i}.attention_norm"),
                ("blocks.{i}.norm2", "transformer.layers.{i}.ffn_norm"),
                ("blocks.{i}.attn.proj", "transformer.layers.{i}.attention.o_proj"),
                ("blocks.{i}.attn", "transformer.layers.{i}.attention"),
                ("blocks.{i}.mlp", "transformer.layers.{i}.feed_forward"),
            ),
            field_renames={
                "num_hidden_layers": "depth",
                "num_attention_heads": "num_heads",
                "num_channels": "in_channels",
                "rope_theta": "rope_theta",
            },
            # image_size only sized the old precomputed rotary table; head_dim is always width / heads
            ignored_fields=(
                "image_size",
                "head_dim",
                "attention_dropout",
                "is_composition",
                "tie_word_embeddings",
            ),
            fixed={"temporal_patch_size": 1, "spatial_merge_size": 1, "norm_eps": 1e-5},
        ),
        # PaddleOCR-VL: a SigLIP tower made native-resolution (NaViT): Conv2d patch embedding with a bias,
        # a learned 27x27 table resampled bilinearly (half-pixel centres) to each image, 2D RoPE (Qwen
        # layout, rotated in float32), separate q/k/v/out projections with biases, tanh-GELU MLP,
        # LayerNorm before and after the blocks' halves and after the last block. Rows in raster order;
        # the 2x2 merge lives in the VLM's projector (``mlp_AR`` / ``model.projector``), not the tower.
        Family(
            name="paddleocr_vl",
            norm="layernorm",
            mlp="mlp",
            merger="none",
            patch_bias=True,
            position_table=True,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1152,
                out_hidden_size=1152,
                depth=27,
                num_heads=16,
                intermediate_size=4304,
                hidden_act="gelu_pytorch_tanh",
                patch_size=14,
                num_position_embeddings=(384 // 14) ** 2,
            ),
            model_types=("paddleocr_vl",),
            tiny=dict(
                embed_dim=64,
                out_hidden_size=64,
                depth=2,
                num_heads=4,
                intermediate_size=96,
                num_position_embeddings=64,
            ),
            architecture="PaddleOCRVLForConditionalGeneration",
            key_prefix="visual.",
            read_prefixes=("model.visual.",),
            processor=dict(
                min_pixels=147384,
                max_pixels=2822400,
                patch_size=14,
                temporal_patch_size=1,
                merge_size=1,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                resize="paddleocr_vl",
                resize_options={"factor": 28},
            ),
            qkv="separate",
            post_norm=True,
            position="bilinear_half_pixel",
            patch_conv="conv2d",
            position_field="image_size",
            key_renames=(
                ("patch_embed.proj", "vision_model.embeddings.patch_embedding"),
                ("pos_embed", "vision_model.embeddings.position_embedding"),
                ("blocks.{i}.norm1", "vision_model.encoder.layers.{i}.layer_norm1"),
                ("blocks.{i}.norm2", "vision_model.encoder.layers.{i}.layer_norm2"),
                ("blocks.{i}.attn.proj", "vision_model.encoder.layers.{i}.self_attn.out_proj"),
                ("blocks.{i}.attn", "vision_model.encoder.layers.{i}.self_attn"),
                ("blocks.{i}.mlp", "vision_model.encoder.layers.{i}.mlp"),
                ("post_norm", "vision_model.post_layernorm"),
            ),
            field_renames={
                "num_hidden_layers": "depth",
                "num_attention_heads": "num_heads",
                "num_channels": "in_channels",
                "layer_norm_eps": "norm_eps",
            },
            # the projector's merge size, and a temporal patch size the Conv2d tower never uses
            ignored_fields=(
                "spatial_merge_size",
                "temporal_patch_size",
                "attention_dropout",
                "pad_token_id",
                "auto_map",
            ),
            ignored_keys=("vision_model.head", "vision_model.embeddings.packing_position_embedding"),
            fixed={"temporal_patch_size": 1, "spatial_merge_size": 1},
        ),
        # SigLIP2 NaFlex (Siglip2Model / Siglip2VisionModel, and LFM2-VL's tower): a linear patch embedding
        # over (P, P, C) patch rows in raster order, a learned square position table resized per image
        # (bilinear, antialiased, in float32), LayerNorm blocks with biased q/k/v/out and a tanh-GELU MLP,
        # a final LayerNorm; no rotary embedding, no merger; an optional attention-pooling head
        # (``vision_use_head``: ``head.*``, transformers' ``pooler_output``; ``NativeViT.pool``).
        Family(
            name="siglip2",
            norm="layernorm",
            mlp="mlp",
            merger="none",
            patch_bias=True,
            position_table=True,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=768,
                out_hidden_size=768,
                depth=12,
                num_heads=12,
                intermediate_size=3072,
                hidden_act="gelu_pytorch_tanh",
                patch_size=16,
                num_position_embeddings=256,
                pooling_head=True,
            ),
            model_types=("siglip2", "lfm2_vl"),
            tiny=dict(
                embed_dim=32,
                out_hidden_size=32,
                depth=2,
                num_heads=4,
                intermediate_size=48,
                num_position_embeddings=64,
            ),
            architecture="Siglip2Model",
            key_prefix="vision_model.",
            read_prefixes=(
                "model.vision_tower.vision_model.",
                "vision_tower.vision_model.",
                "model.vision_tower.",
                "vision_tower.",
            ),
            processor=dict(
                patch_size=16,
                temporal_patch_size=1,
                merge_size=1,
                resize="naflex",
                resize_options={"max_num_patches": 256},
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                resample="bilinear",
                row_layout="tppc",
            ),
            qkv="separate",
            post_norm=True,
            rope="none",
            position="resize_antialias",
            patch_conv="linear",
            key_renames=(
                ("patch_embed.proj", "embeddings.patch_embedding"),
                ("pos_embed", "embeddings.position_embedding"),
                ("blocks.{i}.norm1", "encoder.layers.{i}.layer_norm1"),
                ("blocks.{i}.norm2", "encoder.layers.{i}.layer_norm2"),
                ("blocks.{i}.attn.proj", "encoder.layers.{i}.self_attn.out_proj"),
                ("blocks.{i}.attn", "encoder.layers.{i}.self_attn"),
                ("blocks.{i}.mlp", "encoder.layers.{i}.mlp"),
                ("post_norm", "post_layernorm"),
            ),
            field_renames={
                "num_hidden_layers": "depth",
                "num_attention_heads": "num_heads",
                "num_channels": "in_channels",
                "layer_norm_eps": "norm_eps",
                "num_patches": "num_position_embeddings",
                "vision_use_head": "pooling_head",
            },
            ignored_fields=("attention_dropout",),
            fixed={"temporal_patch_size": 1, "spatial_merge_size": 1},
            pooling_head=True,
        ),
        # Qwen3.5 (and Qwen3.5-MoE): the Qwen3-VL tower without DeepStack (patch bias, 48x48 table resampled
        # bilinearly with align_corners=True, LayerNorm blocks with a tanh-GELU MLP, the qwen3 merger), the
        # Qwen3-VL processor.
        Family(
            name="qwen3_5",
            norm="layernorm",
            mlp="linear_mlp",
            merger="qwen3",
            patch_bias=True,
            position_table=True,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="out_hidden_size",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1152,
                depth=27,
                num_heads=16,
                intermediate_size=4304,
                out_hidden_size=3584,
                hidden_act="gelu_pytorch_tanh",
                patch_size=16,
                num_position_embeddings=2304,
            ),
            model_types=("qwen3_5", "qwen3_5_moe"),
            tiny=dict(
                embed_dim=32,
                depth=3,
                num_heads=4,
                intermediate_size=48,
                out_hidden_size=40,
                num_position_embeddings=64,
            ),
            architecture="Qwen3_5ForConditionalGeneration",
            key_prefix="model.visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=_QWEN3_PROCESSOR,
        ),
        # GLM-4.1V, GLM-4.5V (glm4v_moe) and GLM-4.6V (glm46v): Conv3d patch embedding with a bias, RMSNorm
        # after it, a learned 24x24 table resampled bicubically (grid_sample, pixel centres, border) to each
        # image, 2D RoPE (Qwen layout), RMSNorm blocks with bias-free output projection and SwiGLU (as wide
        # as out_hidden_size; the release's intermediate_size is the merger's), q/k/v bias =
        # attention_bias, a final RMSNorm, then the GLM merger (2x2 Conv2d downsample, proj, LayerNorm,
        # GELU, SwiGLU).
        Family(
            name="glm4v",
            norm="rmsnorm",
            mlp="swiglu",
            merger="glm",
            patch_bias=True,
            position_table=True,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="out_hidden_size",
            mlp_width_field="out_hidden_size",
            release_defaults=dict(
                embed_dim=1536,
                depth=24,
                num_heads=12,
                out_hidden_size=4096,
                merger_intermediate_size=13696,
                hidden_act="silu",
                patch_size=14,
                num_position_embeddings=(336 // 14) ** 2,
                norm_eps=1e-5,
            ),
            model_types=("glm4v", "glm4v_moe", "glm46v"),
            tiny=dict(
                embed_dim=32,
                depth=2,
                num_heads=2,
                out_hidden_size=48,
                merger_intermediate_size=64,
                num_position_embeddings=64,
            ),
            architecture="Glm4vForConditionalGeneration",
            key_prefix="model.visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=GLM4V_PROCESSOR,
            qkv_bias=False,
            proj_bias=False,
            mlp_bias=False,
            embed_norm=True,
            post_norm=True,
            position="bicubic_grid_sample",
            position_field="image_size",
            key_renames=(
                ("embed_norm", "post_conv_layernorm"),
                ("pos_embed", "embeddings.position_embedding"),
                ("post_norm", "post_layernorm"),
                ("merger.downsample", "downsample"),
            ),
            field_renames={
                "rms_norm_eps": "norm_eps",
                "attention_bias": "qkv_bias",
                "intermediate_size": "merger_intermediate_size",
            },
            ignored_fields=("attention_dropout", "hidden_dropout_prob"),
            derived=(("intermediate_size", lambda c: c.out_hidden_size),),
        ),
        # GLM-OCR: the GLM-4V tower without the position table and the post-patch norm, with a per-head
        # RMSNorm of q and k, biases on q/k/v, the output projection and the SwiGLU (all attention_bias),
        # an intermediate_size-wide SwiGLU, and a merger SwiGLU of width out_hidden_size * in_channels.
        Family(
            name="glm_ocr",
            norm="rmsnorm",
            mlp="swiglu",
            merger="glm",
            patch_bias=True,
            position_table=False,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="out_hidden_size",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1024,
                depth=24,
                num_heads=16,
                out_hidden_size=1536,
                intermediate_size=4096,
                hidden_act="silu",
                patch_size=14,
                norm_eps=1e-5,
            ),
            model_types=("glm_ocr",),
            tiny=dict(embed_dim=32, depth=2, num_heads=2, intermediate_size=48, out_hidden_size=40),
            architecture="GlmOcrForConditionalGeneration",
            key_prefix="model.visual.",
            read_prefixes=_QWEN_PREFIXES,
            processor=GLM4V_PROCESSOR,
            qk_norm=True,
            post_norm=True,
            key_renames=(("post_norm", "post_layernorm"), ("merger.downsample", "downsample")),
            field_renames={
                "rms_norm_eps": "norm_eps",
                "attention_bias": ("qkv_bias", "proj_bias", "mlp_bias"),
            },
            ignored_fields=("attention_dropout", "hidden_dropout_prob", "image_size"),
            derived=(("merger_intermediate_size", lambda c: c.out_hidden_size * c.in_channels),),
        ),
        # ERNIE-4.5-VL: Qwen2-VL's block (LayerNorm, fused qkv, fc1/fc2 QuickGELU MLP, rotate-half 2D
        # RoPE over 2x2 merge-block rows) after a bias-free Linear patch embedding of one-frame rows, a
        # final LayerNorm (``ln``), and the resampler as merger: keyed beside the tower
        # (``model.resampler_model.``), 2x2 spatial then 2-frame temporal MLPs, projected to the text
        # width and RMS-normed with the text eps (both read from text_config).
        Family(
            name="ernie4_5_vl_moe",
            norm="layernorm",
            mlp="mlp",
            merger="ernie",
            patch_bias=False,
            position_table=False,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1280,
                depth=32,
                num_heads=16,
                intermediate_size=5120,
                out_hidden_size=2560,
                hidden_act="quick_gelu",
                merger_norm_eps=1e-5,
            ),
            model_types=("ernie4_5_vl_moe",),
            tiny=dict(embed_dim=64, depth=2, num_heads=4, intermediate_size=96, out_hidden_size=48),
            architecture="Ernie4_5_VLMoeForConditionalGeneration",
            key_prefix="model.vision_model.",
            read_prefixes=("model.vision_tower.", "vision_model."),
            merger_prefixes=("model.resampler_model.",),
            processor=dict(
                min_pixels=56 * 56,
                max_pixels=28 * 28 * 6177,
                patch_size=14,
                temporal_patch_size=1,
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            ),
            patch_conv="linear",
            post_norm=True,
            key_renames=(
                ("post_norm", "ln"),
                ("merger.spatial_linear.fc1", "merger.spatial_linear.0"),
                ("merger.spatial_linear.fc2", "merger.spatial_linear.2"),
                ("merger.spatial_linear.ln", "merger.spatial_linear.3"),
                ("merger.temporal_linear.fc1", "merger.temporal_linear.0"),
                ("merger.temporal_linear.fc2", "merger.temporal_linear.2"),
                ("merger.temporal_linear.ln", "merger.temporal_linear.3"),
            ),
            field_renames={"rms_norm_eps": "norm_eps"},
            ignored_fields=("temporal_merge_size",),
            fixed={"temporal_patch_size": 1},
            text_fields={"hidden_size": "out_hidden_size", "rms_norm_eps": "merger_norm_eps"},
        ),
        # Kimi-K2.5 (MoonViT): Conv2d patch embedding with a bias, a learned (64, 64, D) grid resampled
        # bicubically to each image plus a sinusoid per frame of a video clip, 2D RoPE with complex pairs
        # (x[2i], x[2i+1]) alternating column and row (fused ``wqkv``), tanh-GELU MLP, LayerNorm (eps 1e-5)
        # pre-norm blocks and a final LayerNorm; attention spans whole clips; the merge averages a clip's
        # frames and groups 2x2 patches (no weights: the projector is the VLM's ``mm_projector``).
        Family(
            name="kimi_k25",
            norm="layernorm",
            mlp="mlp",
            merger="kimi",
            patch_bias=True,
            position_table=True,
            deepstack=False,
            windows=False,
            vit_width_field="hidden_size",
            merger_width_field="",
            mlp_width_field="intermediate_size",
            release_defaults=dict(
                embed_dim=1152,
                out_hidden_size=None,
                depth=27,
                num_heads=16,
                intermediate_size=4304,
                hidden_act="gelu_pytorch_tanh",
                patch_size=14,
                spatial_merge_size=2,
                num_position_embeddings=64 * 64,
                max_frames=4,
            ),
            model_types=("kimi_k25",),
            tiny=dict(
                embed_dim=64,
                out_hidden_size=None,
                depth=2,
                num_heads=4,
                intermediate_size=96,
                num_position_embeddings=64,
            ),
            architecture="Kimi_K25ForConditionalGeneration",
            key_prefix="vision_tower.",
            processor=dict(
                patch_size=14,
                temporal_patch_size=1,
                merge_size=2,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                resize="navit",
                resize_options={"max_patches": 16384, "max_size_per_side": 512},
                resample="bicubic_torch",
                normalize="fused",
                clip_frames=4,  # the video processor's temporal_patch_size (its budget: max_patches 4096)
            ),
            qkv="fused",
            post_norm=True,
            rope="kimi",
            rope_pairs="interleaved",
            position="bicubic_frames",
            patch_conv="conv2d",
            position_field="pos_emb",
            clip_attention=True,
            key_renames=(
                ("patch_embed.proj", "patch_embed.proj"),
                ("patch_embed.proj", "encoder.patch_embed.proj"),  # transformers' save_pretrained
                ("pos_embed.weight", "patch_embed.pos_emb.weight"),
                ("blocks.{i}.norm1", "encoder.blocks.{i}.norm0"),
                ("blocks.{i}.norm2", "encoder.blocks.{i}.norm1"),
                ("blocks.{i}.mlp.fc1", "encoder.blocks.{i}.mlp.fc0"),
                ("blocks.{i}.mlp.fc2", "encoder.blocks.{i}.mlp.fc1"),
                ("blocks.{i}.attn.qkv", "encoder.blocks.{i}.wqkv"),
                ("blocks.{i}.attn.proj", "encoder.blocks.{i}.wo"),
                ("post_norm", "encoder.final_layernorm"),
            ),
            # the Hub config's remote-code names first; transformers' names last (what to_hf_dict writes)
            field_renames={
                "vt_hidden_size": "embed_dim",
                "vt_intermediate_size": "intermediate_size",
                "vt_num_hidden_layers": "depth",
                "vt_num_attention_heads": "num_heads",
                "init_pos_emb_time": "max_frames",
                "intermediate_size": "intermediate_size",
                "num_hidden_layers": "depth",
                "num_attention_heads": "num_heads",
                "merge_kernel_size": "spatial_merge_size",
                "pos_emb_time": "max_frames",
            },
            # the remote-code config's projector, prompt and attention-kernel settings, and the names of
            # the one kind of tower K2.5 has (2D table + time sinusoid, clip attention, frame pooling)
            ignored_fields=(
                "pos_emb_type",
                "video_attn_type",
                "merge_type",
                "mm_projector_type",
                "mm_hidden_size",
                "projector_hidden_act",
                "projector_ln_eps",
                "text_hidden_size",
                "_attn_implementation",
            ),
            fixed={"temporal_patch_size": 1, "norm_eps": 1e-5, "in_channels": 3},
            # the merge puts a 2x2 block's four rows side by side
            derived=(("out_hidden_size", lambda c: c.embed_dim * c.spatial_merge_size**2),),
        ),
    )
}

MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str) -> Family:
    """The family of a tower or release ``model_type`` ("qwen2_5_vl", "qwen3_vl_moe", "qwen2_vl_vision",
    ...). Raises ``ValueError`` naming the known ones."""
    # a tower's own model_type: "<release>_vision" (Qwen), "<release>_vision_model" (SigLIP2)
    name = model_type
    if isinstance(name, str):
        suffix = "_vision_model" if name.endswith("_vision_model") else "_vision"
        name = name.removesuffix(suffix)
    for fam in FAMILIES.values():
        if name == fam.name or name in fam.model_types:
            return fam
    known = sorted({t for f in FAMILIES.values() for t in f.model_types})
    raise ValueError(f"model_type {model_type!r} is not a supported tower family; known: {known}")


# Fields of VisionConfig that default to the family's layer details (``Family.qkv_bias`` ...) and that a
# release may set through ``Family.field_renames`` (GLM's ``attention_bias``).
_BIAS_FIELDS = ("qkv_bias", "proj_bias", "mlp_bias")

# Fields of VisionConfig that default to the family's layout (``Family.qkv`` / ``rope_pairs``): a tower
# held in transformers' in-memory layout rather than its release's (``swap_vision_tower``) sets them.
_LAYOUT_FIELDS = {"qkv": ("fused", "separate"), "rope_pairs": ("half", "interleaved")}

# The release fields of a ``position_field="pos_emb"`` table (Kimi-K2.5), with or without ``init_``.
_TABLE_SIDES = ("pos_emb_height", "pos_emb_width")

# Fields of VisionConfig that belong to one optional part of a family.
_PART_FIELDS = {
    "windows": ("window_size", "fullatt_block_indexes"),
    "position_table": ("num_position_embeddings",),
    "deepstack": ("deepstack_visual_indexes",),
    "pooling_head": ("pooling_head",),
}


@dataclass
class VisionConfig:
    """Hyper-parameters of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower.

    Defaults are the released Qwen2-VL-7B tower: width 1280, 32 blocks, 16 heads of dim 80,
    QuickGELU MLP of width 5120, 14x14 patches over 2 frames, 2x2 patch merger to 3584. The family
    presets (``qwen2_5_vl()``, ``qwen3_vl()``) set the other families' fields.

    ``norm_type`` ("layernorm" | "rmsnorm"), ``mlp_type`` ("mlp" | "swiglu") and ``patch_bias``
    default (``None``) to what ``model_type`` uses. ``intermediate_size``, when set, is the MLP width
    (the 2.5 and 3 releases give it; Qwen2-VL gives ``mlp_ratio``). ``window_size`` is in pixels
    (0: no window attention); ``fullatt_block_indexes`` lists the blocks that attend over whole frames
    when windows are on. ``num_position_embeddings`` (0: none) is a square learned position table.
    ``pooling_head``: an attention-pooling head after the blocks (SigLIP2's ``head``, one vector per
    image: ``NativeViT.pool``).
    ``qkv_bias`` / ``proj_bias`` / ``mlp_bias`` (None: the family's) are the biases of the q/k/v, output
    and MLP projections, for releases that set them (GLM's ``attention_bias``);
    ``merger_intermediate_size`` is the width of the GLM merger's SwiGLU.
    """

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    model_type: str = "qwen2_vl"
    norm_type: str | None = None
    mlp_type: str | None = None
    patch_bias: bool | None = None
    intermediate_size: int | None = None
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    qkv_bias: bool | None = None
    proj_bias: bool | None = None
    mlp_bias: bool | None = None
    merger_intermediate_size: int | None = None
    merger_norm_eps: float | None = None
    qkv: str | None = None
    rope_pairs: str | None = None
    max_frames: int = 0
    pooling_head: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(f"VisionConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if not isinstance(self.pooling_head, bool):
            raise TypeError(f"VisionConfig.pooling_head must be a bool, got {self.pooling_head!r}")
        fam = FAMILIES[self.model_type]
        for name in _BIAS_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(fam, name))
            elif not isinstance(getattr(self, name), bool):
                raise TypeError(f"VisionConfig.{name} must be a bool or None, got {getattr(self, name)!r}")
        for name, derive in fam.derived:
            if getattr(self, name) is None:
                setattr(self, name, derive(self))
        for name, allowed in _LAYOUT_FIELDS.items():
            if getattr(self, name) is None:
                setattr(self, name, getattr(fam, name))
            elif getattr(self, name) not in allowed:
                raise ValueError(f"VisionConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.max_frames, int) or isinstance(self.max_frames, bool) or self.max_frames < 0:
            raise ValueError(f"VisionConfig.max_frames must be an int >= 0, got {self.max_frames!r}")
        if self.norm_type is None:
            self.norm_type = fam.norm
        if self.mlp_type is None:
            self.mlp_type = fam.mlp_type
        if self.patch_bias is None:
            self.patch_bias = fam.patch_bias
        if self.merger_norm_eps is None and "merger_norm_eps" in fam.text_fields.values():
            # a merger norm with the text model's eps (ERNIE-4.5-VL): transformers' default text eps
            self.merger_norm_eps = fam.release_defaults.get("merger_norm_eps", self.norm_eps)
        if self.norm_type not in ("layernorm", "rmsnorm"):
            raise ValueError(f"VisionConfig.norm_type must be 'layernorm' or 'rmsnorm': {self.norm_type!r}")
        if self.mlp_type not in ("mlp", "swiglu"):
            raise ValueError(f"VisionConfig.mlp_type must be 'mlp' or 'swiglu', got {self.mlp_type!r}")
        for name in ("intermediate_size", "merger_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"VisionConfig.{name} must be a positive int or None, got {value!r}")
        for name in ("window_size", "num_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VisionConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("embed_dim", "depth", "num_heads", "out_hidden_size", "in_channels", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        for name in ("temporal_patch_size", "spatial_merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"VisionConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.family.rope != "none" and self.head_dim % 4:
            raise ValueError(
                f"head_dim = embed_dim/num_heads = {self.head_dim} must be a multiple of 4 "
                "(2D rotary embedding splits it into h and w halves of rotation pairs)"
            )
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"):
            raise ValueError(f"VisionConfig.hidden_act {self.hidden_act!r} is not supported")
        if self.window_size and self.window_tokens < 1:
            raise ValueError(
                f"VisionConfig.window_size={self.window_size} px is smaller than one merged token "
                f"(patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size} px)"
            )
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"VisionConfig.num_position_embeddings={self.num_position_embeddings} must be a perfect "
                "square (the learned position table is a square grid)"
            )
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"VisionConfig.{name} must be a list or tuple of block indexes: {value!r}")
            value = tuple(value)
            bad = [i for i in value if type(i) is not int or not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"VisionConfig.{name} has entries outside blocks 0..{self.depth - 1}: {bad}")
            if len(set(value)) != len(value):
                raise ValueError(f"VisionConfig.{name} repeats a block: {list(value)}")
            setattr(self, name, value)

    @property
    def family(self) -> Family:
        """This tower's entry of ``FAMILIES``."""
        return FAMILIES[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def window_tokens(self) -> int:
        """Window side in merged tokens (``window_size // merge // patch``: 4 for Qwen2.5-VL); 0 if none."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def windowed_blocks(self) -> tuple[bool, ...]:
        """Per block: does it attend within windows (True) or over whole frames (False)?"""
        full = set(self.fullatt_block_indexes)
        return tuple(bool(self.window_size) and i not in full for i in range(self.depth))

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    # ---------------------------------------------------------------- presets

    @classmethod
    def qwen2_vl(cls, **overrides: Any) -> VisionConfig:
        """The Qwen2-VL tower (7B release; 2B differs only in ``out_hidden_size=1536``)."""
        return cls(**overrides)

    @classmethod
    def qwen2_vl_shallow(cls, depth: int = 4, **overrides: Any) -> VisionConfig:
        """Qwen2-VL widths with fewer blocks: the default for quick benchmarks on a CPU."""
        return cls(depth=depth, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> VisionConfig:
        """A 2-block, width-64 tower for tests (head dim 16)."""
        return cls.preset("qwen2_vl", tiny=True, **overrides)

    @classmethod
    def qwen2_5_vl(cls, **overrides: Any) -> VisionConfig:
        """The Qwen2.5-VL tower (7B release; 3B differs only in ``out_hidden_size=2048``, 72B in 8192):
        width 1280, 32 blocks, 16 heads of dim 80, SwiGLU 3420, RMSNorm, 112-px windows (8x8 patches)
        with full attention in blocks 7, 15, 23, 31."""
        base = dict(
            model_type="qwen2_5_vl",
            embed_dim=1280,
            depth=32,
            num_heads=16,
            intermediate_size=3420,
            out_hidden_size=3584,
            hidden_act="silu",
            window_size=112,
            fullatt_block_indexes=(7, 15, 23, 31),
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def qwen2_5_vl_shallow(cls, depth: int = 4, **overrides: Any) -> VisionConfig:
        """Qwen2.5-VL widths with fewer blocks (quick CPU benchmarks); the last block attends fully, the
        others within windows, close to the release's 1-in-8 ratio."""
        overrides.setdefault("fullatt_block_indexes", (depth - 1,))
        return cls.qwen2_5_vl(depth=depth, **overrides)

    @classmethod
    def qwen2_5_vl_tiny(cls, **overrides: Any) -> VisionConfig:
        """A 4-block, width-64 Qwen2.5-VL tower for tests: windowed blocks 0, 2; full 1, 3."""
        return cls.preset("qwen2_5_vl", tiny=True, **overrides)

    @classmethod
    def qwen3_vl(cls, **overrides: Any) -> VisionConfig:
        """The Qwen3-VL tower (8B release; transformers' defaults but for the merger width): width 1152,
        27 blocks, 16 heads of dim 72, tanh-GELU MLP 4304, 16x16 patches with a bias, 48x48 learned
        position table, DeepStack mergers after blocks 8, 16, 24, merged to 4096. Other releases differ
        in these numbers; their config.json says how (``from_hf_dict``)."""
        base = dict(
            model_type="qwen3_vl",
            embed_dim=1152,
            depth=27,
            num_heads=16,
            intermediate_size=4304,
            out_hidden_size=4096,
            hidden_act="gelu_pytorch_tanh",
            patch_size=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=(8, 16, 24),
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def qwen3_vl_shallow(cls, depth: int = 4, **overrides: Any) -> VisionConfig:
        """Qwen3-VL widths with fewer blocks (quick CPU benchmarks); DeepStack after blocks 1 and 2."""
        overrides.setdefault("deepstack_visual_indexes", tuple(range(1, min(depth, 3))))
        return cls.qwen3_vl(depth=depth, **overrides)

    @classmethod
    def qwen3_vl_tiny(cls, **overrides: Any) -> VisionConfig:
        """A 3-block, width-32 Qwen3-VL tower for tests: 8x8 position table, DeepStack after 0 and 2."""
        return cls.preset("qwen3_vl", tiny=True, **overrides)

    @classmethod
    def preset(
        cls, model_type: str, *, depth: int | None = None, tiny: bool = False, **overrides: Any
    ) -> VisionConfig:
        """A family's tower from the table: transformers' defaults for it (``Family.release_defaults``),
        or its small test tower with ``tiny=True`` (``Family.tiny``), then ``overrides``.

        ``depth`` keeps the first ``depth`` blocks (a shallow tower for quick benchmarks): block indexes
        past it are dropped; a windowed tower keeps its last block full, and a DeepStack tower taps
        blocks 1.. (or 0) as the shallow presets do.
        """
        fam = family(model_type)
        kwargs: dict[str, Any] = {**fam.release_defaults, **fam.fixed}
        if tiny:
            kwargs.update(fam.tiny)
        kwargs.update(model_type=fam.name)
        if depth is not None:
            kwargs["depth"] = depth
            if kwargs.get("window_size"):
                kwargs["fullatt_block_indexes"] = (depth - 1,)
            if kwargs.get("deepstack_visual_indexes"):
                kept = tuple(i for i in kwargs["deepstack_visual_indexes"] if i < depth)
                kwargs["deepstack_visual_indexes"] = kept or tuple(range(1, min(depth, 3))) or (0,)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------ released configs

    @classmethod
    def from_hf_dict(
        cls,
        vision_config: dict[str, Any],
        *,
        text_hidden_size: int | None = None,
        model_type: str | None = None,
        text_config: dict[str, Any] | None = None,
    ) -> VisionConfig:
        """Build from the ``vision_config`` dict of a released ``config.json``.

        ``model_type`` is the family (the checkpoint's top-level ``model_type``); when omitted it is
        read from ``vision_config["model_type"]``, else Qwen2-VL. Field names are each family's: for
        Qwen2-VL ``embed_dim`` is the ViT width and ``hidden_size`` the merger output; for Qwen2.5-VL
        and Qwen3-VL ``hidden_size`` is the ViT width and ``out_hidden_size`` the merger output.
        Absent fields take the family's transformers class defaults, as transformers does (the 7B
        Qwen2-VL release sets only ``in_chans``, ``model_type`` and ``spatial_patch_size``), except the
        merger width, which falls back to ``text_hidden_size`` (the language model width it projects
        to) first. ``text_config``: the release's text config (or its top level), read for the family's
        ``text_fields``.
        """
        if not isinstance(vision_config, dict):
            raise TypeError(f"vision_config must be a dict, got {type(vision_config).__name__}")
        fam = family(model_type or vision_config.get("model_type") or "qwen2_vl")
        internal = {"model_type", "norm_type", "mlp_type", "patch_bias", "norm_eps", "rope_theta"}
        internal |= set(_BIAS_FIELDS)
        internal |= set(_LAYOUT_FIELDS)
        internal |= {"merger_norm_eps"}
        widths = {"embed_dim", "out_hidden_size", "mlp_ratio", "intermediate_size"}
        widths |= {"merger_intermediate_size"}
        fields = {f.name for f in dataclasses.fields(cls)} - internal - widths
        for part, names in _PART_FIELDS.items():
            if not getattr(fam, part):
                fields -= set(names)
        renames = {
            fam.vit_width_field: "embed_dim",
            fam.mlp_width_field: fam.mlp_width_field,
            **fam.field_renames,
        }
        if fam.merger_width_field:
            renames[fam.merger_width_field] = "out_hidden_size"
        family_name = fam.name
        kwargs: dict[str, Any] = {**fam.release_defaults, **fam.fixed}
        given: set[str] = set()
        unknown = []
        image_size = None
        table_sides: dict[str, Any] = {}
        for key, value in vision_config.items():
            if key in fam.ignored_fields:
                continue
            key = key if key in renames else _HF_ALIASES.get(key, key)
            if key in renames:
                targets = renames[key]
                for target in (targets,) if isinstance(targets, str) else targets:
                    kwargs[target] = value
                    given.add(target)
            elif key == "rope_parameters":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"vision_config.rope_parameters must be an object, got {value!r}")
                if value:
                    if value.get("rope_type", "axial") not in ("axial", "default"):
                        raise ValueError(f"unsupported vision rope_type {value.get('rope_type')!r}")
                    kwargs["rope_theta"] = float(value.get("rope_theta", cls.rope_theta))
            elif key == "image_size" and fam.position_field == "image_size":
                image_size = value
            elif fam.position_field == "pos_emb" and key.removeprefix("init_") in _TABLE_SIDES:
                table_sides[key.removeprefix("init_")] = value  # init_*: the remote-code config's names
            elif key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_HF_FIELDS:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"vision_config has fields nativevit does not know for a {family_name} tower: "
                f"{sorted(unknown)}"
            )
        for theirs, ours in fam.text_fields.items():
            if isinstance(text_config, dict) and text_config.get(theirs) is not None:
                kwargs[ours] = text_config[theirs]
                given.add(ours)
        if any(name == "out_hidden_size" for name, _ in fam.derived):
            kwargs["out_hidden_size"] = None  # computed from the rest (a merger without weights)
        elif not fam.merger_width_field and "out_hidden_size" not in fam.text_fields.values():
            # no merger in the tower: its output is the ViT width
            kwargs["out_hidden_size"] = kwargs.get("embed_dim", cls.embed_dim)
        elif "out_hidden_size" not in given and text_hidden_size is not None:
            kwargs["out_hidden_size"] = text_hidden_size
        for key in ("patch_size", "temporal_patch_size", "spatial_merge_size"):  # Kimi: a (2, 2) merge kernel
            if isinstance(kwargs.get(key), (list, tuple)):
                values = set(kwargs[key])
                if len(values) != 1:
                    raise ValueError(f"vision_config.{key}={kwargs[key]} is not square; not supported")
                kwargs[key] = values.pop()
        if table_sides:  # Kimi-K2.5: a (height, width) grid, square as transformers reads it
            side = table_sides.get("pos_emb_height", table_sides.get("pos_emb_width"))
            if len(set(table_sides.values())) != 1 or not isinstance(side, int):
                raise ValueError(f"vision_config {table_sides}: only a square position table is supported")
            kwargs["num_position_embeddings"] = side * side
        if image_size is not None:  # a SigLIP-style table: one entry per patch of the pretraining image
            if isinstance(image_size, (list, tuple)):
                if len(set(image_size)) != 1:
                    raise ValueError(f"vision_config.image_size={image_size} is not square; not supported")
                image_size = image_size[0]
            kwargs["num_position_embeddings"] = (image_size // kwargs.get("patch_size", cls.patch_size)) ** 2
        return cls(model_type=family_name, **kwargs)

    def text_hf_dict(self) -> dict[str, Any]:
        """The ``text_config`` fields of this family's releases that describe the tower
        (``Family.text_fields``); empty for most families."""
        return {theirs: getattr(self, ours) for theirs, ours in self.family.text_fields.items()}

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``vision_config`` dict in the field names of this family's releases."""
        fam = self.family
        if self.merger_norm_eps is not None and "merger_norm_eps" not in fam.text_fields.values():
            raise ValueError(
                f"a {self.model_type} release cannot describe merger_norm_eps={self.merger_norm_eps}: its "
                "merger norms use norm_eps"
            )
        release_name = {
            ours: theirs
            for theirs, targets in fam.field_renames.items()
            for ours in ((targets,) if isinstance(targets, str) else targets)
        }
        for theirs, targets in fam.field_renames.items():
            values = {getattr(self, ours) for ours in ((targets,) if isinstance(targets, str) else targets)}
            if len(values) > 1:
                raise ValueError(
                    f"a {self.model_type} release sets {', '.join(targets)} together ({theirs}): they "
                    f"cannot differ, got {[getattr(self, ours) for ours in targets]}"
                )
        for name in _BIAS_FIELDS:
            if name not in release_name and getattr(self, name) != getattr(fam, name):
                raise ValueError(
                    f"a {self.model_type} release cannot describe {name}={getattr(self, name)}: its "
                    f"config has no such field"
                )
        for name, derive in fam.derived:
            if getattr(self, name) != derive(self):
                raise ValueError(
                    f"a {self.model_type} release cannot describe {name}={getattr(self, name)!r}: the "
                    f"family derives it from the other fields ({derive(self)!r} here)"
                )
        if self.norm_eps != fam.fixed.get("norm_eps", 1e-6) and "norm_eps" not in release_name:
            raise ValueError(
                f"a {self.model_type} release cannot describe norm_eps={self.norm_eps}: its config has no "
                "such field (the releases' norms use 1e-6)"
            )
        if (self.norm_type, self.mlp_type, self.patch_bias) != (fam.norm, fam.mlp_type, fam.patch_bias):
            raise ValueError(
                f"a {self.model_type} release cannot describe norm_type={self.norm_type!r}, "
                f"mlp_type={self.mlp_type!r}, patch_bias={self.patch_bias}: its config has no such fields"
            )
        used = {
            "windows": bool(self.window_size),
            "position_table": bool(self.num_position_embeddings),
            "deepstack": bool(self.deepstack_visual_indexes),
            "pooling_head": self.pooling_head,
        }
        lacking = [part for part, on in used.items() if on and not getattr(fam, part)]
        if lacking:
            raise ValueError(f"a {self.model_type} release has no {', '.join(lacking)}")
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "depth": self.depth,
            "hidden_act": self.hidden_act,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            fam.vit_width_field: self.embed_dim,
        }
        if fam.rope != "none":
            out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        if fam.merger_width_field:
            out[fam.merger_width_field] = self.out_hidden_size
        if "norm_eps" in release_name:
            out["norm_eps"] = self.norm_eps
        if fam.mlp_width_field == "mlp_ratio":
            out["mlp_ratio"] = _exact_ratio(self.mlp_hidden_dim, self.embed_dim)
        else:
            out[fam.mlp_width_field] = self.mlp_hidden_dim
        for part, names in _PART_FIELDS.items():
            if getattr(fam, part):
                for name in names:
                    value = getattr(self, name)
                    out[name] = list(value) if isinstance(value, tuple) else value
        if fam.position_field == "image_size":
            out["image_size"] = math.isqrt(out.pop("num_position_embeddings")) * self.patch_size
        if fam.position_field == "pos_emb":
            out["pos_emb_height"] = out["pos_emb_width"] = math.isqrt(out.pop("num_position_embeddings"))
        for name in _LAYOUT_FIELDS:
            if getattr(self, name) != getattr(fam, name):
                raise ValueError(
                    f"a {self.model_type} release cannot describe {name}={getattr(self, name)!r}: its layout "
                    f"is {getattr(fam, name)!r}"
                )
        if "max_frames" in release_name:
            out["max_frames"] = self.max_frames
        if release_name.get("spatial_merge_size") == "merge_kernel_size":  # written as a (h, w) kernel
            out["spatial_merge_size"] = [self.spatial_merge_size] * 2
        for name in (*_BIAS_FIELDS, "merger_intermediate_size"):
            if name in release_name:  # fields a release names its own way (GLM's attention_bias)
                out[name] = getattr(self, name)
        for name, value in fam.fixed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"a {self.model_type} release cannot describe {name}={getattr(self, name)!r}"
                )
            out.pop(name, None)
        return {release_name.get(k, k): v for k, v in out.items()}


def _exact_ratio(hidden: int, dim: int) -> int | float:
    """``mlp_ratio`` such that ``int(dim * mlp_ratio) == hidden``, as transformers and ``mlp_hidden_dim``
    compute the width (``hidden / dim`` itself can land just below: 28 * (61 / 28) = 60.99...)."""
    if hidden % dim == 0:
        return hidden // dim
    ratio = hidden / dim
    for _ in range(8):
        if int(dim * ratio) == hidden:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ValueError(f"no float mlp_ratio gives an MLP width of {hidden} at embed_dim {dim}")
