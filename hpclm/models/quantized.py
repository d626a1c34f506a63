"""Weight-quantized inference forms of the trained models (hpclm quantize writes them, load_trained reads them).

GPT: every Linear becomes a QuantLinear, the LM head included; the input embedding stays tied to it: it reads
its rows from the head's quantized matrix, so the tied matrix is stored once, quantized. GRU: the GRU's input
and hidden matrices of every layer and the output head. LayerNorms, biases and the position embedding (and
the GRU's input embedding) stay float32. The n-gram and HMM models have no matrices to quantize.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hpclm.errors import HpclmError
from hpclm.kernels.quant import SCHEMES, QuantLinear, dequantize_weight
from hpclm.models.gpt import GPT
from hpclm.models.gru import GRULM


class TiedQuantEmbedding(nn.Module):
    """An embedding whose rows are those of a QuantLinear's [vocab, dim] matrix, dequantized on lookup."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: its tensors are saved once, under the head's name

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = dequantize_weight(self.head.qweight[flat], self.head.scales[flat], self.head.scheme,
                                 self.head.in_features)
        return rows.view(*idx.shape, self.head.in_features)


class QuantGRU(nn.Module):
    """nn.GRU's computation (batch_first, gates r, z, n) over quantized input and hidden matrices, for inference:
    out, h_n = gru(x [B, T, in], h_0 [layers, B, hidden] or None)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, scheme: str):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(ih=QuantLinear(input_size if i == 0 else hidden_size, 3 * hidden_size, scheme, bias),
                               hh=QuantLinear(hidden_size, 3 * hidden_size, scheme, bias)))
            for i in range(num_layers))

    @classmethod
    def from_gru(cls, gru: nn.GRU, scheme: str) -> "QuantGRU":
        if not gru.batch_first or gru.bidirectional or gru.proj_size:
            raise HpclmError("only a batch_first, one-directional GRU without projections quantizes")
        q = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, scheme)
        for i, layer in enumerate(q.layers):
            for kind in ("ih", "hh"):
                layer[kind].set_weight(getattr(gru, f"weight_{kind}_l{i}"))
                if gru.bias:
                    layer[kind].bias.data.copy_(getattr(gru, f"bias_{kind}_l{i}").detach().float())
        return q

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        B, T, _ = x.shape
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, B, self.hidden_size)
        last = []
        for i, layer in enumerate(self.layers):
            gx = layer["ih"](x)  # every step's input projection at once: [B, T, 3 hidden]
            h, outs = h0[i], []
            for t in range(T):
                xr, xz, xn = gx[:, t].chunk(3, dim=-1)
                hr, hz, hn = layer["hh"](h).chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
                outs.append(h)
            x = torch.stack(outs, dim=1)
            last.append(h)
        return x, torch.stack(last)


def quantizable(model: nn.Module) -> str | None:
    """None when `model` quantizes, else why not."""
    if isinstance(model, (GPT, GRULM)):
        return None
    return f"a {type(model).__name__} model has no matrices to quantize (gpt and gru do)"


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """`model` with its matrices replaced by QuantLinear (in place; returned)."""
    if scheme not in SCHEMES:
        raise HpclmError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    problem = quantizable(model)
    if problem:
        raise HpclmError(problem)
    if isinstance(model, GPT):
        for block in model.transformer.h:
            block.attn.c_attn = QuantLinear.from_linear(block.attn.c_attn, scheme)
            block.attn.c_proj = QuantLinear.from_linear(block.attn.c_proj, scheme)
            block.mlp.c_fc = QuantLinear.from_linear(block.mlp.c_fc, scheme)
            block.mlp.c_proj = QuantLinear.from_linear(block.mlp.c_proj, scheme)
        model.lm_head = QuantLinear.from_linear(model.lm_head, scheme)
        model.transformer.wte = TiedQuantEmbedding(model.lm_head)
    else:
        model.gru = QuantGRU.from_gru(model.gru, scheme)
        model.head = QuantLinear.from_linear(model.head, scheme)
    return model
