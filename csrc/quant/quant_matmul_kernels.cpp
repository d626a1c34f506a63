// quant_matmul for one ISA (CMake builds this file once per path): a register tile of R rows of x by PN
// 16-column panels; each panel row of weights is widened to float32 in registers, then multiplied into the
// R rows. Every output element is one accumulator summed over k in
// order, so the tile shape (chosen by M) never changes a result.
#include <algorithm>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/simd.h"
#include "quant/quant_matmul.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace {

using simd::vf;
typedef float vf_unaligned __attribute__((vector_size(simd::kVecBytes), aligned(4)));
constexpr int kLanes = simd::kLanesF;
constexpr int kVecs = kQuantPanel / kLanes;  // vectors per panel row: 1 (AVX-512), 2 (AVX2), 4 (portable)
// rows per tile for large M: 12 accumulators of AVX-512's 32 registers, 12 of AVX2's 16
constexpr int kRows = kVecs == 1 ? 12 : 12 / kVecs;
// Below kRows rows, PN panels per tile keep at least 8 independent accumulators in flight.
constexpr int panels_per_tile(int rows) { return std::max(1, 8 / (rows * kVecs)); }
constexpr int64_t kPrefetchRows = 128;                    // weight rows ahead of the one in use
constexpr int64_t kParallelMinFlops = int64_t(1) << 18;  // below this, threads cost more than they save

inline float x_at(const float* p) { return *p; }
inline float x_at(const uint16_t* p) { return bf16_to_float(*p); }

// 16 int8 weights (one panel row) as float32 vectors.
inline void widen_i8(const uint8_t* p, vf w[kVecs]) {
#if defined(__AVX512F__)
  w[0] = simd::bitcast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  for (int j = 0; j < 2; ++j)
    w[j] = simd::bitcast<vf>(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j)))));
#else
  for (int j = 0; j < kVecs; ++j)
    for (int l = 0; l < kLanes; ++l) w[j][l] = float(static_cast<int8_t>(p[j * kLanes + l]));
#endif
}

// 8 bytes of nibbles (one int4 panel row: byte c holds columns c and c + 8) as float32 vectors of 0..15.
inline void widen_u4(const uint8_t* p, vf w[kVecs]) {
#if defined(__AVX512F__) || defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i nibbles = _mm_and_si128(_mm_unpacklo_epi64(bytes, _mm_srli_epi16(bytes, 4)), _mm_set1_epi8(0x0f));
#if defined(__AVX512F__)
  w[0] = simd::bitcast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nibbles)));
#else
  w[0] = simd::bitcast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles)));
  w[1] = simd::bitcast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8))));
#endif
#else
  for (int c = 0; c < kQuantPanel; ++c) w[c / kLanes][c % kLanes] = float(c < 8 ? p[c] & 0x0f : p[c - 8] >> 4);
#endif
}

template <QuantScheme S>
constexpr int64_t row_bytes() {
  return S == QuantScheme::int4_block32 ? kQuantPanel / 2 : kQuantPanel;
}

// y rows m .. m + R - 1, panels p .. p + PN - 1 (all of them inside N's panels). Block schemes sum a block's
// products of x and the raw values (int8 q, or int4 q in 0..15) first, then add (sum - 8 sum(x)) * scale.
template <QuantScheme S, typename XT, int R, int PN>
inline void tile(const QuantMatmulArgs& a, const XT* x, int64_t m, int64_t p) {
  constexpr int64_t rb = row_bytes<S>();
  constexpr bool blocked = S != QuantScheme::int8_channel;
  constexpr bool int4 = S == QuantScheme::int4_block32;
  const int64_t K = a.K, blocks = (K + kQuantBlock - 1) / kQuantBlock;
  const uint8_t* w0 = a.weights + p * K * rb;
  const XT* x0 = x + m * a.ldx;
  vf acc[R][PN][kVecs];
  for (int i = 0; i < R; ++i)
    for (int q = 0; q < PN; ++q)
      for (int j = 0; j < kVecs; ++j) acc[i][q][j] = vf{};
  for (int64_t b = 0; b < blocks; ++b) {
    vf part[R][PN][kVecs];  // block schemes: this block's sums
    float xsum[R];          // int4: this block's sum of x
    if constexpr (blocked)
      for (int i = 0; i < R; ++i) {
        xsum[i] = 0.0f;
        for (int q = 0; q < PN; ++q)
          for (int j = 0; j < kVecs; ++j) part[i][q][j] = vf{};
      }
    auto& sums = blocked ? part : acc;
    const int64_t k_end = std::min(K, (b + 1) * kQuantBlock);
    for (int64_t k = b * kQuantBlock; k < k_end; ++k) {
      float xs[R];
      for (int i = 0; i < R; ++i) {
        xs[i] = x_at(x0 + i * a.ldx + k);
        if constexpr (int4) xsum[i] += xs[i];
      }
      for (int q = 0; q < PN; ++q) {
        const uint8_t* row = w0 + (q * K + k) * rb;
        __builtin_prefetch(row + kPrefetchRows * rb);  // past the panel's end: harmless
        vf w[kVecs];
        if constexpr (int4)
          widen_u4(row, w);
        else
          widen_i8(row, w);
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < kVecs; ++j) sums[i][q][j] += xs[i] * w[j];
      }
    }
    if constexpr (blocked) {
      for (int q = 0; q < PN; ++q)
        for (int j = 0; j < kVecs; ++j) {
          const vf scale =
              *reinterpret_cast<const vf_unaligned*>(a.scales + ((p + q) * blocks + b) * kQuantPanel + j * kLanes);
          for (int i = 0; i < R; ++i) {
            vf sum = part[i][q][j];
            if constexpr (int4) sum -= 8.0f * xsum[i];
            acc[i][q][j] += sum * scale;
          }
        }
    }
  }
  for (int q = 0; q < PN; ++q) {
    const int64_t col0 = (p + q) * kQuantPanel;
    const int cols = int(std::min<int64_t>(kQuantPanel, a.N - col0));
    for (int i = 0; i < R; ++i) {
      float out[kQuantPanel];
      for (int j = 0; j < kVecs; ++j) *reinterpret_cast<vf_unaligned*>(out + j * kLanes) = acc[i][q][j];
      if constexpr (!blocked)
        for (int c = 0; c < cols; ++c) out[c] *= a.scales[col0 + c];
      if (a.bias)
        for (int c = 0; c < cols; ++c) out[c] += a.bias[col0 + c];
      std::memcpy(a.y + (m + i) * a.ldy + col0, out, sizeof(float) * cols);
    }
  }
}

// tile<R, PN> for a run-time R in 1..Max (PN = 1, or panels_per_tile(R) when `grouped`).
template <QuantScheme S, typename XT, int Max, bool grouped>
inline void tile_rows(int r, const QuantMatmulArgs& a, const XT* x, int64_t m, int64_t p) {
  if constexpr (Max > 0) {
    if (r == Max) return tile<S, XT, Max, grouped ? panels_per_tile(Max) : 1>(a, x, m, p);
    tile_rows<S, XT, Max - 1, grouped>(r, a, x, m, p);
  }
}

template <QuantScheme S, typename XT>
void run(const QuantMatmulArgs& a, int threads) {
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t panels = (a.N + kQuantPanel - 1) / kQuantPanel;
  if (2 * a.M * a.N * a.K < kParallelMinFlops) threads = 1;
  if (a.M < kRows) {  // decoding: every row in one tile, groups of panels side by side
    const int rows = int(a.M);
    const int64_t group = panels_per_tile(rows);  // the PN tile_rows<.., true> picks for `rows`
    const int64_t groups = (panels + group - 1) / group;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t p = g * group;
      if (p + group <= panels) {
        tile_rows<S, XT, kRows - 1, true>(rows, a, x, 0, p);
      } else {
        for (int64_t q = p; q < panels; ++q) tile_rows<S, XT, kRows - 1, false>(rows, a, x, 0, q);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    int64_t m = 0;
    for (; m + kRows <= a.M; m += kRows) tile<S, XT, kRows, 1>(a, x, m, p);
    if (m < a.M) tile_rows<S, XT, kRows - 1, false>(int(a.M - m), a, x, m, p);
  }
}

template <QuantScheme S>
void run_x(const QuantMatmulArgs& a, int threads) {
  if (a.x_bf16)
    run<S, uint16_t>(a, threads);
  else
    run<S, float>(a, threads);
}

}  // namespace

void quant_matmul(const QuantMatmulArgs& a, int threads) {
  switch (a.scheme) {
    case QuantScheme::int8_channel: return run_x<QuantScheme::int8_channel>(a, threads);
    case QuantScheme::int8_block32: return run_x<QuantScheme::int8_block32>(a, threads);
    case QuantScheme::int4_block32: return run_x<QuantScheme::int4_block32>(a, threads);
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
