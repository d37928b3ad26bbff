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


# Where the Qwen releases key their tower: ``visual.`` (Qwen2-VL, Qwen2.5-VL in transformers < 4.52),
# ``model.visual.`` (later saves, Qwen3-VL).
_QWEN_PREFIXES = ("visual.", "model.visual.")


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
    field_renames: dict[str, str] = dataclasses.field(default_factory=dict)
    ignored_fields: tuple[str, ...] = ()
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    tiny: dict[str, Any] = dataclasses.field(default_factory=dict)

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
            processor=dict(
                min_pixels=65536,
                max_pixels=16777216,
                patch_size=16,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
                pixel_cap=16777216,
            ),
        ),
    )
}

MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str) -> Family:
    """The family of a tower or release ``model_type`` ("qwen2_5_vl", "qwen3_vl_moe", "qwen2_vl_vision",
    ...). Raises ``ValueError`` naming the known ones."""
    name = model_type.removesuffix("_vision") if isinstance(model_type, str) else model_type
    for fam in FAMILIES.values():
        if name == fam.name or name in fam.model_types:
            return fam
    known = sorted({t for f in FAMILIES.values() for t in f.model_types})
    raise ValueError(f"model_type {model_type!r} is not a supported tower family; known: {known}")


# Fields of VisionConfig that belong to one optional part of a family.
_PART_FIELDS = {
    "windows": ("window_size", "fullatt_block_indexes"),
    "position_table": ("num_position_embeddings",),
    "deepstack": ("deepstack_visual_indexes",),
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

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(f"VisionConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        fam = FAMILIES[self.model_type]
        if self.norm_type is None:
            self.norm_type = fam.norm
        if self.mlp_type is None:
            self.mlp_type = fam.mlp_type
        if self.patch_bias is None:
            self.patch_bias = fam.patch_bias
        if self.norm_type not in ("layernorm", "rmsnorm"):
            raise ValueError(f"VisionConfig.norm_type must be 'layernorm' or 'rmsnorm': {self.norm_type!r}")
        if self.mlp_type not in ("mlp", "swiglu"):
            raise ValueError(f"VisionConfig.mlp_type must be 'mlp' or 'swiglu', got {self.mlp_type!r}")
        for name in ("intermediate_size",):
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
    ) -> VisionConfig:
        """Build from the ``vision_config`` dict of a released ``config.json``.

        ``model_type`` is the family (the checkpoint's top-level ``model_type``); when omitted it is
        read from ``vision_config["model_type"]``, else Qwen2-VL. Field names are each family's: for
        Qwen2-VL ``embed_dim`` is the ViT width and ``hidden_size`` the merger output; for Qwen2.5-VL
        and Qwen3-VL ``hidden_size`` is the ViT width and ``out_hidden_size`` the merger output.
        Absent fields take the family's transformers class defaults, as transformers does (the 7B
        Qwen2-VL release sets only ``in_chans``, ``model_type`` and ``spatial_patch_size``), except the
        merger width, which falls back to ``text_hidden_size`` (the language model width it projects
        to) first.
        """
        if not isinstance(vision_config, dict):
            raise TypeError(f"vision_config must be a dict, got {type(vision_config).__name__}")
        fam = family(model_type or vision_config.get("model_type") or "qwen2_vl")
        internal = {"model_type", "norm_type", "mlp_type", "patch_bias", "norm_eps", "rope_theta"}
        widths = {"embed_dim", "out_hidden_size", "mlp_ratio", "intermediate_size"}
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
        for key, value in vision_config.items():
            if key in fam.ignored_fields:
                continue
            key = key if key in renames else _HF_ALIASES.get(key, key)
            if key in renames:
                kwargs[renames[key]] = value
                given.add(renames[key])
            elif key == "rope_parameters":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"vision_config.rope_parameters must be an object, got {value!r}")
                if value:
                    if value.get("rope_type", "axial") not in ("axial", "default"):
                        raise ValueError(f"unsupported vision rope_type {value.get('rope_type')!r}")
                    kwargs["rope_theta"] = float(value.get("rope_theta", cls.rope_theta))
            elif key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_HF_FIELDS:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"vision_config has fields nativevit does not know for a {family_name} tower: "
                f"{sorted(unknown)}"
            )
        if not fam.merger_width_field:  # no merger in the tower: its output is the ViT width
            kwargs["out_hidden_size"] = kwargs.get("embed_dim", cls.embed_dim)
        elif "out_hidden_size" not in given and text_hidden_size is not None:
            kwargs["out_hidden_size"] = text_hidden_size
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                values = set(kwargs[key])
                if len(values) != 1:
                    raise ValueError(f"vision_config.{key}={kwargs[key]} is not square; not supported")
                kwargs[key] = values.pop()
        return cls(model_type=family_name, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``vision_config`` dict in the field names of this family's releases."""
        fam = self.family
        release_name = {ours: theirs for theirs, ours in fam.field_renames.items()}
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
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
            fam.vit_width_field: self.embed_dim,
        }
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
