"""Sample inputs shared by the kernel tests: the C++ CPU and CUDA tests (tests/test_csrc.py) and the
Triton tests (tests/kernels/) draw their segment layouts, head dims, q/k/v and rope tables from here.
"""

from __future__ import annotations

import torch

from nativevit.packing import Segments

# Segment lengths of one packed batch, small enough for the Triton interpreter.
LAYOUTS: dict[str, tuple[int, ...]] = {
    # 0- and 1-token segments among lengths that are no multiple of any block size
    "awkward": (37, 0, 1, 16, 45),
    # ... and one segment longer than the CPU kernel's 256-key block
    "zero-one-long": (37, 0, 1, 300, 5),
    "two-odd": (130, 17),
    "one-then-blocks": (1, 64, 129),
    "many-tiny": (3,) * 40 + (0, 1, 2),
    "120-segments": (3, 0, 1, 2, 5, 1, 0, 4) * 15,
    "skew": (97,) + (1, 2, 3, 0) * 15,
    "all-one-token": (1,) * 24,
    "empty-around-one": (0, 0, 33, 0),
    "one-exact-multiple": (64,),
}

# Image-sized layouts, for GPUs only (the interpreter would take minutes).
GPU_LAYOUTS: dict[str, tuple[int, ...]] = {
    "image-sized": (1024, 333, 77, 1, 0, 2048, 256),
    "mixed-batch": (2304, 1220, 980, 400, 400, 20),
    # 8k, not 16k: the fp64 reference materialises the score matrix (2 heads x 8k x 8k x 8 B = 1 GiB)
    "skew-8k": (8192,) + (64,) * 64,
}

# 80 is the main case (Qwen2-VL); 72 and 80 are not powers of two.
HEAD_DIMS = (64, 72, 80, 128)

# (layout, heads, head_dim): every layout and every head dim, for the kernels fast enough to run all.
CASES = [
    ("zero-one-long", 2, 80),
    ("two-odd", 3, 72),
    ("one-then-blocks", 2, 128),
    ("many-tiny", 2, 80),
    ("awkward", 2, 64),
    ("120-segments", 1, 72),
    ("skew", 2, 128),
    ("all-one-token", 3, 64),
    ("empty-around-one", 1, 80),
    ("one-exact-multiple", 2, 64),
]


def segments_of(lengths, device: torch.device | str = "cpu") -> Segments:
    return Segments(lengths, device)


def fused_qkv(total, heads, head_dim, dtype, *, seed=0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(total, 3, heads, head_dim)`` standard normal in ``dtype``: the encoder's fused qkv output,
    whose ``unbind(1)`` gives q, k, v as strided views (``stride(0) = 3 * heads * head_dim``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(total, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)


def qkv(lengths, heads, head_dim, dtype, *, seed=0, strided=True, device="cpu"):
    """``(q, k, v, segments)``: q, k, v ``(total, heads, head_dim)``, views of one fused buffer when
    ``strided``, else contiguous."""
    q, k, v = fused_qkv(sum(lengths), heads, head_dim, dtype, seed=seed, device=device).unbind(1)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, segments_of(lengths, device)


def rope_tables(total, head_dim, *, seed=1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``(total, head_dim // 2)`` float32 of random angles in [0, 50)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(total, head_dim // 2, generator=g) * 50
    return angles.cos().to(device), angles.sin().to(device)


def rotate_exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotate-half rotation of ``x`` ``(total, heads, head_dim)`` in float64, from the definition."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos[:, None, :].double(), sin[:, None, :].double()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
