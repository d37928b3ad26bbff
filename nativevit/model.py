"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers over packed varlen batches.

    pixel_values (N, C*T*P*P) --PatchEmbed--> (N, D) --depth x Block--> (N, D) --PatchMerger--> (N/4, out)

Per forward, the batch metadata (``Segments``: cu_seqlens on device, max_seqlen on host) and the
2D rotary tables are built once from ``grid_thw``; every block reuses them, so no layer touches the
host. Attention and RoPE go through ``nativevit.ops``; the padded baseline is this same model with
``attn_backend="padded"``.

Qwen2.5-VL's window attention is a second ``Segments`` (one segment per window), built once per
batch with the permutation that makes every window contiguous (``WindowLayout``): the tokens are
permuted after the patch embedding, windowed blocks get the window segments and full-attention
blocks the frame segments (the permutation never crosses a frame), and the output is permuted back.
Qwen3-VL adds a learned position table resampled to each image and DeepStack mergers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import VisionConfig
from .packing import LAYOUTS, BatchPlan, PaddedWindows, Segments, check_grid_thw, plan_batch
from .positions import position_kind


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``. Without autograd it runs in one buffer updated in place: the same
    values, half the memory traffic of the three-temporary form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


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


class RMSNorm(nn.Module):
    """Qwen2.5-VL's RMSNorm: ``x * rsqrt(mean(x^2) + eps)`` in float32, cast back to the input dtype,
    then times the weight (in that order, as the release does; fp32 math even for fp64 input)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


NORM_LAYERS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return NORM_LAYERS[kind](dim, eps=eps)


class PatchEmbed(nn.Module):
    """Conv3d patch embedding, kernel = stride = (T, P, P), applied as one matmul.

    Kernel and stride are equal, so the convolution is exactly ``rows @ W.view(D, C*T*P*P).T``
    over the processor's rows, which are already flattened in (C, T, P, P) order. The weight keeps
    the Conv3d shape so checkpoints load unchanged.
    """

    def __init__(
        self,
        *,
        patch_dim: int,
        embed_dim: int,
        in_channels: int,
        temporal: int,
        patch: int,
        bias: bool = False,
    ):
        super().__init__()
        kernel = (temporal, patch, patch)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=bias)
        self.patch_dim = patch_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        x = pixel_values.to(weight.dtype)
        return F.linear(x, weight.view(weight.shape[0], -1), self.proj.bias)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention, block-diagonal over the packed segments, 2D RoPE on q and k.

    ``qkv``: "fused" (one ``qkv`` projection, ``[q heads | k heads | v heads]``) or "separate"
    (``q_proj``, ``k_proj``, ``v_proj``); ``qk_norm``: a norm kind for a per-head norm of q and k before
    the rotation (``q_norm``, ``k_norm``), or None. ``rope_fp32=False`` rotates float64 inputs in float64
    (towers that rotate in the input dtype); otherwise the rotation runs through ``nativevit.ops``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        attn_backend: str = "auto",
        rope_backend: str = "auto",
        qkv: str = "fused",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: str | None = None,
        eps: float = 1e-6,
        rope_fp32: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = qkv == "fused"
        if self.fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if qk_norm is not None:
            self.q_norm = _norm(qk_norm, self.head_dim, eps)
            self.k_norm = _norm(qk_norm, self.head_dim, eps)
        self.qk_norm = qk_norm is not None
        self.rope_fp32 = rope_fp32
        self.attn_backend = attn_backend
        self.rope_backend = rope_backend

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        relayout: PaddedWindows | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        if self.fused:
            # features are [q heads | k heads | v heads]; q, k, v stay strided views of one buffer
            q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # 3 x (N, H, hd)
        else:
            q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            if not self.rope_fp32 and q.dtype == torch.float64:
                q, k = _rotate_in_dtype(q, k, cos, sin)
            else:
                q, k = ops.apply_rope_2d(q, k, cos, sin, backend=self.rope_backend)
        if relayout is not None:
            q, k, v = (relayout.to_windows(t) for t in (q, k, v))
        backend = "padded" if segments.padded else self.attn_backend
        out = ops.varlen_attention(q, k, v, segments, scale=self.scale, backend=backend)
        if relayout is not None:
            out = relayout.to_frames(out)
        return self.proj(out.reshape(n, -1))


def _rotate_in_dtype(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotate-half rotation in the inputs' own dtype (the float32 tables cast to it)."""
    c = torch.cat([cos, cos], dim=-1)[:, None, :].to(q.dtype)
    s = torch.cat([sin, sin], dim=-1)[:, None, :].to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    return rotate(q), rotate(k)


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen3Mlp(nn.Module):
    """Qwen3-VL's two-layer MLP, under the release's names ``linear_fc1`` / ``linear_fc2``."""

    def __init__(self, *, dim: int, hidden_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(act)
        self.linear_fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class GatedMlp(nn.Module):
    """Qwen2.5-VL's SwiGLU MLP (with biases unless ``bias=False``): ``down(act(gate(x)) * up(x))``."""

    def __init__(self, *, dim: int, hidden_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


MLP_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "linear_mlp": Qwen3Mlp, "swiglu": GatedMlp}


def mlp_layer_for(cfg: VisionConfig) -> type[nn.Module]:
    """The MLP class of a tower: SwiGLU when ``cfg.mlp_type`` says so, else the family's two-layer MLP
    (whose parameter names differ by family: ``fc1`` or ``linear_fc1``)."""
    if cfg.mlp_type == "swiglu":
        return GatedMlp
    return MLP_LAYERS["linear_mlp" if cfg.family.mlp == "linear_mlp" else "mlp"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        attn_backend: str = "auto",
        rope_backend: str = "auto",
        mlp_layer: type[nn.Module] | None = None,
    ):
        super().__init__()
        fam = cfg.family
        self.norm1 = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)
        self.attn = Attention(
            dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            attn_backend=attn_backend,
            rope_backend=rope_backend,
            qkv=fam.qkv,
            qkv_bias=fam.qkv_bias,
            proj_bias=fam.proj_bias,
            qk_norm=cfg.norm_type if fam.qk_norm else None,
            eps=cfg.norm_eps,
            rope_fp32=fam.rope_fp32,
        )
        self.norm2 = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)
        mlp_layer = mlp_layer or mlp_layer_for(cfg)
        self.mlp = mlp_layer(
            dim=cfg.embed_dim, hidden_dim=cfg.mlp_hidden_dim, act=cfg.hidden_act, bias=fam.mlp_bias
        )

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments,
        cos: torch.Tensor,
        sin: torch.Tensor,
        relayout: PaddedWindows | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin, relayout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm (LayerNorm; RMSNorm in Qwen2.5-VL), then each 2x2 block of consecutive rows -> one token
    through a 2-layer GELU MLP."""

    def __init__(self, *, dim: int, out_dim: int, merge_size: int, eps: float, norm: str = "layernorm"):
        super().__init__()
        self.hidden = dim * merge_size**2
        self.ln_q = _norm(norm, dim, eps)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))  # (N/m^2, out_dim)


class Qwen3PatchMerger(nn.Module):
    """Qwen3-VL's merger: LayerNorm over each row before the 2x2 shuffle (main merger) or over the
    shuffled ``4*D`` vector (``postshuffle_norm``, the DeepStack mergers), then fc1, GELU, fc2."""

    def __init__(
        self,
        *,
        dim: int,
        out_dim: int,
        merge_size: int,
        eps: float,
        norm: str = "layernorm",
        postshuffle_norm: bool = False,
    ):
        super().__init__()
        self.hidden = dim * merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = _norm(norm, self.hidden if postshuffle_norm else dim, eps)
        self.linear_fc1 = nn.Linear(self.hidden, self.hidden)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.hidden))
        else:
            x = self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(self.act(self.linear_fc1(x)))  # (N/m^2, out_dim)


class NoMerger(nn.Module):
    """Towers without a merger (it lives in the VLM's projector): the blocks' output is the output."""

    def __init__(self, *, dim: int, out_dim: int, merge_size: int, eps: float, norm: str = "layernorm"):
        super().__init__()
        if out_dim != dim or merge_size != 1:
            raise ValueError(
                f"a tower without a merger has out_hidden_size = embed_dim and spatial_merge_size 1, got "
                f"{out_dim} (embed_dim {dim}) and {merge_size}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


MERGER_LAYERS: dict[str, type[nn.Module]] = {
    "qwen2": PatchMerger,
    "qwen3": Qwen3PatchMerger,
    "none": NoMerger,
}


class NativeViT(nn.Module):
    """Qwen2-VL vision tower over a packed batch.

    Args:
        cfg: the tower's hyper-parameters.
        attn_backend: attention backend for every block ("auto", "torch", "padded", ...; see
            ``nativevit.ops.available_backends()``). "padded" is the padded baseline.
        rope_backend: RoPE backend ("auto", "torch", ...).
    """

    def __init__(
        self, cfg: VisionConfig | None = None, *, attn_backend: str = "auto", rope_backend: str = "auto"
    ):
        super().__init__()
        self.config = cfg = cfg if cfg is not None else VisionConfig.qwen2_vl()
        self.patch_embed = PatchEmbed(
            patch_dim=cfg.patch_dim,
            embed_dim=cfg.embed_dim,
            in_channels=cfg.in_channels,
            temporal=cfg.temporal_patch_size,
            patch=cfg.patch_size,
            bias=cfg.patch_bias,
        )
        fam = cfg.family
        self.embed_norm = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if fam.embed_norm else None
        # a square learned position table, resampled to each image (see nativevit.positions)
        self.pos_embed = (
            nn.Embedding(cfg.num_position_embeddings, cfg.embed_dim) if cfg.num_position_embeddings else None
        )
        self.position = position_kind(fam.position) if cfg.num_position_embeddings else None
        self.blocks = nn.ModuleList(
            [Block(cfg, attn_backend=attn_backend, rope_backend=rope_backend) for _ in range(cfg.depth)]
        )
        merger = dict(
            dim=cfg.embed_dim,
            out_dim=cfg.out_hidden_size,
            merge_size=cfg.spatial_merge_size,
            eps=cfg.norm_eps,
            norm=cfg.norm_type,
        )
        self.post_norm = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if fam.post_norm else None
        self.merger = MERGER_LAYERS[fam.merger](**merger)
        if cfg.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                [Qwen3PatchMerger(**merger, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes]
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
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)

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

    def plan(
        self,
        grid_thw: torch.Tensor | list,
        *,
        layout: str | None = None,
        device: torch.device | str | None = None,
    ) -> BatchPlan:
        """The batch's plan (segments, windows, rotary tables, position taps), built once.

        ``grid_thw``: ``(B, 3)`` int ``[t, h, w]``. ``layout``: "packed", or "padded" for the padded
        baseline; default "padded" when the model's ``attn_backend`` is "padded", else "packed".
        ``device``: default the model's.
        """
        cfg = self.config
        if layout is None:
            layout = "padded" if self.attn_backend == "padded" else "packed"
        if device is None:
            device = self.patch_embed.proj.weight.device
        return plan_batch(
            grid_thw,
            device=device,
            layout=layout,
            merge_size=cfg.spatial_merge_size,
            head_dim=None if cfg.family.rope == "none" else cfg.head_dim,
            rope_theta=cfg.rope_theta,
            rope_kind=cfg.family.rope,
            window=cfg.window_tokens if any(cfg.windowed_blocks) else 0,
            pos_side=math.isqrt(cfg.num_position_embeddings),
            pos_kind=cfg.family.position,
        )

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        *,
        plan: BatchPlan | None = None,
        layout: str | None = None,
    ) -> torch.Tensor:
        """``(N, C*T*P*P)`` patch rows -> ``(N, embed_dim)`` pre-merger states, in the input row order.

        This is HF's ``last_hidden_state`` for Qwen2-VL and Qwen3-VL. Qwen2.5-VL's ``last_hidden_state``
        is left in window order by transformers; here it is put back in the input (2x2 block) order, so
        rows always line up with ``pixel_values``. ``plan``: a plan from :meth:`plan` for this
        ``grid_thw`` (built here when omitted); ``layout``: "packed" or "padded" (see :meth:`plan`).
        """
        return self._encode(pixel_values, grid_thw, plan, layout, deepstack=False)[0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        *,
        return_deepstack: bool = False,
        plan: BatchPlan | None = None,
        layout: str | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``(N, C*T*P*P)`` patch rows -> ``(N/4, out_hidden_size)`` merged tokens (HF ``pooler_output``).

        With ``return_deepstack=True``: ``(tokens, [deepstack tokens, ...])``, one ``(N/4,
        out_hidden_size)`` tensor per entry of ``deepstack_visual_indexes`` in block order (HF
        ``deepstack_features``; an empty list for towers without DeepStack). ``plan`` and ``layout``
        as in :meth:`forward_features`.
        """
        x, deepstack = self._encode(pixel_values, grid_thw, plan, layout, deepstack=return_deepstack)
        tokens = self.merger(x)
        return (tokens, deepstack) if return_deepstack else tokens

    def _encode(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        plan: BatchPlan | None,
        layout: str | None,
        *,
        deepstack: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks over the batch: ``(N, embed_dim)`` final states in input order, DeepStack tokens."""
        plan = self._prepare(pixel_values, grid_thw, plan, layout)
        return self._run(pixel_values, plan, deepstack)

    @torch.compiler.disable
    def _prepare(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, plan: BatchPlan | None, layout: str | None
    ) -> BatchPlan:
        """Host side of a forward, always eager (``torch.compile`` breaks the graph here): validate the
        inputs, build the batch's plan, and let the attention backend prepare for its segments."""
        grid = self._check_inputs(pixel_values, grid_thw)
        if plan is None:
            plan = self.plan(grid, layout=layout, device=pixel_values.device)
        elif layout is not None and layout != plan.layout:
            raise ValueError(f"layout={layout!r} but the plan was built for {plan.layout!r}")
        elif plan.grid != tuple(grid):
            raise ValueError("the plan was built for another grid_thw")
        cfg = self.config
        like = pixel_values.new_empty(
            (0, cfg.num_heads, cfg.head_dim), dtype=self.patch_embed.proj.weight.dtype
        )
        backends = {"padded" if s.padded else self.attn_backend for s in plan.all_segments()}
        for name in backends:
            backend = ops.resolve_backend("attention", name, like)
            if backend.prepare is not None:
                for segments in plan.all_segments():
                    if segments.padded == (name == "padded"):
                        backend.prepare(segments, like)
        return plan

    def _run(
        self, pixel_values: torch.Tensor, plan: BatchPlan, deepstack: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The device side of a forward: only tensors and the plan's prebuilt metadata (traceable)."""
        cfg = self.config
        x = self.patch_embed(pixel_values)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.position is not None:
            x = x + self.position.apply(self.pos_embed.weight, plan.positions).to(x.dtype)
        x = plan.to_layout(x)
        cos, sin = plan.rope() if plan.cos is not None else (None, None)
        attention = {windowed: plan.attention(windowed) for windowed in (False, True)}
        stack = {block: j for j, block in enumerate(cfg.deepstack_visual_indexes)} if deepstack else {}
        features = []
        for i, blk in enumerate(self.blocks):
            segments, relayout = attention[cfg.windowed_blocks[i]]
            x = blk(x, segments, cos, sin, relayout)
            if i in stack:
                features.append(self.deepstack_merger_list[stack[i]](plan.to_input_order(x)))
        x = plan.to_input_order(x)
        return (self.post_norm(x) if self.post_norm is not None else x), features

    # ------------------------------------------------------------------ accounting

    def flops_per_batch(self, grid_thw: torch.Tensor | list, *, layout: str = "packed") -> dict[str, int]:
        """Forward FLOPs of a batch by term (see :func:`flops`), in ``layout`` ("packed" or "padded")."""
        cfg = self.config
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        window = cfg.window_tokens if any(cfg.windowed_blocks) else 0
        plan = plan_batch(grid_thw, merge_size=cfg.spatial_merge_size, window=window)
        windows = list(plan.windows.segments.lengths) if plan.windows is not None else None
        return flops(cfg, list(plan.segments.lengths), padded=layout == "padded", window_lengths=windows)

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
        """Write the family's release layout: ``config.json`` (top-level ``model_type``, ``vision_config``
        in the release's field names) and safetensors shards, keys under ``visual.`` / ``model.visual.``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def flops(
    cfg: VisionConfig, lengths: list[int], *, padded: bool = False, window_lengths: list[int] | None = None
) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of segments of the given lengths, by term.

    ``linear``: patch embedding, qkv, proj, MLP (3 GEMMs for SwiGLU) and merger GEMMs (DeepStack
    mergers included), proportional to the rows they see.
    ``attention``: QK^T and PV, ``4 * L^2 * embed_dim`` per segment of length L and layer; the
    windowed blocks of ``cfg`` count ``window_lengths`` (see ``window_partition``) instead.
    ``padded=True`` gives the padded baseline's cost: the blocks see every segment padded to the
    longest, windowed attention every window padded to the longest (patch embedding and mergers
    still run on the real tokens).
    """
    tokens = sum(lengths)
    windowed = sum(cfg.windowed_blocks)
    if windowed and window_lengths is None:
        raise ValueError(f"cfg has {windowed} windowed blocks: pass window_lengths (see window_partition)")
    if padded:
        lengths = [max(lengths)] * sum(1 for n in lengths if n > 0)
        if windowed:
            window_lengths = [max(window_lengths)] * sum(1 for n in window_lengths if n > 0)
    rows = sum(lengths)
    d, hid, unit = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.merge_unit
    mlp_gemms = 3 if cfg.mlp_type == "swiglu" else 2
    per_row_block = 2 * (3 * d * d + d * d + mlp_gemms * d * hid)
    mergers = 1 + len(cfg.deepstack_visual_indexes)
    merger = mergers * 2 * (tokens // unit) * (unit * d * unit * d + unit * d * cfg.out_hidden_size)
    linear = 2 * tokens * cfg.patch_dim * d + cfg.depth * rows * per_row_block + merger
    attention = (cfg.depth - windowed) * sum(4 * n * n * d for n in lengths)
    if windowed:
        attention += windowed * sum(4 * n * n * d for n in window_lengths)
    return {"linear": linear, "attention": attention, "total": linear + attention}


__all__ = [
    "NativeViT",
    "Block",
    "Attention",
    "Mlp",
    "GatedMlp",
    "Qwen3Mlp",
    "RMSNorm",
    "PatchEmbed",
    "PatchMerger",
    "Qwen3PatchMerger",
    "flops",
]
