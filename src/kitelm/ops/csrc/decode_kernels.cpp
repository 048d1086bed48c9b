// Kernels for decoding (a few rows per call, fp32, no autograd), called from ops/decode.py and the layers; their
// pure-torch twins are F.linear, RMSNorm.forward_ref (layers/norms.py), Conv1D.step_ref (layers/conv1d.py),
// RGLRU.step_ref (layers/rglru.py), RotaryEmbedding.rotate (layers/rope.py) and the ring's torch products
// (layers/local_attention.py, `_ring_softmax`).
//
// At batch 1 every op touches one row, so a decoding step costs (a) reading every weight once and (b) dispatching
// hundreds of tiny ops. small_linear attacks (a): MKL's small-M GEMM streams weights well below DRAM speed; this
// loop splits output rows across torch's threads and streams each weight row once for all rows of x.
// rms_norm, conv1d_step, rglru_step, rope_rotate and attend_ring attack (b): each replaces 7 to ~30 small ops by one
// pass. Measurements: benchmarks/NOTES.md.
#include <torch/extension.h>
#include "kernel_common.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_fp32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.device().is_cpu(), "kitelm decode kernels: ", what,
              " must be a float32 CPU tensor");
}

// The vector path of rglru_step and attend_ring: 0 = plain C++ loops, 1 = AVX2 + FMA, 2 = AVX-512 (the fastest
// this CPU runs unless the caller forces a lower one, as tests do to check every path on one machine).
constexpr int kPlain = 0, kAvx2 = 1, kAvx512 = 2;

int best_isa() {
#if KITELM_X86
  if (kitelm::cpu_has_avx512()) return kAvx512;
  if (kitelm::cpu_has_avx2()) return kAvx2;
#endif
  return kPlain;
}

int checked_isa(int64_t isa, const char* name) {
  TORCH_CHECK(isa >= kPlain && isa <= best_isa(), name, ": isa ", isa, " is not available on this CPU (best ",
              best_isa(), ")");
  return static_cast<int>(isa);
}

#if KITELM_X86
using kitelm::F32x16;
using kitelm::F32x8;

// `rglru_update_v` over the first bw / L · L channels of one row of a gate block; returns how many it did.
template <class V>
KITELM_INLINE int64_t update_v(const float* gx, const float* ga, const float* neg, const float* x, const float* h,
                               float* out, int64_t bw, bool start) {
  constexpr int L = V::kLanes;
  int64_t j = 0;
  for (; j + L <= bw; j += L)
    V::store(out + j, kitelm::rglru_update_v<V>(V::load(gx + j), V::load(ga + j), V::load(neg + j), V::load(x + j),
                                                V::load(h + j), start));
  return j;
}

// attend_ring's two loops in vectors (hd % 64 == 0). Scores: NG query heads against one key, two accumulators each
// (2·NG independent FMA chains: with one chain per dot, the compiled loop waited on the FMA latency).
template <class V, int NG>
KITELM_INLINE void dots_v(const float* q, int64_t hd, const float* key, float* out, int64_t stride) {
  constexpr int L = V::kLanes;
  typename V::F acc[NG][2];
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = V::zero();
  for (int64_t d = 0; d < hd; d += 2 * L) {
    const typename V::F k0 = V::load(key + d), k1 = V::load(key + d + L);
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      acc[g][0] = V::fma(V::load(q + g * hd + d), k0, acc[g][0]);
      acc[g][1] = V::fma(V::load(q + g * hd + d + L), k1, acc[g][1]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g) out[g * stride] = V::hsum(V::add(acc[g][0], acc[g][1]));
}

// Weighted sums over 4·L columns (y, values offset to them): y[g, :4L] += Σ_j p[g, j] · V_j[:4L] for NG query heads,
// in 4·NG accumulators.
template <class V, int NG>
KITELM_INLINE void sums_v(const float* p, int64_t p_stride, const float* values, int64_t rows, int64_t hd, float* y) {
  constexpr int L = V::kLanes;
  typename V::F acc[NG][4];
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[g][c] = V::load(y + g * hd + L * c);
  for (int64_t j = 0; j < rows; ++j) {
    const float* vj = values + j * hd;
    typename V::F v[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) v[c] = V::load(vj + L * c);
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g) {
      const typename V::F pj = V::set1(p[g * p_stride + j]);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[g][c] = V::fma(pj, v[c], acc[g][c]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) V::store(y + g * hd + L * c, acc[g][c]);
}

// Per ISA: the heads one dots_v / sums_v call takes (NG·2 and NG·4 + 5 of AVX2's 16 and AVX-512's 32 registers).
template <class V> struct AttendGroups;
template <> struct AttendGroups<F32x8> { static constexpr int dots = 4, sums = 2; };
template <> struct AttendGroups<F32x16> { static constexpr int dots = 4, sums = 5; };

// Query heads [0, G) of one K/V head: scores against one key (column `out` of the [G, S] scores) ...
template <class V>
KITELM_INLINE void score_heads(const float* q, int64_t G, int64_t hd, const float* key, float* out, int64_t S) {
  constexpr int N = AttendGroups<V>::dots;
  int64_t g = 0;
  for (; g + N <= G; g += N) dots_v<V, N>(q + g * hd, hd, key, out + g * S, S);
  for (; g < G; ++g) dots_v<V, 1>(q + g * hd, hd, key, out + g * S, S);
}

// ... and the sums over one block of 64 columns.
template <class V>
KITELM_INLINE void sum_heads(const float* p, int64_t S, const float* values, int64_t used, int64_t G, int64_t hd,
                             float* y) {
  constexpr int N = AttendGroups<V>::sums, C = 4 * V::kLanes;
  for (int64_t d = 0; d < 64; d += C) {
    int64_t g = 0;
    for (; g + N <= G; g += N) sums_v<V, N>(p + g * S, S, values + d, used, hd, y + g * hd + d);
    for (; g < G; ++g) sums_v<V, 1>(p + g * S, S, values + d, used, hd, y + g * hd + d);
  }
}

// The target-specific bodies (flatten: the traits' functions are inlined into them).
#define KITELM_FLATTEN __attribute__((flatten))
KITELM_AVX2_FMA KITELM_FLATTEN int64_t update_avx2(const float* gx, const float* ga, const float* neg, const float* x,
                                                   const float* h, float* out, int64_t bw, bool start) {
  return update_v<F32x8>(gx, ga, neg, x, h, out, bw, start);
}
KITELM_AVX512_FMA KITELM_FLATTEN int64_t update_avx512(const float* gx, const float* ga, const float* neg,
                                                       const float* x, const float* h, float* out, int64_t bw,
                                                       bool start) {
  return update_v<F32x16>(gx, ga, neg, x, h, out, bw, start);
}
KITELM_AVX2_FMA KITELM_FLATTEN void score_avx2(const float* q, int64_t G, int64_t hd, const float* key, float* out,
                                               int64_t S) {
  score_heads<F32x8>(q, G, hd, key, out, S);
}
KITELM_AVX512_FMA KITELM_FLATTEN void score_avx512(const float* q, int64_t G, int64_t hd, const float* key, float* out,
                                                   int64_t S) {
  score_heads<F32x16>(q, G, hd, key, out, S);
}
KITELM_AVX2_FMA KITELM_FLATTEN void sum_avx2(const float* p, int64_t S, const float* values, int64_t used, int64_t G,
                                             int64_t hd, float* y) {
  sum_heads<F32x8>(p, S, values, used, G, hd, y);
}
KITELM_AVX512_FMA KITELM_FLATTEN void sum_avx512(const float* p, int64_t S, const float* values, int64_t used,
                                                 int64_t G, int64_t hd, float* y) {
  sum_heads<F32x16>(p, S, values, used, G, hd, y);
}

#endif

}  // namespace

// y = x Wᵀ + b:  x [..., in], weight [out, in], bias [out] or None → y [..., out]
torch::Tensor small_linear(const torch::Tensor& x_in, const torch::Tensor& weight_in,
                           const c10::optional<torch::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 2 && x_in.size(-1) == weight_in.size(1), "small_linear: shapes ",
              x_in.sizes(), " and ", weight_in.sizes(), " do not match");
  check_fp32(x_in, "x");
  check_fp32(weight_in, "weight");
  const auto x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? c10::optional<torch::Tensor>(bias_in->contiguous()) : c10::nullopt;
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  auto out_shape = x_in.sizes().vec();
  out_shape.back() = out;
  auto y = torch::empty(out_shape, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // about 64 KiB of weights per task: small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* w = wp + o * in;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + r * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += w[i] * xr[i];
        yp[r * out + o] = bp ? acc + bp[o] : acc;
      }
    }
  });
  return y;
}

// y = x / sqrt(mean(x²) + eps) · (offset + g):  x [..., D], g [D] → y [..., D]   (offset 1 = Gemma's 1 + scale)
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& gain_in, double eps, double offset) {
  check_fp32(x_in, "x");
  check_fp32(gain_in, "gain");
  const int64_t d = x_in.size(-1);
  TORCH_CHECK(gain_in.numel() == d, "rms_norm: gain has ", gain_in.numel(), " entries for rows of ", d);
  const auto x = x_in.contiguous();
  const auto gain = gain_in.contiguous();
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = gain.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float off = static_cast<float>(offset);
  // rows split across threads for prefill-sized inputs (≥ 64 Ki values per task); a decoding step's rows stay here
  at::parallel_for(0, x.numel() / d, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * (off + gp[i]);
    }
  });
  return y;
}

// One step of the width-K causal Conv1D (kitelm/layers/conv1d.py) per row b, with ρ = reset[b] (a document start
// cuts every earlier tap and clears them from the state):
//   y = b + w[K−1]·x + (ρ ? 0 : Σ_j w[j]·state[j]);   state ← [ρ ? 0 : state[1:], x]   (updated in place)
// x [B, L]; w [K, L]; bias [L]; state [B, K−1, L].
torch::Tensor conv1d_step(const torch::Tensor& x_in, const torch::Tensor& w_in, const torch::Tensor& bias_in,
                          torch::Tensor& state, const torch::Tensor& reset_in) {
  for (const auto* t : {&x_in, &w_in, &bias_in}) check_fp32(*t, "every Conv1D input");
  check_fp32(state, "the Conv1D state");
  TORCH_CHECK(state.is_contiguous(), "conv1d_step: the state must be contiguous");
  const int64_t K = w_in.size(0), L = w_in.size(1), B = state.size(0);
  TORCH_CHECK(x_in.numel() == B * L && state.size(1) == K - 1 && state.size(2) == L && reset_in.numel() == B,
              "conv1d_step: x ", x_in.sizes(), ", w ", w_in.sizes(), " and state ", state.sizes(), " do not match");
  const auto x = x_in.contiguous(), w = w_in.contiguous(), bias = bias_in.contiguous();
  const auto reset = reset_in.to(torch::kBool).contiguous();
  auto y = torch::empty(x_in.sizes(), x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const bool* rp = reset.data_ptr<bool>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* s = sp + b * (K - 1) * L;
    const float* xr = xp + b * L;
    float* yr = yp + b * L;
    const float keep = rp[b] ? 0.f : 1.f;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) yr[l] = bp[l] + wp[(K - 1) * L + l] * xr[l];
    for (int64_t j = 0; j < K - 1; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) yr[l] += keep * wp[j * L + l] * s[j * L + l];
    }
    for (int64_t j = 0; j + 1 < K - 1; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) s[j * L + l] = keep * s[(j + 1) * L + l];
    }
    if (K > 1) std::copy(xr, xr + L, s + (K - 2) * L);
  }
  return y;
}

// One RG-LRU step (Griffin eq. 4-6, kitelm/layers/rglru.py) per row b and channel l = (head n, column j), ρ = reset[b]:
//   gx = b_x + Σ_i x[n, i]·w_x[n, i, j],  ga = b_a + Σ_i x[n, i]·w_a[n, i, j]      (the block-diagonal gate layers)
//   then `kitelm::rglru_update` (kernel_common.h) with neg = −c·softplus_a:  returns the new h [B, L]
// x [B, L]; w_x, w_a [H, bw, bw] ([in, out] per block); b_x, b_a [H, bw]; softplus_a [L] = softplus(a_param) (torch's,
// as the twin); h [B, L]; reset [B] bool; isa as best_isa. The update runs a vector of channels at a time on the
// AVX2 and AVX-512 paths (`rglru_update_v`, exp_v for exp): per channel it is 5 exps and a sqrt, ~40 ns in scalar
// code, which was most of the step (benchmarks/NOTES.md, "Decode step on the Zen5", "AVX2 Zen3").
torch::Tensor rglru_step(const torch::Tensor& x_in, const torch::Tensor& wx_in, const torch::Tensor& bx_in,
                         const torch::Tensor& wa_in, const torch::Tensor& ba_in, const torch::Tensor& softplus_in,
                         const torch::Tensor& h_in, const torch::Tensor& reset_in, double c, int64_t isa_in) {
  const int isa = checked_isa(isa_in, "rglru_step");
  for (const auto* t : {&x_in, &wx_in, &bx_in, &wa_in, &ba_in, &softplus_in, &h_in}) check_fp32(*t, "every RG-LRU input");
  const int64_t H = wx_in.size(0), bw = wx_in.size(1), L = H * bw, B = h_in.numel() / L;
  TORCH_CHECK(softplus_in.numel() == L && x_in.numel() == B * L && reset_in.numel() == B && wa_in.sizes() == wx_in.sizes(),
              "rglru_step: inputs do not match h ", h_in.sizes(), " and gates ", wx_in.sizes());
  const auto x = x_in.contiguous(), wx = wx_in.contiguous(), bx = bx_in.contiguous();
  const auto wa = wa_in.contiguous(), ba = ba_in.contiguous(), softplus = softplus_in.contiguous(), h = h_in.contiguous();
  const auto reset = reset_in.to(torch::kBool).contiguous();
  auto out = torch::empty({B, L}, h.options());
  const float *xp = x.data_ptr<float>(), *wxp = wx.data_ptr<float>(), *bxp = bx.data_ptr<float>();
  const float *wap = wa.data_ptr<float>(), *bap = ba.data_ptr<float>(), *spp = softplus.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const bool* rp = reset.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float neg_c = static_cast<float>(-c);
  // Parallel over gate blocks, rows of x inside: each block's two [bw, bw] matrices (2·bw²·4 bytes, 512 KiB at
  // RG-2B's bw = 256) are read from memory once and stay in L2 for the other rows. At least ~1 MiB per task, so a
  // layer of small blocks stays on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(8 * bw * bw, 1));
  at::parallel_for(0, H, grain, [&](int64_t n_begin, int64_t n_end) {
    std::vector<float> gx(bw), ga(bw), neg(bw);
    for (int64_t n = n_begin; n < n_end; ++n) {
      for (int64_t j = 0; j < bw; ++j) neg[j] = neg_c * spp[n * bw + j];
      for (int64_t b = 0; b < B; ++b) {
        const bool start = rp[b];
        const float* xn = xp + b * L + n * bw;
        const float* hn = hp + b * L + n * bw;
        float* on = op + b * L + n * bw;
        std::copy(bxp + n * bw, bxp + (n + 1) * bw, gx.begin());
        std::copy(bap + n * bw, bap + (n + 1) * bw, ga.begin());
        float* gxd = gx.data();
        float* gad = ga.data();
        for (int64_t i = 0; i < bw; ++i) {
          const float xi = xn[i];
          const float* wxr = wxp + (n * bw + i) * bw;
          const float* war = wap + (n * bw + i) * bw;
#pragma omp simd
          for (int64_t j = 0; j < bw; ++j) {
            gxd[j] += xi * wxr[j];
            gad[j] += xi * war[j];
          }
        }
        int64_t j = 0;
#if KITELM_X86
        if (isa == kAvx512) j = update_avx512(gxd, gad, neg.data(), xn, hn, on, bw, start);
        if (isa == kAvx2) j = update_avx2(gxd, gad, neg.data(), xn, hn, on, bw, start);
#endif
        for (; j < bw; ++j) on[j] = kitelm::rglru_update(gxd[j], gad[j], neg[j], xn[j], hn[j], start);
      }
    }
  });
  return out;
}

// Softmax attention of one query token per row over a ring KV cache (kitelm/layers/local_attention.py,
// `softmax_attend_one`, is the twin): q [B, Hkv, G, hd] (already × 1/√hd), the new token's k, v [B, Hkv, 1, hd], the
// ring ring_k, ring_v [B, Hkv, W, hd], its slots' document ids ring_segment [B, W] and the new token's segment [B];
// slots [0, used) are scored. Per row b, K/V head and query head g:
//   s_j = q_g·K_j (−∞ where ring_segment[b, j] ≠ segment[b]),  s_own = q_g·k,  p = softmax([s, s_own]),
//   y_g = Σ_j p_j V_j + p_own v                                                       → y [B, Hkv, G, hd]
// Each K/V row is loaded once for several query heads; scores are split across threads by slots, the sums by blocks
// of 64 columns. The AVX2 / AVX-512 loops (`isa`) where hd % 64 == 0, else the plain ones (compiled for this CPU). At
// RecurrentGemma-2B's W = 2,048, G = 10, hd = 256 torch's two products took 0.34 ms on the Zen5 (~70 GFLOP/s:
// benchmarks/NOTES.md, "Decode step on the Zen5").
torch::Tensor attend_ring(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in,
                          const torch::Tensor& ring_k_in, const torch::Tensor& ring_v_in,
                          const torch::Tensor& ring_segment_in, const torch::Tensor& segment_in, int64_t used,
                          int64_t isa_in) {
  const int isa = checked_isa(isa_in, "attend_ring");
  for (const auto* t : {&q_in, &k_in, &v_in, &ring_k_in, &ring_v_in}) check_fp32(*t, "q, k, v and the ring");
  TORCH_CHECK(q_in.dim() == 4 && ring_k_in.dim() == 4, "attend_ring: q must be [B, Hkv, G, hd] and the ring [B, Hkv, W, hd]");
  const int64_t B = q_in.size(0), Hkv = q_in.size(1), G = q_in.size(2), hd = q_in.size(3), W = ring_k_in.size(2);
  TORCH_CHECK(ring_k_in.size(0) == B && ring_k_in.size(1) == Hkv && ring_k_in.size(3) == hd &&
                  ring_v_in.sizes() == ring_k_in.sizes() && k_in.numel() == B * Hkv * hd && v_in.numel() == B * Hkv * hd &&
                  ring_segment_in.numel() == B * W && segment_in.numel() == B && used >= 0 && used <= W,
              "attend_ring: q ", q_in.sizes(), ", ring ", ring_k_in.sizes(), " and segments ", ring_segment_in.sizes(),
              " do not match (used = ", used, ")");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto ring_k = ring_k_in.contiguous(), ring_v = ring_v_in.contiguous();
  const auto ring_segment = ring_segment_in.to(torch::kLong).contiguous(), segment = segment_in.to(torch::kLong).contiguous();
  const int64_t S = used + 1;  // the scored slots, then the own key
  auto scores = torch::empty({B, Hkv, G, S}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *rkp = ring_k.data_ptr<float>(), *rvp = ring_v.data_ptr<float>();
  const int64_t *rsp = ring_segment.data_ptr<int64_t>(), *sgp = segment.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const int vector = hd % 64 == 0 ? isa : kPlain;
  constexpr int64_t kSlots = 64;  // slots per task
  const int64_t blocks = (S + kSlots - 1) / kSlots;
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / Hkv, j0 = (task % blocks) * kSlots, j1 = std::min(S, j0 + kSlots);
      for (int64_t j = j0; j < j1; ++j) {
        const bool own = j == used;
        const float* key = own ? kp + bh * hd : rkp + (bh * W + j) * hd;
        float* out = sp + bh * G * S + j;  // column j of the [G, S] scores
        if (!own && rsp[b * W + j] != sgp[b]) {
          for (int64_t g = 0; g < G; ++g) out[g * S] = -INFINITY;
          continue;
        }
#if KITELM_X86
        if (vector == kAvx512) {
          score_avx512(qp + bh * G * hd, G, hd, key, out, S);
          continue;
        }
        if (vector == kAvx2) {
          score_avx2(qp + bh * G * hd, G, hd, key, out, S);
          continue;
        }
#endif
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qp + (bh * G + g) * hd;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < hd; ++d) acc += qg[d] * key[d];
          out[g * S] = acc;
        }
      }
    }
  });
  const auto p = at::_softmax(scores, -1, false);  // torch's vectorized softmax, as the twin
  const float* pp = p.data_ptr<float>();
  auto y = torch::empty({B, Hkv, G, hd}, q.options());
  float* yp = y.data_ptr<float>();
  constexpr int64_t kColumns = 64;  // columns of V per task
  const int64_t col_blocks = (hd + kColumns - 1) / kColumns;
  at::parallel_for(0, B * Hkv * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / col_blocks, d0 = (task % col_blocks) * kColumns, d1 = std::min(hd, d0 + kColumns);
      for (int64_t g = 0; g < G; ++g) {
        float* yg = yp + (bh * G + g) * hd;
        const float* pg = pp + (bh * G + g) * S;
        const float own = pg[used];
        const float* value = vp + bh * hd;
#pragma omp simd
        for (int64_t d = d0; d < d1; ++d) yg[d] = own * value[d];
      }
      const float* values = rvp + bh * W * hd + d0;
      const float* p_bh = pp + bh * G * S;
      float* y_bh = yp + bh * G * hd + d0;
#if KITELM_X86
      if (vector == kAvx512) {
        sum_avx512(p_bh, S, values, used, G, hd, y_bh);
        continue;
      }
      if (vector == kAvx2) {
        sum_avx2(p_bh, S, values, used, G, hd, y_bh);
        continue;
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < used; ++j) {
          const float pj = p_bh[g * S + j];
#pragma omp simd
          for (int64_t d = 0; d < d1 - d0; ++d) y_bh[g * hd + d] += pj * values[j * hd + d];
        }
      }
    }
  });
  return y;
}

// Rotary embedding of a few tokens' queries or keys (layers/rope.py, `RotaryEmbedding.rotate` with `cos_sin`, is
// the twin): x [B, H, T, hd] fp32, positions [B, T] (negative = padding, treated as 0), inv_freq [r/2] →
// a rotated copy: with θ_i = pos·inv_freq_i and x_rot = [x1 | x2] the first r dims of each head,
//   x_rot' = [x1·cos θ − x2·sin θ | x2·cos θ + x1·sin θ], the other dims copied. One call for what took ~16 ops.
torch::Tensor rope_rotate(const torch::Tensor& x_in, const torch::Tensor& positions_in, const torch::Tensor& inv_freq_in) {
  check_fp32(x_in, "x");
  check_fp32(inv_freq_in, "inv_freq");
  TORCH_CHECK(x_in.dim() == 4, "rope_rotate: x must be [B, H, T, hd]");
  const int64_t B = x_in.size(0), H = x_in.size(1), T = x_in.size(2), hd = x_in.size(3), half = inv_freq_in.numel();
  TORCH_CHECK(positions_in.numel() == B * T && 2 * half <= hd, "rope_rotate: x ", x_in.sizes(), ", positions ",
              positions_in.sizes(), " and ", half, " frequencies do not match");
  const auto x = x_in.contiguous(), inv_freq = inv_freq_in.contiguous();
  const auto positions = positions_in.to(torch::kLong).contiguous();
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *fp = inv_freq.data_ptr<float>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const float pos = static_cast<float>(std::max<int64_t>(pp[b * T + t], 0));
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * fp[i];
        cos_t[i] = std::cos(angle);
        sin_t[i] = std::sin(angle);
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = xp + ((b * H + h) * T + t) * hd;
        float* yr = yp + ((b * H + h) * T + t) * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = xr[i], x2 = xr[half + i];
          yr[i] = x1 * cos_t[i] - x2 * sin_t[i];
          yr[half + i] = x2 * cos_t[i] + x1 * sin_t[i];
        }
        std::copy(xr + 2 * half, xr + hd, yr + 2 * half);
      }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &small_linear, "y = x Wᵀ + b for a few rows of x");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows");
  m.def("conv1d_step", &conv1d_step, "one Conv1D time step, state updated in place");
  m.def("rglru_step", &rglru_step, "one RG-LRU time step");
  m.def("rope_rotate", &rope_rotate, "rotary embedding of a few tokens (rotate-half layout)");
  m.def("attend_ring", &attend_ring, "softmax attention of one query token over a ring KV cache");
  m.def("best_isa", &best_isa, "0 plain loops, 1 AVX2+FMA, 2 AVX-512: rglru_step's and attend_ring's fastest path");
}
