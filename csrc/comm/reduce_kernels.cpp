// Compiled once per ISA (CMake sets HPCLM_ISA and the matching -m flags); plain loops
// that the compiler vectorizes for that ISA.
#include <algorithm>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "comm/reduce.h"

#ifndef HPCLM_ISA
#error "compile this file through CMake's per-ISA object libraries"
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace {

template <ReduceOp OP, typename T>
inline T combine(T a, T b) {
  if constexpr (OP == ReduceOp::sum) return a + b;
  if constexpr (OP == ReduceOp::prod) return a * b;
  if constexpr (OP == ReduceOp::min) return b < a ? b : a;
  if constexpr (OP == ReduceOp::max) return b > a ? b : a;
}

template <ReduceOp OP, typename T>
void reduce_native(T* __restrict dst, const T* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = combine<OP>(dst[i], src[i]);
}

template <ReduceOp OP, float (*Load)(uint16_t), uint16_t (*Store)(float)>
void reduce_half(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Store(combine<OP>(Load(dst[i]), Load(src[i])));
}

#if defined(__F16C__) && defined(__AVX__)
// GCC does not vectorize _Float16 conversions without AVX512-FP16: convert 8 at a time with F16C.
template <ReduceOp OP>
void reduce_f16(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dst + i)));
    __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    __m256 r;
    if constexpr (OP == ReduceOp::sum) r = _mm256_add_ps(a, b);
    if constexpr (OP == ReduceOp::prod) r = _mm256_mul_ps(a, b);
    if constexpr (OP == ReduceOp::min) r = _mm256_min_ps(b, a);  // b < a ? b : a, as combine()
    if constexpr (OP == ReduceOp::max) r = _mm256_max_ps(b, a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  reduce_half<OP, f16_to_float, float_to_f16>(dst + i, src + i, n - i);
}
#else
template <ReduceOp OP>
void reduce_f16(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n) {
  reduce_half<OP, f16_to_float, float_to_f16>(dst, src, n);
}
#endif

// Serial loops stay free of OpenMP so they vectorize cleanly; threads split the range into blocks.
template <typename T, typename Kernel>
void in_blocks(T* dst, const T* src, size_t n, int threads, Kernel kernel) {
  constexpr size_t kMinPerThread = size_t(1) << 15;
  if (threads <= 1 || n < 2 * kMinPerThread) return kernel(dst, src, n);
  size_t parts = std::min<size_t>(threads, n / kMinPerThread);
  size_t block = (n + parts - 1) / parts;
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static, 1)
  for (size_t p = 0; p < parts; ++p) {
    size_t begin = p * block, end = std::min(n, begin + block);
    if (begin < end) kernel(dst + begin, src + begin, end - begin);
  }
}

template <ReduceOp OP>
void reduce_typed(void* dst, const void* src, size_t n, DType dtype, int threads) {
  switch (dtype) {
    case DType::f32:
      return in_blocks(static_cast<float*>(dst), static_cast<const float*>(src), n, threads,
                       reduce_native<OP, float>);
    case DType::f64:
      return in_blocks(static_cast<double*>(dst), static_cast<const double*>(src), n, threads,
                       reduce_native<OP, double>);
    case DType::f16:
      return in_blocks(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n, threads,
                       reduce_f16<OP>);
    case DType::bf16:
      return in_blocks(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n, threads,
                       reduce_half<OP, bf16_to_float, float_to_bf16>);
  }
}

}  // namespace

void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads) {
  switch (op) {
    case ReduceOp::sum: return reduce_typed<ReduceOp::sum>(dst, src, count, dtype, threads);
    case ReduceOp::prod: return reduce_typed<ReduceOp::prod>(dst, src, count, dtype, threads);
    case ReduceOp::min: return reduce_typed<ReduceOp::min>(dst, src, count, dtype, threads);
    case ReduceOp::max: return reduce_typed<ReduceOp::max>(dst, src, count, dtype, threads);
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
