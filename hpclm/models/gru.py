"""A recurrent language model: Embedding(vocab, 100) -> GRU(128) -> Linear(vocab) (the defaults of configs/gru.toml)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class GRULM(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, embd: int = 100, hidden_size: int = 128, n_layer: int = 1,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.block_size = block_size  # the training context; generation crops to it
        self.embedding = nn.Embedding(vocab_size, embd)
        self.gru = nn.GRU(embd, hidden_size, num_layers=n_layer, batch_first=True, bias=bias,
                          dropout=dropout if n_layer > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size, bias=bias)

    def forward(self, idx, targets=None):
        """(logits, loss); every window starts from a zero hidden state, as in training."""
        h, _ = self.gru(self.embedding(idx))
        logits = self.head(self.drop(h))
        if targets is None:
            return logits[:, [-1], :], None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
