// Weight-only quantized matrix-vector kernels for decoding: y = x Ŵᵀ + b for 1-8 rows of fp32 x, where Ŵ is stored
// as bf16, int8 or packed int4 with one bf16 scale per `group` consecutive weights of a row. The pure-torch twins
// (`linear_reference`, `quantize_activations`) are in kitelm/ops/quant.py and are the reference in tests/test_quant.py.
//
// Layouts (kitelm/ops/quant.py has the same description):
//   bf16  w [out, in] bfloat16
//   int8  q [out, in] int8 in [-127, 127];  scales [out, in / group] bf16;   ŵ = q · s
//   int4  q [out, in / 2] uint8;  scales [out, in / group] bf16;  group % 32 == 0.  Within every block of 32 weights
//         of a row, byte j (0 ≤ j < 16) holds weight j in its low nibble and weight j + 16 in its high nibble, each
//         stored as n = q + 8 (q in [-7, 7]);  ŵ = (n − 8) · s.  One 16-byte load unpacks into two runs of 16 weights.
//
// Two kinds of arithmetic, chosen per call (`quantize_x`):
// * int8 x (int8 and int4 weights whose width and group are multiples of 32; the default): each row of x is quantized
//   once per call per block of 32, s_x = bf16(amax / 127), x_q = round-half-even(x / s_x) ∈ [−127, 127]
//   (`quantize_block`), and every block of 32 weights adds (D · s_x) · s_w, where D = Σ q · x_q is an exact integer:
//   VPDPBUSD on AVX-512 VNNI, PMADDUBSW + PMADDWD elsewhere (int8 weights by the sign trick |w| × ±x_q; int4 nibbles
//   n = q + 8 as they are, less 8 · Σ x_q per block). The weights are never widened: per weight vector at one row of
//   x ≈ 3× (int8) and 5× (int4) fewer vector instructions than the fp32 form, so one row streams at the memory rate.
// * fp32 x (bf16 weights; int8/int4 when the caller asks for it or the width or group is no multiple of 32): each
//   weight vector is turned into fp32 in registers and multiplied by x in fp32.
// Each kernel streams every weight row once for all rows of x and output rows are split across torch's threads. The
// ISA is chosen at run time: this file is compiled for baseline x86-64 and each fast path carries its own target
// attribute, so one build runs on AVX2-only and AVX-512 CPUs. `isa`: 0 = portable C++ (the reference form of the
// same maths), 1 = AVX2+FMA, 2 = AVX-512 F/BW/DQ, 3 = AVX-512 with VNNI (bf16 weights take path 2 there). The AVX2
// and AVX-512 kernels are one template each over a vector-traits struct (Avx2, Avx512, Avx512Vnni).
#include <torch/extension.h>
#include "kernel_common.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#ifndef KITELM_PREFETCH  // bytes ahead of the weight row being read that are prefetched (0: none)
#define KITELM_PREFETCH 4096
#endif

namespace {

constexpr int kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3;
constexpr int kBlock = 32;  // x is quantized per block of 32 values of a row

using kitelm::bf16_to_float;
using kitelm::float_to_bf16;

// One block of 32 values of x → x_q (and Σ x_q), returning s_x. s_x = bf16(amax / 127) rounded to nearest even, and
// x_q = x / s_x rounded half to even, clamped to ±127 (bf16 may round s_x down). A block whose amax / 127 is below the
// smallest normal float is zero (s_x = 0); a block holding inf or NaN gets s_x = NaN and x_q = 0, so its outputs are
// NaN. `quantize_activations` in kitelm/ops/quant.py is the twin, bit for bit.
KITELM_INLINE float quantize_block(const float* x, int8_t* q, int32_t* sum) {
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < kBlock; ++j) {
    const float a = std::fabs(x[j]);
    finite = finite && a <= FLT_MAX;
    amax = a > amax ? a : amax;
  }
  const float d = amax / 127.f;
  if (!finite || d < FLT_MIN) {
    std::memset(q, 0, kBlock);
    *sum = 0;
    return finite ? 0.f : NAN;
  }
  const float s = bf16_to_float(float_to_bf16(d));
  int32_t total = 0;
  for (int j = 0; j < kBlock; ++j) {
    float t = x[j] / s;                       // |t| ≤ 127·(1 + 2⁻⁸)
    t = (t + 12582912.f) - 12582912.f;        // + 1.5·2²³: rounds half to even in the default rounding mode
    t = t > 127.f ? 127.f : (t < -127.f ? -127.f : t);
    q[j] = static_cast<int8_t>(t);
    total += q[j];
  }
  *sum = total;
  return s;
}

enum class Fmt { bf16, int8, int4 };

// std::vector storage that starts on a cache line: whole-vector loads of x's lanes never span two lines (AVX-512
// Zen5, RG-2B's linears at one row of x from DRAM, one core: int8 26.3 → 33.8 GB/s, int4 27.5 → 30.1 with malloc's
// 16-byte alignment → 64; benchmarks/NOTES.md, "Zen5 again")
template <class T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <class U> CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <class U> bool operator==(const CacheAligned<U>&) const { return true; }
  template <class U> bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <class T> using AlignedVector = std::vector<T, CacheAligned<T>>;

// x of one call in the layout of the vector integer kernels: per row, whole chunks (one weight vector each) of
// x_q bytes and of int32 / fp32 lanes, zero past the end of the row. Built once per call (`prepare_lanes`).
struct XLanes {
  int64_t row_q = 0;      // x_q bytes per row
  int64_t row_lanes = 0;  // lanes per row
  const int8_t* q = nullptr;      // natural order (int8 weights); per chunk [low-nibble order | high-nibble order] (int4)
  const int32_t* corr = nullptr;  // int4: −8 · Σ x_q of each block in its first lane (undoes the nibbles' + 8)
  const float* s = nullptr;       // s_x of each block in all its lanes
  alignas(64) int32_t idx[16] = {};  // lane → offset of its weight scale from the chunk's first scale
};

// Everything a kernel needs about one call. Row r of x starts at x + r * in; scales row o at scales + o * ngroups.
struct Problem {
  Fmt fmt;
  int64_t rows, in, out, group, ngroups;
  int shift;  // weight i uses scale i >> shift (group a power of two; 62 when a row has one scale)
  const float* x;
  const void* w;
  const uint16_t* scales;
  const float* bias;
  float* y;
  const int8_t* xq = nullptr;  // int8 x, natural order [rows, in] (portable path)
  const float* xs = nullptr;   // its s_x [rows, in / 32]
  const XLanes* lanes = nullptr;  // int8 x for the vector paths
};

inline int weight_int(const Problem& p, int64_t o, int64_t i) {  // q of an int8 / int4 weight
  if (p.fmt == Fmt::int8) return static_cast<const int8_t*>(p.w)[o * p.in + i];
  const uint8_t byte = static_cast<const uint8_t*>(p.w)[o * (p.in / 2) + (i / 32) * 16 + (i % 16)];
  return ((i % 32) < 16 ? (byte & 0xf) : (byte >> 4)) - 8;
}

inline float weight_at(const Problem& p, int64_t o, int64_t i) {  // ŵ in fp32
  if (p.fmt == Fmt::bf16) return bf16_to_float(static_cast<const uint16_t*>(p.w)[o * p.in + i]);
  return static_cast<float>(weight_int(p, o, i)) * bf16_to_float(p.scales[o * p.ngroups + i / p.group]);
}

// Scales of row o as fp32 (one pass over ngroups bf16 values per row: no conversion or division per chunk).
KITELM_INLINE void row_scales(const Problem& p, int64_t o, float* s) {
  for (int64_t g = 0; g < p.ngroups; ++g) s[g] = bf16_to_float(p.scales[o * p.ngroups + g]);
}

// ------------------------------------------------------------------------------------- portable reference paths
void rows_scalar(const Problem& p, int64_t begin, int64_t end) {  // fp32 x
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc = 0.f;
      for (int64_t i = 0; i < p.in; ++i) acc += weight_at(p, o, i) * p.x[r * p.in + i];
      p.y[r * p.out + o] = p.bias ? acc + p.bias[o] : acc;
    }
  }
}

void rows_scalar_int(const Problem& p, int64_t begin, int64_t end) {  // int8 x: the maths of the vector kernels
  const int64_t nb = p.in / kBlock;
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t d = 0;
        for (int j = 0; j < kBlock; ++j) d += weight_int(p, o, b * kBlock + j) * p.xq[r * p.in + b * kBlock + j];
        acc += static_cast<float>(d) * p.xs[r * nb + b] * bf16_to_float(p.scales[o * p.ngroups + b * kBlock / p.group]);
      }
      p.y[r * p.out + o] = p.bias ? acc + p.bias[o] : acc;
    }
  }
}

#if KITELM_X86
// ------------------------------------------------------------------------------------------------ vector traits
// One vector of L int32 / fp32 lanes (4L bytes): what the kernel templates below need, per ISA.
#define KITELM_AVX2 __attribute__((target("avx2,fma")))
#define KITELM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,fma")))
#define KITELM_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,fma")))

struct Avx2 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  KITELM_AVX2 static I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  KITELM_AVX2 static I load_partial(const void* p, int64_t n) {  // n < 32 bytes, zeros after them
    alignas(32) uint8_t b[32] = {};
    std::memcpy(b, p, n);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
  }
  KITELM_AVX2 static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  KITELM_AVX2 static F zero() { return _mm256_setzero_ps(); }
  KITELM_AVX2 static F set1(float v) { return _mm256_set1_ps(v); }
  KITELM_AVX2 static I bytes(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
  KITELM_AVX2 static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  KITELM_AVX2 static I srl4_16(I a) { return _mm256_srli_epi16(a, 4); }
  KITELM_AVX2 static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  KITELM_AVX2 static F add(F a, F b) { return _mm256_add_ps(a, b); }
  KITELM_AVX2 static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  KITELM_AVX2 static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  KITELM_AVX2 static F permute(I idx, F v) { return _mm256_permutevar8x32_ps(v, idx); }
  KITELM_AVX2 static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // acc + Σ of 4 adjacent u8 · s8 products per int32 lane. PMADDUBSW saturates its int16 pair sums: exact while
  // |u·s + u'·s'| ≤ 32767 (nibbles: 4 products ≤ 15·127 in `dot2`; int8: |w| · ±127 in `dot8`).
  KITELM_AVX2 static I dot2(I acc, I u1, I s1, I u2, I s2) {
    const I pairs = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  // int8 weights × int8 x: |w| as u8 and x with w's sign (w, x ∈ [−127, 127]), so each product is w·x
  struct W8 { I abs, w; };
  KITELM_AVX2 static W8 prep8(I w) { return {_mm256_abs_epi8(w), w}; }
  KITELM_AVX2 static I dot8(const W8& w, I, I x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w.abs, _mm256_sign_epi8(x, w.w)), _mm256_set1_epi16(1));
  }
  // fp32 path: L stored weights → L floats (int4: L bytes → L int32 nibble pairs)
  KITELM_AVX2 static F from_bf16(const uint16_t* p) {
    const I raw = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  }
  KITELM_AVX2 static F from_int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  KITELM_AVX2 static I widen_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  KITELM_AVX2 static F low_nibbles(I n) { return _mm256_cvtepi32_ps(_mm256_and_si256(n, _mm256_set1_epi32(0xf))); }
  KITELM_AVX2 static F high_nibbles(I n) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(n, 4)); }
  // n bf16 scales → n floats (whole vectors; the last one partial)
  KITELM_AVX2 static void row_scales(const uint16_t* src, int64_t n, float* dst) {
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) _mm256_storeu_ps(dst + g, from_bf16(src + g));
    for (; g < n; ++g) dst[g] = bf16_to_float(src[g]);
  }
  // x quantizer (quantize_block_v)
  KITELM_AVX2 static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
  KITELM_AVX2 static F max(F a, F b) { return _mm256_max_ps(a, b); }
  KITELM_AVX2 static F clamp127(F v) { return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f)); }
  KITELM_AVX2 static F div(F a, F b) { return _mm256_div_ps(a, b); }
  KITELM_AVX2 static F round_even(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KITELM_AVX2 static bool all_finite(F a) {  // a = |x|: false for inf and NaN
    return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ)) == 0xff;
  }
  KITELM_AVX2 static float hmax(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  KITELM_AVX2 static void store_int8(int8_t* p, F v) {  // v integral in [−127, 127]
    const I i = _mm256_cvtps_epi32(v);
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(h, h));
  }
};

struct Avx512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  KITELM_AVX512 static I load(const void* p) { return _mm512_loadu_si512(p); }
  KITELM_AVX512 static I load_partial(const void* p, int64_t n) {  // n < 64 bytes, zeros after them
    return _mm512_maskz_loadu_epi8((__mmask64{1} << n) - 1, p);
  }
  KITELM_AVX512 static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  KITELM_AVX512 static F zero() { return _mm512_setzero_ps(); }
  KITELM_AVX512 static F set1(float v) { return _mm512_set1_ps(v); }
  KITELM_AVX512 static I bytes(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  KITELM_AVX512 static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  KITELM_AVX512 static I srl4_16(I a) { return _mm512_srli_epi16(a, 4); }
  KITELM_AVX512 static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  KITELM_AVX512 static F add(F a, F b) { return _mm512_add_ps(a, b); }
  KITELM_AVX512 static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  KITELM_AVX512 static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  KITELM_AVX512 static F permute(I idx, F v) { return _mm512_permutexvar_ps(idx, v); }
  KITELM_AVX512 static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  KITELM_AVX512 static I dot2(I acc, I u1, I s1, I u2, I s2) {  // as Avx2::dot2
    const I pairs = _mm512_add_epi16(_mm512_maddubs_epi16(u1, s1), _mm512_maddubs_epi16(u2, s2));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
  struct W8 { I abs; __mmask64 negative; };  // as Avx2: AVX-512 has no VPSIGNB, so x is negated under a mask
  KITELM_AVX512 static W8 prep8(I w) { return {_mm512_abs_epi8(w), _mm512_movepi8_mask(w)}; }
  KITELM_AVX512 static I dot8(const W8& w, I, I x) {
    const I signed_x = _mm512_mask_sub_epi8(x, w.negative, _mm512_setzero_si512(), x);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(w.abs, signed_x), _mm512_set1_epi16(1));
  }
  KITELM_AVX512 static F from_bf16(const uint16_t* p) {
    const I raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  }
  KITELM_AVX512 static F from_int8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  KITELM_AVX512 static I widen_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  KITELM_AVX512 static F low_nibbles(I n) { return _mm512_cvtepi32_ps(_mm512_and_si512(n, _mm512_set1_epi32(0xf))); }
  KITELM_AVX512 static F high_nibbles(I n) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(n, 4)); }
  KITELM_AVX512 static void row_scales(const uint16_t* src, int64_t n, float* dst) {
    int64_t g = 0;
    for (; g + 16 <= n; g += 16) _mm512_storeu_ps(dst + g, from_bf16(src + g));
    if (g < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - g)) - 1);
      const __m512i raw = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, src + g)));
      _mm512_mask_storeu_ps(dst + g, m, _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
    }
  }
  KITELM_AVX512 static F abs(F v) { return _mm512_abs_ps(v); }
  KITELM_AVX512 static F max(F a, F b) { return _mm512_max_ps(a, b); }
  KITELM_AVX512 static F clamp127(F v) { return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f)); }
  KITELM_AVX512 static F div(F a, F b) { return _mm512_div_ps(a, b); }
  KITELM_AVX512 static F round_even(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KITELM_AVX512 static bool all_finite(F a) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ) == 0xffff; }
  KITELM_AVX512 static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  KITELM_AVX512 static void store_int8(int8_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
};

// VPDPBUSD multiplies u8 × s8 and adds 4 products per lane into int32 without saturation: one instruction for
// PMADDUBSW + PMADDWD + PADDD. int8 weights keep the sign trick (|w| × ±x: no offset to undo, so no per-row offset
// vector to load, which is what 4-8 rows of x wait for; w ⊕ 0x80 = w + 128 with a −128·Σx_q offset measured 1.4×
// slower at 8 rows and no faster at 1).
struct Avx512Vnni : Avx512 {
  KITELM_AVX512VNNI static I dot2(I acc, I u1, I s1, I u2, I s2) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, u1, s1), u2, s2);
  }
  KITELM_AVX512VNNI static I dot8(const W8& w, I, I x) {
    const I signed_x = _mm512_mask_sub_epi8(x, w.negative, _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.abs, signed_x);
  }
};

// quantize_block in vectors: the same operations (IEEE division, round half to even, the same scalar s_x), so the
// same bits; `quantize_activations(x, isa)` lets the tests check every ISA against the twin.
template <class V>
KITELM_INLINE float quantize_block_v(const float* x, int8_t* q, int32_t* sum) {
  using Fv = typename V::F;
  constexpr int L = V::kLanes, N = kBlock / L;
  Fv v[N], m = V::zero();
  bool finite = true;
  for (int n = 0; n < N; ++n) {
    v[n] = V::loadf(x + n * L);
    const Fv a = V::abs(v[n]);
    finite = V::all_finite(a) && finite;
    m = V::max(m, a);
  }
  const float d = V::hmax(m) / 127.f;
  if (!finite || d < FLT_MIN) {
    std::memset(q, 0, kBlock);
    *sum = 0;
    return finite ? 0.f : NAN;
  }
  const float s = bf16_to_float(float_to_bf16(d));
  Fv total = V::zero();
  for (int n = 0; n < N; ++n) {
    const Fv t = V::clamp127(V::round_even(V::div(v[n], V::set1(s))));
    total = V::add(total, t);  // integers: exact in any order
    V::store_int8(q + n * L, t);
  }
  *sum = static_cast<int32_t>(V::hsum(total));
  return s;
}

// --------------------------------------------------------------------------------------- int8-x kernel (template)
// A chunk is one weight vector: 4L bytes = 4L int8 weights (blocks of 32 in 8 lanes each) or 8L int4 weights (a
// block per 16 bytes; low nibbles against x_q's low-order copy, high nibbles against the high-order one: 4 lanes each).
// Per chunk and row of x: int32 dots D (lanes) → fp32, × s_x (lanes), FMA × s_w (lanes) into acc[o][r]. O output
// rows go together, so every x vector loaded (x_q, the offset, s_x: 3 per row and chunk) serves O weight rows: at 4-8
// rows of x those loads, not the arithmetic, are what the kernel waits for.
template <class V, Fmt F, int R, int O>
KITELM_INLINE void int_chunk(const typename V::I (&wv)[O], int64_t c, const float* const (&sb)[O], int shift,
                             typename V::I idx, const XLanes& xl, typename V::F (&acc)[O][R]) {
  using I = typename V::I;
  constexpr int L = V::kLanes;
  constexpr int64_t kChunkWeights = F == Fmt::int4 ? 8 * L : 4 * L;
  // the weight scales of the chunk's lanes: one broadcast load where one group covers the chunk (a group ≥ 4L int8
  // or 8L int4 weights), else a permute of the scale row (AVX2 Zen3, one row of x: int8 g32 16.7 → 22.9 GB/s and
  // int4 g64 12.2 → 13.9 GB/s a core from L2 with the broadcast; benchmarks/NOTES.md, "AVX2 Zen3")
  typename V::F sw[O];
  const bool one_scale = ((kChunkWeights - 1) >> shift) == 0;
#pragma GCC unroll 2
  for (int o = 0; o < O; ++o) {
    const float* chunk_scales = sb[o] + ((c * kChunkWeights) >> shift);
    sw[o] = one_scale ? V::set1(*chunk_scales) : V::permute(idx, V::loadf(chunk_scales));
  }
  // weight side, shared by the rows of x
  typename V::W8 w8[O];
  I lo[O], hi[O];
  if constexpr (F == Fmt::int8) {
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o) w8[o] = V::prep8(wv[o]);
  } else {
    const I low = V::bytes(0x0f);
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o) lo[o] = V::and_(wv[o], low), hi[o] = V::and_(V::srl4_16(wv[o]), low);
  }
  // each row of x: its vectors once, then dot → fp32 → × s_x → FMA × s_w for every weight row (few live registers)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int8_t* x = xl.q + r * xl.row_q + c * kChunkWeights;
    const I x0 = V::load(x);
    I x1{}, corr{};
    if constexpr (F == Fmt::int4) x1 = V::load(x + 4 * L);
    if constexpr (F == Fmt::int4) corr = V::load(xl.corr + r * xl.row_lanes + c * L);
    const typename V::F s = V::loadf(xl.s + r * xl.row_lanes + c * L);
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o) {
      I a;
      if constexpr (F == Fmt::int8) a = V::dot8(w8[o], corr, x0);  // corr: zero, the sign trick needs none
      else a = V::dot2(corr, lo[o], x0, hi[o], x1);
      acc[o][r] = V::fma(V::mul(V::cvt(a), s), sw[o], acc[o][r]);
    }
  }
}

// Output rows o0, o0 + gap, …, o0 + (O − 1)·gap; U sets of accumulators (independent chains in flight when there are
// few rows of x).
template <class V, Fmt F, int R, int O, int U>
KITELM_INLINE void int_rows(const Problem& p, int64_t o0, int64_t gap, float* const (&sb)[O], typename V::I idx) {
  using Fv = typename V::F;
  constexpr int64_t kChunkBytes = 4 * V::kLanes;
  const XLanes& xl = *p.lanes;
  const int64_t row_bytes = F == Fmt::int4 ? p.in / 2 : p.in;
  const int64_t full = row_bytes / kChunkBytes, tail = row_bytes % kChunkBytes;
  const uint8_t* w[O];
#pragma GCC unroll 2
  for (int o = 0; o < O; ++o) {
    V::row_scales(p.scales + (o0 + o * gap) * p.ngroups, p.ngroups, sb[o]);
    w[o] = static_cast<const uint8_t*>(p.w) + (o0 + o * gap) * row_bytes;
  }
  Fv acc[U][O][R];  // every loop over them is unrolled, so they stay in registers
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[u][o][r] = V::zero();
  typename V::I wv[O];
  int64_t c = 0;
  for (; c + U <= full; c += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 2
      for (int o = 0; o < O; ++o) {
#if KITELM_PREFETCH
        __builtin_prefetch(w[o] + (c + u) * kChunkBytes + KITELM_PREFETCH);
#endif
        wv[o] = V::load(w[o] + (c + u) * kChunkBytes);
      }
      int_chunk<V, F, R, O>(wv, c + u, sb, p.shift, idx, xl, acc[u]);
    }
  }
  for (; c < full; ++c) {
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o) wv[o] = V::load(w[o] + c * kChunkBytes);
    int_chunk<V, F, R, O>(wv, c, sb, p.shift, idx, xl, acc[0]);
  }
  if (tail) {
#pragma GCC unroll 2
    for (int o = 0; o < O; ++o) wv[o] = V::load_partial(w[o] + c * kChunkBytes, tail);
    int_chunk<V, F, R, O>(wv, c, sb, p.shift, idx, xl, acc[0]);
  }
#pragma GCC unroll 2
  for (int o = 0; o < O; ++o) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Fv total = acc[0][o][r];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) total = V::add(total, acc[u][o][r]);
      const float sum = V::hsum(total);
      p.y[r * p.out + o0 + o * gap] = p.bias ? sum + p.bias[o0 + o * gap] : sum;
    }
  }
}

template <class V, Fmt F, int R>
KITELM_INLINE void rows_int(const Problem& p, int64_t begin, int64_t end);

// int4 weights at 7-8 rows of x: the rows of x two at a time over blocks of ~256 KiB of weight rows, so the block is
// read from DRAM once and from L2 for the other pairs. The int4 chunk needs more registers a row of x than int8's (two
// x_q vectors and the offsets), and at 8 rows the one-pass kernel collapses: RG-9B's linears 380 → 291 ms at 8 rows,
// RG-2B's 103 → 99; at 7 rows both ways are equal, at 4-6 rows the one pass is 4-19 % faster (benchmarks/NOTES.md).
template <class V, int R>
KITELM_INLINE void rows_int4_in_pairs(const Problem& p, int64_t begin, int64_t end) {
  const int64_t block = std::max<int64_t>(16, (256 << 10) / std::max<int64_t>(p.in / 2, 1));
  for (int64_t b0 = begin; b0 < end; b0 += block) {
    for (int r0 = 0; r0 < R; r0 += 2) {
      Problem pair = p;
      XLanes lanes = *p.lanes;
      lanes.q += r0 * lanes.row_q;
      lanes.s += r0 * lanes.row_lanes;
      lanes.corr += r0 * lanes.row_lanes;
      pair.lanes = &lanes;
      pair.x = p.x + r0 * p.in;
      pair.y = p.y + r0 * p.out;
      pair.rows = std::min(2, R - r0);
      if (pair.rows == 2) rows_int<V, Fmt::int4, 2>(pair, b0, std::min(end, b0 + block));
      else rows_int<V, Fmt::int4, 1>(pair, b0, std::min(end, b0 + block));
    }
  }
}

template <class V, Fmt F, int R>
KITELM_INLINE void rows_int(const Problem& p, int64_t begin, int64_t end) {
  if constexpr (F == Fmt::int4 && R >= 7) {
    return rows_int4_in_pairs<V, R>(p, begin, end);
  }
  // two weight rows at a time where the registers hold 2 × R accumulators (AVX2 has 16 vector registers), one from
  // each half of [begin, end): two independent DRAM streams per core, which the prefetchers keep in flight together
  // (adjacent rows are one stream; the halves measured +12-17 % on DRAM-resident weights: benchmarks/NOTES.md)
  constexpr int O = V::kLanes == 16 || R <= 2 ? 2 : 1;
  constexpr int U = R == 1 ? (O == 2 ? 2 : 4) : (R == 2 && O == 1 ? 2 : 1);
  AlignedVector<float> scale_buffer(2 * (p.ngroups + V::kLanes), 0.f);  // + L: a chunk's scales may read past the end
  float* const sb2[2] = {scale_buffer.data(), scale_buffer.data() + p.ngroups + V::kLanes};
  float* const sb1[1] = {sb2[0]};
  const typename V::I idx = V::load(p.lanes->idx);
  int64_t o = begin;
  if constexpr (O == 2) {
    const int64_t half = (end - begin) / 2;
    for (int64_t i = 0; i < half; ++i) int_rows<V, F, R, 2, U>(p, begin + i, half, sb2, idx);
    o = begin + 2 * half;
  }
  for (; o < end; ++o) int_rows<V, F, R, 1, (R == 1 ? 4 : 1)>(p, o, 1, sb1, idx);
}

// ------------------------------------------------------------------------------------------ fp32-x kernel (template)
// Accumulators acc[r][u]: R rows of x × U independent chains. int8 vectors never straddle two scales (group % L == 0
// or one group per row: checked by the caller); int4 goes a block of 32 at a time, L bytes → L low + L high nibbles.
// bf16 weights, one row of x: output rows o and o2 in one pass (two weight streams in flight, each x vector loaded
// once for both), two chains per row, one prefetch per 64-byte line of each row.
template <class V>
KITELM_INLINE void bf16_row_pair(const Problem& p, int64_t o, int64_t o2) {
  using Fv = typename V::F;
  constexpr int L = V::kLanes;
  const int64_t in = p.in;
  const uint16_t* w0 = static_cast<const uint16_t*>(p.w) + o * in;
  const uint16_t* w1 = static_cast<const uint16_t*>(p.w) + o2 * in;
  Fv a0 = V::zero(), b0 = V::zero(), a1 = V::zero(), b1 = V::zero();
  int64_t k = 0;
  for (; k + 2 * L <= in; k += 2 * L) {
#if KITELM_PREFETCH
    if (((k * 2) & 63) == 0) {
      __builtin_prefetch(reinterpret_cast<const char*>(w0 + k) + KITELM_PREFETCH);
      __builtin_prefetch(reinterpret_cast<const char*>(w1 + k) + KITELM_PREFETCH);
    }
#endif
    const Fv x0 = V::loadf(p.x + k), x1 = V::loadf(p.x + k + L);
    a0 = V::fma(V::from_bf16(w0 + k), x0, a0);
    b0 = V::fma(V::from_bf16(w0 + k + L), x1, b0);
    a1 = V::fma(V::from_bf16(w1 + k), x0, a1);
    b1 = V::fma(V::from_bf16(w1 + k + L), x1, b1);
  }
  float s0 = V::hsum(V::add(a0, b0)), s1 = V::hsum(V::add(a1, b1));
  for (; k < in; ++k) {  // tail (< 2L weights)
    s0 += bf16_to_float(w0[k]) * p.x[k];
    s1 += bf16_to_float(w1[k]) * p.x[k];
  }
  p.y[o] = p.bias ? s0 + p.bias[o] : s0;
  p.y[o2] = p.bias ? s1 + p.bias[o2] : s1;
}

// Output rows o0, o0 + gap, …, o0 + (O − 1)·gap for R rows of fp32 x: each x vector loaded once serves the O weight
// rows. With 6-8 rows of x, x outgrows L1 (8 × 2,560 floats = 80 KiB) and is read from L2 once per output row: one
// output row at a time, bf16 weights streamed at 11-17 GB/s there on the Zen5 against 41 at 4 rows and 35 at 8 rows
// of a 1,024-wide x that fits (benchmarks/NOTES.md, "Decode step on the Zen5"); two output rows halve that traffic.
template <class V, Fmt F, int R, int O, int U>
KITELM_INLINE void fp32_rows(const Problem& p, int64_t o0, int64_t gap, float* const (&sb)[O]) {
  using Fv = typename V::F;
  constexpr int L = V::kLanes;
  constexpr int64_t step = F == Fmt::int4 ? kBlock : L;  // weights per unit of work
  const int64_t in = p.in;
  int64_t rows[O];
#pragma GCC unroll 2
  for (int j = 0; j < O; ++j) {
    rows[j] = o0 + j * gap;
    if constexpr (F != Fmt::bf16) row_scales(p, rows[j], sb[j]);
  }
  Fv acc[O][R][U];
#pragma GCC unroll 2
  for (int j = 0; j < O; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[j][r][u] = V::zero();
  auto unit = [&](int64_t k, int u) __attribute__((always_inline)) {
#if KITELM_PREFETCH
#pragma GCC unroll 2
    for (int j = 0; j < O; ++j)
      __builtin_prefetch(static_cast<const char*>(p.w) + (rows[j] * in + k) * (F == Fmt::bf16 ? 2 : 1) /
                             (F == Fmt::int4 ? 2 : 1) + KITELM_PREFETCH);
#endif
    if constexpr (F == Fmt::int4) {
#pragma GCC unroll 2
      for (int h = 0; h < 16 / L; ++h) {
        Fv w0[O], w1[O];
#pragma GCC unroll 2
        for (int j = 0; j < O; ++j) {
          const uint8_t* w = static_cast<const uint8_t*>(p.w) + rows[j] * (in / 2) + k / 2;
          const float sf = sb[j][k >> p.shift];
          const Fv s = V::set1(sf), minus8s = V::set1(-8.f * sf);  // ŵ = n·s − 8·s, exact in fp32
          const typename V::I n = V::widen_u8(w + h * L);
          w0[j] = V::fma(V::low_nibbles(n), s, minus8s);
          w1[j] = V::fma(V::high_nibbles(n), s, minus8s);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const Fv x0 = V::loadf(p.x + r * in + k + h * L), x1 = V::loadf(p.x + r * in + k + 16 + h * L);
#pragma GCC unroll 2
          for (int j = 0; j < O; ++j) {
            acc[j][r][u] = V::fma(w0[j], x0, acc[j][r][u]);
            acc[j][r][u] = V::fma(w1[j], x1, acc[j][r][u]);
          }
        }
      }
    } else {
      Fv wv[O];
#pragma GCC unroll 2
      for (int j = 0; j < O; ++j) {
        if constexpr (F == Fmt::bf16) wv[j] = V::from_bf16(static_cast<const uint16_t*>(p.w) + rows[j] * in + k);
        else wv[j] = V::mul(V::from_int8(static_cast<const int8_t*>(p.w) + rows[j] * in + k), V::set1(sb[j][k >> p.shift]));
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Fv xv = V::loadf(p.x + r * in + k);
#pragma GCC unroll 2
        for (int j = 0; j < O; ++j) acc[j][r][u] = V::fma(wv[j], xv, acc[j][r][u]);
      }
    }
  };
  int64_t i = 0;  // first weight not yet consumed
  for (; i + step * U <= in; i += step * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) unit(i + step * u, u);
  }
  for (; i + step <= in; i += step) unit(i, 0);
#pragma GCC unroll 2
  for (int j = 0; j < O; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      Fv total = acc[j][r][0];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) total = V::add(total, acc[j][r][u]);
      float sum = V::hsum(total);
      for (int64_t k = i; k < in; ++k) sum += weight_at(p, rows[j], k) * p.x[r * in + k];  // tail (< L weights)
      p.y[r * p.out + rows[j]] = p.bias ? sum + p.bias[rows[j]] : sum;
    }
  }
}

template <class V, Fmt F, int R>
KITELM_INLINE void rows_fp32(const Problem& p, int64_t begin, int64_t end) {
  if constexpr (F == Fmt::bf16 && R == 1) {  // rows paired across the two halves of the range, as in rows_int
    const int64_t half = (end - begin) / 2;
    for (int64_t i = 0; i < half; ++i) bf16_row_pair<V>(p, begin + i, begin + half + i);
    begin += 2 * half;
  }
  // two output rows per pass where the registers hold 2 × R accumulators (AVX-512's 32), taken from the two halves
  // of [begin, end) as in rows_int: two DRAM streams per core
  constexpr int O = V::kLanes == 16 && R >= 2 ? 2 : 1;
  constexpr int U = R == 1 ? 4 : (R == 2 ? 2 : 1);
  std::vector<float> scale_buffer(2 * p.ngroups);
  float* const sb2[2] = {scale_buffer.data(), scale_buffer.data() + p.ngroups};
  float* const sb1[1] = {sb2[0]};
  if constexpr (O == 2) {
    const int64_t half = (end - begin) / 2;
    for (int64_t i = 0; i < half; ++i) fp32_rows<V, F, R, 2, U>(p, begin + i, half, sb2);
    begin += 2 * half;
  }
  for (int64_t o = begin; o < end; ++o) fp32_rows<V, F, R, 1, U>(p, o, 1, sb1);
}

// The templates compiled for each ISA (flatten: the traits' functions are inlined into the target-specific body).
#define KITELM_FLATTEN __attribute__((flatten))
template <Fmt F, int R> KITELM_AVX2 KITELM_FLATTEN void int_avx2(const Problem& p, int64_t b, int64_t e) { rows_int<Avx2, F, R>(p, b, e); }
template <Fmt F, int R> KITELM_AVX512 KITELM_FLATTEN void int_avx512(const Problem& p, int64_t b, int64_t e) { rows_int<Avx512, F, R>(p, b, e); }
template <Fmt F, int R> KITELM_AVX512VNNI KITELM_FLATTEN void int_vnni(const Problem& p, int64_t b, int64_t e) { rows_int<Avx512Vnni, F, R>(p, b, e); }
template <Fmt F, int R> KITELM_AVX2 KITELM_FLATTEN void fp32_avx2(const Problem& p, int64_t b, int64_t e) { rows_fp32<Avx2, F, R>(p, b, e); }
template <Fmt F, int R> KITELM_AVX512 KITELM_FLATTEN void fp32_avx512(const Problem& p, int64_t b, int64_t e) { rows_fp32<Avx512, F, R>(p, b, e); }

using kitelm::cpu_has_avx2;
using kitelm::cpu_has_avx512;
bool cpu_has_avx512vnni() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
}
#endif  // KITELM_X86

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

#define KITELM_BY_ROWS(FN, ...)                                                                               \
  switch (rows) {                                                                                             \
    case 1: return FN<__VA_ARGS__ 1>; case 2: return FN<__VA_ARGS__ 2>; case 3: return FN<__VA_ARGS__ 3>;     \
    case 4: return FN<__VA_ARGS__ 4>; case 5: return FN<__VA_ARGS__ 5>; case 6: return FN<__VA_ARGS__ 6>;     \
    case 7: return FN<__VA_ARGS__ 7>; case 8: return FN<__VA_ARGS__ 8>;                                       \
  }

RowsFn pick(int isa, Fmt fmt, bool int_x, int64_t rows) {
#if KITELM_X86
  if (int_x && fmt == Fmt::int8) {
    if (isa == kAvx512Vnni) KITELM_BY_ROWS(int_vnni, Fmt::int8, )
    if (isa == kAvx512) KITELM_BY_ROWS(int_avx512, Fmt::int8, )
    if (isa == kAvx2) KITELM_BY_ROWS(int_avx2, Fmt::int8, )
  } else if (int_x) {
    if (isa == kAvx512Vnni) KITELM_BY_ROWS(int_vnni, Fmt::int4, )
    if (isa == kAvx512) KITELM_BY_ROWS(int_avx512, Fmt::int4, )
    if (isa == kAvx2) KITELM_BY_ROWS(int_avx2, Fmt::int4, )
  } else if (fmt == Fmt::bf16) {
    if (isa >= kAvx512) KITELM_BY_ROWS(fp32_avx512, Fmt::bf16, )
    if (isa == kAvx2) KITELM_BY_ROWS(fp32_avx2, Fmt::bf16, )
  } else if (fmt == Fmt::int8) {
    if (isa >= kAvx512) KITELM_BY_ROWS(fp32_avx512, Fmt::int8, )
    if (isa == kAvx2) KITELM_BY_ROWS(fp32_avx2, Fmt::int8, )
  } else {
    if (isa >= kAvx512) KITELM_BY_ROWS(fp32_avx512, Fmt::int4, )
    if (isa == kAvx2) KITELM_BY_ROWS(fp32_avx2, Fmt::int4, )
  }
#endif
  return int_x ? rows_scalar_int : rows_scalar;
}

int checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512Vnni, "quant kernels: isa must be 0, 1, 2 or 3, got ", isa);
#if KITELM_X86
  TORCH_CHECK(isa != kAvx512Vnni || cpu_has_avx512vnni(), "quant kernels: this CPU has no AVX512-VNNI");
  TORCH_CHECK(isa != kAvx512 || cpu_has_avx512(), "quant kernels: this CPU has no AVX-512 F/BW/DQ");
  TORCH_CHECK(isa != kAvx2 || cpu_has_avx2(), "quant kernels: this CPU has no AVX2+FMA");
#else
  TORCH_CHECK(isa == kScalar, "quant kernels: only the portable path exists off x86-64");
#endif
  return static_cast<int>(isa);
}

// x quantized per block (natural order) and, for a vector path of `lanes` lanes, its chunk layout (XLanes).
struct QuantizedX {
  AlignedVector<int8_t> q, lane_q;
  AlignedVector<float> s, lane_s;
  AlignedVector<int32_t> sum, lane_corr;
  XLanes lanes;
};

template <class V>  // V = void: the portable quantize_block
KITELM_INLINE void quantize_rows(const float* x, int64_t rows, int64_t in, QuantizedX& qx) {
  const int64_t nb = in / kBlock;
  qx.q.resize(rows * in);
  qx.s.resize(rows * nb);
  qx.sum.resize(rows * nb);
  for (int64_t b = 0; b < rows * nb; ++b) {  // a row is a whole number of blocks
    int8_t* q = qx.q.data() + b * kBlock;
    int32_t* sum = qx.sum.data() + b;
    if constexpr (std::is_void_v<V>) qx.s[b] = quantize_block(x + b * kBlock, q, sum);
#if KITELM_X86
    else qx.s[b] = quantize_block_v<V>(x + b * kBlock, q, sum);
#endif
  }
}

KITELM_INLINE void prepare_lanes(Fmt fmt, int64_t rows, int64_t in, int shift, int lanes, QuantizedX& qx) {
  const int64_t chunk_weights = fmt == Fmt::int4 ? 8 * lanes : 4 * lanes;
  const int blocks_per_chunk = static_cast<int>(chunk_weights / kBlock), lanes_per_block = lanes / blocks_per_chunk;
  const int64_t nb = in / kBlock, chunks = (in + chunk_weights - 1) / chunk_weights;
  XLanes& xl = qx.lanes;
  xl.row_q = chunks * chunk_weights;
  xl.row_lanes = chunks * lanes;
  qx.lane_q.assign(rows * xl.row_q, 0);
  qx.lane_s.assign(rows * xl.row_lanes, 0.f);
  qx.lane_corr.assign(fmt == Fmt::int4 ? rows * xl.row_lanes : 0, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c = b / blocks_per_chunk, j = b % blocks_per_chunk, first = r * xl.row_lanes + c * lanes + j * lanes_per_block;
      for (int l = 0; l < lanes_per_block; ++l) qx.lane_s[first + l] = qx.s[r * nb + b];
      if (fmt == Fmt::int4) qx.lane_corr[first] = -8 * qx.sum[r * nb + b];
      const int8_t* src = qx.q.data() + r * in + b * kBlock;
      int8_t* dst = qx.lane_q.data() + r * xl.row_q + c * chunk_weights;
      if (fmt == Fmt::int8) {
        std::memcpy(dst + j * kBlock, src, kBlock);
      } else {  // block j of the chunk: its bytes are at 16j of the weight vector; low nibbles = x 0-15, high = 16-31
        std::memcpy(dst + 16 * j, src, 16);
        std::memcpy(dst + 4 * lanes + 16 * j, src + 16, 16);
      }
    }
  }
  for (int l = 0; l < lanes; ++l) xl.idx[l] = (kBlock * (l / lanes_per_block)) >> shift;
  xl.q = qx.lane_q.data();
  xl.s = qx.lane_s.data();
  xl.corr = qx.lane_corr.data();
}

#if KITELM_X86
KITELM_AVX2 KITELM_FLATTEN void prepare_avx2(Fmt fmt, const float* x, int64_t rows, int64_t in, int shift, QuantizedX& qx) {
  quantize_rows<Avx2>(x, rows, in, qx);
  if (shift >= 0) prepare_lanes(fmt, rows, in, shift, Avx2::kLanes, qx);
}
KITELM_AVX512 KITELM_FLATTEN void prepare_avx512(Fmt fmt, const float* x, int64_t rows, int64_t in, int shift, QuantizedX& qx) {
  quantize_rows<Avx512>(x, rows, in, qx);
  if (shift >= 0) prepare_lanes(fmt, rows, in, shift, Avx512::kLanes, qx);
}
#endif

// x of one call for path `isa`: quantized (natural order) and, for a vector path (shift ≥ 0), laid out in lanes.
void prepare_x(int isa, Fmt fmt, const float* x, int64_t rows, int64_t in, int shift, QuantizedX& qx) {
#if KITELM_X86
  if (isa == kAvx2) return prepare_avx2(fmt, x, rows, in, shift, qx);
  if (isa >= kAvx512) return prepare_avx512(fmt, x, rows, in, shift, qx);
#endif
  quantize_rows<void>(x, rows, in, qx);
}

// Shared checks and the parallel loop.
torch::Tensor run(Fmt fmt, const torch::Tensor& x_in, const torch::Tensor& w_in, const c10::optional<torch::Tensor>& scales_in,
                  const c10::optional<torch::Tensor>& bias_in, int64_t group, int64_t isa_in, bool quantize_x) {
  const int isa = checked_isa(isa_in);
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.device().is_cpu() && x_in.dim() >= 1,
              "quant kernels: x must be a float32 CPU tensor");
  TORCH_CHECK(w_in.dim() == 2 && w_in.device().is_cpu(), "quant kernels: the weight must be a 2-D CPU tensor");
  const int64_t in = x_in.size(-1), out = w_in.size(0);
  const auto x = x_in.reshape({-1, in}).contiguous();
  const int64_t rows = x.size(0);
  TORCH_CHECK(rows >= 1 && rows <= 8, "quant kernels take 1 to 8 rows, got ", rows);
  const auto w = w_in.contiguous();
  int64_t ngroups = 1;
  c10::optional<torch::Tensor> scales;
  if (fmt == Fmt::bf16) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.size(1) == in, "gemv_bf16: weight ", w.sizes(),
                " must be bfloat16 [out, ", in, "]");
    group = in;
  } else {
    TORCH_CHECK(scales_in.has_value(), "quant kernels: int formats need scales");
    scales = scales_in->contiguous();
    TORCH_CHECK(group >= 1 && in % group == 0, "quant kernels: group ", group, " does not divide ", in);
    ngroups = in / group;
    TORCH_CHECK(scales->scalar_type() == torch::kBFloat16 && scales->dim() == 2 && scales->size(0) == out &&
                    scales->size(1) == ngroups,
                "quant kernels: scales ", scales->sizes(), " must be bfloat16 [", out, ", ", ngroups, "]");
    if (fmt == Fmt::int8) {
      TORCH_CHECK(w.scalar_type() == torch::kChar && w.size(1) == in, "gemv_int8: weight ", w.sizes(),
                  " must be int8 [out, ", in, "]");
    } else {
      TORCH_CHECK(group % 32 == 0, "gemv_int4: group ", group, " must be a multiple of 32");
      TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) * 2 == in, "gemv_int4: weight ", w.sizes(),
                  " must be uint8 [out, ", in / 2, "]");
    }
  }
  c10::optional<torch::Tensor> bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == out, "quant kernels: bias must be float32 [",
                out, "]");
  }
  // int8 x needs whole blocks of 32 that share one weight scale; the vector paths find scales by a shift, so a group
  // that is no power of two takes the portable path (fp32 x: also a group smaller than one vector of L weights)
  const bool int_x = quantize_x && fmt != Fmt::bf16 && in % kBlock == 0 && group % kBlock == 0;
  const bool pow2 = (group & (group - 1)) == 0;
  const int shift = ngroups == 1 ? 62 : (pow2 ? __builtin_ctzll(static_cast<uint64_t>(group)) : 0);
  const int64_t lanes = isa >= kAvx512 ? 16 : 8;
  const bool vector_ok = ngroups == 1 || (pow2 && (int_x || fmt == Fmt::bf16 || group >= lanes));
  int effective = vector_ok ? isa : kScalar;
  if (!int_x && effective == kAvx512Vnni) effective = kAvx512;  // VNNI has nothing to add to fp32 arithmetic
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = out;
  auto y = torch::empty(out_shape, x.options());
  Problem p{fmt, rows, in, out, group, ngroups, shift, x.data_ptr<float>(), w.data_ptr(),
            scales.has_value() ? reinterpret_cast<const uint16_t*>(scales->data_ptr()) : nullptr,
            bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>()};
  QuantizedX qx;
  if (int_x) {
    prepare_x(effective, fmt, p.x, rows, in, effective == kScalar ? -1 : shift, qx);
    p.xq = qx.q.data();
    p.xs = qx.s.data();
    if (effective != kScalar) p.lanes = &qx.lanes;
  }
  const RowsFn fn = pick(effective, fmt, int_x, rows);
  const int64_t row_bytes = fmt == Fmt::int4 ? in / 2 : (fmt == Fmt::int8 ? in : 2 * in);
  // ≥ 1 MiB of weights per task: small layers stay on the calling thread, which (unlike a worker that another
  // process may have descheduled) is running for sure; a shared 2-core VM otherwise stalls a step per parallel call
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return y;
}

}  // namespace

torch::Tensor gemv_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                        int64_t isa) {
  return run(Fmt::bf16, x, w, c10::nullopt, bias, 0, isa, false);
}
torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t group, int64_t isa, bool quantize_x) {
  return run(Fmt::int8, x, q, scales, bias, group, isa, quantize_x);
}
torch::Tensor gemv_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t group, int64_t isa, bool quantize_x) {
  return run(Fmt::int4, x, q, scales, bias, group, isa, quantize_x);
}

// x [rows, in] float32 (in % 32 == 0) → (x_q int8 [rows, in], s_x float32 [rows, in / 32]) exactly as the int8-x
// kernels of path `isa` quantize it: what tests compare the twin `quantize_activations` with.
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x_in, int64_t isa) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && x_in.dim() == 2 && x_in.size(1) % kBlock == 0,
              "quantize_activations: x must be float32 [rows, in] with in a multiple of 32, got ", x_in.sizes());
  const auto x = x_in.contiguous();
  QuantizedX qx;
  prepare_x(checked_isa(isa), Fmt::int8, x.data_ptr<float>(), x.size(0), x.size(1), -1, qx);
  auto q = torch::empty({x.size(0), x.size(1)}, x.options().dtype(torch::kChar));
  auto s = torch::empty({x.size(0), x.size(1) / kBlock}, x.options());
  std::memcpy(q.data_ptr(), qx.q.data(), qx.q.size());
  std::memcpy(s.data_ptr(), qx.s.data(), qx.s.size() * sizeof(float));
  return {q, s};
}

int64_t best_isa() {
#if KITELM_X86
  if (cpu_has_avx512vnni()) return kAvx512Vnni;
  if (cpu_has_avx512()) return kAvx512;
  if (cpu_has_avx2()) return kAvx2;
#endif
  return kScalar;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x Wᵀ + b, W bfloat16, 1-8 rows of fp32 x");
  m.def("gemv_int8", &gemv_int8, "y = x Ŵᵀ + b, Ŵ = int8 · bf16 group scale, 1-8 rows; quantize_x: int8 x per block of 32");
  m.def("gemv_int4", &gemv_int4, "y = x Ŵᵀ + b, Ŵ = (nibble − 8) · bf16 group scale, 1-8 rows; quantize_x as gemv_int8");
  m.def("quantize_activations", &quantize_activations, "x [rows, in], isa → (x_q int8, s_x float32 per block of 32)");
  m.def("best_isa", &best_isa, "0 portable, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512 + VNNI: the fastest path this CPU runs");
}
