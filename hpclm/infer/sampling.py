"""Next-token choice from one sequence's logits: greedy (temperature 0), or temperature, top-k and top-p
(nucleus) sampling with the sequence's own generator, so a seed gives the same tokens whatever else runs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpclm.errors import HpclmError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token

    def check(self, flag=lambda name: name) -> "SamplingParams":
        """Itself, or an HpclmError naming the setting (as `flag(name)` calls it) that is out of range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise HpclmError(f"{flag('temperature')} must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise HpclmError(f"{flag('top_k')} must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise HpclmError(f"{flag('top_p')} must be in (0, 1] (1: off), got {self.top_p}")
        return self


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token from logits [V] (any float dtype)."""
    logits = logits.float().view(1, -1)
    if params.temperature == 0:
        return int(logits.argmax(dim=-1))
    # shifted to a max of 0 first, so a tiny temperature sharpens to the likeliest token instead of overflowing
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        # keep the likeliest tokens whose probabilities reach top_p together (at least the likeliest one)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before >= params.top_p)
        probs = probs.masked_fill(drop, 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of logits [B, V], row i by params[i] and generators[i]: each token is the one
    next_token would choose for that row alone; the greedy rows share one argmax over the batch."""
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    out = [0] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, rows.float().argmax(dim=-1).tolist()):
            out[i] = token
    for i, p in enumerate(params):
        if p.temperature != 0:
            out[i] = next_token(logits[i], p, generators[i])
    return out
