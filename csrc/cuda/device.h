// CUDA device discovery, safe on machines without a GPU or driver (errors come back as text).
#pragma once
#include <string>
#include <vector>

namespace hpclm {

struct CudaDevice {
  int index;
  std::string name;
  int major, minor;
  size_t total_memory;
  int multiprocessors;
};

// Devices the CUDA runtime sees; on failure an empty list and *error says why.
std::vector<CudaDevice> cuda_devices(std::string* error);
int cuda_runtime_version();

}  // namespace hpclm
