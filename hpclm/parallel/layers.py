"""Tensor-parallel layers: column- and row-parallel linears, a vocab-parallel embedding and the
vocab-parallel cross-entropy, each holding only this rank's slice of the weights."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpclm.parallel.groups import TensorGroup
from hpclm.parallel.mappings import copy_to_tensor_region, reduce_from_tensor_region


def padded_vocab(vocab_size: int, tensor: int) -> int:
    """The vocabulary rounded up to a multiple of the TP size; the pad rows never win (masked in the loss and logits)."""
    return -(-vocab_size // tensor) * tensor


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's slice of the output features; the input is replicated."""

    def __init__(self, in_features: int, out_local: int, bias: bool, group: TensorGroup):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.bias = nn.Parameter(torch.zeros(out_local)) if bias else None

    def forward(self, x):
        return F.linear(copy_to_tensor_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, then the (replicated) bias: the input is this rank's slice."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: TensorGroup):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = reduce_from_tensor_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; tokens outside them look up zeros, summed over the group."""

    def __init__(self, rows: int, dim: int, start: int, group: TensorGroup):
        super().__init__()
        self.group, self.start, self.rows = group, start, rows
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, idx):
        local = idx - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[target] over logits split along the vocabulary, in fp32, with three
    reductions (max; target logit and sum of exp, stacked into one) and no rank holding the full row.
    Half-precision logits are promoted to fp32; the loss has that dtype."""

    @staticmethod
    def forward(ctx, logits, targets, group, start, vocab_size):
        ctx.dtype = logits.dtype
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        width = logits.size(-1)
        pad = max(0, start + width - vocab_size)  # this rank's columns past the real vocabulary
        if pad:
            logits = logits.clone()
            logits[:, width - pad:] = float("-inf")
        row_max = group.allreduce(logits.max(dim=-1).values, op="max")
        shifted = logits - row_max.unsqueeze(-1)
        local_target = targets - start
        mine = (local_target >= 0) & (local_target < width)
        picked = shifted.gather(-1, local_target.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(~mine, 0.0)
        exp = shifted.exp()
        both = group.allreduce(torch.stack([picked, exp.sum(dim=-1)]))
        target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target.clamp(0, width - 1), mine)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, mine = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_target] -= mine.to(grad.dtype)
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(local_logits, targets, group: TensorGroup, start: int, vocab_size: int,
                                 ignore_index: int = -1):
    """Mean cross-entropy over the targets != ignore_index (F.cross_entropy's reduction), from this rank's
    logit columns [start, start + width) of a vocabulary of vocab_size real tokens."""
    logits = local_logits.reshape(-1, local_logits.size(-1))
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    losses = _VocabParallelCrossEntropy.apply(logits, targets.masked_fill(~keep, 0), group, start, vocab_size)
    return (losses * keep).sum() / keep.sum()
