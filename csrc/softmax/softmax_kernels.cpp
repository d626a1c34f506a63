// Softmax CPU kernels, compiled once per ISA (CMake sets HPCLM_ISA and its -m flags).
// One source serves every path: the vector types and half-precision conversions of common/simd.h
// (GCC vector extensions sized to the ISA's registers) and the vectorized exp of common/simd_math.h.
//
// Forward, per row (keys [0, n) visible; n < sk only for causal rows):
//   pass 1 reads x once: per lane an online max and the sum of exp rescaled when the max grows
//          (once per block of vectors), the exps kept in a float scratch row (cache resident);
//   pass 2 writes y once: scratch * exp(block max - row max) / sum, zeros after the prefix.
// Backward, per row: s = sum(dy * y) over the prefix, dx = scale * y * (dy - s), zeros after it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/simd_math.h"
#include "softmax/softmax.h"

namespace hpclm {
namespace HPCLM_ISA {
namespace {

using simd::bitcast;
using simd::kLanesF;
using simd::kVecBytes;
using simd::vd;
using simd::vf;
using simd::vi32;
using simd::vi64;
using simd::vu16;
using simd::vmax;
using simd::vmin;
using simd::vu32;
// Outputs larger than this are written with non-temporal stores (see Rows::stream_output).
constexpr int64_t kStreamBytes = int64_t(16) << 20;
// Causal rows prefetch the row this many rows ahead.
constexpr int64_t kPrefetchRows = 2;

// Storage tags for the two 16-bit types (both are raw uint16_t in memory).
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

// Lane arithmetic per compute type: float for f32/f16/bf16, double for f64.
template <typename E>
struct Simd;

template <>
struct Simd<float> {
  using V = vf;
  using Mask = vi32;
  static constexpr int N = kLanesF;
  static V splat(float v) { return V{} + v; }

  static V exp(V v) { return simd::exp(v); }
  static float hmax(V v) { return simd::hmax(v); }
  static float hsum(V v) { return simd::hsum(v); }

  // Lanes whose mask byte is nonzero (GCC scalarizes a uint8 -> int32 vector conversion: widen by hand).
  static Mask masked(const uint8_t* m) {
#if defined(__AVX512F__)
    vi32 w = bitcast<vi32>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))));
#elif defined(__AVX2__)
    vi32 w = bitcast<vi32>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))));
#else
    vi32 w;
    for (int i = 0; i < N; ++i) w[i] = m[i];
#endif
    return w != 0;
  }
};

// float64 exists for gradcheck: correct and simple, lane by lane.
template <>
struct Simd<double> {
  using V = vd;
  using Mask = vi64;
  static constexpr int N = kVecBytes / 8;
  static V splat(double v) { return V{} + v; }
  static V exp(V x) {
    for (int i = 0; i < N; ++i) x[i] = std::exp(x[i]);
    return x;
  }
  static double hmax(V v) {
    double r = v[0];
    for (int i = 1; i < N; ++i) r = v[i] > r ? v[i] : r;
    return r;
  }
  static double hsum(V v) {
    double r = v[0];
    for (int i = 1; i < N; ++i) r += v[i];
    return r;
  }
  static Mask masked(const uint8_t* m) {
    Mask r;
    for (int i = 0; i < N; ++i) r[i] = m[i] ? -1 : 0;
    return r;
  }
};

// Loads to / stores from the compute vector, per storage type; pack() gives the stored bytes.
template <typename S>
struct Io;

template <typename T>
struct NativeIo {
  using E = T;
  using V = typename Simd<T>::V;
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V pack(V v) { return v; }
  static E load1(const T* p) { return *p; }
  static void store1(T* p, E v) { *p = v; }
};
template <>
struct Io<float> : NativeIo<float> {};
template <>
struct Io<double> : NativeIo<double> {};

template <>
struct Io<BF16> {
  using E = float;
  using V = vf;
  static V load(const BF16* p) { return simd::load_bf16(&p->bits); }
  static vu16 pack(V v) { return simd::pack_bf16(v); }
  static E load1(const BF16* p) { return bf16_to_float(p->bits); }
  static void store1(BF16* p, E v) { p->bits = float_to_bf16(v); }
};

template <>
struct Io<F16> {
  using E = float;
  using V = vf;
  static V load(const F16* p) { return simd::load_f16(&p->bits); }
  static vu16 pack(V v) { return simd::pack_f16(v); }
  static E load1(const F16* p) { return f16_to_float(p->bits); }
  static void store1(F16* p, E v) { p->bits = float_to_f16(v); }
};

inline void stream_fence() {  // orders this thread's non-temporal stores (none on the portable path)
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename S>
struct Rows {
  using IO = Io<S>;
  using E = typename IO::E;
  using X = Simd<E>;
  using V = typename X::V;
  using Mask = typename X::Mask;
  using Packed = decltype(IO::pack(V{}));
  static constexpr int N = X::N;
  // Vectors per block: the running max is rescaled once per block (registers: 32 with AVX-512, else 16).
  static constexpr int K = kVecBytes == 64 ? 8 : 4;
  static constexpr int64_t B = int64_t(K) * N;  // elements per block

  // Scratch for one row, per thread: exps (padded to whole vectors) and one max vector per block.
  struct Scratch {
    std::vector<E> exps;
    std::vector<V> block_max;
    void fit(int64_t sk) {
      if (int64_t(exps.size()) < (sk / N + 1) * N) {
        exps.resize((sk / N + 1) * N);
        block_max.resize(sk / B + 2);
      }
    }
  };

  // ---- memory ------------------------------------------------------------------------------

  // Non-temporal stores for outputs too large to stay in cache: they skip the read-for-ownership
  // of every output line. Only when every row starts aligned to a packed vector.
  static bool stream_output(const SoftmaxShape& sh, const void* out) {
    return sh.rows() * sh.sk * int64_t(sizeof(S)) > kStreamBytes &&
           reinterpret_cast<uintptr_t>(out) % sizeof(Packed) == 0 && (sh.sk * sizeof(S)) % sizeof(Packed) == 0;
  }
  // `stream`: the caller knows p is aligned to sizeof(Packed).
  static void put(void* p, const Packed& v, bool stream) {
#if defined(__AVX512F__)
    if constexpr (sizeof(Packed) == 64)
      if (stream) return _mm512_stream_si512(static_cast<__m512i*>(p), bitcast<__m512i>(v));
#endif
#if defined(__AVX__)
    if constexpr (sizeof(Packed) == 32)
      if (stream) return _mm256_stream_si256(static_cast<__m256i*>(p), bitcast<__m256i>(v));
    if constexpr (sizeof(Packed) == 16)
      if (stream) return _mm_stream_si128(static_cast<__m128i*>(p), bitcast<__m128i>(v));
#endif
    std::memcpy(p, &v, sizeof v);
  }
  static void store(S* p, V v, bool stream) { put(p, IO::pack(v), stream); }
  // Zeros over [p, p + n); streamed in whole vectors when `stream` (p aligned).
  static void zero_fill(S* p, int64_t n, bool stream) {
    int64_t i = 0;
    for (; i + N <= n; i += N) put(p + i, Packed{}, stream);
    std::memset(static_cast<void*>(p + i), 0, (n - i) * sizeof(S));
  }
  static void prefetch(const S* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(S))) __builtin_prefetch(p + i, 0, 3);
  }
  static V load_exps(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V neg_inf() { return X::splat(-std::numeric_limits<E>::infinity()); }

  // Lanes [0, n) of a vector: the valid part of a row's last, partial vector.
  static Mask lanes_below(int64_t n) {
    using Lane = typename std::remove_reference<decltype(Mask{}[0])>::type;
    static const Mask iota = [] {
      Mask m;
      for (int l = 0; l < N; ++l) m[l] = l;
      return m;
    }();
    return iota < static_cast<Lane>(n);
  }

  // x * scale with masked lanes -inf.
  static V load_scaled(const S* x, const uint8_t* m, V scale) {
    V v = IO::load(x) * scale;
    return m ? (X::masked(m) ? neg_inf() : v) : v;
  }
  // The same for a row's last vector, valid in lanes [0, rem): one whole-vector load while the
  // row's memory (sk elements) still covers it, lane by lane at the very end of a row.
  static V load_scaled_tail(const S* x, const uint8_t* m, V scale, int64_t rem, bool whole) {
    if (whole) return lanes_below(rem) ? load_scaled(x, m, scale) : neg_inf();
    V v = neg_inf();
    for (int l = 0; l < rem; ++l)
      if (!(m && m[l])) v[l] = IO::load1(x + l) * scale[l];
    return v;
  }

  // ---- forward -----------------------------------------------------------------------------

  // Pass 1 over one block of exactly B elements: fold it into the per-lane running max and sum,
  // keep its exps (relative to the new max) and that max. `next`: the same offsets of a later
  // row to prefetch, or null.
  static void online_block(const S* x, const uint8_t* m, V scale, bool first, V& run_max, V& run_sum, E* exps,
                           V& block_max, const S* next) {
    if (next) prefetch(next, B);
    V v[K], t[K];
    for (int k = 0; k < K; ++k) t[k] = v[k] = load_scaled(x + k * N, m ? m + k * N : nullptr, scale);
    for (int w = K / 2; w > 0; w /= 2)
      for (int k = 0; k < w; ++k) t[k] = vmax(t[k], t[k + w]);
    const V new_max = vmax(run_max, t[0]);
    V sum = first ? X::splat(0) : run_sum * X::exp(run_max - new_max);
    for (int k = 0; k < K; ++k) {
      V e = X::exp(v[k] - new_max);
      sum += e;
      std::memcpy(exps + k * N, &e, sizeof e);
    }
    run_sum = sum;
    run_max = block_max = new_max;
  }

  // Pass 1 over the last block, `len` < B elements ending the visible prefix: one max over its
  // vectors, one rescale, then the exps (vectors reread from L1). `whole`: the row's memory
  // covers its partial vector.
  static void online_rest(const S* x, const uint8_t* m, int64_t len, bool whole, V scale, bool first, V& run_max,
                          V& run_sum, E* exps, V& block_max, const S* next) {
    if (next) prefetch(next, len);
    const int64_t full = len / N, rem = len % N;
    V new_max = run_max, tail = neg_inf();
    for (int64_t k = 0; k < full; ++k) new_max = vmax(new_max, load_scaled(x + k * N, m ? m + k * N : nullptr, scale));
    if (rem) {
      tail = load_scaled_tail(x + full * N, m ? m + full * N : nullptr, scale, rem, whole);
      new_max = vmax(new_max, tail);
    }
    V sum = first ? X::splat(0) : run_sum * X::exp(run_max - new_max);
    for (int64_t k = 0; k < full; ++k) {
      V e = X::exp(load_scaled(x + k * N, m ? m + k * N : nullptr, scale) - new_max);
      sum += e;
      std::memcpy(exps + k * N, &e, sizeof e);
    }
    if (rem) {
      V e = X::exp(tail - new_max);  // lanes past the prefix: exp(-inf) = 0
      sum += e;
      std::memcpy(exps + full * N, &e, sizeof e);
    }
    run_sum = sum;
    run_max = block_max = new_max;
  }

  static void forward_row(const S* x, S* y, const uint8_t* m, int64_t n, int64_t sk, V scale, Scratch& s,
                          bool stream, const S* next) {
    E* exps = s.exps.data();
    V* block_max = s.block_max.data();
    const E lowest = std::numeric_limits<E>::lowest();
    const bool whole_tail = (n / N + 1) * N <= sk;
    V run_max = X::splat(lowest), run_sum = X::splat(0);
    int64_t i = 0, b = 0;
    for (; i + B <= n; i += B, ++b)
      online_block(x + i, m ? m + i : nullptr, scale, b == 0, run_max, run_sum, exps + i, block_max[b],
                   next ? next + i : nullptr);
    if (i < n)
      online_rest(x + i, m ? m + i : nullptr, n - i, whole_tail, scale, b == 0, run_max, run_sum, exps + i,
                  block_max[b++], next ? next + i : nullptr);
    const int64_t last = b - 1;
    const E row_max = X::hmax(run_max);
    if (!(row_max > lowest)) {  // every visible key masked (or none visible): zeros
      zero_fill(y, sk, stream);
      return;
    }
    const V vrow_max = X::splat(row_max);
    const V last_factor = X::exp(run_max - vrow_max);
    const E inv = E(1) / X::hsum(run_sum * last_factor);
    // Pass 2: y = exps * exp(block max - row max) / sum, written once; the partial vector is
    // written whole while inside the row, zeros past n.
    int64_t written = n;
    for (i = 0, b = 0; i < n; i += B, ++b) {
      const V f = (b == last ? last_factor : X::exp(block_max[b] - vrow_max)) * inv;
      const int64_t end = std::min(n, i + B);
      int64_t j = i;
      for (; j + N <= end; j += N) store(y + j, load_exps(exps + j) * f, stream);
      if (j < end) {
        const V e = load_exps(exps + j) * f;
        if (whole_tail) {
          store(y + j, lanes_below(end - j) ? e : X::splat(0), stream);  // exact zeros even if e is NaN
          written = j + N;
        } else {
          for (int64_t l = 0; j + l < end; ++l) IO::store1(y + j + l, e[l]);
        }
      }
    }
    if (written < sk) zero_fill(y + written, sk - written, stream && written % N == 0);
  }

  // ---- backward ----------------------------------------------------------------------------

  static void backward_row(const S* y, const S* dy, S* dx, int64_t n, int64_t sk, E scale, bool stream,
                           const S* next_y, const S* next_dy) {
    V acc[4] = {};
    int64_t i = 0;
    for (; i + 4 * N <= n; i += 4 * N) {
      if (next_y) {
        prefetch(next_y + i, 4 * N);
        prefetch(next_dy + i, 4 * N);
      }
      for (int k = 0; k < 4; ++k) acc[k] += IO::load(y + i + k * N) * IO::load(dy + i + k * N);
    }
    if (next_y) {
      prefetch(next_y + i, n - i);
      prefetch(next_dy + i, n - i);
    }
    for (; i + N <= n; i += N) acc[0] += IO::load(y + i) * IO::load(dy + i);
    // The partial vector: whole-vector loads while the row covers it, lanes past n dropped.
    const int64_t rem = n - i;
    const bool whole_tail = rem > 0 && i + N <= sk;
    const Mask tail = lanes_below(rem);
    if (whole_tail) acc[1] += tail ? IO::load(y + i) * IO::load(dy + i) : X::splat(0);
    E dot = X::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    if (!whole_tail)
      for (int64_t j = i; j < n; ++j) dot += IO::load1(y + j) * IO::load1(dy + j);
    const V vdot = X::splat(dot), vscale = X::splat(scale);
    for (i = 0; i + N <= n; i += N) store(dx + i, vscale * IO::load(y + i) * (IO::load(dy + i) - vdot), stream);
    int64_t written = n;
    if (whole_tail) {
      store(dx + i, tail ? vscale * IO::load(y + i) * (IO::load(dy + i) - vdot) : X::splat(0), stream);
      written = i + N;
    } else {
      for (; i < n; ++i) IO::store1(dx + i, scale * IO::load1(y + i) * (IO::load1(dy + i) - dot));
    }
    if (written < sk) zero_fill(dx + written, sk - written, stream && written % N == 0);
  }

  // ---- rows over threads -------------------------------------------------------------------

  // Rows go to threads in interleaved chunks of ~64 KiB, so causal rows (short to long) balance.
  // fn(row, q, mask_row, scratch) runs for each row; q and the mask row advance without
  // divisions; the thread's scratch is looked up once (thread_local costs a call in a .so).
  // A single thread never enters OpenMP: a one-thread parallel region makes libgomp (shared with
  // torch) reshape its thread pool, and torch's next parallel op pays for it.
  template <typename Fn>
  static void for_rows(const SoftmaxShape& sh, const SoftmaxMask& mask, int threads, Fn fn) {
    const int64_t rows = sh.rows(), chunk = std::max<int64_t>(1, 16384 / sh.sk);
    const int64_t chunks = (rows + chunk - 1) / chunk;
    auto run_chunks = [&](int64_t first, int64_t step) {
      thread_local Scratch thread_scratch;
      Scratch& scratch = thread_scratch;
      scratch.fit(sh.sk);
      for (int64_t c = first; c < chunks; c += step) {
        int64_t r = c * chunk, q = r % sh.sq, bh = r / sh.sq;
        const int64_t end = std::min(rows, r + chunk);
        const uint8_t* mbase =
            mask.data ? mask.data + (bh / sh.batch1) * mask.stride0 + (bh % sh.batch1) * mask.stride1 : nullptr;
        for (; r < end; ++r) {
          fn(r, q, mbase ? mbase + q * mask.stride_q : nullptr, scratch);
          if (++q == sh.sq && r + 1 < end) {
            q = 0;
            ++bh;
            if (mbase) mbase = mask.data + (bh / sh.batch1) * mask.stride0 + (bh % sh.batch1) * mask.stride1;
          }
        }
      }
      stream_fence();  // each thread orders its own non-temporal stores
    };
#ifdef _OPENMP
    if (threads > 1 && chunks > 1 && rows * sh.sk >= 32768) {
#pragma omp parallel num_threads(threads)
      run_chunks(omp_get_thread_num(), omp_get_num_threads());
      return;
    }
#endif
    (void)threads;
    run_chunks(0, 1);
  }

  static int64_t visible_keys(int64_t q, const SoftmaxShape& sh, bool causal) {
    if (!causal) return sh.sk;
    return std::min(sh.sk, std::max<int64_t>(0, q + (sh.sk - sh.sq) + 1));
  }

  // A causal row reads a prefix and jumps to the next row, which the hardware prefetcher does not
  // follow: the rows kPrefetchRows ahead are prefetched while a row is computed.
  static void forward(const SoftmaxForward& a, int threads) {
    const SoftmaxShape sh = a.shape;
    const int64_t sk = sh.sk, rows = sh.rows();
    const S* x = static_cast<const S*>(a.x);
    S* y = static_cast<S*>(a.y);
    const V scale = X::splat(static_cast<E>(a.scale));
    const bool stream = stream_output(sh, y);
    for_rows(sh, a.mask, threads, [&](int64_t r, int64_t q, const uint8_t* m, Scratch& scratch) {
      const S* ahead = a.causal && r + kPrefetchRows < rows ? x + (r + kPrefetchRows) * sk : nullptr;
      if (ahead) prefetch(ahead, std::min<int64_t>(visible_keys(q + kPrefetchRows, sh, true), 256 / sizeof(S)));
      forward_row(x + r * sk, y + r * sk, m, visible_keys(q, sh, a.causal), sk, scale, scratch, stream, ahead);
    });
  }

  static void backward(const SoftmaxBackward& a, int threads) {
    const SoftmaxShape sh = a.shape;
    const int64_t sk = sh.sk, rows = sh.rows();
    const S* y = static_cast<const S*>(a.y);
    const S* dy = static_cast<const S*>(a.dy);
    S* dx = static_cast<S*>(a.dx);
    const E scale = static_cast<E>(a.scale);
    const bool stream = stream_output(sh, dx);
    for_rows(sh, SoftmaxMask{}, threads, [&](int64_t r, int64_t q, const uint8_t*, Scratch&) {
      const bool ahead = a.causal && r + kPrefetchRows < rows;
      const int64_t off = (r + kPrefetchRows) * sk;
      backward_row(y + r * sk, dy + r * sk, dx + r * sk, visible_keys(q, sh, a.causal), sk, scale, stream,
                   ahead ? y + off : nullptr, ahead ? dy + off : nullptr);
    });
  }
};

}  // namespace

void softmax_forward(const SoftmaxForward& a, int threads) {
  switch (a.dtype) {
    case DType::f32: return Rows<float>::forward(a, threads);
    case DType::f64: return Rows<double>::forward(a, threads);
    case DType::f16: return Rows<F16>::forward(a, threads);
    case DType::bf16: return Rows<BF16>::forward(a, threads);
  }
}

void softmax_backward(const SoftmaxBackward& a, int threads) {
  switch (a.dtype) {
    case DType::f32: return Rows<float>::backward(a, threads);
    case DType::f64: return Rows<double>::backward(a, threads);
    case DType::f16: return Rows<F16>::backward(a, threads);
    case DType::bf16: return Rows<BF16>::backward(a, threads);
  }
}

}  // namespace HPCLM_ISA
}  // namespace hpclm
