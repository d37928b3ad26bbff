"""nativevit._C: the C++ CPU kernels against the torch references, op registration, the CUDA build.

Error rule (FlashAttention's): the kernel's error against an fp64 reference must be at most 2x
(forward) / 3x (backward) the error of the torch reference run in the kernel's dtype, plus a floor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import nativevit as nv
from nativevit import csrc
from nativevit.ops import varlen_attention_ref
from nativevit.packing import Segments
from nativevit.rope import rope_2d_ref


@pytest.fixture(autouse=True)
def _require_built():
    # a missing build is a failure, never a skip: CI must build the extension
    assert csrc.is_built(), csrc._LOAD_ERROR


FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_rule(
    name: str, out: torch.Tensor, same_dtype_ref: torch.Tensor, fp64_ref: torch.Tensor, factor: float
):
    ours, theirs = err(out, fp64_ref), err(same_dtype_ref, fp64_ref)
    bound = factor * theirs + FLOOR[out.dtype]
    assert ours <= bound, (
        f"{name}: max error {ours:.3e} vs fp64 > {factor} x torch's {theirs:.3e} + floor "
        f"(mean {(out.double() - fp64_ref).abs().mean().item():.3e})"
    )


def make_qkv(lengths, heads, head_dim, dtype, seed=0, strided=False):
    """q, k, v ``(total, heads, head_dim)`` in fp64 and ``dtype``; strided: views of one fused qkv buffer."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    if strided:  # what the model hands over: unbind of (total, 3, heads, head_dim)
        qkv = torch.randn(total, 3, heads, head_dim, generator=g, dtype=torch.float64)
        ref = list(qkv.unbind(1))
        low = list(qkv.to(dtype).unbind(1))
    else:
        ref = [torch.randn(total, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3)]
        low = [x.to(dtype) for x in ref]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ref, low, Segments.from_cu_seqlens(cu, total)


def rope_tables(total, head_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(total, head_dim // 2, generator=g) * 50
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------- registration


def test_backends_registered_and_auto_picks_cpu():
    avail = nv.ops.available_backends("cpu")
    assert "cpu" in avail["attention"] and "cpu" in avail["rope"]
    x = torch.zeros(4, 2, 8)
    assert nv.ops.resolve_backend("attention", "auto", x).name == "cpu"
    assert nv.ops.resolve_backend("rope", "auto", x).name == "cpu"
    # fp64 attention is not a CPU-kernel dtype: auto falls back, an explicit request explains
    assert nv.ops.resolve_backend("attention", "auto", x.double()).name == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        nv.ops.resolve_backend("attention", "cpu", x.double())
    with pytest.raises(RuntimeError, match="cuda tensors only"):
        nv.ops.resolve_backend("attention", "cuda", x)


def _cuda_toolkit_present() -> bool:
    """Mirrors setup.py: torch has CUDA, CUDA is not skipped, and nvcc (or CUDA_HOME) is findable."""
    if torch.version.cuda is None or os.environ.get("NATIVEVIT_SKIP_CUDA", "0") not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or bool(
        home and os.path.exists(os.path.join(home, "bin", "nvcc"))
    )


def test_cuda_kernels_registered_when_toolkit_present():
    """Fails when a CUDA toolkit is findable but the CUDA kernels did not get built: a broken .cu or
    a build that silently skipped CUDA cannot pass CI."""
    registered = set(torch._C._dispatch_get_registrations_for_dispatch_key("CUDA"))
    ours = {"nativevit_C::rope2d", "nativevit_C::varlen_attention", "nativevit_C::varlen_attention_bwd"}
    if _cuda_toolkit_present():
        assert ours <= registered, (
            f"CUDA toolkit found but not registered for CUDA: {sorted(ours - registered)}"
        )
        assert csrc.has_cuda_kernels()
    else:
        assert not csrc.has_cuda_kernels() or ours <= registered


def test_package_imports_without_extension():
    """With _C missing, nativevit imports, the cpu backend says why it cannot run, torch still works."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nativevit._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, nativevit as nv
assert "cpu" not in nv.ops.available_backends("cpu")["attention"]
x = torch.randn(6, 2, 8)
cu = torch.tensor([0, 2, 6], dtype=torch.int32)
assert nv.ops.resolve_backend("attention", "auto", x).name == "torch"
out = nv.ops.varlen_attention(x, x, x, cu)
try:
    nv.ops.varlen_attention(x, x, x, cu, backend="cpu")
except RuntimeError as e:
    assert "was not built" in str(e), e
else:
    raise AssertionError("explicit cpu backend without _C did not raise")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_cpu_isa_reports():
    assert csrc.cpu_isa() in ("avx512_bf16", "avx512", "generic")


# ----------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("head_dim", [72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_forward_matches_reference(head_dim, dtype):
    (q64, k64, _), (q, k, _), _ = make_qkv([37, 1, 64], 3, head_dim, dtype, strided=True)
    cos, sin = rope_tables(q.shape[0], head_dim)
    qo, ko = nv.ops.apply_rope_2d(q, k, cos, sin, backend="cpu")
    assert qo.dtype == dtype and qo.shape == q.shape
    c64, s64 = cos.double(), sin.double()

    def rot64(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * c64[:, None] - x2 * s64[:, None], x2 * c64[:, None] + x1 * s64[:, None]], -1)

    q_ref, k_ref = rope_2d_ref(q, k, cos, sin)
    check_rule("rope q", qo, q_ref, rot64(q64.to(dtype).double()), 2)
    check_rule("rope k", ko, k_ref, rot64(k64.to(dtype).double()), 2)


def test_rope_fp64_equals_reference_and_bad_input():
    q = torch.randn(9, 2, 16, dtype=torch.float64)
    cos, sin = rope_tables(9, 16)
    qo, ko = nv.ops.apply_rope_2d(q, q[:, :1], cos, sin, backend="cpu")
    q_ref, k_ref = rope_2d_ref(q, q[:, :1], cos, sin)
    torch.testing.assert_close(qo, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, k_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="cos must have shape"):
        torch.ops.nativevit_C.rope2d(q, q, cos[:5], sin, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.nativevit_C.rope2d(q, q.float(), cos, sin, False)
    with pytest.raises(RuntimeError, match="stride 1"):
        torch.ops.nativevit_C.rope2d(
            q.transpose(1, 2), q.transpose(1, 2), rope_tables(9, 2)[0], rope_tables(9, 2)[1]
        )


def test_rope_backward_is_inverse_rotation():
    q = torch.randn(11, 3, 80, requires_grad=True)
    k = torch.randn(11, 2, 80, requires_grad=True)
    cos, sin = rope_tables(11, 80)
    qo, ko = nv.ops.apply_rope_2d(q, k, cos, sin, backend="cpu")
    gq = torch.randn_like(qo)
    (qo * gq).sum().backward(inputs=[q, k])  # k's gradient arrives as None -> zeros
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qr, _ = rope_2d_ref(q2, k2, cos, sin)
    (qr * gq).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-5)
    assert k.grad is None or torch.count_nonzero(k.grad) == 0
    # stride-0 expanded gradient (from .sum()) and the roundtrip inverse(rotate(x)) == x
    q.grad = None
    qo, _ = nv.ops.apply_rope_2d(q, k, cos, sin, backend="cpu")
    qo.sum().backward(inputs=[q])
    torch.testing.assert_close(q.grad, rope_2d_ref(torch.ones_like(q), torch.ones_like(q), cos, -sin)[0])
    back, _ = torch.ops.nativevit_C.rope2d(qo.detach(), qo.detach(), cos, sin, True)
    torch.testing.assert_close(back, q.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ attention


def attention_fp64(q64, k64, v64, segments, scale):
    return varlen_attention_ref(q64, k64, v64, segments, scale)


ATTN_CASES = [
    # lengths, heads, head_dim
    ([37, 0, 1, 200, 5], 2, 80),
    ([130, 17], 3, 72),
    ([1, 64, 129], 2, 128),
    ([3] * 40 + [0, 1, 2], 2, 80),  # many small segments
]


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,heads,head_dim", ATTN_CASES)
def test_attention_forward_matches_reference(lengths, heads, head_dim, dtype, isa, monkeypatch):
    if isa == "generic":
        monkeypatch.setenv("NATIVEVIT_CPU_ISA", "generic")
    (q64, k64, v64), (q, k, v), seg = make_qkv(lengths, heads, head_dim, dtype, strided=True)
    scale = head_dim**-0.5
    out = nv.ops.varlen_attention(q, k, v, seg, scale=scale, backend="cpu")
    assert out.dtype == dtype and out.shape == q.shape
    ref64 = attention_fp64(q.double(), k.double(), v.double(), seg, scale)
    ref_low = varlen_attention_ref(q, k, v, seg, scale)
    check_rule(f"attention {lengths} {dtype} {isa}", out, ref_low, ref64, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backward_matches_reference(dtype):
    (q64, k64, v64), (q, k, v), seg = make_qkv([70, 1, 0, 33], 2, 80, dtype)
    scale = 80**-0.5
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)

    def grads(fn, xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        fn(*xs).backward(grad.to(xs[0].dtype))
        return [x.grad for x in xs]

    ours = grads(lambda a, b, c: nv.ops.varlen_attention(a, b, c, seg, scale=scale, backend="cpu"), (q, k, v))
    low = grads(lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q, k, v))
    ref = grads(
        lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q.double(), k.double(), v.double())
    )
    for name, a, b, c in zip("qkv", ours, low, ref, strict=True):
        assert a.dtype == dtype
        check_rule(f"d{name} {dtype}", a, b, c, 3)


def test_attention_bad_input():
    x = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    f = torch.ops.nativevit_C.varlen_attention
    with pytest.raises(RuntimeError, match="cu_seqlens ends at 6 but there are 7"):
        f(torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8), cu, 4, 1.0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        f(x, x, x, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match="more than max_seqlen"):
        f(x, x, x, cu, 3, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        f(x, x, x, cu.long(), 4, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(x.half(), x.half(), x.half(), cu, 4, 1.0)
    with pytest.raises(RuntimeError, match="stride 1"):
        y = torch.randn(6, 8, 2).transpose(1, 2)
        f(y, y, y, cu, 4, 1.0)


def test_attention_large_scores_stay_finite():
    """Scores far beyond exp's range: the online softmax must rescale, not overflow."""
    (_, _, _), (q, k, v), seg = make_qkv([300, 2], 1, 16, torch.float32)
    q = q * 40
    out = nv.ops.varlen_attention(q, k, v, seg, backend="cpu")
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), seg, 16**-0.5)
    assert torch.isfinite(out).all()
    check_rule("large scores", out, varlen_attention_ref(q, k, v, seg, 16**-0.5), ref, 2)


# ------------------------------------------------------------------------------- opcheck, model


def test_opcheck():
    (_, _, _), (q, k, v), seg = make_qkv([5, 0, 9], 2, 16, torch.float32)
    cos, sin = rope_tables(q.shape[0], 16)
    for rg in (False, True):
        qa, ka, va = (x.detach().clone().requires_grad_(rg) for x in (q, k, v))
        torch.library.opcheck(torch.ops.nativevit_C.rope2d.default, (qa, ka, cos, sin, False))
        torch.library.opcheck(
            torch.ops.nativevit_C.varlen_attention.default, (qa, ka, va, seg.cu_seqlens, seg.max_seqlen, 0.25)
        )
    g = torch.randn_like(q)
    torch.library.opcheck(
        torch.ops.nativevit_C.varlen_attention_bwd.default, (g, q, k, v, seg.cu_seqlens, seg.max_seqlen, 0.25)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_cpu_backend_equals_torch(dtype):
    cfg = nv.VisionConfig.tiny()
    torch.manual_seed(0)
    model = nv.NativeViT(cfg).to(dtype).eval()
    grid = torch.tensor([[1, 4, 6], [1, 2, 2], [2, 4, 4]])
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    pixels = torch.randn(n, cfg.patch_dim).to(dtype)
    with torch.no_grad():
        model.attn_backend, model.rope_backend = "torch", "torch"
        ref = model.forward_features(pixels, grid)
        model.attn_backend, model.rope_backend = "cpu", "cpu"
        out = model.forward_features(pixels, grid)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < tol, f"encoder cpu vs torch relative error {rel:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    (_, _, _), (q, k, v), seg = make_qkv([37, 0, 1, 300, 5], 3, 80, dtype, strided=True)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    seg = Segments(seg.cu_seqlens.cuda(), seg.lengths, seg.max_seqlen)
    scale = 80**-0.5
    out = nv.ops.varlen_attention(q, k, v, seg, scale=scale, backend="cuda")
    check_rule(
        f"cuda attention {dtype}",
        out.cpu(),
        varlen_attention_ref(q, k, v, seg, scale).cpu(),
        varlen_attention_ref(q.double(), k.double(), v.double(), seg, scale).cpu(),
        2,
    )
    cos, sin = rope_tables(q.shape[0], 80)
    cos, sin = cos.cuda(), sin.cuda()
    qr = q.detach().clone().requires_grad_()
    qo, ko = nv.ops.apply_rope_2d(qr, k, cos, sin, backend="cuda")
    q_ref, k_ref = rope_2d_ref(q, k, cos, sin)
    check_rule(
        f"cuda rope {dtype}", qo.cpu(), q_ref.cpu(), rope_2d_ref(q.double(), k.double(), cos, sin)[0].cpu(), 2
    )
    qo.sum().backward()
    torch.testing.assert_close(
        qr.grad, rope_2d_ref(torch.ones_like(q), k, cos, -sin)[0], rtol=1e-2, atol=1e-2
    )
    # attention backward on CUDA: the matmul recompute of nativevit_C::varlen_attention_bwd
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype).cuda()

    def grads(fn, xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        fn(*xs).backward(grad.to(xs[0].dtype))
        return [x.grad.cpu() for x in xs]

    ours = grads(
        lambda a, b, c: nv.ops.varlen_attention(a, b, c, seg, scale=scale, backend="cuda"), (q, k, v)
    )
    low = grads(lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q, k, v))
    ref = grads(
        lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q.double(), k.double(), v.double())
    )
    for name, a, b, c in zip("qkv", ours, low, ref, strict=True):
        check_rule(f"cuda d{name} {dtype}", a, b, c, 3)
