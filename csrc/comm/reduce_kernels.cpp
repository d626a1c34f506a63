// Compiled once per ISA (CMake sets HPCLM_ISA and the matching -m flags); plain loops
// that the compiler vectorizes for that ISA.
#include <algorithm>

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
void reduce_native(T* __restrict dst, const T* __restrict src, size_t n, int threads) {
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && n >= (1u << 16)) schedule(static)
  for (size_t i = 0; i < n; ++i) dst[i] = combine<OP>(dst[i], src[i]);
}

template <ReduceOp OP, float (*Load)(uint16_t), uint16_t (*Store)(float)>
void reduce_half(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n, int threads) {
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && n >= (1u << 16)) schedule(static)
  for (size_t i = 0; i < n; ++i) dst[i] = Store(combine<OP>(Load(dst[i]), Load(src[i])));
}

template <ReduceOp OP>
void reduce_typed(void* dst, const void* src, size_t n, DType dtype, int threads) {
  switch (dtype) {
    case DType::f32:
      return reduce_native<OP>(static_cast<float*>(dst), static_cast<const float*>(src), n, threads);
    case DType::f64:
      return reduce_native<OP>(static_cast<double*>(dst), static_cast<const double*>(src), n, threads);
    case DType::f16:
      return reduce_half<OP, f16_to_float, float_to_f16>(static_cast<uint16_t*>(dst),
                                                         static_cast<const uint16_t*>(src), n, threads);
    case DType::bf16:
      return reduce_half<OP, bf16_to_float, float_to_bf16>(static_cast<uint16_t*>(dst),
                                                           static_cast<const uint16_t*>(src), n, threads);
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
