"""The ``flash_attn`` attention backend: ``flash_attn_varlen_func`` when that package is installed."""

from __future__ import annotations

import torch

from ..packing import Segments
from .registry import Backend, register_backend


def _unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return "flash_attn runs on CUDA GPUs only"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash_attn package is not installed"
    return None


def _rejects(x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn takes fp16/bf16 only, got {x.dtype}"
    return None


def flash_attn_attention(q, k, v, segments: Segments, scale: float) -> torch.Tensor:
    """``(total, heads, head_dim)`` fp16/bf16 -> same shape, through ``flash_attn_varlen_func``."""
    from flash_attn import flash_attn_varlen_func

    cu = segments.cu_seqlens
    return flash_attn_varlen_func(
        q, k, v, cu, cu, segments.max_seqlen, segments.max_seqlen, softmax_scale=scale
    )


register_backend("attention", Backend("flash_attn", flash_attn_attention, _unavailable, _rejects))
