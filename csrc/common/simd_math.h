// Float32 lane math shared by the per-ISA kernels (include only from sources CMake builds once per ISA):
// NaN-preserving vmin/vmax, a Cephes-style vectorized exp, and the horizontal sum and max of a vector.
#pragma once
#include "common/simd.h"

namespace hpclm {
namespace HPCLM_ISA {
namespace simd {

// NaN-preserving min/max: a NaN operand `a` comes through.
template <typename V>
inline V vmax(V a, V b) {
  return a < b ? b : a;
}
template <typename V>
inline V vmin(V a, V b) {
  return a > b ? b : a;
}

// e^r on [-ln2/2, ln2/2]: degree-6 polynomial fitted for relative error (< 1e-7 evaluated in float).
#define HPCLM_EXP_POLY(p, r, fma)       \
  p = fma(p, r, 8.37415549904108e-3f);  \
  p = fma(p, r, 4.166800156235695e-2f); \
  p = fma(p, r, 1.6666431725025177e-1f); \
  p = fma(p, r, 4.999999403953552e-1f); \
  p = fma(p, r, 1.0f);                  \
  p = fma(p, r, 1.0f)
constexpr float kExpC6 = 1.3843653723597527e-3f;
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 in two parts (Cephes): n * kLn2Hi is exact for |n| < 2^15, so x - n ln 2 loses nothing.
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;

// e^x = 2^n e^r with n = round(x log2 e), r = x - n ln 2: ~1 ulp over the whole range; exactly 0
// for -inf (masked keys) and far below the float range; NaN stays NaN.
#if defined(__AVX512F__)
inline vf exp(vf v) {
  __m512 x = _mm512_max_ps(_mm512_set1_ps(-1000.0f), bitcast<__m512>(v));  // a NaN v comes through
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC6);
#define HPCLM_FMA512(a, b, c) _mm512_fmadd_ps(a, b, _mm512_set1_ps(c))
  HPCLM_EXP_POLY(p, r, HPCLM_FMA512);
#undef HPCLM_FMA512
  return bitcast<vf>(_mm512_scalef_ps(p, n));  // p * 2^n; 2^-1443 underflows to exactly 0
}
#else
inline vf exp(vf v) {
  vf x = vmin(vmax(v, vf{} - 88.0f), vf{} + 88.0f);
  vf n = (x * kLog2e + 0x1.8p23f) - 0x1.8p23f;  // round to nearest
  vf r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  vf p = vf{} + kExpC6;
#define HPCLM_FMA_VEC(a, b, c) ((a) * (b) + (c))
  HPCLM_EXP_POLY(p, r, HPCLM_FMA_VEC);
#undef HPCLM_FMA_VEC
  vi32 bits = (__builtin_convertvector(n, vi32) + 127) << 23;  // n = -127 (x <= -87.7) gives +0
  return p * bitcast<vf>(bits);
}
#endif
#undef HPCLM_EXP_POLY

inline float hmax(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(bitcast<__m512>(v));
#elif defined(__AVX__)
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(bitcast<__m256>(v)), _mm256_extractf128_ps(bitcast<__m256>(v), 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
#else
  float r = v[0];
  for (int i = 1; i < kLanesF; ++i) r = v[i] > r ? v[i] : r;
  return r;
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(bitcast<__m512>(v));
#elif defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(bitcast<__m256>(v)), _mm256_extractf128_ps(bitcast<__m256>(v), 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
#else
  float r = v[0];
  for (int i = 1; i < kLanesF; ++i) r += v[i];
  return r;
#endif
}

}  // namespace simd
}  // namespace HPCLM_ISA
}  // namespace hpclm
