#include <cuda_runtime.h>

#include "cuda/device.h"

namespace hpclm {

std::vector<CudaDevice> cuda_devices(std::string* error) {
  std::vector<CudaDevice> out;
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    *error = std::string(cudaGetErrorName(rc)) + ": " + cudaGetErrorString(rc);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out.push_back({i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
  }
  return out;
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace hpclm
