"""FLOP and byte counts of what the kernel benchmarks time (2 FLOPs per multiply-add everywhere).

Whole encoders are counted by the FLOP model (``NativeViT.flops_per_batch`` / ``nativevit.model.flops``);
this module counts only single ops, with the same attention term, plus a plain ViT (timm towers, which
have no merger and so no entry in the FLOP model).
"""

from __future__ import annotations

from collections.abc import Sequence

# Backward of attention over forward: five GEMMs the size of QK^T (dV, dP, dS->dQ, dS->dK and the
# recomputed QK^T) against the forward's two, 2.5x.
ATTENTION_BWD_FACTOR = 2.5


def padded_lengths(lengths: Sequence[int]) -> list[int]:
    """The padded baseline's segments: every non-empty segment padded to the longest."""
    longest = max(lengths, default=0)
    return [longest] * sum(1 for n in lengths if n > 0)


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, *, padded: bool = False) -> int:
    """Forward FLOPs of one block-diagonal attention layer: QK^T and PV, ``4 * L^2 * heads * head_dim``
    per segment of length L (each padded to the longest with ``padded=True``). Non-causal, so the
    same per-layer term as ``nativevit.model.flops``."""
    if padded:
        lengths = padded_lengths(lengths)
    return sum(4 * n * n * heads * head_dim for n in lengths)


def attention_bytes(total: int, heads: int, head_dim: int, elem: int, *, backward: bool = False) -> int:
    """Compulsory memory traffic of a fused varlen attention kernel on ``total`` tokens.

    Forward: q, k, v read, out written, fp32 log-sum-exp written. Backward: q, k, v, out, dout and the
    log-sum-exp read, dq, dk, dv written. ``elem``: bytes per element of q.
    """
    tensor = total * heads * head_dim * elem
    lse = total * heads * 4
    return (8 * tensor + lse) if backward else (4 * tensor + lse)


def rope_flops(total: int, heads: int, head_dim: int) -> int:
    """3 FLOPs per rotated element (``x1*cos - x2*sin``), q and k: ``6 * total * heads * head_dim``."""
    return 6 * total * heads * head_dim


def rope_bytes(total: int, heads: int, head_dim: int, elem: int) -> int:
    """A fused rotation's traffic: q and k read and written, fp32 cos and sin ``(total, head_dim/2)`` read.
    The backward (the inverse rotation) moves the same bytes."""
    return 4 * total * heads * head_dim * elem + 2 * total * (head_dim // 2) * 4


def vit_flops(
    patches: Sequence[int],
    *,
    prefix_tokens: int,
    depth: int,
    dim: int,
    mlp_hidden: int,
    patch_dim: int,
    padded: bool = False,
) -> dict[str, int]:
    """Forward FLOPs by term of a plain pre-norm ViT (no merger) on images of ``patches`` patches each.

    Every image's sequence is ``prefix_tokens`` (class/register tokens) plus its patches. ``padded=True``:
    every image padded to the most patches, as a padded batch runs it (its patch embedding multiplies
    the zero rows too). ``linear``: patch embedding, qkv, proj and the two MLP GEMMs; ``attention``:
    :func:`attention_flops` per block.
    """
    embedded = [max(patches)] * len(patches) if padded else list(patches)
    seen = [prefix_tokens + n for n in embedded]
    per_row_block = 2 * (4 * dim * dim + 2 * dim * mlp_hidden)
    linear = depth * sum(seen) * per_row_block + 2 * sum(embedded) * patch_dim * dim
    attention = depth * attention_flops(seen, 1, dim)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def module_flops(
    cfg, lengths: Sequence[int], *, padded: bool = False, window_lengths: Sequence[int] | None = None
) -> dict[str, int]:
    """Forward FLOPs of each module of a ``NativeViT`` with config ``cfg`` on segments of ``lengths``,
    keyed by the module's name in the model (``patch_embed``, ``blocks.{i}.attn``, ``blocks.{i}.mlp``,
    ``merger``, ``deepstack_merger_list.{j}``).

    The terms of ``nativevit.model.flops``, split by module (so the values sum to its ``total``):
    ``attn`` is qkv, proj and the attention itself (each windowed block over ``window_lengths``);
    ``padded=True`` is the padded baseline, whose blocks see every segment (window) padded to the
    longest while the patch embedding and mergers see the real tokens.
    """
    windowed = cfg.windowed_blocks
    if any(windowed) and window_lengths is None:
        raise ValueError("cfg has windowed blocks: pass window_lengths (see window_partition)")
    tokens = sum(lengths)
    frames = padded_lengths(lengths) if padded else list(lengths)
    windows = (padded_lengths(window_lengths) if padded else list(window_lengths)) if any(windowed) else []
    d, hid, unit = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.merge_unit
    rows = sum(frames)
    mlp_gemms = 3 if cfg.mlp_type == "swiglu" else 2
    merger = 2 * (tokens // unit) * (unit * d * unit * d + unit * d * cfg.out_hidden_size)
    out = {"patch_embed": 2 * tokens * cfg.patch_dim * d}
    for i in range(cfg.depth):
        segs = windows if windowed[i] else frames
        out[f"blocks.{i}.attn"] = 2 * rows * 4 * d * d + sum(4 * n * n * d for n in segs)
        out[f"blocks.{i}.mlp"] = 2 * rows * mlp_gemms * d * hid
    out["merger"] = merger
    for j in range(len(cfg.deepstack_visual_indexes)):
        out[f"deepstack_merger_list.{j}"] = merger
    return out


__all__ = [
    "ATTENTION_BWD_FACTOR",
    "module_flops",
    "attention_bytes",
    "attention_flops",
    "padded_lengths",
    "rope_bytes",
    "rope_flops",
    "vit_flops",
]
