"""Torch-facing kernels: `ops` (custom ops over hpclm._C with an availability gate and a torch
fallback) and `nn` (modules built on them). Public names: hpclm.ops, hpclm.nn."""
