// Plain launch functions of the CUDA kernels in this folder, each taking a params struct.
//
// Only C types cross this boundary, so the .cu files include CUDA headers alone (fast nvcc builds)
// and cuda/ops.cpp, which owns the torch side (checks, allocation, stream, device guard), never
// needs nvcc. Every function launches on `stream` and returns the cudaError_t of the launch as int.
#pragma once

#include <cstdint>

namespace nativevit {

// Element type of the tensors handed to a launcher.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One (total, heads, head_dim) input with strides (stride_tok, stride_head, 1).
struct TokenHeadRows {
  const void* data;
  int64_t stride_tok;
  int64_t stride_head;
};

// y = rotate(x) for q and k in one launch; `inverse` rotates by -angle (the backward).
struct Rope2dParams {
  DType dtype;
  TokenHeadRows q, k;
  int64_t q_heads, k_heads;
  void* q_out;         // contiguous (total, q_heads, head_dim)
  void* k_out;         // contiguous (total, k_heads, head_dim)
  const float* cos;    // contiguous (total, head_dim/2)
  const float* sin;    // contiguous (total, head_dim/2)
  int64_t total;
  int64_t head_dim;
  bool inverse;
};

int rope2d_launch(const Rope2dParams& p, void* stream);

// out = softmax(q k^T * scale) v per segment and head, segments from cu_seqlens (device int32, S+1).
struct VarlenAttentionParams {
  DType dtype;
  TokenHeadRows q, k, v;  // one shape (total, heads, head_dim)
  void* out;              // contiguous (total, heads, head_dim)
  const int32_t* cu_seqlens;
  int64_t num_segments;
  int64_t total;
  int64_t heads;
  int64_t head_dim;
  int64_t max_seqlen;     // sizes the grid; rows beyond it are still covered (grid-stride loop)
  float scale;
};

// Takes 1 <= heads <= 65535 (a grid dimension) and 1 <= head_dim <= 256 (per-thread arrays);
// returns cudaErrorInvalidValue, launching nothing, otherwise.
int varlen_attention_fwd_launch(const VarlenAttentionParams& p, void* stream);

}  // namespace nativevit
