// Selective scan (Mamba-1, Gu & Dao 2023, Algorithm 2) on the CPU, with its elementwise work fused.
//
// Legend: B batch, D channels, L length, N state size, G groups of channels sharing B and C,
// K chunk length (states are checkpointed every K steps for the backward pass).
//
//   dt_t = softplus(delta_t + delta_bias)              (bias and softplus optional)
//   h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t        (B, D, N)
//   y_t  = sum_n C_t,n h_t,n + D u_t                   (B, D), D optional
//   out  = y_t * SiLU(z_t)                             (gate optional)
//
// Channel d reads group g = d / (D / G) of B and C. B and C come as (B, G, L, N). Forward: one task
// per tile of 16 channels of one (batch, group), vectorised across the tile's channels (see
// forward_kernel); u, delta, z and out may have any strides. The per-(d, t) scalars (softplus, skip,
// gate) are computed in the same pass, so no (B, D, L) intermediate is written.
//
// In float on an AVX-512 build (avx512_math.h) the forward is written with intrinsics, because it is
// bound by the B D L N evaluations of exp(dt A): one register holds a state of the whole tile, a
// chunk runs 8 states at a time (independent recurrences, so their exps overlap), exp is a 10-
// instruction 2^x (1 ulp), softplus has a vector form, and (B, D, L) rows are transposed in
// 16 x 16 register blocks. Elsewhere (double, other CPUs, -DSEQARCH_PORTABLE_KERNELS) the same
// steps run as plain loops that the compiler vectorises.
//
// Backward: a reverse pass over time per (batch, channel). Forward stores the state entering
// each chunk (B, D, L/K, N); backward recomputes the K states of a chunk, their dt and the
// pre-gate outputs y_t from it into local buffers, then walks the chunk backwards with the
// adjoint g_t = dL/dh_t and dy_t = dout_t SiLU(z_t) (dout_t without the gate):
//   g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
//   dB_t += g_t dt_t u_t,  dC_t += dy_t h_t,  du_t = dt_t sum_n g_t B_t + D dy_t,
//   ddt_t = sum_n g_t (B_t u_t + A exp(dt_t A) h_{t-1}),  dA += g_t dt_t exp(dt_t A) h_{t-1}
//   ddelta_t = ddt_t sigmoid(delta_t + delta_bias) (softplus' ), ddelta_bias = sum_t ddelta_t,
//   dD = sum_t dy_t u_t,  dz_t = dout_t y_t sigmoid(z_t) (1 + z_t (1 - sigmoid(z_t)))
// dB and dC are sums over the channels of a group; each thread accumulates into its own
// (B, G, L, N) buffer and the buffers are summed at the end (memory O(threads B G L N)).
// dA, dD and ddelta_bias are written per (batch, channel) and summed over the batch at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "avx512_math.h"
#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using seqarch_kernels::data_or_null;
using seqarch_kernels::value_or_undefined;
using seqarch_kernels::decay_exp;
using seqarch_kernels::sigmoid;

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

#if SEQARCH_AVX512
// Float tiles of 16 channels whose rows run along time (u, delta, out of (B, D, L)) move in 16 x 16
// blocks through registers; other layouts and the ragged ends take the element loops above.
void gather_tile(const float* src, const Strides& st, int64_t width, int64_t steps, float* buffer) {
  if (st.time != 1 || width != kTile) return gather_tile<float>(src, st, width, steps, buffer);
  int64_t k0 = 0;
  for (; k0 + kTile <= steps; k0 += kTile) {
    __m512 block[kTile];
    for (int64_t c = 0; c < kTile; ++c) block[c] = _mm512_loadu_ps(src + c * st.channel + k0);
    seqarch_kernels::transpose16(block);
    for (int64_t k = 0; k < kTile; ++k) _mm512_storeu_ps(buffer + (k0 + k) * kTile, block[k]);
  }
  gather_tile<float>(src + k0, st, width, steps - k0, buffer + k0 * kTile);
}

void scatter_tile(const float* buffer, const Strides& st, int64_t width, int64_t steps, float* dst) {
  if (st.time != 1 || width != kTile) return scatter_tile<float>(buffer, st, width, steps, dst);
  int64_t k0 = 0;
  for (; k0 + kTile <= steps; k0 += kTile) {
    __m512 block[kTile];
    for (int64_t k = 0; k < kTile; ++k) block[k] = _mm512_loadu_ps(buffer + (k0 + k) * kTile);
    seqarch_kernels::transpose16(block);
    for (int64_t c = 0; c < kTile; ++c) _mm512_storeu_ps(dst + c * st.channel + k0, block[c]);
  }
  scatter_tile<float>(buffer + k0 * kTile, st, width, steps - k0, dst + k0);
}
#endif

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

#if SEQARCH_AVX512
void dt_tile(float* dts, const float* biases, int64_t steps, bool use_softplus) {
  const __m512 bias = _mm512_loadu_ps(biases);
  for (int64_t k = 0; k < steps; ++k) {
    const __m512 dt = _mm512_add_ps(_mm512_loadu_ps(dts + k * kTile), bias);
    _mm512_storeu_ps(dts + k * kTile, use_softplus ? seqarch_kernels::softplus_ps(dt) : dt);
  }
}
#endif

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

#if SEQARCH_AVX512
// S states of a float tile through the chunk, one register of 16 lanes per state: the S
// recurrences are independent, so their exp evaluations overlap. y [step][lane] accumulates. The
// forward advances h in place; the backward (Keep) leaves h, its checkpoint, as it is and keeps every
// state and decay at [step][n][lane] in rows of `padded` states instead.
template <int S, bool Keep = false>
void scan_states(float* h, const float* rates, int64_t nstate, const float* dts, const float* dus,
                 const float* b, const float* c, int64_t steps, float* ys, float* states = nullptr,
                 float* decays = nullptr, int64_t padded = 0) {
  __m512 state[S], rate[S];  // rate in log2 units: exp(dt A) = 2^(dt A log2 e)
  for (int s = 0; s < S; ++s) {
    state[s] = _mm512_loadu_ps(h + s * kTile);
    rate[s] = _mm512_mul_ps(_mm512_loadu_ps(rates + s * kTile), _mm512_set1_ps(seqarch_kernels::kLog2e));
  }
  for (int64_t k = 0; k < steps; ++k) {
    const __m512 dt = _mm512_loadu_ps(dts + k * kTile), du = _mm512_loadu_ps(dus + k * kTile);
    __m512 y = _mm512_loadu_ps(ys + k * kTile);
    for (int s = 0; s < S; ++s) {
      const __m512 decay = seqarch_kernels::exp2_ps(_mm512_mul_ps(dt, rate[s]));
      state[s] = _mm512_fmadd_ps(decay, state[s], _mm512_mul_ps(du, _mm512_set1_ps(b[k * nstate + s])));
      if constexpr (Keep) {
        _mm512_storeu_ps(decays + (k * padded + s) * kTile, decay);
        _mm512_storeu_ps(states + (k * padded + s) * kTile, state[s]);
      }
      y = _mm512_fmadd_ps(_mm512_set1_ps(c[k * nstate + s]), state[s], y);
    }
    _mm512_storeu_ps(ys + k * kTile, y);
  }
  if constexpr (!Keep) {
    for (int s = 0; s < S; ++s) _mm512_storeu_ps(h + s * kTile, state[s]);
  }
}

// The float chunk walks the states in the outer loop, 8 at a time, so a state's rate stays in a
// register over the chunk; us becomes dt u in place.
void scan_chunk(float* h, const float* rates, int64_t nstate, const float* dts, float* us, const float* skips,
                const float* b, const float* c, int64_t steps, float* ys) {
  const __m512 skip = _mm512_loadu_ps(skips);
  for (int64_t k = 0; k < steps; ++k) {
    const __m512 u = _mm512_loadu_ps(us + k * kTile);
    _mm512_storeu_ps(ys + k * kTile, _mm512_mul_ps(skip, u));
    _mm512_storeu_ps(us + k * kTile, _mm512_mul_ps(_mm512_loadu_ps(dts + k * kTile), u));
  }
  int64_t n = 0;
  for (; n + 8 <= nstate; n += 8) scan_states<8>(h + n * kTile, rates + n * kTile, nstate, dts, us, b + n, c + n, steps, ys);
  for (; n + 4 <= nstate; n += 4) scan_states<4>(h + n * kTile, rates + n * kTile, nstate, dts, us, b + n, c + n, steps, ys);
  for (; n < nstate; ++n) scan_states<1>(h + n * kTile, rates + n * kTile, nstate, dts, us, b + n, c + n, steps, ys);
}
#endif

template <typename scalar_t>
void forward_kernel(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                    const at::Tensor& Cm, const Elementwise<scalar_t>& ew, const at::Tensor& z,
                    const at::Tensor& h0, at::Tensor& out, at::Tensor& h_last, at::Tensor& checkpoints,
                    int64_t chunk) {
  const Tiles tiles(u, A, Bm);
  const int64_t dim = tiles.dim, len = tiles.len, nstate = tiles.nstate, groups = tiles.groups;
  const int64_t nchunks = checkpoints.size(2);
  const Strides u_st = strides_of(u), delta_st = strides_of(delta), out_st = strides_of(out);
  const Strides z_st = z.defined() ? strides_of(z) : Strides{0, 0, 0};
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* delta_p = delta.data_ptr<scalar_t>();
  const scalar_t* A_p = A.data_ptr<scalar_t>();
  const scalar_t* B_p = Bm.data_ptr<scalar_t>();
  const scalar_t* C_p = Cm.data_ptr<scalar_t>();
  const scalar_t* h0_p = data_or_null<scalar_t>(h0);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* hl_p = h_last.data_ptr<scalar_t>();
  scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();

  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    // [n][lane]: states and rates A; [step][lane]: the chunk's per-step scalars.
    std::vector<scalar_t> h(nstate * kTile), rates(nstate * kTile), biases(kTile), skips(kTile);
    std::vector<scalar_t> us(chunk * kTile), dts(chunk * kTile), gates(chunk * kTile), ys(chunk * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const Tiles::Tile tile = tiles[task];
      const int64_t b = tile.b, g = tile.g, first = tile.first, width = tile.width;
      const scalar_t* B_rows = B_p + (b * groups + g) * len * nstate;
      const scalar_t* C_rows = C_p + (b * groups + g) * len * nstate;
      std::fill(us.begin(), us.end(), scalar_t(0));
      std::fill(dts.begin(), dts.end(), scalar_t(0));
      for (int64_t c = 0; c < kTile; ++c) {
        const bool lane = c < width;
        biases[c] = lane && ew.delta_bias ? ew.delta_bias[first + c] : scalar_t(0);
        skips[c] = lane && ew.D ? ew.D[first + c] : scalar_t(0);
        for (int64_t n = 0; n < nstate; ++n) {
          const int64_t row = b * dim + first + c;
          h[n * kTile + c] = lane && h0_p ? h0_p[row * nstate + n] : scalar_t(0);
          rates[n * kTile + c] = lane ? A_p[(first + c) * nstate + n] : scalar_t(0);
        }
      }
      for (int64_t ci = 0; ci < nchunks; ++ci) {
        const int64_t start = ci * chunk, steps = std::min(len, start + chunk) - start;
        for (int64_t c = 0; c < width; ++c) {
          scalar_t* ck = ck_p + ((b * dim + first + c) * nchunks + ci) * nstate;
          for (int64_t n = 0; n < nstate; ++n) ck[n] = h[n * kTile + c];
        }
        const auto at = [&](const Strides& st) { return b * st.batch + first * st.channel + start * st.time; };
        gather_tile(u_p + at(u_st), u_st, width, steps, us.data());
        gather_tile(delta_p + at(delta_st), delta_st, width, steps, dts.data());
        dt_tile(dts.data(), biases.data(), steps, ew.use_softplus);
        scan_chunk(h.data(), rates.data(), nstate, dts.data(), us.data(), skips.data(), B_rows + start * nstate,
                   C_rows + start * nstate, steps, ys.data());
        if (ew.z) {
          gather_tile(ew.z + at(z_st), z_st, width, steps, gates.data());
#pragma omp simd
          for (int64_t i = 0; i < steps * kTile; ++i) ys[i] *= gates[i] * sigmoid(gates[i]);
        }
        scatter_tile(ys.data(), out_st, width, steps, out_p + at(out_st));
      }
      for (int64_t c = 0; c < width; ++c) {
        for (int64_t n = 0; n < nstate; ++n) hl_p[(b * dim + first + c) * nstate + n] = h[n * kTile + c];
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                     const at::Tensor& Cm, const Elementwise<scalar_t>& ew, const at::Tensor& checkpoints,
                     const at::Tensor& dout, const at::Tensor& dh_last, at::Tensor& du, at::Tensor& ddelta,
                     at::Tensor& dA_per_batch, at::Tensor& dB_per_thread, at::Tensor& dC_per_thread,
                     at::Tensor& dh0, at::Tensor& dD_per_batch, at::Tensor& dbias_per_batch, at::Tensor& dz,
                     int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1), groups = Bm.size(1);
  const int64_t per_group = dim / groups, nchunks = checkpoints.size(2);
  const int64_t thread_stride = batch * groups * len * nstate;
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* delta_p = delta.data_ptr<scalar_t>();
  const scalar_t* A_p = A.data_ptr<scalar_t>();
  const scalar_t* B_p = Bm.data_ptr<scalar_t>();
  const scalar_t* C_p = Cm.data_ptr<scalar_t>();
  const scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();
  const scalar_t* dout_p = dout.data_ptr<scalar_t>();
  const scalar_t* dhl_p = data_or_null<scalar_t>(dh_last);
  scalar_t* du_p = du.data_ptr<scalar_t>();
  scalar_t* ddelta_p = ddelta.data_ptr<scalar_t>();
  scalar_t* dA_p = dA_per_batch.data_ptr<scalar_t>();
  scalar_t* dBt_p = dB_per_thread.data_ptr<scalar_t>();
  scalar_t* dCt_p = dC_per_thread.data_ptr<scalar_t>();
  scalar_t* dh0_p = dh0.data_ptr<scalar_t>();
  scalar_t* dD_p = dD_per_batch.data_ptr<scalar_t>();
  scalar_t* dbias_p = dbias_per_batch.data_ptr<scalar_t>();
  scalar_t* dz_p = ew.z ? dz.data_ptr<scalar_t>() : nullptr;
  const int64_t max_threads = dB_per_thread.size(0);

  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = std::min<int64_t>(at::get_thread_num(), max_threads - 1);
    std::vector<scalar_t> g(nstate), dA_acc(nstate), states(chunk * nstate), decays(chunk * nstate);
    std::vector<scalar_t> dts(chunk), outputs(chunk), z_sigmoids(chunk), dt_slopes(chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim, d = task % dim, grp = d / per_group;
      const scalar_t* u_row = u_p + task * len;
      const scalar_t* delta_row = delta_p + task * len;
      const scalar_t* z_row = ew.z ? ew.z + task * len : nullptr;
      const scalar_t* dout_row = dout_p + task * len;
      const scalar_t skip = ew.D ? ew.D[d] : scalar_t(0);
      const scalar_t bias = ew.delta_bias ? ew.delta_bias[d] : scalar_t(0);
      const scalar_t* A_row = A_p + d * nstate;
      const int64_t rows = (b * groups + grp) * len * nstate;
      const scalar_t* B_rows = B_p + rows;
      const scalar_t* C_rows = C_p + rows;
      scalar_t* dB_rows = dBt_p + thread * thread_stride + rows;
      scalar_t* dC_rows = dCt_p + thread * thread_stride + rows;
      scalar_t* du_row = du_p + task * len;
      scalar_t* ddelta_row = ddelta_p + task * len;
      scalar_t* dz_row = dz_p ? dz_p + task * len : nullptr;
      scalar_t* gp = g.data();
      scalar_t* dAp = dA_acc.data();
      scalar_t dD_acc = 0, dbias_acc = 0;
      for (int64_t n = 0; n < nstate; ++n) {
        gp[n] = dhl_p ? dhl_p[task * nstate + n] : scalar_t(0);
        dAp[n] = 0;
      }
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const scalar_t* ck = ck_p + (task * nchunks + c) * nstate;
        const int64_t start = c * chunk, stop = std::min(len, start + chunk);
        // Recompute the chunk's dt, states, decays and pre-gate outputs from the checkpoint; the
        // per-step scalars sigmoid(z) and softplus'(delta + bias) in vectorisable loops first.
        ew.dt_rows(delta_row, d, start, stop, dts.data());
        if (z_row) {
#pragma omp simd
          for (int64_t t = start; t < stop; ++t) z_sigmoids[t - start] = sigmoid(z_row[t]);
        }
        if (ew.use_softplus) {
#pragma omp simd
          for (int64_t t = start; t < stop; ++t) dt_slopes[t - start] = sigmoid(delta_row[t] + bias);
        }
        for (int64_t t = start; t < stop; ++t) {
          const int64_t k = t - start;
          const scalar_t dtv = dts[k], duv = dtv * u_row[t];
          const scalar_t* Bt = B_rows + t * nstate;
          const scalar_t* Ct = C_rows + t * nstate;
          const scalar_t* prev = k ? states.data() + (k - 1) * nstate : ck;
          scalar_t* cur = states.data() + k * nstate;
          scalar_t* dec = decays.data() + k * nstate;
          scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < nstate; ++n) {
            dec[n] = decay_exp(dtv * A_row[n]);
            cur[n] = dec[n] * prev[n] + duv * Bt[n];
            acc += Ct[n] * cur[n];
          }
          outputs[k] = acc + skip * u_row[t];
        }
        // Walk the chunk backwards; g holds exp(dt_{t+1} A) g_{t+1} on entry.
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t k = t - start;
          const scalar_t dtv = dts[k], uv = u_row[t];
          scalar_t dyv = dout_row[t];
          if (z_row) {
            const scalar_t zv = z_row[t], sig = z_sigmoids[k];
            dz_row[t] = dyv * outputs[k] * sig * (scalar_t(1) + zv * (scalar_t(1) - sig));
            dyv *= zv * sig;
          }
          const scalar_t* Bt = B_rows + t * nstate;
          const scalar_t* Ct = C_rows + t * nstate;
          const scalar_t* prev = k ? states.data() + (k - 1) * nstate : ck;
          const scalar_t* cur = states.data() + k * nstate;
          const scalar_t* dec = decays.data() + k * nstate;
          scalar_t* dBt = dB_rows + t * nstate;
          scalar_t* dCt = dC_rows + t * nstate;
          scalar_t du_acc = 0, ddt_acc = 0;
#pragma omp simd reduction(+ : du_acc, ddt_acc)
          for (int64_t n = 0; n < nstate; ++n) {
            const scalar_t gn = gp[n] + dyv * Ct[n];
            const scalar_t decayed_prev = dec[n] * prev[n];
            dBt[n] += gn * dtv * uv;
            dCt[n] += dyv * cur[n];
            du_acc += gn * Bt[n];
            ddt_acc += gn * (Bt[n] * uv + A_row[n] * decayed_prev);
            dAp[n] += gn * dtv * decayed_prev;
            gp[n] = dec[n] * gn;
          }
          du_row[t] = du_acc * dtv + skip * dyv;
          dD_acc += dyv * uv;
          const scalar_t ddelta_v = ew.use_softplus ? ddt_acc * dt_slopes[k] : ddt_acc;
          ddelta_row[t] = ddelta_v;
          dbias_acc += ddelta_v;
        }
      }
      for (int64_t n = 0; n < nstate; ++n) {
        dh0_p[task * nstate + n] = gp[n];
        dA_p[task * nstate + n] = dAp[n];
      }
      dD_p[task] = dD_acc;
      dbias_p[task] = dbias_acc;
    }
  });
}

#if SEQARCH_AVX512
// Backward in float with AVX-512, on the forward's tiles (16 channels of one (batch, group); u,
// delta, z, dout read and du, ddelta, dz written with any strides), chunk by chunk in reverse:
// gather the chunk, recompute dt, every state and decay ([step][n][lane], from the checkpoint) and
// the pre-gate outputs, then run the adjoint recurrence backwards over the steps. All of it is
// lane-wise (per channel) except dB and dC, which sum over the tile's channels: a step's per-lane
// products for 16 states are reduced together by lane_sums16.
void backward_tiles(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                    const at::Tensor& Cm, const Elementwise<float>& ew, const at::Tensor& z,
                    const at::Tensor& checkpoints, const at::Tensor& dout, const at::Tensor& dh_last, at::Tensor& du,
                    at::Tensor& ddelta, at::Tensor& dA_per_batch, at::Tensor& dB_per_thread,
                    at::Tensor& dC_per_thread, at::Tensor& dh0, at::Tensor& dD_per_batch,
                    at::Tensor& dbias_per_batch, at::Tensor& dz, int64_t chunk) {
  const Tiles tiles(u, A, Bm);
  const int64_t dim = tiles.dim, len = tiles.len, nstate = tiles.nstate, groups = tiles.groups;
  const int64_t nchunks = checkpoints.size(2);
  const int64_t blocks = (nstate + kTile - 1) / kTile, padded = blocks * kTile;
  const int64_t thread_stride = tiles.batch * groups * len * nstate, max_threads = dB_per_thread.size(0);
  const Strides u_st = strides_of(u), delta_st = strides_of(delta), dout_st = strides_of(dout);
  const Strides z_st = z.defined() ? strides_of(z) : Strides{0, 0, 0};
  const Strides du_st = strides_of(du), ddelta_st = strides_of(ddelta);
  const Strides dz_st = dz.defined() ? strides_of(dz) : Strides{0, 0, 0};
  const float* u_p = u.data_ptr<float>();
  const float* delta_p = delta.data_ptr<float>();
  const float* dout_p = dout.data_ptr<float>();
  const float* A_p = A.data_ptr<float>();
  const float* B_p = Bm.data_ptr<float>();
  const float* C_p = Cm.data_ptr<float>();
  const float* ck_p = checkpoints.data_ptr<float>();
  const float* dhl_p = data_or_null<float>(dh_last);
  float* du_p = du.data_ptr<float>();
  float* ddelta_p = ddelta.data_ptr<float>();
  float* dz_p = ew.z ? dz.data_ptr<float>() : nullptr;
  float* dA_p = dA_per_batch.data_ptr<float>();
  float* dBt_p = dB_per_thread.data_ptr<float>();
  float* dCt_p = dC_per_thread.data_ptr<float>();
  float* dh0_p = dh0.data_ptr<float>();
  float* dD_p = dD_per_batch.data_ptr<float>();
  float* dbias_p = dbias_per_batch.data_ptr<float>();
  const __m512 zero = _mm512_setzero_ps();

  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = std::min<int64_t>(at::get_thread_num(), max_threads - 1);
    // [n][lane]: rates A, the adjoint g, dA, the state entering the chunk
    std::vector<float> rates(padded * kTile), adjoint(padded * kTile), dA_acc(padded * kTile), entry(padded * kTile);
    // [step][lane]
    std::vector<float> us(chunk * kTile), deltas(chunk * kTile), dts(chunk * kTile), slopes(chunk * kTile);
    std::vector<float> dus(chunk * kTile), zs(chunk * kTile), douts(chunk * kTile), ys(chunk * kTile);
    std::vector<float> dys(chunk * kTile), du_out(chunk * kTile), ddelta_out(chunk * kTile), dz_out(chunk * kTile);
    // [step][n][lane]
    std::vector<float> states(chunk * padded * kTile), decays(chunk * padded * kTile);
    float biases[kTile], skips[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const Tiles::Tile tile = tiles[task];
      const int64_t b = tile.b, g = tile.g, first = tile.first, width = tile.width;
      const int64_t rows = (b * groups + g) * len * nstate;
      const float* B_rows = B_p + rows;
      const float* C_rows = C_p + rows;
      float* dB_rows = dBt_p + thread * thread_stride + rows;
      float* dC_rows = dCt_p + thread * thread_stride + rows;
      for (auto* buffer : {&us, &deltas, &zs, &douts, &rates, &adjoint, &dA_acc, &entry})
        std::fill(buffer->begin(), buffer->end(), 0.0f);
      for (int64_t c = 0; c < kTile; ++c) {
        const bool lane = c < width;
        biases[c] = lane && ew.delta_bias ? ew.delta_bias[first + c] : 0.0f;
        skips[c] = lane && ew.D ? ew.D[first + c] : 0.0f;
        if (!lane) continue;
        for (int64_t n = 0; n < nstate; ++n) {
          rates[n * kTile + c] = A_p[(first + c) * nstate + n];
          if (dhl_p) adjoint[n * kTile + c] = dhl_p[(b * dim + first + c) * nstate + n];
        }
      }
      __m512 dD_acc = zero, dbias_acc = zero;
      for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
        const int64_t start = ci * chunk, steps = std::min(len, start + chunk) - start;
        const auto at = [&](const Strides& st) { return b * st.batch + first * st.channel + start * st.time; };
        gather_tile(u_p + at(u_st), u_st, width, steps, us.data());
        gather_tile(delta_p + at(delta_st), delta_st, width, steps, deltas.data());
        gather_tile(dout_p + at(dout_st), dout_st, width, steps, douts.data());
        if (ew.z) gather_tile(ew.z + at(z_st), z_st, width, steps, zs.data());
        for (int64_t c = 0; c < width; ++c) {
          const float* ck = ck_p + ((b * dim + first + c) * nchunks + ci) * nstate;
          for (int64_t n = 0; n < nstate; ++n) entry[n * kTile + c] = ck[n];
        }
        // dt, softplus' (sigmoid) and dt u per step; y starts at the skip term D u.
        const __m512 bias = _mm512_loadu_ps(biases), skip = _mm512_loadu_ps(skips);
        for (int64_t k = 0; k < steps; ++k) {
          const __m512 shifted = _mm512_add_ps(_mm512_loadu_ps(deltas.data() + k * kTile), bias);
          const __m512 dt = ew.use_softplus ? seqarch_kernels::softplus_ps(shifted) : shifted;
          const __m512 uv = _mm512_loadu_ps(us.data() + k * kTile);
          if (ew.use_softplus) _mm512_storeu_ps(slopes.data() + k * kTile, seqarch_kernels::sigmoid_ps(shifted));
          _mm512_storeu_ps(dts.data() + k * kTile, dt);
          _mm512_storeu_ps(dus.data() + k * kTile, _mm512_mul_ps(dt, uv));
          _mm512_storeu_ps(ys.data() + k * kTile, _mm512_mul_ps(skip, uv));
        }
        int64_t n = 0;
        const float* B_chunk = B_rows + start * nstate;
        const float* C_chunk = C_rows + start * nstate;
        for (; n + 8 <= nstate; n += 8)
          scan_states<8, true>(entry.data() + n * kTile, rates.data() + n * kTile, nstate, dts.data(), dus.data(),
                               B_chunk + n, C_chunk + n, steps, ys.data(), states.data() + n * kTile,
                               decays.data() + n * kTile, padded);
        for (; n < nstate; ++n)
          scan_states<1, true>(entry.data() + n * kTile, rates.data() + n * kTile, nstate, dts.data(), dus.data(),
                               B_chunk + n, C_chunk + n, steps, ys.data(), states.data() + n * kTile,
                               decays.data() + n * kTile, padded);
        // The gate: dz = dout y sigmoid(z) (1 + z (1 - sigmoid(z))), dy = dout SiLU(z); dD sums dy u.
        for (int64_t k = 0; k < steps; ++k) {
          __m512 dy = _mm512_loadu_ps(douts.data() + k * kTile);
          if (ew.z) {
            const __m512 zv = _mm512_loadu_ps(zs.data() + k * kTile), sig = seqarch_kernels::sigmoid_ps(zv);
            const __m512 slope = _mm512_fmadd_ps(zv, _mm512_sub_ps(_mm512_set1_ps(1.0f), sig), _mm512_set1_ps(1.0f));
            const __m512 y = _mm512_loadu_ps(ys.data() + k * kTile);
            _mm512_storeu_ps(dz_out.data() + k * kTile, _mm512_mul_ps(_mm512_mul_ps(dy, y), _mm512_mul_ps(sig, slope)));
            dy = _mm512_mul_ps(dy, _mm512_mul_ps(zv, sig));
          }
          _mm512_storeu_ps(dys.data() + k * kTile, dy);
          dD_acc = _mm512_fmadd_ps(dy, _mm512_loadu_ps(us.data() + k * kTile), dD_acc);
        }
        // The adjoint, backwards over the chunk; adjoint holds exp(dt_{t+1} A) g_{t+1} on entry.
        for (int64_t k = steps - 1; k >= 0; --k) {
          const int64_t t = start + k;
          const __m512 dt = _mm512_loadu_ps(dts.data() + k * kTile), uv = _mm512_loadu_ps(us.data() + k * kTile);
          const __m512 dtu = _mm512_loadu_ps(dus.data() + k * kTile), dy = _mm512_loadu_ps(dys.data() + k * kTile);
          const float* prev_states = k ? states.data() + (k - 1) * padded * kTile : entry.data();
          __m512 du_acc = zero, ddt_acc = zero;
          for (int64_t block = 0; block < blocks; ++block) {
            __m512 to_dB[kTile], to_dC[kTile];
            for (int64_t j = 0; j < kTile; ++j) {
              const int64_t m = block * kTile + j;
              if (m >= nstate) {
                to_dB[j] = to_dC[j] = zero;
                continue;
              }
              const __m512 bn = _mm512_set1_ps(B_rows[t * nstate + m]), cn = _mm512_set1_ps(C_rows[t * nstate + m]);
              const __m512 gn = _mm512_fmadd_ps(dy, cn, _mm512_loadu_ps(adjoint.data() + m * kTile));
              const __m512 decay = _mm512_loadu_ps(decays.data() + (k * padded + m) * kTile);
              const __m512 decayed_prev = _mm512_mul_ps(decay, _mm512_loadu_ps(prev_states + m * kTile));
              to_dB[j] = _mm512_mul_ps(gn, dtu);
              to_dC[j] = _mm512_mul_ps(dy, _mm512_loadu_ps(states.data() + (k * padded + m) * kTile));
              du_acc = _mm512_fmadd_ps(gn, bn, du_acc);
              const __m512 rate = _mm512_loadu_ps(rates.data() + m * kTile);
              ddt_acc = _mm512_fmadd_ps(gn, _mm512_fmadd_ps(rate, decayed_prev, _mm512_mul_ps(bn, uv)), ddt_acc);
              float* dA_m = dA_acc.data() + m * kTile;
              _mm512_storeu_ps(dA_m, _mm512_fmadd_ps(_mm512_mul_ps(gn, dt), decayed_prev, _mm512_loadu_ps(dA_m)));
              _mm512_storeu_ps(adjoint.data() + m * kTile, _mm512_mul_ps(decay, gn));
            }
            const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(kTile, nstate - block * kTile)) - 1u);
            float* dB_t = dB_rows + t * nstate + block * kTile;
            float* dC_t = dC_rows + t * nstate + block * kTile;
            _mm512_mask_storeu_ps(dB_t, valid, _mm512_add_ps(_mm512_maskz_loadu_ps(valid, dB_t), seqarch_kernels::lane_sums16(to_dB)));
            _mm512_mask_storeu_ps(dC_t, valid, _mm512_add_ps(_mm512_maskz_loadu_ps(valid, dC_t), seqarch_kernels::lane_sums16(to_dC)));
          }
          _mm512_storeu_ps(du_out.data() + k * kTile, _mm512_fmadd_ps(du_acc, dt, _mm512_mul_ps(skip, dy)));
          const __m512 ddelta_k = ew.use_softplus ? _mm512_mul_ps(ddt_acc, _mm512_loadu_ps(slopes.data() + k * kTile)) : ddt_acc;
          _mm512_storeu_ps(ddelta_out.data() + k * kTile, ddelta_k);
          dbias_acc = _mm512_add_ps(dbias_acc, ddelta_k);
        }
        scatter_tile(du_out.data(), du_st, width, steps, du_p + at(du_st));
        scatter_tile(ddelta_out.data(), ddelta_st, width, steps, ddelta_p + at(ddelta_st));
        if (ew.z) scatter_tile(dz_out.data(), dz_st, width, steps, dz_p + at(dz_st));
      }
      float dD_lanes[kTile], dbias_lanes[kTile];
      _mm512_storeu_ps(dD_lanes, dD_acc);
      _mm512_storeu_ps(dbias_lanes, dbias_acc);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t row = b * dim + first + c;
        for (int64_t n = 0; n < nstate; ++n) {
          dh0_p[row * nstate + n] = adjoint[n * kTile + c];
          dA_p[row * nstate + n] = dA_acc[n * kTile + c];
        }
        dD_p[row] = dD_lanes[c];
        dbias_p[row] = dbias_lanes[c];
      }
    }
  });
}
#endif

int64_t num_chunks(int64_t len, int64_t chunk) { return (len + chunk - 1) / chunk; }

template <typename scalar_t>
Elementwise<scalar_t> elementwise(const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
                                  bool use_softplus) {
  return {data_or_null<scalar_t>(D), data_or_null<scalar_t>(z), data_or_null<scalar_t>(delta_bias), use_softplus};
}

std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
                                const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                bool use_softplus, const c10::optional<at::Tensor>& h0, int64_t chunk,
                                bool channel_last_out) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1);
  auto out = channel_last_out ? at::empty({batch, len, dim}, u.options()).transpose(1, 2) : at::empty_like(
      u, at::MemoryFormat::Contiguous);
  auto h_last = at::empty({batch, dim, nstate}, u.options());
  auto checkpoints = at::empty({batch, dim, num_chunks(len, chunk), nstate}, u.options());
  const at::Tensor D_t = value_or_undefined(D), z_t = value_or_undefined(z), bias_t = value_or_undefined(delta_bias);
  const at::Tensor h0_t = value_or_undefined(h0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    const auto ew = elementwise<scalar_t>(D_t, z_t, bias_t, use_softplus);
    forward_kernel<scalar_t>(u, delta, A, Bm, Cm, ew, z_t, h0_t, out, h_last, checkpoints, chunk);
  });
  return {out, h_last, checkpoints};
}

// (B, D, L) gradients laid out like `like`: channel-last when it is, so the layer's backward needs no
// transposing copy.
at::Tensor empty_in_layout(const at::Tensor& like) {
  const bool channel_last = like.size(1) > 1 && like.stride(1) == 1;
  return channel_last ? at::empty({like.size(0), like.size(2), like.size(1)}, like.options()).transpose(1, 2)
                      : at::empty(like.sizes(), like.options());
}

std::vector<at::Tensor> backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                 bool use_softplus, const at::Tensor& checkpoints, const at::Tensor& dout,
                                 const c10::optional<at::Tensor>& dh_last, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), nstate = A.size(1);
  const int64_t threads = at::get_num_threads();
  const at::Tensor D_t = value_or_undefined(D), bias_t = value_or_undefined(delta_bias);
  const at::Tensor dhl = value_or_undefined(dh_last);
  auto dA_per_batch = at::empty({batch, dim, nstate}, u.options());
  auto dh0 = at::empty({batch, dim, nstate}, u.options());
  auto dD_per_batch = at::empty({batch, dim}, u.options());
  auto dbias_per_batch = at::empty({batch, dim}, u.options());
  std::vector<int64_t> per_thread_shape{threads};
  for (auto size : Bm.sizes()) per_thread_shape.push_back(size);
  auto dB_per_thread = at::zeros(per_thread_shape, u.options());
  auto dC_per_thread = at::zeros(per_thread_shape, u.options());
  at::Tensor du, ddelta, dz;
#if SEQARCH_AVX512
  if (u.scalar_type() == at::kFloat) {
    const at::Tensor z_t = value_or_undefined(z);
    du = empty_in_layout(u);
    ddelta = empty_in_layout(u);
    dz = z_t.defined() ? empty_in_layout(u) : at::Tensor();
    const auto ew = elementwise<float>(D_t, z_t, bias_t, use_softplus);
    backward_tiles(u, delta, A, Bm, Cm, ew, z_t, checkpoints, dout, dhl, du, ddelta, dA_per_batch, dB_per_thread,
                   dC_per_thread, dh0, dD_per_batch, dbias_per_batch, dz, chunk);
    return {du, ddelta, dA_per_batch.sum(0), dB_per_thread.sum(0), dC_per_thread.sum(0), dh0,
            dD_per_batch.sum(0), dbias_per_batch.sum(0), dz};
  }
#endif
  // The portable backward walks contiguous rows of (B, D, L).
  const at::Tensor u_rows = u.contiguous(), delta_rows = delta.contiguous(), dout_rows = dout.contiguous();
  const at::Tensor z_rows = z.has_value() ? z.value().contiguous() : at::Tensor();
  du = at::empty_like(u_rows);
  ddelta = at::empty_like(u_rows);
  dz = z_rows.defined() ? at::empty_like(u_rows) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    const auto ew = elementwise<scalar_t>(D_t, z_rows, bias_t, use_softplus);
    backward_kernel<scalar_t>(u_rows, delta_rows, A, Bm, Cm, ew, checkpoints, dout_rows, dhl, du, ddelta,
                              dA_per_batch, dB_per_thread, dC_per_thread, dh0, dD_per_batch, dbias_per_batch, dz,
                              chunk);
  });
  return {du, ddelta, dA_per_batch.sum(0), dB_per_thread.sum(0), dC_per_thread.sum(0), dh0,
          dD_per_batch.sum(0), dbias_per_batch.sum(0), dz};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("avx512") = bool(SEQARCH_AVX512);
  m.def("forward", &forward, "fused selective scan forward: out, h_last, chunk checkpoints");
  m.def("backward", &backward, "fused selective scan backward: du, ddelta, dA, dB, dC, dh0, dD, ddelta_bias, dz");
}
