// Selective scan kernel (selective_scan.cpp): the tile layout and the portable per-tile loops.
//
// Legend: B batch, D channels, L length, N state size, G groups, K chunk length, W = kTile lanes.
// Private to selective_scan.cpp (its only includer): the contents sit in an unnamed namespace, as
// they did in the one file, so linkage and inlining are unchanged.

#pragma once

#include <torch/extension.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using seqarch_kernels::data_or_null;
using seqarch_kernels::decay_exp;
using seqarch_kernels::sigmoid;
using seqarch_kernels::value_or_undefined;

// sigmoid and softplus use the inlined exp and std::log so that the per-chunk loops over time
// that evaluate them vectorise (scalar libm calls per step cost twice the whole scan).

// torch.nn.functional.softplus with its default threshold: x itself above 20.
template <typename scalar_t>
inline scalar_t softplus(scalar_t x) {
  return x > scalar_t(20) ? x : std::log(scalar_t(1) + decay_exp(x));
}

// The optional elementwise parts, shared by forward and backward.
template <typename scalar_t>
struct Elementwise {
  const scalar_t* D;           // (D,) or null
  const scalar_t* z;           // (B, D, L) or null
  const scalar_t* delta_bias;  // (D,) or null
  bool use_softplus;

  // dt_t for t in [start, stop) of one row into dts[0, stop - start), as one vectorisable loop.
  void dt_rows(const scalar_t* delta_row, int64_t d, int64_t start, int64_t stop, scalar_t* dts) const {
    const scalar_t bias = delta_bias ? delta_bias[d] : scalar_t(0);
    if (use_softplus) {
#pragma omp simd
      for (int64_t t = start; t < stop; ++t) dts[t - start] = softplus(delta_row[t] + bias);
    } else {
#pragma omp simd
      for (int64_t t = start; t < stop; ++t) dts[t - start] = delta_row[t] + bias;
    }
  }
};

// Forward, vectorised across channels: a task is a tile of W channels of one batch row and one
// group, so all of them read the same B_t and C_t, and each step is W-wide with no reduction across
// lanes: for each n, h[n][:] = exp(dt[:] A[n][:]) h[n][:] + (dt u)[:] B_t,n and y[:] += C_t,n h[n][:].
// u, delta, z and out are (B, D, L) with any strides, so channel-last tensors (B, L, D) from the
// layer's projections are read and written in place: a chunk of K steps is gathered into [step][lane]
// buffers in whichever order walks memory contiguously, and its outputs scattered back the same way.
// A tile narrower than W (the last one of a group) pads its lanes with A = 0 and u = 0, so their
// states stay 0, and writes only its own lanes.
constexpr int64_t kTile = 16;

struct Strides {
  int64_t batch, channel, time;
};

// How (B, D) splits into tasks: tiles of up to kTile channels inside one (batch, group).
struct Tiles {
  int64_t batch, dim, len, nstate, groups, per_group, per_group_tiles;

  Tiles(const at::Tensor& u, const at::Tensor& A, const at::Tensor& Bm)
      : batch(u.size(0)), dim(u.size(1)), len(u.size(2)), nstate(A.size(1)), groups(Bm.size(1)),
        per_group(dim / groups), per_group_tiles((per_group + kTile - 1) / kTile) {}

  int64_t count() const { return batch * groups * per_group_tiles; }

  struct Tile {
    int64_t b, g, first, width;  // batch row, group, first channel, channels (<= kTile)
  };

  Tile operator[](int64_t task) const {
    const int64_t b = task / (groups * per_group_tiles), g = task / per_group_tiles % groups;
    const int64_t first = g * per_group + task % per_group_tiles * kTile;
    return {b, g, first, std::min(kTile, g * per_group + per_group - first)};
  }
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// buffer[k * kTile + c] = src[channel first + c, step start + k] for c < width, k < steps.
template <typename scalar_t>
void gather_tile(const scalar_t* src, const Strides& st, int64_t width, int64_t steps, scalar_t* buffer) {
  if (st.channel < st.time) {
    for (int64_t k = 0; k < steps; ++k)
      for (int64_t c = 0; c < width; ++c) buffer[k * kTile + c] = src[c * st.channel + k * st.time];
  } else {
    for (int64_t c = 0; c < width; ++c)
      for (int64_t k = 0; k < steps; ++k) buffer[k * kTile + c] = src[c * st.channel + k * st.time];
  }
}

template <typename scalar_t>
void scatter_tile(const scalar_t* buffer, const Strides& st, int64_t width, int64_t steps, scalar_t* dst) {
  if (st.channel < st.time) {
    for (int64_t k = 0; k < steps; ++k)
      for (int64_t c = 0; c < width; ++c) dst[c * st.channel + k * st.time] = buffer[k * kTile + c];
  } else {
    for (int64_t c = 0; c < width; ++c)
      for (int64_t k = 0; k < steps; ++k) dst[c * st.channel + k * st.time] = buffer[k * kTile + c];
  }
}

// dt = delta + bias, through softplus if asked, for `steps` rows of kTile lanes in place.
template <typename scalar_t>
void dt_tile(scalar_t* dts, const scalar_t* biases, int64_t steps, bool use_softplus) {
  for (int64_t k = 0; k < steps; ++k) {
    scalar_t* dt_k = dts + k * kTile;
    if (use_softplus) {
#pragma omp simd
      for (int64_t c = 0; c < kTile; ++c) dt_k[c] = softplus(dt_k[c] + biases[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < kTile; ++c) dt_k[c] += biases[c];
    }
  }
}

// One chunk of `steps` steps of a tile: advances the states h [n][lane] with rates A [n][lane] and
// writes the pre-gate outputs ys [step][lane] = D u + sum_n C h. dts and us hold dt and u
// [step][lane]; b and c point at B_t,0 and C_t,0 of the chunk's first step (rows of nstate).
template <typename scalar_t>
void scan_chunk(scalar_t* h, const scalar_t* rates, int64_t nstate, const scalar_t* dts, scalar_t* us,
                const scalar_t* skips, const scalar_t* b, const scalar_t* c, int64_t steps, scalar_t* ys) {
  for (int64_t k = 0; k < steps; ++k) {
    const scalar_t* Bt = b + k * nstate;
    const scalar_t* Ct = c + k * nstate;
    const scalar_t* dt_k = dts + k * kTile;
    const scalar_t* u_k = us + k * kTile;
    scalar_t du_k[kTile], y[kTile];
#pragma omp simd
    for (int64_t lane = 0; lane < kTile; ++lane) {
      du_k[lane] = dt_k[lane] * u_k[lane];
      y[lane] = skips[lane] * u_k[lane];
    }
    for (int64_t n = 0; n < nstate; ++n) {
      scalar_t* hn = h + n * kTile;
      const scalar_t* an = rates + n * kTile;
      const scalar_t bn = Bt[n], cn = Ct[n];
#pragma omp simd
      for (int64_t lane = 0; lane < kTile; ++lane) {
        hn[lane] = decay_exp(dt_k[lane] * an[lane]) * hn[lane] + du_k[lane] * bn;
        y[lane] += cn * hn[lane];
      }
    }
#pragma omp simd
    for (int64_t lane = 0; lane < kTile; ++lane) ys[k * kTile + lane] = y[lane];
  }
}

// The backward's outputs, allocated once and filled by the kernels: the (B, D, L) gradients and the
// partial sums that `reduced()` adds up (dA, dD, ddelta_bias per batch row; dB, dC per thread, since
// each thread accumulates the channels of a group into its own buffer).
struct Gradients {
  at::Tensor du, ddelta, dz;                 // (B, D, L); dz undefined without a gate
  at::Tensor dA_per_batch, dh0;              // (B, D, N)
  at::Tensor dB_per_thread, dC_per_thread;   // (threads, B, G, L, N), zero-initialised
  at::Tensor dD_per_batch, dbias_per_batch;  // (B, D)

  // The partial sums for `threads` threads; du, ddelta, dz are set by the caller in its layout.
  static Gradients allocate(const at::Tensor& u, const at::Tensor& A, const at::Tensor& Bm, int64_t threads) {
    const int64_t batch = u.size(0), dim = u.size(1), nstate = A.size(1);
    std::vector<int64_t> per_thread_shape{threads};
    for (auto size : Bm.sizes()) per_thread_shape.push_back(size);
    Gradients grads;
    grads.dA_per_batch = at::empty({batch, dim, nstate}, u.options());
    grads.dh0 = at::empty({batch, dim, nstate}, u.options());
    grads.dD_per_batch = at::empty({batch, dim}, u.options());
    grads.dbias_per_batch = at::empty({batch, dim}, u.options());
    grads.dB_per_thread = at::zeros(per_thread_shape, u.options());
    grads.dC_per_thread = at::zeros(per_thread_shape, u.options());
    return grads;
  }

  // du, ddelta, dA, dB, dC, dh0, dD, ddelta_bias, dz: the order the Python side unpacks.
  std::vector<at::Tensor> reduced() const {
    return {du, ddelta, dA_per_batch.sum(0), dB_per_thread.sum(0), dC_per_thread.sum(0), dh0,
            dD_per_batch.sum(0), dbias_per_batch.sum(0), dz};
  }
};

}  // namespace
