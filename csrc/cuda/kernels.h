// Plain launch functions of the CUDA kernels in this folder.
//
// Only C types cross this boundary, so the .cu files include CUDA headers alone (fast nvcc builds)
// and csrc/ops.cpp, which owns the torch side (checks, allocation, stream, device guard), never
// needs nvcc. Every function launches on `stream` and returns the cudaError_t of the launch as int.
#pragma once

#include <cstdint>

namespace nativevit {

// Element type of the tensors handed to a launcher.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = rotate(x) for q and k in one launch; `inverse` rotates by -angle (the backward).
// x: (total, heads, head_dim) with strides (stride_tok, stride_head, 1); y: contiguous;
// cos, sin: contiguous (total, head_dim/2) float32.
int rope2d_cuda_launch(DType dtype, const void* q, int64_t stride_q_tok, int64_t stride_q_head, int64_t q_heads,
                       const void* k, int64_t stride_k_tok, int64_t stride_k_head, int64_t k_heads,
                       void* q_out, void* k_out, const float* cos, const float* sin, int64_t total,
                       int64_t head_dim, bool inverse, void* stream);

// out = softmax(q k^T * scale) v per segment and head, segments from cu_seqlens (device int32, S+1).
// q, k, v: (total, heads, head_dim) with strides (stride_tok, stride_head, 1); out: contiguous.
// head_dim <= 256.
int varlen_attention_fwd_cuda_launch(DType dtype, const void* q, int64_t stride_q_tok, int64_t stride_q_head,
                                     const void* k, int64_t stride_k_tok, int64_t stride_k_head,
                                     const void* v, int64_t stride_v_tok, int64_t stride_v_head, void* out,
                                     const int32_t* cu_seqlens, int64_t num_segments, int64_t total,
                                     int64_t heads, int64_t head_dim, int64_t max_seqlen, float scale,
                                     void* stream);

}  // namespace nativevit
