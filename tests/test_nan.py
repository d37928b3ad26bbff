"""NaN and inf in attention inputs: one rule for every backend (``nativevit.backends.reference``).

Each segment gets what SDPA's math gives for that segment alone: a row with a NaN or +inf score is
NaN (a NaN query row; every row of a segment with a NaN key), -inf scores weigh 0 and a row of only
-inf scores is 0, a NaN or inf value reaches its column of every row of its segment. Other segments
(and heads) are never touched: they equal, bit for bit, the same backend's output on the clean
inputs. The expected NaN/inf pattern and values come from SDPA's math backend in float64 on the same
poisoned inputs, not from any backend under test (rows of the poisoned segment may take another
code path than on clean inputs, e.g. the ``torch`` backend's exact fallback: close to the math, not
bitwise equal to the clean run).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import nativevit as nv
from nativevit.backends.registry import backends
from nativevit.packing import Segments

HEADS, HEAD_DIM = 2, 24
LENGTHS = (9, 0, 37, 1, 20)  # segment 2 (rows 9..45) is poisoned; 3 is a one-token segment
LONG = (5, 300, 7)  # longer than one key block of every kernel (CPU: 256)
NAN, INF = float("nan"), float("inf")


def _targets() -> list[tuple[str, str]]:
    """(device, backend) pairs that can run here; "cpu-generic" is the cpu backend's portable loops."""
    out = []
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        names = nv.ops.available_backends(device)["attention"]
        out += [(device, b) for b in ("cpu", "cuda", "torch", "padded", "triton", "flash_attn") if b in names]
        if device == "cpu" and "cpu" in names:
            out.append((device, "cpu-generic"))
    return out


TARGETS = _targets()
IDS = [f"{d}-{b}" for d, b in TARGETS]


def _inputs(lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3)]


def _attend(backend, q, k, v, lengths, monkeypatch):
    if backend == "cpu-generic":
        monkeypatch.setenv("NATIVEVIT_CPU_ISA", "generic")
        backend = "cpu"
    segments = Segments(lengths, q.device)
    return nv.ops.varlen_attention(q, k, v, segments, backend=backend)


def _math(q, k, v, lengths) -> torch.Tensor:
    """SDPA's math backend per segment, in float64: ``(total, heads, head_dim)``, NaN and inf included."""
    q, k, v = (x.double().cpu().transpose(0, 1) for x in (q, k, v))  # (heads, total, head_dim)
    out, start = torch.empty_like(q), 0
    with sdpa_kernel(SDPBackend.MATH):
        for n in lengths:
            rows = slice(start, start + n)
            out[:, rows] = F.scaled_dot_product_attention(q[:, rows], k[:, rows], v[:, rows])
            start += n
    return out.transpose(0, 1)


def _rows_of(lengths, segment) -> slice:
    start = sum(lengths[:segment])
    return slice(start, start + lengths[segment])


def _check(backend, dtype, device, lengths, poison, monkeypatch, *, segment=2, inf=True):
    """Run clean and poisoned inputs; check the poisoned output against the math's NaN/inf pattern, its
    finite values against the math, and every row outside ``segment`` against the clean run, exactly.
    ``inf``: the case poisons with an inf (else only NaN)."""
    if device == "cuda" and (backend == "padded" or (backend == "torch" and inf)):
        # documented: on CUDA these run SDPA's fused kernels with no host check of the inputs
        pytest.skip(
            f"the {backend} backend on CUDA gives the rule for NaN only (torch) or not at all (padded)"
        )
    why = backends("attention")[backend.removesuffix("-generic")].rejects(
        torch.empty(0, HEADS, HEAD_DIM, dtype=dtype, device=device)
    )
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    q, k, v = _inputs(lengths, dtype)
    clean = _attend(backend, *(x.to(device) for x in (q, k, v)), lengths, monkeypatch)
    want_clean = _math(q, k, v, lengths)
    poison(q, k, v)  # in place, on the host copies
    want = _math(q, k, v, lengths)
    assert not torch.equal(want, want_clean), "the case changes nothing: it cannot fail"
    got = _attend(backend, *(x.to(device) for x in (q, k, v)), lengths, monkeypatch).double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"NaN where the math has none, or none where it has: {got}"
    assert torch.equal(got.isinf(), want.isinf()), "inf pattern differs from the math"
    finite = want.isfinite()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[finite], want[finite], **tol)
    # other segments: finite and exactly the clean output
    others = torch.ones(got.shape[0], dtype=torch.bool)
    others[_rows_of(lengths, segment)] = False
    assert got[others].isfinite().all()
    assert torch.equal(got[others], clean.double().cpu()[others]), "a poisoned segment changed another"
    return got


pytestmark = [
    pytest.mark.skipif(not TARGETS, reason="no attention backend available"),
    # the Triton interpreter computes in numpy, which warns about every NaN and inf it meets
    pytest.mark.filterwarnings("ignore:.*(encountered|All-NaN):RuntimeWarning"),
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
BACKENDS = pytest.mark.parametrize("device,backend", TARGETS, ids=IDS)


@BACKENDS
@DTYPES
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_poisoned_query_row_is_nan_and_only_it(device, backend, dtype, value, monkeypatch):
    row = 9 + 11

    def poison(q, k, v):
        q[row, 1, 5] = value

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch, inf=not math.isnan(value))
    assert got[row, 1].isnan().all()
    keep = torch.ones(got.shape[:2], dtype=torch.bool)
    keep[row, 1] = False
    assert got[keep].isfinite().all(), "a NaN query row reached other rows"


@BACKENDS
@DTYPES
def test_nan_key_makes_every_row_of_its_segment_nan(device, backend, dtype, monkeypatch):
    def poison(q, k, v):
        k[9 + 30, 0, 3] = NAN

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch, inf=False)
    assert got[_rows_of(LENGTHS, 2), 0].isnan().all()
    assert got[:, 1].isfinite().all(), "a NaN key of head 0 reached head 1"


@BACKENDS
@DTYPES
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_poisoned_value_reaches_its_column_of_its_segment(device, backend, dtype, value, monkeypatch):
    col = 7

    def poison(q, k, v):
        v[9, 1, col] = value

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch, inf=not math.isnan(value))
    seg = got[_rows_of(LENGTHS, 2), 1]
    assert (seg[:, col].isnan() if math.isnan(value) else seg[:, col].isinf()).all()
    assert seg[:, [c for c in range(HEAD_DIM) if c != col]].isfinite().all()


@BACKENDS
@DTYPES
def test_nan_key_of_one_token_segment(device, backend, dtype, monkeypatch):
    """The row's only score is NaN (SDPA's fused CPU kernel alone would read it as masked: zeros)."""

    def poison(q, k, v):
        k[46, 0, 0] = NAN

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch, segment=3, inf=False)
    assert got[46, 0].isnan().all() and got[46, 1].isfinite().all()


@BACKENDS
@DTYPES
@pytest.mark.parametrize("segment", [2, 3])
def test_row_whose_every_score_is_minus_inf_is_zero(device, backend, dtype, segment, monkeypatch):
    """Every key (inf, 0, ..., 0): rows with q[0] < 0 score only -inf (0, SDPA's math for a row with
    nothing to attend to), rows with q[0] > 0 only +inf (NaN)."""
    rows = _rows_of(LENGTHS, segment)
    n = rows.stop - rows.start
    positive = torch.arange(n) % 3 == 1

    def poison(q, k, v):
        k[rows, 0] = 0
        k[rows, 0, 0] = INF
        q[rows, 0, 0] = torch.where(positive, 1.0, -1.0).to(q.dtype)

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch, segment=segment)
    assert (got[rows, 0][~positive] == 0).all() and got[rows, 0][positive].isnan().all()


@BACKENDS
@DTYPES
def test_inf_key_acts_through_its_scores(device, backend, dtype, monkeypatch):
    """k_j = (inf, 0, ..., 0): rows with q[0] > 0 score +inf (NaN rows), rows with q[0] < 0 score
    -inf (the key weighs 0, the row stays finite: the math without that key)."""
    j, rows = 9 + 17, _rows_of(LENGTHS, 2)

    def poison(q, k, v):
        k[j, 0] = 0
        k[j, 0, 0] = INF
        q[rows, 0, 0] = torch.where(torch.arange(37) % 3 == 0, 1.0, -1.0).to(q.dtype)

    got = _check(backend, dtype, device, LENGTHS, poison, monkeypatch)
    positive = torch.arange(37) % 3 == 0
    assert got[rows, 0][positive].isnan().all() and got[rows, 0][~positive].isfinite().all()


@BACKENDS
@DTYPES
def test_rows_whose_first_key_block_all_scores_minus_inf(device, backend, dtype, monkeypatch):
    """The first 260 keys of a 300-token segment score -inf for every row but one: past a whole key block
    of weight-0 keys (exp(-inf - -inf) must not turn into NaN), the rows are the math over the last 40."""
    rows = _rows_of(LONG, 1)

    def poison(q, k, v):
        k[5 : 5 + 260, 1] = 0
        k[5 : 5 + 260, 1, 0] = INF
        q[rows, 1, 0] = -1.0
        q[5 + 123, 1, 0] = 1.0  # this row scores +inf: NaN

    got = _check(backend, dtype, device, LONG, poison, monkeypatch, segment=1)
    seg = got[rows, 1]
    assert seg[123].isnan().all() and seg[torch.arange(300) != 123].isfinite().all()


@BACKENDS
@DTYPES
def test_inf_key_past_the_first_key_block(device, backend, dtype, monkeypatch):
    """k_j = (inf, 0, ..., 0) for a key after the first block of a 300-token segment, whose first block is
    finite: the CPU kernel's later blocks run against the reference the first gave (no max pass), and
    there a -inf score must still weigh 0 and a +inf score still make its row NaN."""
    j, rows = 5 + 200, _rows_of(LONG, 1)
    positive = torch.arange(300) % 3 == 0

    def poison(q, k, v):
        k[j, 0] = 0
        k[j, 0, 0] = INF
        q[rows, 0, 0] = torch.where(positive, 1.0, -1.0).to(q.dtype)

    got = _check(backend, dtype, device, LONG, poison, monkeypatch, segment=1)
    assert got[rows, 0][positive].isnan().all() and got[rows, 0][~positive].isfinite().all()
