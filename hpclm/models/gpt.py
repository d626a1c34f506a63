"""Decoder-only GPT, equivalent to nanoGPT's model.py (same parameter names, initialisation and loss):
pre-LayerNorm blocks, learned positions, GELU MLP (exact, or GPT-2's tanh approximation), tied input/output embeddings, optional bias.

`softmax` picks the attention softmax: "fused" (hpclm.ops.fused_softmax), "torch" (explicit
scale + causal mask + softmax, nanoGPT's slow path), "sdpa" (torch's scaled_dot_product_attention),
or "auto": per call, fused under CPU autocast (bf16/fp16), else sdpa (the faster of the two in each
case on the CPUs measured: README, Fused softmax); sdpa too when this build has no fused kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpclm.errors import HpclmError


def load_fused_softmax():
    """hpclm.ops.fused_softmax, or a config error saying what to use instead."""
    try:
        from hpclm.kernels.ops import fused_softmax
    except ImportError as e:
        raise HpclmError(f"model.softmax = 'fused' needs hpclm.ops.fused_softmax, which this build lacks ({e}); "
                         "use model.softmax = 'sdpa' or 'torch'") from None
    return fused_softmax


def fused_softmax_or_none():
    try:
        return load_fused_softmax()
    except HpclmError:
        return None


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool, softmax: str):
        super().__init__()
        self.n_head, self.n_embd, self.dropout, self.softmax = n_head, n_embd, dropout, softmax
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.fused_softmax = {"fused": load_fused_softmax, "auto": fused_softmax_or_none}.get(softmax, lambda: None)()
        if softmax == "torch":
            mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
            self.register_buffer("causal_mask", mask.view(1, 1, block_size, block_size), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.n_embd // self.n_head).transpose(1, 2) for t in (q, k, v))
        scale = 1.0 / math.sqrt(k.size(-1))
        cpu_autocast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        mode = self.softmax
        if mode == "auto":
            mode = "fused" if cpu_autocast and self.fused_softmax is not None else "sdpa"
        if mode == "sdpa":
            dropout_p = self.dropout if self.training else 0.0
            if cpu_autocast:
                # CPU autocast runs SDPA in bf16, whose CPU flash-attention backward is several times slower than fp32's
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
                y = y.to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1)
            if mode == "fused":
                att = self.fused_softmax(scores, scale=scale, causal=True)
            else:
                att = (scores * scale).masked_fill(~self.causal_mask[:, :, :T, :T], float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # n_embd: this rank's heads under TP
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, activation: str = "gelu"):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout, bias, softmax, activation="gelu"):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout, bias, softmax)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias, activation)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = False, softmax: str = "sdpa", activation: str = "gelu"):
        super().__init__()
        if softmax not in ("auto", "fused", "torch", "sdpa"):
            raise HpclmError(f"model.softmax must be auto, fused, torch or sdpa, got {softmax!r}")
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(Block(n_embd, n_head, block_size, dropout, bias, softmax, activation)
                            for _ in range(n_layer)),
            ln_f=LayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """(logits, loss). Without targets only the last position's logits are computed."""
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
