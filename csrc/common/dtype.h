// Element types shared by the kernels, with the half-precision conversions they use.
// Half types are computed in float32; float32->half rounds to nearest even.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace hpclm {

enum class DType { f32, f64, f16, bf16 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: return 8;
    case DType::f32: return 4;
    default: return 2;
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f64: return "float64";
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    default: return "bfloat16";
  }
}

inline DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "float") return DType::f32;
  if (s == "float64" || s == "double") return DType::f64;
  if (s == "float16" || s == "half") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  throw std::invalid_argument("unsupported dtype '" + s + "': use float32, float64, float16 or bfloat16");
}

// bfloat16 is the high half of a float32.
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 bits -> bfloat16 bits (in the low 16 bits): round to nearest even; a NaN stays NaN (quieted).
// U is uint32_t, or a GCC vector of uint32_t (the same expression, lane by lane: common/simd.h).
template <typename U>
inline U bf16_bits_rounded(U u) {
  U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;  // branch-free select: vectorizes
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(bf16_bits_rounded(u));
}

// IEEE binary16 via the compiler's _Float16 (F16C instructions where the ISA has them).
inline float f16_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline uint16_t float_to_f16(float f) {
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

}  // namespace hpclm
