"""The vision tower of a transformers VLM, replaced in place by a nativevit encoder.

    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    nv.swap_vision_tower(model)                      # same parameters, same state-dict keys
    out = model(**inputs); model.generate(**inputs)  # the tower now runs packed, through nv.ops

Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3-VL-MoE): the tower becomes a :class:`QwenVisionTower`, a
``NativeViT`` built on the meta device whose parameters are then the transformers tower's own
``nn.Parameter`` objects (NativeViT's parameter names are the release's tower keys). It keeps the
tower's interface: ``forward(pixel_values, grid_thw)`` returns transformers' output (``pooler_output``;
``last_hidden_state`` in transformers' row order, window order for Qwen2.5-VL; Qwen3-VL's
``deepstack_features``), ``dtype``, ``spatial_merge_size``.

ERNIE-4.5-VL: the tower becomes an :class:`ErnieVisionTower` (a ``QwenVisionTower`` ending at its final
norm, ``last_hidden_state`` only, as transformers' tower) and the resampler beside it an
:class:`ErnieResampler` (nativevit's merger with transformers' ``forward(hidden_states, grid_thw)``), both
holding the transformers modules' parameters under their keys.

Mistral 3, and LLaVA with a Pixtral tower (Pixtral-12B): the tower becomes a :class:`PixtralVisionTower`
(a ``NativeViT`` holding the transformers tower's parameters, whose state-dict keys stay the release's
through ``Family.key_renames``) with ``PixtralVisionModel``'s interface: ``forward(pixel_values (B, C, H,
W) padded, image_sizes)`` -> ``last_hidden_state`` ``(1, N, D)`` and the selected ``hidden_states``.

LLaVA (CLIP or SigLIP), LLaVA-NeXT, LLaVA-OneVision and InternVL: the tower becomes a
:class:`TransformersVisionTower`, the packed CLIP / SigLIP / InternViT encoder of ``hf_vit`` with the
vision model's interface: ``forward(pixel_values (B, C, H, W), output_hidden_states=...)`` returns
``hidden_states`` for the layers the model selects (``vision_feature_layer``; the model crops the class
token for the "default" select strategy), and runs only the layers they need (LLaVA's -2 skips the last).

Within one call of the model, images and videos go through the tower as ONE packed batch: the models
call their tower once for the images and once for the videos, so a forward pre-hook on the model
(Qwen, OneVision) encodes both at once when a call has both, and the tower answers each of the two
calls from that result (matched on the exact pixel tensor it receives; on no match it encodes anew).

The swap is idempotent (a swapped model is swapped again only to change ``attn_backend``). The
model's config is untouched, so ``save_pretrained`` writes the original layout and
``from_pretrained`` of the unswapped class reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn as nn

from ..config import FAMILIES, VisionConfig
from ..model import NativeViT, VariableResolutionResampler, merger_arguments
from ..packing import BatchPlan, unpad_segments
from .hf_vit import SUPPORTED_VISION_MODELS, TransformersPackedEncoder

__all__ = [
    "KimiVisionTower",
    "PaddleOCRVisionTower",
    "PixtralVisionTower",
    "QwenVisionTower",
    "SUPPORTED_MODELS",
    "Siglip2VisionTower",
    "ErnieVisionTower",
    "ErnieResampler",
    "TransformersVisionTower",
    "swap_vision_tower",
]

# Supported transformers model class -> (how its tower is swapped, nativevit family for the Qwen ones)
SUPPORTED_MODELS = {
    "Qwen2VLForConditionalGeneration": ("qwen", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen", "qwen2_5_vl"),
    "Qwen3VLForConditionalGeneration": ("qwen", "qwen3_vl"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen", "qwen3_vl"),
    "LlavaForConditionalGeneration": ("vit", None),
    "LlavaNextForConditionalGeneration": ("vit", None),
    "LlavaOnevisionForConditionalGeneration": ("vit", None),
    "InternVLForConditionalGeneration": ("vit", None),
    "Mistral3ForConditionalGeneration": ("pixtral", "pixtral"),
    "Kimi_K25ForConditionalGeneration": ("kimi", "kimi_k25"),
    "PaddleOCRVLForConditionalGeneration": ("paddleocr", "paddleocr_vl"),
    "Siglip2Model": ("siglip2", "siglip2"),
    "Siglip2ForImageClassification": ("siglip2", "siglip2"),
    "Lfm2VlForConditionalGeneration": ("siglip2", "siglip2"),
    "Qwen3_5ForConditionalGeneration": ("qwen", "qwen3_5"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen", "qwen3_5"),
    "Glm4vForConditionalGeneration": ("qwen", "glm4v"),
    "Glm4vMoeForConditionalGeneration": ("qwen", "glm4v"),
    "Glm46VForConditionalGeneration": ("qwen", "glm4v"),
    "GlmOcrForConditionalGeneration": ("qwen", "glm_ocr"),
    "Ernie4_5_VLMoeForConditionalGeneration": ("ernie", "ernie4_5_vl_moe"),
}


def swap_vision_tower(model: nn.Module, *, attn_backend: str = "auto") -> nn.Module:
    """Replace, in place, the vision tower of a transformers VLM by a nativevit encoder; returns ``model``.

    The new tower holds the same parameter tensors under the same state-dict keys, and the model's
    logits and ``generate`` are unchanged (up to floating-point rounding). ``attn_backend``: an
    attention backend of ``nativevit.ops`` ("auto", "torch", "cpu", "triton", "padded", ...).

    Raises ``TypeError`` for a model class that is not supported (the message lists those that are),
    ``ValueError`` for a tower setting nativevit cannot express (naming the config field).
    """
    name = _supported_class(model)
    how, family_name = SUPPORTED_MODELS[name]

    def swap(inner: nn.Module, attr: str, adapter: type, build, calls=None) -> nn.Module:
        """Put ``build(tower)`` in place of ``inner.<attr>`` (a swapped tower only changes backend)."""
        tower = getattr(inner, attr)
        if isinstance(tower, adapter):
            tower.attn_backend = attn_backend
            return model
        setattr(inner, attr, build(tower))
        if calls is not None:
            _install_prefetch(inner, attr, calls)
        return model

    if how == "siglip2":  # Siglip2Model / Siglip2ForImageClassification: vision_model; LFM2-VL: vision_tower
        own = hasattr(model, "vision_model")
        inner, attr = (model, "vision_model") if own else (model.model, "vision_tower")
        build = partial(
            Siglip2VisionTower.from_transformers, family_name=family_name, attn_backend=attn_backend
        )
        return swap(inner, attr, Siglip2VisionTower, build)
    inner = model.model
    native = {  # how -> (attribute, adapter, prefetch of a forward's calls)
        "qwen": ("visual", QwenVisionTower, _qwen_calls),
        "kimi": ("vision_tower", KimiVisionTower, None),  # one tower call per forward
        "paddleocr": ("visual", PaddleOCRVisionTower, None),  # images only: one call per forward
    }
    if how in native:
        attr, adapter, calls = native[how]
        build = partial(adapter.from_transformers, family_name=family_name, attn_backend=attn_backend)
        return swap(inner, attr, adapter, build, calls)
    if how == "ernie":  # the tower and, beside it, the resampler: each swapped for nativevit's
        if not isinstance(inner.vision_tower, ErnieVisionTower):
            inner.resampler_model = ErnieResampler.from_transformers(model.config, inner.resampler_model)
        build = partial(ErnieVisionTower.from_transformers, model.config, attn_backend=attn_backend)
        return swap(inner, "vision_tower", ErnieVisionTower, build, _qwen_calls)
    kind = type(inner.vision_tower).__name__
    pixtral = ("PixtralVisionModel", "PixtralVisionTower")
    if how == "pixtral" or kind in pixtral:  # Mistral 3, or a LLaVA with a Pixtral tower
        if kind not in pixtral:
            raise ValueError(f"{name}: expected a PixtralVisionModel tower, got {kind}")
        build = partial(PixtralVisionTower.from_transformers, attn_backend=attn_backend)
        return swap(inner, "vision_tower", PixtralVisionTower, build)
    if kind not in (*SUPPORTED_VISION_MODELS, "TransformersVisionTower"):
        model_type = getattr(getattr(model.config, "vision_config", None), "model_type", None)
        raise ValueError(
            f"{name}: vision_config.model_type={model_type!r} ({kind}) is not supported; nativevit runs "
            f"{', '.join([*SUPPORTED_VISION_MODELS, 'PixtralVisionModel'])} towers"
        )
    build = partial(TransformersVisionTower, attn_backend=attn_backend)
    onevision = name == "LlavaOnevisionForConditionalGeneration"
    return swap(
        inner, "vision_tower", TransformersVisionTower, build, _onevision_calls if onevision else None
    )


def _supported_class(model: object) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODELS and cls.__module__.startswith("transformers."):
            return cls.__name__
    raise TypeError(
        f"swap_vision_tower does not support {type(model).__name__}; supported transformers models: "
        f"{', '.join(SUPPORTED_MODELS)}"
    )


# ----------------------------------------------------------------------------- prefetch


class _Prefetched:
    """Tower outputs computed ahead of the calls a model's forward is about to make, each given out once
    to the call whose pixel tensor (and grid) it was computed for."""

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor | None, object, object]] = []

    def put(self, pixels: torch.Tensor, grid: torch.Tensor | None, settings: object, output: object) -> None:
        self.entries.append((pixels, grid, settings, output))

    def take(self, pixels: torch.Tensor, grid: torch.Tensor | None, settings: object) -> object | None:
        for i, (key, key_grid, key_settings, output) in enumerate(self.entries):
            if key_settings != settings or not _same(key_grid, grid):
                continue
            if key is pixels or (key.shape == pixels.shape and torch.equal(key.to(pixels.dtype), pixels)):
                del self.entries[i]
                return output
        return None

    def clear(self) -> None:
        self.entries.clear()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _install_prefetch(inner: nn.Module, attr: str, calls) -> None:
    """A forward pre-hook on the model that encodes the images and videos of a call in one packed
    batch (when the call has both), and a forward hook that drops whatever was not used. The hooks find
    the tower by attribute, so they follow a deep copy of the model and ignore a tower swapped back."""
    if any(getattr(h, "_nativevit_prefetch", False) for h in inner._forward_pre_hooks.values()):
        return

    def tower_of(module):
        tower = getattr(module, attr, None)
        return tower if isinstance(tower, (QwenVisionTower, TransformersVisionTower)) else None

    def before(module, args, kwargs):
        tower = tower_of(module)
        if tower is not None:
            tower._prefetched.clear()
            planned = calls(module, kwargs)
            if planned:
                tower.prefetch(planned)

    def after(module, args, kwargs, output):
        tower = tower_of(module)
        if tower is not None:
            tower._prefetched.clear()

    before._nativevit_prefetch = True
    inner.register_forward_pre_hook(before, with_kwargs=True)
    inner.register_forward_hook(after, with_kwargs=True, always_call=True)


def _qwen_calls(inner: nn.Module, kwargs: dict) -> list | None:
    """The ``(pixels, grid)`` of the two tower calls of a Qwen forward with images and videos."""
    pv, pvv = kwargs.get("pixel_values"), kwargs.get("pixel_values_videos")
    if pv is None or pvv is None or kwargs.get("mm_encoder_outputs") is not None:
        return None
    gi, gv = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
    if gi is None or gv is None:
        return None
    return [(pv, gi), (pvv, gv)]


def _onevision_calls(inner: nn.Module, kwargs: dict) -> list | None:
    """The pixel tensors of the two tower calls of a LLaVA-OneVision forward with images and videos:
    the image tiles as ``get_image_features`` gathers them, and the video frames."""
    pv, pvv = kwargs.get("pixel_values"), kwargs.get("pixel_values_videos")
    sizes = kwargs.get("image_sizes")
    if pv is None or pvv is None or sizes is None or kwargs.get("mm_encoder_outputs") is not None:
        return None
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = inner.config
    batch_num_images = kwargs.get("batch_num_images")
    if batch_num_images is None:
        patching = [True] * len(sizes)
    else:
        patching = [n == 1 for n in batch_num_images for _ in range(n)]
    counts = [
        image_size_to_num_patches(
            image_size=size,
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )
        if patch
        else 1
        for size, patch in zip(sizes, patching)
    ]
    if pv.dim() == 5:
        pv = torch.cat([p[:n] for p, n in zip(pv, counts)])
    layer = kwargs.get("vision_feature_layer")
    layer = config.vision_feature_layer if layer is None else layer
    frames = pvv.view(-1, *pvv.shape[-3:])
    return [(pv, layer), (frames, layer)]


# ----------------------------------------------------------------------------- Qwen towers


def qwen_vision_config(vc, family_name: str) -> VisionConfig:
    """The ``VisionConfig`` of a transformers Qwen vision config (an object with the release's field
    names); ``ValueError`` naming the ``vision_config`` field nativevit cannot express."""
    fam = FAMILIES[family_name]

    def field(name: str):
        if not hasattr(vc, name):
            raise ValueError(f"vision_config has no {name!r}: not a {family_name} vision config")
        return getattr(vc, name)

    def refuse(name: str, why: str):
        raise ValueError(f"vision_config.{name}={getattr(vc, name, None)!r}: {why}")

    for name in ("patch_size", "temporal_patch_size"):
        if isinstance(field(name), (list, tuple)) and len(set(field(name))) != 1:
            refuse(name, "non-square patches are not supported")
    act = field("hidden_act")
    if act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"):
        refuse("hidden_act", "nativevit's towers use quick_gelu, gelu, gelu_pytorch_tanh or silu")
    rope = getattr(vc, "rope_parameters", None) or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        refuse("rope_parameters", "only the axial 2D rotary embedding is supported")
    width = field(fam.vit_width_field)
    heads = field("num_heads")
    if heads <= 0 or width % heads or (width // heads) % 4:
        refuse("num_heads", f"the head dim ({fam.vit_width_field} / num_heads) must be a multiple of 4")
    depth = field("depth")
    kwargs = dict(
        model_type=family_name,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        out_hidden_size=field(fam.merger_width_field),
        in_channels=field("in_channels"),
        patch_size=_scalar(field("patch_size")),
        temporal_patch_size=_scalar(field("temporal_patch_size")),
        spatial_merge_size=field("spatial_merge_size"),
        hidden_act=act,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if fam.mlp_width_field == "mlp_ratio":
        kwargs["mlp_ratio"] = field("mlp_ratio")
    else:
        kwargs["intermediate_size"] = field(fam.mlp_width_field)
    if fam.windows:
        window = field("window_size")
        if window // kwargs["spatial_merge_size"] // kwargs["patch_size"] < 1:
            refuse("window_size", "smaller than one merged token (patch_size * spatial_merge_size px)")
        kwargs["window_size"] = window
        # transformers compares each block index against this list: entries past the depth do nothing
        kwargs["fullatt_block_indexes"] = tuple(
            sorted({i for i in field("fullatt_block_indexes") if 0 <= i < depth})
        )
    for theirs, ours in fam.field_renames.items():  # fields the family's releases name their own way
        if hasattr(vc, theirs):
            for target in (ours,) if isinstance(ours, str) else ours:
                kwargs[target] = getattr(vc, theirs)
    if fam.position_table and fam.position_field == "image_size":  # one entry per patch of the image
        kwargs["num_position_embeddings"] = (_scalar(field("image_size")) // kwargs["patch_size"]) ** 2
    elif fam.position_table:
        n = field("num_position_embeddings")
        if int(n**0.5) ** 2 != n:
            refuse("num_position_embeddings", "the learned position table must be a square grid")
        kwargs["num_position_embeddings"] = n
    if fam.deepstack:
        indexes = list(field("deepstack_visual_indexes"))
        if len(set(indexes)) != len(indexes) or any(not 0 <= i < depth for i in indexes):
            refuse("deepstack_visual_indexes", f"entries must be distinct blocks 0..{depth - 1}")
        kwargs["deepstack_visual_indexes"] = tuple(indexes)
    try:
        return VisionConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"vision_config cannot be expressed by nativevit: {e}") from e


def _scalar(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _share_parameters(ours: nn.Module, theirs: nn.Module, where: str, rename=None) -> None:
    """Make every parameter of ``ours`` the ``nn.Parameter`` object of ``theirs`` with the same name
    (``rename`` maps a name of ``theirs`` to ours; default the identity)."""
    mine = dict(ours.named_parameters())
    their = {(rename(k) if rename else k): p for k, p in theirs.named_parameters()}
    missing = sorted(mine.keys() - their.keys())
    extra = sorted(their.keys() - mine.keys())
    shapes = [
        f"{k}: {tuple(their[k].shape)} vs {tuple(mine[k].shape)}"
        for k in mine.keys() & their.keys()
        if mine[k].shape != their[k].shape
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"{where}: the tower's parameters do not map onto nativevit's (a vision_config setting it "
            f"cannot express?): missing {missing[:5]}, unexpected {extra[:5]}, shapes {sorted(shapes)[:5]}"
        )
    for key, param in their.items():
        owner, _, leaf = key.rpartition(".")
        setattr(ours.get_submodule(owner), leaf, param)
    _same_order(ours, theirs)


def share_release_parameters(tower: NativeViT, hf_tower: nn.Module, names=None) -> None:
    """Make ``tower``'s parameters those of the transformers tower ``hf_tower`` (its family's release
    names, ``Family.key_renames``) and keep the release's names in ``state_dict`` / ``load_state_dict``,
    so that the swapped model saves and loads its original keys. ``names``: an object with
    ``model_key`` / ``release_key`` to use instead of the family's (a tower whose transformers names are
    not its release's, Kimi-K2.5)."""
    fam = names if names is not None else tower.config.family
    order = {k: i for i, k in enumerate(hf_tower.state_dict())}  # transformers' key order
    _share_parameters(tower, hf_tower, type(hf_tower).__name__, fam.model_key)
    if names is None and not fam.key_renames:
        return

    def to_release(module, state, prefix, local_metadata):
        ours = [k for k in state if k.startswith(prefix)]
        mine = {fam.release_key(k[len(prefix) :]): state.pop(k) for k in ours}
        for key in sorted(mine, key=lambda k: order.get(k, len(order))):
            state[prefix + key] = mine[key]

    def from_release(state, prefix, *args):
        for key in [k for k in state if k.startswith(prefix)]:
            state[prefix + fam.model_key(key[len(prefix) :])] = state.pop(key)

    tower._register_state_dict_hook(to_release)
    tower._register_load_state_dict_pre_hook(from_release)


def _same_order(ours: nn.Module, theirs: nn.Module) -> None:
    """Register children and parameters in transformers' order, so that ``state_dict()`` and
    ``named_parameters()`` list the same keys in the same order as before the swap."""
    for attr in ("_modules", "_parameters"):
        mine, their = getattr(ours, attr), getattr(theirs, attr)
        order = [k for k in their if k in mine] + [k for k in mine if k not in their]
        setattr(ours, attr, {k: mine[k] for k in order})
    for name, child in ours._modules.items():
        if name in theirs._modules and child is not None:
            _same_order(child, theirs._modules[name])


class QwenVisionTower(NativeViT):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL tower of a transformers model, run by nativevit.

    A ``NativeViT`` (``forward_features``, ``plan``, the ``NativeViT`` forward as :meth:`encode`) whose
    parameters are the transformers tower's, presenting that tower's interface to the model:
    ``forward(hidden_states, grid_thw)`` -> transformers' output class, ``dtype``, ``device``,
    ``spatial_merge_size``; ``hf_config`` is the transformers vision config (``config`` stays
    nativevit's ``VisionConfig``).
    """

    # how transformers names the tower's parameters, when not as its release does (Kimi-K2.5)
    release_names = None

    @classmethod
    def release_config(cls, hf_tower: nn.Module, family_name: str) -> VisionConfig:
        """The ``VisionConfig`` of ``hf_tower`` (its transformers config), a tower of ``family_name``."""
        return qwen_vision_config(hf_tower.config, family_name)

    @classmethod
    def from_transformers(
        cls, hf_tower: nn.Module, family_name: str | None = None, *, attn_backend: str = "auto"
    ):
        """The adapter over ``hf_tower``'s own parameters (built on the meta device, then shared);
        ``family_name``: the nativevit family (the adapters of one family know theirs)."""
        cfg = cls.release_config(hf_tower, *([family_name] if family_name else []))
        with torch.device("meta"):
            tower = cls(cfg, attn_backend=attn_backend)
        share_release_parameters(tower, hf_tower, cls.release_names)
        tower.hf_config = hf_tower.config
        tower._output_class = _output_class(hf_tower)
        tower._prefetched = _Prefetched()
        tower.train(hf_tower.training)
        return tower

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        """``NativeViT.forward``: merged tokens (and DeepStack tokens with ``return_deepstack=True``)."""
        return NativeViT.forward(self, pixel_values, grid_thw, **kwargs)

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        """transformers' tower forward: ``(N, C*T*P*P)`` patch rows and ``(B, 3)`` grids -> its output."""
        return_dict = kwargs.pop("return_dict", True)
        record = _recording(kwargs, self.hf_config)
        out = None if record else self._prefetched.take(hidden_states, grid_thw, None)
        if out is None:
            out = self._compute(hidden_states, grid_thw, record)
        return out if return_dict or return_dict is None else out.to_tuple()

    def prefetch(self, calls: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Encode the ``(pixels, grid)`` of several coming calls as one packed batch; each call then gets
        its own rows of the result."""
        calls = list(calls)
        out = self._compute(torch.cat([p.to(self.dtype) for p, _ in calls]), torch.cat([g for _, g in calls]))
        rows = [int(g.prod(-1).sum()) for _, g in calls]
        merged = [n // self.config.merge_unit for n in rows]
        reduced = out.last_hidden_state.shape[0] != sum(rows)  # GLM: one row per merged token
        last = torch.split(out.last_hidden_state, merged if reduced else rows)
        pooled = torch.split(out.pooler_output, merged)
        deep = [torch.split(d, merged) for d in getattr(out, "deepstack_features", None) or []]
        for i, (pixels, grid) in enumerate(calls):
            fields = dict(last_hidden_state=last[i], pooler_output=pooled[i])
            if hasattr(out, "deepstack_features"):
                fields["deepstack_features"] = [d[i] for d in deep]
            self._prefetched.put(pixels, grid, None, self._output_class(**fields))

    def _compute(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, record=None):
        plan = self.plan(grid_thw, device=pixel_values.device)
        deepstack = bool(self.config.deepstack_visual_indexes)
        hooks, states = self._record_blocks(record)
        try:
            x, deep = self._encode(pixel_values, grid_thw, plan, None, deepstack=deepstack)
        finally:
            for h in hooks:
                h.remove()
        reduce = getattr(self.merger, "reduce", None)
        if reduce is not None:  # GLM: transformers' last_hidden_state is the merger's downsampling
            x = reduce(x)
            tokens = self.merger.head(x)
        else:
            tokens = self.merger(x)
        if plan.windows is not None:
            x = x.index_select(0, plan.windows.order)  # transformers leaves it in window order
        fields = dict(last_hidden_state=x, pooler_output=tokens)
        if deepstack or "deepstack_features" in self._output_class.__dataclass_fields__:
            fields["deepstack_features"] = deep
        if record is not None:
            fields["hidden_states"] = _selected(_block_rows(states, plan), record, self.config.depth)
        return self._output_class(**fields)

    def _record_blocks(self, record):
        """Hooks keeping every block's input (the first) and output, as transformers' hidden_states."""
        states: list[torch.Tensor] = []
        if record is None:
            return [], states

        def first(module, args):
            if not states:
                states.append(args[0])

        def output(module, args, out):
            states.append(out)

        hooks = [self.blocks[0].register_forward_pre_hook(first)] if len(self.blocks) else []
        hooks += [blk.register_forward_hook(output) for blk in self.blocks]
        return hooks, states


def _block_rows(states: list[torch.Tensor], plan: BatchPlan) -> list[torch.Tensor]:
    """Blocks' rows of the padded baseline -> real rows (window order kept, as transformers has it)."""
    return [unpad_segments(s, plan.segments) for s in states] if plan.padded else states


def _output_class(hf_tower: nn.Module):
    """The output class transformers' tower returns (Qwen3-VL: with ``deepstack_features``)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    module = sys.modules[type(hf_tower).__module__]
    if getattr(hf_tower.config, "deepstack_visual_indexes", None) is not None:
        return getattr(module, "BaseModelOutputWithDeepstackFeatures", BaseModelOutputWithPooling)
    return BaseModelOutputWithPooling


def _recording(kwargs: dict, config) -> bool | list[int] | None:
    """What a tower call asks to record: None, True (all hidden states) or the hidden-state indices;
    ``ValueError`` for attention weights, which packed varlen attention never materialises."""
    attentions = kwargs.get("output_attentions", getattr(config, "output_attentions", False))
    if attentions:
        raise ValueError(
            "output_attentions: the nativevit tower runs block-diagonal varlen attention and has no "
            "attention weights to return"
        )
    hidden = kwargs.get("output_hidden_states")
    if hidden is None:
        hidden = getattr(config, "output_hidden_states", False)
    if hidden is None or hidden is False:
        return None
    if hidden is True:
        return True
    return [hidden] if isinstance(hidden, int) else list(hidden)


def _resolve(record, depth: int) -> set[int]:
    """The non-negative ``hidden_states`` indices (of ``depth + 1``) that ``record`` selects; indices out
    of range select nothing, as in transformers."""
    n = depth + 1
    if record is True:
        return set(range(n))
    return {i % n for i in record if -n <= i < n}


def _selected(states: list[torch.Tensor], record, depth: int) -> tuple:
    keep = _resolve(record, depth)
    return tuple(s if i in keep else None for i, s in enumerate(states))


# ----------------------------------------------------------------------------- Pixtral


def release_vision_config(vc, family_name: str, names: tuple[str, ...], **kwargs) -> VisionConfig:
    """The ``VisionConfig`` of a transformers vision config object, read through the family table as a
    release's ``vision_config`` from its fields ``names`` (those set); ``ValueError`` naming what
    nativevit cannot express. ``kwargs`` go to ``VisionConfig.from_hf_dict``."""
    fields = {name: getattr(vc, name) for name in names if getattr(vc, name, None) is not None}
    try:
        return VisionConfig.from_hf_dict(fields, model_type=family_name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"vision_config cannot be expressed by nativevit: {e}") from e


def pixtral_vision_config(vc) -> VisionConfig:
    """The ``VisionConfig`` of a transformers ``PixtralVisionConfig``."""
    names = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "patch_size",
        "hidden_act",
        "rope_parameters",
    )
    return release_vision_config(vc, "pixtral", names)


class PixtralVisionTower(QwenVisionTower):
    """A Pixtral tower of a transformers model (Mistral 3, or LLaVA with a Pixtral vision config), run
    packed by nativevit, with the parameters of the transformers tower.

    It keeps ``PixtralVisionModel``'s interface: ``forward(pixel_values (B, C, H, W), image_sizes (B, 2))``
    over images zero-padded to one size, each cut to its ``image_sizes`` (floored to whole patches) ->
    ``BaseModelOutputWithPooling`` with ``last_hidden_state`` ``(1, N, D)`` (every image's patches in
    raster order, one after the other) and the requested ``hidden_states``; ``patch_size``, ``dtype``.
    """

    @classmethod
    def release_config(cls, hf_tower: nn.Module, family_name: str = "pixtral") -> VisionConfig:
        return pixtral_vision_config(hf_tower.config)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def patch_rows(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(B, C, H, W)`` images and their ``(height, width)`` -> ``(N, C*P*P)`` patch rows in
        raster order and the ``(B, 3)`` grid ``(1, height // P, width // P)``."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = getattr(pixel_values, "shape", type(pixel_values))
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}")
        b, c, H, W = pixel_values.shape
        sizes = [(H, W)] * b if image_sizes is None else [(int(h), int(w)) for h, w in image_sizes]
        if len(sizes) != b or any(not (0 < h <= H and 0 < w <= W) for h, w in sizes):
            raise ValueError(f"image_sizes {sizes} do not fit {b} images of {H}x{W} px")
        p = self.config.patch_size
        rows, grid = [], []
        for image, (h, w) in zip(pixel_values, sizes):
            gh, gw = h // p, w // p
            patches = image[:, : gh * p, : gw * p].reshape(c, gh, p, gw, p)
            rows.append(patches.permute(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p))  # (gh*gw, C*P*P)
            grid.append((1, gh, gw))
        return torch.cat(rows), torch.tensor(grid, dtype=torch.int64)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs):
        """transformers' Pixtral forward: padded images and their sizes -> its output."""
        return_dict = kwargs.pop("return_dict", True)
        record = _recording(kwargs, self.hf_config)
        rows, grid = self.patch_rows(pixel_values, image_sizes)
        plan = self.plan(grid, device=rows.device)
        depth = self.config.depth
        keep = _resolve(record, depth) if record is not None else set()
        hooks, states = self._keep_states(keep - {depth})
        try:
            x, _ = self._encode(rows, grid, plan, None, deepstack=False)
        finally:
            for h in hooks:
                h.remove()
        fields = dict(last_hidden_state=x[None])
        if record is not None:
            states = {i: unpad_segments(s, plan.segments) if plan.padded else s for i, s in states.items()}
            states[depth] = x  # transformers ties the last hidden state to last_hidden_state
            fields["hidden_states"] = tuple(states[i][None] if i in keep else None for i in range(depth + 1))
        out = self._output_class(**fields)
        return out if return_dict or return_dict is None else out.to_tuple()

    def _keep_states(self, keep: set[int]):
        """Hooks keeping the hidden states ``keep`` selects (0: the first block's input, ``i``: block
        ``i - 1``'s output), and only those (Mistral 3 asks for one)."""
        states: dict[int, torch.Tensor] = {}

        def first(module, args) -> None:
            states[0] = args[0]

        def output(i: int):
            def hook(module, args, out) -> None:
                states[i] = out

            return hook

        hooks = [self.blocks[0].register_forward_pre_hook(first)] if 0 in keep and len(self.blocks) else []
        hooks += [blk.register_forward_hook(output(i)) for i, blk in enumerate(self.blocks, 1) if i in keep]
        return hooks, states


# ----------------------------------------------------------------------------- PaddleOCR-VL


def paddleocr_vision_config(vc) -> VisionConfig:
    """The ``VisionConfig`` of a transformers ``PaddleOCRVisionConfig``."""
    names = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "rope_parameters",
    )
    return release_vision_config(vc, "paddleocr_vl", names)


class PaddleOCRVisionTower(QwenVisionTower):
    """PaddleOCR-VL's ``PaddleOCRVisionModel`` (``model.visual``), run packed by nativevit with the
    parameters of the transformers tower.

    It keeps that tower's interface: ``forward(pixel_values (1, N, C, P, P), grid_thw (B, 3))`` (patch rows
    in raster order, as the processor gives them) -> ``BaseModelOutputWithPooling`` with
    ``last_hidden_state`` ``(N, D)`` (after ``post_layernorm``; ``pooler_output`` None: the 2x2 merge is
    the model's ``projector``, which stays transformers') and the requested ``hidden_states``; ``dtype``.
    """

    @classmethod
    def release_config(cls, hf_tower: nn.Module, family_name: str = "paddleocr_vl") -> VisionConfig:
        return paddleocr_vision_config(hf_tower.config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None, **kwargs):
        """transformers' PaddleOCR-VL tower forward: ``(..., C, P, P)`` patches and their grids -> its
        output."""
        if grid_thw is None:
            raise ValueError("grid_thw is required: the tower runs one packed batch of native-size images")
        return_dict = kwargs.pop("return_dict", True)
        record = _recording(kwargs, self.hf_config)
        rows = pixel_values.reshape(-1, self.config.patch_dim)  # (N, C*P*P), the Conv2d's flattening
        plan = self.plan(grid_thw, device=rows.device)
        hooks, states = self._record_blocks(record)
        try:
            x, _ = self._encode(rows, grid_thw, plan, None, deepstack=False)
        finally:
            for h in hooks:
                h.remove()
        fields = dict(last_hidden_state=x, pooler_output=None)
        if record is not None:
            fields["hidden_states"] = _selected(_block_rows(states, plan), record, self.config.depth)
        out = self._output_class(**fields)
        return out if return_dict or return_dict is None else out.to_tuple()


# ----------------------------------------------------------------------------- SigLIP2 NaFlex


def siglip2_vision_config(vc) -> VisionConfig:
    """The ``VisionConfig`` of a transformers ``Siglip2VisionConfig``."""
    names = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "num_patches",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "vision_use_head",
    )
    return release_vision_config(vc, "siglip2", names)


class Siglip2VisionTower(QwenVisionTower):
    """A ``Siglip2VisionModel`` (Siglip2Model's ``vision_model``, LFM2-VL's ``vision_tower``) run packed
    by nativevit, with the parameters of the transformers tower, its attention-pooling ``head`` (when the
    config has ``vision_use_head``) included.

    It keeps that model's interface: ``forward(pixel_values (B, L, P*P*C), pixel_attention_mask (B, L),
    spatial_shapes (B, 2))``, each image's first ``h * w`` rows being its patches in raster order (the
    rest padding) -> ``BaseModelOutputWithPooling`` with ``last_hidden_state`` ``(B, L, D)`` (after
    ``post_layernorm``; padding rows are zeros, transformers leaves values there that nothing reads),
    ``pooler_output`` ``(B, D)`` from the head (None without one) and the requested ``hidden_states``
    (padded the same way). Only the real patches go through the blocks and the head.
    """

    @classmethod
    def release_config(cls, hf_tower: nn.Module, family_name: str = "siglip2") -> VisionConfig:
        return siglip2_vision_config(hf_tower.config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs,
    ):
        """transformers' Siglip2VisionModel forward: padded patch rows, their mask and grids -> its output."""
        if spatial_shapes is None:
            raise ValueError("spatial_shapes is required: it gives each image's (height, width) in patches")
        return_dict = kwargs.pop("return_dict", True)
        record = _recording(kwargs, self.hf_config)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3:
            shape = getattr(pixel_values, "shape", type(pixel_values))
            raise ValueError(f"pixel_values must be a (batch, patches, P*P*C) tensor, got {shape}")
        b, length, _ = pixel_values.shape
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        counts = [h * w for h, w in shapes]
        if len(shapes) != b or any(not 0 < n <= length for n in counts):
            raise ValueError(f"spatial_shapes {shapes} do not fit {b} images of {length} patch rows")
        if pixel_attention_mask is not None and pixel_attention_mask.sum(-1).tolist() != counts:
            raise ValueError(
                "pixel_attention_mask must mark each image's first h*w rows (spatial_shapes) as its patches"
            )
        real = torch.cat([torch.arange(n) + i * length for i, n in enumerate(counts)]).to(pixel_values.device)
        rows = pixel_values.reshape(b * length, -1).index_select(0, real)  # (N, P*P*C)
        grid = torch.tensor([(1, h, w) for h, w in shapes], dtype=torch.int64)
        plan = self.plan(grid, device=rows.device)
        hooks, states = self._record_blocks(record)
        try:
            x, _ = self._encode(rows, grid, plan, None, deepstack=False)
        finally:
            for h in hooks:
                h.remove()

        def padded(t: torch.Tensor) -> torch.Tensor:  # (N, D) real rows -> (B, L, D), zeros elsewhere
            return t.new_zeros(b * length, t.shape[-1]).index_copy(0, real, t).view(b, length, -1)

        pooled = None if self.head is None else self.pool(x, grid)
        fields = dict(last_hidden_state=padded(x), pooler_output=pooled)
        if record is not None:
            kept = _selected(_block_rows(states, plan), record, self.config.depth)
            fields["hidden_states"] = tuple(None if t is None else padded(t) for t in kept)
        out = self._output_class(**fields)
        return out if return_dict or return_dict is None else out.to_tuple()


# ----------------------------------------------------------------------------- CLIP / SigLIP / InternViT


class TransformersVisionTower(TransformersPackedEncoder):
    """A LLaVA / LLaVA-NeXT / LLaVA-OneVision / InternVL vision tower, run packed.

    The children are the transformers vision model's (same keys); ``forward`` has its interface:
    ``(B, C, H, W)`` pixels -> transformers' output with ``last_hidden_state``, ``pooler_output`` and the
    requested ``hidden_states`` (``None`` where not selected). When only some hidden states are asked
    for (the VLM's ``vision_feature_layer``), only the layers up to the deepest of them run, and
    ``last_hidden_state`` / ``pooler_output`` are None unless that is the last layer.
    """

    def __init__(self, vision_model: nn.Module, *, attn_backend: str = "auto"):
        super().__init__(vision_model, attn_backend=attn_backend)
        self._output_class = _vit_output_class(self.kind)
        self._prefetched = _Prefetched()

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """transformers' vision model forward over ``(B, C, H, W)`` pixels (tiles / frames of one size)."""
        if bool_masked_pos is not None:
            raise ValueError(
                "bool_masked_pos (masked image modelling) is not supported by the nativevit tower"
            )
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            )
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}")
        record = _recording(kwargs, self.config)
        settings = (_key(record), bool(interpolate_pos_encoding))
        out = self._prefetched.take(pixel_values, None, settings)
        if out is None:
            out = self._compute(pixel_values, record, bool(interpolate_pos_encoding))
        return out if return_dict or return_dict is None else out.to_tuple()

    def prefetch(self, calls: Iterable[tuple[torch.Tensor, object]]) -> None:
        """Encode the pixels of several coming calls (each ``(pixels, output_hidden_states)``) as one
        packed batch; each call then gets its own rows of the result."""
        calls = list(calls)
        records = {_key(_recording({"output_hidden_states": sel}, self.config)) for _, sel in calls}
        if len(records) != 1 or len({p.shape[1:] for p, _ in calls}) != 1:
            return  # different settings or sizes: each call runs on its own
        record = _recording({"output_hidden_states": calls[0][1]}, self.config)
        out = self._compute(torch.cat([p.to(self.dtype) for p, _ in calls]), record, False)
        sizes = [p.shape[0] for p, _ in calls]
        for i, (pixels, _) in enumerate(calls):
            start = sum(sizes[:i])

            def part(t, start=start, n=sizes[i]):
                return None if t is None else t[start : start + n]

            fields = dict(
                last_hidden_state=part(out.last_hidden_state), pooler_output=part(out.pooler_output)
            )
            if out.hidden_states is not None:
                fields["hidden_states"] = tuple(part(s) for s in out.hidden_states)
            self._prefetched.put(pixels, None, (_key(record), False), self._output_class(**fields))

    def _compute(self, pixel_values: torch.Tensor, record, interpolate: bool):
        b, _, H, W = pixel_values.shape
        side = self._native_side()
        if self.kind != "internvl" and not interpolate and (H, W) != (side, side):
            raise ValueError(
                f"Input image size ({H}*{W}) doesn't match model ({side}*{side}); pass "
                "interpolate_pos_encoding=True to resample the position embeddings"
            )
        keep = _resolve(record, self.depth) if record is not None else set()
        stop = self.depth if record is None or record is True else max(keep, default=0)
        last, states, segments = self.encode_rows(
            self._rows(pixel_values), [(H, W)] * b, hidden_states=keep, stop=stop
        )
        n = segments.lengths[0]

        def batched(x):
            return x.view(b, n, x.shape[-1])  # every image of a call has the same size

        fields = dict(last_hidden_state=None, pooler_output=None)
        if last is not None:
            fields["last_hidden_state"] = last = batched(last)
            fields["pooler_output"] = self._pool(last)
        if record is not None:
            fields["hidden_states"] = tuple(
                batched(states[i]) if i in states else None for i in range(self.depth + 1)
            )
        return self._output_class(**fields)

    def _native_side(self) -> int:
        size = self.config.image_size
        return size[0] if isinstance(size, (list, tuple)) else size

    def _pool(self, last: torch.Tensor) -> torch.Tensor | None:
        """transformers' ``pooler_output``: CLIP's normed class token, SigLIP's attention-pooling head."""
        if self.kind == "clip":
            return self.post_layernorm(last[:, 0])
        if self.kind == "siglip" and getattr(self, "head", None) is not None:
            return self.head(last)
        return None


def _vit_output_class(kind: str):
    if kind == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLVisionModelOutputWithPooling

        return InternVLVisionModelOutputWithPooling
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling


def _key(record) -> object:
    return tuple(record) if isinstance(record, list) else record


# ----------------------------------------------------------------------------- ERNIE-4.5-VL


def ernie_vision_config(config) -> VisionConfig:
    """The ``VisionConfig`` (tower and resampler) of a transformers ``Ernie4_5_VLMoeConfig``;
    ``ValueError`` naming the field nativevit cannot express."""
    vc, tc = config.vision_config, config.text_config
    if getattr(vc, "temporal_merge_size", 2) != VariableResolutionResampler.temporal:
        raise ValueError(
            f"vision_config.temporal_merge_size={vc.temporal_merge_size!r}: the resampler pairs frames "
            "(transformers' own pairing is written for 2)"
        )
    names = (
        "depth",
        "hidden_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "spatial_merge_size",
        "hidden_act",
        "intermediate_size",
        "rms_norm_eps",
        "rope_parameters",
    )
    text = {"hidden_size": tc.hidden_size, "rms_norm_eps": tc.rms_norm_eps}
    return release_vision_config(vc, "ernie4_5_vl_moe", names, text_config=text)


class ErnieVisionTower(QwenVisionTower):
    """ERNIE-4.5-VL's tower of a transformers model, run by nativevit: transformers' interface
    (``forward(hidden_states, grid_thw)`` -> ``last_hidden_state``, the rows after the final norm).

    The resampler is the model's own module beside the tower (``resampler_model``, swapped for an
    :class:`ErnieResampler`), so this tower ends at its final norm: its ``merger`` is the identity and
    ``encode`` returns the final states.
    """

    @classmethod
    def from_transformers(cls, config, hf_tower: nn.Module, *, attn_backend: str = "auto"):
        cfg = ernie_vision_config(config)
        with torch.device("meta"):
            tower = cls(cfg, attn_backend=attn_backend)
        tower.merger = nn.Identity()
        share_release_parameters(tower, hf_tower)
        tower.hf_config = hf_tower.config
        tower._output_class = _output_class(hf_tower)
        tower._prefetched = _Prefetched()
        tower.train(hf_tower.training)
        return tower

    def prefetch(self, calls: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        calls = list(calls)
        out = self._compute(torch.cat([p.to(self.dtype) for p, _ in calls]), torch.cat([g for _, g in calls]))
        rows = [int(g.prod(-1).sum()) for _, g in calls]
        for (pixels, grid), last in zip(calls, torch.split(out.last_hidden_state, rows)):
            self._prefetched.put(pixels, grid, None, self._output_class(last_hidden_state=last))

    def _compute(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, record=None):
        plan = self.plan(grid_thw, device=pixel_values.device)
        hooks, states = self._record_blocks(record)
        try:
            x, _ = self._encode(pixel_values, grid_thw, plan, None, deepstack=False)
        finally:
            for h in hooks:
                h.remove()
        fields = dict(last_hidden_state=x)
        if record is not None:
            fields["hidden_states"] = _selected(_block_rows(states, plan), record, self.config.depth)
        return self._output_class(**fields)


class ErnieResampler(VariableResolutionResampler):
    """ERNIE-4.5-VL's resampler with transformers' interface, ``forward(hidden_states, grid_thw)``, and
    the parameters (and names) of the transformers module it replaces."""

    @classmethod
    def from_transformers(cls, config, hf_resampler: nn.Module) -> ErnieResampler:
        cfg = ernie_vision_config(config)
        with torch.device("meta"):
            ours = cls(**merger_arguments(cfg))
        _share_parameters(ours, hf_resampler, type(hf_resampler).__name__)
        ours.train(hf_resampler.training)
        return ours

    @property
    def spatial_merge_size(self) -> int:
        return math.isqrt(self.unit)

    @property
    def temporal_merge_size(self) -> int:
        return self.temporal

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.resample(hidden_states, [tuple(g) for g in grid_thw.tolist()])


# ----------------------------------------------------------------------------- Kimi-K2.5


def kimi_vision_config(vc) -> VisionConfig:
    """The ``VisionConfig`` of a transformers ``Kimi_K25VisionConfig`` (read through the family table, as
    a release's ``vision_config``), in transformers' in-memory layout: separate q/k/v whose features
    transformers already permuted to rotate-half pairs."""
    cfg = release_vision_config(vc, "kimi_k25", _KIMI_FIELDS)
    return dataclasses.replace(cfg, qkv="separate", rope_pairs="half")


_KIMI_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "hidden_act",
    "merge_kernel_size",
    "pos_emb_height",
    "pos_emb_width",
    "pos_emb_time",
    "rope_parameters",
)


class _KimiNames:
    """transformers' in-memory names of a Kimi-K2.5 tower (``layers.{i}``, ``final_layernorm``,
    ``patch_embed.pos_emb.position_embeddings``) <-> this model's."""

    _PAIRS = (
        ("blocks.", "layers."),
        ("post_norm.", "final_layernorm."),
        ("pos_embed.weight", "patch_embed.pos_emb.position_embeddings"),
    )

    @classmethod
    def model_key(cls, key: str) -> str:
        for ours, theirs in cls._PAIRS:
            if key.startswith(theirs):
                return ours + key[len(theirs) :]
        return key

    @classmethod
    def release_key(cls, key: str) -> str:
        for ours, theirs in cls._PAIRS:
            if key.startswith(ours):
                return theirs + key[len(ours) :]
        return key


def block_order(grid: list[tuple[int, int, int]], merge_size: int) -> torch.Tensor:
    """``(N,)`` int64: raster row of each row in merge-block order (``rows_block = rows_raster[index]``)."""
    index, offset = [], 0
    for t, h, w in grid:
        m = merge_size
        frames = torch.arange(t * h * w).view(t, h // m, m, w // m, m).permute(0, 1, 3, 2, 4).reshape(-1)
        index.append(frames + offset)
        offset += t * h * w
    return torch.cat(index)


class KimiVisionTower(QwenVisionTower):
    """Kimi-K2.5's ``Kimi_K25VisionModel`` (``model.vision_tower``), run packed by nativevit with the
    parameters of the transformers tower.

    It keeps that tower's interface: ``forward(pixel_values (N, C, P, P), grid_thw (B, 3))`` (patch rows in
    raster order, as transformers' processor gives them) -> ``BaseModelOutputWithPooling`` with
    ``last_hidden_state`` ``(N, D)`` (raster order) and ``pooler_output`` ``(N_frame / 4, 4, D)`` (each clip's
    frames averaged, 2x2 patches grouped; the projector stays transformers') and the requested
    ``hidden_states``; ``merge_kernel_size``, ``dtype``. The rows run in merge-block order inside (one
    gather in, one out), so the merge is a view.
    """

    release_names = _KimiNames

    @classmethod
    def release_config(cls, hf_tower: nn.Module, family_name: str = "kimi_k25") -> VisionConfig:
        return kimi_vision_config(hf_tower.config)

    @property
    def merge_kernel_size(self) -> tuple[int, int]:
        return (self.config.spatial_merge_size,) * 2

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None, **kwargs):
        """transformers' Kimi-K2.5 tower forward: ``(N, C, P, P)`` raster patches and grids -> its output."""
        if grid_thw is None:
            raise ValueError("grid_thw is required: the tower runs one packed batch of native-size clips")
        return_dict = kwargs.pop("return_dict", True)
        record = _recording(kwargs, self.hf_config)
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        order = block_order(grid, self.config.spatial_merge_size).to(pixel_values.device)
        rows = pixel_values.reshape(-1, self.config.patch_dim).index_select(0, order)  # (N, C*P*P), blocks
        plan = self.plan(grid_thw, device=rows.device)
        hooks, states = self._record_blocks(record)
        try:
            x, _ = self._encode(rows, grid_thw, plan, None, deepstack=False)
        finally:
            for h in hooks:
                h.remove()
        tokens = self.merge(x, plan)
        raster = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        fields = dict(
            last_hidden_state=x.index_select(0, raster),
            pooler_output=tokens.view(tokens.shape[0], self.config.merge_unit, -1),
        )
        if record is not None:
            kept = _selected(_block_rows(states, plan), record, self.config.depth)
            kept = [None if h is None else h.index_select(0, raster) for h in kept]
            tie = getattr(self.hf_config, "tie_last_hidden_states", None) is not False
            if kept and kept[-1] is not None and tie:
                kept[-1] = fields["last_hidden_state"]  # transformers' last entry is after final_layernorm
            fields["hidden_states"] = tuple(kept)
        out = self._output_class(**fields)
        return out if return_dict or return_dict is None else out.to_tuple()
