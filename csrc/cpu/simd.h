// Run-time ISA dispatch and shared AVX-512 helpers of the CPU kernels.
//
// The library is compiled for baseline x86-64; AVX-512 (fp32) and AVX-512-BF16 (bf16) code carries
// `target` attributes (NV_AVX512, NV_AVX512_BF16) and is picked at run time from CPUID (pick_isa), so
// one build runs on any x86-64 CPU. NATIVEVIT_CPU_ISA=generic forces the portable loops.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NATIVEVIT_X86 1
#endif

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused source of masked forms
// (vrndscaleps, vscalefps, the reductions) and then warn that it "is used uninitialized" wherever
// they are inlined: code using them sits between NV_SIMD_WARNINGS_OFF and NV_SIMD_WARNINGS_ON.
#if defined(__GNUC__) && !defined(__clang__)
#define NV_SIMD_WARNINGS_OFF                                    \
  _Pragma("GCC diagnostic push")                                \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")         \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define NV_SIMD_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define NV_SIMD_WARNINGS_OFF
#define NV_SIMD_WARNINGS_ON
#endif

namespace nativevit::cpu {

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

#if NATIVEVIT_X86
#define NV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define NV_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
NV_SIMD_WARNINGS_OFF

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

// The first n lanes (none for n <= 0, all 16 for n >= 16): masks for the tail of a row.
NV_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(n, 0)) - 1);
}

// 16 bfloat16 as fp32 (exact: bf16 is fp32's upper half).
NV_AVX512 inline __m512 bf16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The lanes of m of 16 float32 or bfloat16 values at x, as fp32 (0 elsewhere), and back (bf16 rounded
// to nearest even, as c10::BFloat16 does).
template <typename T>
NV_AVX512_BF16 inline __m512 load16(const T* x, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, x);
  } else {
    return bf16_to_f32(_mm256_maskz_loadu_epi16(m, x));
  }
}
template <typename T>
NV_AVX512_BF16 inline void store16(T* y, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(y, m, v);
  } else {
    _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

NV_SIMD_WARNINGS_ON
#endif  // NATIVEVIT_X86

}  // namespace nativevit::cpu
