// Run-time dispatch among the CPU code paths compiled into _C (see cpu_features.h).
// A kernel compiled once per ISA into hpclm::scalar / avx2 / avx512 / avx512_vnni is declared for every path with
// HPCLM_DECLARE_PER_ISA(declarations) and called through HPCLM_DISPATCH(call), which returns
// <isa>::call for the path selected_isa() names (scalar when that path was not compiled).
#pragma once
#include "common/cpu_features.h"

#define HPCLM_DECLARE_PER_ISA(...) \
  namespace scalar {               \
  __VA_ARGS__                      \
  }                                \
  namespace avx2 {                 \
  __VA_ARGS__                      \
  }                                \
  namespace avx512 {               \
  __VA_ARGS__                      \
  }                                \
  namespace avx512_vnni {          \
  __VA_ARGS__                      \
  }

#ifdef HPCLM_WITH_AVX512_VNNI
#define HPCLM_DISPATCH_CASE_AVX512_VNNI(call) \
  case ::hpclm::Isa::avx512_vnni:             \
    return ::hpclm::avx512_vnni::call;
#else
#define HPCLM_DISPATCH_CASE_AVX512_VNNI(call)
#endif
#ifdef HPCLM_WITH_AVX512
#define HPCLM_DISPATCH_CASE_AVX512(call) \
  case ::hpclm::Isa::avx512:             \
    return ::hpclm::avx512::call;
#else
#define HPCLM_DISPATCH_CASE_AVX512(call)
#endif
#ifdef HPCLM_WITH_AVX2
#define HPCLM_DISPATCH_CASE_AVX2(call) \
  case ::hpclm::Isa::avx2:             \
    return ::hpclm::avx2::call;
#else
#define HPCLM_DISPATCH_CASE_AVX2(call)
#endif
#define HPCLM_DISPATCH(call)                 \
  switch (::hpclm::selected_isa()) {         \
    HPCLM_DISPATCH_CASE_AVX512_VNNI(call)    \
    HPCLM_DISPATCH_CASE_AVX512(call)         \
    HPCLM_DISPATCH_CASE_AVX2(call)           \
    default:                                 \
      return ::hpclm::scalar::call;          \
  }
