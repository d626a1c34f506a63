"""Language models: `gpt` (nanoGPT-equivalent transformer), `gru` (the design brief's GRU) and the
classical baselines `ngram` (interpolated Kneser-Ney) and `hmm` (Baum-Welch), fitted by hpclm.classical."""
from __future__ import annotations

import torch.nn as nn

from hpclm.config import Config
from hpclm.models.gpt import GPT
from hpclm.models.gru import GRULM
from hpclm.models.hmm import HMMLM
from hpclm.models.ngram import NgramLM

CLASSICAL = ("ngram", "hmm")  # fitted by counting / EM (hpclm.classical), not by the gradient loop


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    m, block = cfg.model, cfg.data.block_size
    if m.arch == "gpt":
        return GPT(vocab_size, block, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout,
                   bias=m.bias, softmax=m.softmax)
    if m.arch == "gru":
        return GRULM(vocab_size, block, embd=m.n_embd, hidden_size=m.hidden_size, n_layer=m.n_layer,
                     dropout=m.dropout, bias=m.bias)
    if m.arch == "ngram":
        return NgramLM(vocab_size, order=m.order, block_size=block, discount=m.discount)
    if m.arch == "hmm":
        return HMMLM(vocab_size, states=m.states, block_size=block)
    raise ValueError(f"unknown model.arch {m.arch!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CLASSICAL", "GPT", "GRULM", "HMMLM", "NgramLM", "build_model", "count_parameters"]
