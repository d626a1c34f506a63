"""`hpclm bench reduce`: the ring's reduce kernel (dst += src) on every CPU path this machine runs,
next to numpy's np.add(out=) in the same run.

The ring allreduce spends its compute here; the table shows what run-time ISA dispatch buys. GB/s
counts the ideal traffic: read dst and src, write dst (3 x bytes). Every path's result is checked
against numpy's (exit code 1 on a mismatch).
"""
from __future__ import annotations

import numpy as np

from hpclm import native
from hpclm.bench.harness import Column, best_time, check_writable, format_table, host_info, write_json
from hpclm.errors import HpclmError

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # numpy has no bfloat16: raw bits
COLUMNS = [Column("dtype", 9), Column("path", 7), Column("time", 9, "{:.3f}", "ms"), Column("GB/s", 7, "{:.2f}"),
           Column("x numpy", 8, "{:.2f}"), Column("check", 5)]


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bits (exact for the small integers used here)."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def main(args) -> int:
    if args.mib <= 0 or args.repeat < 1 or args.threads < 1:
        raise HpclmError("--mib must be > 0, --repeat and --threads >= 1")
    if args.json:
        check_writable(args.json, "--json")
    C = native.require()
    paths = C.build_info()["cpu_paths_supported"]
    host = host_info(threads=args.threads)
    print(f"# hpclm bench reduce: {host['cpu']}, {args.mib:g} MiB per buffer, {args.threads} thread(s), best of "
          f"{args.repeat} calls; GB/s = 3 x bytes / time; 'x numpy' = numpy's time / this row's")
    for line in format_table(COLUMNS, []):
        print(line)
    rows = []
    for dtype, np_dtype in DTYPES.items():
        n = int(args.mib * 2**20) // np.dtype(np_dtype).itemsize
        values = np.arange(n) % 64  # small integers: every sum is exact in every dtype
        a0 = _bf16(values) if dtype == "bfloat16" else values.astype(np_dtype)
        b = a0.copy()
        expected = _bf16(2 * values) if dtype == "bfloat16" else (2 * values).astype(np_dtype)
        if dtype == "bfloat16":  # the peer is float32 addition of the same element count
            a32, b32 = np.ones(n, np.float32), np.ones(n, np.float32)
            peer = best_time(lambda: np.add(a32, b32, out=a32), 1, args.repeat, warmup=1)
        else:
            a = a0.copy()
            peer = best_time(lambda: np.add(a, b, out=a), 1, args.repeat, warmup=1)
        nbytes = 3 * a0.nbytes
        found = [("numpy", peer, "ok")]
        for path in paths:
            C.set_cpu_path(path)
            try:
                a = a0.copy()
                C.reduce_into(a.ctypes.data, b.ctypes.data, n, dtype, "sum", args.threads)
                check = "ok" if np.array_equal(a, expected) else "FAIL"
                t = best_time(lambda: C.reduce_into(a.ctypes.data, b.ctypes.data, n, dtype, "sum", args.threads),
                              1, args.repeat, warmup=1)
            finally:
                C.set_cpu_path("auto")
            found.append((path, t, check))
        for path, t, check in found:
            row = {"dtype": dtype, "path": path, "time_ms": t * 1e3, "gbps": nbytes / t / 1e9, "speedup": peer / t,
                   "check": check}
            rows.append(row)
            print(format_table(COLUMNS, [[dtype, path, row["time_ms"], row["gbps"], row["speedup"], check]])[-1])
    failed = [r for r in rows if r["check"] != "ok"]
    if failed:
        print(f"# {len(failed)} path(s) computed a different sum than numpy")
    if args.json:
        write_json(args.json, {"tool": "hpclm bench reduce", "host": host, "mib": args.mib, "threads": args.threads,
                               "repeat": args.repeat, "rows": rows})
    return 1 if failed else 0
