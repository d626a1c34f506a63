"""Discrete hidden Markov model over tokens, trained by Baum-Welch (Rabiner 1989, scaled variables).

K hidden states, vocabulary V: initial pi [K], transition A [K, K] (row: from), emission B [K, V].
A token window o_0..o_{T-1} starts in pi. The scaled forward pass keeps alpha_t, the state posterior
given o_0..o_t, and c_t = P(o_t | o_0..o_{t-1}); log P(o) = sum_t log c_t. As a language model the
prediction after o_0..o_t is P(. | o_0..o_t) = (alpha_t A) B, and c_{t+1} is its value at o_{t+1}.

EM (Baum-Welch) over a set of windows: the E-step sums the expected initial states, transitions and
emissions (batched over windows, float64), the M-step normalizes them. Emissions get an additive
pseudo-count (a symmetric Dirichlet prior, MAP-EM) so tokens unseen in training keep non-zero
probability; with pseudo-count 0 it is plain maximum-likelihood EM, whose likelihood never decreases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hpclm.errors import HpclmError


@dataclass
class Counts:
    """Expected sufficient statistics of one E-step (sums over windows; add them across ranks)."""

    log_likelihood: torch.Tensor  # [] float64: sum over windows of log P(window)
    initial: torch.Tensor  # [K]
    transition: torch.Tensor  # [K, K] expected transitions i -> j
    emission: torch.Tensor  # [K, V] expected emissions

    def flat(self) -> torch.Tensor:
        return torch.cat([self.log_likelihood.reshape(1), self.initial, self.transition.reshape(-1),
                          self.emission.reshape(-1)])

    @classmethod
    def unflat(cls, flat: torch.Tensor, K: int, V: int) -> "Counts":
        sizes = [1, K, K * K, K * V]
        ll, pi, a, b = torch.split(flat, sizes)
        return cls(ll[0], pi, a.view(K, K), b.view(K, V))


class HMMLM(nn.Module):
    def __init__(self, vocab_size: int, states: int = 64, block_size: int = 64):
        super().__init__()
        if states < 1:
            raise HpclmError(f"model.states must be >= 1, got {states}")
        self.vocab_size, self.states, self.block_size = vocab_size, states, block_size
        f64 = torch.float64
        self.register_buffer("initial", torch.full((states,), 1.0 / states, dtype=f64))
        self.register_buffer("transition", torch.full((states, states), 1.0 / states, dtype=f64))
        self.register_buffer("emission", torch.full((states, vocab_size), 1.0 / vocab_size, dtype=f64))

    def randomize(self, unigram: torch.Tensor, generator: torch.Generator, noise: float = 2.0) -> "HMMLM":
        """EM's starting point: every probability times exp(noise * N(0, 1)), emissions around the unigram
        distribution. Strong noise breaks the states' symmetry (near-uniform starts stall at the unigram model)."""
        K, V = self.states, self.vocab_size

        def jitter(*shape):
            return torch.exp(noise * torch.randn(*shape, generator=generator, dtype=torch.float64))

        base = unigram.to(torch.float64).cpu() + 1.0 / V
        for buf, value in ((self.initial, jitter(K)), (self.transition, jitter(K, K)), (self.emission, base * jitter(K, V))):
            buf.copy_(_normalize(value))
        return self

    # --- forward-backward ----------------------------------------------------------------------

    def filter(self, obs: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B, T] -> (alpha [T, B, K] state posteriors given o_0..o_t, c [T, B] = P(o_t | o_<t)).

        Computed in `dtype` (float32 by default: the scaling keeps every value in range)."""
        B, T = obs.shape
        emission_t, A = self.emission.t().to(dtype).contiguous(), self.transition.to(dtype)
        alpha = torch.empty(T, B, self.states, dtype=dtype, device=obs.device)
        scale = torch.empty(T, B, dtype=dtype, device=obs.device)
        prior = self.initial.to(dtype).expand(B, -1)
        for t in range(T):
            a = prior * emission_t[obs[:, t]]
            torch.sum(a, 1, out=scale[t])
            torch.div(a, scale[t, :, None], out=alpha[t])
            prior = alpha[t] @ A
        return alpha, scale

    def log_likelihood(self, obs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log P(window) for each row of obs [B, T]: [B] float64."""
        return self.filter(obs, dtype)[1].double().log().sum(0)

    def expected_counts(self, obs: torch.Tensor, batch_size: int = 2048, dtype: torch.dtype = torch.float32) -> Counts:
        """E-step over the windows obs [N, T], batch_size windows at a time (memory: T x batch x K).

        Forward-backward runs in `dtype`; the sums are kept in float64."""
        K, V = self.states, self.vocab_size
        dev, f64 = obs.device, torch.float64
        zeros = [torch.zeros(shape, dtype=f64, device=dev) for shape in ((), (K,), (K, K), (V, K))]
        total = Counts(*zeros)  # emission summed as [V, K] (index_add_ over tokens), transposed at the end
        emission_t, A = self.emission.t().to(dtype).contiguous(), self.transition.to(dtype)
        for start in range(0, obs.shape[0], batch_size):
            o = obs[start:start + batch_size]
            alpha, scale = self.filter(o, dtype)
            beta = torch.ones_like(alpha[0])  # scaled beta_{T-1}
            xi = torch.zeros(K, K, dtype=dtype, device=dev)
            for t in range(o.shape[1] - 2, -1, -1):
                w = emission_t[o[:, t + 1]] * beta / scale[t + 1, :, None]  # B[:, o_{t+1}] beta_{t+1} / c_{t+1}
                xi += alpha[t].t() @ w  # sum over windows of alpha_t(i) w(j); times A_ij below
                beta = w @ A.t()
                alpha[t] *= beta  # alpha_t becomes gamma_t, the state posterior given the whole window
            total.log_likelihood += scale.double().log().sum()
            total.initial += alpha[0].sum(0)
            total.transition += (xi * A).double()
            total.emission.index_add_(0, o.t().reshape(-1), alpha.reshape(-1, K).double())
        total.emission = total.emission.t().contiguous()
        return total

    # --- M-step ----------------------------------------------------------------------------------

    def maximize(self, counts: Counts, pseudocount: float = 0.0) -> None:
        """Set pi, A, B to the normalized expected counts; a row with no expected mass keeps its values."""
        self.initial.copy_(_normalize(counts.initial, fallback=self.initial))
        self.transition.copy_(_normalize(counts.transition, fallback=self.transition))
        self.emission.copy_(_normalize(counts.emission + pseudocount, fallback=self.emission))

    def log_prior(self, pseudocount: float) -> float:
        """The MAP-EM prior's log density (up to a constant): pseudocount * sum log B."""
        return float(pseudocount * self.emission.log().sum()) if pseudocount else 0.0

    # --- language-model interface -----------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(log P(. | window so far) [B, T, V], mean -log P(targets)); without targets the last position only."""
        alpha, _ = self.filter(idx.to(self.emission.device), torch.float64)
        if targets is None:
            alpha = alpha[-1:]
        pred = (alpha @ self.transition) @ self.emission  # [T, B, V]
        logits = pred.clamp_min(torch.finfo(torch.float64).tiny).log().transpose(0, 1)
        if targets is None:
            return logits, None
        y = targets.to(logits.device)
        loss = -logits.gather(2, y[:, :, None]).mean()
        return logits, loss

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, states={self.states}"


def _normalize(x: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x scaled to sum to 1 (last dim); rows summing to 0 take fallback's row."""
    total = x.sum(-1, keepdim=True)
    out = x / total.clamp_min(torch.finfo(x.dtype).tiny)
    if fallback is not None:
        out = torch.where(total > 0, out, fallback)
    return out
