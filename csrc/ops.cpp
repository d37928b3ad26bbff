// nativevit._C: the schemas of the C++/CUDA ops and their CPU registrations.
//
// Ops, in the namespace the Triton custom ops share (nativevit::triton_*), hence a FRAGMENT here.
// Fake (meta) and autograd registrations live in nativevit/backends/cpp.py.
//   cpp_rope2d(q, k, cos, sin, inverse=False) -> (q_rot, k_rot)
//       2D RoPE, rotate-half pairing, fp32 math, one pass over q and k (any token/head strides,
//       stride(-1) == 1), contiguous outputs. inverse=True rotates back: the backward.
//   cpp_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale) -> out
//       block-diagonal attention over packed segments, FlashAttention-2 forward (online softmax,
//       fp32 accumulators).
//   cpp_varlen_attention_bwd(grad_out, q, k, v, cu_seqlens, max_seqlen, scale) -> (dq, dk, dv)
//       the backward, recomputed per segment from q, k, v (reads cu_seqlens on the host).
//   cpp_bias_quick_gelu_(x, bias) -> ()   (CPU only)
//       x = g(x + bias) in place, g(v) = v * sigmoid(1.702 v) (QuickGELU), fp32 math: an MLP's first
//       linear layer after a bias-free matmul, in one pass, when no autograd is recording.
//   cpu_isa() -> str
//       which CPU attention microkernels this machine runs ("avx512", "avx512_bf16", "generic").
//
// max_seqlen is a SymInt in the schemas, so torch.compile(dynamic=True) keeps it symbolic (an `int`
// would be specialised: one graph per value); the kernels still take int64_t (a SymInt argument is
// always concrete by the time a CPU or CUDA kernel runs).
//
// NaN and inf: every segment gets what SDPA's math gives for it alone (the rule of every backend,
// nativevit/backends/reference.py): a row with a NaN or +inf score is NaN (a NaN query row, every row
// of a segment with a NaN key), -inf scores weigh 0, a row whose every score is -inf is 0, a NaN or
// inf value reaches its column; other segments are never affected.
//
// Kernels: cpu/ (CPU), cuda/ (CUDA, registered by cuda/ops.cpp when built with a toolkit). Both
// check only what keeps them in bounds (checks.h); user-facing validation is the public ops' job.
#include <Python.h>

#include <torch/library.h>

#include "cpu/ops.h"

extern "C" {
// The module only exists so that `import nativevit._C` loads this library and runs the static
// TORCH_LIBRARY registrations; the ops are reached through torch.ops.nativevit.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(nativevit, m) {
  m.def("cpp_rope2d(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse=False) -> (Tensor, Tensor)");
  m.def("cpp_varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale) -> Tensor");
  m.def(
      "cpp_varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("cpp_bias_quick_gelu_(Tensor(a!) x, Tensor? bias) -> ()");
  m.def("cpu_isa() -> str", &nativevit::cpu::isa);
}

TORCH_LIBRARY_IMPL(nativevit, CPU, m) {
  m.impl("cpp_rope2d", &nativevit::cpu::rope2d);
  m.impl("cpp_varlen_attention", &nativevit::cpu::varlen_attention);
  m.impl("cpp_varlen_attention_bwd", &nativevit::cpu::varlen_attention_bwd);
  m.impl("cpp_bias_quick_gelu_", &nativevit::cpu::bias_quick_gelu_);
}
