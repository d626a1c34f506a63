"""Attention of one decoding step over a KV cache, through hpclm._C's decode_attention where it serves
(float32 CPU), else torch's scaled_dot_product_attention; both give the same result up to rounding.

    from hpclm.kernels.attention import decode_attention
    y = decode_attention(qkv, keys, values, slots, positions, n_head)

qkv [B, 3C] holds this step's query, key and value of B sequences; keys and values are one layer's cache
[slots, H, P, C / H]; sequence b lives in cache slot slots[b] and its new token is at positions[b] (two
lists of B ints; the slots all different). The key
and value are written into the cache there, then y [B, C] = softmax(q K^T / sqrt(C / H)) V over positions
0..positions[b], head by head. The kernel computes each (sequence, head) alone, so a sequence's result does
not depend on what else is in the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpclm import native


def decode_attention_available(cache: torch.Tensor) -> tuple[bool, str]:
    """(whether the kernel serves this cache, why not)."""
    ext = native.extension()
    if ext is None or not hasattr(ext, "decode_attention"):
        return False, native.load_error() or "this build of hpclm._C has no decode_attention"
    if cache.device.type != "cpu" or cache.dtype != torch.float32:
        return False, f"decode_attention takes a float32 CPU cache, not {cache.dtype} on {cache.device}"
    if not cache.is_contiguous():
        return False, "decode_attention takes a contiguous cache"
    return True, ""


class DecodeAttention:
    """One decoding step's attention for B sequences in cache `slots` with their new token at `positions`,
    checked once and then applied layer by layer: attend(qkv, keys, values) for each layer's cache of
    shape cache_shape [slots, H, P, C / H]."""

    def __init__(self, slots: list[int], positions: list[int], n_head: int, cache_shape, device):
        n_slots, H, P, D = cache_shape
        B = len(slots)
        if H != n_head or len(positions) != B:
            raise ValueError(f"decode_attention: a cache {tuple(cache_shape)}, {B} slots and {len(positions)} "
                             f"positions do not agree with {n_head} heads")
        if len(set(slots)) != B:
            raise ValueError(f"decode_attention: each sequence of a step needs its own cache slot, not {slots}")
        if B and (min(slots) < 0 or max(slots) >= n_slots or min(positions) < 0 or max(positions) >= P):
            raise ValueError(f"decode_attention: slots {slots} or positions {positions} outside the cache's "
                             f"{n_slots} slots of {P} positions")
        self.cache_shape, self.B, self.H, self.P, self.D, self.C = tuple(cache_shape), B, H, P, D, H * D
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)
        self.positions = torch.tensor(positions, dtype=torch.int64, device=device)
        self.scale = 1.0 / math.sqrt(D)

    @torch.no_grad()
    def __call__(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, C = self.B, self.C
        if tuple(qkv.shape) != (B, 3 * C) or tuple(keys.shape) != self.cache_shape or values.shape != keys.shape:
            raise ValueError(f"decode_attention: qkv {tuple(qkv.shape)} and a cache {tuple(keys.shape)} do not agree "
                             f"with {B} sequences and a cache {self.cache_shape}")
        if (qkv.dtype == torch.float32 and qkv.device.type == "cpu" and values.is_contiguous()
                and decode_attention_available(keys)[0]):
            if qkv.stride(-1) != 1:
                qkv = qkv.contiguous()
            y = torch.empty(B, C)
            native.extension().decode_attention(qkv.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                                self.slots.data_ptr(), self.positions.data_ptr(), y.data_ptr(), B,
                                                self.H, self.D, self.P, qkv.stride(0), C, self.scale,
                                                torch.get_num_threads())
            return y
        return _decode_attention_torch(qkv, keys, values, self.slots, self.positions)


def decode_attention(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: list[int],
                     positions: list[int], n_head: int) -> torch.Tensor:
    """One layer's attention of one decoding step (see the module's docstring)."""
    return DecodeAttention(slots, positions, n_head, keys.shape, qkv.device)(qkv, keys, values)


def _decode_attention_torch(qkv, keys, values, slots, positions):
    _, H, _, D = keys.shape
    B, C = qkv.shape[0], H * D
    q, k, v = (z.reshape(B, H, 1, D) for z in qkv.split(C, dim=1))
    keys[slots, :, positions] = k[:, :, 0]
    values[slots, :, positions] = v[:, :, 0]
    span = int(positions.max()) + 1
    seen = (torch.arange(span, device=qkv.device)[None, :] <= positions[:, None])[:, None, None, :]
    # an additive mask (0 or -inf), which the CPU kernel of SDPA takes faster than a boolean one
    mask = torch.zeros(seen.shape, dtype=qkv.dtype, device=qkv.device).masked_fill_(~seen, float("-inf"))
    y = F.scaled_dot_product_attention(q, keys[slots, :, :span], values[slots, :, :span], attn_mask=mask)
    return y.reshape(B, C)
