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
//
// ISA: the library is compiled for baseline x86-64; the AVX-512 (fp32) and AVX-512-BF16 (bf16)
// microkernels carry `target` attributes and are picked at run time from CPUID (pick_isa), so one
// build runs on any x86-64 CPU. NATIVEVIT_CPU_ISA=generic forces the portable loops.
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

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NATIVEVIT_X86 1
#endif

namespace nativevit::cpu {

constexpr int64_t kRows = 4;  // query rows per microkernel call

// The reference the exponentials of a row are taken against: its running max, or 0 while that is
// -inf (every score so far -inf: weights exp(-inf) = 0, where exp(-inf - -inf) would be NaN).
inline float softmax_ref(float m) { return m == -std::numeric_limits<float>::infinity() ? 0.f : m; }

enum class Isa { kGeneric, kAvx512 };

inline bool cpu_has_avx512() {
#if NATIVEVIT_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#if NATIVEVIT_X86
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

inline bool generic_forced() {
  const char* env = std::getenv("NATIVEVIT_CPU_ISA");
  return env != nullptr && std::string(env) == "generic";
}

// The microkernels for one dtype: AVX-512 when this CPU has it (AVX-512-BF16 for bf16), else generic.
inline Isa pick_isa(c10::ScalarType dtype) {
  if (generic_forced()) return Isa::kGeneric;
  if (dtype == c10::kBFloat16) return cpu_has_avx512_bf16() ? Isa::kAvx512 : Isa::kGeneric;
  return cpu_has_avx512() ? Isa::kAvx512 : Isa::kGeneric;
}

// What cpu_isa() reports: "avx512_bf16", "avx512" or "generic".
inline std::string isa_name() {
  if (generic_forced()) return "generic";
  if (cpu_has_avx512_bf16()) return "avx512_bf16";
  if (cpu_has_avx512()) return "avx512";
  return "generic";
}

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
#define NV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define NV_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// ---- AVX-512 fp32 microkernels: kRows x (C x 16) register tiles

// S[4][C*16] = Q[4][dk] . K^T for C key tiles; kp points at the first tile ([tile][d][16]).
template <int C>
NV_AVX512 void qk_f32_avx512(const float* q, int64_t ldq, const float* kp, int64_t dk, float* s, int64_t lds) {
  __m512 acc[kRows][C];
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
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(s + r * lds + c * 16, acc[r][c]);
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

template <int C>
NV_AVX512_BF16 void qk_bf16_avx512(const c10::BFloat16* q, int64_t ldq, const c10::BFloat16* kp, int64_t dk,
                                   float* s, int64_t lds) {
  const int64_t pairs = dk / 2;
  __m512 acc[kRows][C];
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

// exp(x) for x <= ~88: Cephes-style range reduction x = n ln2 + r, degree-6 polynomial on
// |r| <= ln2/2 (about 1 ulp), 2^n applied with vscalefps so large negative x flush to 0 (exactly 0
// for x <= -104, -inf included). exp(NaN) is NaN: vmaxps returns its second operand when either is
// NaN, so x goes second (the other order turned a NaN score into weight 0: a NaN key was dropped).
NV_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.f)), n);
}

// 2^t for the bf16 probabilities, which keep 8 bits: t = n + f with |f| <= 1/2, 2^f by its degree-4
// Taylor polynomial (relative error <= 4.2e-5, under a hundredth of bf16's rounding), 2^n applied with
// vscalefps (0 for t <= -150, -inf included); NaN stays NaN (vmaxps returns its second operand, t,
// when either is NaN). 9 instructions where exp_avx512 takes 15.
NV_AVX512 inline __m512 exp2_bf16_avx512(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-150.f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);            // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

NV_AVX512 inline __mmask16 valid_mask(int64_t valid, int64_t j) {
  return valid - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(valid - j, 0)) - 1);
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
    __m512 e = _mm512_maskz_mov_ps(mask, exp2_bf16_avx512(x));
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)h);
    // sum what P V will actually weigh with: the bf16-rounded probabilities
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
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
    vmax0 = _mm512_mask_max_ps(vmax0, valid_mask(valid, j), vmax0, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
    vmax1 = _mm512_mask_max_ps(vmax1, valid_mask(valid, j + 16), vmax1,
                               _mm512_mul_ps(_mm512_loadu_ps(s + j + 16), vscale));
  }
  if (j < width) {
    vmax0 = _mm512_mask_max_ps(vmax0, valid_mask(valid, j), vmax0, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
  }
  const float m_new = std::max(m_old, _mm512_reduce_max_ps(_mm512_max_ps(vmax0, vmax1)));
  // bf16: exponentials in base 2 (exp2_bf16_avx512), the scale and the reference times log2(e)
  constexpr float kUnit = std::is_same_v<T, float> ? 1.f : 1.44269504088896341f;
  const __m512 vm = _mm512_set1_ps(softmax_ref(m_new) * kUnit);
  const __m512 vscale_e = _mm512_set1_ps(scale * kUnit);
  __m512 vsum0 = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= width; j += 32) {
    vsum0 = _mm512_add_ps(vsum0, exp_store(s + j, p + j, vscale_e, vm, valid_mask(valid, j)));
    vsum1 = _mm512_add_ps(vsum1, exp_store(s + j + 16, p + j + 16, vscale_e, vm, valid_mask(valid, j + 16)));
  }
  if (j < width) vsum0 = _mm512_add_ps(vsum0, exp_store(s + j, p + j, vscale_e, vm, valid_mask(valid, j)));
  *m_new_out = m_new;
  return _mm512_reduce_add_ps(_mm512_add_ps(vsum0, vsum1));
}
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
template <int C>
struct QkF32 {
  static void run(const float* q, int64_t ldq, const float* kp, int64_t dk, float* s, int64_t lds) {
    qk_f32_avx512<C>(q, ldq, kp, dk, s, lds);
  }
};
template <int C>
struct QkBf16 {
  static void run(const c10::BFloat16* q, int64_t ldq, const c10::BFloat16* kp, int64_t dk, float* s, int64_t lds) {
    qk_bf16_avx512<C>(q, ldq, kp, dk, s, lds);
  }
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
        if constexpr (std::is_same_v<T, float>) {
          call_cols<QkF32>(cols, q + r * ldq, ldq, kp + t * 16 * dk, dk, s + r * lds + t * 16, lds);
        } else {
          call_cols<QkBf16>(cols, q + r * ldq, ldq, kp + t * 16 * dk, dk, s + r * lds + t * 16, lds);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; r += kRows) qk_generic(q + r * ldq, ldq, kp, dk, key_tiles, s + r * lds, lds);
}

// O[kRows][dv] = alpha O + P[kRows][keys] V[keys][dv] for one row group (alpha: per-row rescale).
template <typename T>
void pv(Isa isa, const T* p, int64_t ldp, const T* vp, int64_t dv, int64_t keys, float* o, int64_t ldo,
        const float* alpha) {
#if NATIVEVIT_X86
  if (isa == Isa::kAvx512) {
    constexpr int64_t P = Elem<T>::kPair;
    for (int64_t d0 = 0; d0 < dv; d0 += 80) {
      const int cols = static_cast<int>(std::min<int64_t>(80, dv - d0) / 16);
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
