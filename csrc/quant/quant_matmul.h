// Weight-quantized matrix multiply for inference: y[M, N] = x[M, K] @ dequant(Wq)[N, K]^T (+ bias[N]),
// x float32 or bfloat16, W in int8 (one scale per output channel or per block of 32 along K) or int4 (one
// scale per block of 32; w = (q - 8) * scale, q in 0..15), packed once into panels of kQuantPanel output columns.
// x is quantized to int8 too (scale = max |x| / 127, round to nearest even) and products are summed exactly in
// int32; weights are never widened to float32. Block schemes, as llama.cpp does: each row of x per block of 32,
// y[m][n] = sum over blocks b in order of float(dot_b) * (sw[n][b] * sx[m][b]) in float32, then + bias[n].
// int8-channel, as torch.ao's dynamic quantization (one scale a row here, one a tensor there): one scale per row,
// the row's whole dot in int32 (exact for K <= kQuantChannelMaxK), y[m][n] = float(dot) * sx[m] * sw[n] + bias[n].
// No row's result depends on M or on the other rows, so batching sequences cannot change any of them.
#pragma once
#include <cstdint>

#include "common/dispatch.h"

namespace hpclm {

constexpr int kQuantPanel = 16;  // output columns per panel
constexpr int kQuantBlock = 32;  // K elements per scale in the block schemes
// int8-channel: the longest row whose dot of int8 values (|q| <= 127) cannot leave int32 (127^2 K < 2^31)
constexpr int64_t kQuantChannelMaxK = int64_t(1) << 17;

enum class QuantScheme { int8_channel = 0, int8_block32 = 1, int4_block32 = 2 };

// Packed layouts, P = ceil(N / kQuantPanel) panels, B = ceil(K / kQuantBlock) blocks, K padded to B * 32 and
// columns past N with zero weights; G = B * 8 groups of 4 consecutive k:
//   int8: weights [P][G][16 columns][4 k] int8, 64 bytes a group;
//   int4: weights [P][G][2 halves][16 bytes], 32 bytes a group: half h holds columns 8h .. 8h + 7 as the 32
//         values v[c * 4 + j] (column 8h + c, k = 4g + j), byte i = v[i] | v[i + 16] << 4 (q in 0..15);
//   int8_channel scales [P * 16] float32; block schemes: scales [P][B][16] float16 bits.
struct QuantMatmulArgs {
  const void* x;          // [M, K], row stride ldx elements: float32, or bfloat16 bits when x_bf16
  bool x_bf16;
  const uint8_t* weights;
  const void* scales;     // float32 (int8_channel) or float16 bits (the block schemes), laid out as above
  const float* bias;      // [N] or nullptr
  float* y;               // [M, N], row stride ldy
  int64_t M, N, K, ldx, ldy;
  QuantScheme scheme;
};

// Dispatches to the CPU path chosen by selected_isa(); `threads` OpenMP threads share the rows' quantization,
// then the panels.
void quant_matmul(const QuantMatmulArgs& a, int threads);

HPCLM_DECLARE_PER_ISA(void quant_matmul(const QuantMatmulArgs& a, int threads);)

}  // namespace hpclm
