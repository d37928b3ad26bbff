"""Kernel benchmarks: each backend of ``varlen_attention`` and ``apply_rope_2d``, forward and backward.

q, k and v are strided views of one fused ``(total, 3, heads, head_dim)`` buffer, as in the encoder.
Every backend that can run on the device takes part (the others are listed with the reason, from
``nativevit.ops.backend_status``); the backends of one case are timed in interleaved rounds.

Attention work is :func:`~nativevit.bench.flops.attention_flops` (useful work only: the ``padded``
backend is credited with the same FLOPs, so its lower rate is the cost of its padding); RoPE is
memory-bound, so its GB/s (:func:`~nativevit.bench.flops.rope_bytes`) is the number to read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..backends import backends as registered_backends
from ..packing import Segments
from .env import DTYPES, hardware_name
from .flops import ATTENTION_BWD_FACTOR, attention_bytes, attention_flops, rope_bytes, rope_flops
from .measure import Case, measure, mm_peak_flops
from .results import Row, roofline_row, shape

OPS = ("attention", "rope")


def unavailable_lines(op: str, device: torch.device) -> list[str]:
    """One line per registered backend of ``op`` that cannot run on ``device``, with the reason."""
    status = ops.backend_status(device)[op]
    return [f"  {name:>10}: unavailable ({why})" for name, why in sorted(status.items()) if why is not None]


def runnable_backends(op: str, device: torch.device) -> list[str]:
    """Registered backends of ``op`` that can run on ``device``, in registration order."""
    return ops.available_backends(device)[op]


def check_backends(op: str, names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that is not a registered backend of ``op``."""
    known = registered_backends(op)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {op} backend {name!r}; known: {', '.join(sorted(known))}")


@dataclass
class KernelRun:
    """Settings of one kernel benchmark run.

    ``cases``: ``(label, segment lengths)`` per batch; ``backends``: names, or None for every backend
    that can run on ``device``.
    """

    op: str
    device: str = "cpu"
    dtype: str = "fp32"
    heads: int = 16
    head_dim: int = 80
    cases: Sequence[tuple[str, Sequence[int]]] = ()
    backends: Sequence[str] | None = None
    backward: bool = True
    warmup: int = 1
    iters: int = 3


def _inputs(total: int, run: KernelRun, dtype, device, grad: bool):
    qkv = torch.randn(total, 3, run.heads, run.head_dim, device=device, dtype=dtype, requires_grad=grad)
    q, k, v = qkv.unbind(1)  # (total, heads, head_dim) views of one fused buffer, as in the encoder
    return qkv, q, k, v


def _step_fns(run: KernelRun, lengths: Sequence[int], name: str, tensors, device) -> dict[str, Callable]:
    """``{"fwd": ..., "bwd": ...}`` callables of backend ``name`` on one batch."""
    qkv, q, k, v = tensors
    total = sum(lengths)
    if run.op == "attention":
        segments = Segments(lengths, device)

        def forward():
            return ops.varlen_attention(q, k, v, segments, backend=name)

        grads = (torch.randn(total, run.heads, run.head_dim, device=device, dtype=q.dtype),)
    else:
        angles = torch.rand(total, run.head_dim // 2, device=device) * 100  # values do not change speed
        cos, sin = angles.cos(), angles.sin()

        def forward():
            return ops.apply_rope_2d(q, k, cos, sin, backend=name)

        grads = (torch.randn(total, run.heads, run.head_dim, device=device, dtype=q.dtype),) * 2

    def fwd():
        with torch.no_grad():
            return forward()

    fns = {"fwd": fwd}
    if run.backward:
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        fns["bwd"] = lambda: torch.autograd.grad(outs, qkv, grads, retain_graph=True)
    return fns


def work(run: KernelRun, lengths: Sequence[int], phase: str, elem: int) -> tuple[float, float]:
    """``(flops, bytes)`` of one call of ``phase`` ("fwd" or "bwd") on segments of ``lengths``."""
    total = sum(lengths)
    if run.op == "attention":
        flop = attention_flops(lengths, run.heads, run.head_dim)
        if phase == "bwd":
            flop *= ATTENTION_BWD_FACTOR
        return flop, attention_bytes(total, run.heads, run.head_dim, elem, backward=phase == "bwd")
    return rope_flops(total, run.heads, run.head_dim), rope_bytes(total, run.heads, run.head_dim, elem)


def bench_case(
    run: KernelRun, label: str, lengths: Sequence[int], names: Sequence[str], *, peak_flops: float
) -> tuple[list[Row], list[str]]:
    """Every backend of ``names`` on one batch: CSV rows and report lines."""
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    total = sum(lengths)
    tensors = _inputs(total, run, dtype, device, grad=run.backward)
    elem = torch.finfo(dtype).bits // 8
    where = shape(heads=run.heads, head_dim=run.head_dim, segments=label)
    lines, fns = [], {}
    for name in names:
        try:
            ops.resolve_backend(run.op, name, tensors[1])
        except (RuntimeError, ValueError) as e:  # a backend that cannot take this dtype or head dim
            lines.append(f"  {name:>10}: skipped ({e})")
            continue
        fns[name] = _step_fns(run, lengths, name, tensors, device)
    phases = ("fwd", "bwd") if run.backward else ("fwd",)
    seconds = {}
    for phase in phases:
        cases = [Case(name, f[phase]) for name, f in fns.items()]
        if cases:
            timings = measure(
                cases,
                warmup=run.warmup,
                iters=run.iters,
                device=device,
                memory=False,
                desc=f"{run.op} {label} {phase}",
            )
            seconds[phase] = {name: t.seconds for name, t in timings.items()}
    rows = []
    for name in fns:
        parts = []
        for phase in phases:
            s = seconds[phase][name]
            flop, nbytes = work(run, lengths, phase, elem)
            rows += [
                Row(run.op, name, run.dtype, where, f"{phase}_latency", s, "s"),
                Row(run.op, name, run.dtype, where, f"{phase}_gflops", flop / s / 1e9, "GFLOP/s"),
                Row(run.op, name, run.dtype, where, f"{phase}_gbps", nbytes / s / 1e9, "GB/s"),
                Row(run.op, name, run.dtype, where, f"{phase}_mm_fraction", flop / s / peak_flops),
            ]
            parts.append(
                f"{phase} {s * 1e3:9.3f} ms {flop / s / 1e9:9.2f} GFLOP/s {nbytes / s / 1e9:8.2f} GB/s "
                f"{100 * flop / s / peak_flops:6.2f}% of mm"
            )
        lines.append(f"  {name:>10}: " + " | ".join(parts))
    head = f"[{label}] {total} tokens, {len(lengths)} segments, {run.heads} heads, head dim {run.head_dim}"
    if run.op == "attention":
        padded = attention_flops(lengths, 1, 1, padded=True) / max(attention_flops(lengths, 1, 1), 1)
        head += f", padded/packed attention work {padded:.2f}x"
    return rows, [head, *lines]


def run_kernels(run: KernelRun, *, echo: Callable[[str], None] = print) -> list[Row]:
    """Time every backend on every case of ``run``, print the tables; returns the CSV rows."""
    if run.op not in OPS:
        raise ValueError(f"unknown op {run.op!r}; choose from {OPS}")
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    if run.backends is not None:
        check_backends(run.op, run.backends)
    for line in unavailable_lines(run.op, device):
        echo(line)
    names = list(run.backends) if run.backends is not None else runnable_backends(run.op, device)
    peak = mm_peak_flops(dtype, device)
    echo(f"torch.mm at {run.dtype}: {peak / 1e9:.1f} GFLOP/s on {hardware_name(device)}")
    rows = [roofline_row(run.op, run.dtype, peak)]
    for label, lengths in run.cases:
        case_rows, lines = bench_case(run, label, lengths, names, peak_flops=peak)
        rows += case_rows
        echo("\n".join(lines))
    return rows


def sweep_cases(seqlens: Sequence[int], total: int) -> list[tuple[str, list[int]]]:
    """Batches of equal segments: for each L, ``max(1, total // L)`` segments of L tokens."""
    return [(f"{n}x{max(1, total // n)}", [n] * max(1, total // n)) for n in seqlens]


def total_cases(totals: Sequence[int]) -> list[tuple[str, list[int]]]:
    """One segment of each total (RoPE does not see segments: only the token count matters)."""
    return [(str(n), [n]) for n in totals]


def mix_case(lengths: Sequence[int]) -> tuple[str, list[int]]:
    """A mixed batch labelled by its lengths (``"2304+1220+..."``)."""
    return "+".join(map(str, lengths)), list(lengths)


__all__ = [
    "OPS",
    "KernelRun",
    "bench_case",
    "check_backends",
    "mix_case",
    "run_kernels",
    "runnable_backends",
    "sweep_cases",
    "total_cases",
    "unavailable_lines",
    "work",
]
