// Short causal depthwise convolution with optional fused SiLU, forward and backward, on the CPU, in the
// channel-last layout (B, L, D) that Mamba's projections produce.
//
// Legend: B batch, L length, D channels, W kernel width, t time.
//
//   pre[b, t, d] = bias[d] + sum_{w < W} weight[d, w] x[b, t - (W - 1) + w, d]
//   y            = silu(pre) (or pre)
//
// with x at negative times taken from initial_states (B, D, W - 1) (zeros when absent). Every loop
// runs along d, which is contiguous, so it vectorises; rows of time are split across threads.
// Backward: dpre = dy silu'(pre) (pre recomputed), then per row
//   dx[t]       = sum_w weight[:, w] dpre[t + (W - 1) - w]      (terms with t + (W - 1) - w < L)
//   dweight[w] += dpre[t] x[t - (W - 1) + w],  dbias += dpre[t]
// into per-thread accumulators, and the W - 1 initial positions of each batch row likewise.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernel_common.h"

#include <algorithm>
#include <vector>

namespace {

using seqarch_kernels::data_or_null;
using seqarch_kernels::value_or_undefined;
using seqarch_kernels::sigmoid;

// Rows of x with W - 1 rows of history in front: row(b, s) for s in [-(W - 1), L), (D,) contiguous.
template <typename scalar_t>
struct PaddedRows {
  const scalar_t* x;         // (B, L, D) contiguous
  const scalar_t* history;   // (B, W - 1, D) contiguous, or null for zeros
  const scalar_t* zeros;     // (D,) of zeros
  int64_t len, dim, width;

  const scalar_t* row(int64_t b, int64_t s) const {
    if (s >= 0) return x + (b * len + s) * dim;
    return history ? history + (b * (width - 1) + width - 1 + s) * dim : zeros;
  }
};

// pre-activation of row (b, t) into out (D,).
template <typename scalar_t>
void pre_activation(const PaddedRows<scalar_t>& rows, const scalar_t* weight_t, const scalar_t* bias, int64_t b,
                    int64_t t, scalar_t* out) {
  const int64_t dim = rows.dim, width = rows.width;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] = bias ? bias[d] : scalar_t(0);
  for (int64_t w = 0; w < width; ++w) {
    const scalar_t* xs = rows.row(b, t - (width - 1) + w);
    const scalar_t* ws = weight_t + w * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] += ws[d] * xs[d];
  }
}

template <typename scalar_t>
void forward_kernel(const PaddedRows<scalar_t>& rows, const scalar_t* weight_t, const scalar_t* bias, bool silu,
                    int64_t batch, scalar_t* y) {
  const int64_t len = rows.len, dim = rows.dim;
  at::parallel_for(0, batch * len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = y + r * dim;
      pre_activation(rows, weight_t, bias, r / len, r % len, out);
      if (silu) {
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) out[d] = out[d] * sigmoid(out[d]);
      }
    }
  });
}

// dpre (B, L, D) from dy and the recomputed pre-activation.
template <typename scalar_t>
void dpre_kernel(const PaddedRows<scalar_t>& rows, const scalar_t* weight_t, const scalar_t* bias, bool silu,
                 int64_t batch, const scalar_t* dy, scalar_t* dpre) {
  const int64_t len = rows.len, dim = rows.dim;
  at::parallel_for(0, batch * len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = dpre + r * dim;
      const scalar_t* g = dy + r * dim;
      if (!silu) {
        std::copy(g, g + dim, out);
        continue;
      }
      pre_activation(rows, weight_t, bias, r / len, r % len, out);
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const scalar_t sig = sigmoid(out[d]);
        out[d] = g[d] * sig * (scalar_t(1) + out[d] * (scalar_t(1) - sig));
      }
    }
  });
}

// dx of row s (s may be negative: a history position) into out (D,).
template <typename scalar_t>
void input_gradient(const scalar_t* dpre, const scalar_t* weight_t, int64_t len, int64_t dim, int64_t width,
                    int64_t b, int64_t s, scalar_t* out) {
  std::fill(out, out + dim, scalar_t(0));
  for (int64_t w = 0; w < width; ++w) {
    const int64_t t = s + (width - 1) - w;
    if (t < 0 || t >= len) continue;
    const scalar_t* g = dpre + (b * len + t) * dim;
    const scalar_t* ws = weight_t + w * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] += ws[d] * g[d];
  }
}

template <typename scalar_t>
void backward_kernel(const PaddedRows<scalar_t>& rows, const scalar_t* weight_t, int64_t batch, const scalar_t* dpre,
                     scalar_t* dx, scalar_t* dweight_per_thread, scalar_t* dbias_per_thread, int64_t max_threads) {
  const int64_t len = rows.len, dim = rows.dim, width = rows.width;
  at::parallel_for(0, batch * len, 64, [&](int64_t begin, int64_t end) {
    const int64_t thread = std::min<int64_t>(at::get_thread_num(), max_threads - 1);
    scalar_t* dweight = dweight_per_thread + thread * width * dim;  // (W, D)
    scalar_t* dbias = dbias_per_thread + thread * dim;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / len, t = r % len;
      input_gradient(dpre, weight_t, len, dim, width, b, t, dx + r * dim);
      const scalar_t* g = dpre + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dbias[d] += g[d];
      for (int64_t w = 0; w < width; ++w) {
        const scalar_t* xs = rows.row(b, t - (width - 1) + w);
        scalar_t* dw = dweight + w * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dw[d] += g[d] * xs[d];
      }
    }
  });
}

// (B, D, L) -> its (B, L, D) rows, contiguous (a view when x is already laid out that way).
at::Tensor channel_last_rows(const at::Tensor& x) { return x.transpose(1, 2).contiguous(); }

template <typename scalar_t>
PaddedRows<scalar_t> padded_rows(const at::Tensor& x_rows, const at::Tensor& history_rows, const at::Tensor& zeros,
                                 int64_t width) {
  return {x_rows.data_ptr<scalar_t>(), data_or_null<scalar_t>(history_rows), zeros.data_ptr<scalar_t>(),
          x_rows.size(1), x_rows.size(2), width};
}

// x (B, D, L), weight (D, W), bias (D,), initial_states (B, D, W - 1) -> y (B, D, L) as a view of a
// contiguous (B, L, D) tensor.
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& initial_states, bool silu) {
  const int64_t batch = x.size(0), dim = x.size(1), len = x.size(2), width = weight.size(1);
  const at::Tensor x_rows = channel_last_rows(x);
  const at::Tensor init = value_or_undefined(initial_states);
  const at::Tensor history_rows = init.defined() ? channel_last_rows(init) : at::Tensor();
  const at::Tensor weight_t = weight.t().contiguous();  // (W, D)
  const at::Tensor bias_t = value_or_undefined(bias);
  const at::Tensor zeros = at::zeros({dim}, x.options());
  auto y = at::empty({batch, len, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_forward", [&] {
    forward_kernel<scalar_t>(padded_rows<scalar_t>(x_rows, history_rows, zeros, width), weight_t.data_ptr<scalar_t>(),
                             data_or_null<scalar_t>(bias_t), silu, batch, y.data_ptr<scalar_t>());
  });
  return y.transpose(1, 2);
}

// -> dx (B, D, L) (view of (B, L, D)), dweight (D, W), dbias (D,), dinitial_states (B, D, W - 1).
std::vector<at::Tensor> backward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& initial_states, bool silu, const at::Tensor& dy) {
  const int64_t batch = x.size(0), dim = x.size(1), len = x.size(2), width = weight.size(1);
  const int64_t threads = at::get_num_threads();
  const at::Tensor x_rows = channel_last_rows(x), dy_rows = channel_last_rows(dy);
  const at::Tensor init = value_or_undefined(initial_states);
  const at::Tensor history_rows = init.defined() ? channel_last_rows(init) : at::Tensor();
  const at::Tensor weight_t = weight.t().contiguous();
  const at::Tensor bias_t = value_or_undefined(bias);
  const at::Tensor zeros = at::zeros({dim}, x.options());
  auto dpre = at::empty({batch, len, dim}, x.options());
  auto dx = at::empty({batch, len, dim}, x.options());
  auto dweight_per_thread = at::zeros({threads, width, dim}, x.options());
  auto dbias_per_thread = at::zeros({threads, dim}, x.options());
  auto dhistory = at::empty({batch, width - 1, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward", [&] {
    const auto rows = padded_rows<scalar_t>(x_rows, history_rows, zeros, width);
    const scalar_t* w_t = weight_t.data_ptr<scalar_t>();
    dpre_kernel<scalar_t>(rows, w_t, data_or_null<scalar_t>(bias_t), silu, batch, dy_rows.data_ptr<scalar_t>(),
                          dpre.data_ptr<scalar_t>());
    backward_kernel<scalar_t>(rows, w_t, batch, dpre.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                              dweight_per_thread.data_ptr<scalar_t>(), dbias_per_thread.data_ptr<scalar_t>(), threads);
    // The history positions s = -(W - 1) ... -1 (their dweight share is in backward_kernel's rows).
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t s = -(width - 1); s < 0; ++s) {
        input_gradient(dpre.data_ptr<scalar_t>(), w_t, len, dim, width, b, s,
                       dhistory.data_ptr<scalar_t>() + (b * (width - 1) + width - 1 + s) * dim);
      }
    }
  });
  return {dx.transpose(1, 2), dweight_per_thread.sum(0).t(), dbias_per_thread.sum(0), dhistory.transpose(1, 2)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal depthwise conv1d (+ SiLU), channel-last: y");
  m.def("backward", &backward, "its backward: dx, dweight, dbias, dinitial_states");
}
