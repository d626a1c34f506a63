"""Reduce kernel (dst += src) per CPU path against numpy's np.add(out=) in the same run.

The ring allreduce spends its compute here; this shows what run-time dispatch buys on this CPU.
GB/s counts the ideal traffic: read dst and src, write dst (3 x bytes).

    python benchmarks/reduce.py [--mib 64] [--repeat 20] [--json PATH]
"""
import argparse
import time

import numpy as np

from hpclm import harness, native


def best_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=64, help="buffer size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    C = native.require()
    info = C.build_info()
    rows = []
    print(f"{'dtype':>9} {'path':>7} {'time_ms':>9} {'GB/s':>7} {'vs numpy':>9}")
    for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16), ("bfloat16", np.uint16)):
        n = int(args.mib * 2**20) // np.dtype(np_dtype).itemsize
        a = np.ones(n, np_dtype)
        b = np.ones(n, np_dtype)
        nbytes = 3 * a.nbytes
        if dtype == "bfloat16":  # numpy has no bfloat16: the peer is float32 add of the same element count
            a32, b32 = np.ones(n, np.float32), np.ones(n, np.float32)
            peer = best_time(lambda: np.add(a32, b32, out=a32), args.repeat)
        else:
            peer = best_time(lambda: np.add(a, b, out=a), args.repeat)
        rows.append({"dtype": dtype, "path": "numpy", "time_ms": peer * 1e3, "gbps": nbytes / peer / 1e9, "speedup": 1.0})
        print(f"{dtype:>9} {'numpy':>7} {peer * 1e3:9.3f} {nbytes / peer / 1e9:7.2f} {1.0:9.2f}")
        for path in info["cpu_paths_supported"]:
            C.set_cpu_path(path)
            t = best_time(lambda: C.reduce_into(a.ctypes.data, b.ctypes.data, n, dtype, "sum", args.threads), args.repeat)
            rows.append({"dtype": dtype, "path": path, "time_ms": t * 1e3, "gbps": nbytes / t / 1e9, "speedup": peer / t})
            print(f"{dtype:>9} {path:>7} {t * 1e3:9.3f} {nbytes / t / 1e9:7.2f} {peer / t:9.2f}")
        C.set_cpu_path("auto")
    if args.json:
        harness.write_json(args.json, {"tool": "bench reduce", "host": harness.host_info(threads=args.threads),
                                       "mib": args.mib, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
