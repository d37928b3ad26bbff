"""timm ViTs as packed native-resolution encoders.

    enc = nv.from_timm(model)                        # a timm VisionTransformer or NaFlexVit
    enc = nv.from_timm("vit_large_patch14_clip_336", "weights.safetensors")
    feats = enc.forward_images([img_a, img_b, ...])  # one (tokens, dim) tensor per (3, H, W) image

Every image keeps its own patch grid; all of them go through the transformer as ONE packed varlen
batch, one attention segment per image (its class/register tokens included), through
``nativevit.ops.varlen_attention``. Nothing is copied: the encoder holds the timm model and runs
its own modules (patch projection, norms, blocks' linear layers, MLPs, layer scales) on packed
``(tokens, dim)`` rows; only the attention core is replaced. Absolute position embeddings are
resampled per grid by timm's own code for that model, so ``forward_images`` equals
``model.forward_features(image[None])[0]`` (``dynamic_img_size=True`` for non-native sizes) and,
for NaFlexVit, the valid rows of its own padded NaFlex forward.

Supported: timm ``VisionTransformer`` (class/register tokens, ``no_embed_class``, ``norm_pre``,
layer scale, qk-norm, gated attention, any per-token MLP) and ``NaFlexVit`` without RoPE (learned,
factorized or no position embedding, linear or conv patch embedding). Refused, with the part
named: hybrid CNN stems (``patch_embed.backbone``), other block or attention classes (EVA/RoPE,
parallel, post-norm, diff attention), subclasses that change the embedding (e.g. distilled DeiT).
Training-mode stochastic depth, attention dropout and patch dropout act per padded sample in
timm and are refused rather than silently applied per token.

timm is imported lazily, so ``import nativevit`` does not pay for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backends.registry import check_backend_name
from .packing import Segments, plan_batch

__all__ = ["TimmPackedEncoder", "from_timm"]


def from_timm(
    model: nn.Module | str,
    weights: str | Path | None = None,
    *,
    layer: int | None = None,
    norm: bool | None = None,
    prefix_tokens: bool = True,
    attn_backend: str = "auto",
    **model_kwargs,
) -> TimmPackedEncoder:
    """A packed encoder sharing the weights of a timm ViT.

    Args:
        model: a timm ``VisionTransformer`` / ``NaFlexVit`` instance, or a timm model name, built
            with ``pretrained=False`` and ``model_kwargs`` (nothing is downloaded).
        weights: optional local ``.safetensors`` file in timm's layout (or any layout the model's
            ``checkpoint_filter_fn`` converts, as timm does for pretrained weights), loaded strictly.
        layer: ``None`` runs every block; an int takes the output of ``blocks[layer]`` (negative
            counts from the end: LLaVA uses ``layer=-2``) and stops there.
        norm: apply the model's final norm; default: only when ``layer`` is None (timm's
            ``forward_intermediates(norm=False)`` and HF ``hidden_states`` are un-normed).
        prefix_tokens: keep class/register tokens at the start of each image's output
            (LLaVA drops the class token: ``prefix_tokens=False``).
        attn_backend: an attention backend of ``nativevit.ops`` ("auto", "torch", "padded", ...).
    """
    import timm

    if isinstance(model, str):
        model = timm.create_model(model, pretrained=False, **model_kwargs)
        model.eval()
    elif model_kwargs:
        raise TypeError(
            f"model keyword arguments {sorted(model_kwargs)} only apply when a timm model name is given"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm model or a timm model name, got {type(model).__name__}")
    if weights is not None:
        load_safetensors_into(model, weights)
    return TimmPackedEncoder(
        model, layer=layer, norm=norm, prefix_tokens=prefix_tokens, attn_backend=attn_backend
    )


def load_safetensors_into(model: nn.Module, path: str | Path) -> None:
    """Load a local safetensors file into a timm model, strictly, through the model's
    ``checkpoint_filter_fn`` when its module has one (what timm does for pretrained weights)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights must be a .safetensors file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    state = load_file(str(path))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights {path.name} do not match {type(model).__name__}: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


# ------------------------------------------------------------------------- stems


class _VitStem:
    """Embedding of a timm ``VisionTransformer``: conv patch embed as one matmul, class/register
    tokens, absolute position embedding resampled by ``timm.layers.resample_abs_pos_embed`` exactly
    as ``VisionTransformer._pos_embed`` does with ``dynamic_img_size=True`` (bicubic, antialias)."""

    channels_last = False  # rows flattened (C, ph, pw): the Conv2d weight's order

    def __init__(self, model: nn.Module):
        from timm.layers import PatchEmbed

        pe = model.patch_embed
        if hasattr(pe, "backbone"):
            raise ValueError(
                f"unsupported timm model: patch_embed.backbone ({type(pe.backbone).__name__} in "
                f"{type(pe).__name__}) is a CNN stem; the packed encoder needs a plain patch embedding"
            )
        if type(pe) is not PatchEmbed:
            raise ValueError(
                f"unsupported timm model: patch_embed is {type(pe).__name__}, not timm PatchEmbed"
            )
        _check_patch_conv(pe.proj, "patch_embed.proj")
        pos = model.pos_embed
        if pos is not None and (pos.dim() != 3 or pos.shape[0] != 1):
            raise ValueError(
                f"unsupported timm model: pos_embed has shape {tuple(pos.shape)}, expected (1, L, dim)"
            )
        self.model = model
        self.patch_size = tuple(pe.proj.kernel_size)
        self.num_prefix_tokens = model.num_prefix_tokens

    @property
    def proj(self) -> nn.Module:
        return self.model.patch_embed.proj

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        pe = self.model.patch_embed
        w = pe.proj.weight
        return pe.norm(F.linear(rows, w.reshape(w.shape[0], -1), pe.proj.bias))  # (N, D)

    def prefix(self) -> torch.Tensor | None:
        m = self.model
        parts = [t[0] for t in (m.cls_token, m.reg_token) if t is not None]
        return torch.cat(parts) if parts else None  # (P, D)

    def pos_embed(self, grid: tuple[int, int], dtype: torch.dtype):
        """(prefix position rows or None, (h*w, D) patch position rows or None) for one grid."""
        from timm.layers import resample_abs_pos_embed

        m = self.model
        if m.pos_embed is None:
            return None, None
        n_pre = 0 if m.no_embed_class else m.num_prefix_tokens
        pos = resample_abs_pos_embed(
            m.pos_embed, new_size=grid, old_size=m.patch_embed.grid_size, num_prefix_tokens=n_pre
        )[0]
        return (pos[:n_pre] if n_pre else None), pos[n_pre:]

    def after_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(self.model.pos_drop(x))


class _NaFlexStem:
    """Embedding of a timm ``NaFlexVit``: linear (or conv) patch projection, position embedding
    from ``NaFlexEmbeds``' own NaFlex-mode code (the path its padded batches take: learned or
    factorized, interpolate or grid_sample, aspect-ratio preserving or not), then prefix tokens."""

    def __init__(self, model: nn.Module):
        emb = model.embeds
        if getattr(model, "rope", None) is not None:
            raise ValueError(
                f"unsupported timm model: rope ({type(model.rope).__name__}) -- NaFlexVit with RoPE runs "
                "EVA blocks, which the packed encoder does not support"
            )
        if emb.is_linear:
            if not isinstance(emb.proj, nn.Linear):
                raise ValueError(f"unsupported timm model: embeds.proj is {type(emb.proj).__name__}")
        else:
            _check_patch_conv(emb.proj, "embeds.proj")
        if emb.pos_embed_type not in ("learned", "factorized", "none"):
            raise ValueError(f"unsupported timm model: embeds.pos_embed_type {emb.pos_embed_type!r}")
        self.model = model
        self.patch_size = tuple(emb.patch_size)
        self.channels_last = bool(emb.is_linear and emb.channels_last)
        self.num_prefix_tokens = model.num_prefix_tokens

    @property
    def proj(self) -> nn.Module:
        return self.model.embeds.proj

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        emb = self.model.embeds
        if emb.is_linear:
            if emb.norm_input is not None:
                rows = emb.norm_input(rows)
            x = emb.proj(rows)
        else:
            w = emb.proj.weight
            x = F.linear(rows, w.reshape(w.shape[0], -1), emb.proj.bias)
        return emb.norm(x)  # (N, D)

    def prefix(self) -> torch.Tensor | None:
        emb = self.model.embeds
        parts = [t[0] for t in (emb.cls_token, emb.reg_token) if t is not None]
        return torch.cat(parts) if parts else None

    def pos_embed(self, grid: tuple[int, int], dtype: torch.dtype):
        emb = self.model.embeds
        if emb.pos_embed_type == "none":
            return None, None
        h, w = grid
        device = emb.proj.weight.device
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        coord = torch.stack([ys.flatten(), xs.flatten()], dim=-1)[None]  # (1, h*w, 2) (y, x), row-major
        pos = torch.zeros(1, h * w, emb.embed_dim, dtype=dtype, device=device)
        # NaFlexEmbeds adds in place; adding onto zeros yields exactly the rows it would add
        if emb.pos_embed_type == "learned":
            if emb.pos_embed_use_grid_sample:
                emb._apply_learned_naflex_pos_embed_grid_sample(pos, patch_coord=coord)
            else:
                emb._apply_learned_naflex_pos_embed(pos, patch_coord=coord)
        elif emb.pos_embed_use_grid_sample:
            emb._apply_factorized_naflex_pos_embed_grid_sample(pos, patch_coord=coord)
        else:
            emb._apply_factorized_naflex_pos_embed(pos, patch_coord=coord)
        return None, pos[0]

    def after_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(self.model.embeds.pos_drop(x))


def _check_patch_conv(conv: nn.Module, name: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"unsupported timm model: {name} is {type(conv).__name__}, expected nn.Conv2d")
    ks, st = tuple(conv.kernel_size), tuple(conv.stride)
    if ks != st or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise ValueError(
            f"unsupported timm model: {name} (kernel {ks}, stride {st}, padding {conv.padding}, dilation "
            f"{conv.dilation}, groups {conv.groups}) is not a non-overlapping patch projection"
        )


def _make_stem(model: nn.Module):
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is VisionTransformer:
        return _VitStem(model)
    if type(model) is NaFlexVit:
        return _NaFlexStem(model)
    if isinstance(model, VisionTransformer) and hasattr(model, "dist_token"):
        raise ValueError(
            f"unsupported timm model: {type(model).__name__} adds a distillation token (dist_token) "
            "with its own position-embedding rule"
        )
    raise ValueError(
        f"unsupported timm model class {type(model).__name__}: from_timm takes timm VisionTransformer "
        "or NaFlexVit instances"
    )


def _check_blocks(model: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ValueError(
                f"unsupported timm model: blocks[{i}] is {type(blk).__name__}; the packed encoder runs "
                "timm's pre-norm vision_transformer.Block only"
            )
        if type(blk.attn) is not Attention:
            raise ValueError(
                f"unsupported timm model: blocks[{i}].attn is {type(blk.attn).__name__}; the packed "
                "encoder replaces timm.layers.Attention only"
            )


# ------------------------------------------------------------------------- encoder


class TimmPackedEncoder(nn.Module):
    """A timm ViT run over packed varlen batches of native-resolution images.

    The timm model is a submodule (``self.model``): parameters are shared, ``.to()`` / ``.eval()``
    act on it. Token order per image: prefix tokens (class, then registers), then the patch grid
    row-major, as in timm.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: int | None = None,
        norm: bool | None = None,
        prefix_tokens: bool = True,
        attn_backend: str = "auto",
    ):
        super().__init__()
        stem = _make_stem(model)
        _check_blocks(model)
        self.model = model
        self._stem = stem
        self.depth = len(model.blocks)
        self.layer = layer
        self.norm = norm
        self.prefix_tokens = prefix_tokens
        self.attn_backend = attn_backend
        self.train(model.training)  # follow the timm model's mode (eval after from_timm(name))

    # ------------------------------------------------------------------ settings

    @property
    def layer(self) -> int | None:
        return self._layer

    @layer.setter
    def layer(self, layer: int | None) -> None:
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer must be an int or None, got {type(layer).__name__}")
            if not -self.depth <= layer < self.depth:
                raise ValueError(f"layer {layer} is out of range for a {self.depth}-block model")
        self._layer = layer

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = check_backend_name("attention", name)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._stem.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return self._stem.num_prefix_tokens

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def _num_blocks(self) -> int:
        return self.depth if self._layer is None else self._layer % self.depth + 1

    def _apply_norm(self) -> bool:
        return self._layer is None if self.norm is None else bool(self.norm)

    # ------------------------------------------------------------------ inputs

    def patchify(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``(3, H, W)`` images -> ``(N, C*ph*pw)`` patch rows (row-major grid per image, each row in
        the projection's order) and the ``(h, w)`` grid of each image."""
        if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of (C, H, W) tensors, got {type(images).__name__}")
        if not images:
            raise ValueError("images is empty: a batch needs at least one image")
        weight = self._stem.proj.weight
        in_chans = self.model.in_chans
        ph, pw = self.patch_size
        rows, grids = [], []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(img).__name__}")
            if not img.dtype.is_floating_point:
                raise TypeError(f"images[{i}] must be a normalised floating-point tensor, got {img.dtype}")
            if img.dim() != 3 or img.shape[0] != in_chans:
                raise ValueError(f"images[{i}] must have shape ({in_chans}, H, W), got {tuple(img.shape)}")
            c, H, W = img.shape
            if H < ph or W < pw or H % ph or W % pw:
                raise ValueError(
                    f"images[{i}] is {H}x{W}: height and width must be positive multiples of the patch "
                    f"size {ph}x{pw} (resize or crop first; nothing is padded or truncated)"
                )
            if img.device != weight.device:
                raise ValueError(f"images[{i}] is on {img.device} but the model is on {weight.device}")
            h, w = H // ph, W // pw
            x = img.to(weight.dtype).view(c, h, ph, w, pw)
            x = x.permute(1, 3, 2, 4, 0) if self._stem.channels_last else x.permute(1, 3, 0, 2, 4)
            rows.append(x.reshape(h * w, c * ph * pw))
            grids.append((h, w))
        return torch.cat(rows), grids

    # ------------------------------------------------------------------ forward

    def forward(
        self, rows: torch.Tensor, grids: list[tuple[int, int]], *, layout: str | None = None
    ) -> tuple[torch.Tensor, Segments]:
        """Packed patch rows ``(N, patch_dim)`` -> ``(total, dim)`` packed tokens (each image's prefix
        tokens, then its patches) and the batch's packed ``Segments`` (one per image).

        ``layout``: "packed", or "padded" for the padded baseline (every block on images padded to
        the longest); default "padded" when ``attn_backend`` is "padded", else "packed".
        """
        self._check_training()
        stem = self._stem
        lengths = [h * w for h, w in grids]
        if rows.dim() != 2 or rows.shape[0] != sum(lengths):
            raise ValueError(f"rows has shape {tuple(rows.shape)} but the grids need {sum(lengths)} rows")
        x = stem.embed(rows)  # (N, D)
        pieces = self._embed_pieces(x, grids)
        x = stem.after_prefix(torch.cat(pieces) if len(pieces) > 1 else pieces[0])

        n_pre = stem.num_prefix_tokens
        if layout is None:
            layout = "padded" if self._attn_backend == "padded" else "packed"
        plan = plan_batch(lengths=[n_pre + n for n in lengths], device=x.device, layout=layout)
        x = plan.to_layout(x)
        for blk in self.model.blocks[: self._num_blocks()]:
            x = self._block(blk, x, plan.segments)
        x = plan.to_input_order(x)
        segments = Segments(plan.segments.lengths, x.device) if plan.padded else plan.segments
        if self._apply_norm():
            x = self.model.norm(x)
        return x, segments

    def forward_images(self, images: list[torch.Tensor], *, layout: str | None = None) -> list[torch.Tensor]:
        """Encode ``(3, H, W)`` images (sides multiples of the patch size) as one packed batch.

        Returns one ``(tokens, dim)`` tensor per image: with the defaults, equal to timm's
        ``model.forward_features(image[None])[0]``.
        """
        rows, grids = self.patchify(images)
        x, segments = self(rows, grids, layout=layout)
        out = list(torch.split(x, list(segments.lengths)))
        if not self.prefix_tokens and self.num_prefix_tokens:
            out = [t[self.num_prefix_tokens :] for t in out]
        return out

    def _embed_pieces(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: prefix tokens (with their position rows if the model has them), then the patch
        tokens plus their position rows. Position rows are resampled once per distinct grid."""
        stem = self._stem
        prefix = stem.prefix()
        cache: dict[tuple[int, int], tuple] = {}
        pieces, start = [], 0
        for grid in grids:
            if grid not in cache:
                cache[grid] = stem.pos_embed(grid, x.dtype)
            pre_pos, pos = cache[grid]
            n = grid[0] * grid[1]
            patches = x[start : start + n]
            start += n
            if pos is not None:
                patches = patches + pos
            if prefix is not None:
                pieces.append(prefix + pre_pos if pre_pos is not None else prefix)
            pieces.append(patches)
        return pieces

    def _block(self, blk: nn.Module, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """timm ``Block.forward`` on packed rows: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""
        x = x + blk.drop_path1(blk.ls1(self._attention(blk.attn, blk.norm1(x), segments)))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _attention(self, attn: nn.Module, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """timm ``Attention.forward`` with its SDPA replaced by block-diagonal varlen attention."""
        n = x.shape[0]
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        # timm's fused qkv features are [q heads | k heads | v heads]
        q, k, v = attn.qkv(x).view(n, 3, attn.num_heads, attn.head_dim).unbind(1)  # 3 x (N, H, hd)
        q, k = attn.q_norm(q), attn.k_norm(k)
        backend = "padded" if segments.padded else self._attn_backend
        out = ops.varlen_attention(q, k, v, segments, scale=attn.scale, backend=backend)
        out = attn.norm(out.reshape(n, attn.num_heads * attn.head_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    def _check_training(self) -> None:
        """Refuse train-time regularisers that timm applies per padded sample (not per token)."""
        if not self.training:
            return
        model = self.model
        patch_drop = getattr(model, "patch_drop", None)
        if patch_drop is not None and getattr(patch_drop, "prob", 0.0) > 0:
            raise RuntimeError(
                f"patch_drop (prob {patch_drop.prob}) drops tokens per padded sample; not supported by the "
                "packed encoder in training mode (use model.eval() or build the model with patch_drop_rate=0)"
            )
        for i, blk in enumerate(model.blocks[: self._num_blocks()]):
            for name in ("drop_path1", "drop_path2"):
                p = getattr(getattr(blk, name), "drop_prob", 0.0)
                if p > 0:
                    raise RuntimeError(
                        f"blocks[{i}].{name} (stochastic depth {p}) drops whole samples; not supported by "
                        "the packed encoder in training mode (build the model with drop_path_rate=0)"
                    )
            if blk.attn.attn_drop.p > 0:
                raise RuntimeError(
                    f"blocks[{i}].attn.attn_drop (p={blk.attn.attn_drop.p}) is not supported by varlen "
                    "attention in training mode (build the model with attn_drop_rate=0)"
                )
