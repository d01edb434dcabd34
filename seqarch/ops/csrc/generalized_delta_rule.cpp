// The generalized delta rule (RWKV-7 "Goose", a diagonal-plus-rank-one transition) on the CPU,
// forward and backward, one fused pass over time.
//
// Peng et al. (2025), "RWKV-7 'Goose' with Expressive Dynamic State Evolution", section 3; the layout
// and semantics of seqarch.ops.generalized_delta_rule (flash-linear-attention's `chunk_dplr_delta_rule`).
//
// Legend: B batch, T length, H heads, K key size, V value size, C chunk length (states are
// checkpointed every C tokens for the backward pass), N = ceil(T / C). Inputs are (B, T, H, K or V).
//
// Per (batch, head), with q_t = scale q_t (the scaled query), e_t = exp(gk_t) (K,), the state S (K, V):
//
//   sa_t = S_{t-1}^T a_t                                  (V,)  the rank-one read
//   S_t  = diag(e_t) S_{t-1} + b_t sa_t^T + k_t v_t^T      (K, V)
//   o_t  = S_t^T q_t                                      (V,)
//
// Forward: one task per (batch, head) on ATen's thread pool, S in a local buffer; the tasks a thread
// holds of one batch element advance in lockstep (token outer, heads inner), so each token's inputs
// are read as one contiguous (H, K) row (a per-head walk would stride a page per token, where the
// prefetchers stop) while the states (H K V: 192 KB at H = 12, K = V = 64) stay in L2. Token t
// streams the rows of S once: S[i, :] = e_i S[i, :] + b_i sa_t + k_i v_t, and from the new row both
// o_t += q_i S[i, :] and the next token's read sa_{t+1} += a_{t+1, i} S[i, :] (each column of S
// evolves on its own, so the read of token t + 1 is formed while token t writes): one load and one
// store of S per token, two rows per iteration (the V-long sums o and sa_{t+1} are loaded and stored
// once per two rows). The inner loops run over V on contiguous memory and vectorise; exp(gk_t) is
// an inlined polynomial over K. With checkpoints on, the state entering every chunk, S_{cC - 1}, is
// stored (B, H, N, K, V).
//
// Backward: with G_t = dL/dS_t the adjoint of the state (G_{T-1} = dL/dS_final, or 0) and
// Gh_t = G_t + q_t do_t^T (the output's share added), the chain rule gives, walking t from T - 1 to 0,
//
//   dsa_t = Gh_t^T b_t                                     (V,)
//   dq_t  = scale S_t do_t = scale (e_t . (S_{t-1} do_t) + b_t (sa_t . do_t) + k_t (v_t . do_t))
//   dk_t  = Gh_t v_t,    dv_t = Gh_t^T k_t,    db_t = Gh_t sa_t
//   dgk_t = e_t . rowsum(Gh_t . S_{t-1})
//   da_t  = S_{t-1} dsa_t
//   G_{t-1} = diag(e_t) Gh_t + a_t dsa_t^T
//
// and dL/dS_0 = G_{-1}. S_{t-1} is needed in the reverse walk but cannot be run backwards (the
// transition may be singular and exp(-gk) would amplify rounding), so each chunk's C states and reads
// are recomputed forward from its checkpoint into local buffers, then walked in reverse. A reverse step
// makes two passes over the rows: the first forms the column sums dsa_t, dv_t and
// the row sums (S_{t-1} do_t, Gh_t v_t, Gh_t sa_t, Gh_t . S_{t-1}); the second, with dsa_t known, the
// row sums S_{t-1} dsa_t and the new adjoint G_{t-1}. Memory: O(B H N K V) checkpoints,
// O(threads C (K V + V)) buffers.

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

// Offsets of token t of task (b, h) in a (B, T, H, K) or (B, T, H, V) tensor.
inline int64_t key_offset(const Sizes& n, int64_t task, int64_t t) { return n.row(task, t) * n.keys; }
inline int64_t value_offset(const Sizes& n, int64_t task, int64_t t) { return n.row(task, t) * n.values; }

// The input pointers of one token.
template <typename scalar_t>
struct Token {
  const scalar_t *q, *k, *v, *a, *b, *gk;
};

template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v, *a, *b, *gk;

  Token<scalar_t> at(const Sizes& n, int64_t task, int64_t t) const {
    const int64_t ko = key_offset(n, task, t), vo = value_offset(n, task, t);
    return {q + ko, k + ko, v + vo, a + ko, b + ko, gk + ko};
  }
};

// How many tokens ahead the rows are prefetched (see seqarch_kernels::prefetch_row).
constexpr int64_t kPrefetchDistance = 8;

template <typename scalar_t>
inline void prefetch_token(const Token<scalar_t>& x, int64_t keys, int64_t values) {
  for (const scalar_t* row : {x.q, x.k, x.a, x.b, x.gk}) prefetch_row(row, keys);
  prefetch_row(x.v, values);
}

// Per-token scalars over K: qs = scale q_t, e = exp(gk_t).
template <typename scalar_t>
inline void token_scalars(const Token<scalar_t>& x, scalar_t scale, int64_t keys, scalar_t* qs, scalar_t* e) {
#pragma omp simd
  for (int64_t i = 0; i < keys; ++i) {
    qs[i] = scale * x.q[i];
    e[i] = decay_exp(x.gk[i]);
  }
}

// sa = S^T a over all columns.
template <typename scalar_t>
inline void read_state(const scalar_t* S, const scalar_t* a, int64_t keys, int64_t values, scalar_t* sa) {
  std::fill(sa, sa + values, scalar_t(0));
  for (int64_t i = 0; i < keys; ++i) {
    const scalar_t ai = a[i];
    const scalar_t* row = S + i * values;
#pragma omp simd
    for (int64_t j = 0; j < values; ++j) sa[j] += ai * row[j];
  }
}

// One token: next = diag(e) prev + b sa^T + k v^T (prev and next may be the same buffer), and from
// each new row, o += qs_i next[i, :] (when WithOutput) and sa_next += a_next_i next[i, :] (when
// WithRead). The loops run over whole rows of V contiguous elements, the V-long sums in L1.
template <bool WithOutput, bool WithRead, typename scalar_t>
inline void token_step(const scalar_t* qs, const scalar_t* e, const Token<scalar_t>& x, const scalar_t* __restrict sa,
                       const scalar_t* a_next, const scalar_t* prev, scalar_t* next, scalar_t* __restrict o,
                       scalar_t* __restrict sa_next, int64_t keys, int64_t values) {
  const scalar_t* __restrict v = x.v;
  if (WithOutput) std::fill(o, o + values, scalar_t(0));
  if (WithRead) std::fill(sa_next, sa_next + values, scalar_t(0));
  // Two rows per iteration: the V-long sums o and sa_next are loaded and stored once per two rows.
  int64_t i = 0;
  for (; i + 2 <= keys; i += 2) {
    const scalar_t e0 = e[i], b0 = x.b[i], k0 = x.k[i], e1 = e[i + 1], b1 = x.b[i + 1], k1 = x.k[i + 1];
    const scalar_t q0 = WithOutput ? qs[i] : scalar_t(0), q1 = WithOutput ? qs[i + 1] : scalar_t(0);
    const scalar_t a0 = WithRead ? a_next[i] : scalar_t(0), a1 = WithRead ? a_next[i + 1] : scalar_t(0);
    const scalar_t* prev0 = prev + i * values;
    const scalar_t* prev1 = prev0 + values;
    scalar_t* next0 = next + i * values;
    scalar_t* next1 = next0 + values;
#pragma omp simd
    for (int64_t j = 0; j < values; ++j) {
      const scalar_t s0 = e0 * prev0[j] + b0 * sa[j] + k0 * v[j];
      const scalar_t s1 = e1 * prev1[j] + b1 * sa[j] + k1 * v[j];
      next0[j] = s0;
      next1[j] = s1;
      if (WithOutput) o[j] += q0 * s0 + q1 * s1;
      if (WithRead) sa_next[j] += a0 * s0 + a1 * s1;
    }
  }
  for (; i < keys; ++i) {
    const scalar_t ei = e[i], bi = x.b[i], ki = x.k[i];
    const scalar_t qi = WithOutput ? qs[i] : scalar_t(0), ai = WithRead ? a_next[i] : scalar_t(0);
    const scalar_t* prev_row = prev + i * values;
    scalar_t* next_row = next + i * values;
#pragma omp simd
    for (int64_t j = 0; j < values; ++j) {
      const scalar_t s = ei * prev_row[j] + bi * sa[j] + ki * v[j];
      next_row[j] = s;
      if (WithOutput) o[j] += qi * s;
      if (WithRead) sa_next[j] += ai * s;
    }
  }
}

template <typename scalar_t>
void forward_kernel(const Sizes& n, const Inputs<scalar_t>& in, const scalar_t* h0, scalar_t scale, scalar_t* out,
                    scalar_t* final_state, scalar_t* checkpoints) {
  const int64_t state_size = n.keys * n.values;
  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> qs(n.keys), e(n.keys);
    // The tasks of one batch element advance in lockstep, token outer and heads inner, so each token's
    // inputs are read as one contiguous (H, K) row (strided per-head walks defeat the prefetchers).
    for (int64_t first = begin; first < end;) {
      const int64_t last = std::min(end, (first / n.heads + 1) * n.heads), count = last - first;
      std::vector<scalar_t> states(count * state_size), reads(count * n.values), reads_next(count * n.values);
      for (int64_t task = first; task < last; ++task) {
        scalar_t* S = states.data() + (task - first) * state_size;
        if (h0) {
          std::memcpy(S, h0 + task * state_size, state_size * sizeof(scalar_t));
        } else {
          std::fill(S, S + state_size, scalar_t(0));
        }
        if (n.len > 0) read_state(S, in.at(n, task, 0).a, n.keys, n.values, reads.data() + (task - first) * n.values);
      }
      for (int64_t t = 0; t < n.len; ++t) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t local = task - first;
          scalar_t* S = states.data() + local * state_size;
          if (checkpoints && t % n.chunk == 0) {
            std::memcpy(checkpoints + (task * n.nchunks + t / n.chunk) * state_size, S, state_size * sizeof(scalar_t));
          }
          const Token<scalar_t> x = in.at(n, task, t);
          token_scalars(x, scale, n.keys, qs.data(), e.data());
          scalar_t* o_t = out + value_offset(n, task, t);
          const scalar_t* sa = reads.data() + local * n.values;
          scalar_t* sa_next = reads_next.data() + local * n.values;
          if (t + 1 < n.len) {
            token_step<true, true, scalar_t>(qs.data(), e.data(), x, sa, in.at(n, task, t + 1).a, S, S, o_t, sa_next,
                                             n.keys, n.values);
          } else {
            token_step<true, false, scalar_t>(qs.data(), e.data(), x, sa, nullptr, S, S, o_t, sa_next, n.keys,
                                              n.values);
          }
        }
        std::swap(reads, reads_next);
      }
      for (int64_t task = first; task < last; ++task) {
        std::memcpy(final_state + task * state_size, states.data() + (task - first) * state_size,
                    state_size * sizeof(scalar_t));
      }
      first = last;
    }
  });
}

// What one reverse step reads and writes: S = S_{t-1}, G = G_t on entry and G_{t-1} on exit.
template <typename scalar_t>
struct Adjoint {
  const scalar_t *qs, *e, *k, *v, *a, *b, *sa, *dout, *S;
  scalar_t *G, *dsa, *dv;
  // Row sums over the columns (K each): S do, Gh v, Gh sa, Gh . S, S dsa.
  scalar_t *s_do, *g_v, *g_sa, *g_s, *s_dsa;
};

// First pass: with Gh = G + qs do^T, the column sums dsa = Gh^T b and dv = Gh^T k, and the row sums
// S do, Gh v, Gh sa, Gh . S. Whole rows of V contiguous elements; the V-long sums in L1.
template <typename scalar_t>
inline void adjoint_sums(const Adjoint<scalar_t>& x, int64_t keys, int64_t values) {
  const scalar_t* __restrict dout = x.dout;
  const scalar_t* __restrict value = x.v;
  const scalar_t* __restrict read = x.sa;
  scalar_t* __restrict dsa = x.dsa;
  scalar_t* __restrict dv = x.dv;
  std::fill(dsa, dsa + values, scalar_t(0));
  std::fill(dv, dv + values, scalar_t(0));
  // Two rows per iteration: the column sums dsa and dv are loaded and stored once per two rows.
  int64_t i = 0;
  for (; i + 2 <= keys; i += 2) {
    const scalar_t q0 = x.qs[i], b0 = x.b[i], k0 = x.k[i], q1 = x.qs[i + 1], b1 = x.b[i + 1], k1 = x.k[i + 1];
    const scalar_t* __restrict S0 = x.S + i * values;
    const scalar_t* __restrict S1 = S0 + values;
    const scalar_t* __restrict G0 = x.G + i * values;
    const scalar_t* __restrict G1 = G0 + values;
    scalar_t sd0 = 0, gv0 = 0, gsa0 = 0, gs0 = 0, sd1 = 0, gv1 = 0, gsa1 = 0, gs1 = 0;
#pragma omp simd reduction(+ : sd0, gv0, gsa0, gs0, sd1, gv1, gsa1, gs1)
    for (int64_t j = 0; j < values; ++j) {
      const scalar_t s0 = S0[j], s1 = S1[j], d = dout[j];
      const scalar_t g0 = G0[j] + q0 * d, g1 = G1[j] + q1 * d;
      dsa[j] += b0 * g0 + b1 * g1;
      dv[j] += k0 * g0 + k1 * g1;
      sd0 += s0 * d;
      sd1 += s1 * d;
      gv0 += g0 * value[j];
      gv1 += g1 * value[j];
      gsa0 += g0 * read[j];
      gsa1 += g1 * read[j];
      gs0 += g0 * s0;
      gs1 += g1 * s1;
    }
    x.s_do[i] = sd0, x.s_do[i + 1] = sd1;
    x.g_v[i] = gv0, x.g_v[i + 1] = gv1;
    x.g_sa[i] = gsa0, x.g_sa[i + 1] = gsa1;
    x.g_s[i] = gs0, x.g_s[i + 1] = gs1;
  }
  for (; i < keys; ++i) {
    const scalar_t qi = x.qs[i], bi = x.b[i], ki = x.k[i];
    const scalar_t* __restrict S_row = x.S + i * values;
    const scalar_t* __restrict G_row = x.G + i * values;
    scalar_t sd = 0, gv = 0, gsa = 0, gs = 0;
#pragma omp simd reduction(+ : sd, gv, gsa, gs)
    for (int64_t j = 0; j < values; ++j) {
      const scalar_t s = S_row[j], g = G_row[j] + qi * dout[j];
      dsa[j] += bi * g;
      dv[j] += ki * g;
      sd += s * dout[j];
      gv += g * value[j];
      gsa += g * read[j];
      gs += g * s;
    }
    x.s_do[i] = sd;
    x.g_v[i] = gv;
    x.g_sa[i] = gsa;
    x.g_s[i] = gs;
  }
}

// Second pass, dsa known: the row sums S dsa, and G <- diag(e) Gh + a dsa^T.
template <typename scalar_t>
inline void adjoint_update(const Adjoint<scalar_t>& x, int64_t keys, int64_t values) {
  const scalar_t* __restrict dout = x.dout;
  const scalar_t* __restrict dsa = x.dsa;
  for (int64_t i = 0; i < keys; ++i) {
    const scalar_t qi = x.qs[i], ei = x.e[i], ai = x.a[i];
    const scalar_t* __restrict S_row = x.S + i * values;
    scalar_t* __restrict G_row = x.G + i * values;
    scalar_t sdsa = 0;
#pragma omp simd reduction(+ : sdsa)
    for (int64_t j = 0; j < values; ++j) {
      sdsa += S_row[j] * dsa[j];
      G_row[j] = ei * (G_row[j] + qi * dout[j]) + ai * dsa[j];
    }
    x.s_dsa[i] = sdsa;
  }
}

template <typename scalar_t>
inline void reverse_step(const Adjoint<scalar_t>& x, int64_t keys, int64_t values) {
  adjoint_sums(x, keys, values);
  adjoint_update(x, keys, values);
}

struct Grads {
  void *dq, *dk, *dv, *da, *db, *dgk, *dh0;
};

template <typename scalar_t>
void backward_kernel(const Sizes& n, const Inputs<scalar_t>& in, scalar_t scale, const scalar_t* checkpoints,
                     const scalar_t* dout, const scalar_t* dfinal, const Grads& grads) {
  scalar_t* dq_p = static_cast<scalar_t*>(grads.dq);
  scalar_t* dk_p = static_cast<scalar_t*>(grads.dk);
  scalar_t* dv_p = static_cast<scalar_t*>(grads.dv);
  scalar_t* da_p = static_cast<scalar_t*>(grads.da);
  scalar_t* db_p = static_cast<scalar_t*>(grads.db);
  scalar_t* dgk_p = static_cast<scalar_t*>(grads.dgk);
  scalar_t* dh0_p = static_cast<scalar_t*>(grads.dh0);
  const int64_t state_size = n.keys * n.values;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    // states[c] = S_{start + c - 1}, reads[c] = sa_{start + c}: what token start + c of the chunk saw.
    std::vector<scalar_t> states(n.chunk * state_size), reads(n.chunk * n.values), adjoint(state_size);
    std::vector<scalar_t> qs(n.keys), e(n.keys), dsa(n.values), sums(5 * n.keys);
    for (int64_t task = begin; task < end; ++task) {
      scalar_t* G = adjoint.data();
      if (dfinal) {
        std::memcpy(G, dfinal + task * state_size, state_size * sizeof(scalar_t));
      } else {
        std::fill(adjoint.begin(), adjoint.end(), scalar_t(0));
      }
      for (int64_t c = n.nchunks - 1; c >= 0; --c) {
        const int64_t start = c * n.chunk, stop = std::min(n.len, start + n.chunk);
        std::memcpy(states.data(), checkpoints + (task * n.nchunks + c) * state_size, state_size * sizeof(scalar_t));
        read_state(states.data(), in.at(n, task, start).a, n.keys, n.values, reads.data());
        for (int64_t t = start; t + 1 < stop; ++t) {
          if (t + kPrefetchDistance < stop) prefetch_token(in.at(n, task, t + kPrefetchDistance), n.keys, n.values);
          const Token<scalar_t> x = in.at(n, task, t);
          const int64_t local = t - start;
          token_scalars(x, scale, n.keys, qs.data(), e.data());
          token_step<false, true, scalar_t>(qs.data(), e.data(), x, reads.data() + local * n.values, in.at(n, task, t + 1).a,
                                  states.data() + local * state_size, states.data() + (local + 1) * state_size,
                                  nullptr, reads.data() + (local + 1) * n.values, n.keys, n.values);
        }
        for (int64_t t = stop - 1; t >= start; --t) {
          if (t - kPrefetchDistance >= 0) {  // the previous chunk's tokens too: it is walked next
            const int64_t ahead = value_offset(n, task, t - kPrefetchDistance);
            prefetch_token(in.at(n, task, t - kPrefetchDistance), n.keys, n.values);
            prefetch_row(dout + ahead, n.values);
          }
          const Token<scalar_t> x = in.at(n, task, t);
          const int64_t local = t - start, ko = key_offset(n, task, t), vo = value_offset(n, task, t);
          token_scalars(x, scale, n.keys, qs.data(), e.data());
          const scalar_t* sa = reads.data() + local * n.values;
          const scalar_t* do_t = dout + vo;
          scalar_t sa_do = 0, v_do = 0;
#pragma omp simd reduction(+ : sa_do, v_do)
          for (int64_t j = 0; j < n.values; ++j) {
            sa_do += sa[j] * do_t[j];
            v_do += x.v[j] * do_t[j];
          }
          scalar_t* s_do = sums.data();
          scalar_t* g_v = s_do + n.keys;
          scalar_t* g_sa = g_v + n.keys;
          scalar_t* g_s = g_sa + n.keys;
          scalar_t* s_dsa = g_s + n.keys;
          const Adjoint<scalar_t> adj{qs.data(), e.data(), x.k, x.v, x.a, x.b, sa, do_t,
                                      states.data() + local * state_size, G, dsa.data(), dv_p + vo,
                                      s_do, g_v, g_sa, g_s, s_dsa};
          reverse_step(adj, n.keys, n.values);
#pragma omp simd
          for (int64_t i = 0; i < n.keys; ++i) {
            dq_p[ko + i] = scale * (e[i] * s_do[i] + x.b[i] * sa_do + x.k[i] * v_do);
            dk_p[ko + i] = g_v[i];
            db_p[ko + i] = g_sa[i];
            dgk_p[ko + i] = e[i] * g_s[i];
            da_p[ko + i] = s_dsa[i];
          }
        }
      }
      std::memcpy(dh0_p + task * state_size, G, state_size * sizeof(scalar_t));
    }
  });
}

Sizes sizes_of(const at::Tensor& q, const at::Tensor& v, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "generalized_delta_rule kernel: q and v must be (B, T, H, K / V)");
  return seqarch_kernels::chunk_sizes("generalized_delta_rule", q.size(0), q.size(1), q.size(2), q.size(3), v.size(3),
                                      chunk);
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                           const at::Tensor& b, const at::Tensor& gk) {
  return {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>()};
}

void check_inputs(const std::vector<at::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == tensors[0].scalar_type(),
                "generalized_delta_rule kernel: inputs must be contiguous CPU tensors of one dtype");
  }
}

// q, k, a, b, gk (B, T, H, K), v (B, T, H, V), h0 (B, H, K, V) or None, all contiguous, one floating
// dtype. Returns out (B, T, H, V), the final state (B, H, K, V) and, when store_checkpoints, the state
// entering every chunk of `chunk` tokens (B, H, N, K, V), else an empty tensor.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                                const at::Tensor& b, const at::Tensor& gk, const c10::optional<at::Tensor>& h0,
                                double scale, int64_t chunk, bool store_checkpoints) {
  const Sizes n = sizes_of(q, v, chunk);
  check_inputs({q, k, v, a, b, gk});
  auto out = at::empty_like(v);
  auto final_state = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  auto checkpoints = seqarch_kernels::empty_checkpoints(n, store_checkpoints, v.options());
  const at::Tensor h0_t = value_or_undefined(h0);
  if (h0_t.defined()) check_inputs({q, h0_t});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "generalized_delta_rule_forward", [&] {
    forward_kernel<scalar_t>(n, inputs_of<scalar_t>(q, k, v, a, b, gk), data_or_null<scalar_t>(h0_t),
                             static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), final_state.data_ptr<scalar_t>(),
                             store_checkpoints ? checkpoints.data_ptr<scalar_t>() : nullptr);
  });
  return {out, final_state, checkpoints};
}

// The inputs of `forward`, its checkpoints, dout (B, T, H, V) and dL/d(final state) (B, H, K, V) or
// None. Returns dq, dk, dv, da, db, dgk, d initial_state (B, H, K, V).
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& gk, double scale, const at::Tensor& checkpoints,
                                 const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal, int64_t chunk) {
  const Sizes n = sizes_of(q, v, chunk);
  check_inputs({q, k, v, a, b, gk, checkpoints, dout});
  seqarch_kernels::check_checkpoints("generalized_delta_rule", n, checkpoints);
  TORCH_CHECK(dout.sizes() == v.sizes(), "generalized_delta_rule kernel: dout must have v's shape");
  const at::Tensor dfinal_t = value_or_undefined(dfinal);
  if (dfinal_t.defined()) check_inputs({q, dfinal_t});
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto da = at::empty_like(a), db = at::empty_like(b), dgk = at::empty_like(gk);
  auto dh0 = at::empty({n.batch, n.heads, n.keys, n.values}, v.options());
  const Grads grads{dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(), dgk.data_ptr(),
                    dh0.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "generalized_delta_rule_backward", [&] {
    backward_kernel<scalar_t>(n, inputs_of<scalar_t>(q, k, v, a, b, gk), static_cast<scalar_t>(scale),
                              checkpoints.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                              data_or_null<scalar_t>(dfinal_t), grads);
  });
  return {dq, dk, dv, da, db, dgk, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused generalized delta rule forward: out, final state, chunk checkpoints");
  m.def("backward", &backward, "fused generalized delta rule backward: dq, dk, dv, da, db, dgk, d initial_state");
}
