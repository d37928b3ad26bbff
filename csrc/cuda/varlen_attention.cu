// Varlen block-diagonal attention forward on CUDA: simple and reviewable, not tuned.
//
// One thread per query row, a block of kThreads consecutive rows of one (segment, head); K and V
// tiles of BLOCK_N keys are staged in shared memory as fp32 and every thread runs the online
// softmax (running max m, running sum l, fp32 accumulator) over them, key by key. Segments come from
// cu_seqlens on the device: no mask is built and nothing crosses a segment boundary. Rows beyond
// gridDim.x * kThreads (a max_seqlen that undercounts) are covered by a grid-stride loop, and every
// global index is checked against the segment and the token count. NaN and inf give what SDPA's math
// gives per segment: a NaN or +inf score makes its row NaN, -inf scores weigh 0, a row with no score
// above -inf is 0; another segment's rows are never touched.
#include <math_constants.h>

#include "common.cuh"

namespace nativevit {
namespace {

constexpr int kThreads = 64;

template <typename T, int HEAD_DIM_MAX>
__global__ void varlen_attention_fwd_kernel(const T* __restrict__ q, int64_t stride_q_tok, int64_t stride_q_head,
                                            const T* __restrict__ k, int64_t stride_k_tok, int64_t stride_k_head,
                                            const T* __restrict__ v, int64_t stride_v_tok, int64_t stride_v_head,
                                            T* __restrict__ out, const int32_t* __restrict__ cu_seqlens,
                                            int64_t num_segments, int64_t total, int64_t heads, int64_t head_dim,
                                            float scale) {
  constexpr int BLOCK_N = 4096 / HEAD_DIM_MAX;  // 32 KiB of K+V tiles in shared memory
  __shared__ float k_tile[BLOCK_N][HEAD_DIM_MAX];
  __shared__ float v_tile[BLOCK_N][HEAD_DIM_MAX];

  const int64_t head = blockIdx.z;
  if (head >= heads) return;  // uniform over the block
  for (int64_t seg = blockIdx.y; seg < num_segments; seg += gridDim.y) {
    const int64_t start = cu_seqlens[seg];
    const int64_t end = cu_seqlens[seg + 1];
    if (start < 0 || end < start || end > total) continue;  // malformed offsets: uniform skip, never read out of range
    const int64_t n = end - start;
    for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kThreads; row0 < n;
         row0 += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t row = row0 + threadIdx.x;
      const bool active = row < n;
      float q_row[HEAD_DIM_MAX];
      float acc[HEAD_DIM_MAX];
#pragma unroll
      for (int d = 0; d < HEAD_DIM_MAX; ++d) {
        q_row[d] = (active && d < head_dim) ? to_float(q[(start + row) * stride_q_tok + head * stride_q_head + d]) : 0.f;
        acc[d] = 0.f;
      }
      float m = -CUDART_INF_F;
      float l = 0.f;
      for (int64_t kb = 0; kb < n; kb += BLOCK_N) {
        const int64_t kn = n - kb < BLOCK_N ? n - kb : BLOCK_N;
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < BLOCK_N * HEAD_DIM_MAX; idx += kThreads) {
          const int j = idx / HEAD_DIM_MAX;
          const int d = idx % HEAD_DIM_MAX;
          const bool ok = j < kn && d < head_dim;
          const int64_t tok = start + kb + j;
          k_tile[j][d] = ok ? to_float(k[tok * stride_k_tok + head * stride_k_head + d]) : 0.f;
          v_tile[j][d] = ok ? to_float(v[tok * stride_v_tok + head * stride_v_head + d]) : 0.f;
        }
        __syncthreads();
        if (active) {
          // per-key online softmax: two expf per key, but no unrolled key loop (nvcc compiles this in
          // seconds; unrolling keys x head_dim took minutes per instantiation)
          for (int j = 0; j < kn; ++j) {
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < HEAD_DIM_MAX; ++d) dot += q_row[d] * k_tile[j][d];
            const float s = dot * scale;
            const float m_new = fmaxf(m, s);  // fmaxf skips a NaN score; its p below is NaN all the same
            // exponentials against m_new, or against 0 while every score so far is -inf: those keys
            // weigh exp(-inf) = 0 (exp(-inf - -inf) would be NaN and poison a row math keeps finite)
            const float m_ref = m_new == -CUDART_INF_F ? 0.f : m_new;
            const float correction = expf(m - m_ref);  // 0 until a score above -inf (m = -inf)
            const float p = expf(s - m_ref);
            l = l * correction + p;
#pragma unroll
            for (int d = 0; d < HEAD_DIM_MAX; ++d) acc[d] = acc[d] * correction + p * v_tile[j][d];
            m = m_new;
          }
        }
      }
      if (active) {
        T* o = out + ((start + row) * heads + head) * head_dim;
        // l >= 1 (the row maximum contributes exp(0)) unless every score of the row is -inf: then
        // l = 0 and acc = 0, and the row is 0 as in SDPA's math (a NaN score left l = NaN)
        const float inv_l = l == 0.f ? 0.f : 1.f / l;
#pragma unroll
        for (int d = 0; d < HEAD_DIM_MAX; ++d) {
          if (d < head_dim) o[d] = from_float<T>(acc[d] * inv_l);
        }
      }
    }
  }
}

template <typename T, int HEAD_DIM_MAX>
int launch(const VarlenAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(grid_size(p.max_seqlen, kThreads, 65535),
                  static_cast<unsigned int>(p.num_segments < 65535 ? p.num_segments : 65535),
                  static_cast<unsigned int>(p.heads));
  varlen_attention_fwd_kernel<T, HEAD_DIM_MAX><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.q.data), p.q.stride_tok, p.q.stride_head, static_cast<const T*>(p.k.data),
      p.k.stride_tok, p.k.stride_head, static_cast<const T*>(p.v.data), p.v.stride_tok, p.v.stride_head,
      static_cast<T*>(p.out), p.cu_seqlens, p.num_segments, p.total, p.heads, p.head_dim, p.scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int varlen_attention_fwd_launch(const VarlenAttentionParams& p, void* stream) {
  if (p.total == 0 || p.num_segments == 0) return static_cast<int>(cudaSuccess);
  if (p.head_dim < 1 || p.head_dim > 256 || p.heads < 1 || p.heads > 65535) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.head_dim <= 64) return launch<T, 64>(p, s);
    if (p.head_dim <= 128) return launch<T, 128>(p, s);
    return launch<T, 256>(p, s);
  });
}

}  // namespace nativevit
