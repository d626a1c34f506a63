// The run-time choice of gemm_packed's CPU path (csrc/gemm/gemm_kernels.cpp is compiled once per ISA).
#include "gemm/gemm.h"

namespace hpclm {

void gemm_packed(const GemmArgs& a, int threads) { HPCLM_DISPATCH(gemm_packed(a, threads)); }

}  // namespace hpclm
