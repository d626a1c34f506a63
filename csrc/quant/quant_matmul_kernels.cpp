// quant_matmul for one ISA (CMake builds this file once per path). Rows of x are quantized to int8 per block
// of 32, then a register tile of rows by output columns sums int8 x int8 products of a block exactly in int32
// and adds each block in float32, scaled.
// AVX-512 VNNI: a tile of R rows by P 16-column panels; one vpdpbusd per row and panel multiplies a group
// (16 columns x 4 k, 64 bytes) of unsigned weights (int8 w + 128, or int4's stored q = w + 8) by the row's 4
// signed x, broadcast, and adds them into int32; the offset times the block's sum of x is taken out by
// starting the accumulator at -offset * sum(x).
// AVX2 (and the AVX-512 build without VNNI): 4 rows by one panel; vpsignb puts x's sign on the weight,
// vpmaddubsw multiplies |x| by it into pairs, vpmaddwd adds the pairs, 256 bits at a time.
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
constexpr int64_t kPrefetchBytes = 8192;                  // how far ahead of the weights in use to fetch
constexpr int64_t kParallelMinFlops = int64_t(1) << 18;  // below this, threads cost more than they save

// A calling thread's buffer of at least n T, kept between calls (no allocation, page faults or zero-filling
// per call; it keeps the size of the largest call the thread made); `which` tells a thread's buffers apart.
template <typename T, int which>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

inline const float* channel_scales(const QuantMatmulArgs& a) { return static_cast<const float*>(a.scales); }
inline const uint16_t* block_scales(const QuantMatmulArgs& a) { return static_cast<const uint16_t*>(a.scales); }

inline float x_at(const float* p) { return *p; }
inline float x_at(const uint16_t* p) { return bf16_to_float(*p); }

// One block of 32 (n <= 32 values, the rest zero) of a row: its int8 values (scale = amax / 127, amax the
// block's max |x|, or `row_amax` where that is >= 0 (int8-channel: one scale per row); round to nearest even, as
// nearbyint does in the default MXCSR mode), their sum and the scale.
#if defined(__AVX512F__)
inline __m512 load16(const float* x, __mmask16 keep) { return _mm512_maskz_loadu_ps(keep, x); }
inline __m512 load16(const uint16_t* x, __mmask16 keep) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, x)), 16));
}
#elif defined(__AVX2__)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const uint16_t* x) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#endif

template <typename XT>
inline float quantize_block(const XT* x, int n, int8_t* q, int32_t* sum, float row_amax) {
#if defined(__AVX512F__)
  const __m512 v[2] = {load16(x, __mmask16(n >= 16 ? 0xffff : (1u << n) - 1)),
                       load16(x + 16, __mmask16(n >= 32 ? 0xffff : n <= 16 ? 0 : (1u << (n - 16)) - 1))};
  const float amax = row_amax >= 0.0f ? row_amax
                                      : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m512 vinv = _mm512_set1_ps(inv), lim = _mm512_set1_ps(127.0f), neg = _mm512_set1_ps(-127.0f);
  __m512i r[2];
  for (int j = 0; j < 2; ++j) {
    r[j] = _mm512_cvtps_epi32(_mm512_max_ps(neg, _mm512_min_ps(lim, _mm512_mul_ps(v[j], vinv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm512_cvtsepi32_epi8(r[j]));
  }
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(r[0], r[1]));
#elif defined(__AVX2__)
  __m256 v[4];
  if (n == kQuantBlock) {
    for (int j = 0; j < 4; ++j) v[j] = load8(x + 8 * j);
  } else {
    float tail[kQuantBlock] = {};
    for (int i = 0; i < n; ++i) tail[i] = x_at(x + i);
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(tail + 8 * j);
  }
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                            _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = row_amax >= 0.0f ? row_amax : _mm_cvtss_f32(m4);
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(127.0f), neg = _mm256_set1_ps(-127.0f);
  __m256i r[4];
  for (int j = 0; j < 4; ++j)
    r[j] = _mm256_cvtps_epi32(_mm256_max_ps(neg, _mm256_min_ps(lim, _mm256_mul_ps(v[j], vinv))));
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
  const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
  *sum = _mm_cvtsi128_si32(s4);
#else
  float v[kQuantBlock] = {};
  for (int i = 0; i < n; ++i) v[i] = x_at(x + i);
  float amax = 0.0f;
  for (int i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
  if (row_amax >= 0.0f) amax = row_amax;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *sum = 0;
  for (int i = 0; i < kQuantBlock; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(std::clamp(v[i] * inv, -127.0f, 127.0f)));
    *sum += q[i];
  }
#endif
  return amax / 127.0f;
}

// max |x| of a row of K values.
template <typename XT>
inline float row_max_abs(const XT* x, int64_t K) {
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const int n = int(std::min<int64_t>(16, K - k));
    m = _mm512_max_ps(m, _mm512_abs_ps(load16(x + k, __mmask16(n == 16 ? 0xffff : (1u << n) - 1))));
  }
  return _mm512_reduce_max_ps(m);
#else
  float m = 0.0f;
  for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(x_at(x + k)));
  return m;
#endif
}

// Every row's blocks: int8 values into xq, their scales into xs and -offset * their sums into xcomp, in tiles of
// `rows_together` rows (the last one shorter): tile m0's block b of its row i at xq + m0 * K padded +
// (b * rows + i) * 32. Block schemes: block b's scale and -offset * sum at xs, xcomp + m0 * blocks + b * rows + i
// (rows_together 1: plain [M][blocks]); int8-channel (one scale per row): the row's at xs, xcomp + m. Tiles let
// one pointer reach a tile's rows.
template <typename XT>
void quantize_rows(const QuantMatmulArgs& a, int64_t blocks, int rows_together, int32_t offset, int8_t* xq, float* xs,
                   int32_t* xcomp, int threads) {
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t kpad = blocks * kQuantBlock;
  const bool per_row = a.scheme == QuantScheme::int8_channel;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t m = 0; m < a.M; ++m) {
    const int64_t m0 = m - m % rows_together, rows = std::min<int64_t>(rows_together, a.M - m0), i = m - m0;
    const XT* row = x + m * a.ldx;
    const float row_amax = per_row ? row_max_abs(row, a.K) : -1.0f;
    int8_t* tile = xq + m0 * kpad + i * kQuantBlock;
    int32_t row_sum = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int n = int(std::min<int64_t>(kQuantBlock, a.K - b * kQuantBlock));
      int32_t sum;
      const float scale = quantize_block(row + b * kQuantBlock, n, tile + b * rows * kQuantBlock, &sum, row_amax);
      if (per_row) {
        row_sum += sum;
      } else {
        const int64_t at = m0 * blocks + b * rows + i;
        xs[at] = scale;
        xcomp[at] = -offset * sum;
      }
    }
    if (per_row) {
      xs[m] = row_amax / 127.0f;
      xcomp[m] = int32_t(uint32_t(-offset) * uint32_t(row_sum));  // the product wraps as the kernel's int32 sums do
    }
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

#if defined(__AVX512VNNI__)
constexpr int kVnniRows = 6;     // rows per wide tile
constexpr int kVnniPanels = 2;   // panels per wide tile: 12 int32 and 12 float32 zmm accumulators
constexpr int kVnniMaxRows = 8;  // rows per narrow tile at most (one panel: 8 int32 and 8 float32 accumulators)

// Below this many rows, tiles take one panel at a time (the weights read in one sequential stream, the row tiles
// after the first finding the panel in the cache), of up to kVnniMaxRows rows; from it on, kVnniRows x kVnniPanels
// with each tile's panels converted to unsigned groups once for all its row tiles.
constexpr int64_t kVnniWideFrom = 64;

// Rows per tile for M rows (balanced below kVnniWideFrom).
inline int vnni_tile_rows(int64_t M) {
  if (M >= kVnniWideFrom) return kVnniRows;
  const int64_t tiles = (M + kVnniMaxRows - 1) / kVnniMaxRows;
  return int((M + tiles - 1) / tiles);
}

// A group's 16 columns x 4 k as unsigned bytes, column c in 32-bit lane c: int8 w + 128, or int4's stored q.
template <QuantScheme S>
inline __m512i load_group_u8(const uint8_t* p) {
  if constexpr (S == QuantScheme::int4_block32) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    // 128-bit lanes [half 0 lo (columns 0-3), half 1 lo (8-11), half 0 hi (4-7), half 1 hi (12-15)], reordered
    const __m512i both = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1), _mm512_set1_epi8(0x0f));
    return _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));
  } else {
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80)));
  }
}

// What load_group_u8 adds to every weight.
template <QuantScheme S>
constexpr int32_t weight_offset() {
  return S == QuantScheme::int4_block32 ? 8 : 128;
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

// A small tile sums even and odd groups apart: one chain of dependent vpdpbusd would bound its speed.
template <int R, int P>
constexpr int vnni_chains() {
  return R * P == 1 ? 4 : R * P < 4 ? 2 : 1;
}

// One block's 8 groups of R rows x P panels into the int32 accumulators (chain g % C for group g): the weights
// at wb (panel j at wb + j * panel_bytes), the rows' int8 x at xb (row i's block at xb + i * 32).
template <QuantScheme S, int R, int P, bool U, int C>
inline void block_products_vnni(__m512i (&iacc)[C][R][P], const uint8_t* wb, const int8_t* xb, int64_t panel_bytes) {
  constexpr int64_t gbytes = U ? 64 : group_bytes<S>();
#pragma GCC unroll 8  // (a rolled loop gets a register copy per accumulator and group)
  for (int g = 0; g < kGroupsPerBlock; ++g) {
    __m512i w[P];
    for (int j = 0; j < P; ++j) {
      const uint8_t* wg = wb + j * panel_bytes + g * gbytes;
      if constexpr (U) {
        w[j] = _mm512_loadu_si512(wg);
      } else {
        if (g % (64 / gbytes) == 0)  // each cache line of weights, kPrefetchBytes ahead
          _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes), _MM_HINT_T0);
        w[j] = load_group_u8<S>(wg);
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m512i xv = broadcast4(xb + i * kQuantBlock + g * kGroup);
      for (int j = 0; j < P; ++j) iacc[g % C][i][j] = _mm512_dpbusd_epi32(iacc[g % C][i][j], w[j], xv);
    }
  }
}

// y rows m .. m + R - 1, panels p .. p + P - 1. This tile's int8 x (quantize_rows' tiles): block b of its row i
// at xq + (b * R + i) * 32; block schemes: its scale at xs[b * R + i], -weight_offset * its sum at xcomp[b * R + i];
// int8-channel: row i's at xs[i], xcomp[i]. The weights: the packed panels p.. of a.weights, or with U (Unsigned)
// the same P panels as load_group_u8 gives them, 64 bytes a group, at `converted`.
template <QuantScheme S, int R, int P, bool U>
void tile_vnni(const QuantMatmulArgs& a, const uint8_t* converted, const int8_t* xq, const float* xs,
               const int32_t* xcomp, int64_t blocks, int64_t m, int64_t p) {
  constexpr bool blocked = S != QuantScheme::int8_channel;
  constexpr int64_t gbytes = U ? 64 : group_bytes<S>();
  constexpr int C = vnni_chains<R, P>();
  const int64_t panel_bytes = blocks * kGroupsPerBlock * gbytes;
  const uint8_t* w0 = U ? converted : a.weights + p * panel_bytes;
  __m512 facc[R][P];
  __m512i iacc[C][R][P];
  if constexpr (blocked) {  // each block's int32 sum, scaled, into float32
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < P; ++j) facc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      for (int i = 0; i < R; ++i) {
        const __m512i start = _mm512_set1_epi32(xcomp[b * R + i]);
        for (int j = 0; j < P; ++j) {
          iacc[0][i][j] = start;
          for (int c = 1; c < C; ++c) iacc[c][i][j] = _mm512_setzero_si512();
        }
      }
      block_products_vnni<S, R, P, U, C>(iacc, w0 + b * kGroupsPerBlock * gbytes, xq + b * R * kQuantBlock,
                                         panel_bytes);
      for (int c = 1; c < C; ++c)
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < P; ++j) iacc[0][i][j] = _mm512_add_epi32(iacc[0][i][j], iacc[c][i][j]);
      for (int j = 0; j < P; ++j) {
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(block_scales(a) + ((p + j) * blocks + b) * kQuantPanel)));
        for (int i = 0; i < R; ++i) {
          const __m512 scale = _mm512_mul_ps(sw, _mm512_set1_ps(xs[b * R + i]));
          facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[0][i][j]), scale, facc[i][j]);
        }
      }
    }
  } else {  // one scale per row and per column: the whole row's products in int32 (exact, quant_matmul.h)
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < P; ++j)
        for (int c = 0; c < C; ++c) iacc[c][i][j] = c ? _mm512_setzero_si512() : _mm512_set1_epi32(xcomp[i]);
    for (int64_t b = 0; b < blocks; ++b)
      block_products_vnni<S, R, P, U, C>(iacc, w0 + b * kGroupsPerBlock * gbytes, xq + b * R * kQuantBlock,
                                         panel_bytes);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < P; ++j) {
        for (int c = 1; c < C; ++c) iacc[0][i][j] = _mm512_add_epi32(iacc[0][i][j], iacc[c][i][j]);
        facc[i][j] = _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[0][i][j]), _mm512_set1_ps(xs[i]));
      }
  }
  for (int j = 0; j < P; ++j) {
    const int64_t col0 = (p + j) * kQuantPanel;
    const int cols = int(std::min<int64_t>(kQuantPanel, a.N - col0));
    const __mmask16 keep = __mmask16((1u << cols) - 1);
    const __m512 sw = blocked ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(keep, channel_scales(a) + col0);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(keep, a.bias + col0) : _mm512_setzero_ps();
    for (int i = 0; i < R; ++i)
      _mm512_mask_storeu_ps(a.y + (m + i) * a.ldy + col0, keep, _mm512_fmadd_ps(facc[i][j], sw, bias));
  }
}

template <QuantScheme S, bool U, int R, int Max = kVnniPanels>
void tile_vnni_panels(int panels, const QuantMatmulArgs& a, const uint8_t* converted, const int8_t* xq,
                      const float* xs, const int32_t* xcomp, int64_t blocks, int64_t m, int64_t p) {
  if constexpr (Max > 0) {
    if (panels == Max) return tile_vnni<S, R, Max, U>(a, converted, xq, xs, xcomp, blocks, m, p);
    tile_vnni_panels<S, U, R, Max - 1>(panels, a, converted, xq, xs, xcomp, blocks, m, p);
  }
}

template <QuantScheme S, bool U, int Max = kVnniMaxRows>
void tile_vnni_rows(int rows, int panels, const QuantMatmulArgs& a, const uint8_t* converted, const int8_t* xq,
                    const float* xs, const int32_t* xcomp, int64_t blocks, int64_t m, int64_t p) {
  if constexpr (Max > 0) {
    if (rows == Max) return tile_vnni_panels<S, U, Max>(panels, a, converted, xq, xs, xcomp, blocks, m, p);
    tile_vnni_rows<S, U, Max - 1>(rows, panels, a, converted, xq, xs, xcomp, blocks, m, p);
  }
}

template <QuantScheme S>
void run_vnni(const QuantMatmulArgs& a, const int8_t* xq, const float* xs, const int32_t* xcomp, int64_t blocks,
              int threads) {
  const int64_t kpad = blocks * kQuantBlock, groups = kpad / kGroup;
  const int64_t panels = (a.N + kQuantPanel - 1) / kQuantPanel;
  const int64_t scales_per_row = S == QuantScheme::int8_channel ? 1 : blocks;
  const int rows_per_tile = vnni_tile_rows(a.M);
  const bool convert = a.M >= kVnniWideFrom;
  const int per_tile = convert ? kVnniPanels : 1;
  const int64_t tiles = (panels + per_tile - 1) / per_tile;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    uint8_t* converted = convert ? scratch<uint8_t, 0>(per_tile * groups * 64) : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t p = t * per_tile;
      const int np = int(std::min<int64_t>(per_tile, panels - p));
      if (convert) {
        const uint8_t* src = a.weights + p * groups * group_bytes<S>();
        for (int64_t g = 0; g < np * groups; ++g) {
          _mm_prefetch(reinterpret_cast<const char*>(src + g * group_bytes<S>() + kPrefetchBytes), _MM_HINT_T0);
          _mm512_storeu_si512(converted + g * 64, load_group_u8<S>(src + g * group_bytes<S>()));
        }
      }
      for (int64_t m0 = 0; m0 < a.M; m0 += rows_per_tile) {
        const int rows = int(std::min<int64_t>(rows_per_tile, a.M - m0));
        const int64_t at = m0 * scales_per_row;
        if (convert)
          tile_vnni_rows<S, true>(rows, np, a, converted, xq + m0 * kpad, xs + at, xcomp + at, blocks, m0, p);
        else
          tile_vnni_rows<S, false>(rows, np, a, nullptr, xq + m0 * kpad, xs + at, xcomp + at, blocks, m0, p);
      }
    }
  }
}
#endif

// y rows m .. m + R - 1 of panel p. Block schemes: each block's int32 sum scaled by xs[row * blocks + b] into
// float32; int8-channel: the whole row's products summed in int32 (exact, quant_matmul.h), scaled by xs[row].
template <QuantScheme S, int R>
void tile(const QuantMatmulArgs& a, const int8_t* xq, const float* xs, int64_t blocks, int64_t m, int64_t p) {
  constexpr bool blocked = S != QuantScheme::int8_channel;
  const int64_t kpad = blocks * kQuantBlock;
  const uint8_t* w0 = a.weights + p * blocks * kGroupsPerBlock * group_bytes<S>();
  float acc[R][kQuantPanel] = {};
#if defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[R][2];
  __m256i iacc[R][2];
  for (int i = 0; i < R; ++i) {
    facc[i][0] = facc[i][1] = _mm256_setzero_ps();
    iacc[i][0] = iacc[i][1] = _mm256_setzero_si256();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    if constexpr (blocked)
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
    if constexpr (blocked)
      for (int h = 0; h < 2; ++h) {
        const __m256 sw = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_scales(a) + (p * blocks + b) * kQuantPanel + 8 * h)));
        for (int i = 0; i < R; ++i) {
          const __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(xs[(m + i) * blocks + b]));
          facc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i][h]), scale, facc[i][h]);
        }
      }
  }
  if constexpr (!blocked)
    for (int i = 0; i < R; ++i)
      for (int h = 0; h < 2; ++h) facc[i][h] = _mm256_mul_ps(_mm256_cvtepi32_ps(iacc[i][h]), _mm256_set1_ps(xs[m + i]));
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(acc[i] + 8 * h, facc[i][h]);
#else
  uint32_t row_iacc[R][kQuantPanel] = {};  // int8-channel: the row's sum, wrapping as the vector paths' int32 do
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
      if constexpr (blocked) {
        const float sw = f16_to_float(block_scales(a)[(p * blocks + b) * kQuantPanel + c]);
        for (int i = 0; i < R; ++i) acc[i][c] = std::fma(float(iacc[i][c]), sw * xs[(m + i) * blocks + b], acc[i][c]);
      } else {
        for (int i = 0; i < R; ++i) row_iacc[i][c] += uint32_t(iacc[i][c]);
      }
    }
  }
  if constexpr (!blocked)
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < kQuantPanel; ++c) acc[i][c] = float(int32_t(row_iacc[i][c])) * xs[m + i];
#endif
  const int64_t col0 = p * kQuantPanel;
  const int cols = int(std::min<int64_t>(kQuantPanel, a.N - col0));
  for (int i = 0; i < R; ++i) {
    if constexpr (!blocked)
      for (int c = 0; c < cols; ++c) acc[i][c] *= channel_scales(a)[col0 + c];
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
  if (2 * a.M * a.N * a.K < kParallelMinFlops) threads = 1;
#if defined(__AVX512VNNI__)
  const int rows_together = vnni_tile_rows(a.M);
  const int32_t offset = weight_offset<S>();
#else
  const int rows_together = 1, offset = 0;
#endif
  int8_t* xq = scratch<int8_t, 1>(a.M * blocks * kQuantBlock);
  float* xs = scratch<float, 2>(a.M * blocks);
  int32_t* xcomp = scratch<int32_t, 3>(a.M * blocks);
  if (a.x_bf16)
    quantize_rows<uint16_t>(a, blocks, rows_together, offset, xq, xs, xcomp, threads);
  else
    quantize_rows<float>(a, blocks, rows_together, offset, xq, xs, xcomp, threads);
#if defined(__AVX512VNNI__)
  run_vnni<S>(a, xq, xs, xcomp, blocks, threads);
#else
  const int64_t panels = (a.N + kQuantPanel - 1) / kQuantPanel;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    int64_t m = 0;
    for (; m + kRows <= a.M; m += kRows) tile<S, kRows>(a, xq, xs, blocks, m, p);
    if (m < a.M) tile_rows<S, kRows - 1>(int(a.M - m), a, xq, xs, blocks, m, p);
  }
#endif
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
