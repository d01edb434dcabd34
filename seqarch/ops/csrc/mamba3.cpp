// The chunk-local part of Mamba-3's chunked scan on the CPU, forward and backward (seqarch.ops.mamba3).
//
// Lahoti et al. (2026), "Mamba-3" (arXiv 2603.15569): the exponential-trapezoidal SSM written as
// SSD with a modified mask (the module docstring of seqarch/ops/mamba3.py derives it). This kernel
// takes what that file's `_ChunkedScan` computes before its products (the rotated, biased k and q,
// the values v and, per row of every chunk, the chunk-local cumulative log-decay `cum`, the column
// scale and the same-time weight `current`) and runs the products, one task per (batch, head) on
// ATen's thread pool, the chunks of a task in order with the state in a local buffer. Rows of a
// chunk are (time, rank) pairs, M = Q R; row i's time is i / R.
//
// Legend: B batch, H heads, K chunks, M rows per chunk, N state size, P head dim.
// Inputs (contiguous, one floating dtype): k, q (B, H, K M, N), v (B, H, K M, P), cum, scale,
// current (B, H, K, M), h0 (B, H, P, N) or None, D (H,) or None.
//
// Forward per chunk, with the entering state S (P, N):
//
//   W[i, j]   = exp(cum_i - cum_j) scale_j  if time(i) > time(j);  current_i  if time(i) = time(j);  0 else
//   Mix       = (q k^T) o W  (+ D on the diagonal)
//   y         = Mix v + diag(exp(cum)) q S^T
//   S        <- exp(cum_end) S + (v o exp(cum_end - cum) scale)^T k
//
// exp only sees non-positive arguments (cum is a cumulative sum of dt A <= 0 from the chunk's start).
// With `store` the entering state of every chunk is kept, (B, H, K, P, N), for the backward.
//
// Backward per chunk in reverse, with dS the gradient of the state after the chunk (dL/d final at the
// end), E = diag(exp(cum)), vw = v o to_end, to_end = exp(cum_end - cum) scale:
//
//   dq  = E dy S + (dMix o W) k             dk = vw dS + (dMix o W)^T q        dMix = dy v^T
//   dv  = Mix^T dy + (k dS^T) o to_end      dS_in = exp(cum_end) dS + (E dy)^T q
//   d cum, d scale, d current from the exponents and weights above (chain rule through W, E, to_end
//   and exp(cum_end)), dD = sum of diag(dMix), and dL/d h0 = the last dS_in.
//
// The (M x M x N), (M x P x N) products run through one register-tiled routine (`gemm`): rows of
// the right operand contiguous, the left operand read through strides (so transposes cost nothing
// there), 4 rows x 4 vectors of accumulators; the few right operands that need a transpose (k^T, S^T,
// dS^T, v^T) are transposed into small buffers per chunk.

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
using seqarch_kernels::decay_exp;
using seqarch_kernels::value_or_undefined;

// One 64-byte vector of T (GCC vector extension; lowered to what the target has), loadable unaligned.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int lanes = 64 / sizeof(T);
};

// C (m, n) = (or +=) A (m, kd) B (kd, n), A(i, k) = A[i * a_rs + k * a_cs], B rows of length n at B + k * ldb,
// C rows at C + i * ldc. `kmax(i)` (optional, via k_limit) bounds the k range of row block starting at i: rows
// i..i+3 only read A(i, k) for k < k_limit(i + 3) (a lower-triangular A), the rest being zero.
template <typename T, int R, int NV>
inline void gemm_block(int64_t kd, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? *reinterpret_cast<const V*>(C + r * ldc + v * L) : V{};
    }
  }
  for (int64_t k = 0; k < kd; ++k) {
    const T* b = B + k * ldb;
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * L);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T a = A[r * a_rs + k * a_cs];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + r * ldc + v * L) = acc[r][v];
  }
}

template <typename T, int R>
inline void gemm_rows(int64_t n, int64_t kd, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  constexpr int L = Vec<T>::lanes;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) gemm_block<T, R, 4>(kd, A, a_rs, a_cs, B + j, ldb, C + j, ldc, accumulate);
  for (; j + L <= n; j += L) gemm_block<T, R, 1>(kd, A, a_rs, a_cs, B + j, ldb, C + j, ldc, accumulate);
  for (; j < n; ++j) {  // the columns past the last full vector
    for (int r = 0; r < R; ++r) {
      T sum = accumulate ? C[r * ldc + j] : T(0);
      for (int64_t k = 0; k < kd; ++k) sum += A[r * a_rs + k * a_cs] * B[k * ldb + j];
      C[r * ldc + j] = sum;
    }
  }
}

// C (m, n) (+)= A (m, kd) B (kd, n), see gemm_block. With `lower` > 0, row i of A is zero past column
// (i / lower + 1) lower (the rows of a chunk's lower block-triangular matrix, blocks of `lower` rows),
// and those columns are skipped.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t kd, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate, int64_t lower = 0) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const int64_t reach = lower ? std::min(kd, ((i + 3) / lower + 1) * lower) : kd;
    gemm_rows<T, 4>(n, reach, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, accumulate);
  }
  for (; i < m; ++i) {
    const int64_t reach = lower ? std::min(kd, (i / lower + 1) * lower) : kd;
    gemm_rows<T, 1>(n, reach, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, accumulate);
  }
}

// out (cols, rows) = in (rows, cols)^T, in rows at in + r * ld.
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* in, int64_t ld, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = in[r * ld + c];
  }
}

struct Sizes {
  int64_t batch, heads, chunks, rows, rank, dstate, headdim;
  int64_t grain() const {
    // (batch, head) tasks per thread at least: a second thread only pays for itself beyond ~2^20
    // multiply-adds (each task does about K M (M + P) N of them).
    const int64_t work = chunks * rows * (rows + headdim) * dstate;
    return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, work));
  }
};

// The chunk weights W (M, M) of the docstring (0 outside the lower block triangle) and, when `seg` is
// given, the decays exp(cum_i - cum_j) of the strictly later pairs (0 elsewhere).
template <typename T>
void chunk_weights(const Sizes& n, const T* cum, const T* scale, const T* current, T* W, T* seg) {
  const int64_t M = n.rows, R = n.rank;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t start = (i / R) * R;  // the first row of i's time
    T* w = W + i * M;
    T* s = seg ? seg + i * M : nullptr;
    const T ci = cum[i];
    for (int64_t j = 0; j < start; ++j) {
      const T decay = decay_exp(ci - cum[j]);
      w[j] = decay * scale[j];
      if (s) s[j] = decay;
    }
    for (int64_t j = start; j < start + R; ++j) {
      w[j] = current[i];
      if (s) s[j] = T(0);
    }
    for (int64_t j = start + R; j < M; ++j) {
      w[j] = T(0);
      if (s) s[j] = T(0);
    }
  }
}

template <typename T>
void forward_kernel(const Sizes& n, const at::Tensor& k_t, const at::Tensor& q_t, const at::Tensor& v_t,
                    const at::Tensor& cum_t, const at::Tensor& scale_t, const at::Tensor& current_t,
                    const at::Tensor& h0_t, const at::Tensor& D_t, at::Tensor& y_t, at::Tensor& final_t,
                    at::Tensor& entering_t) {
  const T *kp = k_t.data_ptr<T>(), *qp = q_t.data_ptr<T>(), *vp = v_t.data_ptr<T>();
  const T *cump = cum_t.data_ptr<T>(), *scalep = scale_t.data_ptr<T>(), *currentp = current_t.data_ptr<T>();
  const T *h0p = data_or_null<T>(h0_t), *Dp = data_or_null<T>(D_t);
  T *yp = y_t.data_ptr<T>(), *finalp = final_t.data_ptr<T>();
  T* enterp = entering_t.numel() ? entering_t.data_ptr<T>() : nullptr;
  const int64_t M = n.rows, N = n.dstate, P = n.headdim, K = n.chunks, state = P * N;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> S(state), St(state), kT(N * M), W(M * M), mix(M * M), y_in(M * P), vw(M * P), ecum(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task % n.heads;
      if (h0p) {
        std::memcpy(S.data(), h0p + task * state, state * sizeof(T));
      } else {
        std::fill(S.begin(), S.end(), T(0));
      }
      for (int64_t c = 0; c < K; ++c) {
        const int64_t row0 = task * K * M + c * M;
        const T *k = kp + row0 * N, *q = qp + row0 * N, *v = vp + row0 * P;
        const T *cum = cump + row0, *scale = scalep + row0, *current = currentp + row0;
        T* y = yp + row0 * P;
        if (enterp) std::memcpy(enterp + (task * K + c) * state, S.data(), state * sizeof(T));

        // Diagonal block: y = ((q k^T) o W + D) v.
        transpose(M, N, k, N, kT.data());
        chunk_weights<T>(n, cum, scale, current, W.data(), nullptr);
        gemm<T>(M, M, N, q, N, 1, kT.data(), M, mix.data(), M, false);
        for (int64_t e = 0; e < M * M; ++e) mix[e] *= W[e];
        if (Dp) {
          for (int64_t i = 0; i < M; ++i) mix[i * M + i] += Dp[head];
        }
        gemm<T>(M, P, M, mix.data(), M, 1, v, P, y, P, false, n.rank);

        // The entering state read out by q, decayed to each row: y += E q S^T.
        transpose(P, N, S.data(), N, St.data());
        gemm<T>(M, P, N, q, N, 1, St.data(), P, y_in.data(), P, false);
        for (int64_t i = 0; i < M; ++i) {
          ecum[i] = decay_exp(cum[i]);
          for (int64_t p = 0; p < P; ++p) y[i * P + p] += ecum[i] * y_in[i * P + p];
        }

        // S <- exp(cum_end) S + vw^T k.
        const T cum_end = cum[M - 1], total = decay_exp(cum_end);
        for (int64_t j = 0; j < M; ++j) {
          const T to_end = decay_exp(cum_end - cum[j]) * scale[j];
          for (int64_t p = 0; p < P; ++p) vw[j * P + p] = v[j * P + p] * to_end;
        }
        for (auto& s : S) s *= total;
        gemm<T>(P, N, M, vw.data(), 1, P, k, N, S.data(), N, true);
      }
      std::memcpy(finalp + task * state, S.data(), state * sizeof(T));
    }
  });
}

template <typename T>
void backward_kernel(const Sizes& n, const at::Tensor& k_t, const at::Tensor& q_t, const at::Tensor& v_t,
                     const at::Tensor& cum_t, const at::Tensor& scale_t, const at::Tensor& current_t,
                     const at::Tensor& D_t, const at::Tensor& entering_t, const at::Tensor& dy_t,
                     const at::Tensor& dfinal_t, at::Tensor& dk_t, at::Tensor& dq_t, at::Tensor& dv_t,
                     at::Tensor& dcum_t, at::Tensor& dscale_t, at::Tensor& dcurrent_t, at::Tensor& dh0_t,
                     at::Tensor& dD_t) {
  const T *kp = k_t.data_ptr<T>(), *qp = q_t.data_ptr<T>(), *vp = v_t.data_ptr<T>();
  const T *cump = cum_t.data_ptr<T>(), *scalep = scale_t.data_ptr<T>(), *currentp = current_t.data_ptr<T>();
  const T *Dp = data_or_null<T>(D_t), *enterp = entering_t.data_ptr<T>(), *dyp = dy_t.data_ptr<T>();
  const T* dfinalp = data_or_null<T>(dfinal_t);
  T *dkp = dk_t.data_ptr<T>(), *dqp = dq_t.data_ptr<T>(), *dvp = dv_t.data_ptr<T>();
  T *dcump = dcum_t.data_ptr<T>(), *dscalep = dscale_t.data_ptr<T>(), *dcurrentp = dcurrent_t.data_ptr<T>();
  T *dh0p = dh0_t.data_ptr<T>(), *dDp = dD_t.data_ptr<T>();
  const int64_t M = n.rows, N = n.dstate, P = n.headdim, K = n.chunks, R = n.rank, state = P * N;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> dS(state), dS_in(state), dST(state), kT(N * M), vT(P * M), W(M * M), seg(M * M), scores(M * M),
        mix(M * M), dmix(M * M), dyE(M * P), vw(M * P), dvw(M * P), G(M * N), ecum(M), decay_end(M), to_end(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task % n.heads;
      if (dfinalp) {
        std::memcpy(dS.data(), dfinalp + task * state, state * sizeof(T));
      } else {
        std::fill(dS.begin(), dS.end(), T(0));
      }
      T dD = 0;
      for (int64_t c = K - 1; c >= 0; --c) {
        const int64_t row0 = task * K * M + c * M;
        const T *k = kp + row0 * N, *q = qp + row0 * N, *v = vp + row0 * P, *dy = dyp + row0 * P;
        const T *cum = cump + row0, *scale = scalep + row0, *current = currentp + row0;
        const T* S = enterp + (task * K + c) * state;  // the entering state (P, N)
        T *dk = dkp + row0 * N, *dq = dqp + row0 * N, *dv = dvp + row0 * P;
        T *dcum = dcump + row0, *dscale = dscalep + row0, *dcurrent = dcurrentp + row0;

        const T cum_end = cum[M - 1], total = decay_exp(cum_end);
        for (int64_t i = 0; i < M; ++i) {
          ecum[i] = decay_exp(cum[i]);
          decay_end[i] = decay_exp(cum_end - cum[i]);
          to_end[i] = decay_end[i] * scale[i];
          dcum[i] = dscale[i] = dcurrent[i] = T(0);
          for (int64_t p = 0; p < P; ++p) {
            dyE[i * P + p] = dy[i * P + p] * ecum[i];
            vw[i * P + p] = v[i * P + p] * to_end[i];
          }
        }

        // Read-out of the entering state: y_in = E q S^T. G = dy S; dq = E G, d cum_i = ecum_i <q_i, G_i>.
        gemm<T>(M, N, P, dy, P, 1, S, N, G.data(), N, false);
        for (int64_t i = 0; i < M; ++i) {
          T dot = 0;
          for (int64_t s = 0; s < N; ++s) {
            dot += q[i * N + s] * G[i * N + s];
            dq[i * N + s] = ecum[i] * G[i * N + s];
          }
          dcum[i] += ecum[i] * dot;
        }

        // The state update S_out = exp(cum_end) S + vw^T k, from dS = dL/dS_out.
        T d_total = 0;
        for (int64_t e = 0; e < state; ++e) d_total += dS[e] * S[e];
        T d_cum_end = total * d_total;
        transpose(P, N, dS.data(), N, dST.data());
        gemm<T>(M, P, N, k, N, 1, dST.data(), P, dvw.data(), P, false);  // d vw = k dS^T
        gemm<T>(M, N, P, vw.data(), P, 1, dS.data(), N, dk, N, false);  // dk = vw dS
        for (int64_t j = 0; j < M; ++j) {
          T d_to_end = 0;
          for (int64_t p = 0; p < P; ++p) {
            d_to_end += dvw[j * P + p] * v[j * P + p];
            dv[j * P + p] = dvw[j * P + p] * to_end[j];
          }
          dscale[j] += d_to_end * decay_end[j];
          const T d_log = d_to_end * to_end[j];
          dcum[j] -= d_log;
          d_cum_end += d_log;
        }
        // dS_in = exp(cum_end) dS + (E dy)^T q.
        for (int64_t e = 0; e < state; ++e) dS_in[e] = total * dS[e];
        gemm<T>(P, N, M, dyE.data(), 1, P, q, N, dS_in.data(), N, true);

        // Diagonal block: y = Mix v, Mix = (q k^T) o W + D I.
        transpose(M, N, k, N, kT.data());
        transpose(M, P, v, P, vT.data());
        chunk_weights<T>(n, cum, scale, current, W.data(), seg.data());
        gemm<T>(M, M, N, q, N, 1, kT.data(), M, scores.data(), M, false);
        for (int64_t e = 0; e < M * M; ++e) mix[e] = scores[e] * W[e];
        if (Dp) {
          for (int64_t i = 0; i < M; ++i) mix[i * M + i] += Dp[head];
        }
        gemm<T>(M, M, P, dy, P, 1, vT.data(), M, dmix.data(), M, false);  // dMix = dy v^T
        gemm<T>(M, P, M, mix.data(), 1, M, dy, P, dv, P, true);  // dv += Mix^T dy
        for (int64_t i = 0; i < M; ++i) dD += dmix[i * M + i];
        // d weights = dMix o scores: d current over same-time pairs; through exp(cum_i - cum_j) scale_j
        // over strictly later pairs. dMix becomes d scores = dMix o W in place.
        for (int64_t i = 0; i < M; ++i) {
          const int64_t start = (i / R) * R;
          T* dm = dmix.data() + i * M;
          const T* sc = scores.data() + i * M;
          const T* w = W.data() + i * M;
          const T* sg = seg.data() + i * M;
          T row_log = 0;
          for (int64_t j = 0; j < start; ++j) {
            const T d_weight = dm[j] * sc[j];
            dscale[j] += d_weight * sg[j];
            const T d_log = d_weight * w[j];
            row_log += d_log;
            dcum[j] -= d_log;
          }
          dcum[i] += row_log;
          for (int64_t j = start; j < start + R; ++j) dcurrent[i] += dm[j] * sc[j];
          for (int64_t j = 0; j < M; ++j) dm[j] *= w[j];
        }
        gemm<T>(M, N, M, dmix.data(), M, 1, k, N, dq, N, true, R);  // dq += dscores k
        gemm<T>(M, N, M, dmix.data(), 1, M, q, N, dk, N, true);  // dk += dscores^T q
        dcum[M - 1] += d_cum_end;
        std::swap(dS, dS_in);
      }
      std::memcpy(dh0p + task * state, dS.data(), state * sizeof(T));
      dDp[task] = dD;
    }
  });
}

Sizes sizes_of(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cum, int64_t rank) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && cum.dim() == 4, "mamba3 kernel: k, v must be (B, H, K M, .) and cum "
              "(B, H, K, M), got ", k.sizes(), ", ", v.sizes(), ", ", cum.sizes());
  const Sizes n{cum.size(0), cum.size(1), cum.size(2), cum.size(3), rank, k.size(3), v.size(3)};
  TORCH_CHECK(n.rows % rank == 0, "mamba3 kernel: rows per chunk ", n.rows, " are not a multiple of the rank ", rank);
  TORCH_CHECK(k.size(2) == n.chunks * n.rows && v.size(2) == k.size(2), "mamba3 kernel: k, v have ", k.size(2),
              " and ", v.size(2), " rows, expected K M = ", n.chunks * n.rows);
  for (const at::Tensor* t : {&k, &v, &cum}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == k.scalar_type(), "mamba3 kernel: inputs must be contiguous "
                "and of one dtype");
  }
  return n;
}

// Returns y (B, H, K M, P), the final state (B, H, P, N) and, when `store`, the entering state of every
// chunk (B, H, K, P, N) (else an empty tensor).
std::vector<at::Tensor> forward(const at::Tensor& k, const at::Tensor& q, const at::Tensor& v, const at::Tensor& cum,
                                const at::Tensor& scale, const at::Tensor& current,
                                const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& D, int64_t rank,
                                bool store) {
  const Sizes n = sizes_of(k, v, cum, rank);
  const at::Tensor h0_t = value_or_undefined(h0), D_t = value_or_undefined(D);
  auto y = at::empty_like(v);
  auto final_state = at::empty({n.batch, n.heads, n.headdim, n.dstate}, v.options());
  auto entering = store ? at::empty({n.batch, n.heads, n.chunks, n.headdim, n.dstate}, v.options())
                        : at::empty({0}, v.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "mamba3_forward", [&] {
    forward_kernel<scalar_t>(n, k, q, v, cum, scale, current, h0_t, D_t, y, final_state, entering);
  });
  return {y, final_state, entering};
}

// Returns dk, dq (B, H, K M, N), dv (B, H, K M, P), d cum, d scale, d current (B, H, K, M), dL/d h0
// (B, H, P, N) and dD per (batch, head) (B, H).
std::vector<at::Tensor> backward(const at::Tensor& k, const at::Tensor& q, const at::Tensor& v, const at::Tensor& cum,
                                 const at::Tensor& scale, const at::Tensor& current, const c10::optional<at::Tensor>& D,
                                 int64_t rank, const at::Tensor& entering, const at::Tensor& dy,
                                 const c10::optional<at::Tensor>& dfinal) {
  const Sizes n = sizes_of(k, v, cum, rank);
  TORCH_CHECK(entering.numel() == n.batch * n.heads * n.chunks * n.headdim * n.dstate && dy.sizes() == v.sizes() &&
              dy.is_contiguous(), "mamba3 kernel: backward needs the stored entering states and a contiguous dy");
  const at::Tensor D_t = value_or_undefined(D), dfinal_t = value_or_undefined(dfinal);
  auto dk = at::empty_like(k), dq = at::empty_like(q), dv = at::empty_like(v);
  auto dcum = at::empty_like(cum), dscale = at::empty_like(cum), dcurrent = at::empty_like(cum);
  auto dh0 = at::empty({n.batch, n.heads, n.headdim, n.dstate}, v.options());
  auto dD = at::empty({n.batch, n.heads}, v.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "mamba3_backward", [&] {
    backward_kernel<scalar_t>(n, k, q, v, cum, scale, current, D_t, entering, dy, dfinal_t, dk, dq, dv, dcum, dscale,
                              dcurrent, dh0, dD);
  });
  return {dk, dq, dv, dcum, dscale, dcurrent, dh0, dD};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Mamba-3 chunked scan products forward: y, final state, entering states");
  m.def("backward", &backward, "Mamba-3 chunked scan products backward: dk, dq, dv, dcum, dscale, dcurrent, dh0, dD");
}
