// Elementwise reduction dst[i] = dst[i] (op) src[i]: the arithmetic of a ring allreduce step.
// Half types are combined in float32 and rounded once.
#pragma once
#include <cstddef>
#include <string>

#include "common/dtype.h"

namespace hpclm {

enum class ReduceOp { sum, prod, min, max };

ReduceOp parse_reduce_op(const std::string& s);

// Dispatches to the CPU path chosen by selected_isa(); `threads` OpenMP threads (1 = serial).
void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads = 1);

#define HPCLM_DECLARE_REDUCE(isa) \
  namespace isa {                 \
  void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads); \
  }
HPCLM_DECLARE_REDUCE(scalar)
HPCLM_DECLARE_REDUCE(avx2)
HPCLM_DECLARE_REDUCE(avx512)
#undef HPCLM_DECLARE_REDUCE

}  // namespace hpclm
