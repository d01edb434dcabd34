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

template <typename T>
inline void load_or_zero(std::vector<T>& dst, const T* src, int64_t offset) {
  // a task's carried state: copied in when given (initial state, final-state gradient), zeros otherwise
  if (src) {
    std::memcpy(dst.data(), src + offset, dst.size() * sizeof(T));
  } else {
    std::fill(dst.begin(), dst.end(), T(0));
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
  int64_t batch, heads, chunks, rows, rank, groups, dstate, headdim, angles;
  int64_t length() const { return chunks * (rows / rank); }  // Lq, padded to whole chunks
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
    T* __restrict w = W + i * M;
    T* __restrict s = seg ? seg + i * M : nullptr;
    const T ci = cum[i];
    if (s) {
      for (int64_t j = 0; j < start; ++j) {
        s[j] = decay_exp(ci - cum[j]);
        w[j] = s[j] * scale[j];
      }
    } else {
      for (int64_t j = 0; j < start; ++j) w[j] = decay_exp(ci - cum[j]) * scale[j];
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

// The tensors every pass reads. B, C (B, Lq, R, G, N) in the "halves" layout, biases (H, R, N) or null,
// cos, sin (B, H, Lq, S) of the cumulative angles, v (B, Lq, R, H, P) with P contiguous: row (t, r) of
// batch b, head h at v + b v_batch + (t R + r) v_row + h v_head; cum, scale, current (B, H, K, M); D (H,) or null.
template <typename T>
struct Inputs {
  const T *B, *C, *B_bias, *C_bias, *cos, *sin, *v, *cum, *scale, *current, *D;
  int64_t v_batch, v_row, v_head;
};

// The rotated, biased rows of chunk c of task (b, h) -> out (M, N): out_i = Rot(theta_t) (M_t,r + bias_h,r)
// for row i = (t, r), pairs (s, s + N / 2) turned for s < S.
template <typename T>
void rotated_chunk(const Sizes& n, const Inputs<T>& in, const T* M_, const T* bias, int64_t b, int64_t h, int64_t c,
                   T* out) {
  const int64_t R = n.rank, N = n.dstate, S = n.angles, half = N / 2, Q = n.rows / R, Lq = n.length();
  const int64_t g = h / (n.heads / n.groups);
  for (int64_t i = 0; i < n.rows; ++i) {
    const int64_t t = c * Q + i / R, r = i % R;
    const T* src = M_ + ((b * Lq + t) * R + r) * n.groups * N + g * N;
    T* o = out + i * N;
    if (bias) {
      const T* bs = bias + (h * R + r) * N;
      for (int64_t e = 0; e < N; ++e) o[e] = src[e] + bs[e];
    } else {
      std::memcpy(o, src, N * sizeof(T));
    }
    const T* cs = in.cos + ((b * n.heads + h) * Lq + t) * S;
    const T* sn = in.sin + ((b * n.heads + h) * Lq + t) * S;
    for (int64_t e = 0; e < S; ++e) {
      const T first = o[e], second = o[half + e];
      o[e] = first * cs[e] - second * sn[e];
      o[half + e] = first * sn[e] + second * cs[e];
    }
  }
}

template <typename T>
void forward_kernel(const Sizes& n, const Inputs<T>& in, const at::Tensor& h0_t, int64_t last, at::Tensor& y_t,
                    at::Tensor& final_t, at::Tensor& entering_t, at::Tensor& k_last_t) {
  const T* h0p = data_or_null<T>(h0_t);
  T *yp = y_t.data_ptr<T>(), *finalp = final_t.data_ptr<T>(), *k_lastp = k_last_t.data_ptr<T>();
  T* enterp = entering_t.numel() ? entering_t.data_ptr<T>() : nullptr;
  const int64_t M = n.rows, N = n.dstate, P = n.headdim, K = n.chunks, R = n.rank, Q = M / R, state = P * N;
  const int64_t ldy = n.heads * P;

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> S(state), St(state), k(M * N), q(M * N), kT(N * M), W(M * M), mix(M * M), y_in(M * P), vw(M * P),
        ecum(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, head = task % n.heads;
      load_or_zero(S, h0p, task * state);
      for (int64_t c = 0; c < K; ++c) {
        const int64_t row0 = task * K * M + c * M;
        const T* v = in.v + b * in.v_batch + c * M * in.v_row + head * in.v_head;
        const T *cum = in.cum + row0, *scale = in.scale + row0, *current = in.current + row0;
        T* y = yp + (b * K * M + c * M) * ldy + head * P;
        if (enterp) std::memcpy(enterp + (task * K + c) * state, S.data(), state * sizeof(T));
        rotated_chunk(n, in, in.B, in.B_bias, b, head, c, k.data());
        rotated_chunk(n, in, in.C, in.C_bias, b, head, c, q.data());
        if (last / Q == c) {
          std::memcpy(k_lastp + task * R * N, k.data() + (last % Q) * R * N, R * N * sizeof(T));
        }

        // Diagonal block: y = ((q k^T) o W + D) v.
        transpose(M, N, k.data(), N, kT.data());
        chunk_weights<T>(n, cum, scale, current, W.data(), nullptr);
        gemm<T>(M, M, N, q.data(), N, 1, kT.data(), M, mix.data(), M, false);
        for (int64_t e = 0; e < M * M; ++e) mix[e] *= W[e];
        if (in.D) {
          for (int64_t i = 0; i < M; ++i) mix[i * M + i] += in.D[head];
        }
        gemm<T>(M, P, M, mix.data(), M, 1, v, in.v_row, y, ldy, false, R);

        // The entering state read out by q, decayed to each row: y += E q S^T.
        transpose(P, N, S.data(), N, St.data());
        gemm<T>(M, P, N, q.data(), N, 1, St.data(), P, y_in.data(), P, false);
        for (int64_t i = 0; i < M; ++i) {
          ecum[i] = decay_exp(cum[i]);
          for (int64_t p = 0; p < P; ++p) y[i * ldy + p] += ecum[i] * y_in[i * P + p];
        }

        // S <- exp(cum_end) S + vw^T k.
        const T cum_end = cum[M - 1], total = decay_exp(cum_end);
        for (int64_t j = 0; j < M; ++j) {
          const T to_end = decay_exp(cum_end - cum[j]) * scale[j];
          for (int64_t p = 0; p < P; ++p) vw[j * P + p] = v[j * in.v_row + p] * to_end;
        }
        for (auto& s : S) s *= total;
        gemm<T>(P, N, M, vw.data(), 1, P, k.data(), N, S.data(), N, true);
      }
      std::memcpy(finalp + task * state, S.data(), state * sizeof(T));
    }
  });
}

// d theta of the rows of a chunk from dL/d(rotated) `grad` and the rotated rows `rotated` (M, N), then
// `grad` turned back to dL/d(biased, unrotated); added to d_theta (the task's (Lq, S) block).
template <typename T>
void unrotate_chunk(const Sizes& n, const Inputs<T>& in, int64_t b, int64_t h, int64_t c, const T* rotated, T* grad,
                    T* d_theta) {
  const int64_t R = n.rank, N = n.dstate, S = n.angles, half = N / 2, Q = n.rows / R, Lq = n.length();
  for (int64_t i = 0; i < n.rows; ++i) {
    const int64_t t = c * Q + i / R;
    const T* cs = in.cos + ((b * n.heads + h) * Lq + t) * S;
    const T* sn = in.sin + ((b * n.heads + h) * Lq + t) * S;
    const T* x = rotated + i * N;
    T* d = grad + i * N;
    T* dth = d_theta + t * S;
    for (int64_t e = 0; e < S; ++e) {
      const T d_first = d[e], d_second = d[half + e];
      dth[e] += d_second * x[e] - d_first * x[half + e];
      d[e] = d_first * cs[e] + d_second * sn[e];
      d[half + e] = d_second * cs[e] - d_first * sn[e];
    }
  }
}

// Adds the unrotated gradient rows of chunk c (M, N) to dM (the calling thread's (B, Lq, R, G, N) buffer)
// and their sum over rows of each rank to d_bias (the task's (R, N) block) when given.
template <typename T>
void scatter_chunk(const Sizes& n, int64_t b, int64_t h, int64_t c, const T* grad, T* dM, T* d_bias) {
  const int64_t R = n.rank, N = n.dstate, Q = n.rows / R, Lq = n.length();
  const int64_t g = h / (n.heads / n.groups);
  for (int64_t i = 0; i < n.rows; ++i) {
    const int64_t t = c * Q + i / R, r = i % R;
    T* dst = dM + ((b * Lq + t) * R + r) * n.groups * N + g * N;
    const T* src = grad + i * N;
    for (int64_t e = 0; e < N; ++e) dst[e] += src[e];
    if (d_bias) {
      T* db = d_bias + r * N;
      for (int64_t e = 0; e < N; ++e) db[e] += src[e];
    }
  }
}

template <typename T>
void backward_kernel(const Sizes& n, const Inputs<T>& in, int64_t last, const at::Tensor& entering_t,
                     const at::Tensor& dy_t, const at::Tensor& dfinal_t, const at::Tensor& dk_last_t,
                     at::Tensor& dB_threads, at::Tensor& dC_threads, at::Tensor& dB_bias_t, at::Tensor& dC_bias_t,
                     at::Tensor& d_theta_t, at::Tensor& dv_t, at::Tensor& dcum_t, at::Tensor& dscale_t,
                     at::Tensor& dcurrent_t, at::Tensor& dh0_t, at::Tensor& dD_t) {
  const T *enterp = entering_t.data_ptr<T>(), *dyp = dy_t.data_ptr<T>();
  const T *dfinalp = data_or_null<T>(dfinal_t), *dk_lastp = data_or_null<T>(dk_last_t);
  T *dBs = dB_threads.data_ptr<T>(), *dCs = dC_threads.data_ptr<T>();
  T *dB_biasp = dB_bias_t.data_ptr<T>(), *dC_biasp = dC_bias_t.data_ptr<T>(), *d_thetap = d_theta_t.data_ptr<T>();
  T *dvp = dv_t.data_ptr<T>(), *dcump = dcum_t.data_ptr<T>(), *dscalep = dscale_t.data_ptr<T>();
  T *dcurrentp = dcurrent_t.data_ptr<T>(), *dh0p = dh0_t.data_ptr<T>(), *dDp = dD_t.data_ptr<T>();
  const int64_t M = n.rows, N = n.dstate, P = n.headdim, K = n.chunks, R = n.rank, Q = M / R, state = P * N;
  const int64_t ldy = n.heads * P, per_thread = dB_threads.numel() / dB_threads.size(0);
  const int64_t threads = dB_threads.size(0);

  at::parallel_for(0, n.batch * n.heads, n.grain(), [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "mamba3 kernel: thread ", thread, " of ", threads);
    T *dB_mine = dBs + thread * per_thread, *dC_mine = dCs + thread * per_thread;
    std::vector<T> dS(state), dS_in(state), dST(state), k(M * N), q(M * N), dk(M * N), dq(M * N), kT(N * M),
        vT(P * M), W(M * M), seg(M * M), scores(M * M), mix(M * M), dmix(M * M), dyE(M * P), vw(M * P), dvw(M * P),
        G(M * N), ecum(M), decay_end(M), to_end(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n.heads, head = task % n.heads;
      load_or_zero(dS, dfinalp, task * state);
      T dD = 0;
      T* d_theta = d_thetap + task * n.length() * n.angles;
      for (int64_t c = K - 1; c >= 0; --c) {
        const int64_t row0 = task * K * M + c * M;
        const T* v = in.v + b * in.v_batch + c * M * in.v_row + head * in.v_head;
        const T* dy = dyp + (b * K * M + c * M) * ldy + head * P;
        const T *cum = in.cum + row0, *scale = in.scale + row0, *current = in.current + row0;
        const T* S = enterp + (task * K + c) * state;  // the entering state (P, N)
        T* dv = dvp + (b * K * M + c * M) * ldy + head * P;
        T *dcum = dcump + row0, *dscale = dscalep + row0, *dcurrent = dcurrentp + row0;
        rotated_chunk(n, in, in.B, in.B_bias, b, head, c, k.data());
        rotated_chunk(n, in, in.C, in.C_bias, b, head, c, q.data());

        const T cum_end = cum[M - 1], total = decay_exp(cum_end);
        for (int64_t i = 0; i < M; ++i) {
          ecum[i] = decay_exp(cum[i]);
          decay_end[i] = decay_exp(cum_end - cum[i]);
          to_end[i] = decay_end[i] * scale[i];
          dcum[i] = dscale[i] = dcurrent[i] = T(0);
          for (int64_t p = 0; p < P; ++p) {
            dyE[i * P + p] = dy[i * ldy + p] * ecum[i];
            vw[i * P + p] = v[i * in.v_row + p] * to_end[i];
          }
        }

        // Read-out of the entering state: y_in = E q S^T. G = dy S; dq = E G, d cum_i = ecum_i <q_i, G_i>.
        gemm<T>(M, N, P, dy, ldy, 1, S, N, G.data(), N, false);
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
        gemm<T>(M, P, N, k.data(), N, 1, dST.data(), P, dvw.data(), P, false);  // d vw = k dS^T
        gemm<T>(M, N, P, vw.data(), P, 1, dS.data(), N, dk.data(), N, false);  // dk = vw dS
        for (int64_t j = 0; j < M; ++j) {
          T d_to_end = 0;
          for (int64_t p = 0; p < P; ++p) {
            d_to_end += dvw[j * P + p] * v[j * in.v_row + p];
            dv[j * ldy + p] = dvw[j * P + p] * to_end[j];
          }
          dscale[j] += d_to_end * decay_end[j];
          const T d_log = d_to_end * to_end[j];
          dcum[j] -= d_log;
          d_cum_end += d_log;
        }
        // dS_in = exp(cum_end) dS + (E dy)^T q.
        for (int64_t e = 0; e < state; ++e) dS_in[e] = total * dS[e];
        gemm<T>(P, N, M, dyE.data(), 1, P, q.data(), N, dS_in.data(), N, true);

        // Diagonal block: y = Mix v, Mix = (q k^T) o W + D I.
        transpose(M, N, k.data(), N, kT.data());
        transpose(M, P, v, in.v_row, vT.data());
        chunk_weights<T>(n, cum, scale, current, W.data(), seg.data());
        gemm<T>(M, M, N, q.data(), N, 1, kT.data(), M, scores.data(), M, false);
        for (int64_t e = 0; e < M * M; ++e) mix[e] = scores[e] * W[e];
        if (in.D) {
          for (int64_t i = 0; i < M; ++i) mix[i * M + i] += in.D[head];
        }
        gemm<T>(M, M, P, dy, ldy, 1, vT.data(), M, dmix.data(), M, false);  // dMix = dy v^T
        gemm<T>(M, P, M, mix.data(), 1, M, dy, ldy, dv, ldy, true);  // dv += Mix^T dy
        for (int64_t i = 0; i < M; ++i) dD += dmix[i * M + i];
        // d weights = dMix o scores: d current over same-time pairs; through exp(cum_i - cum_j) scale_j
        // over strictly later pairs. dMix becomes d scores = dMix o W in place.
        for (int64_t i = 0; i < M; ++i) {
          const int64_t start = (i / R) * R;
          T* __restrict dm = dmix.data() + i * M;
          const T* __restrict sc = scores.data() + i * M;
          const T* __restrict w = W.data() + i * M;
          const T* __restrict sg = seg.data() + i * M;
          T* __restrict dscale_r = dscale;
          T* __restrict dcum_r = dcum;
          T row_log = 0;
          for (int64_t j = 0; j < start; ++j) {
            const T d_weight = dm[j] * sc[j];
            dscale_r[j] += d_weight * sg[j];
            const T d_log = d_weight * w[j];
            row_log += d_log;
            dcum_r[j] -= d_log;
          }
          dcum[i] += row_log;
          for (int64_t j = start; j < start + R; ++j) dcurrent[i] += dm[j] * sc[j];
          for (int64_t j = 0; j < M; ++j) dm[j] *= w[j];
        }
        gemm<T>(M, N, M, dmix.data(), M, 1, k.data(), N, dq.data(), N, true, R);  // dq += dscores k
        gemm<T>(M, N, M, dmix.data(), 1, M, q.data(), N, dk.data(), N, true);  // dk += dscores^T q
        dcum[M - 1] += d_cum_end;
        std::swap(dS, dS_in);

        // Back through the rotations and biases to B and C.
        if (dk_lastp && last / Q == c) {
          const T* add = dk_lastp + task * R * N;
          T* rows = dk.data() + (last % Q) * R * N;
          for (int64_t e = 0; e < R * N; ++e) rows[e] += add[e];
        }
        unrotate_chunk(n, in, b, head, c, k.data(), dk.data(), d_theta);
        unrotate_chunk(n, in, b, head, c, q.data(), dq.data(), d_theta);
        scatter_chunk(n, b, head, c, dk.data(), dB_mine, in.B_bias ? dB_biasp + task * R * N : nullptr);
        scatter_chunk(n, b, head, c, dq.data(), dC_mine, in.C_bias ? dC_biasp + task * R * N : nullptr);
      }
      std::memcpy(dh0p + task * state, dS.data(), state * sizeof(T));
      dDp[task] = dD;
    }
  });
}

Sizes sizes_of(const at::Tensor& B, const at::Tensor& cos, const at::Tensor& v, const at::Tensor& cum, int64_t heads) {
  TORCH_CHECK(B.dim() == 5 && cos.dim() == 4 && v.dim() == 5 && cum.dim() == 4, "mamba3 kernel: B (B, Lq, R, G, N), "
              "cos (B, H, Lq, S), v (B, Lq, R, H, P), cum (B, H, K, M) expected, got ", B.sizes(), ", ", cos.sizes(),
              ", ", v.sizes(), ", ", cum.sizes());
  const Sizes n{B.size(0), heads, cum.size(2), cum.size(3), B.size(2), B.size(3), B.size(4), v.size(4), cos.size(3)};
  TORCH_CHECK(n.rows % n.rank == 0 && n.heads % n.groups == 0 && n.length() == B.size(1) && cum.size(1) == heads &&
              v.size(1) == n.length() && v.size(3) == heads && cos.size(2) == n.length() && 2 * n.angles <= n.dstate,
              "mamba3 kernel: inconsistent sizes");
  TORCH_CHECK(v.stride(4) == 1 && (n.rank == 1 || v.stride(1) == n.rank * v.stride(2)),
              "mamba3 kernel: v needs contiguous P and rows (t, r) at one stride");
  for (const at::Tensor* t : {&B, &cos, &cum}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == v.scalar_type(), "mamba3 kernel: inputs must be contiguous "
                "and of one dtype");
  }
  return n;
}

template <typename T>
Inputs<T> inputs_of(const Sizes& n, const at::Tensor& B, const at::Tensor& C, const at::Tensor& B_bias,
                    const at::Tensor& C_bias, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& v,
                    const at::Tensor& cum, const at::Tensor& scale, const at::Tensor& current, const at::Tensor& D) {
  return {B.data_ptr<T>(), C.data_ptr<T>(), data_or_null<T>(B_bias), data_or_null<T>(C_bias), cos.data_ptr<T>(),
          sin.data_ptr<T>(), v.data_ptr<T>(), cum.data_ptr<T>(), scale.data_ptr<T>(), current.data_ptr<T>(),
          data_or_null<T>(D), v.stride(0), n.rank == 1 ? v.stride(1) : v.stride(2), v.stride(3)};
}

// B, C (B, Lq, R, G, N) "halves" layout; B_bias, C_bias (H, R, N) or None; cos, sin (B, H, Lq, S); v (B, Lq, R, H, P);
// cum, scale, current (B, H, K, M); h0 (B, H, P, N) or None; D (H,) or None; `last` the time of the last real
// token. Returns y (B, Lq, R, H, P), the final state (B, H, P, N), the rotated k of time `last` (B, H, R, N) and,
// when `store`, the entering state of every chunk (B, H, K, P, N) (else an empty tensor).
std::vector<at::Tensor> forward(const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& B_bias,
                                const c10::optional<at::Tensor>& C_bias, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& v, const at::Tensor& cum, const at::Tensor& scale,
                                const at::Tensor& current, const c10::optional<at::Tensor>& h0,
                                const c10::optional<at::Tensor>& D, int64_t last, bool store) {
  const Sizes n = sizes_of(B, cos, v, cum, v.size(3));
  const at::Tensor h0_t = value_or_undefined(h0), D_t = value_or_undefined(D);
  const at::Tensor Bb = value_or_undefined(B_bias), Cb = value_or_undefined(C_bias);
  auto y = at::empty({n.batch, n.length(), n.rank, n.heads, n.headdim}, v.options());
  auto final_state = at::empty({n.batch, n.heads, n.headdim, n.dstate}, v.options());
  auto k_last = at::empty({n.batch, n.heads, n.rank, n.dstate}, v.options());
  auto entering = store ? at::empty({n.batch, n.heads, n.chunks, n.headdim, n.dstate}, v.options())
                        : at::empty({0}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "mamba3_forward", [&] {
    const auto in = inputs_of<scalar_t>(n, B, C, Bb, Cb, cos, sin, v, cum, scale, current, D_t);
    forward_kernel<scalar_t>(n, in, h0_t, last, y, final_state, entering, k_last);
  });
  return {y, final_state, k_last, entering};
}

// The inputs of `forward`, its entering states, dy (B, Lq, R, H, P) contiguous, dL/d(final state) and dL/d k_last
// or None. Returns dB, dC (B, Lq, R, G, N), dB_bias, dC_bias per (batch, head) (B, H, R, N), d theta
// (B, H, Lq, S), dv (B, Lq, R, H, P), d cum, d scale, d current (B, H, K, M), dL/d h0 (B, H, P, N) and dD per
// (batch, head) (B, H).
std::vector<at::Tensor> backward(const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& B_bias,
                                 const c10::optional<at::Tensor>& C_bias, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& v, const at::Tensor& cum, const at::Tensor& scale,
                                 const at::Tensor& current, const c10::optional<at::Tensor>& D, int64_t last,
                                 const at::Tensor& entering, const at::Tensor& dy,
                                 const c10::optional<at::Tensor>& dfinal, const c10::optional<at::Tensor>& dk_last) {
  const Sizes n = sizes_of(B, cos, v, cum, v.size(3));
  TORCH_CHECK(entering.numel() == n.batch * n.heads * n.chunks * n.headdim * n.dstate && dy.is_contiguous() &&
              dy.numel() == v.numel(), "mamba3 kernel: backward needs the stored entering states and a contiguous dy");
  const at::Tensor D_t = value_or_undefined(D), dfinal_t = value_or_undefined(dfinal);
  const at::Tensor dk_last_t = value_or_undefined(dk_last);
  const at::Tensor Bb = value_or_undefined(B_bias), Cb = value_or_undefined(C_bias);
  const int64_t threads = at::get_num_threads();
  auto dB_threads = at::zeros({threads, n.batch, n.length(), n.rank, n.groups, n.dstate}, v.options());
  auto dC_threads = at::zeros_like(dB_threads);
  auto dB_bias = at::zeros({n.batch, n.heads, n.rank, n.dstate}, v.options()), dC_bias = at::zeros_like(dB_bias);
  auto d_theta = at::zeros(cos.sizes(), v.options());
  auto dv = at::empty({n.batch, n.length(), n.rank, n.heads, n.headdim}, v.options());
  auto dcum = at::empty_like(cum), dscale = at::empty_like(cum), dcurrent = at::empty_like(cum);
  auto dh0 = at::empty({n.batch, n.heads, n.headdim, n.dstate}, v.options());
  auto dD = at::empty({n.batch, n.heads}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "mamba3_backward", [&] {
    const auto in = inputs_of<scalar_t>(n, B, C, Bb, Cb, cos, sin, v, cum, scale, current, D_t);
    backward_kernel<scalar_t>(n, in, last, entering, dy, dfinal_t, dk_last_t, dB_threads, dC_threads, dB_bias, dC_bias,
                              d_theta, dv, dcum, dscale, dcurrent, dh0, dD);
  });
  auto dB = threads == 1 ? dB_threads[0] : dB_threads.sum(0);
  auto dC = threads == 1 ? dC_threads[0] : dC_threads.sum(0);
  return {dB, dC, dB_bias, dC_bias, d_theta, dv, dcum, dscale, dcurrent, dh0, dD};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Mamba-3 chunked scan forward: y, final state, last rotated k, entering states");
  m.def("backward", &backward, "Mamba-3 chunked scan backward: dB, dC, d biases, d theta, dv, d cum, d scale, "
        "d current, d h0, dD");
}
