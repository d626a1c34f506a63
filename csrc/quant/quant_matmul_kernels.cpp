// quant_matmul for one ISA (CMake builds this file once per path). Rows of x are quantized to int8 per block
// of 32, then a register tile of R rows by one 16-column panel sums int8 x int8 products of a block exactly in
// int32 (AVX2: vpsignb puts x's sign on the weight, vpmaddubsw multiplies |x| by it into pairs, vpmaddwd adds
// the pairs), and adds each block in float32, scaled. The AVX-512 build runs the same 256-bit code.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/dtype.h"
#include "quant/quant_matmul.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace {

constexpr int kGroup = 4;                           // consecutive k of one column side by side
constexpr int kGroupsPerBlock = kQuantBlock / kGroup;
constexpr int kRows = 4;                            // rows per tile: 8 int32 and 8 float32 accumulators (AVX2)
constexpr int64_t kPrefetchBytes = 2048;                  // how far ahead of the weights in use to fetch
constexpr int64_t kParallelMinFlops = int64_t(1) << 18;  // below this, threads cost more than they save

inline float x_at(const float* p) { return *p; }
inline float x_at(const uint16_t* p) { return bf16_to_float(*p); }

// One block of 32 (n <= 32 values, the rest zero) of a row: int8 values and their scale.
template <typename XT>
inline float quantize_block(const XT* x, int n, int8_t* q) {
  float v[kQuantBlock] = {};
  for (int i = 0; i < n; ++i) v[i] = x_at(x + i);
  float amax = 0.0f;
  for (int i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
#if defined(__AVX2__)
  const __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(127.0f), neg = _mm256_set1_ps(-127.0f);
  __m256i r[4];
  for (int j = 0; j < 4; ++j)  // round to nearest even (the default MXCSR mode), as nearbyint does
    r[j] = _mm256_cvtps_epi32(_mm256_max_ps(neg, _mm256_min_ps(lim, _mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), vinv))));
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
#else
  for (int i = 0; i < kQuantBlock; ++i) q[i] = static_cast<int8_t>(std::nearbyint(std::clamp(v[i] * inv, -127.0f, 127.0f)));
#endif
  return amax / 127.0f;
}

template <typename XT>
void quantize_rows(const QuantMatmulArgs& a, int64_t blocks, int8_t* xq, float* xs, int threads) {
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t kpad = blocks * kQuantBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int n = int(std::min<int64_t>(kQuantBlock, a.K - b * kQuantBlock));
      xs[m * blocks + b] = quantize_block(x + m * a.ldx + b * kQuantBlock, n, xq + m * kpad + b * kQuantBlock);
    }
}


#if defined(__AVX2__)
template <QuantScheme S>
inline void load_group_v(const uint8_t* p, __m256i w[2]) {
  if constexpr (S == QuantScheme::int4_block32) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));  // both halves' 16 bytes
    const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
    // half h = [lo of its 16 bytes | hi of them]
    w[0] = _mm256_sub_epi8(_mm256_permute2x128_si256(lo, hi, 0x20), eight);
    w[1] = _mm256_sub_epi8(_mm256_permute2x128_si256(lo, hi, 0x31), eight);
  } else {
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  }
}
#endif

template <QuantScheme S>
constexpr int64_t group_bytes() {
  return S == QuantScheme::int4_block32 ? 32 : 64;
}

// y rows m .. m + R - 1 of panel p.
template <QuantScheme S, int R>
void tile(const QuantMatmulArgs& a, const int8_t* xq, const float* xs, int64_t blocks, int64_t m, int64_t p) {
  constexpr bool blocked = S != QuantScheme::int8_channel;
  const int64_t kpad = blocks * kQuantBlock;
  const uint8_t* w0 = a.weights + p * blocks * kGroupsPerBlock * group_bytes<S>();
  float acc[R][kQuantPanel] = {};
#if defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[R][2];
  for (int i = 0; i < R; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i iacc[R][2];
    for (int i = 0; i < R; ++i) iacc[i][0] = iacc[i][1] = _mm256_setzero_si256();
    const uint8_t* wb = w0 + b * kGroupsPerBlock * group_bytes<S>();
    for (int g = 0; g < kGroupsPerBlock; ++g) {
      if (g % (64 / group_bytes<S>()) == 0)  // each cache line of weights, kPrefetchBytes ahead
        _mm_prefetch(reinterpret_cast<const char*>(wb + g * group_bytes<S>() + kPrefetchBytes), _MM_HINT_T0);
      __m256i w[2];
      load_group_v<S>(wb + g * group_bytes<S>(), w);
      for (int i = 0; i < R; ++i) {
        int32_t four;
        std::memcpy(&four, xq + (m + i) * kpad + b * kQuantBlock + g * kGroup, 4);
        const __m256i xv = _mm256_set1_epi32(four), ax = _mm256_sign_epi8(xv, xv);
        for (int h = 0; h < 2; ++h) {  // |x| (u8) times sign(x) w (s8), in pairs
          const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[h], xv));
          if constexpr (S == QuantScheme::int4_block32)  // pairs <= 2 * 127 * 8: a whole block fits int16
            iacc[i][h] = _mm256_add_epi16(iacc[i][h], pairs);
          else  // pairs <= 2 * 127^2: widened to int32 at once
            iacc[i][h] = _mm256_add_epi32(iacc[i][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    if constexpr (S == QuantScheme::int4_block32)
      for (int i = 0; i < R; ++i)
        for (int h = 0; h < 2; ++h) iacc[i][h] = _mm256_madd_epi16(iacc[i][h], ones);
    for (int h = 0; h < 2; ++h) {
      const __m256 sw = blocked ? _mm256_loadu_ps(a.scales + (p * blocks + b) * kQuantPanel + 8 * h) : _mm256_set1_ps(1.0f);
      for (int i = 0; i < R; ++i) {
        const __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(xs[(m + i) * blocks + b]));
        facc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i][h]), scale, facc[i][h]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(acc[i] + 8 * h, facc[i][h]);
#else
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t iacc[R][kQuantPanel] = {};
    const uint8_t* wb = w0 + b * kGroupsPerBlock * group_bytes<S>();
    for (int g = 0; g < kGroupsPerBlock; ++g) {
      const uint8_t* wg = wb + g * group_bytes<S>();
      for (int c = 0; c < kQuantPanel; ++c)
        for (int j = 0; j < kGroup; ++j) {
          int w;
          if constexpr (S == QuantScheme::int4_block32) {
            const int h = c / 8, v = (c % 8) * kGroup + j;  // value v of half h
            const uint8_t byte = wg[h * 16 + v % 16];
            w = (v < 16 ? byte & 0x0f : byte >> 4) - 8;
          } else {
            w = static_cast<int8_t>(wg[c * kGroup + j]);
          }
          for (int i = 0; i < R; ++i) iacc[i][c] += w * xq[(m + i) * kpad + b * kQuantBlock + g * kGroup + j];
        }
    }
    for (int c = 0; c < kQuantPanel; ++c) {
      const float sw = blocked ? a.scales[(p * blocks + b) * kQuantPanel + c] : 1.0f;
      for (int i = 0; i < R; ++i) acc[i][c] = std::fma(float(iacc[i][c]), sw * xs[(m + i) * blocks + b], acc[i][c]);
    }
  }
#endif
  const int64_t col0 = p * kQuantPanel;
  const int cols = int(std::min<int64_t>(kQuantPanel, a.N - col0));
  for (int i = 0; i < R; ++i) {
    if constexpr (!blocked)
      for (int c = 0; c < cols; ++c) acc[i][c] *= a.scales[col0 + c];
    if (a.bias)
      for (int c = 0; c < cols; ++c) acc[i][c] += a.bias[col0 + c];
    std::memcpy(a.y + (m + i) * a.ldy + col0, acc[i], sizeof(float) * cols);
  }
}

template <QuantScheme S, int Max>
inline void tile_rows(int r, const QuantMatmulArgs& a, const int8_t* xq, const float* xs, int64_t blocks, int64_t m,
                      int64_t p) {
  if constexpr (Max > 0) {
    if (r == Max) return tile<S, Max>(a, xq, xs, blocks, m, p);
    tile_rows<S, Max - 1>(r, a, xq, xs, blocks, m, p);
  }
}

template <QuantScheme S>
void run(const QuantMatmulArgs& a, int threads) {
  const int64_t blocks = (a.K + kQuantBlock - 1) / kQuantBlock;
  const int64_t panels = (a.N + kQuantPanel - 1) / kQuantPanel;
  if (2 * a.M * a.N * a.K < kParallelMinFlops) threads = 1;
  std::vector<int8_t> xq(a.M * blocks * kQuantBlock);
  std::vector<float> xs(a.M * blocks);
  if (a.x_bf16)
    quantize_rows<uint16_t>(a, blocks, xq.data(), xs.data(), threads);
  else
    quantize_rows<float>(a, blocks, xq.data(), xs.data(), threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    int64_t m = 0;
    for (; m + kRows <= a.M; m += kRows) tile<S, kRows>(a, xq.data(), xs.data(), blocks, m, p);
    if (m < a.M) tile_rows<S, kRows - 1>(int(a.M - m), a, xq.data(), xs.data(), blocks, m, p);
  }
}

}  // namespace

void quant_matmul(const QuantMatmulArgs& a, int threads) {
  switch (a.scheme) {
    case QuantScheme::int8_channel: return run<QuantScheme::int8_channel>(a, threads);
    case QuantScheme::int8_block32: return run<QuantScheme::int8_block32>(a, threads);
    case QuantScheme::int4_block32: return run<QuantScheme::int4_block32>(a, threads);
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
