"""nativevit._C: the C++ CPU kernels against the torch references, op registration, the CUDA build.

Accuracy: FlashAttention's rule (tests/flash_rule.py) with the fixed floors ``ABS_FLOOR``. Inputs:
the shared segment layouts and head dims of tests/kernel_cases.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import kernel_cases as kc
import pytest
import torch
from flash_rule import ABS_FLOOR, check_rule

import nativevit as nv
from nativevit.backends import cpp
from nativevit.backends.reference import varlen_attention_ref
from nativevit.rope import rope_2d_ref

CPP_OPS = (
    "cpp_rope2d",
    "cpp_varlen_attention",
    "cpp_varlen_attention_bwd",
    "cpp_bias_quick_gelu_",
    "cpu_isa",
)
TRITON_OPS = ("triton_rope2d", "triton_rope2d_", "triton_varlen_attention_fwd", "triton_varlen_attention_bwd")


@pytest.fixture(autouse=True)
def _require_built():
    # a missing build is a failure, never a skip: CI must build the extension
    assert cpp.is_built(), cpp._LOAD_ERROR


def check(name, out, same_dtype_ref, fp64_ref, factor):
    check_rule(name, out, same_dtype_ref, fp64_ref, factor, floor=ABS_FLOOR[out.dtype])


def grads(fn, xs, grad):
    """Gradients of ``fn(*xs)`` (leaf copies of ``xs``) against ``grad``, on the CPU."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    fn(*xs).backward(grad.to(device=xs[0].device, dtype=xs[0].dtype))
    return [x.grad.cpu() for x in xs]


def attention_grads(backend, q, k, v, seg, scale, grad):
    """dq, dk, dv of the ``backend`` kernel, of torch in q's dtype and of torch in fp64."""

    def kernel(a, b, c):
        return nv.ops.varlen_attention(a, b, c, seg, scale=scale, backend=backend)

    def ref(a, b, c):
        return varlen_attention_ref(a, b, c, seg, scale)

    qkv64 = (q.double(), k.double(), v.double())
    return grads(kernel, (q, k, v), grad), grads(ref, (q, k, v), grad), grads(ref, qkv64, grad)


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
    ours = {"nativevit::cpp_rope2d", "nativevit::cpp_varlen_attention", "nativevit::cpp_varlen_attention_bwd"}
    if _cuda_toolkit_present():
        assert ours <= registered, (
            f"CUDA toolkit found but not registered for CUDA: {sorted(ours - registered)}"
        )
        assert cpp.has_cuda_kernels()
    else:
        assert not cpp.has_cuda_kernels() or ours <= registered


def test_one_namespace_with_and_without_interpreter():
    """The C++ library (a TORCH_LIBRARY_FRAGMENT) and the Triton custom ops share ``nativevit``: every
    op exists after importing nativevit with and without TRITON_INTERPRET, whatever registered the
    namespace first, and the C++ ops pass opcheck. (This process runs the Triton opchecks too.)"""
    code = f"""
import torch
@torch.library.custom_op("nativevit::_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
import nativevit as nv
for name in {CPP_OPS + TRITON_OPS!r}:
    assert hasattr(torch.ops.nativevit, name), name
q = torch.randn(14, 2, 16)
cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
cos, sin = torch.rand(14, 8), torch.rand(14, 8)
torch.library.opcheck(torch.ops.nativevit.cpp_rope2d.default, (q.requires_grad_(), q, cos, sin, False))
torch.library.opcheck(torch.ops.nativevit.cpp_varlen_attention.default, (q, q, q, cu, 9, 0.25))
print("ok", nv.ops.available_backends("cpu")["attention"])
"""
    for interpret in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = interpret
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0 and res.stdout.startswith("ok"), (interpret, res.stderr[-3000:])
        assert ("'triton'" in res.stdout) == bool(interpret or torch.cuda.is_available()), res.stdout


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
    assert cpp.cpu_isa() in ("avx512_bf16", "avx512", "generic")


# ----------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("head_dim", kc.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_forward_matches_reference(head_dim, dtype):
    q, k, _, _ = kc.qkv([37, 1, 64], 3, head_dim, dtype)
    cos, sin = kc.rope_tables(q.shape[0], head_dim)
    qo, ko = nv.ops.apply_rope_2d(q, k, cos, sin, backend="cpu")
    assert qo.dtype == dtype and qo.shape == q.shape
    q_ref, k_ref = rope_2d_ref(q, k, cos, sin)
    check("rope q", qo, q_ref, kc.rotate_exact(q, cos, sin), 2)
    check("rope k", ko, k_ref, kc.rotate_exact(k, cos, sin), 2)


def test_rope_fp64_equals_reference_and_bad_input():
    q = torch.randn(9, 2, 16, dtype=torch.float64)
    cos, sin = kc.rope_tables(9, 16)
    qo, ko = nv.ops.apply_rope_2d(q, q[:, :1], cos, sin, backend="cpu")
    q_ref, k_ref = rope_2d_ref(q, q[:, :1], cos, sin)
    torch.testing.assert_close(qo, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, k_ref, rtol=1e-6, atol=1e-6)
    # called directly, the op refuses what would take it out of bounds
    with pytest.raises(RuntimeError, match="cos must have shape"):
        torch.ops.nativevit.cpp_rope2d(q, q, cos[:5], sin, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.nativevit.cpp_rope2d(q, q.float(), cos, sin, False)
    with pytest.raises(RuntimeError, match="stride 1"):
        torch.ops.nativevit.cpp_rope2d(q.transpose(1, 2), q.transpose(1, 2), *kc.rope_tables(9, 2))


def test_rope_backend_takes_any_last_dim_stride():
    """The public op allows stride(-1) != 1; the backend hands the kernel unit-stride rows."""
    x = torch.randn(9, 16, 2).transpose(1, 2)  # (9, 2, 16) with stride(-1) == 2
    cos, sin = kc.rope_tables(9, 16)
    out = nv.ops.apply_rope_2d(x, x, cos, sin, backend="cpu")
    torch.testing.assert_close(out, rope_2d_ref(x, x, cos, sin), rtol=1e-6, atol=1e-6)


def test_rope_backward_is_inverse_rotation():
    q = torch.randn(11, 3, 80, requires_grad=True)
    k = torch.randn(11, 2, 80, requires_grad=True)
    cos, sin = kc.rope_tables(11, 80)
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
    back, _ = torch.ops.nativevit.cpp_rope2d(qo.detach(), qo.detach(), cos, sin, True)
    torch.testing.assert_close(back, q.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,heads,head_dim", kc.CASES)
def test_attention_forward_matches_reference(layout, heads, head_dim, dtype, isa, monkeypatch):
    if isa == "generic":
        monkeypatch.setenv("NATIVEVIT_CPU_ISA", "generic")
    q, k, v, seg = kc.qkv(kc.LAYOUTS[layout], heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = nv.ops.varlen_attention(q, k, v, seg, scale=scale, backend="cpu")
    assert out.dtype == dtype and out.shape == q.shape
    ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), seg, scale)
    ref_low = varlen_attention_ref(q, k, v, seg, scale)
    check(f"attention {layout} {dtype} {isa}", out, ref_low, ref64, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backward_matches_reference(dtype):
    q, k, v, seg = kc.qkv([70, 1, 0, 33], 2, 80, dtype, strided=False)
    scale = 80**-0.5
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours = grads(
        lambda a, b, c: nv.ops.varlen_attention(a, b, c, seg, scale=scale, backend="cpu"), (q, k, v), grad
    )
    low = grads(lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q, k, v), grad)
    ref = grads(
        lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q.double(), k.double(), v.double()), grad
    )
    for name, a, b, c in zip("qkv", ours, low, ref, strict=True):
        assert a.dtype == dtype
        check(f"d{name} {dtype}", a, b, c, 3)


def test_attention_bad_input():
    x = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    f = torch.ops.nativevit.cpp_varlen_attention
    # called directly, the op refuses what would take it out of bounds or leave rows unwritten
    with pytest.raises(RuntimeError, match="cu_seqlens ends at 6 but there are 7"):
        f(torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8), cu, 4, 1.0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        f(x, x, x, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        f(x, x, x, cu.long(), 4, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(x.half(), x.half(), x.half(), cu, 4, 1.0)
    with pytest.raises(RuntimeError, match="stride 1"):
        y = torch.randn(6, 8, 2).transpose(1, 2)
        f(y, y, y, cu, 4, 1.0)
    # max_seqlen is the public op's to check; the CPU kernel reads every length from cu_seqlens
    with pytest.raises(ValueError, match="smaller than the longest segment"):
        nv.ops.varlen_attention(x, x, x, cu, 3, backend="cpu")
    torch.testing.assert_close(f(x, x, x, cu, 3, 1.0), f(x, x, x, cu, 4, 1.0), rtol=0, atol=0)


def test_attention_large_scores_stay_finite():
    """Scores far beyond exp's range: the online softmax must rescale, not overflow."""
    q, k, v, seg = kc.qkv([300, 2], 1, 16, torch.float32, strided=False)
    q = q * 40
    out = nv.ops.varlen_attention(q, k, v, seg, backend="cpu")
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), seg, 16**-0.5)
    assert torch.isfinite(out).all()
    check("large scores", out, varlen_attention_ref(q, k, v, seg, 16**-0.5), ref, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_later_key_far_above_first_block(dtype):
    """Key blocks after a row's first are exponentiated against the max the row has so far, without a max
    pass; a key scoring far above it (by about 80 where the bound on P, 2^16, allows 11) must send its
    row group back to the exact path. Without that, its P (~e^75) times its value (2^24) overflows O.
    (Relative tolerances: the rows are about 2^24, where a float32 ulp is 2 and torch's fp32 happens to
    be exact.)"""
    q, k, v, seg = kc.qkv([700, 9, 300], 2, 80, dtype, strided=False)
    q[:, :, 0] = 16.0
    for j in (500, 709 + 290):
        k[j, :, 0], v[j] = 45.0, 2.0**24  # scores 720 / sqrt(80) = 80.5, the rest's about N(0, 4)
    scale = 80**-0.5
    out = nv.ops.varlen_attention(q, k, v, seg, scale=scale, backend="cpu")
    ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), seg, scale)
    assert torch.isfinite(out).all()
    rtol = 2e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.double(), ref64, rtol=rtol, atol=rtol * 4)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_attention_non_positive_scale(scale):
    """scale <= 0 (a max of scores is then no max of scaled scores): every block takes the exact path."""
    q, k, v, seg = kc.qkv([300, 5], 2, 64, torch.bfloat16, strided=False)
    # the public op refuses such a scale; the kernel takes any
    out = torch.ops.nativevit.cpp_varlen_attention(q, k, v, seg.cu_seqlens, seg.max_seqlen, scale)
    ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), seg, scale)
    check(f"scale {scale}", out, varlen_attention_ref(q, k, v, seg, scale), ref64, 2)


# ------------------------------------------------------------------------------ bias + QuickGELU


def _quick_gelu64(x, bias):
    v = x.double() + (0 if bias is None else bias.double())
    return v * torch.sigmoid(1.702 * v)


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_quick_gelu_matches_reference(dtype, isa, with_bias, monkeypatch):
    if isa == "generic":
        monkeypatch.setenv("NATIVEVIT_CPU_ISA", "generic")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 5123, generator=g) * 4).to(dtype)  # 5123: a 3-column tail after 16-wide vectors
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -100.0, 100.0, 0.0]).to(dtype)
    bias = torch.randn(5123, generator=g).to(dtype) if with_bias else None
    y = x.clone()
    assert torch.ops.nativevit.cpp_bias_quick_gelu_(y, bias) is None  # in place
    want = _quick_gelu64(x, bias)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    finite = want.isfinite()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double()[finite], want[finite], rtol=2e-6, atol=1e-6)
    else:  # one rounding of the fp32 value: at most one bf16 ulp from the rounded exact value
        torch.testing.assert_close(y.double()[finite], want.to(dtype).double()[finite], rtol=2**-7, atol=1e-6)


def test_bias_quick_gelu_bad_input():
    f = torch.ops.nativevit.cpp_bias_quick_gelu_
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(x.half(), None)
    with pytest.raises(RuntimeError, match="2-D .* contiguous"):
        f(torch.randn(8, 4).t(), None)
    with pytest.raises(RuntimeError, match="2-D"):
        f(torch.randn(2, 4, 8), None)
    with pytest.raises(RuntimeError, match="bias must be 1-D of 8 features"):
        f(x, torch.randn(7))
    f(torch.empty(0, 8), torch.randn(8))  # nothing to do
    torch.library.opcheck(f.default, (torch.randn(5, 19), torch.randn(19)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_fuses_bias_and_quick_gelu_without_autograd(dtype):
    """Qwen2-VL's MLP under no_grad takes mm + cpp_bias_quick_gelu_ (checked in the profiler) and gives
    what the autograd path (addmm + torch's QuickGELU) gives, to one rounding of the activation."""
    from nativevit.model import Mlp

    torch.manual_seed(0)
    mlp = Mlp(dim=48, hidden_dim=200, act="quick_gelu").to(dtype)
    x = torch.randn(2, 33, 48).to(dtype)  # a leading batch dimension (the padded layout's)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fused = mlp(x)
    assert "nativevit::cpp_bias_quick_gelu_" in {e.name for e in prof.events()}
    plain = mlp(x.requires_grad_()).detach()
    ref = mlp.double()(x.detach().double()).detach()
    assert fused.shape == plain.shape == (2, 33, 48)
    # no worse than torch's own path in this dtype against float64
    assert (fused.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6


# ------------------------------------------------------------------------------- opcheck, model


def test_opcheck():
    q, k, v, seg = kc.qkv([5, 0, 9], 2, 16, torch.float32, strided=False)
    cu, max_seqlen = seg.cu_seqlens, seg.max_seqlen
    cos, sin = kc.rope_tables(q.shape[0], 16)
    for rg in (False, True):
        qa, ka, va = (x.detach().clone().requires_grad_(rg) for x in (q, k, v))
        torch.library.opcheck(torch.ops.nativevit.cpp_rope2d.default, (qa, ka, cos, sin, False))
        torch.library.opcheck(
            torch.ops.nativevit.cpp_varlen_attention.default,
            (qa, ka, va, cu, max_seqlen, 0.25),
        )
    g = torch.randn_like(q)
    torch.library.opcheck(
        torch.ops.nativevit.cpp_varlen_attention_bwd.default,
        (g, q, k, v, cu, max_seqlen, 0.25),
    )


def test_max_seqlen_is_symbolic_under_compile():
    """``SymInt max_seqlen`` in both schemas: a batch with a new longest segment reuses the graph (an
    ``int`` would be specialised, one graph per value), forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    for op in (torch.ops.nativevit.cpp_varlen_attention, torch.ops.nativevit.cpp_varlen_attention_bwd):
        assert "SymInt max_seqlen" in str(op.default._schema), op.default._schema
    counter = CompileCounterWithBackend("aot_eager")

    def attend(q, k, v, cu, max_seqlen):
        return torch.ops.nativevit.cpp_varlen_attention(q, k, v, cu, max_seqlen, 0.25)

    compiled = torch.compile(attend, backend=counter, dynamic=True, fullgraph=True)
    for seed, lengths in enumerate([[3, 5], [7, 2], [1, 11], [6, 6]]):
        q, k, v, seg = kc.qkv(lengths, 2, 16, torch.float32, seed=seed, strided=False)
        q.requires_grad_()
        out = compiled(q, k, v, seg.cu_seqlens, seg.max_seqlen)
        (dq,) = torch.autograd.grad(out.sum(), q)
        ref = varlen_attention_ref(q, k, v, seg, 0.25)
        (dq_ref,) = torch.autograd.grad(ref.sum(), q)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dq, dq_ref, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 4 values of max_seqlen"


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


# ------------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,heads,head_dim", [*kc.CASES, ("image-sized", 3, 80)])
def test_cuda_kernels_match_reference(layout, heads, head_dim, dtype):
    lengths = kc.LAYOUTS.get(layout) or kc.GPU_LAYOUTS[layout]
    q, k, v, seg = kc.qkv(lengths, heads, head_dim, dtype, device="cuda")
    scale = head_dim**-0.5
    out = nv.ops.varlen_attention(q, k, v, seg, scale=scale, backend="cuda")
    check(
        f"cuda attention {layout} {dtype}",
        out.cpu(),
        varlen_attention_ref(q, k, v, seg, scale).cpu(),
        varlen_attention_ref(q.double(), k.double(), v.double(), seg, scale).cpu(),
        2,
    )
    cos, sin = kc.rope_tables(q.shape[0], head_dim, device="cuda")
    qr = q.detach().clone().requires_grad_()
    qo, ko = nv.ops.apply_rope_2d(qr, k, cos, sin, backend="cuda")
    q_ref, k_ref = rope_2d_ref(q, k, cos, sin)
    check(f"cuda rope {dtype}", qo.cpu(), q_ref.cpu(), kc.rotate_exact(q, cos, sin).cpu(), 2)
    check(f"cuda rope k {dtype}", ko.cpu(), k_ref.cpu(), kc.rotate_exact(k, cos, sin).cpu(), 2)
    qo.sum().backward()
    torch.testing.assert_close(
        qr.grad, rope_2d_ref(torch.ones_like(q), k, cos, -sin)[0], rtol=1e-2, atol=1e-2
    )
    # attention backward on CUDA: the matmul recompute of nativevit::cpp_varlen_attention_bwd
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours = grads(
        lambda a, b, c: nv.ops.varlen_attention(a, b, c, seg, scale=scale, backend="cuda"), (q, k, v), grad
    )
    low = grads(lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q, k, v), grad)
    ref = grads(
        lambda a, b, c: varlen_attention_ref(a, b, c, seg, scale), (q.double(), k.double(), v.double()), grad
    )
    for name, a, b, c in zip("qkv", ours, low, ref, strict=True):
        check(f"cuda d{name} {layout} {dtype}", a, b, c, 3)
