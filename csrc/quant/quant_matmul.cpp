// The run-time choice of quant_matmul's CPU path (quant_matmul_kernels.cpp is compiled once per ISA).
#include "quant/quant_matmul.h"

namespace hpclm {

void quant_matmul(const QuantMatmulArgs& a, int threads) { HPCLM_DISPATCH(quant_matmul(a, threads)); }

}  // namespace hpclm
