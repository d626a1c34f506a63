#include "common/cpu_features.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace hpclm {
namespace {

struct Selection {
  Isa isa;
  std::string reason;
};

bool compiled(Isa isa) {
  for (Isa c : compiled_isas())
    if (c == isa) return true;
  return false;
}

bool parse_isa(const std::string& name, Isa* out) {
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512_vnni})
    if (name == isa_name(isa)) {
      *out = isa;
      return true;
    }
  return false;
}

Isa best_isa() {
  Isa best = Isa::scalar;
  for (Isa isa : compiled_isas())
    if (cpu_supports(isa) && static_cast<int>(isa) > static_cast<int>(best)) best = isa;
  return best;
}

Selection initial_selection() {
  Isa best = best_isa();
  const char* env = std::getenv("HPCLM_CPU_PATH");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto")
    return {best, std::string("best compiled path this CPU supports")};
  Isa asked;
  if (!parse_isa(env, &asked))
    return {best, std::string("HPCLM_CPU_PATH=") + env + " is not scalar|avx2|avx512|avx512_vnni; using the best path"};
  if (!compiled(asked))
    return {best, std::string("HPCLM_CPU_PATH=") + env + " is not compiled in; using the best path"};
  if (!cpu_supports(asked))
    return {best, std::string("HPCLM_CPU_PATH=") + env + " is not supported by this CPU; using the best path"};
  return {asked, std::string("HPCLM_CPU_PATH=") + env};
}

std::mutex g_mutex;
Selection& selection() {
  static Selection s = initial_selection();
  return s;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<Isa> compiled_isas() {
  std::vector<Isa> v{Isa::scalar};
#ifdef HPCLM_WITH_AVX2
  v.push_back(Isa::avx2);
#endif
#ifdef HPCLM_WITH_AVX512
  v.push_back(Isa::avx512);
#endif
#ifdef HPCLM_WITH_AVX512_VNNI
  v.push_back(Isa::avx512_vnni);
#endif
  return v;
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512_vnni:
      return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512vnni");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default: return true;
  }
#else
  return isa == Isa::scalar;
#endif
}

Isa selected_isa() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return selection().isa;
}

std::string isa_selection_reason() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return selection().reason;
}

void set_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") {
    isa = best_isa();
  } else if (!parse_isa(name, &isa)) {
    throw std::invalid_argument("unknown CPU path '" + name + "': use auto, scalar, avx2, avx512 or avx512_vnni");
  } else if (!compiled(isa)) {
    throw std::invalid_argument("CPU path '" + name + "' is not compiled into this build");
  } else if (!cpu_supports(isa)) {
    throw std::invalid_argument("CPU path '" + name + "' is not supported by this CPU");
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  selection() = {isa, name == "auto" ? "best compiled path this CPU supports" : "set_cpu_path('" + name + "')"};
}

}  // namespace hpclm
