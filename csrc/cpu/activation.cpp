// Bias + QuickGELU in place on the CPU, for an MLP's first linear layer without autograd:
// x = g(x + bias), g(v) = v * sigmoid(1.702 v) = v / (1 + exp(-1.702 v)), fp32 math, one rounding to
// x's dtype. One pass over the MLP's widest activation, where addmm's broadcast copy of the bias and
// torch's three elementwise passes (each rounding to bf16) took four. Rows are split across threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "ops.h"
#include "simd.h"

namespace nativevit::cpu {
namespace {

inline float quick_gelu(float v) { return v / (1.f + std::exp(-1.702f * v)); }

template <typename T>
void rows_generic(T* x, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) xr[c] = static_cast<T>(quick_gelu(static_cast<float>(xr[c]) + bias[c]));
  }
}

#if NATIVEVIT_X86
NV_SIMD_WARNINGS_OFF

// exp(-1.702 v) overflows to inf for v < -52: v / inf = -0, as the scalar form gives; NaN stays NaN.
NV_AVX512 inline __m512 quick_gelu_avx512(__m512 v) {
  const __m512 e = exp_avx512(_mm512_mul_ps(v, _mm512_set1_ps(-1.702f)));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

template <typename T>
NV_AVX512_BF16 void rows_avx512(T* x, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = tail_mask(cols - c);
      store16(xr + c, m, quick_gelu_avx512(_mm512_add_ps(load16(xr + c, m), _mm512_maskz_loadu_ps(m, bias + c))));
    }
  }
}

NV_SIMD_WARNINGS_ON
#endif  // NATIVEVIT_X86

template <typename T>
void rows_any(Isa isa, T* x, const float* bias, int64_t rows, int64_t cols) {
#if NATIVEVIT_X86
  if (isa == Isa::kAvx512) return rows_avx512(x, bias, rows, cols);
#endif
  rows_generic(x, bias, rows, cols);
}

}  // namespace

void bias_quick_gelu_(at::Tensor& x, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "cpp_bias_quick_gelu_: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpp_bias_quick_gelu_: takes float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "cpp_bias_quick_gelu_: x must be 2-D (rows, features) and "
              "contiguous, got shape ", x.sizes(), " strides ", x.strides());
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cols && bias->device() == x.device(),
                "cpp_bias_quick_gelu_: bias must be 1-D of ", cols, " features on ", x.device(), ", got shape ",
                bias->sizes(), " on ", bias->device());
    b = bias->to(at::kFloat).contiguous();
  } else {
    b = at::zeros({cols}, x.options().dtype(at::kFloat));
  }
  if (x.numel() == 0) return;
  const float* bp = b.const_data_ptr<float>();
  const Isa isa = pick_isa(x.scalar_type());
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      rows_any(isa, x.data_ptr<float>() + begin * cols, bp, end - begin, cols);
    } else {
      rows_any(isa, x.data_ptr<c10::BFloat16>() + begin * cols, bp, end - begin, cols);
    }
  });
}

}  // namespace nativevit::cpu
