// decode_attention for one ISA (CMake builds this file once per path). Per (sequence, head): the scores
// scale * q.k_j into a scratch row, their max, the exps (vectorized) and their sum, then y = sum_j p_j v_j / sum,
// each accumulated in position order.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/decode_attention.h"
#include "common/simd_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hpclm {
namespace HPCLM_ISA {
namespace {

using simd::vf;
typedef float vf_unaligned __attribute__((vector_size(simd::kVecBytes), aligned(4)));
constexpr int kLanes = simd::kLanesF;
constexpr int64_t kParallelMinFlops = int64_t(1) << 18;  // below this, threads cost more than they save

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  vf acc{};
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float s = simd::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0..D) = sum over j < n of p[j] * V[j][0..D), then times inv.
inline void weighted_sum(const float* p, const float* V, int64_t n, int64_t D, float inv, float* y) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) {  // four vectors of y held in registers across positions
    vf acc0{}, acc1{}, acc2{}, acc3{};
    for (int64_t j = 0; j < n; ++j) {
      const float* v = V + j * D + d;
      acc0 += p[j] * load(v);
      acc1 += p[j] * load(v + kLanes);
      acc2 += p[j] * load(v + 2 * kLanes);
      acc3 += p[j] * load(v + 3 * kLanes);
    }
    store(y + d, acc0 * inv);
    store(y + d + kLanes, acc1 * inv);
    store(y + d + 2 * kLanes, acc2 * inv);
    store(y + d + 3 * kLanes, acc3 * inv);
  }
  for (; d + kLanes <= D; d += kLanes) {
    vf acc{};
    for (int64_t j = 0; j < n; ++j) acc += p[j] * load(V + j * D + d);
    store(y + d, acc * inv);
  }
  for (; d < D; ++d) {
    float acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * V[j * D + d];
    y[d] = acc * inv;
  }
}

void attend_one(const DecodeAttentionArgs& a, int64_t b, int64_t h, float* scores) {
  const int64_t D = a.D, C = a.H * D, pos = a.positions[b], n = pos + 1;
  const float* row = a.qkv + b * a.ldqkv;
  const float* q = row + h * D;
  const int64_t base = (a.slots[b] * a.H + h) * a.P * D;
  float* K = a.keys + base;
  float* V = a.values + base;
  std::memcpy(K + pos * D, row + C + h * D, sizeof(float) * D);
  std::memcpy(V + pos * D, row + 2 * C + h * D, sizeof(float) * D);

  float max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = a.scale * dot(q, K + j * D, D);
    max = std::max(max, scores[j]);
  }
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  std::fill(scores + n, scores + padded, -std::numeric_limits<float>::infinity());  // exp: exactly 0
  vf sum{};
  for (int64_t j = 0; j < padded; j += kLanes) {
    vf e = simd::exp(load(scores + j) - max);
    store(scores + j, e);
    sum += e;
  }
  weighted_sum(scores, V, n, D, 1.0f / simd::hsum(sum), a.y + b * a.ldy + h * D);
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& a, int threads) {
  const int64_t pairs = a.B * a.H;
  int64_t flops = 0;
  for (int64_t b = 0; b < a.B; ++b) flops += 4 * (a.positions[b] + 1) * a.D * a.H;
  if (flops < kParallelMinFlops) threads = 1;
  const int64_t scratch = (a.P + kLanes - 1) / kLanes * kLanes;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> scores(scratch);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < pairs; ++t) attend_one(a, t / a.H, t % a.H, scores.data());
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
