"""Weight quantization (int8 per channel, int8 or int4 per block of 32) and the matmul over it.

    from hpclm.kernels.quant import QuantLinear, quantize_weight
    q = QuantLinear.from_linear(model.fc, "int8-block32")    # a drop-in for the nn.Linear
    y = q(x)                                                   # [..., in] -> [..., out]

Schemes, all symmetric, one scale per group of weights (float32 per channel, float16 per block):
  int8-channel  q in -127..127, w = q * scale[n]              (scale per output channel)
  int8-block32  q in -127..127, w = q * scale[n, k // 32]      (Q8_0-like)
  int4-block32  q in 0..15,     w = (q - 8) * scale[n, k // 32] (Q4_0-like: the block's largest-magnitude
                weight maps to -8 exactly; two weights a byte, k even in the low nibble)

The input is quantized too (scale = max |x| / 127), so products sum exactly in int32 (`quantize_activations`
says how): for the block schemes each row's blocks of 32, as llama.cpp does; for int8-channel each row whole,
as torch.ao's dynamic quantization does (one scale a tensor there), and the row's whole dot in int32.
`hpclm::quant_linear` is a torch custom op (fake impl for torch.compile): on CPU float32/bfloat16 inputs it
runs hpclm._C's quant_matmul (weights never widened to float32); elsewhere (no build, a CUDA or float16
tensor) it dequantizes both sides and calls F.linear, and says why once (`quant_available`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from hpclm import native

log = logging.getLogger("hpclm.ops")

SCHEMES = ("int8-channel", "int8-block32", "int4-block32")
BLOCK = 32  # K elements per scale in the block schemes (csrc/quant/quant_matmul.h: kQuantBlock)
CHANNEL_MAX_K = 1 << 17  # int8-channel's longest row for the kernel: 127^2 K < 2^31 (kQuantChannelMaxK)
PANEL = 16  # output columns per packed panel (kQuantPanel)
_KERNEL_X_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


# ---- quantize / dequantize (the canonical layout a checkpoint stores) ----------------------------

def _blocks(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / 32), 32], the tail block zero-padded."""
    n, k = w.shape
    pad = -k % BLOCK
    return F.pad(w, (0, pad)).view(n, (k + pad) // BLOCK, BLOCK)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a [N, K] weight: int8 [N, K] or, for int4, uint8 [N, ceil(K / 2)]; scales float32 [N]
    (int8-channel) or float16 [N, ceil(K / 32)] (the block schemes)."""
    _check_scheme(scheme)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight takes a [out, in] matrix, not shape {list(w.shape)}")
    w = w.detach().to(torch.float32, copy=False).cpu()
    n, k = w.shape
    if scheme == "int8-channel":
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127)
        return q.to(torch.int8), scale
    blocks = _blocks(w)
    if scheme == "int8-block32":
        scale = _half(blocks.abs().amax(dim=2) / 127)
        q = torch.round(blocks / torch.where(scale > 0, scale, 1)[..., None]).clamp_(-127, 127)
        return q.view(n, -1)[:, :k].to(torch.int8).contiguous(), scale.half()
    # int4: scale = (the block's largest-magnitude weight) / -8, so that weight is exactly -8 * scale
    idx = blocks.abs().argmax(dim=2, keepdim=True)
    scale = _half((blocks.gather(2, idx) / -8).squeeze(2))
    q = torch.round(blocks / torch.where(scale != 0, scale, 1)[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    q = q.view(n, -1)[:, :k]
    if k % 2:
        q = F.pad(q, (0, 1), value=8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.half()


def _half(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as float16 values (stored so, as llama.cpp's are), in float32, within float16's range."""
    return scale.clamp(-65504, 65504).half().float()


def _int4_values(q: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K / 2)] -> the nibbles 0..15 as uint8 [N, K]."""
    both = torch.stack([q & 0x0F, q >> 4], dim=2)
    return both.view(q.shape[0], -1)[:, :in_features]


@torch.no_grad()
def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, scheme: str, in_features: int) -> torch.Tensor:
    """The float32 [N, K] matrix (q, scales) stands for (w = q * scale, int4: (q - 8) * scale)."""
    _check_scheme(scheme)
    scales = scales.to(torch.float32)
    if scheme == "int8-channel":
        return q.to(torch.float32) * scales[:, None]
    values = _int4_values(q, in_features).to(torch.float32) - 8 if scheme == "int4-block32" else q.to(torch.float32)
    per_weight = scales.repeat_interleave(BLOCK, dim=1)[:, :in_features]
    return values * per_weight


# ---- the kernel's packed layout ----------------------------------------------------------------

def pack(q: torch.Tensor, scales: torch.Tensor, scheme: str, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (q, scales) in quant_matmul's panel layout (csrc/quant/quant_matmul.h): K padded to whole
    blocks and N to whole panels with zero weights, groups of 4 consecutive k per column."""
    n, k = q.shape[0], in_features
    panels, kpad = -(-n // PANEL), -(-k // BLOCK) * BLOCK
    pad_n, pad_k, groups = panels * PANEL - n, kpad - k, kpad // 4
    if scheme == "int4-block32":
        nib = F.pad(_int4_values(q, k), (0, pad_k, 0, pad_n), value=8)          # 8: a zero weight
        v = nib.view(panels, 2, PANEL // 2, groups, 4).permute(0, 3, 1, 2, 4).reshape(panels, groups, 2, 32)
        weights = (v[..., :16] | (v[..., 16:] << 4)).contiguous()              # [P, G, 2 halves, 16 bytes]
    else:
        w = F.pad(q, (0, pad_k, 0, pad_n)).view(panels, PANEL, groups, 4)
        weights = w.permute(0, 2, 1, 3).contiguous().view(torch.uint8)       # [P, G, 16 columns, 4 k]
    if scheme == "int8-channel":
        packed_scales = F.pad(scales.to(torch.float32), (0, pad_n)).contiguous()
    else:  # float16, as stored: half the bytes a decoding step reads for them
        packed_scales = F.pad(scales.to(torch.float16), (0, 0, 0, pad_n)).view(panels, PANEL, -1)
        packed_scales = packed_scales.transpose(1, 2).contiguous()
    return weights, packed_scales


@torch.no_grad()
def quantize_activations(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What quant_matmul does to its input under `scheme`: in int8 (scale = max |x| / 127, round half to even)
    each row's blocks of 32 (the block schemes) or each row whole (int8-channel), as (q [..., K] float32 values,
    scales [..., ceil(K / 32)] or [..., 1] float32)."""
    _check_scheme(scheme)
    x = x.to(torch.float32)
    k = x.shape[-1]
    groups = x.unsqueeze(-2) if scheme == "int8-channel" else F.pad(x, (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))
    amax = groups.abs().amax(dim=-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round((groups * inv[..., None]).clamp(-127, 127))
    return q.flatten(-2)[..., :k], amax / torch.tensor(127.0)


def dequantize_activations(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """x as quant_matmul sees it under `scheme` (float32): quantize_activations, then back."""
    q, scales = quantize_activations(x, scheme)
    return q * (scales if scheme == "int8-channel" else scales.repeat_interleave(BLOCK, dim=-1)[..., :x.shape[-1]])


# ---- the gate ----------------------------------------------------------------------------------

def _unavailable_reason(x: torch.Tensor) -> Optional[str]:
    if x.is_cpu and x.dtype in _KERNEL_X_DTYPES and _kernel_built():  # the common case first: every call asks
        return None
    ext = native.extension()
    if ext is None:
        return native.load_error() or "hpclm._C is not built"
    if not hasattr(ext, "quant_matmul"):
        return "this build of hpclm._C has no quant_matmul"
    if not x.is_cpu:
        return f"quant_matmul runs on the CPU; this input is on {x.device}"
    if x.dtype not in _KERNEL_X_DTYPES:
        return f"quant_matmul takes float32 or bfloat16 inputs, not {x.dtype}"
    return None


def _kernel_built() -> bool:
    """Whether hpclm._C has quant_matmul (the rest of the gate is about the input)."""
    global _BUILT
    if _BUILT is None:
        ext = native.extension()
        _BUILT = ext is not None and hasattr(ext, "quant_matmul")
    return _BUILT


_BUILT: Optional[bool] = None


def quant_available(x: torch.Tensor) -> tuple[bool, str]:
    """(whether hpclm's quant_matmul kernel serves this input, why not)."""
    reason = _unavailable_reason(x)
    return reason is None, reason or ""


_logged_fallbacks: set = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        log.warning("quant_linear: %s; dequantizing and computing it with torch ops instead", reason)


def _shape_reason(scheme: str, in_features: int) -> Optional[str]:
    if scheme == "int8-channel" and in_features > CHANNEL_MAX_K:
        return (f"int8-channel rows of {in_features} inputs could leave the kernel's int32 sums (up to "
                f"{CHANNEL_MAX_K}; a block scheme has no limit)")
    return None


def _torch_quant_linear(x, q, scales, bias, scheme):
    w = dequantize_weight(q, scales, scheme, x.shape[-1]).to(x.device)
    y = F.linear(dequantize_activations(x, scheme), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


class _KernelCall:
    """What quant_matmul needs besides the input, computed once per packed weight and bias: the buffers'
    addresses (the tensors held here, so the memory stays), the bias as float32 (the bias itself when it is
    float32 already, so changes made in place show) and the shape. `bias_source` is the address of the bias
    it was made from: a bias whose memory was replaced (`.data = `, `.to()`) needs a new one."""
    __slots__ = ("weights", "scales", "bias", "bias_source", "weights_ptr", "scales_ptr", "bias_ptr",
                 "out_features", "scheme", "kernel", "fits")

    def __init__(self, packed_weights, packed_scales, bias, scheme, out_features, in_features):
        self.weights, self.scales = packed_weights, packed_scales
        self.fits = _shape_reason(scheme, in_features) is None  # else the kernel refuses: the torch path serves
        self.bias_source = _address(bias)
        if bias is not None:
            bias = bias.detach()
            if bias.dtype != torch.float32 or not bias.is_contiguous() or bias.device.type != "cpu":
                bias = bias.to("cpu", torch.float32).contiguous()
        self.bias = bias
        self.weights_ptr, self.scales_ptr = packed_weights.data_ptr(), packed_scales.data_ptr()
        self.bias_ptr = 0 if bias is None else bias.data_ptr()
        self.out_features, self.scheme = out_features, scheme
        self.kernel = native.require().quant_matmul

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y for an input the gate (_unavailable_reason) let through."""
        shape, dtype = x.shape, x.dtype
        k, n = shape[-1], self.out_features
        if len(shape) == 2:  # rows may have a longer stride than K
            m, ldx = shape[0], x.stride(0)
            if x.stride(1) != 1 or (m > 1 and ldx < k):
                x, ldx = x.contiguous(), k
            y = torch.empty(m, n)
        else:  # any other rank, as one [rows, K] block (no reshape and view: they cost more than small matrices)
            if not x.is_contiguous():
                x = x.contiguous()
            m, ldx = x.numel() // k, k
            y = torch.empty(*shape[:-1], n)
        self.kernel(x.data_ptr(), _KERNEL_X_DTYPES[dtype], self.weights_ptr, self.scales_ptr, self.bias_ptr,
                    y.data_ptr(), m, n, k, max(ldx, 1), n, self.scheme, torch.get_num_threads())
        return y if dtype is torch.float32 else y.to(dtype)


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _quant_linear(x, q, scales, packed_weights, packed_scales, bias, scheme):
    out_features = q.shape[0]
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    reason = _unavailable_reason(x) or _shape_reason(scheme, x.shape[-1])
    if reason is None:
        return _KernelCall(packed_weights, packed_scales, bias, scheme, out_features, x.shape[-1])(x)
    _log_fallback_once(reason)
    return _torch_quant_linear(x, q, scales, bias, scheme)


@torch.library.custom_op("hpclm::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, packed_weights: torch.Tensor,
                     packed_scales: torch.Tensor, bias: Optional[torch.Tensor], scheme: str) -> torch.Tensor:
    return _quant_linear(x, q, scales, packed_weights, packed_scales, bias, scheme)


@_quant_linear_op.register_fake
def _(x, q, scales, packed_weights, packed_scales, bias, scheme):
    return x.new_empty(*x.shape[:-1], q.shape[0])


# ---- the module --------------------------------------------------------------------------------

class QuantLinear(torch.nn.Module):
    """y = x @ dequant(W)^T + bias for a quantized [out, in] weight. Its state_dict holds the canonical
    `qweight` and `scales` (and `bias`); the kernel's packed copies are rebuilt on load, never saved."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool = True):
        super().__init__()
        _check_scheme(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        if scheme == "int4-block32":
            qshape, qdtype = (out_features, -(-in_features // 2)), torch.uint8
        else:
            qshape, qdtype = (out_features, in_features), torch.int8
        if scheme == "int8-channel":
            sshape, sdtype = (out_features,), torch.float32
        else:
            sshape, sdtype = (out_features, -(-in_features // BLOCK)), torch.float16
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype))
        self.register_buffer("scales", torch.zeros(sshape, dtype=sdtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed = None
        self._call = None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str) -> "QuantLinear":
        module = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None)
        module.set_weight(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module

    def set_weight(self, weight: torch.Tensor) -> None:
        q, scales = quantize_weight(weight, self.scheme)
        self.qweight.copy_(q)
        self.scales.copy_(scales)
        self._packed = self._call = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = self._call = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None:
            self._packed = pack(self.qweight, self.scales, self.scheme, self.in_features)
        return self._packed

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.scheme, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.hpclm.quant_linear(x, self.qweight, self.scales, *self.packed(), self.bias, self.scheme)
        # eager: the op's own body, without torch.library's dispatch (tens of microseconds a call), and with the
        # kernel's arguments prepared once (again when the weights are set or loaded, or the bias's memory is
        # replaced); a decoding step makes one call per matrix, so this path reads no module attribute twice
        call, bias = self._call, self._parameters.get("bias")
        if call is None or call.bias_source != _address(bias):
            call = self._call = _KernelCall(*self.packed(), bias, self.scheme, self.out_features, self.in_features)
        if call.fits and x.numel() and _unavailable_reason(x) is None:
            return call(x)
        return _quant_linear(x, self.qweight, self.scales, *self.packed(), bias, self.scheme)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
