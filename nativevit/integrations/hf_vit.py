"""transformers CLIP / SigLIP / InternViT vision models as packed native-resolution encoders.

    enc = nv.from_transformers(vision_model)         # CLIPVisionModel, SiglipVisionModel, InternVLVisionModel
    feats = enc.forward_images([img_a, img_b, ...])  # one (tokens, dim) tensor per normalised (3, H, W) image
    llava = nv.from_transformers(clip, layer=-2)     # hidden_states[-2]: LLaVA's feature layer

Every image keeps its own patch grid; all of them go through the encoder as ONE packed varlen batch,
one attention segment per image (its class token included), through ``nativevit.ops.varlen_attention``.
Nothing is copied: the encoder's children ARE the transformers model's children (``embeddings``,
``encoder``, the norms, SigLIP's ``head``), under the same names, so its ``state_dict`` has the
transformers keys and parameters are shared. Their own modules (norms, MLPs, q/k/v projections, layer
scales, qk-norms) run on packed ``(tokens, dim)`` rows; only the attention core is replaced.

Position tables are resampled per image size by the transformers module's own
``interpolate_pos_encoding``, so ``forward_images([img])[0]`` equals the transformers model run on that
image alone with ``interpolate_pos_encoding=True`` (InternViT always interpolates), batch dimension
dropped. Like the transformers patch convolution, a side that is not a multiple of the patch size
loses its remainder (OneVision's SigLIP sees 384 px as 27 patches of 14 px: 6 px are not seen).

``layer`` counts as transformers' ``hidden_states`` (and a VLM's ``vision_feature_layer``) do:
0 is the embedding output (after CLIP's ``pre_layrnorm``), k the output of encoder layer k-1,
negative from the end (-1: the last layer, -2: LLaVA's penultimate). Those states are un-normed, as
in transformers; ``layer=None`` gives ``last_hidden_state`` (SigLIP's ``post_layernorm`` and
InternViT's final ``layernorm`` applied; CLIP's last state has none).

Refused with the part named: other vision model classes, layers or attention modules of another
class (a subclass that changes them), and, in training mode, attention dropout (varlen attention has
none). Hidden dropout is elementwise and runs as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..backends.registry import check_backend_name
from ..packing import Segments, plan_batch

__all__ = ["TransformersPackedEncoder", "from_transformers", "SUPPORTED_VISION_MODELS"]

# transformers vision model class -> the tower kind run here
SUPPORTED_VISION_MODELS = {
    "CLIPVisionModel": "clip",
    "SiglipVisionModel": "siglip",
    "InternVLVisionModel": "internvl",
}


def from_transformers(
    vision_model: nn.Module,
    *,
    layer: int | None = None,
    prefix_tokens: bool = True,
    attn_backend: str = "auto",
) -> TransformersPackedEncoder:
    """A packed native-resolution encoder sharing the parameters of a transformers vision model.

    Args:
        vision_model: a ``CLIPVisionModel``, ``SiglipVisionModel`` or ``InternVLVisionModel`` (or a
            model holding one as ``vision_model``, e.g. ``CLIPModel``, ``SiglipModel``).
        layer: ``None`` for ``last_hidden_state``; an int selects ``hidden_states[layer]`` (see the
            module docstring) and the encoder stops after the layers it needs.
        prefix_tokens: keep the class token first in each image's output (LLaVA's "default" feature
            select strategy drops it: ``prefix_tokens=False``).
        attn_backend: an attention backend of ``nativevit.ops`` ("auto", "torch", "padded", ...).
    """
    inner = getattr(vision_model, "vision_model", None)
    if type(vision_model).__name__ not in SUPPORTED_VISION_MODELS and isinstance(inner, nn.Module):
        vision_model = inner
    return TransformersPackedEncoder(
        vision_model, layer=layer, prefix_tokens=prefix_tokens, attn_backend=attn_backend
    )


def _kind_of(vision_model: nn.Module) -> str:
    """The tower kind of a transformers vision model; ``TypeError`` listing the supported classes."""
    if not isinstance(vision_model, nn.Module):
        raise TypeError(f"expected a transformers vision model, got {type(vision_model).__name__}")
    from transformers import CLIPVisionModel, InternVLVisionModel, SiglipVisionModel

    classes = {CLIPVisionModel: "clip", SiglipVisionModel: "siglip", InternVLVisionModel: "internvl"}
    kind = classes.get(type(vision_model))
    if kind is None:
        raise TypeError(
            f"{type(vision_model).__name__} is not supported; the packed encoder takes transformers "
            f"{', '.join(SUPPORTED_VISION_MODELS)} (or a model holding one as .vision_model)"
        )
    return kind


# ------------------------------------------------------------------------- stems


def _meta(n: int, dim: int) -> torch.Tensor:
    # transformers' interpolate_pos_encoding reads only the shape of the embeddings it is given
    return torch.empty(1, n, dim, device="meta")


class _Stem:
    """One tower kind's embedding and output ends. Subclasses name transformers' modules."""

    has_prefix = False

    def __init__(self, enc: TransformersPackedEncoder):
        self.enc = enc

    def patch_conv(self) -> nn.Conv2d:
        raise NotImplementedError

    def prefix(self) -> torch.Tensor | None:
        """``(1, D)`` class token row, or None."""
        return None

    def positions(self, height: int, width: int, n: int) -> torch.Tensor | None:
        """``(prefix + n, D)`` position rows for an image of ``height x width`` px with ``n`` patches."""
        raise NotImplementedError

    def after_embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` rows from the last layer's output rows."""
        return x


class _ClipStem(_Stem):
    has_prefix = True

    def patch_conv(self):
        return self.enc.embeddings.patch_embedding

    def prefix(self):
        return self.enc.embeddings.class_embedding[None]

    def positions(self, height, width, n):
        emb = self.enc.embeddings
        return emb.interpolate_pos_encoding(_meta(n + 1, emb.embed_dim), height, width)[0]

    def after_embed(self, x):
        return self.enc.pre_layrnorm(x)


class _SiglipStem(_Stem):
    def patch_conv(self):
        return self.enc.embeddings.patch_embedding

    def positions(self, height, width, n):
        emb = self.enc.embeddings
        return emb.interpolate_pos_encoding(_meta(n, emb.embed_dim), height, width)[0]

    def final(self, x):
        return self.enc.post_layernorm(x)


class _InternStem(_Stem):
    has_prefix = True

    def patch_conv(self):
        return self.enc.embeddings.patch_embeddings.projection

    def prefix(self):
        return self.enc.embeddings.cls_token[0]

    def positions(self, height, width, n):
        emb = self.enc.embeddings
        if emb.position_embeddings is None:
            return None
        return emb.interpolate_pos_encoding(_meta(n + 1, emb.position_embeddings.shape[-1]), height, width)[0]

    def after_embed(self, x):
        return self.enc.embeddings.dropout(x)

    def final(self, x):
        return self.enc.layernorm(x)


_STEMS = {"clip": _ClipStem, "siglip": _SiglipStem, "internvl": _InternStem}


def _check_layers(kind: str, layers: nn.ModuleList) -> None:
    """Refuse layer or attention classes whose forward is not the one run here."""
    if kind == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLVisionAttention as attn_cls
        from transformers.models.internvl.modeling_internvl import InternVLVisionLayer as layer_cls

        attn_name = "attention"
    elif kind == "clip":
        from transformers.models.clip.modeling_clip import CLIPAttention as attn_cls
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer as layer_cls

        attn_name = "self_attn"
    else:
        from transformers.models.siglip.modeling_siglip import SiglipAttention as attn_cls
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer as layer_cls

        attn_name = "self_attn"
    for i, blk in enumerate(layers):
        if type(blk) is not layer_cls:
            raise ValueError(
                f"unsupported {kind} tower: layer {i} is {type(blk).__name__}, not {layer_cls.__name__}"
            )
        attn = getattr(blk, attn_name)
        if type(attn) is not attn_cls:
            raise ValueError(
                f"unsupported {kind} tower: layer {i}.{attn_name} is {type(attn).__name__}, "
                f"not {attn_cls.__name__}"
            )


class TransformersPackedEncoder(nn.Module):
    """A transformers CLIP / SigLIP / InternViT vision model over packed varlen batches.

    Its children are the transformers model's own (same objects, same names: ``state_dict`` keys are
    the transformers keys). Token order per image: the class token (CLIP, InternViT), then the patch
    grid row-major, as in transformers. ``config`` is the transformers vision config.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        *,
        layer: int | None = None,
        prefix_tokens: bool = True,
        attn_backend: str = "auto",
    ):
        super().__init__()
        kind = _kind_of(vision_model)
        for name, child in vision_model.named_children():
            self.add_module(name, child)
        self.config = vision_model.config
        self.kind = kind
        self._stem = _STEMS[kind](self)
        _check_layers(kind, self.layers)
        conv = self._stem.patch_conv()
        ks, st = tuple(conv.kernel_size), tuple(conv.stride)
        if ks != st or ks[0] != ks[1] or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
            raise ValueError(
                f"unsupported {kind} tower: patch convolution with kernel {ks}, stride {st} is not a "
                "square non-overlapping patch projection"
            )
        self.depth = len(self.layers)
        self.layer = layer
        self.prefix_tokens = prefix_tokens
        self.attn_backend = attn_backend
        self.train(vision_model.training)

    # ------------------------------------------------------------------ settings

    @property
    def layers(self) -> nn.ModuleList:
        """transformers' encoder layers (``encoder.layers``; InternViT: ``encoder.layer``)."""
        return self.encoder.layer if self.kind == "internvl" else self.encoder.layers

    @property
    def layer(self) -> int | None:
        return self._layer

    @layer.setter
    def layer(self, layer: int | None) -> None:
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer must be an int or None, got {type(layer).__name__}")
            if not -(self.depth + 1) <= layer <= self.depth:
                raise ValueError(
                    f"layer {layer} is out of range: a {self.depth}-layer tower has hidden_states "
                    f"0..{self.depth} (or -{self.depth + 1}..-1)"
                )
        self._layer = layer

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = check_backend_name("attention", name)

    @property
    def patch_size(self) -> int:
        return int(self._stem.patch_conv().kernel_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self._stem.has_prefix)

    @property
    def embed_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self._stem.patch_conv().weight.dtype

    @property
    def device(self) -> torch.device:
        return self._stem.patch_conv().weight.device

    # ------------------------------------------------------------------ inputs

    def patchify(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``(C, H, W)`` images -> ``(N, C*p*p)`` patch rows (row-major grid per image, each row in the
        convolution weight's ``(C, p, p)`` order) and each image's ``(H, W)`` in pixels. A side's
        remainder past a multiple of the patch size is dropped, as the convolution drops it."""
        if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of (C, H, W) tensors, got {type(images).__name__}")
        if not images:
            raise ValueError("images is empty: a batch needs at least one image")
        conv = self._stem.patch_conv()
        p, c = self.patch_size, conv.in_channels
        rows, sizes = [], []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(img).__name__}")
            if not img.dtype.is_floating_point:
                raise TypeError(f"images[{i}] must be a normalised floating-point tensor, got {img.dtype}")
            if img.dim() != 3 or img.shape[0] != c:
                raise ValueError(f"images[{i}] must have shape ({c}, H, W), got {tuple(img.shape)}")
            H, W = img.shape[1:]
            if H < p or W < p:
                raise ValueError(f"images[{i}] is {H}x{W} px: both sides must be at least the patch size {p}")
            if img.device != conv.weight.device:
                raise ValueError(f"images[{i}] is on {img.device} but the model is on {conv.weight.device}")
            rows.append(self._rows(img[None]))
            sizes.append((H, W))
        return torch.cat(rows), sizes

    def _rows(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images of one size -> ``(B*h*w, C*p*p)`` patch rows."""
        p = self.patch_size
        b, c, H, W = pixels.shape
        h, w = H // p, W // p
        x = pixels[:, :, : h * p, : w * p].to(self.dtype).reshape(b, c, h, p, w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c * p * p)

    # ------------------------------------------------------------------ forward

    def forward(
        self, rows: torch.Tensor, sizes: list[tuple[int, int]], **kwargs
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor], Segments]:
        """:meth:`encode_rows` (the swapped VLM tower overrides this with transformers' interface)."""
        return self.encode_rows(rows, sizes, **kwargs)

    def encode_rows(
        self,
        rows: torch.Tensor,
        sizes: list[tuple[int, int]],
        *,
        hidden_states: set[int] | None = None,
        stop: int | None = None,
        layout: str | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor], Segments]:
        """Packed patch rows -> ``(last_hidden_state rows or None, {index: hidden_states rows}, segments)``.

        ``rows``: ``(N, C*p*p)`` from :meth:`patchify` (each image's patches, row-major); ``sizes``: each
        image's ``(H, W)`` in px. ``hidden_states``: the (non-negative) ``hidden_states`` indices to
        keep; ``stop``: run layers ``0..stop-1`` only (default: all, and then ``last_hidden_state`` is
        returned, else None). Every tensor is ``(total, D)`` packed rows, one segment per image (prefix
        token first). ``layout``: "packed", or "padded" for the padded baseline.
        """
        self._check_training()
        p = self.patch_size
        grids = [(H // p, W // p) for H, W in sizes]
        lengths = [h * w for h, w in grids]
        if rows.dim() != 2 or rows.shape[0] != sum(lengths):
            raise ValueError(f"rows has shape {tuple(rows.shape)} but the sizes need {sum(lengths)} rows")
        stop = self.depth if stop is None else stop
        keep = set() if hidden_states is None else set(hidden_states)
        conv = self._stem.patch_conv()
        x = F.linear(rows.to(conv.weight.dtype), conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        x = self._stem.after_embed(self._embed(x, sizes, lengths))  # (total, D)

        n_pre = self.num_prefix_tokens
        if layout is None:
            layout = "padded" if self._attn_backend == "padded" else "packed"
        plan = plan_batch(lengths=[n_pre + n for n in lengths], device=x.device, layout=layout)
        states: dict[int, torch.Tensor] = {0: x} if 0 in keep else {}
        x = plan.to_layout(x)
        for i, blk in enumerate(self.layers[:stop]):
            x = self._layer_forward(blk, x, plan.segments)
            if i + 1 in keep:
                states[i + 1] = plan.to_input_order(x)
        x = plan.to_input_order(x)
        segments = Segments(plan.segments.lengths, x.device) if plan.padded else plan.segments
        last = self._stem.final(x) if stop == self.depth else None
        return last, states, segments

    def forward_images(self, images: list[torch.Tensor], *, layout: str | None = None) -> list[torch.Tensor]:
        """Encode normalised ``(C, H, W)`` images, each at its own grid, as one packed batch.

        Returns one ``(tokens, D)`` tensor per image: with ``layer=None``, transformers'
        ``last_hidden_state[0]`` of that image alone (``interpolate_pos_encoding=True``), else its
        ``hidden_states[layer][0]``; without the class token when ``prefix_tokens=False``.
        """
        rows, sizes = self.patchify(images)
        index = None if self._layer is None else self._layer % (self.depth + 1)
        keep = None if index is None else {index}
        stop = None if index is None else index
        last, states, segments = self.encode_rows(rows, sizes, hidden_states=keep, stop=stop, layout=layout)
        x = last if index is None else states[index]
        out = list(torch.split(x, list(segments.lengths)))
        if not self.prefix_tokens and self.num_prefix_tokens:
            out = [t[self.num_prefix_tokens :] for t in out]
        return out

    def _embed(self, x: torch.Tensor, sizes: list[tuple[int, int]], lengths: list[int]) -> torch.Tensor:
        """Patch rows -> packed embedding rows: per image its class token, its patches, plus position
        rows (resampled once per distinct pixel size, by transformers' own method)."""
        prefix = self._stem.prefix()
        cache: dict[tuple[int, int], torch.Tensor | None] = {}
        pieces, start = [], 0
        for size, n in zip(sizes, lengths, strict=True):
            if size not in cache:
                cache[size] = self._stem.positions(*size, n)
            pos = cache[size]
            piece = x[start : start + n]
            start += n
            if prefix is not None:
                piece = torch.cat([prefix.to(piece.dtype), piece])
            pieces.append(piece + pos if pos is not None else piece)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _layer_forward(self, blk: nn.Module, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """One encoder layer of transformers on packed rows (its modules, varlen attention)."""
        if self.kind == "internvl":
            h = self._attention(blk.attention, blk.layernorm_before(x), segments)
            x = x + blk.lambda_1 * h
            h = blk.dropout(blk.mlp(blk.layernorm_after(x)))
            if blk.lambda_2 is not None:
                h = blk.lambda_2 * h
            return x + h
        x = x + self._attention(blk.self_attn, blk.layer_norm1(x), segments)
        return x + blk.mlp(blk.layer_norm2(x))

    def _attention(self, attn: nn.Module, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """transformers' attention module with its attention core replaced by block-diagonal varlen
        attention over the batch's segments."""
        n = x.shape[0]
        heads, hd = attn.num_heads, attn.head_dim
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if self.kind == "internvl":
            q, k = attn.q_norm(q), attn.k_norm(k)  # over all heads at once, before the split
        q, k, v = (t.view(n, heads, hd) for t in (q, k, v))  # (total, heads, head_dim)
        backend = "padded" if segments.padded else self._attn_backend
        out = ops.varlen_attention(q, k, v, segments, scale=attn.scale, backend=backend)
        out = out.reshape(n, heads * hd)
        if self.kind == "internvl":
            return attn.projection_dropout(attn.projection_layer(out))
        return attn.out_proj(out)

    def _check_training(self) -> None:
        if not self.training:
            return
        p = getattr(self.config, "attention_dropout", 0.0)
        if p:
            raise RuntimeError(
                f"vision_config.attention_dropout={p}: varlen attention has no attention dropout; run the "
                "encoder in eval mode or set attention_dropout=0"
            )
