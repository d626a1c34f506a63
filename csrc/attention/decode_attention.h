// One decoding step of attention over a KV cache, float32 CPU. For each of B sequences (a cache slot and the
// position of its new token) and each of H heads: this step's key and value are written into the cache at
// that position, then the query attends to positions 0..position: y = softmax(scale * q K^T) V.
// Every (sequence, head) is computed alone in a fixed order, so batching cannot change its result.
#pragma once
#include <cstdint>

#include "common/dispatch.h"

namespace hpclm {

struct DecodeAttentionArgs {
  const float* qkv;          // [B, 3 H D]: q, k, v of this step side by side, row stride ldqkv
  float* keys;               // one layer's cache [slots, H, P, D], contiguous
  float* values;             // the same shape
  const int64_t* slots;      // [B] cache slot of each sequence, all different
  const int64_t* positions;  // [B] position of each sequence's new token, < P
  float* y;                  // [B, H D], row stride ldy: head h at columns h D .. h D + D - 1
  int64_t B, H, D, P, ldqkv, ldy;
  float scale;
};

// Dispatches to the CPU path chosen by selected_isa(); `threads` OpenMP threads share the (sequence, head)
// pairs.
void decode_attention(const DecodeAttentionArgs& a, int threads);

HPCLM_DECLARE_PER_ISA(void decode_attention(const DecodeAttentionArgs& a, int threads);)

}  // namespace hpclm
