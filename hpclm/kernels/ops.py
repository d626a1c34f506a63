"""Torch-facing fused ops backed by hpclm._C.

    from hpclm.ops import fused_softmax
    probs = fused_softmax(scores, scale=1 / math.sqrt(d), causal=True)   # [b, h, t, t]

`fused_softmax` is a `torch.library` custom op (``hpclm::fused_softmax``, backward
``hpclm::fused_softmax_backward``) with fake implementations, so autograd and
`torch.compile(fullgraph=True)` go through it. Where no compiled kernel serves an input
(`fused_softmax_available` is False: e.g. a CUDA tensor in a build without CUDA), the same
result is computed with torch ops and the reason is logged once.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from hpclm import native

log = logging.getLogger("hpclm.ops")  # the public name users configure

__all__ = ["fused_softmax", "fused_softmax_available"]

# torch dtype -> dtype name of the C++ kernels (csrc/common/dtype.h)
_KERNEL_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                  torch.bfloat16: "bfloat16"}


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} tensor of shape {list(t.shape)} on {t.device}"


def _check_inputs(x, scale, mask, causal) -> float:
    """ValueError naming the shapes for input the op cannot take; returns scale as a float."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"fused_softmax: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"fused_softmax: x is a {_describe(x)}; it must be float32, float16, bfloat16 or float64")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fused_softmax: x is a {_describe(x)}; softmax needs a non-empty last dimension")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"fused_softmax: scale must be a number, got {type(scale).__name__}") from None
    if not math.isfinite(scale):
        raise ValueError(f"fused_softmax: scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise ValueError(f"fused_softmax: causal must be True or False, got {causal!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"fused_softmax: mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"fused_softmax: mask is a {_describe(mask)}; it must be bool, True = masked: for a "
                             "keep-mask (1 = attend, e.g. nanoGPT's tril buffer) pass `mask == 0`")
        if mask.device != x.device:
            raise ValueError(f"fused_softmax: mask is on {mask.device} but x is on {x.device} "
                             f"(mask shape {list(mask.shape)}, x shape {list(x.shape)}); move one of them")
        if not _broadcasts_to(mask.shape, x.shape):
            raise ValueError(f"fused_softmax: mask of shape {list(mask.shape)} does not broadcast to x of shape "
                             f"{list(x.shape)}; use e.g. [b, 1, sq, sk], [1, 1, sq, sk] or [b, 1, 1, sk]")
    return scale


def _broadcasts_to(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(m in (1, t) for m, t in zip(reversed(shape), reversed(target)))


def fused_softmax(x: torch.Tensor, scale: float = 1.0, mask: Optional[torch.Tensor] = None,
                  causal: bool = False) -> torch.Tensor:
    """softmax(scale * x) over the last dimension with masked keys excluded.

    x: [..., sq, sk] float32/float16/bfloat16 (float64 on CPU). mask: bool, broadcastable to x,
    True = masked. causal: key j is masked for query i when j > i + sk - sq (bottom-right aligned).
    A row whose keys are all masked is all zeros (and gets zero gradient). Differentiable in x.
    Under torch.autocast float32 x is cast to the autocast dtype first, so the result has that dtype
    (as apex's and Megatron-LM's fused softmax return it); other dtypes are used as they are.
    """
    scale = _check_inputs(x, scale, mask, causal)
    device = x.device.type
    if x.dtype == torch.float32 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    return torch.ops.hpclm.fused_softmax(x, scale, mask, causal)


# ---- the gate -------------------------------------------------------------------------------

def _unavailable_reason(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Optional[str]:
    ext = native.extension()
    if ext is None:
        return native.load_error()
    if x.dtype not in _KERNEL_DTYPES:
        return f"no kernel for dtype {x.dtype}"
    if mask is not None and (mask.dtype != torch.bool or mask.device != x.device):
        return f"mask must be a bool tensor on {x.device}"
    if x.device.type == "cpu":
        return None
    if x.device.type == "cuda":
        if not hasattr(ext, "softmax_forward_cuda"):
            return "hpclm._C was built without CUDA (nvcc not found at build time, or HPCLM_CUDA=0)"
        return None
    return f"no kernel for device type '{x.device.type}'"


def fused_softmax_available(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """True when a compiled hpclm kernel computes fused_softmax for this input (else the torch path does)."""
    return _unavailable_reason(x, mask) is None


_logged_fallbacks: set = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        log.warning("fused_softmax: %s; computing it with torch ops instead (same result, slower)", reason)


# ---- the torch path (fallback and reference): same semantics, more passes ----------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_positions(shape, mask: Optional[torch.Tensor], causal: bool, device) -> Optional[torch.Tensor]:
    """The bool mask (broadcastable to `shape`) that fused_softmax applies, or None for no mask."""
    masked = mask
    if causal:
        sq = shape[-2] if len(shape) > 1 else 1
        sk = shape[-1]
        tri = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        if len(shape) == 1:
            tri = tri[0]
        masked = tri if masked is None else masked | tri
    return masked


def _torch_forward(x, scale, mask, causal):
    s = x.to(_acc_dtype(x.dtype)) * scale
    masked = _masked_positions(x.shape, mask, causal, x.device)
    if masked is None:
        return torch.softmax(s, -1).to(x.dtype)
    y = torch.softmax(s.masked_fill(masked, float("-inf")), -1)
    return y.masked_fill(masked, 0.0).to(x.dtype)  # rows with every key masked: zeros, not NaN


def _torch_backward(y, dy, scale):
    acc = _acc_dtype(y.dtype)
    y32, dy32 = y.to(acc), dy.to(acc)
    return (scale * y32 * (dy32 - (dy32 * y32).sum(-1, keepdim=True))).to(y.dtype)


# ---- the kernels ------------------------------------------------------------------------------

def _fold_leading(sizes, strides):
    """Merge adjacent leading dims whose strides allow it: [(size, stride), ...] without size-1 dims."""
    out = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == stride * size:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def _kernel_layout(shape, mask: Optional[torch.Tensor]):
    """x viewed as [batch0, batch1, sq, sk] and the mask as (tensor, strides over batch0, batch1, sq).

    The mask is read in place through broadcast strides (stride 0 on broadcast dims); it is
    copied only when its keys are not contiguous or its leading dims do not fold into two.
    """
    sq, sk = (shape[-2], shape[-1]) if len(shape) > 1 else (1, shape[-1])
    lead = list(shape[:-2])
    if mask is None:
        return [math.prod(lead), 1, sq, sk], None, []
    if mask.dim() == 0:
        mask = mask.reshape(1)
    if mask.shape[-1] != sk or (sk > 1 and mask.stride(-1) != 1):
        mask = mask.expand(*mask.shape[:-1], sk).contiguous()
    full = mask.expand(*lead, sq, sk) if len(shape) > 1 else mask.expand(sk).view(1, sk)
    folded = _fold_leading(lead, full.stride()[:-2])
    if len(folded) > 2:  # exotic broadcast pattern: one dense copy of the mask
        full = full.contiguous()
        folded = _fold_leading(lead, full.stride()[:-2])
    folded = [(1, 0)] * (2 - len(folded)) + folded
    (b0, s0), (b1, s1) = folded
    return [b0, b1, sq, sk], full, [s0, s1, full.stride(-2) if sq > 1 else 0]


def _native_forward(x, scale, mask, causal):
    ext = native.require()
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    shape4, mask_view, strides = _kernel_layout(x.shape, mask)
    mask_ptr = mask_view.data_ptr() if mask_view is not None else 0
    args = (x.data_ptr(), y.data_ptr(), _KERNEL_DTYPES[x.dtype], shape4, scale, mask_ptr, strides, causal)
    if x.device.type == "cuda":
        ext.softmax_forward_cuda(*args, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        ext.softmax_forward(*args, torch.get_num_threads())
    return y


def _native_backward(y, dy, scale, causal):
    ext = native.require()
    y, dy = y.contiguous(), dy.to(y.dtype).contiguous()
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    shape4, _, _ = _kernel_layout(y.shape, None)
    args = (y.data_ptr(), dy.data_ptr(), dx.data_ptr(), _KERNEL_DTYPES[y.dtype], shape4, scale, causal)
    if y.device.type == "cuda":
        ext.softmax_backward_cuda(*args, y.device.index, torch.cuda.current_stream(y.device).cuda_stream)
    else:
        ext.softmax_backward(*args, torch.get_num_threads())
    return dx


# ---- registration with torch.library ------------------------------------------------------------

@torch.library.custom_op("hpclm::fused_softmax", mutates_args=())
def _fused_softmax_op(x: torch.Tensor, scale: float, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    reason = _unavailable_reason(x, mask)
    if reason is None:
        return _native_forward(x, scale, mask, causal)
    _log_fallback_once(reason)
    return _torch_forward(x, scale, mask, causal)


@_fused_softmax_op.register_fake
def _(x, scale, mask, causal):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("hpclm::fused_softmax_backward", mutates_args=())
def _fused_softmax_backward_op(y: torch.Tensor, dy: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty(y.shape, dtype=y.dtype, device=y.device)
    reason = _unavailable_reason(y)
    if reason is None:
        return _native_backward(y, dy, scale, causal)
    _log_fallback_once(reason)
    return _torch_backward(y, dy, scale)


@_fused_softmax_backward_op.register_fake
def _(y, dy, scale, causal):
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output):
    _, scale, _, causal = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale
    ctx.causal = causal


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return torch.ops.hpclm.fused_softmax_backward(y, dy, ctx.scale, ctx.causal), None, None, None


_fused_softmax_op.register_autograd(_backward, setup_context=_setup_context)
