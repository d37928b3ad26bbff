"""Vision tower configuration and presets.

Field names follow the Qwen2-VL release (``Qwen2VLVisionConfig``) with one deliberate exception:
the merger output width is ``out_hidden_size`` here. In the Qwen2-VL release that value is called
``hidden_size`` (it is the language model's width, not the ViT width); ``from_hf_dict`` and
``to_hf_dict`` translate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


@dataclass
class VisionConfig:
    """Hyper-parameters of a Qwen2-VL-style vision tower.

    Defaults are the released Qwen2-VL-7B tower: width 1280, 32 blocks, 16 heads of dim 80,
    QuickGELU MLP of width 5120, 14x14 patches over 2 frames, 2x2 patch merger to 3584.
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

    def __post_init__(self) -> None:
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
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim = embed_dim/num_heads = {self.head_dim} must be a multiple of 4 "
                "(2D rotary embedding splits it into h and w halves of rotation pairs)"
            )
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"):
            raise ValueError(f"VisionConfig.hidden_act {self.hidden_act!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

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
        base = dict(embed_dim=64, depth=2, num_heads=4, out_hidden_size=48)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides: Any) -> VisionConfig:
        """A 4-block tower with the real head dim (80) for kernel-facing tests."""
        base = dict(embed_dim=320, depth=4, num_heads=4, out_hidden_size=256)
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------ released configs

    @classmethod
    def from_hf_dict(cls, vision_config: dict[str, Any], *, text_hidden_size: int | None = None) -> VisionConfig:
        """Build from the ``vision_config`` dict of a released Qwen2-VL ``config.json``.

        Released configs set only a few fields (the 7B sets ``in_chans``, ``model_type`` and
        ``spatial_patch_size``); the others take the class defaults, as transformers does. The merger
        output width is ``hidden_size`` there; when it is absent, ``text_hidden_size`` (the language
        model width, which is what the merger projects to) is used before the 7B default.
        """
        if not isinstance(vision_config, dict):
            raise TypeError(f"vision_config must be a dict, got {type(vision_config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in vision_config.items():
            key = _HF_ALIASES.get(key, key)
            if key == "hidden_size":
                kwargs["out_hidden_size"] = value
            elif key == "rope_parameters":
                if value:
                    if value.get("rope_type", "axial") not in ("axial", "default"):
                        raise ValueError(f"unsupported vision rope_type {value.get('rope_type')!r}")
                    kwargs["rope_theta"] = float(value.get("rope_theta", cls.rope_theta))
            elif key in fields and key != "out_hidden_size":
                kwargs[key] = value
            elif key not in _IGNORED_HF_FIELDS:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"vision_config has fields nativevit does not know: {sorted(unknown)}; "
                "this does not look like a Qwen2-VL vision tower"
            )
        if "out_hidden_size" not in kwargs and text_hidden_size is not None:
            kwargs["out_hidden_size"] = text_hidden_size
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                values = set(kwargs[key])
                if len(values) != 1:
                    raise ValueError(f"vision_config.{key}={kwargs[key]} is not square; not supported")
                kwargs[key] = values.pop()
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``vision_config`` dict in the field names of the Qwen2-VL release."""
        return {
            "model_type": "qwen2_vl",
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "hidden_size": self.out_hidden_size,
            "hidden_act": self.hidden_act,
            "mlp_ratio": int(self.mlp_ratio) if float(self.mlp_ratio).is_integer() else self.mlp_ratio,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }
