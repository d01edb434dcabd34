// The (gated) delta rule recurrence on the CPU, forward and backward, one fused pass over time.
//
// Yang, Kautz and Hatamizadeh (2025), "Gated Delta Networks: Improving Mamba2 with Delta Rule" (eq. 10);
// the layout and semantics of seqarch.ops.delta_rule (flash-linear-attention's `chunk_gated_delta_rule`).
// The plain delta rule is the case g = 0 (alpha = 1): the kernel takes g as optional.
//
// Legend: B batch, T length, H heads, K key / query head size, V value head size, C checkpoint
// interval (states are stored every C tokens for the backward pass), N = ceil(T / C).
// Inputs in the op's layout: q, k (B, T, H, K), v (B, T, H, V), g, beta (B, T, H); state (B, H, K, V).
//
// Per (batch, head), with s = scale, a_t = exp(g_t), b_t = beta_t and P = S_{t-1}:
//
//   r_t = P^T k_t                       (V)  what the state recalls for k_t, before the decay
//   w_t = b_t (v_t - a_t r_t)           (V)  the pseudo-value
//   S_t = a_t P + k_t w_t^T             (K, V)
//   o_t = S_t^T (s q_t) = a_t P^T (s q_t) + (s q_t . k_t) w_t
//
// which is S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, the reference's recurrence.
//
// Forward: (batch, head) tasks on ATen's thread pool, each state in a local buffer; up to four heads of
// one batch element advance together token by token (their rows of token t are adjacent), and the
// rows a few tokens ahead are prefetched. Per token and tile of up to 32 columns of S: one read pass
// over the rows accumulates P^T k and P^T (s q), then one read-write pass writes S = a P + k w^T; the
// inner loops run over V on contiguous memory and vectorise. With checkpoints on, the state entering
// every chunk of C tokens is stored (B, H, N, K, V).
//
// Backward: with G_t = dL/dS_t (G_{T-1} = dL/dS_final or 0) and Gh = G_t + (s q_t) do_t^T (the
// adjoint of S_t including its read-out), the chain rule through the four lines above gives
//
//   dw   = Gh^T k_t                                   (V)
//   dv_t = b_t dw                                     dbeta_t = dw . (v_t - a_t r_t)
//   dr   = -a_t b_t dw                                (V)
//   dq_t = s (a_t P do_t + k_t (w_t . do_t))          (= s S_t do_t)
//   dk_t = Gh w_t + P dr
//   dg_t = a_t (sum(Gh o P) - b_t dw . r_t)           (d/dg = a d/da)
//   G_{t-1} = a_t Gh + k_t dr^T
//
// and dL/dS_0 = G_{-1}. P = S_{t-1} is needed in the reverse walk but the recurrence cannot be run
// backwards (dividing by a_t = exp(-20) amplifies rounding, and I - b k k^T need not be invertible),
// so each chunk's C states and recalls r_t are recomputed forward from its checkpoint into local
// buffers, then walked in reverse. Per token and tile of up to 64 columns: one pass over the rows of P
// and G (dw in registers; the row sums P do, Gh w and the scalar sum(Gh o P)), then one pass writing
// G_{t-1} and accumulating P dr. Memory: O(B H N K V) checkpoints, O(threads C (K + 1) V) buffers.

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

using Sizes = seqarch_kernels::ChunkSizes;
using seqarch_kernels::prefetch_row;

// Token t of one head sits H K (or H V) numbers after token t - 1, so walking a head's tokens crosses
// a page every token or two and the hardware prefetchers miss: each token's rows would wait on memory.
// Prefetching the rows of the token `kPrefetch` steps ahead hides that latency.
constexpr int64_t kPrefetch = 6;

// Heads of one batch element that the forward advances together, token by token (their rows of one
// token are adjacent in memory); four states of 64 x 64 float32 stay in L2. Measured 1-4 on this CPU:
// within noise of each other from 2 up, about 20 % faster than 1.
constexpr int64_t kGroupHeads = 4;

// The per-token scalars: sq = s q_t (K), a = exp(g_t) (1 without a gate); returns sq . k_t.
template <typename scalar_t>
inline scalar_t token_scalars(const scalar_t* q_t, const scalar_t* k_t, scalar_t scale, int64_t keys, scalar_t* sq) {
  scalar_t qk = 0;
#pragma omp simd reduction(+ : qk)
  for (int64_t i = 0; i < keys; ++i) {
    sq[i] = scale * q_t[i];
    qk += sq[i] * k_t[i];
  }
  return qk;
}

// What one forward token reads and writes. prev = S_{t-1}, next = S_t (may alias prev); o_t and
// recall (r_t) may be null.
template <typename scalar_t>
struct Token {
  const scalar_t *sq, *k_t, *v_t, *prev;
  scalar_t *next, *o_t, *recall;
  scalar_t a, b, qk;
};

// One token on the columns [j0, j0 + W): W is a compile-time width so the tile's sums stay in
// registers while the rows of the state stream through.
template <int W, bool Output, typename scalar_t>
inline void token_columns(const Token<scalar_t>& x, const Sizes& n, int64_t j0) {
  scalar_t kr[W], qr[W], w[W];
  for (int j = 0; j < W; ++j) kr[j] = qr[j] = 0;
  // Four rows per iteration: GCC keeps the tile sums in memory between iterations of the row loop,
  // so each iteration is one load-add-store chain; four rows per chain quarter its latency.
  const int64_t v = n.values;
  int64_t i = 0;
  for (; i + 4 <= n.keys; i += 4) {
    const scalar_t* row = x.prev + i * v + j0;
    const scalar_t k0 = x.k_t[i], k1 = x.k_t[i + 1], k2 = x.k_t[i + 2], k3 = x.k_t[i + 3];
    const scalar_t q0 = Output ? x.sq[i] : scalar_t(0), q1 = Output ? x.sq[i + 1] : scalar_t(0);
    const scalar_t q2 = Output ? x.sq[i + 2] : scalar_t(0), q3 = Output ? x.sq[i + 3] : scalar_t(0);
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const scalar_t p0 = row[j], p1 = row[v + j], p2 = row[2 * v + j], p3 = row[3 * v + j];
      kr[j] += (k0 * p0 + k1 * p1) + (k2 * p2 + k3 * p3);
      if (Output) qr[j] += (q0 * p0 + q1 * p1) + (q2 * p2 + q3 * p3);
    }
  }
  for (; i < n.keys; ++i) {
    const scalar_t ki = x.k_t[i], qi = Output ? x.sq[i] : scalar_t(0);
    const scalar_t* row = x.prev + i * v + j0;
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      kr[j] += ki * row[j];
      if (Output) qr[j] += qi * row[j];
    }
  }
  for (int j = 0; j < W; ++j) {
    w[j] = x.b * (x.v_t[j0 + j] - x.a * kr[j]);
    if (Output) x.o_t[j0 + j] = x.a * qr[j] + x.qk * w[j];
    if (x.recall) x.recall[j0 + j] = kr[j];
  }
  for (int64_t i = 0; i < n.keys; ++i) {
    const scalar_t ki = x.k_t[i], a = x.a;
    const scalar_t* row = x.prev + i * n.values + j0;
    scalar_t* out_row = x.next + i * n.values + j0;
#pragma omp simd
    for (int j = 0; j < W; ++j) out_row[j] = a * row[j] + ki * w[j];
  }
}

template <bool Output, typename scalar_t>
inline void token(const Token<scalar_t>& x, const Sizes& n) {
  int64_t j0 = 0;
  for (; j0 + 32 <= n.values; j0 += 32) token_columns<32, Output>(x, n, j0);
  if (j0 + 16 <= n.values) token_columns<16, Output>(x, n, j0), j0 += 16;
  if (j0 + 8 <= n.values) token_columns<8, Output>(x, n, j0), j0 += 8;
  for (; j0 < n.values; ++j0) token_columns<1, Output>(x, n, j0);
}

template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v, *g, *beta;
  scalar_t scale;

  scalar_t alpha(int64_t row) const { return g ? decay_exp(g[row]) : scalar_t(1); }
};

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                           const at::Tensor& beta, double scale) {
  return {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), data_or_null<scalar_t>(g),
          beta.data_ptr<scalar_t>(), static_cast<scalar_t>(scale)};
}

template <typename scalar_t>
void forward_kernel(const Sizes& n, const Inputs<scalar_t>& in, const at::Tensor& h0, at::Tensor& out,
                    at::Tensor& final_state, at::Tensor& checkpoints) {
  const scalar_t* h0_p = data_or_null<scalar_t>(h0);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* fs_p = final_state.data_ptr<scalar_t>();
  scalar_t* ck_p = checkpoints.numel() ? checkpoints.data_ptr<scalar_t>() : nullptr;
  const int64_t state_size = n.keys * n.values;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> states, sq(n.keys);
    // The tasks of one batch element, up to kGroupHeads of them, advance together token by token:
    // their rows of token t are contiguous in memory, so the inputs stream in order.
    for (int64_t first = begin; first < end;) {
      const int64_t last = std::min({end, (first / n.heads + 1) * n.heads, first + kGroupHeads});
      const int64_t group = last - first;
      states.resize(group * state_size);
      if (h0_p) {
        std::memcpy(states.data(), h0_p + first * state_size, group * state_size * sizeof(scalar_t));
      } else {
        std::fill(states.begin(), states.end(), scalar_t(0));
      }
      for (int64_t t = 0; t < n.len; ++t) {
        if (ck_p && t % n.chunk == 0) {
          for (int64_t task = first; task < last; ++task) {
            std::memcpy(ck_p + (task * n.nchunks + t / n.chunk) * state_size,
                        states.data() + (task - first) * state_size, state_size * sizeof(scalar_t));
          }
        }
        if (t + kPrefetch < n.len) {
          const int64_t ahead = n.row(first, t + kPrefetch);
          prefetch_row(in.q + ahead * n.keys, group * n.keys);
          prefetch_row(in.k + ahead * n.keys, group * n.keys);
          prefetch_row(in.v + ahead * n.values, group * n.values);
          prefetch_row(out_p + ahead * n.values, group * n.values);
        }
        for (int64_t task = first; task < last; ++task) {
          const int64_t row = n.row(task, t);
          scalar_t* S = states.data() + (task - first) * state_size;
          const scalar_t* k_t = in.k + row * n.keys;
          const scalar_t qk = token_scalars(in.q + row * n.keys, k_t, in.scale, n.keys, sq.data());
          const Token<scalar_t> x{sq.data(), k_t, in.v + row * n.values, S, S, out_p + row * n.values, nullptr,
                                  in.alpha(row), in.beta[row], qk};
          token<true>(x, n);
        }
      }
      std::memcpy(fs_p + first * state_size, states.data(), group * state_size * sizeof(scalar_t));
      first = last;
    }
  });
}

// What one reverse step reads and writes: P = S_{t-1}, G = G_t on entry and G_{t-1} on exit; w, do_t
// (V); dv_t receives dw for now (scaled by b afterwards); row_sums (3, K) = (P do_t, Gh w_t, P dr);
// gp accumulates sum(Gh o P).
template <typename scalar_t>
struct Adjoint {
  const scalar_t *sq, *k_t, *w, *do_t, *P;
  scalar_t *G, *dw, *row_sums;
  scalar_t a, b;
};

template <int W, typename scalar_t>
inline scalar_t adjoint_columns(const Adjoint<scalar_t>& x, const Sizes& n, int64_t j0) {
  scalar_t dw[W], w[W], dout[W], dr[W];
  for (int j = 0; j < W; ++j) {
    dw[j] = 0;
    w[j] = x.w[j0 + j];
    dout[j] = x.do_t[j0 + j];
  }
  scalar_t* p_do = x.row_sums;
  scalar_t* g_w = p_do + n.keys;
  scalar_t* p_dr = g_w + n.keys;
  scalar_t gp = 0;
  for (int64_t i = 0; i < n.keys; ++i) {
    const scalar_t ki = x.k_t[i], qi = x.sq[i];
    const scalar_t* P_row = x.P + i * n.values + j0;
    const scalar_t* G_row = x.G + i * n.values + j0;
    scalar_t pd = 0, gw = 0, gp_row = 0;
#pragma omp simd reduction(+ : pd, gw, gp_row)
    for (int j = 0; j < W; ++j) {
      const scalar_t p = P_row[j], gh = G_row[j] + qi * dout[j];
      dw[j] += ki * gh;
      pd += p * dout[j];
      gw += gh * w[j];
      gp_row += gh * p;
    }
    p_do[i] += pd;
    g_w[i] += gw;
    gp += gp_row;
  }
  const scalar_t ab = x.a * x.b;
  for (int j = 0; j < W; ++j) {
    dr[j] = -ab * dw[j];
    x.dw[j0 + j] = dw[j];
  }
  for (int64_t i = 0; i < n.keys; ++i) {
    const scalar_t ki = x.k_t[i], qi = x.sq[i], a = x.a;
    const scalar_t* P_row = x.P + i * n.values + j0;
    scalar_t* G_row = x.G + i * n.values + j0;
    scalar_t pr = 0;
#pragma omp simd reduction(+ : pr)
    for (int j = 0; j < W; ++j) {
      pr += P_row[j] * dr[j];
      G_row[j] = a * (G_row[j] + qi * dout[j]) + ki * dr[j];
    }
    p_dr[i] += pr;
  }
  return gp;
}

template <typename scalar_t>
void backward_kernel(const Sizes& n, const Inputs<scalar_t>& in, const at::Tensor& checkpoints, const at::Tensor& dout,
                     const at::Tensor& dfinal, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dg,
                     at::Tensor& dbeta, at::Tensor& dh0) {
  const scalar_t* ck_p = checkpoints.data_ptr<scalar_t>();
  const scalar_t* do_p = dout.data_ptr<scalar_t>();
  const scalar_t* dfinal_p = data_or_null<scalar_t>(dfinal);
  scalar_t* dq_p = dq.data_ptr<scalar_t>();
  scalar_t* dk_p = dk.data_ptr<scalar_t>();
  scalar_t* dv_p = dv.data_ptr<scalar_t>();
  scalar_t* dg_p = dg.defined() ? dg.data_ptr<scalar_t>() : nullptr;
  scalar_t* dbeta_p = dbeta.data_ptr<scalar_t>();
  scalar_t* dh0_p = dh0.data_ptr<scalar_t>();
  const int64_t state_size = n.keys * n.values;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    // states[c] = S_{start + c - 1}, recalls[c] = r_{start + c}: for token start + c of the current chunk.
    std::vector<scalar_t> states(n.chunk * state_size), recalls(n.chunk * n.values), adjoint(state_size);
    std::vector<scalar_t> sq(n.keys), w(n.values), row_sums(3 * n.keys);
    for (int64_t task = begin; task < end; ++task) {
      scalar_t* G = adjoint.data();
      if (dfinal_p) {
        std::memcpy(G, dfinal_p + task * state_size, state_size * sizeof(scalar_t));
      } else {
        std::fill(adjoint.begin(), adjoint.end(), scalar_t(0));
      }
      for (int64_t c = n.nchunks - 1; c >= 0; --c) {
        const int64_t start = c * n.chunk, stop = std::min(n.len, start + n.chunk);
        std::memcpy(states.data(), ck_p + (task * n.nchunks + c) * state_size, state_size * sizeof(scalar_t));
        for (int64_t t = start; t < stop; ++t) {  // recompute the chunk's states and recalls
          const int64_t row = n.row(task, t), local = t - start;
          if (t + kPrefetch < stop) {
            const int64_t ahead = n.row(task, t + kPrefetch);
            prefetch_row(in.k + ahead * n.keys, n.keys);
            prefetch_row(in.v + ahead * n.values, n.values);
          }
          const scalar_t* prev = states.data() + local * state_size;
          // The chunk's last token needs only its recall r_t, not the state after it.
          scalar_t* next = (t + 1 < stop) ? states.data() + (local + 1) * state_size : nullptr;
          const Token<scalar_t> x{nullptr, in.k + row * n.keys, in.v + row * n.values, prev,
                                  next, nullptr, recalls.data() + local * n.values, in.alpha(row), in.beta[row], 0};
          if (next) {
            token<false>(x, n);
          } else {  // only r_t: P^T k_t
            scalar_t* r = recalls.data() + local * n.values;
            std::fill(r, r + n.values, scalar_t(0));
            for (int64_t i = 0; i < n.keys; ++i) {
              const scalar_t ki = x.k_t[i];
              const scalar_t* P_row = prev + i * n.values;
#pragma omp simd
              for (int64_t j = 0; j < n.values; ++j) r[j] += ki * P_row[j];
            }
          }
        }
        for (int64_t t = stop - 1; t >= start; --t) {
          const int64_t row = n.row(task, t), local = t - start;
          if (t - kPrefetch >= start) {
            const int64_t ahead = n.row(task, t - kPrefetch);
            prefetch_row(in.q + ahead * n.keys, n.keys);
            prefetch_row(dq_p + ahead * n.keys, n.keys);
            prefetch_row(dk_p + ahead * n.keys, n.keys);
            prefetch_row(do_p + ahead * n.values, n.values);
            prefetch_row(dv_p + ahead * n.values, n.values);
          }
          const scalar_t* q_t = in.q + row * n.keys;
          const scalar_t* k_t = in.k + row * n.keys;
          const scalar_t* v_t = in.v + row * n.values;
          const scalar_t* do_t = do_p + row * n.values;
          const scalar_t* r = recalls.data() + local * n.values;
          const scalar_t* P = states.data() + local * state_size;
          const scalar_t a = in.alpha(row), b = in.beta[row];
          token_scalars(q_t, k_t, in.scale, n.keys, sq.data());
          scalar_t w_do = 0;
#pragma omp simd reduction(+ : w_do)
          for (int64_t j = 0; j < n.values; ++j) {
            w[j] = b * (v_t[j] - a * r[j]);
            w_do += w[j] * do_t[j];
          }
          std::fill(row_sums.begin(), row_sums.end(), scalar_t(0));
          scalar_t* dv_t = dv_p + row * n.values;  // holds dw until scaled below
          const Adjoint<scalar_t> x{sq.data(), k_t, w.data(), do_t, P, G, dv_t, row_sums.data(), a, b};
          scalar_t gp = 0;
          int64_t j0 = 0;
          // Whole rows of 64 where they fit: the row sums (P do, Gh w, P dr, Gh . P) then cost one
          // horizontal add per row instead of one per 32 columns (measured 1.17x on the backward).
          for (; j0 + 64 <= n.values; j0 += 64) gp += adjoint_columns<64>(x, n, j0);
          for (; j0 + 32 <= n.values; j0 += 32) gp += adjoint_columns<32>(x, n, j0);
          if (j0 + 16 <= n.values) gp += adjoint_columns<16>(x, n, j0), j0 += 16;
          if (j0 + 8 <= n.values) gp += adjoint_columns<8>(x, n, j0), j0 += 8;
          for (; j0 < n.values; ++j0) gp += adjoint_columns<1>(x, n, j0);
          scalar_t d_beta = 0, dw_r = 0;
#pragma omp simd reduction(+ : d_beta, dw_r)
          for (int64_t j = 0; j < n.values; ++j) {
            const scalar_t dw = dv_t[j];
            d_beta += dw * (v_t[j] - a * r[j]);
            dw_r += dw * r[j];
            dv_t[j] = b * dw;
          }
          dbeta_p[row] = d_beta;
          if (dg_p) dg_p[row] = a * (gp - b * dw_r);
          const scalar_t* p_do = row_sums.data();
          const scalar_t* g_w = p_do + n.keys;
          const scalar_t* p_dr = g_w + n.keys;
          scalar_t* dq_t = dq_p + row * n.keys;
          scalar_t* dk_t = dk_p + row * n.keys;
#pragma omp simd
          for (int64_t i = 0; i < n.keys; ++i) {
            dq_t[i] = in.scale * (a * p_do[i] + k_t[i] * w_do);
            dk_t[i] = g_w[i] + p_dr[i];
          }
        }
      }
      std::memcpy(dh0_p + task * state_size, G, state_size * sizeof(scalar_t));
    }
  });
}

Sizes sizes_of(const at::Tensor& q, const at::Tensor& v, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "delta_rule kernel: q and v must be (B, T, H, K) and (B, T, H, V)");
  return seqarch_kernels::chunk_sizes("delta_rule", q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), chunk);
}

// q, k (B, T, H, K), v (B, T, H, V), g (B, T, H) or None (alpha = 1), beta (B, T, H), h0 (B, H, K, V)
// or None, all contiguous, one floating dtype. Returns out (B, T, H, V), the final state (B, H, K, V)
// and, when store_checkpoints, the state entering every chunk of `chunk` tokens (B, H, N, K, V), else
// an empty tensor.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& g, const at::Tensor& beta,
                                const c10::optional<at::Tensor>& h0, double scale, int64_t chunk,
                                bool store_checkpoints) {
  const Sizes n = sizes_of(q, v, chunk);
  auto out = at::empty_like(v);
  auto final_state = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  auto checkpoints = seqarch_kernels::empty_checkpoints(n, store_checkpoints, v.options());
  const at::Tensor g_t = value_or_undefined(g), h0_t = value_or_undefined(h0);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_rule_forward", [&] {
    forward_kernel<scalar_t>(n, inputs_of<scalar_t>(q, k, v, g_t, beta, scale), h0_t, out, final_state, checkpoints);
  });
  return {out, final_state, checkpoints};
}

// The inputs of `forward`, its checkpoints, dout (B, T, H, V) and dL/d(final state) (B, H, K, V) or
// None. Returns dq, dk, dv, dg (empty without g), dbeta, d initial_state (B, H, K, V).
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& g, const at::Tensor& beta, double scale,
                                 const at::Tensor& checkpoints, const at::Tensor& dout,
                                 const c10::optional<at::Tensor>& dfinal, int64_t chunk) {
  const Sizes n = sizes_of(q, v, chunk);
  seqarch_kernels::check_checkpoints("delta_rule", n, checkpoints);
  const at::Tensor g_t = value_or_undefined(g), dfinal_t = value_or_undefined(dfinal);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  auto dg = g_t.defined() ? at::empty_like(g_t) : at::Tensor();
  auto dbeta = at::empty_like(beta);
  auto dh0 = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "delta_rule_backward", [&] {
    backward_kernel<scalar_t>(n, inputs_of<scalar_t>(q, k, v, g_t, beta, scale), checkpoints, dout, dfinal_t, dq, dk,
                              dv, dg, dbeta, dh0);
  });
  return {dq, dk, dv, g_t.defined() ? dg : at::empty({0}, v.options()), dbeta, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused (gated) delta rule forward: out, final state, chunk checkpoints");
  m.def("backward", &backward, "fused (gated) delta rule backward: dq, dk, dv, dg, dbeta, d initial_state");
}
