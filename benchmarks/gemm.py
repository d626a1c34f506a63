"""The packed inference matmul (hpclm._C.gemm_packed via PackedLinear) against torch's F.linear, in the same
run: the matrices of one GPT block repeated over n_layer layers (more bytes than the caches hold, as in
decoding), for 1 to 64 rows, float32. Each figure is the best of --repeats timings of --iters calls; every
result is checked against F.linear (exit code 1 beyond float32 rounding).

    python benchmarks/gemm.py [--n-embd 384] [--n-layer 6] [--rows 1,2,4,8,16,64] [--threads 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from hpclm.bench import harness
from hpclm.kernels.gemm import PackedLinear, gemm_available


def best_ms(call, iters: int, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        times.append((time.perf_counter() - start) / iters * 1e3)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C = args.n_embd
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]  # attention qkv and output, MLP up and down
    linears = [torch.nn.Linear(k, n) for _ in range(args.n_layer) for n, k in shapes]
    ok, why = gemm_available(linears[0].weight)
    if not ok:
        print(f"gemm benchmark: the packed kernel is not available here ({why})")
        return 1
    packed = [PackedLinear(lin) for lin in linears]
    weight_mb = sum(lin.weight.numel() for lin in linears) * 4 / 1e6
    print(f"gemm benchmark: {len(linears)} matrices of a GPT {args.n_layer}x{C} ({weight_mb:.0f} MB float32), "
          f"{args.threads} threads")
    rows, wrong = [], 0
    for m in (int(r) for r in args.rows.split(",")):
        xs = {lin.in_features: torch.randn(m, lin.in_features) for lin in linears}
        for lin, fast in zip(linears, packed):
            ref = F.linear(xs[lin.in_features], lin.weight, lin.bias)
            err = (fast(xs[lin.in_features]) - ref).abs().max().item()
            wrong += err > 1e-5 * max(1.0, ref.abs().max().item()) * lin.in_features ** 0.5
        torch_ms = best_ms(lambda: [F.linear(xs[lin.in_features], lin.weight, lin.bias) for lin in linears],
                           args.iters, args.repeats)
        ours_ms = best_ms(lambda: [f(xs[f.in_features]) for f in packed], args.iters, args.repeats)
        rows.append({"rows": m, "torch_ms": torch_ms, "packed_ms": ours_ms, "speedup": torch_ms / ours_ms,
                     "packed_gb_s": weight_mb / 1e3 / (ours_ms / 1e3),
                     "packed_gflop_s": 2 * m * weight_mb / 4 * 1e6 / (ours_ms / 1e3) / 1e9})
    cols = [harness.Column("rows", 5, "{:d}"), harness.Column("torch", 9, "{:.2f}", "ms"),
            harness.Column("packed", 9, "{:.2f}", "ms"), harness.Column("speedup", 8, "{:.2f}", "x"),
            harness.Column("weights", 9, "{:.1f}", "GB/s"), harness.Column("compute", 9, "{:.1f}", "GFLOP/s")]
    print("\n".join(harness.format_table(cols, [[r["rows"], r["torch_ms"], r["packed_ms"], r["speedup"],
                                                  r["packed_gb_s"], r["packed_gflop_s"]] for r in rows])))
    if wrong:
        print(f"gemm benchmark: {wrong} results differ from F.linear beyond float32 rounding")
    if args.json:
        harness.write_json(args.json, {"benchmark": "gemm", "host": harness.host_info(threads=args.threads),
                                       "settings": vars(args), "weight_mb": weight_mb, "rows": rows,
                                       "wrong": int(wrong)})
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
