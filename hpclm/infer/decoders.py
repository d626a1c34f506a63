"""Incremental decoders: the state of up to `capacity` sequences, one slot each, fed a prompt once and then
one token per step; every call returns the float32 logits of the next token.

    GPTDecoder        a KV cache [layer, slot, head, position, head_dim]: a step computes one position
    GRUDecoder        the hidden state [layer, slot, hidden]
    RecomputeDecoder  the token history; each step runs the model over it (n-gram, HMM: their forward
                      reads only the window it needs)

GPT and GRU decoders hold at most `max_length` (the training context, data.block_size) tokens per sequence;
the recompute decoder has no limit (max_length None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hpclm.errors import HpclmError
from hpclm.kernels.attention import DecodeAttention
from hpclm.kernels.gemm import PackedLinear


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(iter([*model.parameters(), *model.buffers()]), None)
    return (p.device, p.dtype if p.is_floating_point() else torch.float32) if p is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def recompute_logits(model, ids: list[int]) -> torch.Tensor:
    """The next token's logits [V] from a full forward over the last max-context tokens of ids."""
    device, _ = _device_dtype(model)
    context = torch.tensor(ids[-model.block_size:], dtype=torch.long, device=device)[None]
    logits, _ = model(context)
    return logits[0, -1].float()


class Decoder:
    max_length: int | None  # tokens a slot can hold; None: unbounded

    def __init__(self, model, capacity: int):
        self.model, self.capacity = model, capacity
        self.device, self.dtype = _device_dtype(model)
        self.lengths = [0] * capacity

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Append ids to the sequence in `slot` (empty after release); the next token's logits [V]."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check_room(slot, len(ids))
        logits = self._prefill(slot, ids, self.lengths[slot])
        self.lengths[slot] += len(ids)
        return logits

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append tokens[i] to the sequence in slots[i], all in one batched step; logits [len(slots), V]."""
        for s in slots:
            self._check_room(s, 1)
        logits = self._decode(slots, tokens)
        for s in slots:
            self.lengths[s] += 1
        return logits

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot`: the next prefill starts a new one."""
        self.lengths[slot] = 0

    def _check_room(self, slot: int, n: int) -> None:
        if self.max_length is not None and self.lengths[slot] + n > self.max_length:
            raise HpclmError(f"a sequence of {self.lengths[slot] + n} tokens does not fit the model's context "
                             f"window of {self.max_length}")

    def _tokens(self, ids) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)


def _fast(linear):
    """A float Linear packed for hpclm's inference matmul (a copy of its weight); a quantized one (QuantLinear)
    runs its own kernel already."""
    return PackedLinear(linear) if isinstance(linear, torch.nn.Linear) else linear


class _PackedBlock:
    """A transformer block's matrices ready for hpclm's inference matmuls."""

    def __init__(self, block):
        self.ln_1, self.ln_2, self.gelu = block.ln_1, block.ln_2, block.mlp.gelu
        self.qkv, self.attn_out = _fast(block.attn.c_attn), _fast(block.attn.c_proj)
        self.fc, self.mlp_out = _fast(block.mlp.c_fc), _fast(block.mlp.c_proj)

    def mlp(self, x):
        return self.mlp_out(self.gelu(self.fc(x)))


class GPTDecoder(Decoder):
    """Matrices through hpclm's packed float32 matmul and a decoding step's attention through hpclm's kernel
    where they serve (both batch-invariant: a sequence's logits are the same whatever else is in the batch),
    else torch's."""

    def __init__(self, model, capacity: int):
        super().__init__(model, capacity)
        self.blocks = [_PackedBlock(b) for b in model.transformer.h]
        self.lm_head = _fast(model.lm_head)
        attn = model.transformer.h[0].attn
        self.n_head, self.n_embd = attn.n_head, attn.n_embd
        self.max_length = model.block_size
        shape = (len(model.transformer.h), capacity, self.n_head, self.max_length, self.n_embd // self.n_head)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, H, T, C / H]
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, -1).transpose(1, 2)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:  # [B, H, T, C / H] -> [B, T, C]
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.n_embd)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.transformer.ln_f(x)).float()

    @torch.no_grad()
    def _prefill(self, slot, ids, start):
        t = self.model.transformer
        n, end = len(ids), start + len(ids)
        x = t.wte(self._tokens(ids))[None] + t.wpe(torch.arange(start, end, device=self.device))
        # query i (position start + i) sees the cached positions 0..start + i
        mask = None if start == 0 else (torch.arange(end, device=self.device)[None, :]
                                        <= torch.arange(start, end, device=self.device)[:, None])
        for layer, block in enumerate(self.blocks):
            q, k, v = (self._heads(z) for z in block.qkv(block.ln_1(x)).split(self.n_embd, dim=2))
            self.keys[layer, slot, :, start:end] = k[0]
            self.values[layer, slot, :, start:end] = v[0]
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, self.keys[layer, slot:slot + 1, :, :end],
                                                   self.values[layer, slot:slot + 1, :, :end], attn_mask=mask)
            x = x + block.attn_out(self._merge(y))
            x = x + block.mlp(block.ln_2(x))
        return self._logits(x[:, -1])[0]

    @torch.no_grad()
    def _decode(self, slots, tokens):
        t = self.model.transformer
        positions = [self.lengths[s] for s in slots]
        x = t.wte(self._tokens(tokens)) + t.wpe(self._tokens(positions))  # [B, C]: one token per sequence
        attend = DecodeAttention(slots, positions, self.n_head, self.keys.shape[1:], self.device)
        for layer, block in enumerate(self.blocks):
            y = attend(block.qkv(block.ln_1(x)), self.keys[layer], self.values[layer])
            x = x + block.attn_out(y)
            x = x + block.mlp(block.ln_2(x))
        return self._logits(x)


class GRUDecoder(Decoder):
    def __init__(self, model, capacity: int):
        super().__init__(model, capacity)
        self.max_length = model.block_size
        gru = model.gru
        self.hidden = torch.zeros(gru.num_layers, capacity, gru.hidden_size, device=self.device, dtype=self.dtype)

    def release(self, slot):
        super().release(slot)
        self.hidden[:, slot] = 0

    @torch.no_grad()
    def _prefill(self, slot, ids, start):
        out, h = self.model.gru(self.model.embedding(self._tokens(ids))[None],
                                self.hidden[:, slot:slot + 1].contiguous())
        self.hidden[:, slot] = h[:, 0]
        return self.model.head(out[0, -1]).float()

    @torch.no_grad()
    def _decode(self, slots, tokens):
        rows = self._tokens(slots)
        out, h = self.model.gru(self.model.embedding(self._tokens(tokens))[:, None],
                                self.hidden[:, rows].contiguous())
        self.hidden[:, rows] = h
        return self.model.head(out[:, 0]).float()


class RecomputeDecoder(Decoder):
    max_length = None

    def __init__(self, model, capacity: int):
        super().__init__(model, capacity)
        self.history: list[list[int]] = [[] for _ in range(capacity)]

    def release(self, slot):
        super().release(slot)
        self.history[slot] = []

    def _prefill(self, slot, ids, start):
        self.history[slot] += list(ids)
        return recompute_logits(self.model, self.history[slot])

    def _decode(self, slots, tokens):
        for s, tok in zip(slots, tokens):
            self.history[s].append(tok)
        return torch.stack([recompute_logits(self.model, self.history[s]) for s in slots])


def make_decoder(model, capacity: int) -> Decoder:
    """The incremental decoder of this model's arch, with room for `capacity` sequences."""
    from hpclm.models import GPT, GRULM
    kind = GPTDecoder if isinstance(model, GPT) else GRUDecoder if isinstance(model, GRULM) else RecomputeDecoder
    return kind(model, capacity)
