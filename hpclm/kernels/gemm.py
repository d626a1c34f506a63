"""Inference matmul over hpclm._C's gemm_packed: a Linear's weight packed once into column panels, then
y = x @ W^T + b for any number of rows, each row's result independent of the others (batch-invariant).

    from hpclm.kernels.gemm import PackedLinear, gemm_available
    fast = PackedLinear(model.lm_head)          # packs a copy of the weight
    y = fast(x)                                 # [..., in] float32 CPU -> [..., out]

Where the kernel cannot serve (no build, a CUDA or non-float32 tensor), PackedLinear computes F.linear
with the original weight; `gemm_available(t)` says which will run, with the reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hpclm import native


def gemm_available(weight: torch.Tensor) -> tuple[bool, str]:
    """(whether gemm_packed serves this weight, why not)."""
    ext = native.extension()
    if ext is None or not hasattr(ext, "gemm_packed"):
        return False, native.load_error() or "this build of hpclm._C has no gemm_packed"
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False, f"gemm_packed takes float32 CPU weights, not {weight.dtype} on {weight.device}"
    return True, ""


class PackedLinear:
    def __init__(self, linear: torch.nn.Linear):
        self.weight, self.bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        self.out_features, self.in_features = self.weight.shape
        self.packed, _ = gemm_available(self.weight)
        if self.packed:
            ext = native.extension()
            width = ext.GEMM_PANEL
            n = -(-self.out_features // width) * width
            padded = F.pad(self.weight, (0, 0, 0, n - self.out_features))
            # [N, K] -> [N / width, K, width]: one panel's columns side by side for every k
            self.panels = padded.view(n // width, width, self.in_features).transpose(1, 2).contiguous()
            self.bias_c = None if self.bias is None else self.bias.contiguous()
            self.ext = ext

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = torch.empty(rows.shape[0], self.out_features)
        self.ext.gemm_packed(rows.data_ptr(), self.panels.data_ptr(), 0 if self.bias_c is None else self.bias_c.data_ptr(),
                             y.data_ptr(), rows.shape[0], self.out_features, self.in_features, rows.stride(0),
                             self.out_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)
