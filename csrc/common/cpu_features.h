// Run-time choice among the CPU code paths compiled into _C.
// Kernels are built once per ISA (CMake: HPCLM_ISA_SOURCES) into namespace hpclm::<isa>;
// callers reach them through HPCLM_DISPATCH (common/dispatch.h). HPCLM_CPU_PATH=scalar|avx2|avx512|avx512_vnni asks for a path.
// avx512_vnni is avx512 plus the VNNI int8 dot products (vpdpbusd), which the quantized matmul uses.
#pragma once
#include <string>
#include <vector>

namespace hpclm {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_vnni = 3 };

const char* isa_name(Isa isa);
std::vector<Isa> compiled_isas();
bool cpu_supports(Isa isa);
// The path kernels use now: the best compiled one this CPU runs, unless
// HPCLM_CPU_PATH or set_isa() asked for another one that is compiled and runs here.
Isa selected_isa();
// Why selected_isa() is what it is (one line).
std::string isa_selection_reason();
// Force a path (tests, benchmarks). Throws std::invalid_argument naming the problem.
void set_isa(const std::string& name);

}  // namespace hpclm
