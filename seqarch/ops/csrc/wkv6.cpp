// The RWKV-6 ("Finch") wkv recurrence on the CPU, forward and backward, one fused pass over time.
//
// Peng et al. (2024), "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
// section 4, eq. 17; the layout and semantics of seqarch.ops.wkv (flash-linear-attention's).
//
// Legend: B batch, H heads, T length, K key/receptance head size, V value head size,
// C chunk length (states are checkpointed every C tokens for the backward pass), N = ceil(T / C).
//
// Per (batch, head), with q_t = scale r_t, e_t = exp(w_t) (K,), the state S (K, V), S_{-1} = S_0:
//
//   o_t = q_t (S_{t-1} + diag(u) k_t^T v_t)          (V,)
//   S_t = diag(e_t) S_{t-1} + k_t^T v_t               (K, V)
//
// Forward: one task per (batch, head) on ATen's thread pool, S in a local buffer. Token t streams
// the rows of S once per tile of up to 32 columns: o_t[tile] += q_t,k S[k, tile], then
// S[k, tile] = e_t,k S[k, tile] + k_t,k v_t[tile], the tile's outputs held in registers; the inner
// loop runs over V on contiguous memory and vectorises; exp(w_t) is an inlined polynomial over K.
// With checkpoints on, the state entering every chunk, S_{cC - 1}, is stored (B, H, N, K, V).
//
// Backward: with G_t = dL/dS_t the adjoint of the state (G_{T-1} = dL/dS_final, or 0), the
// chain rule through the two equations above gives, walking t from T - 1 down to 0,
//
//   p_t    = v_t . do_t                                 (scalar)
//   dr_t,k = scale (sum_v S_{t-1}[k, v] do_t,v + u_k k_t,k p_t)
//   dk_t,k = sum_v G_t[k, v] v_t,v + q_t,k u_k p_t
//   dv_t,v = (sum_k q_t,k u_k k_t,k) do_t,v + sum_k k_t,k G_t[k, v]
//   dw_t,k = e_t,k sum_v G_t[k, v] S_{t-1}[k, v]
//   du_k  += q_t,k k_t,k p_t                            (summed over t and the batch)
//   G_{t-1} = diag(e_t) G_t + q_t^T do_t
//
// and dL/dS_0 = G_{-1}. S_{t-1} is needed in the reverse walk but cannot be run backwards
// (dividing by e_t = exp(-20) would amplify rounding by e^20), so each chunk's C states are
// recomputed forward from its checkpoint into a local (C, K, V) buffer, then walked in reverse.
// Each row k of G and S_{t-1} is read once per token and tile of columns, the three sums over v
// and the updates of dv_t and G fused in one vectorised loop. Memory: O(B H N K V) checkpoints, O(threads C K V) buffers.

#include <torch/extension.h>
#include <ATen/Parallel.h>

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

// The per-token scalars over K: q = scale r_t, e = exp(w_t); returns sum_k q_k u_k k_k.
template <typename scalar_t>
inline scalar_t token_scalars(const scalar_t* r_t, const scalar_t* k_t, const scalar_t* w_t, const scalar_t* u_h,
                              scalar_t scale, int64_t keys, scalar_t* q, scalar_t* e) {
  scalar_t bonus = 0;
#pragma omp simd reduction(+ : bonus)
  for (int64_t i = 0; i < keys; ++i) {
    q[i] = scale * r_t[i];
    e[i] = decay_exp(w_t[i]);
    bonus += q[i] * u_h[i] * k_t[i];
  }
  return bonus;
}

// S = diag(e) S_prev + k_t^T v_t, row by row; S and S_prev may alias.
template <typename scalar_t>
inline void decay_and_add(const scalar_t* prev, scalar_t* next, const scalar_t* e, const scalar_t* k_t,
                          const scalar_t* v_t, int64_t keys, int64_t values) {
  for (int64_t i = 0; i < keys; ++i) {
    const scalar_t ei = e[i], ki = k_t[i];
    const scalar_t* prev_row = prev + i * values;
    scalar_t* next_row = next + i * values;
#pragma omp simd
    for (int64_t j = 0; j < values; ++j) next_row[j] = ei * prev_row[j] + ki * v_t[j];
  }
}

using Sizes = seqarch_kernels::ChunkSizes;  // the (B, H, T, ...) layout here: ChunkSizes::row does not apply

// One token on the columns [j0, j0 + W) of the state: o_t[j] = bonus v_t[j] + sum_i q_i S[i, j], then
// S[:, j] = e S[:, j] + k_t v_t[j]. W is a compile-time width so that the W partial outputs and
// values stay in registers while the rows of S stream through: one load and one store per element.
template <int W, typename scalar_t>
inline void token_columns(const scalar_t* q, const scalar_t* e, const scalar_t* k_t, const scalar_t* v_t,
                          scalar_t bonus, scalar_t* S, scalar_t* o_t, const Sizes& n, int64_t j0) {
  scalar_t acc[W], values[W];
  for (int j = 0; j < W; ++j) {
    values[j] = v_t[j0 + j];
    acc[j] = bonus * values[j];
  }
  for (int64_t i = 0; i < n.keys; ++i) {
    const scalar_t qi = q[i], ei = e[i], ki = k_t[i];
    scalar_t* S_row = S + i * n.values + j0;
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      acc[j] += qi * S_row[j];
      S_row[j] = ei * S_row[j] + ki * values[j];
    }
  }
  for (int j = 0; j < W; ++j) o_t[j0 + j] = acc[j];
}

template <typename scalar_t>
void forward_kernel(const Sizes& n, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& w, const at::Tensor& u, const at::Tensor& h0, scalar_t scale, at::Tensor& out,
                    at::Tensor& final_state, at::Tensor& checkpoints) {
  const scalar_t* r_p = r.data_ptr<scalar_t>();
  const scalar_t* k_p = k.data_ptr<scalar_t>();
  const scalar_t* v_p = v.data_ptr<scalar_t>();
  const scalar_t* w_p = w.data_ptr<scalar_t>();
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* h0_p = data_or_null<scalar_t>(h0);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* fs_p = final_state.data_ptr<scalar_t>();
  scalar_t* ck_p = checkpoints.numel() ? checkpoints.data_ptr<scalar_t>() : nullptr;
  const int64_t state_size = n.keys * n.values;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> state(state_size), q(n.keys), e(n.keys);
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* u_h = u_p + (task % n.heads) * n.keys;
      scalar_t* S = state.data();
      if (h0_p) {
        std::memcpy(S, h0_p + task * state_size, state_size * sizeof(scalar_t));
      } else {
        std::fill(state.begin(), state.end(), scalar_t(0));
      }
      for (int64_t t = 0; t < n.len; ++t) {
        if (ck_p && t % n.chunk == 0) {
          std::memcpy(ck_p + (task * n.nchunks + t / n.chunk) * state_size, S, state_size * sizeof(scalar_t));
        }
        const int64_t row = task * n.len + t;
        const scalar_t* r_t = r_p + row * n.keys;
        const scalar_t* k_t = k_p + row * n.keys;
        const scalar_t* w_t = w_p + row * n.keys;
        const scalar_t* v_t = v_p + row * n.values;
        scalar_t* o_t = out_p + row * n.values;
        const scalar_t bonus = token_scalars(r_t, k_t, w_t, u_h, scale, n.keys, q.data(), e.data());
        int64_t j0 = 0;
        for (; j0 + 32 <= n.values; j0 += 32) token_columns<32>(q.data(), e.data(), k_t, v_t, bonus, S, o_t, n, j0);
        if (j0 + 16 <= n.values) token_columns<16>(q.data(), e.data(), k_t, v_t, bonus, S, o_t, n, j0), j0 += 16;
        if (j0 + 8 <= n.values) token_columns<8>(q.data(), e.data(), k_t, v_t, bonus, S, o_t, n, j0), j0 += 8;
        for (; j0 < n.values; ++j0) token_columns<1>(q.data(), e.data(), k_t, v_t, bonus, S, o_t, n, j0);
      }
      std::memcpy(fs_p + task * state_size, S, state_size * sizeof(scalar_t));
    }
  });
}

// What one reverse step reads and writes: S = S_{t-1}, G = G_t on entry and G_{t-1} on exit,
// row_sums = (sum_v S[k, v] do_t,v, sum_v G_t[k, v] v_t,v, sum_v G_t[k, v] S[k, v]) for each k (3, K).
template <typename scalar_t>
struct Adjoint {
  const scalar_t *q, *e, *k_t, *v_t, *do_t, *S;
  scalar_t *G, *dv_t, *row_sums;
  scalar_t bonus;
};

// One reverse step on the columns [j0, j0 + W): dv_t[j] = bonus do_t[j] + sum_k k_t,k G[k, j], the
// three row sums accumulated, G[:, j] = e G[:, j] + q do_t[j]. As in `token_columns`, W is a
// compile-time width so the tile of dv_t, v_t and do_t stays in registers.
template <int W, typename scalar_t>
inline void adjoint_columns(const Adjoint<scalar_t>& a, const Sizes& n, int64_t j0) {
  scalar_t dv[W], values[W], dout[W];
  for (int j = 0; j < W; ++j) {
    values[j] = a.v_t[j0 + j];
    dout[j] = a.do_t[j0 + j];
    dv[j] = a.bonus * dout[j];
  }
  scalar_t* state_do = a.row_sums;
  scalar_t* adjoint_v = state_do + n.keys;
  scalar_t* adjoint_state = adjoint_v + n.keys;
  for (int64_t i = 0; i < n.keys; ++i) {
    const scalar_t qi = a.q[i], ei = a.e[i], ki = a.k_t[i];
    const scalar_t* S_row = a.S + i * n.values + j0;
    scalar_t* G_row = a.G + i * n.values + j0;
    scalar_t sd = 0, gv = 0, gs = 0;
#pragma omp simd reduction(+ : sd, gv, gs)
    for (int j = 0; j < W; ++j) {
      const scalar_t s = S_row[j], g = G_row[j];
      sd += s * dout[j];
      gv += g * values[j];
      gs += g * s;
      dv[j] += ki * g;
      G_row[j] = ei * g + qi * dout[j];
    }
    state_do[i] += sd;
    adjoint_v[i] += gv;
    adjoint_state[i] += gs;
  }
  for (int j = 0; j < W; ++j) a.dv_t[j0 + j] = dv[j];
}

template <typename scalar_t>
void backward_kernel(const Sizes& n, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& w, const at::Tensor& u, scalar_t scale, const at::Tensor& checkpoints,
                     const at::Tensor& dout, const at::Tensor& dfinal, at::Tensor& dr, at::Tensor& dk,
                     at::Tensor& dv, at::Tensor& dw, at::Tensor& du_per_batch, at::Tensor& dh0) {
  const scalar_t* r_p = r.data_ptr<scalar_t>();
  const scalar_t* k_p = k.data_ptr<scalar_t>();
  const scalar_t* v_p = v.data_ptr<scalar_t>();
  const scalar_t* w_p = w.data_ptr<scalar_t>();
  const scalar_t* u_p = u.data_ptr<scalar_t>();
  const scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();
  const scalar_t* do_p = dout.data_ptr<scalar_t>();
  const scalar_t* dfinal_p = data_or_null<scalar_t>(dfinal);
  scalar_t* dr_p = dr.data_ptr<scalar_t>();
  scalar_t* dk_p = dk.data_ptr<scalar_t>();
  scalar_t* dv_p = dv.data_ptr<scalar_t>();
  scalar_t* dw_p = dw.data_ptr<scalar_t>();
  scalar_t* du_p = du_per_batch.data_ptr<scalar_t>();
  scalar_t* dh0_p = dh0.data_ptr<scalar_t>();
  const int64_t state_size = n.keys * n.values;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    // states[c] = S_{start + c - 1}: the state entering token start + c of the current chunk.
    std::vector<scalar_t> states(n.chunk * state_size), adjoint(state_size), q(n.keys), e(n.keys), du(n.keys);
    std::vector<scalar_t> row_sums(3 * n.keys);
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* u_h = u_p + (task % n.heads) * n.keys;
      scalar_t* G = adjoint.data();
      if (dfinal_p) {
        std::memcpy(G, dfinal_p + task * state_size, state_size * sizeof(scalar_t));
      } else {
        std::fill(adjoint.begin(), adjoint.end(), scalar_t(0));
      }
      std::fill(du.begin(), du.end(), scalar_t(0));
      for (int64_t c = n.nchunks - 1; c >= 0; --c) {
        const int64_t start = c * n.chunk, stop = std::min(n.len, start + n.chunk);
        std::memcpy(states.data(), ck_p + (task * n.nchunks + c) * state_size, state_size * sizeof(scalar_t));
        for (int64_t t = start; t + 1 < stop; ++t) {
          const int64_t row = task * n.len + t;
          token_scalars(r_p + row * n.keys, k_p + row * n.keys, w_p + row * n.keys, u_h, scale, n.keys, q.data(),
                        e.data());
          const scalar_t* prev = states.data() + (t - start) * state_size;
          decay_and_add(prev, states.data() + (t - start + 1) * state_size, e.data(), k_p + row * n.keys,
                        v_p + row * n.values, n.keys, n.values);
        }
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t row = task * n.len + t;
          const scalar_t* k_t = k_p + row * n.keys;
          const scalar_t* v_t = v_p + row * n.values;
          const scalar_t* do_t = do_p + row * n.values;
          scalar_t* dr_t = dr_p + row * n.keys;
          scalar_t* dk_t = dk_p + row * n.keys;
          scalar_t* dw_t = dw_p + row * n.keys;
          scalar_t* dv_t = dv_p + row * n.values;
          const scalar_t* S = states.data() + (t - start) * state_size;  // S_{t-1}
          const scalar_t bonus = token_scalars(r_p + row * n.keys, k_t, w_p + row * n.keys, u_h, scale, n.keys,
                                               q.data(), e.data());
          scalar_t p = 0;
#pragma omp simd reduction(+ : p)
          for (int64_t j = 0; j < n.values; ++j) p += v_t[j] * do_t[j];
          std::fill(row_sums.begin(), row_sums.end(), scalar_t(0));
          const Adjoint<scalar_t> a{q.data(), e.data(), k_t, v_t, do_t, S, G, dv_t, row_sums.data(), bonus};
          int64_t j0 = 0;
          for (; j0 + 32 <= n.values; j0 += 32) adjoint_columns<32>(a, n, j0);
          if (j0 + 16 <= n.values) adjoint_columns<16>(a, n, j0), j0 += 16;
          if (j0 + 8 <= n.values) adjoint_columns<8>(a, n, j0), j0 += 8;
          for (; j0 < n.values; ++j0) adjoint_columns<1>(a, n, j0);
          const scalar_t* state_do = row_sums.data();
          const scalar_t* adjoint_v = state_do + n.keys;
          const scalar_t* adjoint_state = adjoint_v + n.keys;
#pragma omp simd
          for (int64_t i = 0; i < n.keys; ++i) {
            const scalar_t qi = q[i], ki = k_t[i], bonus_i = u_h[i] * p;
            dr_t[i] = scale * (state_do[i] + bonus_i * ki);
            dk_t[i] = adjoint_v[i] + qi * bonus_i;
            dw_t[i] = e[i] * adjoint_state[i];
            du[i] += qi * ki * p;
          }
        }
      }
      std::memcpy(dh0_p + task * state_size, G, state_size * sizeof(scalar_t));
      std::memcpy(du_p + task * n.keys, du.data(), n.keys * sizeof(scalar_t));
    }
  });
}

Sizes sizes_of(const at::Tensor& r, const at::Tensor& v, int64_t chunk) {
  return seqarch_kernels::chunk_sizes("wkv6", r.size(0), r.size(2), r.size(1), r.size(3), v.size(3), chunk);
}

// r, k, w (B, H, T, K), v (B, H, T, V), u (H, K), h0 (B, H, K, V) or None, all contiguous, one
// floating dtype. Returns out (B, H, T, V), the final state (B, H, K, V) and, when
// store_checkpoints, the state entering every chunk of `chunk` tokens (B, H, N, K, V), else an
// empty tensor.
std::vector<at::Tensor> forward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                const at::Tensor& u, const c10::optional<at::Tensor>& h0, double scale, int64_t chunk,
                                bool store_checkpoints) {
  const Sizes n = sizes_of(r, v, chunk);
  auto out = at::empty_like(v);
  auto final_state = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  auto checkpoints = seqarch_kernels::empty_checkpoints(n, store_checkpoints, v.options());
  const at::Tensor h0_t = value_or_undefined(h0);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_forward", [&] {
    forward_kernel<scalar_t>(n, r, k, v, w, u, h0_t, static_cast<scalar_t>(scale), out, final_state, checkpoints);
  });
  return {out, final_state, checkpoints};
}

// The inputs of `forward`, its checkpoints, dout (B, H, T, V) and dL/d(final state) (B, H, K, V)
// or None. Returns dr, dk, dv, dw, du (H, K), d initial_state (B, H, K, V).
std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                 const at::Tensor& u, double scale, const at::Tensor& checkpoints, const at::Tensor& dout,
                                 const c10::optional<at::Tensor>& dfinal, int64_t chunk) {
  const Sizes n = sizes_of(r, v, chunk);
  seqarch_kernels::check_checkpoints("wkv6", n, checkpoints);
  auto dr = at::empty_like(r);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  auto dw = at::empty_like(w);
  auto du_per_batch = at::empty({n.batch, n.heads, n.keys}, r.options());
  auto dh0 = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  const at::Tensor dfinal_t = value_or_undefined(dfinal);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_backward", [&] {
    backward_kernel<scalar_t>(n, r, k, v, w, u, static_cast<scalar_t>(scale), checkpoints, dout, dfinal_t, dr, dk, dv,
                              dw, du_per_batch, dh0);
  });
  return {dr, dk, dv, dw, du_per_batch.sum(0), dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused wkv6 forward: out, final state, chunk checkpoints");
  m.def("backward", &backward, "fused wkv6 backward: dr, dk, dv, dw, du, d initial_state");
}
