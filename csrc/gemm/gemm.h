// Float32 matrix multiply for inference: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), W packed once into
// panels of kGemmPanel output columns ([ceil(N / kGemmPanel)][K][kGemmPanel], zero-padded).
// Every y[m][n] is the sum over k in order 0..K-1 of x[m][k] * W[n][k] (then + bias[n]): the result of a
// row does not depend on M or on the other rows, so batching sequences cannot change any of them.
#pragma once
#include <cstdint>

#include "common/dispatch.h"

namespace hpclm {

constexpr int kGemmPanel = 16;

struct GemmArgs {
  const float* x;       // [M, K], row stride ldx
  const float* panels;  // packed W
  const float* bias;    // [N] or nullptr
  float* y;             // [M, N], row stride ldy
  int64_t M, N, K, ldx, ldy;
};

// Dispatches to the CPU path chosen by selected_isa(); `threads` OpenMP threads share the panels.
void gemm_packed(const GemmArgs& a, int threads);

HPCLM_DECLARE_PER_ISA(void gemm_packed(const GemmArgs& a, int threads);)

}  // namespace hpclm
