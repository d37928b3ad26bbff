// 2D RoPE on the CPU: one pass over q and k (any token/head strides, stride(-1) == 1) into contiguous
// outputs, rotate-half pairing (i, i + head_dim/2), fp32 math; inverse=True rotates by -angle (the
// backward). Tokens are split across threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../checks.h"
#include "ops.h"

namespace nativevit::cpu {
namespace {

template <typename scalar_t>
void rope_rows(const scalar_t* __restrict__ x, int64_t stride_tok, int64_t stride_head, scalar_t* __restrict__ y,
               const float* __restrict__ cos, const float* __restrict__ sin, int64_t tok_begin, int64_t tok_end,
               int64_t heads, int64_t half, float sign) {
  for (int64_t t = tok_begin; t < tok_end; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      const scalar_t* xr = x + t * stride_tok + h * stride_head;
      scalar_t* yr = y + (t * heads + h) * 2 * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = static_cast<float>(xr[i]);
        const float x2 = static_cast<float>(xr[i + half]);
        const float si = sign * s[i];
        yr[i] = static_cast<scalar_t>(x1 * c[i] - x2 * si);
        yr[i + half] = static_cast<scalar_t>(x2 * c[i] + x1 * si);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope2d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                          const at::Tensor& sin_in, bool inverse) {
  check_rope_args("cpp_rope2d", q, k, cos_in, sin_in);
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor sin = sin_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const int64_t total = q.size(0), half = q.size(2) / 2;
  const float sign = inverse ? -1.f : 1.f;
  if (total == 0 || half == 0) return {q_out, k_out};
  // ~32k elements per task: big enough to amortise the fork, small enough to split a batch.
  const int64_t grain = std::max<int64_t>(1, 32768 / ((q.size(1) + k.size(1)) * 2 * half + 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpp_rope2d", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* ko = k_out.data_ptr<scalar_t>();
    const float* c = cos.const_data_ptr<float>();
    const float* s = sin.const_data_ptr<float>();
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      rope_rows(qp, q.stride(0), q.stride(1), qo, c, s, begin, end, q.size(1), half, sign);
      rope_rows(kp, k.stride(0), k.stride(1), ko, c, s, begin, end, k.size(1), half, sign);
    });
  });
  return {q_out, k_out};
}

}  // namespace nativevit::cpu
