"""The vision towers of the family table (``nativevit.config.FAMILIES``) over packed varlen batches.

    pixel_values (N, C*T*P*P) --PatchEmbed--> (N, D) [--embed_norm--] [+ learned positions]
        --depth x Block--> (N, D) [--post_norm--] --merger--> (N/m^2, out)

Every part is chosen by the tower's family entry (norm, MLP, merger, patch kernel, q/k/v layout,
biases, q/k norm, rotary layout, how a learned position table is resampled, windows, DeepStack, a
pooling head), from the registries below (``NORM_LAYERS``, ``MLP_LAYERS``, ``MERGER_LAYERS``,
``PATCH_LAYERS``) and ``nativevit.positions`` / ``nativevit.rope``; the model has no per-family branch.

Per forward, the batch metadata (``Segments``: cu_seqlens on device, max_seqlen on host) and the
2D rotary tables are built once from ``grid_thw``; every block reuses them, so no layer touches the
host. Attention and RoPE go through ``nativevit.ops``; the padded baseline is this same model with
``attn_backend="padded"``.

Qwen2.5-VL's window attention is a second ``Segments`` (one segment per window), built once per
batch with the permutation that makes every window contiguous (``WindowLayout``): the tokens are
permuted after the patch embedding, windowed blocks get the window segments and full-attention
blocks the frame segments (the permutation never crosses a frame), and the output is permuted back.
Qwen3-VL adds a learned position table resampled to each image and DeepStack mergers; towers without a
merger in the tower (Pixtral, SigLIP2, PaddleOCR-VL) return the final states.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backends import cpp
from .config import VisionConfig
from .packing import LAYOUTS, BatchPlan, PaddedWindows, Segments, check_grid_thw, plan_batch
from .positions import GridTable, position_kind
from .rope import rope_2d_ref


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


class PatchLinear(nn.Linear):
    """A linear patch embedding (SigLIP2), weight ``(D, C*P*P)`` over rows the processor flattens in
    ``(P, P, C)`` order (``row_layout="tppc"``); built from the convolutions' arguments."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size, stride, bias: bool = True):
        super().__init__(in_channels * math.prod(kernel_size), out_channels, bias=bias)


# The patch embedding's kernel as the releases hold it (``Family.patch_conv``).
PATCH_LAYERS: dict[str, type[nn.Module]] = {"conv3d": nn.Conv3d, "conv2d": nn.Conv2d, "linear": PatchLinear}


class PatchEmbed(nn.Module):
    """Conv3d (or Conv2d) patch embedding, kernel = stride = (T, P, P) (or (P, P)), applied as one matmul.

    Kernel and stride are equal, so the convolution is exactly ``rows @ W.view(D, C*T*P*P).T``
    over the processor's rows, which are already flattened in (C, T, P, P) order. The weight keeps
    the release's shape so checkpoints load unchanged: ``(D, C, T, P, P)`` for ``kind="conv3d"``,
    ``(D, C, P, P)`` for ``kind="conv2d"`` (still-image towers, ``temporal`` 1: the same rows).
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
        kind: str = "conv3d",
    ):
        super().__init__()
        if kind not in PATCH_LAYERS:
            raise ValueError(f"unknown patch embedding kind {kind!r}; known: {sorted(PATCH_LAYERS)}")
        if kind != "conv3d" and temporal != 1:
            raise ValueError(f"a {kind} patch embedding takes temporal_patch_size 1, got {temporal}")
        kernel = (temporal, patch, patch) if kind == "conv3d" else (patch, patch)
        self.proj = PATCH_LAYERS[kind](in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=bias)
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
        rope_pairs: str = "half",
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
        self.interleaved = rope_pairs == "interleaved"
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
        if self.interleaved:
            # pairs (2i, 2i+1) -> (i, i + hd/2): one copy of q and k, the same permutation of both, so the
            # attention scores are those of the release's complex rotation
            q, k = (t.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2) for t in (q, k))
        if cos is not None:
            if not self.rope_fp32 and q.dtype == torch.float64:
                q, k = rope_2d_ref(q, k, cos, sin, math_dtype=None)
            else:
                q, k = ops.apply_rope_2d(q, k, cos, sin, backend=self.rope_backend)
        if relayout is not None:
            q, k, v = (relayout.to_windows(t) for t in (q, k, v))
        backend = "padded" if segments.padded else self.attn_backend
        out = ops.varlen_attention(q, k, v, segments, scale=self.scale, backend=backend)
        if relayout is not None:
            out = relayout.to_frames(out)
        return self.proj(out.reshape(n, -1))


def _linear_act(fc: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(fc(x))``. For QuickGELU on the CPU in float32 or bfloat16 with no autograd recording, not
    under ``torch.compile`` (inductor fuses the elementwise tail itself) and with the C++ extension
    built: a bias-free matmul, then the bias and QuickGELU in one in-place pass over the widest
    activation (``nativevit::cpp_bias_quick_gelu_``), where addmm's broadcast copy of the bias and
    three elementwise passes were 4.5% of a bf16 forward."""
    if (
        isinstance(act, QuickGELU)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and fc.weight.dtype == x.dtype
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and cpp.is_built()
    ):
        h = torch.mm(x.reshape(-1, x.shape[-1]), fc.weight.t())
        torch.ops.nativevit.cpp_bias_quick_gelu_(h, fc.bias)
        return h.view(*x.shape[:-1], -1)
    return act(fc(x))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_linear_act(self.fc1, self.act, x))


class Qwen3Mlp(nn.Module):
    """Qwen3-VL's two-layer MLP, under the release's names ``linear_fc1`` / ``linear_fc2``."""

    def __init__(self, *, dim: int, hidden_dim: int, act: str, bias: bool = True):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = _activation(act)
        self.linear_fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(_linear_act(self.linear_fc1, self.act, x))


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
            qkv=cfg.qkv,
            qkv_bias=cfg.qkv_bias,
            proj_bias=cfg.proj_bias,
            qk_norm=cfg.norm_type if fam.qk_norm else None,
            eps=cfg.norm_eps,
            rope_fp32=fam.rope_fp32,
            rope_pairs=cfg.rope_pairs,
        )
        self.norm2 = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)
        mlp_layer = mlp_layer or mlp_layer_for(cfg)
        self.mlp = mlp_layer(
            dim=cfg.embed_dim, hidden_dim=cfg.mlp_hidden_dim, act=cfg.hidden_act, bias=cfg.mlp_bias
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


class GlmPatchMerger(nn.Module):
    """GLM-4V / GLM-OCR's merger: each ``m x m`` block of rows becomes one vector through ``downsample``
    (a Conv2d to ``out_dim`` with kernel = stride = ``m`` and a bias, run as one matmul over the block's
    rows), then ``proj`` (no bias), the LayerNorm ``post_projection_norm`` (eps 1e-5), GELU, and a
    SwiGLU of width ``context_dim`` (``gate_proj``/``up_proj``/``down_proj``, no biases, activation
    ``act``). :meth:`reduce` is the downsampling (what transformers returns as ``last_hidden_state``),
    :meth:`head` the rest. ``eps`` and ``norm`` (the tower's) are not used: GLM's merger norm is its own.
    """

    def __init__(
        self,
        *,
        dim: int,
        out_dim: int,
        merge_size: int,
        eps: float,
        norm: str = "layernorm",
        context_dim: int,
        act: str,
    ):
        super().__init__()
        self.dim = dim
        self.merge_size = merge_size
        self.downsample = nn.Conv2d(dim, out_dim, kernel_size=merge_size, stride=merge_size)
        self.proj = nn.Linear(out_dim, out_dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(out_dim)
        self.gate_proj = nn.Linear(out_dim, context_dim, bias=False)
        self.up_proj = nn.Linear(out_dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, out_dim, bias=False)
        self.act1 = nn.GELU()
        self.act_fn = _activation(act)

    @staticmethod
    def config_arguments(cfg: VisionConfig) -> dict:
        """The arguments this merger takes beyond ``merger_arguments``' common ones."""
        if cfg.merger_intermediate_size is None:
            raise ValueError(
                f"a {cfg.model_type} tower needs merger_intermediate_size (the merger's SwiGLU width)"
            )
        return {"context_dim": cfg.merger_intermediate_size, "act": cfg.hidden_act}

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` rows in merge-block order -> ``(N/m^2, out_dim)``: the Conv2d over each block."""
        weight = self.downsample.weight  # (out, dim, m, m)
        blocks = x.view(-1, self.merge_size**2, self.dim).transpose(1, 2).reshape(-1, weight[0].numel())
        return F.linear(blocks, weight.view(weight.shape[0], -1), self.downsample.bias)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reduce(x))  # (N/m^2, out_dim)


class ResamplerMlp(nn.Module):
    """One stage of ERNIE-4.5-VL's resampler: ``ln(fc2(gelu(fc1(x))))``."""

    def __init__(self, *, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc2(self.act(self.fc1(x))))


class VariableResolutionResampler(nn.Module):
    """ERNIE-4.5-VL's resampler (a module of its own beside the tower in the releases): each 2x2 block
    of consecutive rows -> one vector (``spatial_linear``), then the two frames of each pair of frames
    side by side (``temporal_linear``; a still image is paired with itself), then ``mlp`` to the
    language model's width and an RMSNorm (``after_norm``, eps ``out_eps``: the text model's).

    The pairing needs each image's frame count, so the merger takes the batch plan (``uses_plan``):
    ``(N, D)`` rows in input order -> ``(sum over images of h*w/m^2 * max(1, t/2), out_dim)``. Videos
    have an even number of frames (the releases' video processor repeats the last frame of an odd one).
    """

    uses_plan = True
    temporal = 2  # frames merged per token; transformers' pairing is written for 2 only

    def __init__(
        self,
        *,
        dim: int,
        out_dim: int,
        merge_size: int,
        eps: float,
        norm: str = "layernorm",
        out_eps: float | None = None,
    ):
        super().__init__()
        self.unit = merge_size**2
        self.hidden = dim * self.unit
        self.spatial_linear = ResamplerMlp(in_dim=self.hidden, out_dim=self.hidden, eps=eps)
        self.temporal_linear = ResamplerMlp(in_dim=self.hidden * self.temporal, out_dim=self.hidden, eps=eps)
        self.mlp = nn.Linear(self.hidden, out_dim)
        self.after_norm = RMSNorm(out_dim, eps=eps if out_eps is None else out_eps)

    @staticmethod
    def config_arguments(cfg: VisionConfig) -> dict:
        return {"out_eps": cfg.merger_norm_eps}

    def frame_pairs(self, grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (of the spatially merged rows) of the first and second frame of every pair, in
        output order: images in batch order, pairs in time order, merge blocks in row order."""
        first, second, offset = [], [], 0
        for t, h, w in grid:
            n = h * w // self.unit
            if t > 1 and t % self.temporal:
                raise ValueError(
                    f"a video of {t} frames (grid {t}x{h}x{w}): the resampler pairs frames, so videos need "
                    "an even number of frames (repeat the last one, as the releases' video processor does)"
                )
            for a in range(0, t, self.temporal):
                b = a + 1 if t > 1 else a
                first.append(torch.arange(offset + a * n, offset + (a + 1) * n))
                second.append(torch.arange(offset + b * n, offset + (b + 1) * n))
            offset += t * n
        return torch.cat(first).to(device), torch.cat(second).to(device)

    def forward(self, x: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        if plan.grid is None:
            raise ValueError("the resampler needs the batch's grids: a plan built from grid_thw")
        return self.resample(x, plan.grid)

    def resample(self, x: torch.Tensor, grid) -> torch.Tensor:
        """``(N, D)`` rows in input order of images with ``(t, h, w)`` grids -> the merged tokens."""
        x = self.spatial_linear(x.view(-1, self.hidden))  # (N/m^2, m^2 D)
        first, second = self.frame_pairs(grid, x.device)
        x = self.temporal_linear(torch.cat([x.index_select(0, first), x.index_select(0, second)], dim=-1))
        return self.after_norm(self.mlp(x))  # (tokens, out_dim)


class TemporalPoolMerge(nn.Module):
    """Kimi-K2.5's merge, no weights: each clip's frames averaged, then every 2x2 block of patches (rows
    already in block order) side by side: ``(N, D)`` -> ``(N_frame / 4, 4 * D)`` with ``N_frame`` the rows
    of one frame per clip. transformers' ``pooler_output`` is this as ``(N_frame / 4, 4, D)``.

    The average runs in float32 whatever the dtype and is cast back, frame by frame in frame order, as
    transformers' ``index_add_`` does (a float64 tower's output is float32-rounded there too)."""

    uses_plan = True

    def __init__(self, *, dim: int, out_dim: int, merge_size: int, eps: float, norm: str = "layernorm"):
        super().__init__()
        self.unit = merge_size**2
        if out_dim != dim * self.unit:
            raise ValueError(
                f"a weight-free {merge_size}x{merge_size} merge gives {dim * self.unit} features per token "
                f"(embed_dim {dim} x {self.unit}), not out_hidden_size {out_dim}"
            )

    def forward(self, x: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        dim = x.shape[-1]
        if all(t == 1 for t, _, _ in plan.grid):
            pooled = x.float()
        else:
            clips, start = [], 0
            for t, h, w in plan.grid:
                frames = x[start : start + t * h * w].float().view(t, h * w, dim)
                weight = 1.0 / torch.tensor(float(t))  # in float32, as transformers divides
                acc = frames[0] * weight
                for f in range(1, t):
                    acc = acc + frames[f] * weight
                clips.append(acc)
                start += t * h * w
            pooled = torch.cat(clips)
        return pooled.to(x.dtype).view(-1, self.unit * dim)


MERGER_LAYERS: dict[str, type[nn.Module]] = {
    "qwen2": PatchMerger,
    "qwen3": Qwen3PatchMerger,
    "none": NoMerger,
    "glm": GlmPatchMerger,
    "ernie": VariableResolutionResampler,
    "kimi": TemporalPoolMerge,
}


class PoolingAttention(nn.Module):
    """The projections of ``nn.MultiheadAttention`` under its names (``in_proj_weight`` ``(3D, D)`` and
    ``in_proj_bias``: q, k, v stacked; ``out_proj``), the layout SigLIP's pooling head is released in."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling: a learned ``probe`` attends over the rows of each segment
    (one query per image), then ``y + mlp(layernorm(y))``; transformers' names (``probe``,
    ``attention``, ``layernorm``, ``mlp``).

    Packed: the single query needs no attention kernel; the softmax runs per segment with scatter
    reductions over the ``(N, heads)`` scores, so no image is padded.
    """

    def __init__(self, *, dim: int, num_heads: int, hidden_dim: int, act: str, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = PoolingAttention(dim)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden_dim=hidden_dim, act=act)

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
        """``(N, D)`` rows and their ``(N,)`` segment index -> ``(num_segments, D)``."""
        n, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w, b = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = F.linear(self.probe.view(1, dim), w[:dim], b[:dim]).view(heads, head_dim) * head_dim**-0.5
        k, v = F.linear(x, w[dim:], b[dim:]).view(n, 2, heads, head_dim).unbind(1)  # 2 x (N, H, hd)
        scores = (k * q).sum(-1)  # (N, H)
        index = segment_ids[:, None].expand(n, heads)
        top = scores.new_full((num_segments, heads), -math.inf).scatter_reduce(0, index, scores, "amax")
        e = (scores - top.index_select(0, segment_ids)).exp()
        total = e.new_zeros(num_segments, heads).index_add_(0, segment_ids, e)
        weights = e / total.index_select(0, segment_ids)
        out = v.new_zeros(num_segments, heads, head_dim).index_add_(0, segment_ids, weights[..., None] * v)
        out = self.attention.out_proj(out.view(num_segments, dim))
        return out + self.mlp(self.layernorm(out))


class NativeViT(nn.Module):
    """A vision tower of the family table (Qwen2-VL by default) over a packed batch.

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
            kind=cfg.family.patch_conv,
        )
        fam = cfg.family
        self.embed_norm = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if fam.embed_norm else None
        # a square learned position table, resampled to each image (see nativevit.positions)
        self.position = position_kind(fam.position) if cfg.num_position_embeddings else None
        self.pos_embed = None
        if cfg.num_position_embeddings:
            self.pos_embed = self.position.table(cfg.num_position_embeddings, cfg.embed_dim)
        self.blocks = nn.ModuleList(
            [Block(cfg, attn_backend=attn_backend, rope_backend=rope_backend) for _ in range(cfg.depth)]
        )
        merger = merger_arguments(cfg)
        self.post_norm = _norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if fam.post_norm else None
        self.merger = MERGER_LAYERS[fam.merger](**merger)
        if cfg.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                [Qwen3PatchMerger(**merger, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes]
            )
        self.head = None
        if cfg.pooling_head:
            self.head = AttentionPoolingHead(
                dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                hidden_dim=cfg.mlp_hidden_dim,
                act=cfg.hidden_act,
                eps=cfg.norm_eps,
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
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (nn.Embedding, GridTable)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            elif isinstance(m, PoolingAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=std, a=-2 * std, b=2 * std)
                m.in_proj_bias.zero_()
            elif isinstance(m, AttentionPoolingHead):
                nn.init.trunc_normal_(m.probe, std=std, a=-2 * std, b=2 * std)

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
        if cfg.max_frames and max(t for t, _, _ in grid) > cfg.max_frames:
            raise ValueError(
                f"grid_thw has a clip of {max(t for t, _, _ in grid)} frames; this tower takes at most "
                f"{cfg.max_frames} (max_frames, its time table's rows)"
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
            clip_attention=cfg.family.clip_attention,
        )

    def pool(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``(N, embed_dim)`` final states (:meth:`forward_features`) -> ``(S, embed_dim)``, one vector per
        frame (per still image) through the pooling head (SigLIP2's ``pooler_output``)."""
        if self.head is None:
            raise ValueError(
                f"this {self.config.model_type} tower has no pooling head (VisionConfig.pooling_head)"
            )
        grid = check_grid_thw(grid_thw, self.config.spatial_merge_size)
        lengths = [h * w for t, h, w in grid for _ in range(t)]
        if features.dim() != 2 or features.shape[0] != sum(lengths):
            raise ValueError(
                f"features must be the (N, embed_dim) states of grid_thw's {sum(lengths)} patches, got "
                f"{tuple(features.shape)}"
            )
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return self.head(features, ids.to(features.device), len(lengths))

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
        plan = self._prepare(pixel_values, grid_thw, plan, layout)
        x, deepstack = self._run(pixel_values, plan, return_deepstack)
        tokens = self.merge(x, plan)
        return (tokens, deepstack) if return_deepstack else tokens

    def merge(self, x: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """The merger over ``x``, the final ``(N, embed_dim)`` states in input order of the batch that
        ``plan`` describes; a merger that needs the batch's grids (``uses_plan``) gets the plan too."""
        return self.merger(x, plan) if getattr(self.merger, "uses_plan", False) else self.merger(x)

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
        plan = plan_batch(
            grid_thw,
            merge_size=cfg.spatial_merge_size,
            window=window,
            clip_attention=cfg.family.clip_attention,
        )
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
        """Load a tower from a checkpoint directory in its family's release layout (what the releases and
        ``save_pretrained`` write). See checkpoint.py."""
        from .checkpoint import load_pretrained

        return load_pretrained(
            cls, path, attn_backend=attn_backend, rope_backend=rope_backend, dtype=dtype, device=device
        )

    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
        """Write the family's release layout: ``config.json`` (top-level ``model_type``, ``vision_config``
        in the release's field names) and safetensors shards, keys under ``visual.`` / ``model.visual.``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)


def merger_arguments(cfg: VisionConfig) -> dict:
    """The keyword arguments every ``MERGER_LAYERS`` class is built with, by the model and by the FLOP
    model alike; a merger that needs more of the config gets it added here."""
    args = dict(
        dim=cfg.embed_dim,
        out_dim=cfg.out_hidden_size,
        merge_size=cfg.spatial_merge_size,
        eps=cfg.norm_eps,
        norm=cfg.norm_type,
    )
    extra = getattr(MERGER_LAYERS[cfg.family.merger], "config_arguments", None)
    if extra is not None:  # a merger that reads more of the config (GLM: its SwiGLU width, activation)
        args.update(extra(cfg))
    return args


def merger_weights(cfg: VisionConfig) -> int:
    """Multiply-adds per merged token of ``cfg``'s merger: the elements of its weight matrices and
    kernels (counted on a meta-device instance, so every merger kind is counted the same way)."""
    with torch.device("meta"):
        layer = MERGER_LAYERS[cfg.family.merger](**merger_arguments(cfg))
    return sum(p.numel() for p in layer.parameters() if p.dim() >= 2)


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
    merger = 2 * (tokens // unit) * merger_weights(cfg) * (1 + len(cfg.deepstack_visual_indexes))
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
    "AttentionPoolingHead",
    "flops",
]
