// What the C++ extensions of this folder share: x86 detection (with <immintrin.h>), KITELM_INLINE, the -Wpsabi note,
// bfloat16 ↔ float32 as bit patterns, fp32 vector traits for AVX2 (F32x8) and AVX-512 (F32x16), and the RG-LRU's
// per-channel update (scalar, and a vector of channels with its exp, over either traits), and a vector tanh. Each
// source includes it; the build key in kitelm/ops/extension.py hashes this header with the compiler flags, so a
// change here rebuilds every extension.
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
#define KITELM_AVX2_FMA __attribute__((target("avx2,fma")))
#define KITELM_AVX512_FMA __attribute__((target("avx512f,avx512bw,avx512dq,fma")))

namespace kitelm {

inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// One vector of fp32 lanes per ISA: what the shared elementwise maths below (exp, σ, the RG-LRU update) and the
// decode/prefill loops over them need. `ldexp(p, n)` = p·2ⁿ for integral n in [−150, 128] (the range exp_v gives).
struct F32x8 {  // AVX2 + FMA
  using F = __m256;
  static constexpr int kLanes = 8;
  KITELM_AVX2_FMA static F load(const float* p) { return _mm256_loadu_ps(p); }
  KITELM_AVX2_FMA static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  KITELM_AVX2_FMA static F set1(float v) { return _mm256_set1_ps(v); }
  KITELM_AVX2_FMA static F zero() { return _mm256_setzero_ps(); }
  KITELM_AVX2_FMA static F add(F a, F b) { return _mm256_add_ps(a, b); }
  KITELM_AVX2_FMA static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  KITELM_AVX2_FMA static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  KITELM_AVX2_FMA static F div(F a, F b) { return _mm256_div_ps(a, b); }
  KITELM_AVX2_FMA static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  KITELM_AVX2_FMA static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c − a·b
  KITELM_AVX2_FMA static F min(F a, F b) { return _mm256_min_ps(a, b); }
  KITELM_AVX2_FMA static F max(F a, F b) { return _mm256_max_ps(a, b); }
  KITELM_AVX2_FMA static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  KITELM_AVX2_FMA static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KITELM_AVX2_FMA static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  KITELM_AVX2_FMA static F copysign(F mag, F sign) {  // |mag| with the sign bit of `sign`
    return _mm256_or_ps(abs(mag), _mm256_and_ps(_mm256_set1_ps(-0.f), sign));
  }
  KITELM_AVX2_FMA static F select_lt(F a, F b, F yes, F no) {  // a < b ? yes : no, lane by lane (NaN: no)
    return _mm256_blendv_ps(no, yes, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  // AVX2 has no VSCALEFPS: 2ⁿ as two normal powers of two built in the exponent field (n = n₁ + n₂, |n₁|, |n₂| ≤ 75),
  // so exp_v's results below 2⁻¹²⁶ come out as the same denormals and those above FLT_MAX as inf
  KITELM_AVX2_FMA static F ldexp(F p, F n) {
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const F s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const F s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  }
  KITELM_AVX2_FMA static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

struct F32x16 {  // AVX-512 F/BW/DQ
  using F = __m512;
  static constexpr int kLanes = 16;
  KITELM_AVX512_FMA static F load(const float* p) { return _mm512_loadu_ps(p); }
  KITELM_AVX512_FMA static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  KITELM_AVX512_FMA static F set1(float v) { return _mm512_set1_ps(v); }
  KITELM_AVX512_FMA static F zero() { return _mm512_setzero_ps(); }
  KITELM_AVX512_FMA static F add(F a, F b) { return _mm512_add_ps(a, b); }
  KITELM_AVX512_FMA static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  KITELM_AVX512_FMA static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  KITELM_AVX512_FMA static F div(F a, F b) { return _mm512_div_ps(a, b); }
  KITELM_AVX512_FMA static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  KITELM_AVX512_FMA static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  KITELM_AVX512_FMA static F min(F a, F b) { return _mm512_min_ps(a, b); }
  KITELM_AVX512_FMA static F max(F a, F b) { return _mm512_max_ps(a, b); }
  KITELM_AVX512_FMA static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  KITELM_AVX512_FMA static F round(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  KITELM_AVX512_FMA static F abs(F a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.f), a); }
  KITELM_AVX512_FMA static F copysign(F mag, F sign) {
    return _mm512_or_ps(abs(mag), _mm512_and_ps(_mm512_set1_ps(-0.f), sign));
  }
  KITELM_AVX512_FMA static F select_lt(F a, F b, F yes, F no) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), no, yes);
  }
  KITELM_AVX512_FMA static F ldexp(F p, F n) { return _mm512_scalef_ps(p, n); }
  KITELM_AVX512_FMA static float hsum(F v) { return _mm512_reduce_add_ps(v); }
};

// exp of a vector: Cody-Waite reduction, a degree-6 polynomial, p·2ⁿ; within ~2 ulp of expf. exp(±inf) and NaN:
// the clamp keeps NaN (min/max return their second operand when one is NaN) and maps ±inf to values whose exp is
// 0 / inf anyway.
template <class V>
KITELM_INLINE typename V::F exp_v(typename V::F x) {
  x = V::max(V::set1(-104.f), V::min(V::set1(89.f), x));
  const typename V::F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  typename V::F r = V::fnma(n, V::set1(0.693359375f), x);
  r = V::fnma(n, V::set1(-2.12194440e-4f), r);
  typename V::F p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.f)));
  return V::ldexp(p, n);
}

template <class V>
KITELM_INLINE typename V::F sigmoid_v(typename V::F g) {
  const typename V::F one = V::set1(1.f);
  return V::div(one, V::add(one, exp_v<V>(V::sub(V::zero(), g))));
}

// tanh of a vector, Cephes-style: an odd polynomial in y² for |y| < 0.625, else sign(y)·(1 − 2 / (exp(2|y|) + 1))
// with exp_v (which saturates to inf, giving ±1); within ~3 ulp of tanh; NaN stays NaN (both branches keep it).
template <class V>
KITELM_INLINE typename V::F tanh_v(typename V::F y) {
  const typename V::F a = V::abs(y), one = V::set1(1.f);
  const typename V::F big = V::sub(one, V::div(V::set1(2.f), V::add(exp_v<V>(V::add(a, a)), one)));
  const typename V::F z = V::mul(y, y);
  typename V::F p = V::set1(-5.70498872745e-3f);
  p = V::fma(p, z, V::set1(2.06390887954e-2f));
  p = V::fma(p, z, V::set1(-5.37397155531e-2f));
  p = V::fma(p, z, V::set1(1.33314422036e-1f));
  p = V::fma(p, z, V::set1(-3.33332819422e-1f));
  const typename V::F small = V::fma(V::mul(p, z), y, y);
  return V::copysign(V::select_lt(a, V::set1(0.625f), small, big), y);  // the sign of y, −0 included
}

// `rglru_update` for a vector of channels, the same operations in the same order with exp_v for exp.
template <class V>
KITELM_INLINE typename V::F rglru_update_v(typename V::F gx, typename V::F ga, typename V::F neg, typename V::F x,
                                           typename V::F h, bool start) {
  const typename V::F xin = V::mul(x, sigmoid_v<V>(gx));
  if (start) return xin;
  const typename V::F log_a = V::mul(neg, sigmoid_v<V>(ga));
  const typename V::F mult = V::sqrt(V::sub(V::set1(1.f), exp_v<V>(V::add(log_a, log_a))));
  return V::add(V::mul(exp_v<V>(log_a), h), V::mul(xin, mult));
}

}  // namespace kitelm
#endif
