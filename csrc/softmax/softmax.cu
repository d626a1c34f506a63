// Softmax CUDA kernels: one warp per row while a row fits in registers (sk <= 1024), one
// block per row beyond (any sk: an online max/sum pass, then a write pass that rereads x).
// Same semantics as the CPU kernels (softmax.h); accumulation in float (double for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "softmax/softmax.h"

namespace hpclm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpRowsPerBlock = 4;  // warp kernels: 128 threads, 4 rows per block
constexpr int kMaxGrid = 1 << 20;     // grid-stride loops cover the rest

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (max, sum of exp(v - max)) pairs, merged; an empty pair has max = -inf and sum = 0.
template <typename A>
struct MaxSum {
  A m, s;
};
template <typename A>
__device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
  if (a.m == neg_inf<A>()) return b;
  if (b.m == neg_inf<A>()) return a;
  A m = max(a.m, b.m);
  return {m, a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m)};
}

// Block-wide reduction through shared memory (blockDim.x a multiple of 32, at most 1024).
template <typename A>
__device__ MaxSum<A> block_merge(MaxSum<A> v) {
  __shared__ A sm[kWarp], ss[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2)
    v = merge(v, MaxSum<A>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  if (lane == 0) sm[warp] = v.m, ss[warp] = v.s;
  __syncthreads();
  v = lane < warps ? MaxSum<A>{sm[lane], ss[lane]} : MaxSum<A>{neg_inf<A>(), A(0)};
  for (int o = kWarp / 2; o > 0; o /= 2)
    v = merge(v, MaxSum<A>{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  __syncthreads();  // shared memory is reused by the next row
  return v;
}

template <typename A>
__device__ A block_sum(A v) {
  __shared__ A sh[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = warp_sum(lane < warps ? sh[lane] : A(0));
  __syncthreads();
  return v;
}

// ---- forward -----------------------------------------------------------------------------

template <typename T, int ELEMS>  // sk <= 32 * ELEMS
__global__ void forward_warp(const T* __restrict__ x, T* __restrict__ y, SoftmaxShape shape, double scale_d,
                             SoftmaxMask mask, bool causal) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = shape.rows(), sk = shape.sk;
  for (int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp; row < rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const int64_t n = softmax_row_keys(row, shape, causal);
    const uint8_t* m = mask.row_ptr(row, shape);
    const T* xr = x + row * sk;
    A v[ELEMS];
    A row_max = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      const int64_t j = lane + k * kWarp;
      v[k] = (j < n && !(m && m[j])) ? to_acc(xr[j]) * scale : neg_inf<A>();
      row_max = max(row_max, v[k]);
    }
    row_max = warp_max(row_max);
    A sum = 0;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      v[k] = v[k] == neg_inf<A>() ? A(0) : exp_acc(v[k] - row_max);
      sum += v[k];
    }
    sum = warp_sum(sum);
    const A inv = sum > A(0) ? A(1) / sum : A(0);  // every key masked: zeros
    T* yr = y + row * sk;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      const int64_t j = lane + k * kWarp;
      if (j < sk) yr[j] = from_acc<T>(v[k] * inv);
    }
  }
}

template <typename T>
__global__ void forward_block(const T* __restrict__ x, T* __restrict__ y, SoftmaxShape shape, double scale_d,
                              SoftmaxMask mask, bool causal) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
  const int64_t rows = shape.rows(), sk = shape.sk;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = softmax_row_keys(row, shape, causal);
    const uint8_t* m = mask.row_ptr(row, shape);
    const T* xr = x + row * sk;
    MaxSum<A> acc{neg_inf<A>(), A(0)};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (m && m[j]) continue;
      const A v = to_acc(xr[j]) * scale;
      if (v == neg_inf<A>()) continue;
      if (v > acc.m) {
        acc.s = acc.s * exp_acc(acc.m - v) + A(1);
        acc.m = v;
      } else {
        acc.s += exp_acc(v - acc.m);
      }
    }
    const MaxSum<A> total = block_merge(acc);
    const A inv = total.s > A(0) ? A(1) / total.s : A(0);
    T* yr = y + row * sk;
    for (int64_t j = threadIdx.x; j < sk; j += blockDim.x) {
      const bool visible = j < n && !(m && m[j]) && inv > A(0);
      yr[j] = from_acc<T>(visible ? exp_acc(to_acc(xr[j]) * scale - total.m) * inv : A(0));
    }
  }
}

// ---- backward ----------------------------------------------------------------------------

template <typename T, int ELEMS>
__global__ void backward_warp(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                              SoftmaxShape shape, double scale_d, bool causal) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = shape.rows(), sk = shape.sk;
  for (int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp; row < rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const int64_t n = softmax_row_keys(row, shape, causal), off = row * sk;
    A yv[ELEMS], gv[ELEMS];
    A dot = 0;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      const int64_t j = lane + k * kWarp;
      yv[k] = j < n ? to_acc(y[off + j]) : A(0);
      gv[k] = j < n ? to_acc(dy[off + j]) : A(0);
      dot += yv[k] * gv[k];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      const int64_t j = lane + k * kWarp;
      if (j < sk) dx[off + j] = from_acc<T>(j < n ? scale * yv[k] * (gv[k] - dot) : A(0));
    }
  }
}

template <typename T>
__global__ void backward_block(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                               SoftmaxShape shape, double scale_d, bool causal) {
  using A = typename Acc<T>::type;
  const A scale = static_cast<A>(scale_d);
  const int64_t rows = shape.rows(), sk = shape.sk;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = softmax_row_keys(row, shape, causal), off = row * sk;
    A dot = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += to_acc(y[off + j]) * to_acc(dy[off + j]);
    dot = block_sum(dot);
    for (int64_t j = threadIdx.x; j < sk; j += blockDim.x)
      dx[off + j] = from_acc<T>(j < n ? scale * to_acc(y[off + j]) * (to_acc(dy[off + j]) - dot) : A(0));
  }
}

// ---- launch ------------------------------------------------------------------------------

int warp_elems(int64_t sk) {  // registers per lane for a warp row, 0 = too long for a warp
  for (int e = 1; e <= 32; e *= 2)
    if (sk <= int64_t(kWarp) * e) return e;
  return 0;
}

int block_threads(int64_t sk) { return sk <= 4096 ? 256 : (sk <= 16384 ? 512 : 1024); }

unsigned grid_for(int64_t units) { return static_cast<unsigned>(units < kMaxGrid ? (units > 0 ? units : 1) : kMaxGrid); }

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw std::runtime_error(std::string("CUDA softmax ") + what + ": " + cudaGetErrorName(rc) + ": " +
                             cudaGetErrorString(rc));
}

// f(T{}) with T the CUDA element type of `dtype`.
template <typename F>
void with_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
  }
}

// f(std::integral_constant<int, E>{}) for the registers per lane of a warp row; false when the
// row is too long for one warp.
template <typename F>
bool with_warp_elems(int64_t sk, F&& f) {
  switch (warp_elems(sk)) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    case 32: f(std::integral_constant<int, 32>{}); return true;
    default: return false;
  }
}

struct Launch {
  const SoftmaxShape& shape;
  cudaStream_t stream;
  unsigned warp_grid() const {
    return grid_for((shape.rows() + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
  }
  static dim3 warp_block() { return dim3(kWarp * kWarpRowsPerBlock); }
  unsigned block_grid() const { return grid_for(shape.rows()); }
  int block_size() const { return block_threads(shape.sk); }
};

// Checks the shape and selects the device; false when there is no row to compute.
bool begin(const SoftmaxShape& shape, int device) {
  check_softmax_shape(shape);
  if (shape.rows() == 0) return false;
  check(cudaSetDevice(device), "cudaSetDevice");
  return true;
}

}  // namespace

void softmax_forward_cuda(const SoftmaxForward& a, int device, uintptr_t stream) {
  if (!begin(a.shape, device)) return;
  const Launch l{a.shape, reinterpret_cast<cudaStream_t>(stream)};
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    const bool warp = with_warp_elems(a.shape.sk, [&](auto elems) {
      forward_warp<T, decltype(elems)::value>
          <<<l.warp_grid(), l.warp_block(), 0, l.stream>>>(x, y, a.shape, a.scale, a.mask, a.causal);
    });
    if (!warp)
      forward_block<T><<<l.block_grid(), l.block_size(), 0, l.stream>>>(x, y, a.shape, a.scale, a.mask, a.causal);
  });
  check(cudaGetLastError(), "forward launch");
}

void softmax_backward_cuda(const SoftmaxBackward& a, int device, uintptr_t stream) {
  if (!begin(a.shape, device)) return;
  const Launch l{a.shape, reinterpret_cast<cudaStream_t>(stream)};
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* y = static_cast<const T*>(a.y);
    const T* dy = static_cast<const T*>(a.dy);
    T* dx = static_cast<T*>(a.dx);
    const bool warp = with_warp_elems(a.shape.sk, [&](auto elems) {
      backward_warp<T, decltype(elems)::value>
          <<<l.warp_grid(), l.warp_block(), 0, l.stream>>>(y, dy, dx, a.shape, a.scale, a.causal);
    });
    if (!warp)
      backward_block<T><<<l.block_grid(), l.block_size(), 0, l.stream>>>(y, dy, dx, a.shape, a.scale, a.causal);
  });
  check(cudaGetLastError(), "backward launch");
}

}  // namespace hpclm
