// Weight-only quantized matrix-vector kernels for decoding: y = x Ŵᵀ + b for 1-8 rows of fp32 x, where Ŵ is stored
// as bf16, int8 or packed int4 with one bf16 scale per `group` consecutive weights of a row. The pure-torch twins
// (dequantize + F.linear) are in kitelm/quant/formats.py and are the reference in tests/test_quant.py.
//
// Layouts (kitelm/quant/formats.py has the same description):
//   bf16  w [out, in] bfloat16
//   int8  q [out, in] int8 in [-127, 127];  scales [out, in / group] bf16;   ŵ = q · s
//   int4  q [out, in / 2] uint8;  scales [out, in / group] bf16;  group % 32 == 0.  Within every block of 32 weights
//         of a row, byte j (0 ≤ j < 16) holds weight j in its low nibble and weight j + 16 in its high nibble, each
//         stored as n = q + 8 (q in [-7, 7]);  ŵ = (n − 8) · s.  One 16-byte load unpacks into two runs of 16 weights.
//
// At batch 1 a step reads every weight once, so the kernels stream each weight row once for all rows of x, turn it
// into fp32 in registers (never in memory), and split output rows across torch's threads. The ISA is chosen at run
// time: this file is compiled for baseline x86-64 and each fast path carries its own target attribute, so one build
// runs on AVX2-only and AVX-512 CPUs. `isa`: 0 = portable C++, 1 = AVX2+FMA, 2 = AVX-512 F/BW, 3 = AVX-512 with
// AVX512-BF16 (int4 only: bf16 dot products, x rounded to bf16; bf16 and int8 weights take path 2 there).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KITELM_X86 1
#else
#define KITELM_X86 0
#endif

namespace {

constexpr int kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3;

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 (NaN kept quiet); branch-free
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
}

enum class Fmt { bf16, int8, int4 };

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
  const uint16_t* xb;  // kAvx512Bf16 int4 path: x rounded to bf16 and permuted to the nibble order (see below)
};

// ---------------------------------------------------------------------------------------- portable reference path
inline float weight_at(const Problem& p, int64_t o, int64_t i) {
  switch (p.fmt) {
    case Fmt::bf16:
      return bf16_to_float(static_cast<const uint16_t*>(p.w)[o * p.in + i]);
    case Fmt::int8:
      return static_cast<float>(static_cast<const int8_t*>(p.w)[o * p.in + i]) *
             bf16_to_float(p.scales[o * p.ngroups + i / p.group]);
    case Fmt::int4: {
      const uint8_t byte = static_cast<const uint8_t*>(p.w)[o * (p.in / 2) + (i / 32) * 16 + (i % 16)];
      const int n = (i % 32) < 16 ? (byte & 0xf) : (byte >> 4);
      return static_cast<float>(n - 8) * bf16_to_float(p.scales[o * p.ngroups + i / p.group]);
    }
  }
  return 0.f;
}

void rows_scalar(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc = 0.f;
      for (int64_t i = 0; i < p.in; ++i) acc += weight_at(p, o, i) * p.x[r * p.in + i];
      p.y[r * p.out + o] = p.bias ? acc + p.bias[o] : acc;
    }
  }
}

#if KITELM_X86
// ---------------------------------------------------------------------------------------------------- AVX-512 path
// Accumulators acc[r][u]: R rows of x × U independent chains (U chunks in flight hide the FMA latency at 1-2 rows).
#define KITELM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,fma")))

// Scales of row o as fp32 (one pass over ngroups bf16 values per row: no conversion or division per chunk).
inline void row_scales(const Problem& p, int64_t o, float* s) {
  for (int64_t g = 0; g < p.ngroups; ++g) s[g] = bf16_to_float(p.scales[o * p.ngroups + g]);
}

template <int R>
KITELM_AVX512 void rows_avx512(const Problem& p, int64_t begin, int64_t end) {
  constexpr int U = R == 1 ? 4 : (R == 2 ? 2 : 1);
  const int64_t in = p.in;
  std::vector<float> scale_buffer(p.ngroups);
  float* sb = scale_buffer.data();
  for (int64_t o = begin; o < end; ++o) {
    if (p.fmt != Fmt::bf16) row_scales(p, o, sb);
    __m512 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    int64_t i = 0;  // first weight not yet consumed
    if (p.fmt == Fmt::bf16) {
      const uint16_t* w = static_cast<const uint16_t*>(p.w) + o * in;
      for (; i + 16 * U <= in; i += 16 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 16 * u));
          const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.x + r * in + i + 16 * u), acc[r][u]);
        }
      }
      for (; i + 16 <= in; i += 16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
        const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.x + r * in + i), acc[r][0]);
      }
    } else if (p.fmt == Fmt::int8) {
      // vector chunks of 16 never straddle two scales: group % 16 == 0 or one group per row (checked by the caller)
      const int8_t* w = static_cast<const int8_t*>(p.w) + o * in;
      for (; i + 16 * U <= in; i += 16 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16 * u));
          const __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), _mm512_set1_ps(sb[(i + 16 * u) >> p.shift]));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.x + r * in + i + 16 * u), acc[r][u]);
        }
      }
      for (; i + 16 <= in; i += 16) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
        const __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), _mm512_set1_ps(sb[i >> p.shift]));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.x + r * in + i), acc[r][0]);
      }
    } else {  // int4: one 16-byte load = one block of 32 weights (low nibbles: 0-15, high nibbles: 16-31)
      const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * (in / 2);
      const __m512i low = _mm512_set1_epi32(0xf);
      // ŵ = n·s − 8·s: one FMA per 16 weights, exact in fp32 (n·s and 8·s need at most 12 significant bits)
      for (; i + 32 * U <= in; i += 32 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const int64_t k = i + 32 * u;
          const __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
          const float sf = sb[k >> p.shift];
          const __m512 s = _mm512_set1_ps(sf), minus8s = _mm512_set1_ps(-8.f * sf);
          const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(n, low)), s, minus8s);
          const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(n, 4)), s, minus8s);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            acc[r][u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p.x + r * in + k), acc[r][u]);
            acc[r][u] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.x + r * in + k + 16), acc[r][u]);
          }
        }
      }
      for (; i + 32 <= in; i += 32) {
        const __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2)));
        const float sf = sb[i >> p.shift];
        const __m512 s = _mm512_set1_ps(sf), minus8s = _mm512_set1_ps(-8.f * sf);
        const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(n, low)), s, minus8s);
        const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(n, 4)), s, minus8s);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p.x + r * in + i), acc[r][0]);
          acc[r][0] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.x + r * in + i + 16), acc[r][0]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512 total = acc[r][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[r][u]);
      float sum = _mm512_reduce_add_ps(total);
      for (int64_t k = i; k < in; ++k) sum += weight_at(p, o, k) * p.x[r * in + k];  // tail (< 16 weights)
      p.y[r * p.out + o] = p.bias ? sum + p.bias[o] : sum;
    }
  }
}

// ------------------------------------------------------------------------------------------------------- AVX2 path
#define KITELM_AVX2 __attribute__((target("avx2,fma")))

KITELM_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
KITELM_AVX2 void rows_avx2(const Problem& p, int64_t begin, int64_t end) {
  constexpr int U = R == 1 ? 4 : (R == 2 ? 2 : 1);
  const int64_t in = p.in;
  std::vector<float> scale_buffer(p.ngroups);
  float* sb = scale_buffer.data();
  for (int64_t o = begin; o < end; ++o) {
    if (p.fmt != Fmt::bf16) row_scales(p, o, sb);
    __m256 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    if (p.fmt == Fmt::bf16) {
      const uint16_t* w = static_cast<const uint16_t*>(p.w) + o * in;
      for (; i + 8 * U <= in; i += 8 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8 * u));
          const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.x + r * in + i + 8 * u), acc[r][u]);
        }
      }
      for (; i + 8 <= in; i += 8) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.x + r * in + i), acc[r][0]);
      }
    } else if (p.fmt == Fmt::int8) {
      const int8_t* w = static_cast<const int8_t*>(p.w) + o * in;
      for (; i + 8 * U <= in; i += 8 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i + 8 * u));
          const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), _mm256_set1_ps(sb[(i + 8 * u) >> p.shift]));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.x + r * in + i + 8 * u), acc[r][u]);
        }
      }
      for (; i + 8 <= in; i += 8) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i));
        const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), _mm256_set1_ps(sb[i >> p.shift]));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.x + r * in + i), acc[r][0]);
      }
    } else {  // int4: two 8-byte loads per block of 32: bytes 0-7 → weights 0-7 and 16-23, bytes 8-15 → 8-15, 24-31
      const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * (in / 2);
      const __m256i low = _mm256_set1_epi32(0xf);
      for (; i + 32 * U <= in; i += 32 * U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const int64_t k = i + 32 * u;
          const float sf = sb[k >> p.shift];
          const __m256 s = _mm256_set1_ps(sf), minus8s = _mm256_set1_ps(-8.f * sf);
#pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {
            const __m256i n =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2 + 8 * half)));
            const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(n, low)), s, minus8s);
            const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(n, 4)), s, minus8s);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
              acc[r][u] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p.x + r * in + k + 8 * half), acc[r][u]);
              acc[r][u] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.x + r * in + k + 16 + 8 * half), acc[r][u]);
            }
          }
        }
      }
      for (; i + 32 <= in; i += 32) {
        const float sf = sb[i >> p.shift];
        const __m256 s = _mm256_set1_ps(sf), minus8s = _mm256_set1_ps(-8.f * sf);
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          const __m256i n =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i / 2 + 8 * half)));
          const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(n, low)), s, minus8s);
          const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(n, 4)), s, minus8s);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p.x + r * in + i + 8 * half), acc[r][0]);
            acc[r][0] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.x + r * in + i + 16 + 8 * half), acc[r][0]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256 total = acc[r][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[r][u]);
      float sum = hsum256(total);
      for (int64_t k = i; k < in; ++k) sum += weight_at(p, o, k) * p.x[r * in + k];
      p.y[r * p.out + o] = p.bias ? sum + p.bias[o] : sum;
    }
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// ---------------------------------------------------------------------------- AVX-512 BF16 path (int4 weights only)
// The fp32 int4 path is bound by turning nibbles into floats (≈ 9 vector ops per 32 weights). Here nibbles become bf16
// through a 16-entry table (vpermw: bf16(n − 8) is exact) and VDPBF16PS multiplies 32 pairs per instruction into fp32:
// ≈ 10 ops per 64 weights. The price: x is rounded to bf16 (relative 2⁻⁹, small against int4's step), and the twin
// rounds it the same way. A 32-byte load holds two 32-weight blocks; its low nibbles are weights 0-15 of both blocks,
// its high nibbles weights 16-31, so x is pre-permuted per 64 weights to [x0..15, x32..47, x16..31, x48..63].
#define KITELM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16,fma")))

template <int R>
KITELM_AVX512BF16 void rows_avx512bf16_int4(const Problem& p, int64_t begin, int64_t end) {
  const int64_t in = p.in;
  std::vector<float> scale_buffer(p.ngroups);
  float* sb = scale_buffer.data();
  alignas(64) uint16_t table[32] = {};
  for (int n = 0; n < 16; ++n) table[n] = float_to_bf16(static_cast<float>(n - 8));
  const __m512i lut = _mm512_load_si512(table);
  const __m512i low = _mm512_set1_epi16(0xf);
  for (int64_t o = begin; o < end; ++o) {
    row_scales(p, o, sb);
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * (in / 2);
    __m512 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 64) {
      const __m512i n = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 2)));
      const __m512i wlo = _mm512_permutexvar_epi16(_mm512_and_si512(n, low), lut);
      const __m512i whi = _mm512_permutexvar_epi16(_mm512_srli_epi16(n, 4), lut);
      const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(sb[k >> p.shift]), _mm256_set1_ps(sb[(k + 32) >> p.shift]), 1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const uint16_t* xr = p.xb + r * in + k;
        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wlo, (__m512bh)_mm512_loadu_si512(xr));
        dot = _mm512_dpbf16_ps(dot, (__m512bh)whi, (__m512bh)_mm512_loadu_si512(xr + 32));
        acc[r] = _mm512_fmadd_ps(dot, s, acc[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float sum = _mm512_reduce_add_ps(acc[r]);
      p.y[r * p.out + o] = p.bias ? sum + p.bias[o] : sum;
    }
  }
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif  // KITELM_X86

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

RowsFn pick(int isa, Fmt fmt, int64_t rows) {
#if KITELM_X86
  if (isa == kAvx512Bf16 && fmt == Fmt::int4) {
    switch (rows) {
      case 1: return rows_avx512bf16_int4<1>; case 2: return rows_avx512bf16_int4<2>;
      case 3: return rows_avx512bf16_int4<3>; case 4: return rows_avx512bf16_int4<4>;
      case 5: return rows_avx512bf16_int4<5>; case 6: return rows_avx512bf16_int4<6>;
      case 7: return rows_avx512bf16_int4<7>; case 8: return rows_avx512bf16_int4<8>;
    }
  }
  if (isa >= kAvx512) {
    switch (rows) {
      case 1: return rows_avx512<1>; case 2: return rows_avx512<2>; case 3: return rows_avx512<3>;
      case 4: return rows_avx512<4>; case 5: return rows_avx512<5>; case 6: return rows_avx512<6>;
      case 7: return rows_avx512<7>; case 8: return rows_avx512<8>;
    }
  }
  if (isa == kAvx2) {
    switch (rows) {
      case 1: return rows_avx2<1>; case 2: return rows_avx2<2>; case 3: return rows_avx2<3>;
      case 4: return rows_avx2<4>; case 5: return rows_avx2<5>; case 6: return rows_avx2<6>;
      case 7: return rows_avx2<7>; case 8: return rows_avx2<8>;
    }
  }
#endif
  return rows_scalar;
}

int checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512Bf16, "quant kernels: isa must be 0, 1, 2 or 3, got ", isa);
#if KITELM_X86
  TORCH_CHECK(isa != kAvx512Bf16 || cpu_has_avx512bf16(), "quant kernels: this CPU has no AVX512-BF16");
  TORCH_CHECK(isa != kAvx512 || cpu_has_avx512(), "quant kernels: this CPU has no AVX-512 F/BW/DQ");
  TORCH_CHECK(isa != kAvx2 || cpu_has_avx2(), "quant kernels: this CPU has no AVX2+FMA");
#else
  TORCH_CHECK(isa == kScalar, "quant kernels: only the portable path exists off x86-64");
#endif
  return static_cast<int>(isa);
}

// Shared checks and the parallel loop. `packed_in` is the stored row length (in / 2 for int4).
torch::Tensor run(Fmt fmt, const torch::Tensor& x_in, const torch::Tensor& w_in, const c10::optional<torch::Tensor>& scales_in,
                  const c10::optional<torch::Tensor>& bias_in, int64_t group, int64_t isa_in) {
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
  // vector chunks (16 or 8 weights) must not straddle two scales and scales are found by a shift: the group must be
  // a power of two ≥ the chunk, or the row must have one scale; other groups take the portable path
  const int64_t chunk = isa >= kAvx512 ? 16 : 8;
  const bool pow2 = (group & (group - 1)) == 0;
  const int shift = ngroups == 1 ? 62 : (pow2 ? __builtin_ctzll(static_cast<uint64_t>(group)) : 0);
  int effective = (fmt != Fmt::bf16 && ngroups > 1 && (!pow2 || group < chunk)) ? kScalar : isa;
  if (effective == kAvx512Bf16 && (fmt != Fmt::int4 || in % 64 != 0)) effective = kAvx512;  // bf16 dots: int4 only
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = out;
  auto y = torch::empty(out_shape, x.options());
  Problem p{fmt, rows, in, out, group, ngroups, shift, x.data_ptr<float>(), w.data_ptr(),
            scales.has_value() ? reinterpret_cast<const uint16_t*>(scales->data_ptr()) : nullptr,
            bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), nullptr};
  std::vector<uint16_t> xb;
  if (effective == kAvx512Bf16) {  // x → bf16 in the nibble order of each 64 weights: [0..16, 32..48, 16..32, 48..64)
    xb.resize(rows * in);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < in; k += 64)
        for (int j = 0; j < 16; ++j) {
          const float* xr = p.x + r * in + k;
          uint16_t* d = xb.data() + r * in + k;
          d[j] = float_to_bf16(xr[j]);
          d[16 + j] = float_to_bf16(xr[32 + j]);
          d[32 + j] = float_to_bf16(xr[16 + j]);
          d[48 + j] = float_to_bf16(xr[48 + j]);
        }
    p.xb = xb.data();
  }
  const RowsFn fn = pick(effective, fmt, rows);
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
  return run(Fmt::bf16, x, w, c10::nullopt, bias, 0, isa);
}
torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t group, int64_t isa) {
  return run(Fmt::int8, x, q, scales, bias, group, isa);
}
torch::Tensor gemv_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t group, int64_t isa) {
  return run(Fmt::int4, x, q, scales, bias, group, isa);
}

// Rows [begin, end) of Ŵ into wf (float32) or wb (bf16 bits); `row` is a scratch buffer of `in` floats. One source,
// compiled three times (portable, AVX2, AVX-512 target attributes) and auto-vectorized by the compiler.
#define KITELM_DEFINE_DEQUANT(NAME, ATTR)                                                                      \
  ATTR void NAME(const Problem& p, bool int4, float* wf, uint16_t* wb, float* row, int64_t begin, int64_t end) { \
    const int64_t in = p.in, ngroups = p.ngroups, group = p.group;                                              \
    for (int64_t o = begin; o < end; ++o) {                                                                      \
      if (int4) {                                                                                                \
        const uint8_t* src = static_cast<const uint8_t*>(p.w) + o * (in / 2);                                   \
        for (int64_t b = 0; b < in; b += 32) {                                                                   \
          const float s = bf16_to_float(p.scales[o * ngroups + b / group]);                                     \
          for (int j = 0; j < 16; ++j) {                                                                         \
            row[b + j] = static_cast<float>((src[b / 2 + j] & 0xf) - 8) * s;                                    \
            row[b + 16 + j] = static_cast<float>((src[b / 2 + j] >> 4) - 8) * s;                                \
          }                                                                                                      \
        }                                                                                                        \
      } else {                                                                                                   \
        const int8_t* src = static_cast<const int8_t*>(p.w) + o * in;                                           \
        for (int64_t g = 0; g < ngroups; ++g) {                                                                  \
          const float s = bf16_to_float(p.scales[o * ngroups + g]);                                             \
          for (int64_t j = g * group; j < (g + 1) * group; ++j) row[j] = static_cast<float>(src[j]) * s;        \
        }                                                                                                        \
      }                                                                                                          \
      if (wb) {                                                                                                  \
        for (int64_t j = 0; j < in; ++j) wb[o * in + j] = float_to_bf16(row[j]);                               \
      } else {                                                                                                   \
        for (int64_t j = 0; j < in; ++j) wf[o * in + j] = row[j];                                              \
      }                                                                                                          \
    }                                                                                                            \
  }

namespace {
using DequantFn = void (*)(const Problem&, bool, float*, uint16_t*, float*, int64_t, int64_t);
KITELM_DEFINE_DEQUANT(dequant_portable, )
#if KITELM_X86
KITELM_DEFINE_DEQUANT(dequant_avx2, KITELM_AVX2)
KITELM_DEFINE_DEQUANT(dequant_avx512, KITELM_AVX512)
#endif
}  // namespace

// Ŵ [out, in] in `dtype` (float32 or bfloat16, rounded to nearest even) from int8/int4 storage: the tiles that the
// GEMM path (more than 8 rows) multiplies with. Rows are split across threads; each element is computed exactly as
// the GEMV kernels do (fp32 q·s), so fp32 tiles equal the twin's dequantization bit for bit.
torch::Tensor dequantize(const torch::Tensor& q_in, const torch::Tensor& scales_in, int64_t in, int64_t group,
                         bool int4, c10::ScalarType dtype) {
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize: dtype must be float32 or bfloat16");
  const auto q = q_in.contiguous();
  const auto scales = scales_in.contiguous();
  const int64_t out = q.size(0), ngroups = in / group;
  TORCH_CHECK(in % group == 0 && scales.size(0) == out && scales.size(1) == ngroups &&
                  scales.scalar_type() == torch::kBFloat16 && q.size(1) == (int4 ? in / 2 : in) &&
                  q.scalar_type() == (int4 ? torch::kByte : torch::kChar),
              "dequantize: storage ", q.sizes(), " / scales ", scales.sizes(), " do not match in=", in, " group=", group);
  TORCH_CHECK(!int4 || group % 32 == 0, "dequantize: int4 groups must be multiples of 32");
  auto w = torch::empty({out, in}, q.options().dtype(dtype));
  Problem p{int4 ? Fmt::int4 : Fmt::int8, 0, in, out, group, ngroups, 0, nullptr, q.data_ptr(),
            reinterpret_cast<const uint16_t*>(scales.data_ptr()), nullptr, nullptr, nullptr};
  const bool bf16 = dtype == torch::kBFloat16;
  float* wf = bf16 ? nullptr : w.data_ptr<float>();
  uint16_t* wb = bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr()) : nullptr;
  DequantFn fn = dequant_portable;
#if KITELM_X86
  if (cpu_has_avx512()) fn = dequant_avx512;
  else if (cpu_has_avx2()) fn = dequant_avx2;
#endif
  at::parallel_for(0, out, std::max<int64_t>(1, 65536 / in), [&](int64_t begin, int64_t end) {
    std::vector<float> row(in);
    fn(p, int4, wf, wb, row.data(), begin, end);
  });
  return w;
}

int64_t best_isa() {
#if KITELM_X86
  if (cpu_has_avx512bf16()) return kAvx512Bf16;
  if (cpu_has_avx512()) return kAvx512;
  if (cpu_has_avx2()) return kAvx2;
#endif
  return kScalar;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = x Wᵀ + b, W bfloat16, 1-8 rows of fp32 x");
  m.def("gemv_int8", &gemv_int8, "y = x Ŵᵀ + b, Ŵ = int8 · bf16 group scale, 1-8 rows");
  m.def("gemv_int4", &gemv_int4, "y = x Ŵᵀ + b, Ŵ = (nibble − 8) · bf16 group scale, 1-8 rows");
  m.def("dequantize", &dequantize, "int8/int4 storage → float32/bfloat16 weight");
  m.def("best_isa", &best_isa, "0 portable, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512 + BF16: the fastest path this CPU runs");
}
