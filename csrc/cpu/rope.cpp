// 2D RoPE on the CPU: one pass over q and k (any token/head strides, stride(-1) == 1) into contiguous
// outputs, rotate-half pairing (i, i + head_dim/2), fp32 math; inverse=True rotates by -angle (the
// backward). Tokens are split across threads; float32 and bfloat16 rows run 16 pairs at a time with
// AVX-512 where the CPU has AVX-512-BF16 (simd.h), the portable loop otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "ops.h"
#include "simd.h"

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

#if NATIVEVIT_X86
NV_SIMD_WARNINGS_OFF

// rope_rows with 16 pairs (i, i + half) per step; the same fp32 math (fma: one rounding fewer).
template <typename scalar_t>
NV_AVX512_BF16 void rope_rows_avx512(const scalar_t* __restrict__ x, int64_t stride_tok, int64_t stride_head,
                                     scalar_t* __restrict__ y, const float* __restrict__ cos,
                                     const float* __restrict__ sin, int64_t tok_begin, int64_t tok_end,
                                     int64_t heads, int64_t half, float sign) {
  const __m512 vsign = _mm512_set1_ps(sign);
  for (int64_t t = tok_begin; t < tok_end; ++t) {
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = tail_mask(half - i);
      const __m512 c = _mm512_maskz_loadu_ps(m, cos + t * half + i);
      const __m512 s = _mm512_mul_ps(vsign, _mm512_maskz_loadu_ps(m, sin + t * half + i));
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* xr = x + t * stride_tok + h * stride_head;
        scalar_t* yr = y + (t * heads + h) * 2 * half;
        const __m512 x1 = load16(xr + i, m), x2 = load16(xr + i + half, m);
        store16(yr + i, m, _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)));
        store16(yr + i + half, m, _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)));
      }
    }
  }
}

NV_SIMD_WARNINGS_ON
#endif  // NATIVEVIT_X86

// The AVX-512 rows where `simd` (float32 and bfloat16 on a CPU with AVX-512-BF16), else the portable loop.
template <typename scalar_t>
void rope_rows_any(bool simd, const scalar_t* x, int64_t stride_tok, int64_t stride_head, scalar_t* y,
                   const float* cos, const float* sin, int64_t tok_begin, int64_t tok_end, int64_t heads,
                   int64_t half, float sign) {
#if NATIVEVIT_X86
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (simd) return rope_rows_avx512(x, stride_tok, stride_head, y, cos, sin, tok_begin, tok_end, heads, half, sign);
  }
#endif
  rope_rows(x, stride_tok, stride_head, y, cos, sin, tok_begin, tok_end, heads, half, sign);
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
  // decided once per call, not per chunk of tokens (pick_isa reads the environment)
  const at::ScalarType dtype = q.scalar_type();
  const bool simd = (dtype == at::kFloat || dtype == at::kBFloat16) && pick_isa(dtype) == Isa::kAvx512 &&
                    cpu_has_avx512_bf16();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpp_rope2d", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* ko = k_out.data_ptr<scalar_t>();
    const float* c = cos.const_data_ptr<float>();
    const float* s = sin.const_data_ptr<float>();
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      rope_rows_any(simd, qp, q.stride(0), q.stride(1), qo, c, s, begin, end, q.size(1), half, sign);
      rope_rows_any(simd, kp, k.stride(0), k.stride(1), ko, c, s, begin, end, k.size(1), half, sign);
    });
  });
  return {q_out, k_out};
}

}  // namespace nativevit::cpu
