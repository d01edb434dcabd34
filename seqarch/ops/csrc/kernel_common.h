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

}  // namespace seqarch_kernels
