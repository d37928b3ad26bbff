"""The Qwen2-VL vision tower over packed varlen batches.

    pixel_values (N, C*T*P*P) --PatchEmbed--> (N, D) --depth x Block--> (N, D) --PatchMerger--> (N/4, out)

Per forward, the batch metadata (``Segments``: cu_seqlens on device, max_seqlen on host) and the
2D rotary tables are built once from ``grid_thw``; every block reuses them, so no layer touches the
host. Attention and RoPE go through ``nativevit.ops``; the padded baseline is this same model with
``attn_backend="padded"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import VisionConfig
from .packing import Segments, check_grid_thw, pad_segments, unpad_segments
from .rope import rope_cos_sin


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unsupported activation {name!r}")


class PatchEmbed(nn.Module):
    """Conv3d patch embedding, kernel = stride = (T, P, P), applied as one matmul.

    Kernel and stride are equal, so the convolution is exactly ``rows @ W.view(D, C*T*P*P).T``
    over the processor's rows, which are already flattened in (C, T, P, P) order. The weight keeps
    the Conv3d shape so checkpoints load unchanged.
    """

    def __init__(self, *, patch_dim: int, embed_dim: int, in_channels: int, temporal: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(
            in_channels, embed_dim, kernel_size=(temporal, patch, patch), stride=(temporal, patch, patch), bias=False
        )
        self.patch_dim = patch_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention, block-diagonal over the packed segments, 2D RoPE on q and k."""

    def __init__(self, *, dim: int, num_heads: int, attn_backend: str = "auto", rope_backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = attn_backend
        self.rope_backend = rope_backend

    def forward(
        self, x: torch.Tensor, segments: Segments, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        # features are [q heads | k heads | v heads]; q, k, v stay strided views of one buffer
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # 3 x (N, H, hd)
        q, k = ops.apply_rope_2d(q, k, cos, sin, backend=self.rope_backend)
        out = ops.varlen_attention(q, k, v, segments, scale=self.scale, backend=self.attn_backend)
        return self.proj(out.reshape(n, -1))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, cfg: VisionConfig, *, attn_backend: str = "auto", rope_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(
            dim=cfg.embed_dim, num_heads=cfg.num_heads, attn_backend=attn_backend, rope_backend=rope_backend
        )
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim=cfg.embed_dim, hidden_dim=cfg.mlp_hidden_dim, act=cfg.hidden_act)

    def forward(
        self, x: torch.Tensor, segments: Segments, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 block of consecutive rows -> one token through a 2-layer GELU MLP."""

    def __init__(self, *, dim: int, out_dim: int, merge_size: int, eps: float):
        super().__init__()
        self.hidden = dim * merge_size**2
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))  # (N/m^2, out_dim)


class NativeViT(nn.Module):
    """Qwen2-VL vision tower over a packed batch.

    Args:
        cfg: the tower's hyper-parameters.
        attn_backend: attention backend for every block ("auto", "torch", "padded", ...; see
            ``nativevit.ops.available_backends()``). "padded" is the padded baseline.
        rope_backend: RoPE backend ("auto", "torch", ...).
    """

    def __init__(self, cfg: VisionConfig | None = None, *, attn_backend: str = "auto", rope_backend: str = "auto"):
        super().__init__()
        self.config = cfg = cfg if cfg is not None else VisionConfig.qwen2_vl()
        self.patch_embed = PatchEmbed(
            patch_dim=cfg.patch_dim,
            embed_dim=cfg.embed_dim,
            in_channels=cfg.in_channels,
            temporal=cfg.temporal_patch_size,
            patch=cfg.patch_size,
        )
        self.blocks = nn.ModuleList(
            [Block(cfg, attn_backend=attn_backend, rope_backend=rope_backend) for _ in range(cfg.depth)]
        )
        self.merger = PatchMerger(
            dim=cfg.embed_dim, out_dim=cfg.out_hidden_size, merge_size=cfg.spatial_merge_size, eps=cfg.norm_eps
        )
        self.init_weights()

    # ------------------------------------------------------------------ backends

    @property
    def attn_backend(self) -> str:
        return self.blocks[0].attn.attn_backend if len(self.blocks) else "auto"

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        for blk in self.blocks:
            blk.attn.attn_backend = name

    @property
    def rope_backend(self) -> str:
        return self.blocks[0].attn.rope_backend if len(self.blocks) else "auto"

    @rope_backend.setter
    def rope_backend(self, name: str) -> None:
        for blk in self.blocks:
            blk.attn.rope_backend = name

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Truncated-normal weights, zero biases, unit norms (a random tower for benchmarks)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.dtype.is_floating_point:
            raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        grid = check_grid_thw(grid_thw, cfg.spatial_merge_size)
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(
                f"pixel_values must have shape (N, {cfg.patch_dim}) = (N, C*T*P*P) with C={cfg.in_channels} "
                f"channels, T={cfg.temporal_patch_size}, P={cfg.patch_size}; got {tuple(pixel_values.shape)}"
            )
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != total:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} rows but grid_thw describes {total} patches "
                "(sum of t*h*w)"
            )
        return grid

    def forward_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``(N, C*T*P*P)`` patch rows -> ``(N, embed_dim)`` pre-merger states (HF ``last_hidden_state``)."""
        grid = self._check_inputs(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)
        segments = Segments.from_grid(grid, x.device)
        cos, sin = rope_cos_sin(
            grid,
            self.config.head_dim,
            theta=self.config.rope_theta,
            merge_size=self.config.spatial_merge_size,
            device=x.device,
        )
        if self.attn_backend == "padded":
            # The padded baseline: every layer runs on a (segments x max_seqlen) batch, as a padded ViT
            # does, so the linear layers pay for the padding too; attention masks the padded keys.
            segments = segments.as_padded()
            x, cos, sin = (pad_segments(t, segments) for t in (x, cos, sin))
        for blk in self.blocks:
            x = blk(x, segments, cos, sin)
        return unpad_segments(x, segments) if segments.padded else x

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``(N, C*T*P*P)`` patch rows -> ``(N/4, out_hidden_size)`` merged tokens (HF ``pooler_output``)."""
        return self.merger(self.forward_features(pixel_values, grid_thw))

    # ------------------------------------------------------------------ accounting

    def flops_per_batch(self, grid_thw: torch.Tensor | list, *, padded: bool = False) -> dict[str, int]:
        """Forward FLOPs of a batch, by term (see :func:`flops`); ``padded`` for the padded baseline."""
        grid = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
        return flops(self.config, [h * w for t, h, w in grid for _ in range(t)], padded=padded)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        attn_backend: str = "auto",
        rope_backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> NativeViT:
        """Load a tower from a checkpoint directory (released Qwen2-VL layout or ours). See checkpoint.py."""
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls, path, attn_backend=attn_backend, rope_backend=rope_backend, dtype=dtype, device=device
        )

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
        """Write ``config.json`` (with a Qwen2-VL ``vision_config``) and safetensors shards, keys under ``visual.``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def flops(cfg: VisionConfig, lengths: list[int], *, padded: bool = False) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of segments of the given lengths, by term.

    ``linear``: patch embedding, qkv, proj, MLP and merger GEMMs, proportional to the rows they see.
    ``attention``: QK^T and PV, ``4 * L^2 * embed_dim`` per segment of length L and layer.
    ``padded=True`` gives the padded baseline's cost: the blocks see every segment padded to the
    longest (patch embedding and merger still run on the real tokens).
    """
    tokens = sum(lengths)
    if padded:
        lengths = [max(lengths)] * sum(1 for n in lengths if n > 0)
    rows = sum(lengths)
    d, hid, unit = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.merge_unit
    per_row_block = 2 * (3 * d * d + d * d + 2 * d * hid)
    merger = 2 * (tokens // unit) * (unit * d * unit * d + unit * d * cfg.out_hidden_size)
    linear = 2 * tokens * cfg.patch_dim * d + cfg.depth * rows * per_row_block + merger
    attention = cfg.depth * sum(4 * n * n * d for n in lengths)
    return {"linear": linear, "attention": attention, "total": linear + attention}


__all__ = ["NativeViT", "Block", "Attention", "Mlp", "PatchEmbed", "PatchMerger", "flops"]
