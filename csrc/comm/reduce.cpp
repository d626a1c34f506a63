#include "comm/reduce.h"

#include <stdexcept>

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
