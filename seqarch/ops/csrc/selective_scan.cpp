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
// dA, dD and ddelta_bias are written per (batch, channel) and summed over the batch at the end
// (the Gradients struct holds all of them).
//
// Files: selective_scan_tiles.h (tile layout, the portable per-tile loops, Gradients),
// selective_scan_avx512.h (the float paths with intrinsics), this file (forward and backward kernels
// over the tasks, the Python entry points).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "selective_scan_avx512.h"
#include "selective_scan_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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
                     const at::Tensor& dout, const at::Tensor& dh_last, Gradients& grads, int64_t chunk) {
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
  scalar_t* du_p = grads.du.data_ptr<scalar_t>();
  scalar_t* ddelta_p = grads.ddelta.data_ptr<scalar_t>();
  scalar_t* dA_p = grads.dA_per_batch.data_ptr<scalar_t>();
  scalar_t* dBt_p = grads.dB_per_thread.data_ptr<scalar_t>();
  scalar_t* dCt_p = grads.dC_per_thread.data_ptr<scalar_t>();
  scalar_t* dh0_p = grads.dh0.data_ptr<scalar_t>();
  scalar_t* dD_p = grads.dD_per_batch.data_ptr<scalar_t>();
  scalar_t* dbias_p = grads.dbias_per_batch.data_ptr<scalar_t>();
  scalar_t* dz_p = ew.z ? grads.dz.data_ptr<scalar_t>() : nullptr;
  const int64_t max_threads = grads.dB_per_thread.size(0);

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
  const at::Tensor D_t = value_or_undefined(D), bias_t = value_or_undefined(delta_bias);
  const at::Tensor dhl = value_or_undefined(dh_last);
  Gradients grads = Gradients::allocate(u, A, Bm, at::get_num_threads());
#if SEQARCH_AVX512
  if (u.scalar_type() == at::kFloat) {
    const at::Tensor z_t = value_or_undefined(z);
    grads.du = empty_in_layout(u);
    grads.ddelta = empty_in_layout(u);
    grads.dz = z_t.defined() ? empty_in_layout(u) : at::Tensor();
    const auto ew = elementwise<float>(D_t, z_t, bias_t, use_softplus);
    backward_tiles(u, delta, A, Bm, Cm, ew, z_t, checkpoints, dout, dhl, grads, chunk);
    return grads.reduced();
  }
#endif
  // The portable backward walks contiguous rows of (B, D, L).
  const at::Tensor u_rows = u.contiguous(), delta_rows = delta.contiguous(), dout_rows = dout.contiguous();
  const at::Tensor z_rows = z.has_value() ? z.value().contiguous() : at::Tensor();
  grads.du = at::empty_like(u_rows);
  grads.ddelta = at::empty_like(u_rows);
  grads.dz = z_rows.defined() ? at::empty_like(u_rows) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    const auto ew = elementwise<scalar_t>(D_t, z_rows, bias_t, use_softplus);
    backward_kernel<scalar_t>(u_rows, delta_rows, A, Bm, Cm, ew, checkpoints, dout_rows, dhl, grads, chunk);
  });
  return grads.reduced();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("avx512") = bool(SEQARCH_AVX512);
  m.def("forward", &forward, "fused selective scan forward: out, h_last, chunk checkpoints");
  m.def("backward", &backward, "fused selective scan backward: du, ddelta, dA, dB, dC, dh0, dD, ddelta_bias, dz");
}
