"""The communication steps of a tensor-parallel model as autograd functions (Megatron-LM's mappings):
what each does forward, and its adjoint backward."""
from __future__ import annotations

import torch

from hpclm.parallel.groups import TensorGroup


class CopyToTensorRegion(torch.autograd.Function):
    """Forward: the replicated input as is. Backward: the gradients of all TP ranks' partial paths, summed."""

    @staticmethod
    def forward(ctx, x, group: TensorGroup):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.allreduce(grad, inplace=True), None


class ReduceFromTensorRegion(torch.autograd.Function):
    """Forward: partial results summed over the TP group. Backward: the gradient as is (every rank holds it)."""

    @staticmethod
    def forward(ctx, x, group: TensorGroup):
        out = group.allreduce(x, inplace=True)  # x: a fresh partial result nothing else reads
        if out is x:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorRegion(torch.autograd.Function):
    """Forward: the ranks' slices concatenated along the last dim. Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group: TensorGroup):
        ctx.group, ctx.width = group, x.size(-1)
        return group.allgather(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.group.rank * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def copy_to_tensor_region(x, group):
    return x if group.size == 1 else CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x, group):
    return x if group.size == 1 else ReduceFromTensorRegion.apply(x, group)


def gather_from_tensor_region(x, group):
    return x if group.size == 1 else GatherFromTensorRegion.apply(x, group)
