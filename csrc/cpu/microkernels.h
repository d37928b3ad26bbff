// CPU attention microkernels and their ISA dispatch (included by attention.cpp only).
//
// Packed layouts (built by attention.cpp; tokens padded with zeros to a multiple of 16):
//   Q: [token][d] row-major
//   fp32  K: [key tile of 16][d][16 keys]          V: [key][dv]          (dv = head_dim rounded to 16)
//   bf16  K: [key tile of 16][d/2][16 keys][2 d]   V: [key/2][dv][2 keys] (the VNNI pairs of vdpbf16ps)
// Three operations on them, each with a portable C++ version and an AVX-512 one:
//   qk           S[rows][keys] = Q K^T
//   pv           O = alpha O + P V (alpha: per-row rescale of the online softmax)
//   softmax_row  one row of the online softmax, P written in the input dtype
// and, AVX-512 only, qk_p: Q K^T and P = exp(S - a given reference) in one pass (lazy_finish checks it).
// Packing one (token, head) row into those layouts: pack_q, pack_k, pack_v.
//
// ISA: the AVX-512 (fp32) and AVX-512-BF16 (bf16) microkernels are picked at run time (simd.h).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "simd.h"

namespace nativevit::cpu {

constexpr int64_t kRows = 4;  // query rows per microkernel call

// The reference the exponentials of a row are taken against: its running max, or 0 while that is
// -inf (every score so far -inf: weights exp(-inf) = 0, where exp(-inf - -inf) would be NaN).
inline float softmax_ref(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.f : m; }

// The unit of the exponentials of P: e for fp32 (exp_avx512), 2 for bf16 (exp2_bf16_avx512), whose
// scores and references are multiplied by log2(e).
template <typename T>
constexpr float kExpUnit = std::is_same_v<T, float> ? 1.f : 1.44269504088896341f;

// Element traits: fp32 works on single values, bf16 on pairs along the reduced dimension.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int64_t kPair = 1;
};
template <>
struct Elem<c10::BFloat16> {
  static constexpr int64_t kPair = 2;
};

// Packed-K index of (key j, dim d) inside one (segment, head) block with dk packed dims.
template <typename T>
inline int64_t k_index(int64_t j, int64_t d, int64_t dk) {
  constexpr int64_t P = Elem<T>::kPair;
  return (((j / 16) * (dk / P) + d / P) * 16 + j % 16) * P + d % P;
}
// Packed-V index of (key j, dim d) with dv packed dims.
template <typename T>
inline int64_t v_index(int64_t j, int64_t d, int64_t dv) {
  constexpr int64_t P = Elem<T>::kPair;
  return ((j / P) * dv + d) * P + j % P;
}

// ---- packing one (token, head) row into the layouts above (portable C++; the copies vectorise)

// Q: the row's `width` values (0 for a padded token), zeros up to dk.
template <typename T>
inline void pack_q(const T* src, int64_t width, int64_t dk, T* dst) {
  std::memcpy(dst, src, width * sizeof(T));
  std::fill(dst + width, dst + dk, T(0));
}

// K of one key at dst = &K[k_index(j, 0, dk)]: element (pair) d / P every 16 * P elements.
template <typename T>
inline void pack_k(const T* src, int64_t width, int64_t dk, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t d = 0; d < dk; ++d) dst[d * 16] = d < width ? src[d] : 0.f;
  } else {  // bf16 pairs as 32-bit words, the lower dim in the low half
    const auto* s16 = reinterpret_cast<const uint16_t*>(src);
    auto* d32 = reinterpret_cast<uint32_t*>(dst);
    const int64_t full = width / 2;
    for (int64_t p = 0; p < full; ++p) d32[p * 16] = s16[2 * p] | uint32_t(s16[2 * p + 1]) << 16;
    for (int64_t p = full; p < dk / 2; ++p) d32[p * 16] = 2 * p < width ? s16[2 * p] : 0u;
  }
}

// V of P consecutive keys (a, then b for bf16) at dst = &V[v_index(j, 0, dv)], j even.
template <typename T>
inline void pack_v(const T* a, int64_t wa, const T* b, int64_t wb, int64_t dv, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    pack_q(a, wa, dv, dst);
  } else {  // word d = (a[d], b[d])
    const auto* a16 = reinterpret_cast<const uint16_t*>(a);
    const auto* b16 = reinterpret_cast<const uint16_t*>(b);
    auto* d32 = reinterpret_cast<uint32_t*>(dst);
    const int64_t both = std::min(wa, wb);
    for (int64_t d = 0; d < both; ++d) d32[d] = a16[d] | uint32_t(b16[d]) << 16;
    for (int64_t d = both; d < dv; ++d) d32[d] = (d < wa ? a16[d] : 0u) | (d < wb ? uint32_t(b16[d]) << 16 : 0u);
  }
}

// ---- generic microkernels (portable C++, same packed layouts)

template <typename T>
void qk_generic(const T* q, int64_t ldq, const T* kp, int64_t dk, int64_t key_tiles, float* s, int64_t lds) {
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < key_tiles * 16; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < dk; ++d) {
        acc += static_cast<float>(q[r * ldq + d]) * static_cast<float>(kp[k_index<T>(j, d, dk)]);
      }
      s[r * lds + j] = acc;
    }
  }
}

template <typename T>
void pv_generic(const T* p, int64_t ldp, const T* vp, int64_t dv, int64_t keys, float* o, int64_t ldo,
                const float* alpha) {
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t d = 0; d < dv; ++d) o[r * ldo + d] *= alpha[r];
    for (int64_t j = 0; j < keys; ++j) {
      const float w = static_cast<float>(p[r * ldp + j]);
      for (int64_t d = 0; d < dv; ++d) o[r * ldo + d] += w * static_cast<float>(vp[v_index<T>(j, d, dv)]);
    }
  }
}

#if NATIVEVIT_X86
NV_SIMD_WARNINGS_OFF

// ---- AVX-512 fp32 microkernels: kRows x (C x 16) register tiles

// acc[4][C] = Q[4][dk] . K^T for C key tiles; kp points at the first tile ([tile][d][16]).
template <int C>
NV_AVX512 inline void qk_acc(const float* q, int64_t ldq, const float* kp, int64_t dk, __m512 (&acc)[kRows][C]) {
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dk; ++d) {
    __m512 b[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_ps(kp + (c * dk + d) * 16);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(q[r * ldq + d]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
}

// O[4][C*16] = alpha O + P[4][keys] . V[keys][C*16]; vp points at column d0 of the packed V ([key][dv]).
template <int C>
NV_AVX512 void pv_f32_avx512(const float* p, int64_t ldp, const float* vp, int64_t dv, int64_t keys, float* o,
                             int64_t ldo, const float* alpha) {
  __m512 acc[kRows][C];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + c * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t j = 0; j < keys; ++j) {
    __m512 b[C];
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_ps(vp + j * dv + c * 16);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * ldp + j]);
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * ldo + c * 16, acc[r][c]);
}

// ---- AVX-512-BF16 microkernels: vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32

NV_AVX512_BF16 inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

NV_AVX512_BF16 inline __m512i bcast_pair(const c10::BFloat16* x) {
  int32_t bits;
  std::memcpy(&bits, x, sizeof(bits));
  return _mm512_set1_epi32(bits);
}

// The same for bf16 ([tile][d/2][16][2] K): vdpbf16ps on pairs of dims.
template <int C>
NV_AVX512_BF16 inline void qk_acc(const c10::BFloat16* q, int64_t ldq, const c10::BFloat16* kp, int64_t dk,
                                  __m512 (&acc)[kRows][C]) {
  const int64_t pairs = dk / 2;
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i b[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_si512(kp + (c * pairs + p) * 32);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = bcast_pair(q + r * ldq + 2 * p);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(a), as_bh(b[c]));
    }
  }
}

// S[4][C*16] = Q K^T, stored as fp32.
template <typename T, int C>
NV_AVX512_BF16 void qk_avx512(const T* q, int64_t ldq, const T* kp, int64_t dk, float* s, int64_t lds) {
  __m512 acc[kRows][C];
  qk_acc<C>(q, ldq, kp, dk, acc);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(s + r * lds + c * 16, acc[r][c]);
}

// vp points at column d0 of the packed V ([key/2][dv][2]); keys is even.
template <int C>
NV_AVX512_BF16 void pv_bf16_avx512(const c10::BFloat16* p, int64_t ldp, const c10::BFloat16* vp, int64_t dv,
                                   int64_t keys, float* o, int64_t ldo, const float* alpha) {
  __m512 acc[kRows][C];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + c * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t j = 0; j < keys / 2; ++j) {
    __m512i b[C];
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_si512(vp + (j * dv + c * 16) * 2);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = bcast_pair(p + r * ldp + 2 * j);
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(a), as_bh(b[c]));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * ldo + c * 16, acc[r][c]);
}

// 2^t for the bf16 probabilities, which keep 8 bits: t = n + f with |f| <= 1/2, 2^f by a degree-3
// near-minimax polynomial (relative error <= 7.5e-5, a fiftieth of bf16's rounding), 2^n applied with
// vscalefps (0 for t below about -150). NaN stays NaN, and so does t = -inf (f = -inf - -inf): callers
// that can meet -inf clamp t first (exp_store) or treat a NaN sum as "redo exactly" (qk_p_avx512).
// 7 instructions where exp_avx512 takes 15.
NV_AVX512 inline __m512 exp2_bf16_avx512(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(5.5171672e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4261115e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9326097e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992806e-1f));
  return _mm512_scalef_ps(p, n);
}

// p[j:j+16] = exp(s * scale - m) in the P dtype (0 where masked); returns what was stored, as fp32.
// For bf16 P, vscale and vm come multiplied by log2(e) and the exponential is exp2_bf16_avx512.
template <typename T>
NV_AVX512_BF16 inline __m512 exp_store(const float* s, T* p, __m512 vscale, __m512 vm, __mmask16 mask) {
  const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s), vscale, vm);
  if constexpr (std::is_same_v<T, float>) {
    const __m512 e = _mm512_maskz_mov_ps(mask, exp_avx512(x));
    _mm512_storeu_ps(p, e);
    return e;
  } else {
    // -inf scores weigh 0 (vmaxps returns its second operand, x, when either is NaN: NaN stays NaN)
    __m512 e = _mm512_maskz_mov_ps(mask, exp2_bf16_avx512(_mm512_max_ps(_mm512_set1_ps(-150.f), x)));
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)h);
    // sum what P V will actually weigh with: the bf16-rounded probabilities
    return bf16_to_f32((__m256i)h);
  }
}

// One row of the online softmax: p = exp(s * scale - softmax_ref(m_new)) for the first `valid` of
// `width` columns (0 beyond), written in the P dtype; returns the sum of the written values and the
// new max. A NaN score gives p = NaN (so the row's sum and output are NaN), whatever the max is.
// Two vectors per iteration with separate accumulators: one dependency chain halved the throughput.
template <typename T>
NV_AVX512_BF16 float softmax_row_avx512(const float* s, int64_t width, int64_t valid, float scale, float m_old,
                                        T* p, float* m_new_out) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax0 = neg_inf, vmax1 = neg_inf;
  int64_t j = 0;
  for (; j + 32 <= width; j += 32) {
    vmax0 = _mm512_mask_max_ps(vmax0, tail_mask(valid - j), vmax0, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
    vmax1 = _mm512_mask_max_ps(vmax1, tail_mask(valid - (j + 16)), vmax1,
                               _mm512_mul_ps(_mm512_loadu_ps(s + j + 16), vscale));
  }
  if (j < width) {
    vmax0 = _mm512_mask_max_ps(vmax0, tail_mask(valid - j), vmax0, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
  }
  const float m_new = std::max(m_old, _mm512_reduce_max_ps(_mm512_max_ps(vmax0, vmax1)));
  const __m512 vm = _mm512_set1_ps(softmax_ref(m_new) * kExpUnit<T>);
  const __m512 vscale_e = _mm512_set1_ps(scale * kExpUnit<T>);
  __m512 vsum0 = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= width; j += 32) {
    vsum0 = _mm512_add_ps(vsum0, exp_store(s + j, p + j, vscale_e, vm, tail_mask(valid - j)));
    vsum1 = _mm512_add_ps(vsum1, exp_store(s + j + 16, p + j + 16, vscale_e, vm, tail_mask(valid - (j + 16))));
  }
  if (j < width) vsum0 = _mm512_add_ps(vsum0, exp_store(s + j, p + j, vscale_e, vm, tail_mask(valid - j)));
  *m_new_out = m_new;
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum0, vsum1));
}

// The probabilities of key blocks after a row's first (the online softmax with a lazy reference, as
// FlashAttention-4 rescales only when the maximum has grown by more than a bound): S = Q K^T for kRows
// rows and C key tiles stays in registers, and P = exp(S * scale - m_ref) is written straight from
// them against the reference m_ref each row already has (its running max, times log2(e) for bf16), so
// no S buffer, no max pass, no rescale of O. Each call raises vmax[r] (16 lanes per row, the raw scores'
// maximum) and vsum[r] (the sum of the written P: vdpbf16ps against ones for bf16, the rounded values
// that P V weighs with). The caller checks afterwards that max * scale - m_ref stayed within the bound
// (P <= 2^8, exact in fp32 sums) and otherwise recomputes the row group's block exactly. `last`: the
// valid keys of the last tile (padded keys get P = 0 and do not raise the max). scale > 0.
template <typename T, int C>
NV_AVX512_BF16 void qk_p_avx512(const T* q, int64_t ldq, const T* kp, int64_t dk, float scale_e, const float* m_ref,
                                __mmask16 last, T* p, int64_t ldp, float* vmax, float* vsum) {
  __m512 acc[kRows][C];
  qk_acc<C>(q, ldq, kp, dk, acc);
  const __m512 vscale = _mm512_set1_ps(scale_e);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const __m512 vm = _mm512_set1_ps(m_ref[r]);
    __m512 mx = _mm512_loadu_ps(vmax + r * 16);
    __m512 e[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __mmask16 mask = c == C - 1 ? last : __mmask16(0xFFFF);
      mx = _mm512_mask_max_ps(mx, mask, mx, acc[r][c]);
      const __m512 x = _mm512_fmsub_ps(acc[r][c], vscale, vm);
      if constexpr (std::is_same_v<T, float>) {
        e[c] = _mm512_maskz_mov_ps(mask, exp_avx512(x));
      } else {
        e[c] = _mm512_maskz_mov_ps(mask, exp2_bf16_avx512(x));
      }
    }
    _mm512_storeu_ps(vmax + r * 16, mx);
    __m512 sum = _mm512_loadu_ps(vsum + r * 16);
    T* pr = p + r * ldp;
    if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        _mm512_storeu_ps(pr + c * 16, e[c]);
        sum = _mm512_add_ps(sum, e[c]);
      }
    } else {
      const __m512bh ones = as_bh(_mm512_set1_epi16(0x3F80));  // bf16 1.0
#pragma GCC unroll 2
      for (int c = 0; c + 1 < C; c += 2) {
        const __m512bh h = _mm512_cvtne2ps_pbh(e[c + 1], e[c]);  // e[c] in the low half
        _mm512_storeu_si512(pr + c * 16, (__m512i)h);
        sum = _mm512_dpbf16_ps(sum, h, ones);
      }
      if constexpr (C % 2 == 1) {
        const __m256bh h = _mm512_cvtneps_pbh(e[C - 1]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + (C - 1) * 16), (__m256i)h);
        sum = _mm512_dpbf16_ps(sum, as_bh(_mm512_zextsi256_si512((__m256i)h)), ones);
      }
    }
    _mm512_storeu_ps(vsum + r * 16, sum);
  }
}

// After qk_p over a row group's key block: true when every row's exponent max * scale_e - m_ref stayed
// within `bound` and its sum is finite (a NaN or +inf max, a -inf score, whose bf16 exponential is NaN,
// or an overflow: the exact path gives these their semantics), and then l += the sums and alpha = 1.
NV_AVX512 inline bool lazy_finish(const float* vmax, const float* vsum, const float* m_ref, float scale_e,
                                  float bound, float* l, float* alpha) {
  float sums[kRows];
  for (int r = 0; r < kRows; ++r) {
    const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(vmax + r * 16), _mm512_set1_ps(scale_e), _mm512_set1_ps(m_ref[r]));
    sums[r] = _mm512_reduce_add_ps(_mm512_loadu_ps(vsum + r * 16));
    const bool ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_LE_OQ) == 0xFFFF &&
                    sums[r] <= std::numeric_limits<float>::max();
    if (!ok) return false;
  }
  for (int r = 0; r < kRows; ++r) {
    l[r] += sums[r];
    alpha[r] = 1.f;
  }
  return true;
}
NV_SIMD_WARNINGS_ON
#endif  // NATIVEVIT_X86

template <typename T>
float softmax_row_generic(const float* s, int64_t width, int64_t valid, float scale, float m_old, T* p,
                          float* m_new_out) {
  float m_new = m_old;
  for (int64_t j = 0; j < valid; ++j) m_new = std::max(m_new, s[j] * scale);
  const float m_ref = softmax_ref(m_new);
  float sum = 0.f;
  for (int64_t j = 0; j < width; ++j) {
    const T e = static_cast<T>(j < valid ? std::exp(std::fma(s[j], scale, -m_ref)) : 0.f);
    p[j] = e;
    sum += static_cast<float>(e);
  }
  *m_new_out = m_new;
  return sum;
}

// Dispatch a column count 1..N to a template instantiation.
template <template <int> class F, typename... Args>
void call_cols(int cols, Args&&... args) {
  switch (cols) {
    case 1: F<1>::run(std::forward<Args>(args)...); break;
    case 2: F<2>::run(std::forward<Args>(args)...); break;
    case 3: F<3>::run(std::forward<Args>(args)...); break;
    case 4: F<4>::run(std::forward<Args>(args)...); break;
    case 5: F<5>::run(std::forward<Args>(args)...); break;
    default: TORCH_CHECK(false, "internal: unsupported microkernel width ", cols);
  }
}

#if NATIVEVIT_X86
template <typename T>
struct Qk {
  template <int C>
  struct Cols {
    static void run(const T* q, int64_t ldq, const T* kp, int64_t dk, float* s, int64_t lds) {
      qk_avx512<T, C>(q, ldq, kp, dk, s, lds);
    }
  };
};
template <typename T>
struct QkP {
  template <int C>
  struct Cols {
    static void run(const T* q, int64_t ldq, const T* kp, int64_t dk, float scale_e, const float* m_ref,
                    __mmask16 last, T* p, int64_t ldp, float* vmax, float* vsum) {
      qk_p_avx512<T, C>(q, ldq, kp, dk, scale_e, m_ref, last, p, ldp, vmax, vsum);
    }
  };
};
template <int C>
struct PvF32 {
  static void run(const float* p, int64_t ldp, const float* vp, int64_t dv, int64_t keys, float* o, int64_t ldo,
                  const float* alpha) {
    pv_f32_avx512<C>(p, ldp, vp, dv, keys, o, ldo, alpha);
  }
};
template <int C>
struct PvBf16 {
  static void run(const c10::BFloat16* p, int64_t ldp, const c10::BFloat16* vp, int64_t dv, int64_t keys, float* o,
                  int64_t ldo, const float* alpha) {
    pv_bf16_avx512<C>(p, ldp, vp, dv, keys, o, ldo, alpha);
  }
};
#endif

// S[rows][key_tiles*16] = Q K^T; rows is a multiple of kRows. Key chunks outer, row groups inner:
// the 64-key chunk of K and the query block stay in L1 while every row group streams them.
template <typename T>
void qk(Isa isa, const T* q, int64_t ldq, int64_t rows, const T* kp, int64_t dk, int64_t key_tiles, float* s,
        int64_t lds) {
#if NATIVEVIT_X86
  if (isa == Isa::kAvx512) {
    for (int64_t t = 0; t < key_tiles; t += 4) {
      const int cols = static_cast<int>(std::min<int64_t>(4, key_tiles - t));
      for (int64_t r = 0; r < rows; r += kRows) {
        call_cols<Qk<T>::template Cols>(cols, q + r * ldq, ldq, kp + t * 16 * dk, dk, s + r * lds + t * 16, lds);
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; r += kRows) qk_generic(q + r * ldq, ldq, kp, dk, key_tiles, s + r * lds, lds);
}

#if NATIVEVIT_X86
// P[kRows][key_tiles*16] against each row's reference m_ref (qk_p_avx512), the first `valid` keys;
// raises vmax and vsum. AVX-512 only: the generic loops always take the exact path.
template <typename T>
void qk_p(const T* q, int64_t ldq, const T* kp, int64_t dk, int64_t key_tiles, int64_t valid, float scale_e,
          const float* m_ref, T* p, int64_t ldp, float* vmax, float* vsum) {
  for (int64_t t = 0; t < key_tiles; t += 4) {
    const int cols = static_cast<int>(std::min<int64_t>(4, key_tiles - t));
    const __mmask16 last = t + cols == key_tiles ? tail_mask(valid - (key_tiles - 1) * 16) : __mmask16(0xFFFF);
    call_cols<QkP<T>::template Cols>(cols, q, ldq, kp + t * 16 * dk, dk, scale_e, m_ref, last, p + t * 16, ldp, vmax,
                                     vsum);
  }
}
#endif

// O[kRows][dv] = alpha O + P[kRows][keys] V[keys][dv] for one row group (alpha: per-row rescale).
template <typename T>
void pv(Isa isa, const T* p, int64_t ldp, const T* vp, int64_t dv, int64_t keys, float* o, int64_t ldo,
        const float* alpha) {
#if NATIVEVIT_X86
  if (isa == Isa::kAvx512) {
    constexpr int64_t P = Elem<T>::kPair;
    // column tiles of 16 in near-equal chunks of at most 5 (dv 128: 4 + 4, not 5 + 3)
    const int64_t tiles = dv / 16, chunk = (tiles + (tiles + 4) / 5 - 1) / ((tiles + 4) / 5);
    for (int64_t d0 = 0; d0 < dv; d0 += chunk * 16) {
      const int cols = static_cast<int>(std::min<int64_t>(chunk * 16, dv - d0) / 16);
      if constexpr (std::is_same_v<T, float>) {
        call_cols<PvF32>(cols, p, ldp, vp + d0 * P, dv, keys, o + d0, ldo, alpha);
      } else {
        call_cols<PvBf16>(cols, p, ldp, vp + d0 * P, dv, keys, o + d0, ldo, alpha);
      }
    }
    return;
  }
#endif
  pv_generic(p, ldp, vp, dv, keys, o, ldo, alpha);
}

template <typename T>
float softmax_row(Isa isa, const float* s, int64_t width, int64_t valid, float scale, float m_old, T* p,
                  float* m_new) {
#if NATIVEVIT_X86
  if (isa == Isa::kAvx512) return softmax_row_avx512(s, width, valid, scale, m_old, p, m_new);
#endif
  return softmax_row_generic(s, width, valid, scale, m_old, p, m_new);
}

}  // namespace nativevit::cpu
