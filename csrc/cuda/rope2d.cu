// Fused 2D RoPE on CUDA: one launch rotates q and k (strided views of the fused qkv output are fine)
// into contiguous outputs, fp32 math, rotate-half pairing (i, i + head_dim/2).
//   y[i] = x[i] cos - x[i+h] sin,  y[i+h] = x[i+h] cos + x[i] sin   (h = head_dim / 2)
// The backward is the same launch with `inverse` (sin -> -sin): the inverse rotation.
// One thread per (token, head, pair), grid-stride loop, 64-bit indices.
#include "common.cuh"

namespace nativevit {
namespace {

template <typename T>
__global__ void rope2d_kernel(const T* __restrict__ q, int64_t stride_q_tok, int64_t stride_q_head, int64_t q_heads,
                              const T* __restrict__ k, int64_t stride_k_tok, int64_t stride_k_head, int64_t k_heads,
                              T* __restrict__ q_out, T* __restrict__ k_out, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t total, int64_t half, float sign) {
  const int64_t n_q = total * q_heads * half;
  const int64_t n_all = n_q + total * k_heads * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_all;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_q = i < n_q;
    const int64_t j = is_q ? i : i - n_q;
    const int64_t heads = is_q ? q_heads : k_heads;
    const int64_t pair = j % half;
    const int64_t head = (j / half) % heads;
    const int64_t tok = j / (half * heads);
    if (tok >= total) continue;  // unreachable by construction; keeps every access provably in range
    const T* x = is_q ? q + tok * stride_q_tok + head * stride_q_head : k + tok * stride_k_tok + head * stride_k_head;
    T* y = (is_q ? q_out : k_out) + (tok * heads + head) * 2 * half;
    const float c = cos[tok * half + pair];
    const float s = sign * sin[tok * half + pair];
    const float x1 = to_float(x[pair]);
    const float x2 = to_float(x[pair + half]);
    y[pair] = from_float<T>(x1 * c - x2 * s);
    y[pair + half] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

int rope2d_launch(const Rope2dParams& p, void* stream) {
  const int64_t half = p.head_dim / 2;
  const int64_t work = p.total * (p.q_heads + p.k_heads) * half;
  if (work == 0) return static_cast<int>(cudaSuccess);
  constexpr int kThreads = 256;
  const unsigned int blocks = grid_size(work, kThreads, 65535);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    rope2d_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(p.q.data), p.q.stride_tok, p.q.stride_head, p.q_heads, static_cast<const T*>(p.k.data),
        p.k.stride_tok, p.k.stride_head, p.k_heads, static_cast<T*>(p.q_out), static_cast<T*>(p.k_out), p.cos,
        p.sin, p.total, half, p.inverse ? -1.0f : 1.0f);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace nativevit
