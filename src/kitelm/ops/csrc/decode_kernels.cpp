// Kernels for decoding (a few rows per call, fp32, no autograd), called from ops/decode.py and the layers; their
// pure-torch twins are F.linear, RMSNorm.forward_ref (layers/norms.py), Conv1D.step_ref (layers/conv1d.py) and
// RGLRU.step_ref (layers/rglru.py).
//
// At batch 1 every op touches one row, so a decoding step costs (a) reading every weight once and (b) dispatching
// hundreds of tiny ops. small_linear attacks (a): MKL's small-M GEMM streams weights well below DRAM speed; this
// loop splits output rows across torch's threads and streams each weight row once for all rows of x.
// rms_norm, conv1d_step and rglru_step attack (b): each replaces 7 to ~30 small ops by one pass. Measurements:
// benchmarks/NOTES.md.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_fp32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.device().is_cpu(), "kitelm decode kernels: ", what,
              " must be a float32 CPU tensor");
}

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
//   i = σ(gx), r = σ(ga), log a = −c·r·softplus(a_param), a = exp(log a), m = ρ ? 1 : sqrt(1 − exp(2 log a))
//   h ← (ρ ? 0 : a·h) + m·i·x;   returns the new h [B, L]
// x [B, L]; w_x, w_a [H, bw, bw] ([in, out] per block); b_x, b_a [H, bw]; a_param [L]; h [B, L]; reset [B] bool.
torch::Tensor rglru_step(const torch::Tensor& x_in, const torch::Tensor& wx_in, const torch::Tensor& bx_in,
                         const torch::Tensor& wa_in, const torch::Tensor& ba_in, const torch::Tensor& a_param_in,
                         const torch::Tensor& h_in, const torch::Tensor& reset_in, double c) {
  for (const auto* t : {&x_in, &wx_in, &bx_in, &wa_in, &ba_in, &a_param_in, &h_in}) check_fp32(*t, "every RG-LRU input");
  const int64_t H = wx_in.size(0), bw = wx_in.size(1), L = H * bw, B = h_in.numel() / L;
  TORCH_CHECK(a_param_in.numel() == L && x_in.numel() == B * L && reset_in.numel() == B && wa_in.sizes() == wx_in.sizes(),
              "rglru_step: inputs do not match h ", h_in.sizes(), " and gates ", wx_in.sizes());
  const auto x = x_in.contiguous(), wx = wx_in.contiguous(), bx = bx_in.contiguous();
  const auto wa = wa_in.contiguous(), ba = ba_in.contiguous(), a_param = a_param_in.contiguous(), h = h_in.contiguous();
  const auto reset = reset_in.to(torch::kBool).contiguous();
  auto out = torch::empty({B, L}, h.options());
  const float *xp = x.data_ptr<float>(), *wxp = wx.data_ptr<float>(), *bxp = bx.data_ptr<float>();
  const float *wap = wa.data_ptr<float>(), *bap = ba.data_ptr<float>(), *pp = a_param.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const bool* rp = reset.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float cf = static_cast<float>(c);
  // Parallel over gate blocks, rows of x inside: each block's two [bw, bw] matrices (2·bw²·4 bytes, 512 KiB at
  // RG-2B's bw = 256) are read from memory once and stay in L2 for the other rows. At least ~1 MiB per task, so a
  // layer of small blocks stays on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(8 * bw * bw, 1));
  at::parallel_for(0, H, grain, [&](int64_t n_begin, int64_t n_end) {
    std::vector<float> gx(bw), ga(bw);
    for (int64_t n = n_begin; n < n_end; ++n) {
      for (int64_t b = 0; b < B; ++b) {
        const bool start = rp[b];
        const float* xn = xp + b * L + n * bw;
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
        for (int64_t j = 0; j < bw; ++j) {
          const int64_t l = n * bw + j, k = b * L + l;
          const float p = pp[l];
          const float softplus = p > 20.f ? p : std::log1p(std::exp(p));  // torch's threshold
          const float gate_x = 1.f / (1.f + std::exp(-gx[j]));
          const float gate_a = 1.f / (1.f + std::exp(-ga[j]));
          const float log_a = -cf * gate_a * softplus;
          const float mult = start ? 1.f : std::sqrt(1.f - std::exp(2.f * log_a));
          op[k] = (start ? 0.f : std::exp(log_a) * hp[k]) + mult * gate_x * xn[j];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &small_linear, "y = x Wᵀ + b for a few rows of x");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows");
  m.def("conv1d_step", &conv1d_step, "one Conv1D time step, state updated in place");
  m.def("rglru_step", &rglru_step, "one RG-LRU time step");
}
