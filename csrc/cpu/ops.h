// The CPU kernels behind the nativevit::cpp_* ops (registered in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace nativevit::cpu {

// cpp_rope2d: q, k (total, heads, head_dim) with stride(-1) == 1 -> contiguous rotations, fp32 math.
std::tuple<at::Tensor, at::Tensor> rope2d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, bool inverse);

// cpp_varlen_attention: FlashAttention-2 forward over packed segments, float32 and bfloat16.
at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale);

// cpp_varlen_attention_bwd: (dq, dk, dv), recomputed per segment with torch's fused CPU flash attention.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& cu_seqlens,
                                                                    int64_t max_seqlen, double scale);

// cpp_bias_quick_gelu_: x = g(x + bias) in place, g(v) = v * sigmoid(1.702 v), fp32 math; x (rows, features)
// contiguous float32 or bfloat16, bias (features) or None.
void bias_quick_gelu_(at::Tensor& x, const std::optional<at::Tensor>& bias);

// cpu_isa: the attention microkernels this machine runs ("avx512_bf16", "avx512" or "generic").
std::string isa();

}  // namespace nativevit::cpu
