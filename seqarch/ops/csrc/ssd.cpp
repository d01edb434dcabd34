// The two steps of the chunked SSD (seqarch/ops/ssd.py) that are not matrix products at the matmul
// floor, forward and backward, on the CPU: the diagonal blocks and the state passing between chunks.
//
// Legend: B batch, T = K Q padded length, K chunks of Q tokens, H heads of P channels, G groups of B/C
// (head h reads group h / R, R = H / G), S the flattened (P, N) state of one head.
//
// 1. Diagonal blocks. Inside chunk k, for head h and positions s <= q of the chunk,
//
//      y[q] = sum_{s <= q} exp(cum[q] - cum[s]) scores[q, s] dt[s] x[s]          (scores = C B^T of the group)
//
//    with cum the chunk-local cumulative sum of dt A. One task per (batch, chunk, head) keeps its
//    (Q, Q) weights and (Q, P) inputs in L1 and writes y in x's own (B, T, H, P) layout, so neither the
//    (B, H, K, Q, Q) decay tensor nor a head-major copy of dt x is ever stored. The exponents are
//    differences of a non-increasing cumulative sum (dt A <= 0) taken only for s <= q, so they are <= 0:
//    no exp of the masked upper triangle, no inf times 0. Backward, one task per (batch, chunk, group)
//    walking the R heads of the group (they share scores, whose gradient is summed over them):
//      dW[q, s] = dy[q] . dt[s] x[s]              dscores[q, s] += dW exp(cum[q] - cum[s])
//      d(dt x)[s] = sum_{q >= s} W[q, s] dy[q]    dcum[q] += sum_s dW W,  dcum[s] -= dW W
//    with W = exp(cum[q] - cum[s]) scores[q, s]; then dx = d(dt x) dt and ddt = d(dt x) . x.
//    The same pass adds the rest of the chunk's output when given: step 4's read-out of the entering
//    state decayed to each position, exp(cum[q]) y_off[q], and the skip D x[q], so y is written once.
//
// 3. State passing.
//
//   states[0]     = initial                                   (zeros when absent)
//   states[k + 1] = exp(totals[k]) states[k] + chunk_states[k],   k = 0 .. K - 1
//
// chunk_states (B, K, H, S), totals (B, K, H) (each chunk's sum of dt A), states (B, K + 1, H, S): the
// layout the chunk-state product produces and the read-out by C consumes, so neither side copies.
// One task per (batch, head) walks the chunks in order; each step is one streaming pass over S numbers.
// Backward, with G[k] the gradient reaching states[k] through everything after it:
//   G[K] = dstates[K],   G[k] = dstates[k] + exp(totals[k]) G[k + 1]
//   dchunk_states[k] = G[k + 1],   dtotals[k] = exp(totals[k]) <G[k + 1], states[k]>,   dinitial = G[0].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using seqarch_kernels::decay_exp;

// --- 1. diagonal blocks ------------------------------------------------------------------------------
struct BlockSizes {
  int64_t batch, len, heads, headdim, groups, chunk, chunks;
  int64_t x_batch, x_time, x_head;  // strides of x (its channels are contiguous)
  // Index (b, t, h) of a contiguous (B, T, H) tensor (dt, cum).
  int64_t at(int64_t b, int64_t t, int64_t h) const { return (b * len + t) * heads + h; }
  int64_t x_row(int64_t b, int64_t t, int64_t h) const { return b * x_batch + t * x_time + h * x_head; }
  // The (Q, Q) scores block of (batch, chunk, group) in a contiguous (B, K, G, Q, Q) tensor.
  int64_t scores_block(int64_t b, int64_t k, int64_t g) const { return ((b * chunks + k) * groups + g) * chunk * chunk; }
  // Row (b, chunk k, position q, head h) of a contiguous (B, K, G, Q, R P) tensor (step 4's y_off).
  int64_t off_row(int64_t b, int64_t k, int64_t q, int64_t h) const {
    const int64_t per_group = heads / groups, g = h / per_group;
    return ((((b * chunks + k) * groups + g) * chunk + q) * per_group + h % per_group) * headdim;
  }
};

// The optional extra terms of the chunk output: y[q] += exp(cum[q]) y_off[q] + D x[q].
template <typename scalar_t>
struct Extras {
  const scalar_t* y_off;  // (B, K, G, Q, R P) contiguous: step 4's read-out of the entering state, or null
  const scalar_t* D;      // (H, P) contiguous, or null
};

// PC: the head dim P as a compile-time constant (32, 64), so the row accumulator of y stays in registers
// across the sum over s; 0 for any other P (read at run time).
template <typename scalar_t, int PC>
void blocks_forward_kernel(const BlockSizes& n, const scalar_t* x, const scalar_t* dt, const scalar_t* cum,
                           const scalar_t* scores, const Extras<scalar_t>& extra, scalar_t* y) {
  const int64_t Q = n.chunk, P = PC > 0 ? PC : n.headdim, per_group = n.heads / n.groups;
  at::parallel_for(0, n.batch * n.chunks * n.heads, 4, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> cl(Q), xl(Q * P), w(Q), acc_buffer(P);
    scalar_t* __restrict acc = acc_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % n.heads, k = (task / n.heads) % n.chunks, b = task / (n.heads * n.chunks);
      const int64_t t0 = k * Q, g = h / per_group;
      for (int64_t s = 0; s < Q; ++s) {
        cl[s] = cum[n.at(b, t0 + s, h)];
        const scalar_t d = dt[n.at(b, t0 + s, h)];
        const scalar_t* xs = x + n.x_row(b, t0 + s, h);
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) xl[s * P + p] = d * xs[p];
      }
      const scalar_t* sc = scores + n.scores_block(b, k, g);
      for (int64_t q = 0; q < Q; ++q) {
        const scalar_t cq = cl[q];
        const scalar_t* row = sc + q * Q;
#pragma omp simd
        for (int64_t s = 0; s <= q; ++s) w[s] = decay_exp(cq - cl[s]) * row[s];
        scalar_t local[PC > 0 ? PC : 1];
        scalar_t* __restrict out_row = PC > 0 ? local : acc;
        for (int64_t p = 0; p < P; ++p) out_row[p] = scalar_t(0);
        if (extra.y_off) {
          const scalar_t e = decay_exp(cq);
          const scalar_t* yo = extra.y_off + n.off_row(b, k, q, h);
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) out_row[p] = e * yo[p];
        }
        if (extra.D) {
          const scalar_t* xq = x + n.x_row(b, t0 + q, h);
          const scalar_t* Dh = extra.D + h * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) out_row[p] += Dh[p] * xq[p];
        }
        const scalar_t* __restrict xv = xl.data();
        for (int64_t s = 0; s <= q; ++s) {
          const scalar_t ws = w[s];
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) out_row[p] += ws * xv[s * P + p];
        }
        scalar_t* out = y + ((b * n.len + t0 + q) * n.heads + h) * P;
        std::copy(out_row, out_row + P, out);
      }
    }
  });
}

// Gradients of the extra terms: dy_off (like y_off), dD per (batch, chunk) (B K, H, P), summed by the caller.
template <typename scalar_t>
struct ExtraGrads {
  scalar_t* dy_off;
  scalar_t* dD_per_chunk;
};

template <typename scalar_t>
void blocks_backward_kernel(const BlockSizes& n, const scalar_t* x, const scalar_t* dt, const scalar_t* cum,
                            const scalar_t* scores, const Extras<scalar_t>& extra, const scalar_t* dy, scalar_t* dx,
                            scalar_t* ddt, scalar_t* dcum, scalar_t* dscores, const ExtraGrads<scalar_t>& dextra) {
  const int64_t Q = n.chunk, P = n.headdim, per_group = n.heads / n.groups;
  at::parallel_for(0, n.batch * n.chunks * n.groups, 1, [&](int64_t begin, int64_t end) {
    // xT (P, Q): dt x transposed, so the products over P run along s; dxT (P, Q) its gradient.
    std::vector<scalar_t> cl(Q), dtl(Q), xT(P * Q), dxT(P * Q), w(Q), dec(Q), dw(Q), dcl(Q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % n.groups, k = (task / n.groups) % n.chunks, b = task / (n.groups * n.chunks);
      const int64_t t0 = k * Q;
      const scalar_t* sc = scores + n.scores_block(b, k, g);
      scalar_t* dsc = dscores + n.scores_block(b, k, g);
      std::fill(dsc, dsc + Q * Q, scalar_t(0));
      for (int64_t h = g * per_group; h < (g + 1) * per_group; ++h) {
        for (int64_t s = 0; s < Q; ++s) {
          cl[s] = cum[n.at(b, t0 + s, h)];
          dtl[s] = dt[n.at(b, t0 + s, h)];
          const scalar_t* xs = x + n.x_row(b, t0 + s, h);
          for (int64_t p = 0; p < P; ++p) xT[p * Q + s] = dtl[s] * xs[p];
        }
        std::fill(dxT.begin(), dxT.end(), scalar_t(0));
        std::fill(dcl.begin(), dcl.end(), scalar_t(0));
        for (int64_t q = 0; q < Q; ++q) {
          const scalar_t cq = cl[q];
          const scalar_t* row = sc + q * Q;
          const scalar_t* dyq = dy + ((b * n.len + t0 + q) * n.heads + h) * P;
#pragma omp simd
          for (int64_t s = 0; s <= q; ++s) {
            dec[s] = decay_exp(cq - cl[s]);
            w[s] = dec[s] * row[s];
            dw[s] = scalar_t(0);
          }
          for (int64_t p = 0; p < P; ++p) {
            const scalar_t g_qp = dyq[p];
            const scalar_t* xp = xT.data() + p * Q;
            scalar_t* dxp = dxT.data() + p * Q;
#pragma omp simd
            for (int64_t s = 0; s <= q; ++s) {
              dw[s] += g_qp * xp[s];
              dxp[s] += g_qp * w[s];
            }
          }
          scalar_t* dsc_row = dsc + q * Q;
          scalar_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
          for (int64_t s = 0; s <= q; ++s) {
            dsc_row[s] += dw[s] * dec[s];
            const scalar_t dseg = dw[s] * w[s];
            dcl[s] -= dseg;
            row_sum += dseg;
          }
          if (extra.y_off) {  // y[q] += exp(cum[q]) y_off[q]
            const scalar_t e = decay_exp(cq);
            const scalar_t* yo = extra.y_off + n.off_row(b, k, q, h);
            scalar_t* dyo = dextra.dy_off + n.off_row(b, k, q, h);
            scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t p = 0; p < P; ++p) {
              dyo[p] = e * dyq[p];
              dot += dyq[p] * yo[p];
            }
            row_sum += e * dot;
          }
          dcl[q] += row_sum;
        }
        scalar_t* dD = dextra.dD_per_chunk ? dextra.dD_per_chunk + ((b * n.chunks + k) * n.heads + h) * P : nullptr;
        for (int64_t s = 0; s < Q; ++s) {
          const scalar_t* xs = x + n.x_row(b, t0 + s, h);
          const scalar_t* dys = dy + ((b * n.len + t0 + s) * n.heads + h) * P;
          scalar_t* dxs = dx + ((b * n.len + t0 + s) * n.heads + h) * P;
          scalar_t dot = 0;
          for (int64_t p = 0; p < P; ++p) {
            const scalar_t d = dxT[p * Q + s];
            dxs[p] = d * dtl[s];
            dot += d * xs[p];
          }
          if (dD) {  // y[s] += D x[s]
            const scalar_t* Dh = extra.D + h * P;
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) {
              dxs[p] += Dh[p] * dys[p];
              dD[p] += dys[p] * xs[p];
            }
          }
          ddt[n.at(b, t0 + s, h)] = dot;
          dcum[n.at(b, t0 + s, h)] = dcl[s];
        }
      }
    }
  });
}

BlockSizes block_sizes(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& cum, const at::Tensor& scores,
                       int64_t chunk) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "ssd diagonal-block kernel: x must be (B, T, H, P), channels contiguous");
  const int64_t batch = x.size(0), len = x.size(1), heads = x.size(2);
  TORCH_CHECK(chunk >= 1 && len % chunk == 0, "ssd diagonal-block kernel: T must be a multiple of the chunk");
  TORCH_CHECK(dt.is_contiguous() && cum.is_contiguous() && dt.numel() == batch * len * heads &&
                  cum.numel() == dt.numel(), "ssd diagonal-block kernel: dt and cum must be contiguous (B, T, H)");
  const int64_t chunks = len / chunk;
  TORCH_CHECK(scores.is_contiguous() && scores.dim() == 5 && scores.size(1) == chunks && scores.size(3) == chunk &&
                  heads % scores.size(2) == 0, "ssd diagonal-block kernel: scores must be contiguous (B, K, G, Q, Q)");
  return {batch, len, heads, x.size(3), scores.size(2), chunk, chunks, x.stride(0), x.stride(1), x.stride(2)};
}

template <typename scalar_t>
Extras<scalar_t> extras_of(const BlockSizes& n, const at::Tensor& y_off, const at::Tensor& D) {
  TORCH_CHECK(!y_off.defined() || (y_off.is_contiguous() && y_off.numel() == n.batch * n.len * n.heads * n.headdim),
              "ssd diagonal-block kernel: y_off must be a contiguous (B, K, G, Q, R P) tensor");
  TORCH_CHECK(!D.defined() || (D.is_contiguous() && D.numel() == n.heads * n.headdim),
              "ssd diagonal-block kernel: D must be a contiguous (H, P) tensor");
  return {seqarch_kernels::data_or_null<scalar_t>(y_off), seqarch_kernels::data_or_null<scalar_t>(D)};
}

// x (B, T, H, P), dt and cum (B, T, H), scores (B, K, G, Q, Q), y_off (B, K, G, Q, R P) or None, D (H, P)
// or None -> y (B, T, H, P).
at::Tensor blocks_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& cum, const at::Tensor& scores,
                          int64_t chunk, const c10::optional<at::Tensor>& y_off, const c10::optional<at::Tensor>& D) {
  const BlockSizes n = block_sizes(x, dt, cum, scores, chunk);
  const at::Tensor off = seqarch_kernels::value_or_undefined(y_off), skip = seqarch_kernels::value_or_undefined(D);
  auto y = at::empty({n.batch, n.len, n.heads, n.headdim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_blocks_forward", [&] {
    const auto run = [&](auto kernel) {
      kernel(n, x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), cum.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(),
             extras_of<scalar_t>(n, off, skip), y.data_ptr<scalar_t>());
    };
    if (n.headdim == 32) {
      run(blocks_forward_kernel<scalar_t, 32>);
    } else if (n.headdim == 64) {
      run(blocks_forward_kernel<scalar_t, 64>);
    } else {
      run(blocks_forward_kernel<scalar_t, 0>);
    }
  });
  return y;
}

// -> dx (B, T, H, P), ddt (B, T, H), dcum (B, T, H), dscores (B, K, G, Q, Q), dy_off (like y_off, or
// undefined), dD (H, P) (or undefined).
std::vector<at::Tensor> blocks_backward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& cum,
                                        const at::Tensor& scores, const at::Tensor& dy, int64_t chunk,
                                        const c10::optional<at::Tensor>& y_off, const c10::optional<at::Tensor>& D) {
  const BlockSizes n = block_sizes(x, dt, cum, scores, chunk);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes(), "ssd diagonal-block kernel: dy must be contiguous like x");
  const at::Tensor off = seqarch_kernels::value_or_undefined(y_off), skip = seqarch_kernels::value_or_undefined(D);
  auto dx = at::empty({n.batch, n.len, n.heads, n.headdim}, x.options());
  auto ddt = at::empty_like(dt);
  auto dcum = at::empty_like(cum);
  auto dscores = at::empty_like(scores);
  auto doff = off.defined() ? at::empty_like(off) : at::Tensor();
  auto dD_per_chunk = skip.defined() ? at::zeros({n.batch * n.chunks, n.heads, n.headdim}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_blocks_backward", [&] {
    const ExtraGrads<scalar_t> dextra{doff.defined() ? doff.data_ptr<scalar_t>() : nullptr,
                                      dD_per_chunk.defined() ? dD_per_chunk.data_ptr<scalar_t>() : nullptr};
    blocks_backward_kernel<scalar_t>(n, x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), cum.data_ptr<scalar_t>(),
                                     scores.data_ptr<scalar_t>(), extras_of<scalar_t>(n, off, skip),
                                     dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), ddt.data_ptr<scalar_t>(),
                                     dcum.data_ptr<scalar_t>(), dscores.data_ptr<scalar_t>(), dextra);
  });
  return {dx, ddt, dcum, dscores, doff, skip.defined() ? dD_per_chunk.sum(0) : at::Tensor()};
}

// --- 3. state passing --------------------------------------------------------------------------------

struct Sizes {
  int64_t batch, chunks, heads, size;
  // Row (b, k, h) of a (B, K', H, S) tensor with K' chunk entries.
  int64_t row(int64_t b, int64_t k, int64_t h, int64_t entries) const { return ((b * entries + k) * heads + h) * size; }
};

template <typename scalar_t>
void states_forward_kernel(const Sizes& n, const scalar_t* chunk_states, const scalar_t* totals, const scalar_t* initial,
                    scalar_t* states) {
  const int64_t size = n.size;
  at::parallel_for(0, n.batch * n.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, h = task % n.heads;
      scalar_t* first = states + n.row(b, 0, h, n.chunks + 1);
      if (initial) {
        const scalar_t* init = initial + (b * n.heads + h) * size;
#pragma omp simd
        for (int64_t s = 0; s < size; ++s) first[s] = init[s];
      } else {
#pragma omp simd
        for (int64_t s = 0; s < size; ++s) first[s] = scalar_t(0);
      }
      for (int64_t k = 0; k < n.chunks; ++k) {
        const scalar_t decay = std::exp(totals[(b * n.chunks + k) * n.heads + h]);
        const scalar_t* prev = states + n.row(b, k, h, n.chunks + 1);
        const scalar_t* add = chunk_states + n.row(b, k, h, n.chunks);
        scalar_t* cur = states + n.row(b, k + 1, h, n.chunks + 1);
#pragma omp simd
        for (int64_t s = 0; s < size; ++s) cur[s] = decay * prev[s] + add[s];
      }
    }
  });
}

template <typename scalar_t>
void states_backward_kernel(const Sizes& n, const scalar_t* totals, const scalar_t* states, const scalar_t* dstates,
                     scalar_t* grads, scalar_t* dtotals) {
  const int64_t size = n.size, entries = n.chunks + 1;
  at::parallel_for(0, n.batch * n.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, h = task % n.heads;
      {
        const scalar_t* d = dstates + n.row(b, n.chunks, h, entries);
        scalar_t* g = grads + n.row(b, n.chunks, h, entries);
#pragma omp simd
        for (int64_t s = 0; s < size; ++s) g[s] = d[s];
      }
      for (int64_t k = n.chunks - 1; k >= 0; --k) {
        const int64_t at_k = (b * n.chunks + k) * n.heads + h;
        const scalar_t decay = std::exp(totals[at_k]);
        const scalar_t* next = grads + n.row(b, k + 1, h, entries);
        const scalar_t* state = states + n.row(b, k, h, entries);
        const scalar_t* d = dstates + n.row(b, k, h, entries);
        scalar_t* g = grads + n.row(b, k, h, entries);
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t s = 0; s < size; ++s) {
          dot += next[s] * state[s];
          g[s] = d[s] + decay * next[s];
        }
        dtotals[at_k] = decay * dot;
      }
    }
  });
}

Sizes sizes_of(const at::Tensor& chunk_states) {
  TORCH_CHECK(chunk_states.dim() == 4 && chunk_states.is_contiguous(),
              "ssd state passing kernel: chunk_states must be a contiguous (B, K, H, S) tensor");
  return {chunk_states.size(0), chunk_states.size(1), chunk_states.size(2), chunk_states.size(3)};
}

// chunk_states (B, K, H, S), totals (B, K, H), initial (B, H, S) or None -> states (B, K + 1, H, S).
at::Tensor states_forward(const at::Tensor& chunk_states, const at::Tensor& totals, const c10::optional<at::Tensor>& initial) {
  const Sizes n = sizes_of(chunk_states);
  const at::Tensor t = totals.contiguous();
  const at::Tensor init = initial.has_value() ? initial.value().contiguous() : at::Tensor();
  TORCH_CHECK(t.numel() == n.batch * n.chunks * n.heads, "ssd state passing kernel: totals must be (B, K, H)");
  TORCH_CHECK(!init.defined() || init.numel() == n.batch * n.heads * n.size,
              "ssd state passing kernel: initial must be (B, H, S)");
  auto states = at::empty({n.batch, n.chunks + 1, n.heads, n.size}, chunk_states.options());
  AT_DISPATCH_FLOATING_TYPES(chunk_states.scalar_type(), "ssd_pass_states_forward", [&] {
    states_forward_kernel<scalar_t>(n, chunk_states.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                             init.defined() ? init.data_ptr<scalar_t>() : nullptr, states.data_ptr<scalar_t>());
  });
  return states;
}

// -> G (B, K + 1, H, S) (dchunk_states = G[:, 1:], dinitial = G[:, 0]), dtotals (B, K, H).
std::vector<at::Tensor> states_backward(const at::Tensor& totals, const at::Tensor& states, const at::Tensor& dstates) {
  TORCH_CHECK(states.dim() == 4 && states.is_contiguous() && dstates.sizes() == states.sizes(),
              "ssd state passing kernel: states and dstates must be (B, K + 1, H, S)");
  const Sizes n{states.size(0), states.size(1) - 1, states.size(2), states.size(3)};
  const at::Tensor t = totals.contiguous();
  const at::Tensor d = dstates.contiguous();
  auto grads = at::empty_like(states);
  auto dtotals = at::empty({n.batch, n.chunks, n.heads}, states.options());
  AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "ssd_pass_states_backward", [&] {
    states_backward_kernel<scalar_t>(n, t.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                              grads.data_ptr<scalar_t>(), dtotals.data_ptr<scalar_t>());
  });
  return {grads, dtotals};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("blocks_forward", &blocks_forward, "SSD chunk output: diagonal blocks (+ decayed y_off, + D x): y");
  m.def("blocks_backward", &blocks_backward, "its backward: dx, ddt, dcum, dscores, dy_off, dD");
  m.def("states_forward", &states_forward, "SSD state passing: the state entering every chunk, and the final state");
  m.def("states_backward", &states_backward, "its backward: the gradient reaching every state, dtotals");
}
