// Selective scan (Mamba-1, Gu & Dao 2023, Algorithm 2) on the CPU: the core recurrence only.
//
// Legend: B batch, D channels, L length, N state size, G groups of channels sharing B and C,
// K chunk length (states are checkpointed every K steps for the backward pass).
//
//   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t        (B, D, N)
//   y_t = sum_n C_t,n h_t,n                           (B, D)
//
// Channel d reads group g = d / (D / G) of B and C. B and C come as (B, G, L, N) so the state
// loop over n reads contiguous memory. One task per (batch, channel), the state in a local array,
// parallel over tasks with ATen's thread pool. D skip, SiLU(z) gate, delta_bias and softplus stay
// in PyTorch around this op (seqarch/ops/selective_scan.py).
//
// Backward: a reverse pass over time per (batch, channel). Forward stores the state entering
// each chunk (B, D, L/K, N); backward recomputes the K states of a chunk from it into a local
// buffer, then walks the chunk backwards with the adjoint g_t = dL/dh_t:
//   g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
//   dB_t += g_t dt_t u_t,  dC_t += dy_t h_t,  du_t = dt_t sum_n g_t B_t,
//   ddt_t = sum_n g_t (B_t u_t + A exp(dt_t A) h_{t-1}),  dA += g_t dt_t exp(dt_t A) h_{t-1}
// dB and dC are sums over the channels of a group; each thread accumulates into its own
// (B, G, L, N) buffer and the buffers are summed at the end (memory O(threads B G L N)).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp for float, inlined so the state loop vectorises without a call per vector: Cody-Waite
// reduction x = k ln2 + r, Cephes' degree-5 polynomial for exp(r) (about 1 ulp), times 2^k.
// The input is clamped to [-87, 88], so exp of a very negative decay exponent returns about 1e-38
// instead of 0, an absolute error far below float32 resolution of any state it multiplies.
inline float decay_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double decay_exp(double x) { return std::exp(x); }

template <typename scalar_t>
void forward_kernel(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                    const at::Tensor& Cm, const at::Tensor& h0, at::Tensor& y, at::Tensor& h_last,
                    at::Tensor& checkpoints, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1), groups = Bm.size(1);
  const int64_t per_group = dim / groups, nchunks = checkpoints.size(2);
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* dt_p = dt.data_ptr<scalar_t>();
  const scalar_t* A_p = A.data_ptr<scalar_t>();
  const scalar_t* B_p = Bm.data_ptr<scalar_t>();
  const scalar_t* C_p = Cm.data_ptr<scalar_t>();
  const scalar_t* h0_p = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
  scalar_t* y_p = y.data_ptr<scalar_t>();
  scalar_t* hl_p = h_last.data_ptr<scalar_t>();
  scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();

  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> h(nstate);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim, d = task % dim, g = d / per_group;
      const scalar_t* u_row = u_p + task * len;
      const scalar_t* dt_row = dt_p + task * len;
      const scalar_t* A_row = A_p + d * nstate;
      const scalar_t* B_rows = B_p + (b * groups + g) * len * nstate;
      const scalar_t* C_rows = C_p + (b * groups + g) * len * nstate;
      scalar_t* y_row = y_p + task * len;
      for (int64_t n = 0; n < nstate; ++n) h[n] = h0_p ? h0_p[task * nstate + n] : scalar_t(0);
      for (int64_t c = 0; c < nchunks; ++c) {
        scalar_t* ck = ck_p + (task * nchunks + c) * nstate;
        for (int64_t n = 0; n < nstate; ++n) ck[n] = h[n];
        const int64_t stop = std::min(len, (c + 1) * chunk);
        for (int64_t t = c * chunk; t < stop; ++t) {
          const scalar_t dtv = dt_row[t], du = dtv * u_row[t];
          const scalar_t* Bt = B_rows + t * nstate;
          const scalar_t* Ct = C_rows + t * nstate;
          scalar_t* hp = h.data();
          scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < nstate; ++n) {
            hp[n] = decay_exp(dtv * A_row[n]) * hp[n] + du * Bt[n];
            acc += Ct[n] * hp[n];
          }
          y_row[t] = acc;
        }
      }
      for (int64_t n = 0; n < nstate; ++n) hl_p[task * nstate + n] = h[n];
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                     const at::Tensor& Cm, const at::Tensor& checkpoints, const at::Tensor& dy,
                     const at::Tensor& dh_last, at::Tensor& du, at::Tensor& ddt, at::Tensor& dA_per_batch,
                     at::Tensor& dB_per_thread, at::Tensor& dC_per_thread, at::Tensor& dh0, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1), groups = Bm.size(1);
  const int64_t per_group = dim / groups, nchunks = checkpoints.size(2);
  const int64_t thread_stride = batch * groups * len * nstate;
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* dt_p = dt.data_ptr<scalar_t>();
  const scalar_t* A_p = A.data_ptr<scalar_t>();
  const scalar_t* B_p = Bm.data_ptr<scalar_t>();
  const scalar_t* C_p = Cm.data_ptr<scalar_t>();
  const scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();
  const scalar_t* dy_p = dy.data_ptr<scalar_t>();
  const scalar_t* dhl_p = dh_last.defined() ? dh_last.data_ptr<scalar_t>() : nullptr;
  scalar_t* du_p = du.data_ptr<scalar_t>();
  scalar_t* ddt_p = ddt.data_ptr<scalar_t>();
  scalar_t* dA_p = dA_per_batch.data_ptr<scalar_t>();
  scalar_t* dBt_p = dB_per_thread.data_ptr<scalar_t>();
  scalar_t* dCt_p = dC_per_thread.data_ptr<scalar_t>();
  scalar_t* dh0_p = dh0.data_ptr<scalar_t>();
  const int64_t max_threads = dB_per_thread.size(0);

  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = std::min<int64_t>(at::get_thread_num(), max_threads - 1);
    std::vector<scalar_t> g(nstate), dA_acc(nstate), states(chunk * nstate), decays(chunk * nstate);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim, d = task % dim, grp = d / per_group;
      const scalar_t* u_row = u_p + task * len;
      const scalar_t* dt_row = dt_p + task * len;
      const scalar_t* dy_row = dy_p + task * len;
      const scalar_t* A_row = A_p + d * nstate;
      const int64_t rows = (b * groups + grp) * len * nstate;
      const scalar_t* B_rows = B_p + rows;
      const scalar_t* C_rows = C_p + rows;
      scalar_t* dB_rows = dBt_p + thread * thread_stride + rows;
      scalar_t* dC_rows = dCt_p + thread * thread_stride + rows;
      scalar_t* du_row = du_p + task * len;
      scalar_t* ddt_row = ddt_p + task * len;
      scalar_t* gp = g.data();
      scalar_t* dAp = dA_acc.data();
      for (int64_t n = 0; n < nstate; ++n) {
        gp[n] = dhl_p ? dhl_p[task * nstate + n] : scalar_t(0);
        dAp[n] = 0;
      }
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const scalar_t* ck = ck_p + (task * nchunks + c) * nstate;
        const int64_t start = c * chunk, stop = std::min(len, start + chunk);
        // Recompute the chunk's states and decays from the checkpoint.
        for (int64_t t = start; t < stop; ++t) {
          const int64_t k = t - start;
          const scalar_t dtv = dt_row[t], duv = dtv * u_row[t];
          const scalar_t* Bt = B_rows + t * nstate;
          const scalar_t* prev = k ? states.data() + (k - 1) * nstate : ck;
          scalar_t* cur = states.data() + k * nstate;
          scalar_t* dec = decays.data() + k * nstate;
#pragma omp simd
          for (int64_t n = 0; n < nstate; ++n) {
            dec[n] = decay_exp(dtv * A_row[n]);
            cur[n] = dec[n] * prev[n] + duv * Bt[n];
          }
        }
        // Walk the chunk backwards; g holds exp(dt_{t+1} A) g_{t+1} on entry.
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t k = t - start;
          const scalar_t dtv = dt_row[t], uv = u_row[t], dyv = dy_row[t];
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
          du_row[t] = du_acc * dtv;
          ddt_row[t] = ddt_acc;
        }
      }
      for (int64_t n = 0; n < nstate; ++n) {
        dh0_p[task * nstate + n] = gp[n];
        dA_p[task * nstate + n] = dAp[n];
      }
    }
  });
}

int64_t num_chunks(int64_t len, int64_t chunk) { return (len + chunk - 1) / chunk; }

std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                                const at::Tensor& Cm, const c10::optional<at::Tensor>& h0, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1);
  auto y = at::empty_like(u);
  auto h_last = at::empty({batch, dim, nstate}, u.options());
  auto checkpoints = at::empty({batch, dim, num_chunks(len, chunk), nstate}, u.options());
  const at::Tensor h0_t = h0.has_value() ? h0.value() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    forward_kernel<scalar_t>(u, dt, A, Bm, Cm, h0_t, y, h_last, checkpoints, chunk);
  });
  return {y, h_last, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                                 const at::Tensor& Cm, const at::Tensor& checkpoints, const at::Tensor& dy,
                                 const c10::optional<at::Tensor>& dh_last, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), nstate = A.size(1);
  const int64_t threads = at::get_num_threads();
  auto du = at::empty_like(u);
  auto ddt = at::empty_like(u);
  auto dA_per_batch = at::empty({batch, dim, nstate}, u.options());
  auto dh0 = at::empty({batch, dim, nstate}, u.options());
  std::vector<int64_t> per_thread_shape{threads};
  for (auto size : Bm.sizes()) per_thread_shape.push_back(size);
  auto dB_per_thread = at::zeros(per_thread_shape, u.options());
  auto dC_per_thread = at::zeros(per_thread_shape, u.options());
  const at::Tensor dhl = dh_last.has_value() ? dh_last.value() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    backward_kernel<scalar_t>(u, dt, A, Bm, Cm, checkpoints, dy, dhl, du, ddt, dA_per_batch, dB_per_thread,
                              dC_per_thread, dh0, chunk);
  });
  return {du, ddt, dA_per_batch.sum(0), dB_per_thread.sum(0), dC_per_thread.sum(0), dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan core forward: y, h_last, chunk checkpoints");
  m.def("backward", &backward, "selective scan core backward: du, ddt, dA, dB, dC, dh0");
}
