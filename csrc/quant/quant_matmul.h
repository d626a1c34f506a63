// Weight-quantized matrix multiply for inference: y[M, N] = x[M, K] @ dequant(Wq)[N, K]^T (+ bias[N]),
// x float32 or bfloat16, W in int8 (one scale per output channel or per block of 32 along K) or int4 (one
// scale per block of 32; w = (q - 8) * scale, q in 0..15), packed once into panels of kQuantPanel output columns.
// Weights are dequantized to float32 in registers, a panel row at a time, and never stored as float32.
// Every y[m][n] is summed in float32 in one fixed order (int8-channel: sum over k of x[m][k] q[n][k], times the
// channel's scale; block schemes: over blocks in order, (sum over the block of x q, int4: minus 8 sum of x) times
// the block's scale), then + bias[n]: no row's result depends on M or on the other rows.
#pragma once
#include <cstdint>

#include "common/dispatch.h"

namespace hpclm {

constexpr int kQuantPanel = 16;  // output columns per panel
constexpr int kQuantBlock = 32;  // K elements per scale in the block schemes

enum class QuantScheme { int8_channel = 0, int8_block32 = 1, int4_block32 = 2 };

// Packed layouts, P = ceil(N / kQuantPanel) panels, B = ceil(K / kQuantBlock) blocks, columns past N zero:
//   int8:  weights [P][K][16] int8;   int4: weights [P][K][8] bytes, byte c = q[col c] | q[col c + 8] << 4
//   int8_channel scales [P * 16];     block schemes: scales [P][B][16]
struct QuantMatmulArgs {
  const void* x;          // [M, K], row stride ldx elements: float32, or bfloat16 bits when x_bf16
  bool x_bf16;
  const uint8_t* weights;
  const float* scales;
  const float* bias;      // [N] or nullptr
  float* y;               // [M, N], row stride ldy
  int64_t M, N, K, ldx, ldy;
  QuantScheme scheme;
};

// Dispatches to the CPU path chosen by selected_isa(); `threads` OpenMP threads share the panels.
void quant_matmul(const QuantMatmulArgs& a, int threads);

HPCLM_DECLARE_PER_ISA(void quant_matmul(const QuantMatmulArgs& a, int threads);)

}  // namespace hpclm
