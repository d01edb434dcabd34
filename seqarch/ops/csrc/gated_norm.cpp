// Gated group RMSNorm, out = RMSNorm_groups(x * silu(z)) * weight (mamba-ssm's RMSNormGated with
// norm_before_gate=False), forward and backward in one pass over each row, on the CPU.
//
// Legend: R rows (all leading dimensions flattened), E channels, G groups of C = E / G channels.
//
//   g      = x * silu(z)                        (g = x when z is absent)
//   rstd   = 1 / sqrt(mean_C(g^2) + eps)        per row and group, saved for the backward
//   out    = g * rstd * weight
//
// Backward, per row and group, with n = g rstd and dn = dout weight:
//   dweight += dout n
//   dg       = rstd (dn - n mean_C(dn n))
//   dx       = dg silu(z),   dz = dg x sigmoid(z) (1 + z (1 - sigmoid(z)))
//
// x and z may have any row stride (z is a column slice of the input projection's output, so no copy
// is needed); their channels must be contiguous. Rows are split across ATen's threads; the weight
// gradient goes into one accumulator per thread, summed at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using seqarch_kernels::sigmoid;

// Rows of x and z (z may be null) with their own row strides; channels contiguous.
template <typename scalar_t>
struct Rows {
  const scalar_t* x;
  const scalar_t* z;
  int64_t x_stride, z_stride, channels, groups;
};

template <typename scalar_t>
void forward_kernel(const Rows<scalar_t>& in, const scalar_t* weight, double eps, int64_t rows, scalar_t* out,
                    scalar_t* rstd) {
  const int64_t channels = in.channels, groups = in.groups, size = channels / groups;
  const int64_t grain = std::max<int64_t>(1, 8192 / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = in.x + r * in.x_stride;
      const scalar_t* z = in.z ? in.z + r * in.z_stride : nullptr;
      scalar_t* o = out + r * channels;
      for (int64_t group = 0; group < groups; ++group) {
        const int64_t first = group * size, last = first + size;
        scalar_t squares = 0;
        if (z) {
#pragma omp simd reduction(+ : squares)
          for (int64_t c = first; c < last; ++c) {
            const scalar_t g = x[c] * z[c] * sigmoid(z[c]);
            o[c] = g;
            squares += g * g;
          }
        } else {
#pragma omp simd reduction(+ : squares)
          for (int64_t c = first; c < last; ++c) {
            o[c] = x[c];
            squares += x[c] * x[c];
          }
        }
        const scalar_t inv = scalar_t(1) / std::sqrt(squares / scalar_t(size) + scalar_t(eps));
        rstd[r * groups + group] = inv;
#pragma omp simd
        for (int64_t c = first; c < last; ++c) o[c] = o[c] * inv * weight[c];
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Rows<scalar_t>& in, const scalar_t* weight, const scalar_t* rstd, const scalar_t* dout,
                     int64_t dout_stride, int64_t rows, scalar_t* dx, scalar_t* dz, scalar_t* dweight_per_thread,
                     int64_t max_threads) {
  const int64_t channels = in.channels, groups = in.groups, size = channels / groups;
  const int64_t grain = std::max<int64_t>(1, 8192 / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const int64_t thread = std::min<int64_t>(at::get_thread_num(), max_threads - 1);
    scalar_t* dweight = dweight_per_thread + thread * channels;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = in.x + r * in.x_stride;
      const scalar_t* z = in.z ? in.z + r * in.z_stride : nullptr;
      const scalar_t* d = dout + r * dout_stride;
      scalar_t* dxr = dx + r * channels;
      scalar_t* dzr = dz ? dz + r * channels : nullptr;
      for (int64_t group = 0; group < groups; ++group) {
        const int64_t first = group * size, last = first + size;
        const scalar_t inv = rstd[r * groups + group];
        // Pass 1: sum(dn g) and the weight gradient; g is recomputed, dn = dout weight kept in dx.
        scalar_t dot = 0;
        if (z) {
#pragma omp simd reduction(+ : dot)
          for (int64_t c = first; c < last; ++c) {
            const scalar_t g = x[c] * z[c] * sigmoid(z[c]);
            const scalar_t dn = d[c] * weight[c];
            dxr[c] = dn;
            dot += dn * g;
            dweight[c] += d[c] * g * inv;
          }
        } else {
#pragma omp simd reduction(+ : dot)
          for (int64_t c = first; c < last; ++c) {
            const scalar_t dn = d[c] * weight[c];
            dxr[c] = dn;
            dot += dn * x[c];
            dweight[c] += d[c] * x[c] * inv;
          }
        }
        // mean(dn n) = rstd dot / C, and dg = rstd (dn - g rstd mean(dn n)).
        const scalar_t coef = inv * inv * dot / scalar_t(size);
        if (z) {
#pragma omp simd
          for (int64_t c = first; c < last; ++c) {
            const scalar_t sig = sigmoid(z[c]);
            const scalar_t silu = z[c] * sig;
            const scalar_t dg = inv * (dxr[c] - x[c] * silu * coef);
            dxr[c] = dg * silu;
            dzr[c] = dg * x[c] * sig * (scalar_t(1) + z[c] * (scalar_t(1) - sig));
          }
        } else {
#pragma omp simd
          for (int64_t c = first; c < last; ++c) dxr[c] = inv * (dxr[c] - x[c] * coef);
        }
      }
    }
  });
}

// A (R, E) matrix with contiguous channels: its row stride.
int64_t row_stride(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == channels && t.stride(1) == 1, "gated_rms_norm kernel: ", name,
              " must be (R, E) with contiguous channels");
  return t.stride(0);
}

// x (R, E), z (R, E) or None, weight (E,) -> out (R, E), rstd (R, G).
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& z, const at::Tensor& weight,
                                double eps, int64_t groups) {
  const int64_t rows = x.size(0), channels = x.size(1);
  TORCH_CHECK(groups >= 1 && channels % groups == 0, "gated_rms_norm kernel: groups must divide the channels");
  const at::Tensor zt = seqarch_kernels::value_or_undefined(z);
  const at::Tensor w = weight.contiguous();
  auto out = at::empty({rows, channels}, x.options());
  auto rstd = at::empty({rows, groups}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_rms_norm_forward", [&] {
    const Rows<scalar_t> in{x.data_ptr<scalar_t>(), seqarch_kernels::data_or_null<scalar_t>(zt),
                            row_stride(x, "x", channels), zt.defined() ? row_stride(zt, "z", channels) : 0, channels,
                            groups};
    forward_kernel<scalar_t>(in, w.data_ptr<scalar_t>(), eps, rows, out.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {out, rstd};
}

// -> dx (R, E), dz (R, E) (undefined without z), dweight (E,).
std::vector<at::Tensor> backward(const at::Tensor& x, const c10::optional<at::Tensor>& z, const at::Tensor& weight,
                                 const at::Tensor& rstd, const at::Tensor& dout) {
  const int64_t rows = x.size(0), channels = x.size(1), groups = rstd.size(1);
  const int64_t threads = at::get_num_threads();
  const at::Tensor zt = seqarch_kernels::value_or_undefined(z);
  const at::Tensor w = weight.contiguous();
  const at::Tensor r = rstd.contiguous();
  auto dx = at::empty({rows, channels}, x.options());
  auto dz = zt.defined() ? at::empty({rows, channels}, x.options()) : at::Tensor();
  auto dweight_per_thread = at::zeros({threads, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_rms_norm_backward", [&] {
    const Rows<scalar_t> in{x.data_ptr<scalar_t>(), seqarch_kernels::data_or_null<scalar_t>(zt),
                            row_stride(x, "x", channels), zt.defined() ? row_stride(zt, "z", channels) : 0, channels,
                            groups};
    backward_kernel<scalar_t>(in, w.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                              row_stride(dout, "dout", channels), rows, dx.data_ptr<scalar_t>(),
                              dz.defined() ? dz.data_ptr<scalar_t>() : nullptr, dweight_per_thread.data_ptr<scalar_t>(),
                              threads);
  });
  return {dx, dz, dweight_per_thread.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "gated group RMSNorm: out, rstd");
  m.def("backward", &backward, "its backward: dx, dz, dweight");
}
