"""A hpclm GPT split over a tensor-parallel group (Megatron-LM's split) and the mapping between its
shards and the full, TP-independent state dict that checkpoints hold.

Attention: QKV column-parallel by heads, output projection row-parallel. MLP: fc column-parallel, proj
row-parallel. Row-parallel biases are added after the reduce and, like the LayerNorms and positions, are
replicated. The tied token embedding / LM head is split along a vocabulary padded to a multiple of T.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpclm.models.gpt import GPT
from hpclm.parallel.groups import TensorGroup
from hpclm.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, padded_vocab,
                                   vocab_parallel_cross_entropy)
from hpclm.parallel.mappings import copy_to_tensor_region, gather_from_tensor_region

VOCAB = ("transformer.wte.weight", "lm_head.weight")


def shard_spec(name: str) -> tuple[int, int] | None:
    """(dim, parts) of a sharded parameter: split along `dim`, each of `parts` equal blocks (q, k, v) split
    alike; None for a replicated one."""
    if name in VOCAB or name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        return 0, 1
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return 0, 3
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return 1, 1
    return None


def shard_tensor(name: str, full: torch.Tensor, tensor: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor (vocabulary rows padded with zeros to a multiple of `tensor`)."""
    spec = shard_spec(name)
    if spec is None or tensor == 1:
        return full.clone()
    dim, parts = spec
    if name in VOCAB:
        pad = padded_vocab(full.size(0), tensor) - full.size(0)
        full = torch.cat([full, full.new_zeros((pad,) + tuple(full.shape[1:]))]) if pad else full
    blocks = [block.chunk(tensor, dim)[tp_rank] for block in full.chunk(parts, dim)]
    return torch.cat(blocks, dim).clone()


def unshard_tensor(name: str, pieces: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The full tensor from every TP rank's slice (in rank order), vocabulary padding removed."""
    spec = shard_spec(name)
    if spec is None or len(pieces) == 1:
        return pieces[0]
    dim, parts = spec
    split = [piece.chunk(parts, dim) for piece in pieces]
    full = torch.cat([torch.cat([s[b] for s in split], dim) for b in range(parts)], dim)
    return full[:vocab_size] if name in VOCAB else full


class TensorParallelGPT(nn.Module):
    """This rank's shard of a GPT. Parameter names equal GPT's, so full state dicts map name for name."""

    def __init__(self, full: GPT, group: TensorGroup):
        super().__init__()
        self.group, self.block_size = group, full.block_size
        T, rank = group.size, group.rank
        self.vocab_size = full.lm_head.weight.size(0)
        rows = padded_vocab(self.vocab_size, T) // T
        self.vocab_start = rank * rows
        full_state = full.state_dict()  # references: the replaced modules' tensors live until the copy below
        tr = full.transformer
        bias = tr.h[0].attn.c_attn.bias is not None if len(tr.h) else False
        n_embd = tr.wpe.weight.size(1)
        for block in tr.h:
            attn, mlp = block.attn, block.mlp
            attn.c_attn = ColumnParallelLinear(n_embd, 3 * n_embd // T, bias, group)
            attn.c_proj = RowParallelLinear(n_embd // T, n_embd, bias, group)
            attn.n_head, attn.n_embd = attn.n_head // T, attn.n_embd // T
            hidden = mlp.c_fc.weight.size(0)
            mlp.c_fc = ColumnParallelLinear(n_embd, hidden // T, bias, group)
            mlp.c_proj = RowParallelLinear(hidden // T, n_embd, bias, group)
        tr.wte = VocabParallelEmbedding(rows, n_embd, self.vocab_start, group)
        self.transformer = tr
        self.lm_head = nn.Module()
        self.lm_head.weight = tr.wte.weight  # tied, as in GPT
        self.load_full_state_dict(full_state)

    def load_full_state_dict(self, full_state: dict[str, torch.Tensor]) -> None:
        """Copy this rank's slices of a full (TP-independent) GPT state dict into the shard."""
        T, rank = self.group.size, self.group.rank
        own = self.state_dict()
        missing = sorted(set(own) - set(full_state))
        if missing:
            raise KeyError(f"the full state dict lacks {', '.join(missing[:3])}")
        with torch.no_grad():
            for name, target in own.items():
                target.copy_(shard_tensor(name, full_state[name], T, rank))

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The full GPT state dict, gathered from the group (every TP rank must call it). keep=False: take
        part in the gathers but hold no full tensor (a rank that does not write the checkpoint); returns {}."""
        out = {}
        for name, local in self.state_dict().items():
            if shard_spec(name) is None or self.group.size == 1:
                full = local.detach().clone() if keep else None
            else:
                full = unshard_tensor(name, self.gather_pieces(local.detach()), self.vocab_size)
            if keep:
                out[name] = full
        return out

    def gather_pieces(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every TP rank's tensor of the same shape as `local`, in rank order."""
        return self.group.allgather_parts(local)

    def parameter_count(self) -> int:
        """Parameters of the whole model: sharded ones summed over the group, vocabulary padding left out."""
        local = torch.zeros(1, dtype=torch.float64)
        replicated = 0
        for name, p in self.named_parameters():
            if shard_spec(name) is None:
                replicated += p.numel()
            else:
                local += p.numel()
        pad = (self.lm_head.weight.size(0) * self.group.size - self.vocab_size) * self.lm_head.weight.size(1)
        return int(self.group.allreduce(local)[0]) + replicated - pad

    def forward(self, idx, targets=None):
        """(logits, loss). With targets the logits are this rank's vocabulary columns [vocab_start, +rows)
        and the loss is the full cross-entropy; without, the last position's full-vocabulary logits."""
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.block_size}")
        tr = self.transformer
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))
        for block in tr.h:
            x = block(x)
        x = tr.ln_f(x)
        if targets is None:
            local = F.linear(copy_to_tensor_region(x[:, [-1], :], self.group), self.lm_head.weight)
            return gather_from_tensor_region(local, self.group)[..., :self.vocab_size], None
        local = F.linear(copy_to_tensor_region(x, self.group), self.lm_head.weight)
        return local, vocab_parallel_cross_entropy(local, targets, self.group, self.vocab_start, self.vocab_size)


# --- training helpers: the global gradient norm, and optimizer state in the full layout -------------

def grad_norm_and_clip(model: TensorParallelGPT, max_norm: float) -> torch.Tensor:
    """The gradient norm of the whole (unsplit) model, from one allreduce of the sharded parameters' squares
    (replicated ones count once); clips every rank's gradients alike to max_norm unless it is 0 (torch's
    clip_grad_norm_ rule: scale by max_norm / (norm + 1e-6) when below 1)."""
    sharded, replicated = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (replicated if shard_spec(name) is None else sharded).append(p.grad.detach().float().pow(2).sum())
    zero = torch.zeros((), dtype=torch.float32)
    split = torch.stack(sharded).sum() if sharded else zero
    norm = (model.group.allreduce(split.reshape(1))[0] + (torch.stack(replicated).sum() if replicated else zero)).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's index order (its param groups, in order)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: TensorParallelGPT, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """optimizer.state_dict() with every sharded moment gathered to the full tensor (every TP rank calls;
    keep=False: a rank that only takes part in the gathers, returns {})."""
    state = optimizer.state_dict()
    names = _param_names(model, optimizer)
    full = {}
    for index, moments in state["state"].items():
        name = names[index]
        gathered = {k: unshard_tensor(name, model.gather_pieces(v), model.vocab_size)
                    if torch.is_tensor(v) and v.dim() > 0 and shard_spec(name) is not None else v
                    for k, v in moments.items()}
        if keep:
            full[index] = gathered
    return {**state, "state": full} if keep else {}


def shard_optimizer_state(model: TensorParallelGPT, optimizer: torch.optim.Optimizer, full: dict) -> dict:
    """A full optimizer state dict (full_optimizer_state's, or a T=1 run's) cut to this rank's slices."""
    names = _param_names(model, optimizer)
    T, rank = model.group.size, model.group.rank
    return {**full, "state": {index: {k: shard_tensor(names[index], v, T, rank)
                                      if torch.is_tensor(v) and v.dim() > 0 else v for k, v in moments.items()}
                              for index, moments in full["state"].items()}}
