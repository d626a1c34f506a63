// The vector layer of the per-ISA kernels (include only from sources CMake builds once per ISA):
// GCC vector types sized to the ISA's registers (64 bytes AVX-512, 32 AVX2, 16 portable), and the
// half-precision conversions every kernel uses: 16-bit float16 / bfloat16 lanes <-> float32 lanes.
// float16 uses the F16C / AVX-512 conversion instructions where the ISA has them; bfloat16 rounds
// with the same expression as the scalar float_to_bf16 (common/dtype.h), lane by lane.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef HPCLM_ISA
#error "common/simd.h is for the per-ISA kernel sources (CMake's HPCLM_ISA_SOURCES)"
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace simd {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kLanesF = kVecBytes / 4;  // float32 lanes per vector

typedef float vf __attribute__((vector_size(kVecBytes)));
typedef int32_t vi32 __attribute__((vector_size(kVecBytes)));
typedef uint32_t vu32 __attribute__((vector_size(kVecBytes)));
typedef double vd __attribute__((vector_size(kVecBytes)));
typedef int64_t vi64 __attribute__((vector_size(kVecBytes)));
typedef uint16_t vu16 __attribute__((vector_size(kVecBytes / 2)));  // kLanesF 16-bit lanes

template <typename To, typename From>
inline To bitcast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between types of one size");
  To t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}

// kLanesF bfloat16 values (the high halves of float32s) as float32 lanes.
inline vf load_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  vu32 wide = bitcast<vu32>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__)
  vu32 wide = bitcast<vu32>(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  vu32 wide = __builtin_convertvector(h, vu32);  // GCC widens in two halves on AVX2: the intrinsics above
#endif
  return bitcast<vf>(wide << 16);
}

// The low halves of uint32 lanes that hold values <= 0xffff (GCC's generic narrowing is slow on AVX2).
inline vu16 narrow_u32(vu32 u) {
#if defined(__AVX512F__)
  return bitcast<vu16>(_mm512_cvtepi32_epi16(bitcast<__m512i>(u)));
#elif defined(__AVX2__)
  __m256i v = bitcast<__m256i>(u);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0xD8);  // 8 x u16 in the low half
  return bitcast<vu16>(_mm256_castsi256_si128(packed));
#else
  return __builtin_convertvector(u, vu16);
#endif
}

// float32 lanes as bfloat16 bits: round to nearest even, NaN stays NaN.
inline vu16 pack_bf16(vf v) { return narrow_u32(bf16_bits_rounded(bitcast<vu32>(v))); }

// kLanesF IEEE float16 values as float32 lanes.
inline vf load_f16(const uint16_t* p) {
#if defined(__AVX512F__)
  return bitcast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && defined(__AVX__)
  return bitcast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vf v;
  for (int i = 0; i < kLanesF; ++i) v[i] = f16_to_float(p[i]);
  return v;
#endif
}

// float32 lanes as float16 bits, rounded to nearest even.
inline vu16 pack_f16(vf v) {
#if defined(__AVX512F__)
  return bitcast<vu16>(_mm512_cvtps_ph(bitcast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && defined(__AVX__)
  return bitcast<vu16>(_mm256_cvtps_ph(bitcast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  vu16 h;
  for (int i = 0; i < kLanesF; ++i) h[i] = float_to_f16(v[i]);
  return h;
#endif
}

}  // namespace simd
}  // namespace HPCLM_ISA
}  // namespace hpclm
