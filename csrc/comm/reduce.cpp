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

void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads) {
  if (threads < 1) threads = 1;
  switch (selected_isa()) {
#ifdef HPCLM_WITH_AVX512
    case Isa::avx512: return avx512::reduce_into(dst, src, count, dtype, op, threads);
#endif
#ifdef HPCLM_WITH_AVX2
    case Isa::avx2: return avx2::reduce_into(dst, src, count, dtype, op, threads);
#endif
    default: return scalar::reduce_into(dst, src, count, dtype, op, threads);
  }
}

}  // namespace hpclm
