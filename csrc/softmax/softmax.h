// Fused scaled masked softmax over the last dimension, forward and backward.
//   y  = softmax(scale * x) with masked keys excluded; a row with every key masked is all zeros
//   dx = scale * y * (dy - sum(dy * y))
// x is viewed as a contiguous [batch0, batch1, sq, sk] (Python folds any leading dims into
// batch0/batch1). Masks: causal (key j is masked for query i when j > i + sk - sq, bottom-right
// aligned) and/or a uint8 mask (nonzero = masked) addressed through broadcast strides, so a
// [b,1,sq,sk] or [b,1,1,sk] padding mask is read in place, never expanded.
// Half types are computed in float32 and rounded once; float64 in float64.
#pragma once
#include <cstdint>

#include "common/dispatch.h"
#include "common/dtype.h"

#if defined(__CUDACC__)
#define HPCLM_HOST_DEVICE __host__ __device__
#else
#define HPCLM_HOST_DEVICE
#endif

namespace hpclm {

struct SoftmaxShape {
  int64_t batch0 = 1, batch1 = 1, sq = 1, sk = 1;
  HPCLM_HOST_DEVICE int64_t rows() const { return batch0 * batch1 * sq; }
};

// Element strides over batch0, batch1 and sq (0 = broadcast); keys are contiguous (stride 1).
struct SoftmaxMask {
  const uint8_t* data = nullptr;  // nullptr: no mask
  int64_t stride0 = 0, stride1 = 0, stride_q = 0;

  // Mask row for flat row index `row` of x (row = (b0 * batch1 + b1) * sq + q).
  HPCLM_HOST_DEVICE const uint8_t* row_ptr(int64_t row, const SoftmaxShape& s) const {
    if (data == nullptr) return nullptr;
    int64_t q = row % s.sq, bh = row / s.sq;
    return data + (bh / s.batch1) * stride0 + (bh % s.batch1) * stride1 + q * stride_q;
  }
};

// Keys a query may see: the whole row, or with `causal` its unmasked prefix [0, n).
HPCLM_HOST_DEVICE inline int64_t softmax_row_keys(int64_t row, const SoftmaxShape& s, bool causal) {
  if (!causal) return s.sk;
  int64_t n = row % s.sq + (s.sk - s.sq) + 1;
  return n < 0 ? 0 : (n > s.sk ? s.sk : n);
}

struct SoftmaxForward {
  const void* x = nullptr;
  void* y = nullptr;
  DType dtype = DType::f32;
  SoftmaxShape shape;
  double scale = 1.0;
  SoftmaxMask mask;
  bool causal = false;
};

// The mask is not needed: masked positions have y == 0, hence dx == 0.
struct SoftmaxBackward {
  const void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  DType dtype = DType::f32;
  SoftmaxShape shape;
  double scale = 1.0;
  bool causal = false;  // lets a row skip its masked tail (written as zeros)
};

// Throws std::invalid_argument naming the problem (empty rows, negative sizes, null pointers).
void check_softmax_shape(const SoftmaxShape& s);

// CPU: dispatch to the path chosen by selected_isa(); rows split over `threads` OpenMP threads.
void softmax_forward(const SoftmaxForward& args, int threads);
void softmax_backward(const SoftmaxBackward& args, int threads);

HPCLM_DECLARE_PER_ISA(
    void softmax_forward(const SoftmaxForward& args, int threads);
    void softmax_backward(const SoftmaxBackward& args, int threads);)

// CUDA (built with HPCLM_WITH_CUDA): runs on `device` in the cudaStream_t given as an integer
// (torch.cuda.current_stream().cuda_stream); asynchronous. Throws std::runtime_error on a CUDA error.
void softmax_forward_cuda(const SoftmaxForward& args, int device, uintptr_t stream);
void softmax_backward_cuda(const SoftmaxBackward& args, int device, uintptr_t stream);

}  // namespace hpclm
