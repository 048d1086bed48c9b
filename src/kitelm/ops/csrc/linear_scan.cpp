// Sequential linear scan h_t = a_t * h_{t-1} + x_t on CPU, forward and reverse-scan backward.
//
// Layout: a, x, h, dh, da, dx are contiguous [B, T, D]; h0, h_last, dh_last, dh0 are [B, D].
// Document resets are the caller's: it sets a_t = 0 at a document start (kitelm/layers/rglru.py).
//
// Backward (g_t = dL/dh_t through the recurrence, read right to left):
//   g_{T-1} = dh_{T-1} + dh_last,   g_t = dh_t + a_{t+1} g_{t+1},
//   dx_t = g_t,   da_t = g_t h_{t-1} (h_{-1} = h0),   dh0 = a_0 g_0.
//
// The scan is memory-bound (12 B/elem forward, 20 B/elem backward in fp32), so the kernel streams each
// [T, D] slab once: a task owns one batch row and a wide contiguous block of channels, keeps its running
// state in a small L1-resident buffer and walks over time, vectorised over the channel block.
// Narrow channel blocks (a few cache lines) are 2x slower because they defeat the hardware prefetcher,
// so rows are split into blocks only as much as needed to give every thread the same amount of work.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <vector>

namespace {

// How each batch row's channels are cut into tasks: `blocks` blocks of `width` channels (the last may be shorter).
struct ChannelSplit {
  int64_t blocks;
  int64_t width;
};

constexpr int64_t kMinBlockWidth = 64;  // one block never drops below 64 channels (4 cache lines of fp32)

ChannelSplit split_channels(int64_t batch, int64_t channels) {
  const int64_t threads = at::get_num_threads();
  // B * blocks is a multiple of the thread count, so every thread gets the same number of (row, block) tasks.
  int64_t blocks = threads / std::gcd(batch, threads);
  blocks = std::max<int64_t>(1, std::min(blocks, channels / kMinBlockWidth));
  const int64_t width = (channels + blocks - 1) / blocks;
  return {(channels + width - 1) / width, width};
}

// Below this many elements the whole scan takes microseconds and one thread beats a parallel region.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

// Calls task(b, d0, n) for every batch row b and channel block [d0, d0 + n), spread over the intra-op threads.
template <typename F>
void for_each_task(int64_t batch, int64_t steps, int64_t channels, const F& task) {
  const ChannelSplit split = split_channels(batch, channels);
  const int64_t tasks = batch * split.blocks;
  const int64_t grain = batch * steps * channels < kMinParallelElements ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / split.blocks;
      const int64_t d0 = (i % split.blocks) * split.width;
      task(b, d0, std::min(split.width, channels - d0));
    }
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* a, const scalar_t* x, const scalar_t* h0, scalar_t* h, scalar_t* h_last,
                    int64_t B, int64_t T, int64_t D) {
  for_each_task(B, T, D, [&](int64_t b, int64_t d0, int64_t n) {
    std::vector<scalar_t> buffer(n);
    scalar_t* __restrict__ state = buffer.data();
    for (int64_t i = 0; i < n; ++i) state[i] = h0 ? h0[b * D + d0 + i] : scalar_t(0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t offset = (b * T + t) * D + d0;
      const scalar_t* __restrict__ a_t = a + offset;
      const scalar_t* __restrict__ x_t = x + offset;
      scalar_t* __restrict__ h_t = h + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        state[i] = a_t[i] * state[i] + x_t[i];
        h_t[i] = state[i];
      }
    }
    std::copy(state, state + n, h_last + b * D + d0);
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* a, const scalar_t* h, const scalar_t* h0, const scalar_t* dh,
                     const scalar_t* dh_last, scalar_t* da, scalar_t* dx, scalar_t* dh0, int64_t B, int64_t T,
                     int64_t D) {
  for_each_task(B, T, D, [&](int64_t b, int64_t d0, int64_t n) {
    std::vector<scalar_t> buffer(n);
    scalar_t* __restrict__ carry = buffer.data();  // a_{t+1} g_{t+1}: the gradient flowing into h_t from the right
    std::copy(dh_last + b * D + d0, dh_last + b * D + d0 + n, carry);
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t offset = (b * T + t) * D + d0;
      const scalar_t* __restrict__ a_t = a + offset;
      const scalar_t* __restrict__ dh_t = dh + offset;
      scalar_t* __restrict__ da_t = da + offset;
      scalar_t* __restrict__ dx_t = dx + offset;
      const scalar_t* __restrict__ h_prev = t > 0 ? h + offset - D : (h0 ? h0 + b * D + d0 : nullptr);
      if (h_prev) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t g = dh_t[i] + carry[i];
          dx_t[i] = g;
          da_t[i] = g * h_prev[i];
          carry[i] = a_t[i] * g;
        }
      } else {  // t == 0 without h0: the state before the sequence is the constant 0
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t g = dh_t[i] + carry[i];
          dx_t[i] = g;
          da_t[i] = 0;
          carry[i] = a_t[i] * g;
        }
      }
    }
    std::copy(carry, carry + n, dh0 + b * D + d0);
  });
}

void check_inputs(const torch::Tensor& a, const torch::Tensor& x, const std::optional<torch::Tensor>& h0) {
  TORCH_CHECK(a.device().is_cpu() && x.device().is_cpu(), "linear_scan cpp backend: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && a.sizes() == x.sizes(), "linear_scan cpp backend: a and x must both be [B, T, D]");
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "linear_scan cpp backend: a and x must have the same dtype");
  TORCH_CHECK(a.is_contiguous() && x.is_contiguous(), "linear_scan cpp backend: a and x must be contiguous");
  if (h0) {
    TORCH_CHECK(h0->sizes() == at::IntArrayRef({x.size(0), x.size(2)}) && h0->is_contiguous() &&
                    h0->scalar_type() == x.scalar_type(),
                "linear_scan cpp backend: h0 must be a contiguous [B, D] tensor of the same dtype as x");
  }
}

// Returns (h [B, T, D], h_last [B, D]).
std::vector<torch::Tensor> scan_forward(const torch::Tensor& a, const torch::Tensor& x,
                                        const std::optional<torch::Tensor>& h0) {
  check_inputs(a, x, h0);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  auto h = torch::empty_like(x);
  auto h_last = torch::empty({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_scan_forward", [&] {
    forward_kernel<scalar_t>(a.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                             h0 ? h0->data_ptr<scalar_t>() : nullptr, h.data_ptr<scalar_t>(),
                             h_last.data_ptr<scalar_t>(), B, T, D);
  });
  return {h, h_last};
}

// Returns (da [B, T, D], dx [B, T, D], dh0 [B, D]).
std::vector<torch::Tensor> scan_backward(const torch::Tensor& a, const torch::Tensor& h,
                                         const std::optional<torch::Tensor>& h0, const torch::Tensor& dh,
                                         const torch::Tensor& dh_last) {
  check_inputs(a, h, h0);
  TORCH_CHECK(dh.sizes() == h.sizes() && dh.is_contiguous() && dh.scalar_type() == h.scalar_type(),
              "linear_scan cpp backend: dh must be a contiguous [B, T, D] tensor of the same dtype as h");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  TORCH_CHECK(dh_last.sizes() == at::IntArrayRef({B, D}) && dh_last.is_contiguous() &&
                  dh_last.scalar_type() == h.scalar_type(),
              "linear_scan cpp backend: dh_last must be a contiguous [B, D] tensor of the same dtype as h");
  auto da = torch::empty_like(h);
  auto dx = torch::empty_like(h);
  auto dh0 = torch::empty({B, D}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "linear_scan_backward", [&] {
    backward_kernel<scalar_t>(a.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                              h0 ? h0->data_ptr<scalar_t>() : nullptr, dh.data_ptr<scalar_t>(),
                              dh_last.data_ptr<scalar_t>(), da.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                              dh0.data_ptr<scalar_t>(), B, T, D);
  });
  return {da, dx, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Sequential linear scan h_t = a_t * h_{t-1} + x_t (fp32/fp64, CPU) with its reverse-scan backward";
  m.def("forward", &scan_forward, "h, h_last = forward(a, x, h0)", pybind11::arg("a"), pybind11::arg("x"),
        pybind11::arg("h0"));
  m.def("backward", &scan_backward, "da, dx, dh0 = backward(a, h, h0, dh, dh_last)", pybind11::arg("a"),
        pybind11::arg("h"), pybind11::arg("h0"), pybind11::arg("dh"), pybind11::arg("dh_last"));
}
