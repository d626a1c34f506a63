"""`hpclm bench softmax`: hpclm's fused softmax next to torch on the same inputs, in one run.

nccl-tests style: hpclm.bench.harness times and prints; a case (SoftmaxCase) only says how to
build its inputs, how many bytes an ideal kernel moves, and which calls to time. Per case:
forward and backward of fused_softmax; torch.softmax alone; the unfused torch composition
`(x*scale).masked_fill(mask, -inf).softmax(-1)` and autograd's backward of it; and a copy of
x in the same run, the memory-bandwidth ceiling. GB/s count ideal bytes: forward reads x and
the mask and writes y, backward reads y and dy and writes dx.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass

import torch

from hpclm import native
from hpclm.bench.harness import Column, best_time, check_writable, format_table, host_info, save_figure, write_json
from hpclm.errors import HpclmError
from hpclm.kernels.ops import fused_softmax, fused_softmax_available

DEFAULT_SHAPES = "48x256x256,16x1024x1024,8x2048x2048"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MASKS = ("causal", "padding")
SCALE = 0.125  # 1/sqrt(head_dim) for head_dim 64
CORRUPT_ENV = "HPCLM_BENCH_SOFTMAX_CORRUPT"  # test hook: a number added to one checked forward output value


@dataclass(frozen=True)
class SoftmaxCase:
    shape: tuple
    dtype_name: str
    mask: str  # "causal" or "padding"
    device: str

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def label(self):
        return "x".join(map(str, self.shape))

    def inputs(self, gen):
        x = torch.randn(self.shape, generator=gen).mul_(3).to(device=self.device, dtype=self.dtype)
        dy = torch.randn(self.shape, generator=gen).to(device=self.device, dtype=self.dtype)
        sq, sk = self.shape[-2], self.shape[-1]
        if self.mask == "causal":
            mask = None
            torch_mask = torch.ones(sq, sk, dtype=torch.bool, device=self.device).triu(sk - sq + 1)
        else:  # key padding per batch entry: lengths in [sk/2, sk], so no row is fully masked
            lengths = torch.randint(max(1, sk // 2), sk + 1, (self.shape[0],), generator=gen)
            keys = torch.arange(sk)
            mask = (keys[None, :] >= lengths[:, None]).reshape(self.shape[0], *[1] * (len(self.shape) - 2), sk)
            mask = mask.to(self.device)
            torch_mask = mask
        return x, dy, mask, torch_mask

    def forward_bytes(self, x, mask):
        return 2 * x.numel() * x.element_size() + (mask.numel() if mask is not None else 0)

    def backward_bytes(self, x):
        return 3 * x.numel() * x.element_size()


def parse_cases(shapes: str, dtypes: str, masks: str, devices) -> list:
    out = []
    for text in shapes.split(","):
        if not re.fullmatch(r"\s*\d+(x\d+)+\s*", text):
            raise HpclmError(f"--shapes: '{text}' is not a shape like 16x1024x1024 (at least 2 dims, 'x' between sizes)")
        shape = tuple(int(v) for v in text.strip().split("x"))
        if min(shape) < 1:
            raise HpclmError(f"--shapes: '{text}' has an empty dimension")
        for dt in dtypes.split(","):
            if dt not in DTYPES:
                raise HpclmError(f"--dtypes: unknown '{dt}'; use a comma-separated list of {', '.join(DTYPES)}")
            for mk in masks.split(","):
                if mk not in MASKS:
                    raise HpclmError(f"--masks: unknown '{mk}'; use causal, padding or both (comma-separated)")
                for device in devices:
                    out.append(SoftmaxCase(shape, dt, mk, device))
    return out


def _retain_freed_memory() -> str:
    """glibc: keep freed blocks for reuse instead of returning them to the kernel (no mmap, no trim).

    Without it every large tensor torch allocates is a fresh mmap whose pages fault in on first
    touch, which costs more than the kernels this benchmark times (fused and torch alike).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
            return "retain (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2G)"
    except OSError:
        pass
    return "system (mallopt not available)"


def run_case(case: SoftmaxCase, iters: int, warmup: int, repeats: int, gen, clock=time.perf_counter) -> dict:
    x, dy, mask, torch_mask = case.inputs(gen)
    causal = case.mask == "causal"
    def best(call):
        return best_time(call, iters, repeats, warmup, clock=clock, cuda=case.device == "cuda")

    def composition(t):
        return (t * SCALE).masked_fill(torch_mask, float("-inf")).softmax(-1)

    xg = x.clone().requires_grad_(True)
    y_fused = fused_softmax(xg, SCALE, mask, causal)
    y_comp = composition(xg)
    # rows with every key masked: the composition gives NaN, the fused op zeros
    def max_diff(fused, torch_result):
        return (fused.detach().double() - torch_result.detach().double().nan_to_num(0.0)).abs().max().item()
    y_checked = y_fused.detach().clone()
    y_checked.view(-1)[y_checked.numel() // 2] += float(os.environ.get(CORRUPT_ENV, 0))
    err = max(max_diff(y_checked, y_comp), max_diff(torch.autograd.grad(y_fused, xg, dy, retain_graph=True)[0],
                                                  torch.autograd.grad(y_comp, xg, dy, retain_graph=True)[0]))
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    dst = torch.empty_like(x)
    times = {
        "copy": best(lambda: dst.copy_(x)),
        "fused_fwd": best(lambda: fused_softmax(x, SCALE, mask, causal)),
        "fused_bwd": best(lambda: torch.autograd.grad(y_fused, xg, dy, retain_graph=True)),
        "softmax": best(lambda: torch.softmax(x, -1)),
        "composition_fwd": best(lambda: composition(x)),
        "composition_bwd": best(lambda: torch.autograd.grad(y_comp, xg, dy, retain_graph=True)),
    }
    fwd_bytes, bwd_bytes = case.forward_bytes(x, mask), case.backward_bytes(x)
    copy_gbps = 2 * x.numel() * x.element_size() / times["copy"] / 1e9
    fwd_gbps = fwd_bytes / times["fused_fwd"] / 1e9
    return {
        "device": case.device, "shape": list(case.shape), "dtype": case.dtype_name, "mask": case.mask,
        "threads": torch.get_num_threads() if case.device == "cpu" else None,
        "kernel": "hpclm" if fused_softmax_available(x, mask) else "torch fallback",
        "check": "ok" if err <= tolerance else "FAIL", "max_abs_diff_vs_torch": err,  # forward and backward
        **{f"{name}_ms": t * 1e3 for name, t in times.items()},
        "fused_fwd_GBps": fwd_gbps, "fused_bwd_GBps": bwd_bytes / times["fused_bwd"] / 1e9, "copy_GBps": copy_gbps,
        "fwd_fraction_of_copy": fwd_gbps / copy_gbps,
        "fwd_speedup_vs_composition": times["composition_fwd"] / times["fused_fwd"],
        "fwd_speedup_vs_softmax": times["softmax"] / times["fused_fwd"],
        "bwd_speedup_vs_autograd": times["composition_bwd"] / times["fused_bwd"],
    }


COLUMNS = [
    Column("device", 7), Column("shape", 13), Column("dtype", 5), Column("mask", 7),
    Column("fwd", 8, "{:.3f}", "ms"), Column("fwd", 7, "{:.1f}", "GB/s"), Column("of copy", 7, "{:.0%}", ""),
    Column("x comp", 6, "{:.1f}", ""), Column("x smax", 6, "{:.1f}", ""),
    Column("bwd", 8, "{:.3f}", "ms"), Column("bwd", 7, "{:.1f}", "GB/s"), Column("x autog", 7, "{:.1f}", ""),
    Column("copy", 7, "{:.1f}", "GB/s"), Column("comp", 8, "{:.2f}", "fwd ms"), Column("autog", 8, "{:.2f}", "bwd ms"),
    Column("check", 5),
]


def _table_row(r):
    return [r["device"], "x".join(map(str, r["shape"])), r["dtype"], r["mask"], r["fused_fwd_ms"], r["fused_fwd_GBps"],
            r["fwd_fraction_of_copy"], r["fwd_speedup_vs_composition"], r["fwd_speedup_vs_softmax"], r["fused_bwd_ms"],
            r["fused_bwd_GBps"], r["bwd_speedup_vs_autograd"], r["copy_GBps"], r["composition_fwd_ms"],
            r["composition_bwd_ms"], r["check"]]


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HpclmError("--plot needs matplotlib: pip install matplotlib") from None
    labels = [f"{r['device']} {'x'.join(map(str, r['shape']))}\n{r['dtype']} {r['mask']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows)), 4.5))
    for ax, key, title in ((axes[0], "fwd_speedup_vs_composition", "forward: x faster than the torch composition"),
                           (axes[1], "bwd_speedup_vs_autograd", "backward: x faster than autograd of it")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60, ha="right")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("speedup (x, higher is better)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise HpclmError(f"--threads must be >= 1, got {args.threads}")
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        raise HpclmError("--iters and --repeats must be >= 1 and --warmup >= 0")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)  # before the run, not after it
    iters, repeats = (2, 1) if args.quick else (args.iters, args.repeats)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices, notes = ["cpu"], []
    if args.device in ("cuda", "all"):
        ext = native.extension()
        reason = ("hpclm._C is not built" if ext is None else "hpclm._C was built without CUDA"
                  if not ext.build_info()["with_cuda"] else None if torch.cuda.is_available()
                  else "no CUDA device (torch.cuda.is_available() is False)")
        if reason is None:
            devices = ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
        elif args.device == "cuda":
            raise HpclmError(f"--device cuda: {reason}")
        else:
            notes.append(f"cuda rows skipped: {reason}")
    cases = parse_cases(args.shapes, args.dtypes, args.masks, devices)
    malloc = _retain_freed_memory() if args.malloc == "retain" else "system"
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        raise HpclmError("--clock cpu measures one thread's work: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    host = host_info(1, threads=torch.get_num_threads(), torch=torch.__version__, malloc=malloc)
    print(f"# hpclm bench softmax: {host['cpu']}, {host['cores']} cores, {host['threads']} torch thread(s), "
          f"torch {torch.__version__}; malloc {malloc}")
    print(f"# scale {SCALE}; mean of {iters} calls ({args.clock} clock), best of {repeats}; GB/s = ideal bytes (fwd: x + mask + y, "
          "bwd: y + dy + dx); 'of copy' = fwd GB/s / copy GB/s; 'x comp' / 'x smax' / 'x autog' = times faster "
          "than the torch composition / torch.softmax alone / autograd's backward of the composition")
    for note in notes:
        print(f"# {note}")
    for line in format_table(COLUMNS, []):
        print(line)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        row = run_case(case, iters, args.warmup, repeats, gen, clock if case.device == "cpu" else time.perf_counter)
        rows.append(row)
        print(format_table(COLUMNS, [_table_row(row)])[-1], flush=True)
    failed = [r for r in rows if r["check"] != "ok"]
    if failed:
        print(f"# {len(failed)} case(s) differ from the torch composition beyond the dtype tolerance")
    if args.json:
        write_json(args.json, {"tool": "hpclm bench softmax", "host": host,
                               "settings": {"shapes": args.shapes, "dtypes": args.dtypes, "masks": args.masks,
                                            "scale": SCALE, "iters": iters, "repeats": repeats, "clock": args.clock,
                                            "warmup": args.warmup, "notes": notes},
                               "rows": rows})
    if args.plot:
        _plot(rows, args.plot)
    return 1 if failed else 0
