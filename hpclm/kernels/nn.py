"""Drop-in torch modules backed by hpclm's fused kernels."""
from __future__ import annotations

from typing import Optional

import torch

from hpclm.kernels.ops import fused_softmax


class FusedScaleMaskSoftmax(torch.nn.Module):
    """softmax(scale * x) over the last dimension with a causal and/or boolean padding mask.

        attn = FusedScaleMaskSoftmax(scale=1 / math.sqrt(head_dim), causal=True)
        probs = attn(scores)                    # scores: [b, h, sq, sk]
        probs = attn(scores, mask=padding)      # padding: bool, e.g. [b, 1, 1, sk], True = masked

    Same semantics as hpclm.ops.fused_softmax (rows with every key masked give zeros).
    """

    def __init__(self, scale: float = 1.0, causal: bool = False):
        super().__init__()
        self.scale = float(scale)
        self.causal = bool(causal)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_softmax(x, self.scale, mask, self.causal)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, causal={self.causal}"
