"""Kernel benchmarks: ``varlen_attention`` and ``apply_rope_2d``, forward and backward, through our
backends and (``peers=True``, the ``nativevit kernels`` command) the peers' ways of running them.

q, k and v are strided views of one fused ``(total, 3, heads, head_dim)`` buffer, as in the encoder.
Implementations are :class:`~nativevit.bench.peers.Impl`; one that cannot run on the device, refuses
the dtype or head dim, or fails is listed with the reason (a ``skipped`` CSV row), never dropped. The
implementations of one case are timed in interleaved rounds (forward, then backward).

Per implementation and phase: median and minimum time, TFLOP/s and GB/s of the useful work
(:mod:`~nativevit.bench.flops`: the padded peer is credited with the same FLOPs, so its lower rate is
the cost of its padding), the fraction of the ``torch.mm`` rate at the same dtype measured in the same
run, and the largest absolute error against a float64 reference (the output for the forward; dq, dk,
dv for the backward, with one upstream gradient shared by every implementation). RoPE is
memory-bound: its GB/s is the number to read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..preprocess import ImageProcessor
from ..rope import rope_2d_ref
from .encoder import DEFAULT_MAX_PIXELS
from .env import DTYPES, hardware_name, quiet_cpu_compile
from .flops import ATTENTION_BWD_FACTOR, attention_bytes, attention_flops, rope_bytes, rope_flops
from .images import set_segments
from .measure import Case, Timing, measure, mm_peak_flops
from .peers import EXCLUDED, Impl, Prepared, Problem, impls
from .results import Row, roofline_row, shape

OPS = ("attention", "rope")
PHASES = ("fwd", "bwd")
HEAD_DIMS = (64, 72, 80, 128)
# Segment-length mixes beside the image sets: equal lengths, and one long segment with many short ones.
MIXES = {"mix-uniform": [1024] * 16, "mix-skewed": [16384] + [256] * 32}
QUICK_MIXES = {"mix-uniform": [512] * 4, "mix-skewed": [1024] + [64] * 16}


@dataclass
class KernelRun:
    """Settings of one kernel benchmark run: one op, dtype and head dim over ``cases``.

    ``cases``: ``(label, segment lengths)`` per batch; ``impls``: names, or None for every
    implementation that can run (our backends, plus the peers' with ``peers``); ``errors``: compare
    with the float64 reference.
    """

    op: str
    device: str = "cpu"
    dtype: str = "fp32"
    heads: int = 16
    head_dim: int = 80
    cases: Sequence[tuple[str, Sequence[int]]] = ()
    impls: Sequence[str] | None = None
    peers: bool = False
    backward: bool = True
    warmup: int = 1
    iters: int = 3
    errors: bool = True


def check_impls(op: str, names: Sequence[str], *, peers: bool = True) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that is not an implementation of ``op``."""
    known = [i.name for i in impls(op, peers=peers)]
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {op} implementation {name!r}; known: {', '.join(known)}")


def select(run: KernelRun) -> tuple[list[Impl], list[tuple[str, str]]]:
    """``(implementations to run, [(name, why not), ...])`` for ``run`` on its device."""
    device = torch.device(run.device)
    chosen, left_out = [], []
    for impl in impls(run.op, peers=run.peers):
        if run.impls is not None and impl.name not in run.impls:
            continue
        if run.impls is None and run.peers and impl.name in EXCLUDED:
            left_out.append((impl.name, "left out: " + EXCLUDED[impl.name]))
            continue
        why = impl.unavailable(device)
        if why is not None:
            left_out.append((impl.name, f"unavailable: {why}"))
        else:
            chosen.append(impl)
    return chosen, left_out


def work(
    op: str, lengths: Sequence[int], heads: int, head_dim: int, phase: str, elem: int
) -> tuple[float, float]:
    """``(flops, bytes)`` of one call of ``phase`` ("fwd" or "bwd") of ``op`` on segments of ``lengths``."""
    total = sum(lengths)
    if op == "attention":
        flop = attention_flops(lengths, heads, head_dim)
        if phase == "bwd":
            flop *= ATTENTION_BWD_FACTOR
        return flop, attention_bytes(total, heads, head_dim, elem, backward=phase == "bwd")
    return rope_flops(total, heads, head_dim), rope_bytes(total, heads, head_dim, elem)


# Elements of the largest score matrix the float64 attention reference holds at once (256 MiB).
REFERENCE_CHUNK = 1 << 25


def _attention_fp64(p: Problem, dout: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output (and with ``dout`` the qkv gradient) in float64: softmax attention within each
    segment by SDPA's math, one block of query rows at a time. Query rows are independent and dk, dv
    sum over them, so memory stays at :data:`REFERENCE_CHUNK` scores whatever the segment length (a
    16k-token segment in one piece would hold 16 x 16k x 16k fp64 scores, 34 GB)."""
    grad_on = dout is not None
    qkv = p.qkv.detach().double()
    out = torch.empty(p.total, p.heads, p.head_dim, dtype=torch.float64, device=p.device)
    grad = torch.zeros_like(qkv) if grad_on else None
    start = 0
    for n in p.lengths:
        rows = max(1, REFERENCE_CHUNK // max(1, p.heads * n))
        for a in range(start, start + n, rows):
            b = min(a + rows, start + n)
            q = qkv[a:b, 0].clone().requires_grad_(grad_on)
            k = qkv[start : start + n, 1].clone().requires_grad_(grad_on)
            v = qkv[start : start + n, 2].clone().requires_grad_(grad_on)
            with torch.enable_grad() if grad_on else torch.no_grad():
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=p.scale
                ).transpose(0, 1)  # (rows, heads, head_dim)
            out[a:b] = o.detach()
            if grad_on:
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), dout[a:b].double())
                grad[a:b, 0] += dq
                grad[start : start + n, 1] += dk
                grad[start : start + n, 2] += dv
        start += n
    return out, grad


def reference(p: Problem, douts: tuple[torch.Tensor, ...], backward: bool):
    """``(outputs, qkv gradient or None)`` in float64, the yardstick of every implementation."""
    if p.op == "attention":
        out, grad = _attention_fp64(p, douts[0] if backward else None)
        return (out,), grad
    qkv = p.qkv.detach().double().requires_grad_(backward)
    q, k, v = qkv.unbind(1)
    with torch.enable_grad() if backward else torch.no_grad():
        outs = rope_2d_ref(q, k, p.cos, p.sin, math_dtype=torch.float64)
    grad = None
    if backward:
        (grad,) = torch.autograd.grad(outs, qkv, tuple(d.double() for d in douts))
    return tuple(o.detach() for o in outs), grad


def _max_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(
        float((g.double() - w).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want, strict=True)
    )


@dataclass
class _Ready:
    impl: Impl
    prepared: Prepared
    steps: dict[str, Callable]
    errors: dict[str, float]


def _prepare(impl: Impl, p: Problem, douts, ref, run: KernelRun) -> tuple[_Ready | None, list[str]]:
    """Build ``impl``'s calls on ``p``, run each phase once (its warm-up and compilation) and measure its
    error; returns the ready calls (None if not even the forward runs) and the reasons of what failed."""
    problems = []
    why = impl.rejects(p)
    if why is not None:
        return None, [f"refuses this input: {why}"]
    try:
        prepared = impl.prepare(p.detached())
        with torch.no_grad():
            outs = prepared.outputs(prepared.forward())
    except Exception as e:  # a peer's own limits: reported, not fatal
        return None, [f"forward failed: {_one_line(e)}"]
    errors = {"fwd": _max_err(outs, ref[0])} if ref is not None else {}

    def fwd():
        with torch.no_grad():
            return prepared.forward()

    steps = {"fwd": fwd}
    if run.backward:
        try:
            with_grad = impl.prepare(p)
            graph_outs = with_grad.forward()
            graph_outs = graph_outs if isinstance(graph_outs, tuple) else (graph_outs,)
            gouts = with_grad.grad_outputs(douts)
            grads = torch.autograd.grad(graph_outs, with_grad.inputs, gouts, retain_graph=True)
            if ref is not None:
                errors["bwd"] = _max_err((with_grad.input_grads(grads),), (ref[1],))
            steps["bwd"] = lambda: torch.autograd.grad(graph_outs, with_grad.inputs, gouts, retain_graph=True)
        except Exception as e:
            problems.append(f"backward failed: {_one_line(e)}")
    return _Ready(impl, prepared, steps, errors), problems


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def bench_case(
    run: KernelRun, label: str, lengths: Sequence[int], chosen: Sequence[Impl], *, peak_flops: float
) -> tuple[list[Row], list[str]]:
    """Every implementation of ``chosen`` on one batch: CSV rows and report lines."""
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    p = Problem.make(run.op, lengths, run.heads, run.head_dim, dtype, device, grad=run.backward)
    g = torch.Generator().manual_seed(1)
    n_outs = 1 if run.op == "attention" else 2
    douts = tuple(
        torch.randn(p.total, run.heads, run.head_dim, generator=g).to(device=device, dtype=dtype)
        for _ in range(n_outs)
    )
    ref = reference(p, douts, run.backward) if run.errors else None
    where = shape(
        heads=run.heads,
        head_dim=run.head_dim,
        set=label,
        tokens=p.total,
        segments=len(lengths),
        longest=max(lengths),
    )
    elem = torch.finfo(dtype).bits // 8
    rows, notes, ready = [], {}, []
    for impl in chosen:
        r, problems = _prepare(impl, p, douts, ref, run)
        if r is not None:
            ready.append(r)
        if problems:
            notes[impl.name] = problems
            rows += [Row(run.op, impl.name, run.dtype, where, "skipped", why) for why in problems]
    timings: dict[str, dict[str, Timing]] = {}
    for phase in PHASES if run.backward else ("fwd",):
        cases = [Case(r.impl.name, r.steps[phase]) for r in ready if phase in r.steps]
        if cases:
            timings[phase] = measure(
                cases,
                warmup=run.warmup,
                iters=run.iters,
                device=device,
                memory=False,
                desc=f"{run.op} {label} {run.dtype} d{run.head_dim} {phase}",
            )
    lines = []
    for r in ready:
        name = r.impl.name
        if r.prepared.setup_seconds is not None:
            rows.append(Row(run.op, name, run.dtype, where, "setup_time", r.prepared.setup_seconds, "s"))
        parts = []
        for phase, by_name in timings.items():
            t = by_name.get(name)
            if t is None:
                continue
            flop, nbytes = work(run.op, lengths, run.heads, run.head_dim, phase, elem)
            s = t.seconds
            rows += [
                Row(run.op, name, run.dtype, where, f"{phase}_latency", s, "s"),
                Row(run.op, name, run.dtype, where, f"{phase}_min_latency", t.min_seconds, "s"),
                Row(run.op, name, run.dtype, where, f"{phase}_tflops", flop / s / 1e12, "TFLOP/s"),
                Row(run.op, name, run.dtype, where, f"{phase}_gbps", nbytes / s / 1e9, "GB/s"),
                Row(run.op, name, run.dtype, where, f"{phase}_mm_fraction", flop / s / peak_flops),
            ]
            err = r.errors.get(phase)
            if err is not None:
                rows.append(Row(run.op, name, run.dtype, where, f"{phase}_max_err", err))
            parts.append(
                f"{phase} {1e3 * s:9.3f} ms (min {1e3 * t.min_seconds:8.3f}) {flop / s / 1e12:7.4f} TFLOP/s "
                f"{nbytes / s / 1e9:7.2f} GB/s {100 * flop / s / peak_flops:5.1f}% mm"
                + (f" err {err:.1e}" if err is not None else "")
            )
        setup = r.prepared.setup_seconds
        extra = f" | setup {1e3 * setup:.2f} ms" if setup is not None and setup > 0 else ""
        lines.append(f"  {name:>22}: " + " | ".join(parts) + extra)
    for name, problems in notes.items():
        lines += [f"  {name:>22}: {why}" for why in problems]
    head = (
        f"[{run.op} {run.dtype} head_dim {run.head_dim} | {label}] {p.total} tokens, {len(lengths)} segments "
        f"(longest {max(lengths)}), {run.heads} heads"
    )
    if run.op == "attention":
        padded = attention_flops(lengths, 1, 1, padded=True) / max(attention_flops(lengths, 1, 1), 1)
        head += f", padded/packed attention work {padded:.2f}x"
    return rows, [head, *lines]


def run_kernels(
    run: KernelRun,
    *,
    echo: Callable[[str], None] = print,
    peak_flops: float | None = None,
    list_left_out: bool = True,
) -> list[Row]:
    """Time every chosen implementation on every case of ``run``, print the tables; returns the CSV
    rows (the roofline row first). ``peak_flops``: the ``torch.mm`` rate at the dtype, measured here
    when not given; ``list_left_out``: print the implementations that do not run, with the reason
    (they get ``skipped`` rows either way)."""
    if run.op not in OPS:
        raise ValueError(f"unknown op {run.op!r}; choose from {OPS}")
    if run.impls is not None:
        check_impls(run.op, run.impls, peers=run.peers)
    device, dtype = torch.device(run.device), DTYPES[run.dtype]
    chosen, left_out = select(run)
    peak = mm_peak_flops(dtype, device) if peak_flops is None else peak_flops
    rows = [roofline_row(run.op, run.dtype, peak)]
    where = shape(heads=run.heads, head_dim=run.head_dim)
    for name, why in left_out:
        if list_left_out:
            echo(f"  {name:>22}: {why}")
        rows.append(Row(run.op, name, run.dtype, where, "skipped", why))
    for label, lengths in run.cases:
        case_rows, lines = bench_case(run, label, lengths, chosen, peak_flops=peak)
        rows += case_rows
        echo("\n".join(lines))
    return rows


# ----------------------------------------------------------------------------- the suite (nativevit kernels)


def set_cases(names: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, list[int]]]:
    """``(label, segment lengths)`` of built-in image sets (one segment per frame) as the Qwen2-VL
    processor with ``max_pixels`` grids them; labels carry ``@<merged tokens>tok`` off the default."""
    proc = ImageProcessor(max_pixels=max_pixels)
    suffix = "" if max_pixels == DEFAULT_MAX_PIXELS else f"@{max_pixels // (28 * 28)}tok"
    return [(name + suffix, [n for item in set_segments(name, proc) for n in item]) for name in names]


@dataclass
class KernelSuite:
    """``nativevit kernels``: every op x dtype x head dim over the same cases, peers included."""

    ops: Sequence[str] = OPS
    device: str = "cpu"
    dtypes: Sequence[str] = ("fp32", "bf16")
    head_dims: Sequence[int] = HEAD_DIMS
    heads: int = 16
    cases: Sequence[tuple[str, Sequence[int]]] = ()
    impls: Sequence[str] | None = None
    backward: bool = True
    warmup: int = 1
    iters: int = 3


def run_suite(suite: KernelSuite, *, echo: Callable[[str], None] = print) -> list[Row]:
    """Run ``suite``; the ``torch.mm`` rate of each dtype is measured once, first. Returns the CSV rows."""
    device = torch.device(suite.device)
    quiet_cpu_compile(device)  # FlexAttention is compiled
    peaks = {dtype: mm_peak_flops(DTYPES[dtype], device) for dtype in suite.dtypes}
    echo(
        f"nativevit kernels on {hardware_name(device)} ({device}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; torch.mm (2048^3) "
        + ", ".join(f"{d} {peaks[d] / 1e12:.3f} TFLOP/s" for d in suite.dtypes)
    )
    rows = []
    # FlexAttention compiles (forward, backward) once per dtype and head dim: possibly more than
    # dynamo's default limit of 8 graphs per function
    with _recompile_limit(4 * len(suite.dtypes) * len(suite.head_dims) + 8):
        for op in suite.ops:
            first = True
            for dtype in suite.dtypes:
                for head_dim in suite.head_dims:
                    run = KernelRun(
                        op,
                        device=suite.device,
                        dtype=dtype,
                        heads=suite.heads,
                        head_dim=head_dim,
                        cases=suite.cases,
                        impls=None if suite.impls is None else [n for n in suite.impls if n in _names(op)],
                        peers=True,
                        backward=suite.backward,
                        warmup=suite.warmup,
                        iters=suite.iters,
                    )
                    echo("")
                    if first:
                        echo(f"{op}: what does not run here, and why")
                    rows += run_kernels(run, echo=echo, peak_flops=peaks[dtype], list_left_out=first)
                    first = False
    return rows


def _names(op: str) -> list[str]:
    return [i.name for i in impls(op)]


@contextlib.contextmanager
def _recompile_limit(limit: int):
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=max(limit, torch._dynamo.config.recompile_limit)):
        yield


# The peer each op's headline compares with: what vLLM runs on CPU, and transformers' rotation.
BASELINES = {"attention": "sdpa_per_image", "rope": "hf_rotate_half"}


def headline(rows: Sequence[Row]) -> list[str]:
    """Forward (and backward) time of every implementation per op, dtype, head dim and case, fastest
    first, with its speed relative to the op's baseline peer (:data:`BASELINES`; ``x`` > 1: faster)."""
    from .results import parse_shape

    lat = {}
    for r in rows:
        if r.metric in ("fwd_latency", "bwd_latency"):
            f = parse_shape(r.shape)
            lat[(r.benchmark, r.dtype, f.get("head_dim"), f.get("set"), r.metric[:3], r.backend)] = float(
                r.value
            )
    lines = []
    groups = sorted({k[:4] for k in lat}, key=lambda k: (k[0], k[1], int(k[2] or 0), k[3]))
    for op, dtype, head_dim, label in groups:
        for phase in PHASES:
            base = lat.get((op, dtype, head_dim, label, phase, BASELINES.get(op)))
            here = {k[5]: v for k, v in lat.items() if k[:5] == (op, dtype, head_dim, label, phase)}
            if not here:
                continue
            cells = [
                f"{name} {1e3 * s:.2f} ms" + (f" ({base / s:.2f}x)" if base else "")
                for name, s in sorted(here.items(), key=lambda kv: kv[1])
            ]
            lines.append(f"{op} {dtype} d{head_dim} {label} {phase}: " + ", ".join(cells))
    return lines


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
    "BASELINES",
    "HEAD_DIMS",
    "MIXES",
    "OPS",
    "PHASES",
    "QUICK_MIXES",
    "REFERENCE_CHUNK",
    "KernelRun",
    "KernelSuite",
    "bench_case",
    "check_impls",
    "headline",
    "mix_case",
    "reference",
    "run_kernels",
    "run_suite",
    "select",
    "set_cases",
    "sweep_cases",
    "total_cases",
    "work",
]


def run_kernel_script(
    op: str, parser, argv, *, quick: dict, full: dict, cases: Callable[[dict], list]
) -> int:
    """The body of ``benchmarks/bench_attention.py`` and ``bench_rope.py``: parse ``argv`` with
    ``parser``, fill unset options from ``quick`` or ``full``, time ``cases(options)`` (plus the mixed
    batch unless ``--no-mixed``) and write the rows to ``--out``. Returns the exit code."""
    from .args import check_out_dir, run_guarded, write_results
    from .images import KERNEL_MIX

    args = parser.parse_args(argv)
    check_out_dir(parser, args.out)
    defaults = quick if args.quick else full
    opt = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    if args.backends is not None:
        try:
            check_impls(op, args.backends, peers=False)
        except ValueError as e:
            parser.error(f"argument --backends: {e}")
    run = KernelRun(
        op,
        device=str(args.device),
        dtype=args.dtype or ("bf16" if args.device.type == "cuda" else "fp32"),
        heads=args.heads,
        head_dim=args.head_dim,
        cases=cases(opt) + ([] if args.no_mixed else [mix_case(KERNEL_MIX)]),
        impls=args.backends,
        backward=not args.no_backward,
        warmup=opt["warmup"],
        iters=opt["iters"],
    )

    def work() -> None:
        write_results(args.out, op, run_kernels(run), device=args.device)

    return run_guarded(f"bench_{op}", work)
