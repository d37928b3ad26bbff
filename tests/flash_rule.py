"""FlashAttention's accuracy rule, shared by every kernel test (C++ CPU/CUDA and Triton).

A kernel output passes when its max |error| against a float64 reference is at most ``factor`` times
the max |error| of the same-precision torch reference (2 for a forward, 3 for a backward), plus a floor.

The floor keeps a kernel from failing on a single rounding when the torch error happens to be tiny.
By default it is half an ulp of the output dtype at the reference's largest magnitude: the Triton
kernel, like FlashAttention on tensor cores, rounds P and dS to the input dtype before their
matmuls, where torch's CPU SDPA keeps them in fp32. A test may pass a fixed ``floor`` instead; the
C++ kernel tests use ``ABS_FLOOR``, which is what they have always asserted.
"""

from __future__ import annotations

import torch

# Fixed floors of the C++ kernel tests, per output dtype.
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def ulp_floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Half an ulp of ``dtype`` at the largest magnitude of ``ref``."""
    return 0.5 * torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)


def check_rule(
    name: str,
    out: torch.Tensor,
    out_torch: torch.Tensor,
    ref: torch.Tensor,
    factor: float,
    *,
    floor: float | None = None,
) -> float:
    """Assert the rule for one tensor; return the measured ratio err_kernel / err_torch.

    ``out``: the kernel's output; ``out_torch``: the torch reference in the kernel's dtype; ``ref``: the
    float64 reference; ``floor``: an absolute floor (default :func:`ulp_floor` of ``out``'s dtype).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), (
        f"{name}: non-finite values at {(~torch.isfinite(out)).nonzero()[:5].tolist()}"
    )
    err, err_torch = max_err(out, ref), max_err(out_torch, ref)
    floor = ulp_floor(out.dtype, ref) if floor is None else floor
    diff = (out.double() - ref.double()).abs()
    where = divmod(diff.argmax().item(), diff.shape[-1]) if diff.numel() else None
    assert err <= factor * err_torch + floor, (
        f"{name}: max err {err:.3e} (mean {diff.mean().item():.3e}, at flat row/col {where}) > "
        f"{factor} x torch err {err_torch:.3e} + floor {floor:.3e}"
    )
    return err / err_torch if err_torch > 0 else (0.0 if err == 0 else float("inf"))
