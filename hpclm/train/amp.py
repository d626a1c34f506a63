"""Mixed precision: autocast per precision.dtype, and FP16 dynamic loss scaling (Megatron-LM's rule,
with hysteresis) agreed across ranks; fp32 and bf16 use NoLossScaler, which has the same interface.

    scaler = DynamicLossScaler()
    scaler.scale_loss(loss).backward()
    optimizer.synchronize()                      # Horovod: gradients are averaged now
    finite = scaler.unscale_and_check(params)    # False: a gradient is inf/nan on some rank
    if finite:
        with optimizer.skip_synchronize():
            optimizer.step()
    scaler.update(finite)

The scale starts at `init_scale`, doubles after `growth_interval` clean steps, and halves once
`hysteresis` overflows have been seen since the last growth, never below `min_scale`. With
hysteresis=1 its decisions are those of torch.amp.GradScaler. Overflows that persist at the
minimum scale for `max_consecutive_skips` steps stop training with LossScaleError.
"""
from __future__ import annotations

import contextlib

import torch

from hpclm.comm import dist
from hpclm.errors import HpclmError


class LossScaleError(HpclmError):
    """FP16 training cannot continue: gradients overflow even at the minimum loss scale."""


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2, min_scale: float = 1.0,
                 max_consecutive_skips: int = 50):
        if not (init_scale > 0 and min_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError("loss scaler needs init_scale > 0, min_scale > 0, growth_factor > 1, "
                             f"0 < backoff_factor < 1 (got {init_scale}, {min_scale}, {growth_factor}, {backoff_factor})")
        if growth_interval < 1 or hysteresis < 1 or max_consecutive_skips < 1:
            raise ValueError("loss scaler needs growth_interval, hysteresis and max_consecutive_skips >= 1 "
                             f"(got {growth_interval}, {hysteresis}, {max_consecutive_skips})")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.min_scale = float(min_scale)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.growth_tracker = 0
        self.hysteresis_tracker = self.hysteresis
        self.skipped_steps = 0
        self.consecutive_skips_at_min = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_and_check(self, params) -> bool:
        """Divide every gradient by the scale in place; True when every gradient on every rank is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        inv = 1.0 / self.scale
        local_overflow = False
        for g in grads:
            g.mul_(inv)
        if grads:
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            local_overflow = not bool(finite)
        flag = torch.tensor([1.0 if local_overflow else 0.0])
        return not dist.allreduce(flag, "max").item() > 0

    def update(self, finite: bool) -> None:
        """Adjust the scale after a step; raises LossScaleError when overflows persist at min_scale."""
        if not finite:
            self.skipped_steps += 1
            self.growth_tracker = 0
            at_min_before = self.scale <= self.min_scale
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.consecutive_skips_at_min = self.consecutive_skips_at_min + 1 if at_min_before else 0
            if self.consecutive_skips_at_min >= self.max_consecutive_skips:
                raise LossScaleError(
                    f"fp16 gradients overflowed for {self.consecutive_skips_at_min} consecutive steps at the minimum "
                    f"loss scale {self.min_scale:g}: the run diverged or fp16 cannot represent it; resume from the "
                    "last checkpoint with a lower optim.lr, or precision.dtype=bf16 or fp32")
        else:
            self.consecutive_skips_at_min = 0
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"kind": "dynamic", "scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker, "skipped_steps": self.skipped_steps,
                "consecutive_skips_at_min": self.consecutive_skips_at_min}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips_at_min = int(state["consecutive_skips_at_min"])


class NoLossScaler:
    """fp32/bf16: nothing to scale (DynamicLossScaler's interface)."""

    scale = 1.0
    skipped_steps = 0

    def scale_loss(self, loss):
        return loss

    def unscale_and_check(self, params) -> bool:
        return True

    def update(self, finite: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "none", "scale": 1.0, "skipped_steps": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_loss_scaler(p):
    """DynamicLossScaler for precision.dtype fp16 (settings from the [precision] section), else NoLossScaler."""
    if p.dtype == "fp16":
        return DynamicLossScaler(init_scale=p.init_scale, growth_interval=p.growth_interval, hysteresis=p.hysteresis,
                                 min_scale=p.min_scale, max_consecutive_skips=p.max_consecutive_skips)
    return NoLossScaler()


def autocast(p, device: torch.device):
    """torch.autocast to bf16 or fp16 on `device` for those precisions; a no-op context for fp32."""
    if p.dtype in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if p.dtype == "bf16" else torch.float16)
    return contextlib.nullcontext()


# The CPU instructions that compute in each half precision (without them torch converts around every op).
CPU_HALF_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_computes(dtype: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has instructions that compute in `dtype` (bf16, fp16); True where unknown."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or any(flag in flags for flag in CPU_HALF_FLAGS[dtype])
