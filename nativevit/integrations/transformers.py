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

import sys
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..config import FAMILIES, VisionConfig
from ..model import NativeViT
from ..packing import BatchPlan, unpad_segments
from .hf_vit import SUPPORTED_VISION_MODELS, TransformersPackedEncoder

__all__ = ["QwenVisionTower", "SUPPORTED_MODELS", "TransformersVisionTower", "swap_vision_tower"]

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
    inner = model.model
    if how == "qwen":
        tower = inner.visual
        if isinstance(tower, QwenVisionTower):
            tower.attn_backend = attn_backend
            return model
        new = QwenVisionTower.from_transformers(tower, family_name, attn_backend=attn_backend)
        inner.visual = new
        _install_prefetch(inner, "visual", _qwen_calls)
        return model
    tower = inner.vision_tower
    if isinstance(tower, TransformersVisionTower):
        tower.attn_backend = attn_backend
        return model
    kind = type(tower).__name__
    if kind not in SUPPORTED_VISION_MODELS:
        model_type = getattr(getattr(model.config, "vision_config", None), "model_type", None)
        raise ValueError(
            f"{name}: vision_config.model_type={model_type!r} ({kind}) is not supported; nativevit runs "
            f"{', '.join(SUPPORTED_VISION_MODELS)} towers"
        )
    new = TransformersVisionTower(tower, attn_backend=attn_backend)
    inner.vision_tower = new
    if name == "LlavaOnevisionForConditionalGeneration":
        _install_prefetch(inner, "vision_tower", _onevision_calls)
    return model


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
    if fam.position_table:
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


def share_release_parameters(tower: NativeViT, hf_tower: nn.Module) -> None:
    """Make ``tower``'s parameters those of the transformers tower ``hf_tower`` (its family's release
    names, ``Family.key_renames``) and keep the release's names in ``state_dict`` / ``load_state_dict``,
    so that the swapped model saves and loads its original keys."""
    fam = tower.config.family
    _share_parameters(tower, hf_tower, type(hf_tower).__name__, fam.model_key)
    if not fam.key_renames:
        return

    def to_release(module, state, prefix, local_metadata):
        for key in [k for k in state if k.startswith(prefix)]:
            state[prefix + fam.release_key(key[len(prefix) :])] = state.pop(key)

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

    @classmethod
    def from_transformers(cls, hf_tower: nn.Module, family_name: str, *, attn_backend: str = "auto"):
        cfg = qwen_vision_config(hf_tower.config, family_name)
        with torch.device("meta"):
            tower = cls(cfg, attn_backend=attn_backend)
        share_release_parameters(tower, hf_tower)
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
        last = torch.split(out.last_hidden_state, rows)
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
