"""FlashAttention's accuracy rule, shared by the kernel tests.

A kernel output passes when its error against a float64 reference is at most ``factor`` times the
error of the same-precision torch reference (2 for forward, 3 for backward), plus a floor of half an
ulp of the dtype at the reference's largest magnitude, so that a kernel is not failed by a single
rounding when the torch error happens to be tiny (the kernel, like FlashAttention on tensor cores,
rounds P and dS to the input dtype before their matmuls; torch's CPU SDPA keeps them in fp32).
Everything is measured as max |error|.
"""

from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def check_rule(
    name: str, out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor, factor: float
) -> float:
    """Assert the rule for one tensor; return the measured ratio err_kernel / err_torch."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), (
        f"{name}: non-finite values at {(~torch.isfinite(out)).nonzero()[:5].tolist()}"
    )
    err, err_torch = max_err(out, ref), max_err(out_torch, ref)
    floor = 0.5 * torch.finfo(out.dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    diff = (out.double() - ref.double()).abs()
    where = divmod(diff.argmax().item(), diff.shape[-1]) if diff.numel() else None
    assert err <= factor * err_torch + floor, (
        f"{name}: max err {err:.3e} (mean {diff.mean().item():.3e}, at flat row/col {where}) > "
        f"{factor} x torch err {err_torch:.3e} + floor {floor:.3e}"
    )
    return err / err_torch if err_torch > 0 else (0.0 if err == 0 else float("inf"))
