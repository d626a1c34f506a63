#include "comm/reduce.h"

#include <stdexcept>

#include "common/cpu_features.h"

namespace hpclm {

ReduceOp parse_reduce_op(const std::string& s) {
  if (s == "sum") return ReduceOp::sum;
  if (s == "prod" || s == "product") return ReduceOp::prod;
  if (s == "min") return ReduceOp::min;
  if (s == "max") return ReduceOp::max;
  throw std::invalid_argument("unsupported reduce op '" + s + "': use sum, prod, min or max");
}

// Calls the same-named kernel of the CPU path in use.
#ifdef HPCLM_WITH_AVX512
#define HPCLM_CASE_AVX512(call) case Isa::avx512: return avx512::call;
#else
#define HPCLM_CASE_AVX512(call)
#endif
#ifdef HPCLM_WITH_AVX2
#define HPCLM_CASE_AVX2(call) case Isa::avx2: return avx2::call;
#else
#define HPCLM_CASE_AVX2(call)
#endif
#define HPCLM_DISPATCH(call)       \
  switch (selected_isa()) {        \
    HPCLM_CASE_AVX512(call)        \
    HPCLM_CASE_AVX2(call)          \
    default: return scalar::call;  \
  }

void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads) {
  if (threads < 1) threads = 1;
  HPCLM_DISPATCH(reduce_into(dst, src, count, dtype, op, threads))
}

void reduce_to(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op, int threads) {
  if (threads < 1) threads = 1;
  HPCLM_DISPATCH(reduce_to(dst, a, b, count, dtype, op, threads))
}

void divide_by(void* dst, size_t count, DType dtype, double divisor, int threads) {
  if (threads < 1) threads = 1;
  HPCLM_DISPATCH(divide_by(dst, count, dtype, divisor, threads))
}

}  // namespace hpclm
