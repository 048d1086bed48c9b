// Dequantization of int8 / int4 weight tiles for the GEMM path of quantized linear layers (more than 8 rows of x:
// prefill, batched decoding, evaluation): Ŵ rows [r, in] → float32 or bfloat16, written into a tile buffer that the
// caller then multiplies with x (kitelm/ops/quant.py `_tiled_linear`). The pure-torch twin is `dequantize_reference`
// (+ `.to(torch.bfloat16)`); tests/test_quant.py checks every ISA path bit for bit against it.
//
// Layouts as in quant_kernels.cpp / kitelm/ops/quant.py:
//   int8  q [rows, in] int8;  scales [rows, in / group] bf16;  ŵ = q · s
//   int4  q [rows, in / 2] uint8, per block of 32 weights byte j = weight j (low nibble) | weight j + 16 (high),
//         nibble n = q + 8;  group % 32 == 0;  ŵ = (n − 8) · s
// Each weight is computed as the fp32 product q·s (exact: |q| ≤ 127 and s has 8 significant bits) and, for bf16
// tiles, rounded to nearest even (NaN kept quiet), exactly as c10::BFloat16 rounds it. The vector paths are written
// with intrinsics (the auto-vectorized loop they replace ran at ~0.5 G weights/s: the bf16 rounding did not
// vectorize), one template over 8-lane (AVX2) and 16-lane (AVX-512) traits; `isa` 0 = portable C++, 1 = AVX2,
// 2 = AVX-512 F/BW. The file is compiled for baseline x86-64 and each fast path carries its own target attribute.
#include <torch/extension.h>
#include "kernel_common.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kScalar = 0, kAvx2 = 1, kAvx512 = 2;

using kitelm::bf16_to_float;
using kitelm::float_to_bf16;

struct Tile {
  const void* q;           // storage rows
  const uint16_t* scales;  // [rows, ngroups] bf16 bits
  int64_t in, group, ngroups;
  bool int4;
  float* wf;     // float32 output [rows, in], or
  uint16_t* wb;  // bf16 output [rows, in]
};

// ------------------------------------------------------------------------------------------------ portable
void rows_portable(const Tile& t, int64_t begin, int64_t end) {
  const int64_t in = t.in;
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* sc = t.scales + o * t.ngroups;
    for (int64_t j = 0; j < in; ++j) {
      float w;
      if (t.int4) {
        const uint8_t byte = static_cast<const uint8_t*>(t.q)[o * (in / 2) + (j / 32) * 16 + (j % 16)];
        const int n = (j % 32) < 16 ? (byte & 0xf) : (byte >> 4);
        w = static_cast<float>(n - 8) * bf16_to_float(sc[j / t.group]);
      } else {
        w = static_cast<float>(static_cast<const int8_t*>(t.q)[o * in + j]) * bf16_to_float(sc[j / t.group]);
      }
      if (t.wb) t.wb[o * in + j] = float_to_bf16(w);
      else t.wf[o * in + j] = w;
    }
  }
}

#if KITELM_X86
#define KITELM_AVX2 __attribute__((target("avx2,fma")))
#define KITELM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// 16 int32 lanes from 16 bytes, fp32 ops, and the bf16 rounding of 16 floats, as two 8-lane halves (AVX2) or one
// 16-lane vector (AVX-512).
struct Avx2 {
  struct F16 { __m256 lo, hi; };
  KITELM_AVX2 static F16 from_i8(const int8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
  }
  KITELM_AVX2 static F16 from_u8_minus8(__m128i b) {  // bytes 0..15 holding values 0..15 → (b − 8) as float
    const __m256 eight = _mm256_set1_ps(8.f);
    return {_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), eight),
            _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), eight)};
  }
  KITELM_AVX2 static F16 scale(F16 v, float s) {
    const __m256 sv = _mm256_set1_ps(s);
    return {_mm256_mul_ps(v.lo, sv), _mm256_mul_ps(v.hi, sv)};
  }
  KITELM_AVX2 static void store_f32(float* p, F16 v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  KITELM_AVX2 static __m256i round8(__m256 f) {  // 8 floats → 8 bf16 bit patterns in the low halves of int32 lanes
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));  // |u| as int32 ≥ 0: signed compare ok
    return _mm256_blendv_epi8(rounded, quiet, nan);
  }
  KITELM_AVX2 static void store_bf16(uint16_t* p, F16 v) {
    const __m256i packed = _mm256_packus_epi32(round8(v.lo), round8(v.hi));  // lanes interleaved per 128 bits
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
  }
};

struct Avx512 {
  using F16 = __m512;
  KITELM_AVX512 static F16 from_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  KITELM_AVX512 static F16 from_u8_minus8(__m128i b) {
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(8.f));
  }
  KITELM_AVX512 static F16 scale(F16 v, float s) { return _mm512_mul_ps(v, _mm512_set1_ps(s)); }
  KITELM_AVX512 static void store_f32(float* p, F16 v) { _mm512_storeu_ps(p, v); }
  KITELM_AVX512 static void store_bf16(uint16_t* p, F16 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

template <class V, bool kBf16>
KITELM_INLINE void put(const Tile& t, int64_t idx, typename V::F16 v) {
  if constexpr (kBf16) V::store_bf16(t.wb + idx, v);
  else V::store_f32(t.wf + idx, v);
}

// Rows [begin, end): 16 weights per step. int8 needs group % 16 == 0 (else the portable path runs), int4 groups are
// multiples of 32 by construction.
template <class V, bool kBf16>
KITELM_INLINE void rows_vec(const Tile& t, int64_t begin, int64_t end) {
  const int64_t in = t.in;
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* sc = t.scales + o * t.ngroups;
    if (t.int4) {
      const uint8_t* src = static_cast<const uint8_t*>(t.q) + o * (in / 2);
      for (int64_t b = 0; b < in; b += 32) {
        const float s = bf16_to_float(sc[b / t.group]);
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b / 2));
        const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
        put<V, kBf16>(t, o * in + b, V::scale(V::from_u8_minus8(lo), s));
        put<V, kBf16>(t, o * in + b + 16, V::scale(V::from_u8_minus8(hi), s));
      }
    } else {
      const int8_t* src = static_cast<const int8_t*>(t.q) + o * in;
      for (int64_t g = 0; g < t.ngroups; ++g) {
        const float s = bf16_to_float(sc[g]);
        for (int64_t j = g * t.group; j < (g + 1) * t.group; j += 16)
          put<V, kBf16>(t, o * in + j, V::scale(V::from_i8(src + j), s));
      }
    }
  }
}

KITELM_AVX2 void rows_avx2(const Tile& t, int64_t begin, int64_t end) {
  if (t.wb) rows_vec<Avx2, true>(t, begin, end);
  else rows_vec<Avx2, false>(t, begin, end);
}
KITELM_AVX512 void rows_avx512(const Tile& t, int64_t begin, int64_t end) {
  if (t.wb) rows_vec<Avx512, true>(t, begin, end);
  else rows_vec<Avx512, false>(t, begin, end);
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif  // KITELM_X86

}  // namespace

int64_t best_isa() {
#if KITELM_X86
  if (cpu_has_avx512()) return kAvx512;
  if (cpu_has_avx2()) return kAvx2;
#endif
  return kScalar;
}

// Rows of Ŵ from int8/int4 storage `q` [rows, in or in/2] and `scales` [rows, in/group] (bf16) into `out` [rows, in]
// (float32 or bfloat16, contiguous: the caller's tile buffer, reused across tiles). Rows are split across threads.
void dequantize_into(const torch::Tensor& q_in, const torch::Tensor& scales_in, int64_t group, bool int4,
                     torch::Tensor& out, int64_t isa) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 &&
                  (out.scalar_type() == torch::kFloat || out.scalar_type() == torch::kBFloat16),
              "dequantize_into: out must be a contiguous float32/bfloat16 [rows, in] tensor");
  const auto q = q_in.contiguous();
  const auto scales = scales_in.contiguous();
  const int64_t rows = out.size(0), in = out.size(1);
  TORCH_CHECK(group > 0 && in % group == 0 && (!int4 || group % 32 == 0) && q.size(0) == rows &&
                  q.size(1) == (int4 ? in / 2 : in) && q.scalar_type() == (int4 ? torch::kByte : torch::kChar) &&
                  scales.scalar_type() == torch::kBFloat16 && scales.size(0) == rows && scales.size(1) == in / group,
              "dequantize_into: storage ", q.sizes(), " / scales ", scales.sizes(), " / out ", out.sizes(),
              " do not match group=", group, int4 ? " (int4)" : " (int8)");
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "dequantize_into: isa ", isa, " is not available on this CPU");
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  Tile t{q.data_ptr(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), in, group, in / group, int4,
         bf16 ? nullptr : out.data_ptr<float>(), bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr};
  using Fn = void (*)(const Tile&, int64_t, int64_t);
  Fn fn = rows_portable;
#if KITELM_X86
  const bool vec_ok = int4 || group % 16 == 0;
  if (vec_ok && isa == kAvx512) fn = rows_avx512;
  else if (vec_ok && isa == kAvx2) fn = rows_avx2;
#endif
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / in), [&](int64_t begin, int64_t end) { fn(t, begin, end); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_into", &dequantize_into, "int8/int4 storage rows → float32/bfloat16 tile (in place)");
  m.def("best_isa", &best_isa, "0 portable, 1 AVX2+FMA, 2 AVX-512 F/BW/DQ/VL: the fastest path this CPU runs");
}
