// Compiled once per ISA (CMake sets HPCLM_ISA and the matching -m flags); plain loops
// that the compiler vectorizes for that ISA.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "comm/reduce.h"
#include "common/simd.h"

#ifdef _OPENMP
#include <omp.h>
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

// One op on two values, or lane by lane on two vectors (GCC vector extensions take the same expressions).
template <ReduceOp OP, typename T>
inline T combine(T a, T b) {
  if constexpr (OP == ReduceOp::sum) return a + b;
  if constexpr (OP == ReduceOp::prod) return a * b;
  if constexpr (OP == ReduceOp::min) return b < a ? b : a;
  if constexpr (OP == ReduceOp::max) return b > a ? b : a;
}

// a op b on stored values. min and max pick one input, so for half types they select the stored
// bits (no rounding involved), which the compiler vectorizes where a float select is not.
template <ReduceOp OP, typename E>
inline typename E::Storage apply(typename E::Storage a, typename E::Storage b) {
  constexpr bool picks = OP == ReduceOp::min || OP == ReduceOp::max;
  if constexpr (picks && !std::is_same_v<typename E::Storage, typename E::Compute>) {  // half types
    typename E::Compute x = E::load(a), y = E::load(b);
    return (OP == ReduceOp::min ? y < x : y > x) ? b : a;
  } else {
    return E::store(combine<OP>(E::load(a), E::load(b)));
  }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
// GCC leaves _Float16 conversions scalar and auto-vectorizes bfloat16 rounding poorly, so half-type
// spans go through the shared vector layer (common/simd.h), kLanesF elements at a time; the tail goes
// element by element. Same arithmetic as the scalar code: float32, rounded to nearest even once.
using simd::kLanesF;
using simd::vf;

template <typename E>
inline vf load_vec(const uint16_t* p) {
  if constexpr (std::is_same_v<E, F16>) return simd::load_f16(p);
  else return simd::load_bf16(p);
}
template <typename E>
inline void store_vec(uint16_t* p, vf v) {
  simd::vu16 h;
  if constexpr (std::is_same_v<E, F16>) h = simd::pack_f16(v);
  else h = simd::pack_bf16(v);
  std::memcpy(p, &h, sizeof h);
}

// dst[i] = a[i] op b[i] over the whole vectors of [0, n) (dst may be a); returns how far it got.
template <ReduceOp OP, typename E>
size_t half_reduce_vec(uint16_t* dst, const uint16_t* a, const uint16_t* b, size_t n) {
  size_t i = 0;
  for (; i + kLanesF <= n; i += kLanesF)
    store_vec<E>(dst + i, combine<OP>(load_vec<E>(a + i), load_vec<E>(b + i)));  // lane by lane
  return i;
}

template <typename E>
size_t half_divide_vec(uint16_t* dst, size_t n, float divisor) {
  size_t i = 0;
  const vf d = vf{} + divisor;
  for (; i + kLanesF <= n; i += kLanesF) store_vec<E>(dst + i, load_vec<E>(dst + i) / d);
  return i;
}
#else
template <ReduceOp OP, typename E>
size_t half_reduce_vec(uint16_t*, const uint16_t*, const uint16_t*, size_t) { return 0; }
template <typename E>
size_t half_divide_vec(uint16_t*, size_t, float) { return 0; }
#endif

template <typename E>
constexpr bool is_half = !std::is_same_v<typename E::Storage, typename E::Compute>;

// The loops: serial over one span, written for the auto-vectorizer (restrict, no calls);
// half types start with their hand-vectorized part where there is one.
// dst[i] = dst[i] op src[i]
template <ReduceOp OP, typename E>
void reduce_into_span(typename E::Storage* __restrict dst, const typename E::Storage* __restrict src, size_t n) {
  size_t i = 0;
  if constexpr (is_half<E>) i = half_reduce_vec<OP, E>(dst, dst, src, n);
  for (; i < n; ++i) dst[i] = apply<OP, E>(dst[i], src[i]);
}

// dst[i] = a[i] op b[i], three distinct buffers
template <ReduceOp OP, typename E>
void reduce_to_span(typename E::Storage* __restrict dst, const typename E::Storage* __restrict a,
                    const typename E::Storage* __restrict b, size_t n) {
  size_t i = 0;
  if constexpr (is_half<E>) i = half_reduce_vec<OP, E>(dst, a, b, n);
  for (; i < n; ++i) dst[i] = apply<OP, E>(a[i], b[i]);
}

// dst[i] = dst[i] / divisor, a true division so the result is the correctly rounded quotient
template <typename E>
void divide_span(typename E::Storage* __restrict dst, size_t n, typename E::Compute divisor) {
  size_t i = 0;
  if constexpr (is_half<E>) i = half_divide_vec<E>(dst, n, divisor);
  for (; i < n; ++i) dst[i] = E::store(E::load(dst[i]) / divisor);
}

// span(begin, end) over [0, n), cut into `threads` contiguous pieces when that pays off.
template <typename Span>
void split(size_t n, int threads, Span&& span) {
#ifdef _OPENMP
  if (threads > 1 && n >= kParallelMin) {
#pragma omp parallel num_threads(threads)
    {
      size_t t = static_cast<size_t>(omp_get_thread_num()), T = static_cast<size_t>(omp_get_num_threads());
      span(n * t / T, n * (t + 1) / T);
    }
    return;
  }
#endif
  (void)threads;
  span(size_t(0), n);
}

template <ReduceOp OP, typename E>
void reduce_into_t(typename E::Storage* dst, const typename E::Storage* src, size_t n, int threads) {
  split(n, threads, [&](size_t b, size_t e) { reduce_into_span<OP, E>(dst + b, src + b, e - b); });
}

template <ReduceOp OP, typename E>
void reduce_to_t(typename E::Storage* dst, const typename E::Storage* a, const typename E::Storage* b, size_t n,
                 int threads) {
  split(n, threads, [&](size_t lo, size_t hi) { reduce_to_span<OP, E>(dst + lo, a + lo, b + lo, hi - lo); });
}

template <typename E>
void divide_t(typename E::Storage* dst, size_t n, typename E::Compute divisor, int threads) {
  split(n, threads, [&](size_t b, size_t e) { divide_span<E>(dst + b, e - b, divisor); });
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
