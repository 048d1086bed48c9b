// What the C++ extensions of this folder share: x86 detection (with <immintrin.h>), KITELM_INLINE, the -Wpsabi note,
// bfloat16 ↔ float32 as bit patterns, and the RG-LRU's per-channel update (scalar, and 16 channels in AVX-512 with
// its exp). Each source includes it; the build key in kitelm/ops/extension.py hashes this header with the compiler
// flags, so a change here rebuilds every extension.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KITELM_X86 1
#else
#define KITELM_X86 0
#endif

// The kernel templates hold vector types without a target of their own; they are always inlined into wrappers that
// have one, so the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define KITELM_INLINE inline __attribute__((always_inline))

namespace kitelm {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as c10::BFloat16 (NaN kept quiet); branch-free.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
}

// One RG-LRU time step of one channel (Griffin eq. 4-6; kitelm/layers/rglru.py has the twin), from the gate
// pre-activations gx, ga (bias included), neg = −c·softplus(a_param), the input x and the previous h; ρ = `start`:
//   i = σ(gx), r = σ(ga), log a = neg·r, a = exp(log a), m = ρ ? 1 : sqrt(1 − exp(2 log a)),  h' = (ρ ? 0 : a·h) + x·i·m
inline float rglru_update(float gx, float ga, float neg, float x, float h, bool start) {
  const float gate_x = 1.f / (1.f + std::exp(-gx));
  const float gate_a = 1.f / (1.f + std::exp(-ga));
  const float log_a = neg * gate_a;
  const float mult = start ? 1.f : std::sqrt(1.f - std::exp(2.f * log_a));
  return (start ? 0.f : std::exp(log_a) * h) + x * gate_x * mult;
}

inline bool cpu_has_avx512() {
#if KITELM_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace kitelm

#if KITELM_X86
#define KITELM_AVX512_FMA __attribute__((target("avx512f,avx512bw,avx512dq,fma")))

namespace kitelm {

// exp of 16 floats: Cody-Waite reduction, a degree-6 polynomial, VSCALEFPS; within ~2 ulp of expf. exp(±inf) and NaN:
// the clamp keeps NaN (min/max return their second operand when one is NaN) and maps ±inf to values whose exp is
// 0 / inf anyway.
KITELM_AVX512_FMA inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
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
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

KITELM_AVX512_FMA inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// `rglru_update` for 16 channels, the same operations in the same order with exp16 for exp.
KITELM_AVX512_FMA inline __m512 rglru_update16(__m512 gx, __m512 ga, __m512 neg, __m512 x, __m512 h, bool start) {
  const __m512 xin = _mm512_mul_ps(x, sigmoid16(gx));
  if (start) return xin;
  const __m512 log_a = _mm512_mul_ps(neg, sigmoid16(ga));
  const __m512 mult = _mm512_sqrt_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), exp16(_mm512_add_ps(log_a, log_a))));
  return _mm512_add_ps(_mm512_mul_ps(exp16(log_a), h), _mm512_mul_ps(xin, mult));
}

}  // namespace kitelm
#endif

