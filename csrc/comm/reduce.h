// Elementwise reductions: the arithmetic of a ring allreduce step.
// Half types are combined in float32 and rounded once.
#pragma once
#include <cstddef>
#include <string>

#include "common/dispatch.h"
#include "common/dtype.h"

namespace hpclm {

enum class ReduceOp { sum, prod, min, max };

ReduceOp parse_reduce_op(const std::string& s);

// All dispatch to the CPU path chosen by selected_isa(); `threads` OpenMP threads (1 = serial).
// dst[i] = dst[i] op src[i]
void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads = 1);
// dst[i] = a[i] op b[i]; dst may be a or b, otherwise the three must not overlap.
void reduce_to(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op, int threads = 1);
// dst[i] = dst[i] / divisor, correctly rounded (the "avg" of an allreduce is sum, then this).
void divide_by(void* dst, size_t count, DType dtype, double divisor, int threads = 1);

HPCLM_DECLARE_PER_ISA(
    void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, int threads);
    void reduce_to(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op, int threads);
    void divide_by(void* dst, size_t count, DType dtype, double divisor, int threads);)

}  // namespace hpclm
