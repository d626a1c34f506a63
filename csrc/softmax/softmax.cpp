#include "softmax/softmax.h"

#include <stdexcept>
#include <string>


namespace hpclm {

void check_softmax_shape(const SoftmaxShape& s) {
  if (s.sk < 1)
    throw std::invalid_argument("softmax: the last dimension has size " + std::to_string(s.sk) + "; it must be >= 1");
  if (s.batch0 < 0 || s.batch1 < 0 || s.sq < 1)
    throw std::invalid_argument("softmax: invalid shape [" + std::to_string(s.batch0) + ", " + std::to_string(s.batch1) +
                                ", " + std::to_string(s.sq) + ", " + std::to_string(s.sk) + "]");
}

namespace {
void check_pointers(std::initializer_list<const void*> ptrs, const SoftmaxShape& s) {
  if (s.rows() == 0) return;
  for (const void* p : ptrs)
    if (p == nullptr) throw std::invalid_argument("softmax: null data pointer for a non-empty tensor");
}
}  // namespace

void softmax_forward(const SoftmaxForward& a, int threads) {
  check_softmax_shape(a.shape);
  check_pointers({a.x, a.y}, a.shape);
  if (threads < 1) threads = 1;
  HPCLM_DISPATCH(softmax_forward(a, threads))
}

void softmax_backward(const SoftmaxBackward& a, int threads) {
  check_softmax_shape(a.shape);
  check_pointers({a.y, a.dy, a.dx}, a.shape);
  if (threads < 1) threads = 1;
  HPCLM_DISPATCH(softmax_backward(a, threads))
}

}  // namespace hpclm
