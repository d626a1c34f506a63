// gemm_packed for one ISA (CMake builds this file once per path): an outer-product register tile of
// kRows rows of x by one 16-column panel, accumulated over k in order, written once.
#include <algorithm>
#include <cstring>

#include "common/simd.h"
#include "gemm/gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace {

using simd::vf;
typedef float vf_unaligned __attribute__((vector_size(simd::kVecBytes), aligned(4)));
constexpr int kLanes = simd::kLanesF;
constexpr int kVecs = kGemmPanel / kLanes;  // vectors per panel row: 1 (AVX-512), 2 (AVX2), 4 (SSE)
// rows per tile: 12 accumulators (AVX2, SSE: of 16 registers); 16 of AVX-512's 32, so a batch of 16
// sequences reads each panel once
constexpr int kRows = kVecs == 1 ? 16 : 12 / kVecs;
constexpr int64_t kPrefetchRows = 128;  // panel rows ahead (8 KiB): past DRAM latency even at one row of x
constexpr int64_t kParallelMinFlops = int64_t(1) << 18;  // below this, threads cost more than they save

template <int R>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y,
                 int64_t ldy, int cols) {
  vf acc[R][kVecs];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + kPrefetchRows) * kGemmPanel);  // past the end: the next panel's start
    vf w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = *reinterpret_cast<const vf_unaligned*>(panel + k * kGemmPanel + j * kLanes);
    for (int i = 0; i < R; ++i) {
      const float xs = x[i * ldx + k];  // broadcast by the vector-scalar product
      for (int j = 0; j < kVecs; ++j) acc[i][j] += xs * w[j];
    }
  }
  float out[kGemmPanel];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < kVecs; ++j) *reinterpret_cast<vf_unaligned*>(out + j * kLanes) = acc[i][j];
    if (bias)
      for (int c = 0; c < cols; ++c) out[c] += bias[c];
    std::memcpy(y + i * ldy, out, sizeof(float) * cols);
  }
}

template <int R>
void rows_tail(int r, const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y,
               int64_t ldy, int cols) {
  if constexpr (R > 0) {
    if (r == R) return tile<R>(x, ldx, panel, K, bias, y, ldy, cols);
    rows_tail<R - 1>(r, x, ldx, panel, K, bias, y, ldy, cols);
  }
}

}  // namespace

void gemm_packed(const GemmArgs& a, int threads) {
  const int64_t panels = (a.N + kGemmPanel - 1) / kGemmPanel;
  if (2 * a.M * a.N * a.K < kParallelMinFlops) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = a.panels + p * a.K * kGemmPanel;
    const int cols = int(std::min<int64_t>(kGemmPanel, a.N - p * kGemmPanel));
    const float* bias = a.bias ? a.bias + p * kGemmPanel : nullptr;
    int64_t m = 0;
    for (; m + kRows <= a.M; m += kRows)
      tile<kRows>(a.x + m * a.ldx, a.ldx, panel, a.K, bias, a.y + m * a.ldy + p * kGemmPanel, a.ldy, cols);
    if (m < a.M)
      rows_tail<kRows - 1>(int(a.M - m), a.x + m * a.ldx, a.ldx, panel, a.K, bias,
                           a.y + m * a.ldy + p * kGemmPanel, a.ldy, cols);
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
