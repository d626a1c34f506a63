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

// How an element type is stored and computed: native types as themselves, half types in float32.
template <typename T>
struct Native {
  using Storage = T;
  using Compute = T;
  static T load(T x) { return x; }
  static T store(T x) { return x; }
};
struct F16 {
  using Storage = uint16_t;
  using Compute = float;
  static float load(uint16_t h) { return f16_to_float(h); }
  static uint16_t store(float f) { return float_to_f16(f); }
};
struct BF16 {
  using Storage = uint16_t;
  using Compute = float;
  static float load(uint16_t h) { return bf16_to_float(h); }
  static uint16_t store(float f) { return float_to_bf16(f); }
};

constexpr size_t kParallelMin = size_t(1) << 16;  // below this, threads cost more than they save

template <ReduceOp OP, typename T>
inline T combine(T a, T b) {
  if constexpr (OP == ReduceOp::sum) return a + b;
  if constexpr (OP == ReduceOp::prod) return a * b;
  if constexpr (OP == ReduceOp::min) return b < a ? b : a;
  if constexpr (OP == ReduceOp::max) return b > a ? b : a;
}

// dst[i] = dst[i] op src[i]
template <ReduceOp OP, typename E>
void reduce_into_t(typename E::Storage* __restrict dst, const typename E::Storage* __restrict src, size_t n,
                   int threads) {
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && n >= kParallelMin) schedule(static)
  for (size_t i = 0; i < n; ++i) dst[i] = E::store(combine<OP>(E::load(dst[i]), E::load(src[i])));
}

// dst[i] = a[i] op b[i], three distinct buffers
template <ReduceOp OP, typename E>
void reduce_to_t(typename E::Storage* __restrict dst, const typename E::Storage* __restrict a,
                 const typename E::Storage* __restrict b, size_t n, int threads) {
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && n >= kParallelMin) schedule(static)
  for (size_t i = 0; i < n; ++i) dst[i] = E::store(combine<OP>(E::load(a[i]), E::load(b[i])));
}

// dst[i] = dst[i] / divisor, a true division so the result is the correctly rounded quotient
template <typename E>
void divide_t(typename E::Storage* __restrict dst, size_t n, typename E::Compute divisor, int threads) {
#pragma omp parallel for simd num_threads(threads) if (threads > 1 && n >= kParallelMin) schedule(static)
  for (size_t i = 0; i < n; ++i) dst[i] = E::store(E::load(dst[i]) / divisor);
}

// Calls fn(E{}) with the element policy of dtype.
template <typename Fn>
void with_element(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(Native<float>{});
    case DType::f64: return fn(Native<double>{});
    case DType::f16: return fn(F16{});
    case DType::bf16: return fn(BF16{});
  }
}

template <ReduceOp OP>
void reduce_typed(void* dst, const void* a, const void* b, size_t n, DType dtype, int threads) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    using S = typename E::Storage;
    if (a == dst)
      reduce_into_t<OP, E>(static_cast<S*>(dst), static_cast<const S*>(b), n, threads);
    else if (b == dst)  // every op here is commutative
      reduce_into_t<OP, E>(static_cast<S*>(dst), static_cast<const S*>(a), n, threads);
    else
      reduce_to_t<OP, E>(static_cast<S*>(dst), static_cast<const S*>(a), static_cast<const S*>(b), n, threads);
  });
}

void reduce_any(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op, int threads) {
  switch (op) {
    case ReduceOp::sum: return reduce_typed<ReduceOp::sum>(dst, a, b, count, dtype, threads);
    case ReduceOp::prod: return reduce_typed<ReduceOp::prod>(dst, a, b, count, dtype, threads);
    case ReduceOp::min: return reduce_typed<ReduceOp::min>(dst, a, b, count, dtype, threads);
    case ReduceOp::max: return reduce_typed<ReduceOp::max>(dst, a, b, count, dtype, threads);
  }
}

}  // namespace

void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads) {
  reduce_any(dst, dst, src, count, dtype, op, threads);
}

void reduce_to(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op, int threads) {
  reduce_any(dst, a, b, count, dtype, op, threads);
}

void divide_by(void* dst, size_t count, DType dtype, double divisor, int threads) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    divide_t<E>(static_cast<typename E::Storage*>(dst), count, static_cast<typename E::Compute>(divisor), threads);
  });
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
