"""Inference: incremental decoders per arch (`decoders.py`), per-sequence sampling (`sampling.py`) and the
single-sequence loop `hpclm generate` runs (`generate_ids`); `hpclm serve` batches the same decoders.

Each decoder holds the state of up to `capacity` sequences in slots: a KV cache for the GPT, the hidden
state for the GRU, the token history for the n-gram and the HMM (whose forward already reads only the
window it needs). A sequence is fed once (prefill, in chunks if wanted), then one token per step.
"""
from __future__ import annotations

import torch

from hpclm.infer.decoders import Decoder, make_decoder, recompute_logits
from hpclm.infer.sampling import SamplingParams, next_token, next_tokens


@torch.no_grad()
def generate_ids(model, ids: list[int], max_new_tokens: int, params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[int]:
    """ids followed by max_new_tokens sampled tokens. Within the model's context window the decoder feeds one
    position per step; once the sequence is longer, each step recomputes the last window (the context the model
    was trained on), as a full-recompute loop does, so the tokens are those of one."""
    out = list(ids)
    if max_new_tokens == 0:
        return out
    decoder = make_decoder(model, capacity=1)
    window = decoder.max_length
    fits = window is None or len(out) <= window
    logits = decoder.prefill(0, out) if fits else recompute_logits(model, out)
    for i in range(max_new_tokens):
        out.append(next_token(logits, params, generator))
        if i == max_new_tokens - 1:
            break
        fits = fits and (window is None or len(out) <= window)
        logits = decoder.decode([0], [out[-1]])[0] if fits else recompute_logits(model, out)
    return out


__all__ = ["Decoder", "SamplingParams", "generate_ids", "make_decoder", "next_token", "next_tokens", "recompute_logits"]
