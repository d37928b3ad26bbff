// The CUDA registrations of the nativevit::cpp_* ops: the torch side of the kernels in this folder
// (allocation, device guard, current stream, the launch params) and the backward.
//
// Backward: ATen matmuls in fp32 per segment (exact, not fused), query-chunked so the score tile
// stays bounded; reads cu_seqlens on the host once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace nativevit::cuda {
namespace {

DType cuda_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              " (cuda): takes float32, float16 or bfloat16, got ", t);
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, " (cuda): kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

TokenHeadRows rows_of(const at::Tensor& x) { return {x.const_data_ptr(), x.stride(0), x.stride(1)}; }

void* stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor> rope2d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                          const at::Tensor& sin_in, bool inverse) {
  constexpr const char* op = "cpp_rope2d";
  check_rope_args(op, q, k, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor sin = sin_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  Rope2dParams p{};
  p.dtype = cuda_dtype(op, q.scalar_type());
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.q_heads = q.size(1);
  p.k_heads = k.size(1);
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.cos = cos.const_data_ptr<float>();
  p.sin = sin.const_data_ptr<float>();
  p.total = q.size(0);
  p.head_dim = q.size(2);
  p.inverse = inverse;
  check_launch(op, rope2d_launch(p, stream_of(q)));
  return {q_out, k_out};
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_in, int64_t max_seqlen, double scale) {
  constexpr const char* op = "cpp_varlen_attention";
  check_attention_args(op, q, k, v, cu_seqlens_in);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  // No host read of cu_seqlens (no sync per layer): the kernel skips segments whose offsets leave
  // [0, total) and covers rows beyond max_seqlen with a grid-stride loop.
  VarlenAttentionParams p{};
  p.dtype = cuda_dtype(op, q.scalar_type());
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.v = rows_of(v);
  p.out = out.data_ptr();
  p.cu_seqlens = cu_seqlens.const_data_ptr<int32_t>();
  p.num_segments = cu_seqlens.numel() - 1;
  p.total = q.size(0);
  p.heads = q.size(1);
  p.head_dim = q.size(2);
  p.max_seqlen = std::max<int64_t>(max_seqlen, 1);
  p.scale = static_cast<float>(scale);
  check_launch(op, varlen_attention_fwd_launch(p, stream_of(q)));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& cu_seqlens,
                                                                    int64_t /*max_seqlen*/, double scale) {
  constexpr const char* op = "cpp_varlen_attention_bwd";
  check_attention_args(op, q, k, v, cu_seqlens);
  check_grad_args(op, grad_out, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const std::vector<int64_t> offsets = host_offsets(op, cu_seqlens, q.size(0));
  const auto compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  const int64_t heads = q.size(1);
  for (size_t s = 0; s + 1 < offsets.size(); ++s) {
    const int64_t start = offsets[s], n = offsets[s + 1] - start;
    if (n == 0) continue;
    // (heads, n, head_dim) in the compute dtype
    const at::Tensor qs = q.narrow(0, start, n).transpose(0, 1).to(compute);
    const at::Tensor ks = k.narrow(0, start, n).transpose(0, 1).to(compute);
    const at::Tensor vs = v.narrow(0, start, n).transpose(0, 1).to(compute);
    const at::Tensor gs = grad_out.narrow(0, start, n).transpose(0, 1).to(compute);
    at::Tensor dks = at::zeros_like(ks);
    at::Tensor dvs = at::zeros_like(vs);
    // query chunks keep the (heads, chunk, n) score tile under ~16M elements
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t{1} << 24) / (heads * n)));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t cn = std::min(chunk, n - c0);
      const at::Tensor qc = qs.narrow(1, c0, cn);
      const at::Tensor gc = gs.narrow(1, c0, cn);
      const at::Tensor p = at::softmax(at::matmul(qc, ks.transpose(1, 2)).mul_(scale), -1);  // (heads, cn, n)
      dvs.baddbmm_(p.transpose(1, 2), gc);
      const at::Tensor dp = at::matmul(gc, vs.transpose(1, 2));
      const at::Tensor ds = p * (dp - (p * dp).sum(-1, true));
      dq.narrow(0, start + c0, cn).copy_(at::matmul(ds, ks).mul_(scale).transpose(0, 1));
      dks.baddbmm_(ds.transpose(1, 2), qc, 1.0, scale);
    }
    dk.narrow(0, start, n).copy_(dks.transpose(0, 1));
    dv.narrow(0, start, n).copy_(dvs.transpose(0, 1));
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace nativevit::cuda

TORCH_LIBRARY_IMPL(nativevit, CUDA, m) {
  m.impl("cpp_rope2d", &nativevit::cuda::rope2d);
  m.impl("cpp_varlen_attention", &nativevit::cuda::varlen_attention);
  m.impl("cpp_varlen_attention_bwd", &nativevit::cuda::varlen_attention_bwd);
}
