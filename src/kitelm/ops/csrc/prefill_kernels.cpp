// Prefill kernels (many tokens per call, fp32, CPU, no autograd): the Conv1D in one pass (`conv1d_forward`, bit for
// bit `Conv1D.forward`), and the RG-LRU's elementwise gate maths fused into its scan (`rglru_scan`). In pure torch (`RGLRU._gated` + `linear_scan`, the twin these are tested against in tests/test_prefill.py)
// a 512-token RG-2B layer makes ~12 full passes over [T, 2560] fp32 tensors (sigmoid, exp, sqrt, where, muls) and
// a thread barrier after each; here one pass per channel block reads x and the two gate pre-activations and writes
// h, with h kept in L1. Per element, as the twin:
//   i = σ(gx), r = σ(ga), log a = −c·softplus(a_param)·r, a = exp(log a), m = ρ ? 1 : sqrt(1 − exp(2 log a))
//   h ← (ρ ? 0 : a·h) + x·i·m   (kitelm::rglru_update in kernel_common.h)
// Two epilogues of the bf16 GEMM path, each one pass: `gelu_mul` (a GeGLU's gelu_tanh(a + b_a) · (b + b_b)
// in fp32 from bf16 or fp32 products, written as bf16 for the next GEMM or as fp32; torch's tanh GeLU alone costs
// ~5× a memory pass) and `add_bias_into` (a bf16 product → fp32 + bias, the cast and the bias add of every bf16
// linear in one pass). Their twins are `gelu_mul_reference` / `add_bias_reference` in kitelm/ops/prefill.py. And
// the logits' soft cap in place, `soft_cap_` (x ← cap·tanh(x / cap); torch's tanh takes ~1.1 ns an element on the
// AVX-512 Zen5, this pass ~0.15), twin `soft_cap_reference`.
// `isa` 0 = portable C++ (std::exp), 1 = AVX2 + FMA, 2 = AVX-512: one template each over the vector traits of
// kernel_common.h, with its exp_v (a Cephes-style exp: Cody-Waite reduction, degree-6 polynomial, p·2ⁿ; within
// ~2 ulp of expf). The file is compiled for baseline x86-64; each fast path has its own target.
#include <torch/extension.h>
#include "kernel_common.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kScalar = 0, kAvx2 = 1, kAvx512 = 2;

using kitelm::bf16_to_float;
using kitelm::float_to_bf16;

// gelu_tanh(v) = ½v(1 + tanh(k(v + 0.044715 v³))) = v · σ(2k(v + 0.044715 v³)),  k = √(2/π)
constexpr float kGeluK2 = 2.f * 0.7978845608028654f, kGeluCubic = 0.044715f;

inline float gelu_tanh(float v) { return v / (1.f + std::exp(-kGeluK2 * (v + kGeluCubic * v * v * v))); }

// One row of an epilogue: operands are fp32 or bf16 (`*_bf16`), biases fp32 or null, the output fp32 or bf16.
struct Epilogue {
  const void* a;
  const void* b;
  const float* a_bias;
  const float* b_bias;
  void* out;
  bool a_bf16, b_bf16, out_bf16;
  int64_t cols, a_stride, b_stride, out_stride;  // elements per row of each operand (strides of dim 0)
};

inline float load_scalar(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_scalar(void* p, bool bf16, int64_t i, float v) {
  if (bf16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else static_cast<float*>(p)[i] = v;
}

// Columns [c0, cols) of row r: out = gelu_tanh(a + a_bias) · (b + b_bias) (`gelu`), or out = a + a_bias.
inline void epilogue_portable(const Epilogue& e, bool gelu, int64_t r, int64_t c0) {
  const void* a = static_cast<const char*>(e.a) + r * e.a_stride * (e.a_bf16 ? 2 : 4);
  void* out = static_cast<char*>(e.out) + r * e.out_stride * (e.out_bf16 ? 2 : 4);
  for (int64_t c = c0; c < e.cols; ++c) {
    float v = load_scalar(a, e.a_bf16, c);
    if (e.a_bias) v += e.a_bias[c];  // no bias: nothing added (−0 stays −0, as in the twin)
    if (gelu) {
      const void* b = static_cast<const char*>(e.b) + r * e.b_stride * (e.b_bf16 ? 2 : 4);
      float w = load_scalar(b, e.b_bf16, c);
      if (e.b_bias) w += e.b_bias[c];
      v = gelu_tanh(v) * w;
    }
    store_scalar(out, e.out_bf16, c, v);
  }
}

struct Scan {
  const float* x;   // [B, T, L]
  const float* gx;  // [H, B·T, bw]: the block-diagonal gate outputs as the batched matmul leaves them
  const float* ga;
  const float* neg_c_softplus;  // [L]: −c·softplus(a_param)
  const bool* reset;            // [B, T]
  float* h;                     // [B, L]: h0 in, h_last out
  float* y;                     // [B, T, L]
  int64_t B, T, L, bw;
};

// Channels [l0, l1) of one time step in plain C++ (the portable path, and the vector paths' leftover channels).
inline void step_channels(const Scan& s, bool start, const float* x, const float* gx, const float* ga, float* h,
                          float* y, int64_t l0, int64_t l1) {
  for (int64_t l = l0; l < l1; ++l) y[l] = h[l] = kitelm::rglru_update(gx[l], ga[l], s.neg_c_softplus[l], x[l], h[l], start);
}

// Time step t of batch row b for the channels from l0 on (inside gate block l0 / bw): its reset and rows, each
// indexed by the channel l (the gate rows are offset so that gx[l] is channel l's pre-activation).
struct StepRows {
  bool start;
  const float *x, *gx, *ga;
  float* y;
};

inline StepRows step_rows(const Scan& s, int64_t b, int64_t t, int64_t l0) {
  const int64_t blk = l0 / s.bw, j0 = l0 - blk * s.bw, n = b * s.T + t;
  const int64_t gate = (blk * s.B * s.T + n) * s.bw + j0 - l0;
  return {s.reset[n], s.x + n * s.L, s.gx + gate, s.ga + gate, s.y + n * s.L};
}

// One task: batch row b, channels [l0, l1) inside gate block l0 / bw.
void scan_portable(const Scan& s, int64_t b, int64_t l0, int64_t l1) {
  float* h = s.h + b * s.L;
  for (int64_t t = 0; t < s.T; ++t) {
    const StepRows r = step_rows(s, b, t, l0);
    step_channels(s, r.start, r.x, r.gx, r.ga, h, r.y, l0, l1);
  }
}

#if KITELM_X86
using kitelm::F32x16;
using kitelm::F32x8;

template <class V>
KITELM_INLINE void scan_v(const Scan& s, int64_t b, int64_t l0, int64_t l1) {
  constexpr int L = V::kLanes;
  float* h = s.h + b * s.L;
  const int64_t lv = l0 + (l1 - l0) / L * L;
  for (int64_t t = 0; t < s.T; ++t) {
    const auto [start, x, gx, ga, y] = step_rows(s, b, t, l0);
    for (int64_t l = l0; l < lv; l += L) {
      const typename V::F v = kitelm::rglru_update_v<V>(V::load(gx + l), V::load(ga + l), V::load(s.neg_c_softplus + l),
                                                        V::load(x + l), V::load(h + l), start);
      V::store(h + l, v);
      V::store(y + l, v);
    }
    step_channels(s, start, x, gx, ga, h, y, lv, l1);  // channels left over in a block that is no multiple of L
  }
}

// bf16 ↔ fp32 for a vector of L values. The store rounds to nearest even in integer lanes, NaN kept quiet:
// float_to_bf16 L at a time.
template <class V> struct Bf16;
template <> struct Bf16<F32x8> {
  KITELM_AVX2_FMA static __m256 load(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  KITELM_AVX2_FMA static void store(uint16_t* p, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));  // both sides ≥ 0: the signed compare holds
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i bits = _mm256_blendv_epi8(rounded, quiet, nan);  // 16-bit values in 32-bit lanes
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);  // lanes 0-3 | 4-7
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};
template <> struct Bf16<F32x16> {
  KITELM_AVX512_FMA static __m512 load(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  KITELM_AVX512_FMA static void store(uint16_t* p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                   _mm512_set1_epi32(0x7f800000));
    bits = _mm512_mask_or_epi32(bits, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
  }
};

template <class V>
KITELM_INLINE typename V::F load_v(const void* p, bool bf16, int64_t i) {
  return bf16 ? Bf16<V>::load(static_cast<const uint16_t*>(p) + i) : V::load(static_cast<const float*>(p) + i);
}

template <class V>
KITELM_INLINE void store_v(void* p, bool bf16, int64_t i, typename V::F v) {
  if (bf16) Bf16<V>::store(static_cast<uint16_t*>(p) + i, v);
  else V::store(static_cast<float*>(p) + i, v);
}

template <class V>
KITELM_INLINE void epilogue_v(const Epilogue& e, bool gelu, int64_t r) {
  using Fv = typename V::F;
  constexpr int L = V::kLanes;
  const void* a = static_cast<const char*>(e.a) + r * e.a_stride * (e.a_bf16 ? 2 : 4);
  const void* b = gelu ? static_cast<const char*>(e.b) + r * e.b_stride * (e.b_bf16 ? 2 : 4) : nullptr;
  void* out = static_cast<char*>(e.out) + r * e.out_stride * (e.out_bf16 ? 2 : 4);
  const Fv k2 = V::set1(-kGeluK2), cubic = V::set1(kGeluCubic), one = V::set1(1.f);
  int64_t c = 0;
  for (; c + L <= e.cols; c += L) {
    Fv v = load_v<V>(a, e.a_bf16, c);
    if (e.a_bias) v = V::add(v, V::load(e.a_bias + c));
    if (gelu) {
      const Fv inner = V::fma(V::mul(cubic, v), V::mul(v, v), v);  // v + 0.044715 v³
      const Fv g = V::div(v, V::add(one, kitelm::exp_v<V>(V::mul(k2, inner))));
      Fv w = load_v<V>(b, e.b_bf16, c);
      if (e.b_bias) w = V::add(w, V::load(e.b_bias + c));
      v = V::mul(g, w);
    }
    store_v<V>(out, e.out_bf16, c, v);
  }
  if (c < e.cols) epilogue_portable(e, gelu, r, c);  // fewer than L columns left
}

// The target-specific bodies (flatten: the traits' functions are inlined into them).
#define KITELM_FLATTEN __attribute__((flatten))
KITELM_AVX2_FMA KITELM_FLATTEN void scan_avx2(const Scan& s, int64_t b, int64_t l0, int64_t l1) { scan_v<F32x8>(s, b, l0, l1); }
KITELM_AVX512_FMA KITELM_FLATTEN void scan_avx512(const Scan& s, int64_t b, int64_t l0, int64_t l1) { scan_v<F32x16>(s, b, l0, l1); }
KITELM_AVX2_FMA KITELM_FLATTEN void epilogue_avx2(const Epilogue& e, bool gelu, int64_t r) { epilogue_v<F32x8>(e, gelu, r); }
KITELM_AVX512_FMA KITELM_FLATTEN void epilogue_avx512(const Epilogue& e, bool gelu, int64_t r) { epilogue_v<F32x16>(e, gelu, r); }

// x[i] ← cap·tanh(x[i] / cap) over whole vectors from `begin`; returns where they end (soft_cap_ does the tail).
template <class V>
KITELM_INLINE int64_t soft_cap_v(float* x, float cap, int64_t begin, int64_t end) {
  const typename V::F c = V::set1(cap);
  int64_t i = begin;
  for (; i + V::kLanes <= end; i += V::kLanes) {
    V::store(x + i, V::mul(c, kitelm::tanh_v<V>(V::div(V::load(x + i), c))));
  }
  return i;
}
KITELM_AVX2_FMA KITELM_FLATTEN int64_t soft_cap_avx2(float* x, float cap, int64_t b, int64_t e) { return soft_cap_v<F32x8>(x, cap, b, e); }
KITELM_AVX512_FMA KITELM_FLATTEN int64_t soft_cap_avx512(float* x, float cap, int64_t b, int64_t e) { return soft_cap_v<F32x16>(x, cap, b, e); }

#endif

void check_fp32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.device().is_cpu(), "rglru_scan: ", what,
              " must be a float32 CPU tensor");
}

}  // namespace

int64_t best_isa() {
#if KITELM_X86
  if (kitelm::cpu_has_avx512()) return kAvx512;
  if (kitelm::cpu_has_avx2()) return kAvx2;
#endif
  return kScalar;
}

// x [B, T, L]; gx, ga [H, B·T, bw] (block-diagonal gate outputs incl. bias, before the sigmoid); softplus_a [L] =
// softplus(a_param) (torch's, as the twin); h0 [B, L] float32; reset [B, T] bool → (y [B, T, L], h_last [B, L]).
std::vector<torch::Tensor> rglru_scan(const torch::Tensor& x_in, const torch::Tensor& gx_in, const torch::Tensor& ga_in,
                                      const torch::Tensor& softplus_in, const torch::Tensor& h0_in,
                                      const torch::Tensor& reset_in, double c, int64_t isa) {
  for (const auto* t : {&x_in, &gx_in, &ga_in, &softplus_in, &h0_in}) check_fp32(*t, "every input");
  TORCH_CHECK(x_in.dim() == 3 && gx_in.dim() == 3, "rglru_scan: x must be [B, T, L] and the gates [H, B·T, bw]");
  const int64_t B = x_in.size(0), T = x_in.size(1), L = x_in.size(2), H = gx_in.size(0), bw = gx_in.size(2);
  TORCH_CHECK(H * bw == L && gx_in.size(1) == B * T && ga_in.sizes() == gx_in.sizes() && softplus_in.numel() == L &&
                  h0_in.numel() == B * L && reset_in.numel() == B * T,
              "rglru_scan: x ", x_in.sizes(), ", gates ", gx_in.sizes(), ", softplus_a ", softplus_in.sizes(), ", h0 ",
              h0_in.sizes(), " and reset ", reset_in.sizes(), " do not match");
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "rglru_scan: isa ", isa, " is not available");
  const auto x = x_in.contiguous(), gx = gx_in.contiguous(), ga = ga_in.contiguous();
  const auto reset = reset_in.to(torch::kBool).contiguous();
  const auto softplus = softplus_in.contiguous();
  auto neg = torch::empty({L}, softplus.options());
  const float* sp = softplus.data_ptr<float>();
  float* np = neg.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) np[l] = static_cast<float>(-c) * sp[l];
  auto h = h0_in.reshape({B, L}).to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  auto y = torch::empty({B, T, L}, x.options());
  Scan s{x.data_ptr<float>(), gx.data_ptr<float>(), ga.data_ptr<float>(), np, reset.data_ptr<bool>(),
         h.data_ptr<float>(), y.data_ptr<float>(), B, T, L, bw};
  using Fn = void (*)(const Scan&, int64_t, int64_t, int64_t);
  Fn fn = scan_portable;
#if KITELM_X86
  if (isa == kAvx512) fn = scan_avx512;
  if (isa == kAvx2) fn = scan_avx2;
#endif
  // Tasks: (batch row, gate block); a block's channels are one contiguous run of every gate row.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, blk = task % H;
      fn(s, b, blk * bw, (blk + 1) * bw);
    }
  });
  return {y, h};
}

// Conv1D over T tokens (GDM's causal depthwise conv with document resets), one pass instead of ~9 torch ops:
// x [B, T, L] float32, w [K, L], b [L], state [B, K−1, L] (the inputs before x; any float dtype), segment_pos [B, T]
// → (y [B, T, L], new state [B, K−1, L] float32). The same float32 operations in the same order as `Conv1D.forward`
// (taps summed from the newest input back, each (x·w)·mask with mask ∈ {0, 1}, then + b; no FMA): bit for bit equal.
// Tap s of token t is cut (mask 0) iff a document starts in (t − s, t].
std::vector<torch::Tensor> conv1d_forward(const torch::Tensor& x_in, const torch::Tensor& w_in, const torch::Tensor& b_in,
                                          const torch::Tensor& state_in, const torch::Tensor& segment_pos_in) {
  for (const auto* t : {&x_in, &w_in, &b_in}) check_fp32(*t, "x, w and b");
  TORCH_CHECK(x_in.dim() == 3 && w_in.dim() == 2, "conv1d_forward: x must be [B, T, L] and w [K, L]");
  const int64_t B = x_in.size(0), T = x_in.size(1), L = x_in.size(2), K = w_in.size(0);
  TORCH_CHECK(w_in.size(1) == L && b_in.numel() == L && state_in.dim() == 3 && state_in.size(0) == B &&
                  state_in.size(1) == K - 1 && state_in.size(2) == L && segment_pos_in.numel() == B * T && K >= 2,
              "conv1d_forward: x ", x_in.sizes(), ", w ", w_in.sizes(), ", state ", state_in.sizes(), " and positions ",
              segment_pos_in.sizes(), " do not match");
  const auto x = x_in.contiguous(), w = w_in.contiguous(), bias = b_in.contiguous();
  const auto state = state_in.to(torch::kFloat).contiguous();
  const auto pos = segment_pos_in.to(torch::kLong).contiguous();
  auto y = torch::empty({B, T, L}, x.options());
  auto new_state = torch::empty({B, K - 1, L}, x.options());
  // last[b, t]: the latest t' <= t with segment_pos == 0, or a value below any t − s when there is none
  std::vector<int64_t> last(B * T);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t l = -(K + 1);
    for (int64_t t = 0; t < T; ++t) {
      if (pp[b * T + t] == 0) l = t;
      last[b * T + t] = l;
    }
  }
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float* sp = state.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *np = new_state.data_ptr<float>();
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, l0 = (task % chunks) * kChunk, l1 = std::min(L, l0 + kChunk);
      auto input = [&](int64_t tau) {  // the inputs of time tau (< 0: the state's slots)
        return tau >= 0 ? xp + (b * T + tau) * L : sp + (b * (K - 1) + (K - 1) + tau) * L;
      };
      for (int64_t t = 0; t < T; ++t) {
        float* out = yp + (b * T + t) * L;
        const float* x0 = input(t);
        const float* w0 = wp + (K - 1) * L;
        for (int64_t l = l0; l < l1; ++l) out[l] = x0[l] * w0[l];
        for (int64_t s = 1; s < K; ++s) {
          const float mask = last[b * T + t] <= t - s ? 1.f : 0.f;
          const float* xs = input(t - s);
          const float* ws = wp + (K - 1 - s) * L;
          for (int64_t l = l0; l < l1; ++l) out[l] = out[l] + (xs[l] * ws[l]) * mask;
        }
        for (int64_t l = l0; l < l1; ++l) out[l] = out[l] + bp[l];
      }
      for (int64_t k = 0; k < K - 1; ++k) {  // the last K−1 inputs, cut where a document starts after them
        const int64_t tau = T - (K - 1) + k;
        const float mask = last[b * T + T - 1] <= tau ? 1.f : 0.f;
        const float* xs = input(tau);
        float* ns = np + (b * (K - 1) + k) * L;
        for (int64_t l = l0; l < l1; ++l) ns[l] = xs[l] * mask;
      }
    }
  });
  return {y, new_state};
}

namespace {

bool is_epilogue_dtype(const torch::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16);
}

// The checks and the parallel loop of both epilogues; `b` is null for add_bias_into. Operands are 2-D [N, C] with
// unit column stride (a row stride is allowed: the output of add_bias_into may be a column slice of a wider y).
void run_epilogue(const torch::Tensor& a, const c10::optional<torch::Tensor>& a_bias, const torch::Tensor* b,
                  const c10::optional<torch::Tensor>& b_bias, torch::Tensor& out, int64_t isa, const char* name) {
  const torch::Tensor* operands[] = {&a, b, &out};
  for (const torch::Tensor* t : operands) {
    if (t == nullptr) continue;
    TORCH_CHECK(is_epilogue_dtype(*t) && t->dim() == 2 && t->stride(1) == 1 && t->sizes() == a.sizes(), name,
                ": operands must be float32/bfloat16 CPU [N, C] tensors of one shape with unit column stride, got ",
                t->sizes(), " (", t->scalar_type(), ") for ", a.sizes());
  }
  const int64_t cols = a.size(1);
  const float* biases[2] = {nullptr, nullptr};
  const c10::optional<torch::Tensor>* bias_in[2] = {&a_bias, &b_bias};
  torch::Tensor kept[2];
  for (int i = 0; i < 2; ++i) {
    if (!bias_in[i]->has_value()) continue;
    kept[i] = (*bias_in[i])->contiguous();
    TORCH_CHECK(kept[i].scalar_type() == torch::kFloat && kept[i].numel() == cols, name, ": a bias must be float32 [",
                cols, "]");
    biases[i] = kept[i].data_ptr<float>();
  }
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), name, ": isa ", isa, " is not available");
  Epilogue e{a.data_ptr(), b ? b->data_ptr() : nullptr, biases[0], biases[1], out.data_ptr(),
             a.scalar_type() == torch::kBFloat16, b && b->scalar_type() == torch::kBFloat16,
             out.scalar_type() == torch::kBFloat16, cols, a.stride(0), b ? b->stride(0) : 0, out.stride(0)};
  const bool gelu = b != nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));  // small calls stay on one thread
  at::parallel_for(0, a.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#if KITELM_X86
      if (isa == kAvx512) {
        epilogue_avx512(e, gelu, r);
        continue;
      }
      if (isa == kAvx2) {
        epilogue_avx2(e, gelu, r);
        continue;
      }
#endif
      epilogue_portable(e, gelu, r, 0);
    }
  });
}

}  // namespace

// a, b [N, C] float32/bfloat16; a_bias, b_bias [C] float32 or None → gelu_tanh(a + a_bias) · (b + b_bias) [N, C],
// computed in float32, returned as bfloat16 (`bf16_out`, rounded to nearest even) or float32.
torch::Tensor gelu_mul(const torch::Tensor& a, const c10::optional<torch::Tensor>& a_bias, const torch::Tensor& b,
                       const c10::optional<torch::Tensor>& b_bias, bool bf16_out, int64_t isa) {
  auto out = torch::empty(a.sizes(), a.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat));
  run_epilogue(a, a_bias, &b, b_bias, out, isa, "gelu_mul");
  return out;
}

// out [N, C] (float32/bfloat16, may be a column slice) = src [N, C] + bias, computed in float32.
void add_bias_into(const torch::Tensor& src, const c10::optional<torch::Tensor>& bias, torch::Tensor& out,
                   int64_t isa) {
  run_epilogue(src, bias, nullptr, c10::nullopt, out, isa, "add_bias_into");
}

// x (float32, contiguous, CPU, any shape) ← cap·tanh(x / cap), in place; returns x.
torch::Tensor soft_cap_(torch::Tensor& x, double cap, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu() && x.is_contiguous(),
              "soft_cap_: x must be a contiguous float32 CPU tensor, got ", x.scalar_type());
  TORCH_CHECK(cap > 0, "soft_cap_: cap must be > 0, got ", cap);
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "soft_cap_: isa ", isa, " is not available");
  float* p = x.data_ptr<float>();
  const float c = static_cast<float>(cap);
  at::parallel_for(0, x.numel(), 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if KITELM_X86
    if (isa == kAvx512) i = soft_cap_avx512(p, c, begin, end);
    else if (isa == kAvx2) i = soft_cap_avx2(p, c, begin, end);
#endif
    for (; i < end; ++i) p[i] = c * std::tanh(p[i] / c);
  });
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("soft_cap_", &soft_cap_, "x <- cap * tanh(x / cap) in place (float32)");
  m.def("gelu_mul", &gelu_mul, "gelu_tanh(a + a_bias) · (b + b_bias) in float32, out bf16 or fp32");
  m.def("add_bias_into", &add_bias_into, "out = src + bias in float32 (e.g. a bf16 product into float32 y)");
  m.def("conv1d_forward", &conv1d_forward, "Conv1D over T tokens with document resets, state continued");
  m.def("rglru_scan", &rglru_scan, "the RG-LRU's gates and scan over T tokens in one pass");
  m.def("best_isa", &best_isa, "0 portable, 1 AVX2+FMA, 2 AVX-512 F/BW/DQ: the fastest path this CPU runs");
}
