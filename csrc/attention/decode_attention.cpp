// The run-time choice of decode_attention's CPU path (decode_attention_kernels.cpp is compiled once per ISA).
#include "attention/decode_attention.h"

namespace hpclm {

void decode_attention(const DecodeAttentionArgs& a, int threads) { HPCLM_DISPATCH(decode_attention(a, threads)); }

}  // namespace hpclm
