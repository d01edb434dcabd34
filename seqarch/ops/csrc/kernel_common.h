// Helpers shared by the CPU kernels (selective_scan.cpp, wkv6.cpp, causal_conv1d.cpp, delta_rule.cpp,
// generalized_delta_rule.cpp).
//
// seqarch.backends.CompiledKernel hashes every header in this folder into the build name, so a
// change here rebuilds each kernel that includes it.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace seqarch_kernels {

// exp for float, inlined so the loops that call it vectorise without a call per vector: Cody-Waite
// reduction x = k ln2 + r, Cephes' degree-5 polynomial for exp(r) (about 1 ulp), times 2^k.
// The input is clamped to [-87, 88], so a decay exp(x) with x < -87 returns about 1e-38 instead of
// 0: an absolute error far below float32 resolution of any state it multiplies.
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

// sigmoid through the inlined exp, so loops that evaluate it vectorise.
template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + decay_exp(-x));
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// An optional tensor argument from Python (None) as an undefined tensor, which data_or_null maps to nullptr.
inline at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) { return t.has_value() ? t.value() : at::Tensor(); }

// --- the recurrences checkpointed every C tokens (delta_rule.cpp, generalized_delta_rule.cpp, wkv6.cpp) ---
// B batch, T length, H heads, K key size, V value size, C checkpoint interval, N = ceil(T / C). The
// forward stores the state entering every chunk, (B, H, N, K, V); the backward replays each chunk from it.
struct ChunkSizes {
  int64_t batch, len, heads, keys, values, chunk, nchunks;

  // (batch, head) tasks per thread at least: waking a second thread costs more than a small problem
  // (tens of microseconds, far more while another process holds the core), so problems under ~2^18
  // state updates per thread run on the calling thread.
  int64_t grain() const { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, len * keys * values)); }
  // The row of token t of task (b, h) in a (B, T, H, ...) tensor.
  int64_t row(int64_t task, int64_t t) const { return ((task / heads) * len + t) * heads + task % heads; }
  int64_t state_size() const { return keys * values; }
};

inline ChunkSizes chunk_sizes(const char* op, int64_t batch, int64_t len, int64_t heads, int64_t keys, int64_t values,
                              int64_t chunk) {
  TORCH_CHECK(chunk >= 1, op, " kernel: chunk must be >= 1, got ", chunk);
  return {batch, len, heads, keys, values, chunk, (len + chunk - 1) / chunk};
}

// The checkpoint tensor the forward fills: (B, H, N, K, V) when `store`, else empty.
inline at::Tensor empty_checkpoints(const ChunkSizes& n, bool store, const at::TensorOptions& options) {
  return store ? at::empty({n.batch, n.heads, n.nchunks, n.keys, n.values}, options) : at::empty({0}, options);
}

inline void check_checkpoints(const char* op, const ChunkSizes& n, const at::Tensor& checkpoints) {
  TORCH_CHECK(checkpoints.numel() == n.batch * n.heads * n.nchunks * n.keys * n.values, op,
              " kernel: backward needs the forward's checkpoints of the same chunk size");
}

// Tokens of one (batch, head) lie H K numbers apart in the (B, T, H, K) layout, a page every token or
// two, where the hardware prefetchers stop: the kernels request the rows a few tokens ahead themselves.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t size) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < size * int64_t(sizeof(scalar_t)); offset += 64) __builtin_prefetch(bytes + offset);
}

}  // namespace seqarch_kernels
