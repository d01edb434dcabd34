// AVX-512 float helpers for the CPU kernels: 2^x, softplus, sigmoid, lane sums and a 16 x 16 transpose.
//
// SEQARCH_AVX512 is 1 when the compiler targets AVX-512 F and DQ (the kernels build with
// -march=native) and the build does not ask for the portable loops with -DSEQARCH_PORTABLE_KERNELS;
// the tests build both variants, so the portable loops are checked on AVX-512 machines too.

#pragma once

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(SEQARCH_PORTABLE_KERNELS)
#define SEQARCH_AVX512 1
#include <immintrin.h>
#else
#define SEQARCH_AVX512 0
#endif

#if SEQARCH_AVX512
namespace seqarch_kernels {

constexpr float kLog2e = 1.44269504088896341f;

// 2^x = 2^floor(x) 2^f with f = x - floor(x) in [0, 1) (vreduceps, exact). 2^f is the polynomial
// 1 + f (ln 2 + f q(f)), q of degree 4 fitted for minimax relative error on [0, 1] (1.0 ulp in
// float, Horner with fma). vscalefps multiplies by 2^floor(x) and returns 0 below the float range,
// inf above it, so no clamping is needed. 10 instructions for 16 lanes.
inline __m512 exp2_ps(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(2.120357822e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.259175944e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.661369957e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.549265072e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402275801e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, x);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(t), t = e / (2 + e) in
// [0, 1/3], as t P(t^2), P of degree 4 (minimax relative error 4e-9). Above 20 this rounds to x
// itself, which is what torch's softplus returns there.
inline __m512 softplus_ps(__m512 x) {
  const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-kLog2e)));
  const __m512 denominator = _mm512_add_ps(e, _mm512_set1_ps(2.0f));
  __m512 inverse = _mm512_rcp14_ps(denominator);  // 2^-14, then one Newton step
  inverse = _mm512_mul_ps(inverse, _mm512_fnmadd_ps(denominator, inverse, _mm512_set1_ps(2.0f)));
  const __m512 t = _mm512_mul_ps(e, inverse), t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(2.817835212e-01f);
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.796059847e-01f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(4.002490938e-01f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(6.666631699e-01f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.0f));
  return _mm512_fmadd_ps(t, p, _mm512_max_ps(x, _mm512_setzero_ps()));
}

// sigmoid(x) = 1 / (1 + 2^(-x log2 e)), the reciprocal by rcp14 and one Newton step.
inline __m512 sigmoid_ps(__m512 x) {
  const __m512 denominator = _mm512_add_ps(exp2_ps(_mm512_mul_ps(x, _mm512_set1_ps(-kLog2e))), _mm512_set1_ps(1.0f));
  const __m512 inverse = _mm512_rcp14_ps(denominator);
  return _mm512_mul_ps(inverse, _mm512_fnmadd_ps(denominator, inverse, _mm512_set1_ps(2.0f)));
}

// The 16 lane sums of v[0..15] as one register: result[i] = sum over lanes of v[i]. A tree of
// pairwise interleave-and-add steps (45 instructions), instead of 16 separate reductions.
inline __m512 lane_sums16(const __m512 v[16]) {
  __m512 pairs[8], quads[4], octets[2];
  for (int i = 0; i < 8; ++i)  // element (4j + p): v[2i + p % 2] summed over two lanes of quad j
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // element (4j + p): v[4i + p] summed over the four lanes of quad j
    const __m512d low = _mm512_castps_pd(pairs[2 * i]), high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
  for (int i = 0; i < 2; ++i)  // quad q: v[8i + 4(q / 2) + p] over quads {2(q % 2), 2(q % 2) + 1}
    octets[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], 0x88),
                       _mm512_shuffle_f32x4(octets[0], octets[1], 0xdd));
}

// rows[j] <- column j of the 16 x 16 block whose row i is rows[i]: 2-, 4-, 8- and 16-wide
// interleaves, 64 shuffles.
inline void transpose16(__m512 rows[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int j = 0; j < 2; ++j) {
      const __m512d low = _mm512_castps_pd(t[i + j]), high = _mm512_castps_pd(t[i + j + 2]);
      rows[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(low, high));
      rows[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(low, high));
    }
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(rows[i + j], rows[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(rows[i + j], rows[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    rows[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    rows[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

}  // namespace seqarch_kernels
#endif
