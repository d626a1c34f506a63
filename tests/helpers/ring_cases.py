"""Run under mpirun by tests/test_probe.py: every rank runs hpclm.probe.ring_allreduce over a grid
of dtypes, ops, counts and buffer kinds, compares with MPI_Allreduce and an independent float64
reference, triggers every argument error, and writes its findings to OUTDIR/rank<r>.json (OUTDIR: the first argument)."""
import json
import sys
import traceback

import numpy as np
import torch
from mpi4py import MPI

from hpclm import native
from hpclm.comm.ring import DTYPES, RING_OPS, ring_allreduce

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
ext = native.require()
failures, checked = [], 0
EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}
NP_REDUCE = {"sum": np.sum, "avg": np.mean, "prod": np.prod, "min": np.min, "max": np.max}


def fail(what):
    failures.append(f"rank {rank}: {what}")


def make_inputs(dtype, count, kind, op, r):
    """float64 values, exactly representable in dtype, for rank r."""
    rng = np.random.default_rng(1000 * r + count)
    if op == "prod":  # +-1 and a few 2s: every partial product is exact
        v = rng.choice([1.0, -1.0, 1.0, 2.0 if r == 0 else 1.0], size=count)
    elif kind == "int":
        v = rng.integers(-8, 9, size=count).astype(np.float64)
    else:
        v = rng.uniform(-1, 1, size=count)
    return torch.from_numpy(v).to(getattr(torch, dtype)).double().numpy()


def as_buffer(values, dtype, flavour):
    t = torch.from_numpy(values).to(getattr(torch, dtype))
    return t.numpy().copy() if flavour == "numpy" else t.clone()


def to_f64(buf):
    return (buf.double().numpy() if isinstance(buf, torch.Tensor) else buf.astype(np.float64))


def check_case(dtype, op, count, kind, in_place, flavour, segment, depth, threads=None):
    global checked
    name = (f"{dtype} {op} count={count} {kind} {'in place' if in_place else 'out of place'} {flavour} seg={segment} "
            f"depth={depth} threads={threads}")
    everyone = [make_inputs(dtype, count, kind, op, r) for r in range(n)]
    buf = as_buffer(everyone[rank], dtype, flavour)
    original = to_f64(buf).copy()
    out = None if in_place else as_buffer(np.full(count, 7.0), dtype, flavour)
    got = ring_allreduce(buf, op=op, out=out, segment_bytes=segment, depth=depth, threads=threads)
    if got is not (buf if in_place else out):
        fail(f"{name}: returned a different object than the result buffer")
    if not in_place and not np.array_equal(to_f64(buf), original):
        fail(f"{name}: out of place changed the input")
    result = to_f64(got)
    # MPI_Allreduce of the library (mpi4py, float types MPI has) or through _C (half types: float32 user op)
    lib = as_buffer(everyone[rank], dtype, "torch")
    if dtype in ("float32", "float64") and op != "avg":
        mpi_op = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}[op]
        arr = lib.numpy()
        comm.Allreduce(MPI.IN_PLACE, arr, op=mpi_op)
    else:
        ext.mpi_allreduce(lib.data_ptr(), lib.data_ptr(), count, dtype, op, comm.py2f())
    reference = NP_REDUCE[op](np.stack(everyone), axis=0) if count else np.zeros(0)
    exact = kind == "int" or op in ("min", "max", "prod") or (n <= 2 and op == "sum")
    if exact:
        ok_mpi = np.array_equal(result, lib.double().numpy())
        want = torch.from_numpy(reference).to(getattr(torch, dtype)).double().numpy()
        ok_ref = np.array_equal(result, want)
    else:  # rounding differs with the reduction order: a few ulps of the largest partial sum
        tol = 2 * n * EPS[dtype] * max(1.0, float(np.abs(np.stack(everyone)).sum(axis=0).max(initial=0)))
        ok_mpi = np.allclose(result, lib.double().numpy(), rtol=0, atol=tol)
        ok_ref = np.allclose(result, reference, rtol=0, atol=tol)
    if not (ok_mpi and ok_ref):
        bad = np.flatnonzero(result != reference)[:3]
        fail(f"{name}: ring != {'MPI_Allreduce' if not ok_mpi else 'reference'} "
             f"at {bad.tolist()}: {result[bad].tolist()} vs {reference[bad].tolist()}")
    checked += 1


def errors():
    """Every rank makes the same calls; each returns (type, message) of what it raised, or None."""
    def attempt(fn):
        try:
            fn()
        except Exception as e:
            return [type(e).__name__, str(e)]
        return None

    x = np.arange(10, dtype=np.float32)
    ro = np.arange(10, dtype=np.float32)
    ro.flags.writeable = False
    z = np.zeros(20, np.float32)
    out = {
        "noncontig_numpy": attempt(lambda: ring_allreduce(np.zeros(20, np.float32)[::2])),
        "noncontig_torch": attempt(lambda: ring_allreduce(torch.zeros(4, 5).t())),
        "readonly_in_place": attempt(lambda: ring_allreduce(ro)),
        "readonly_out": attempt(lambda: ring_allreduce(x, out=ro)),
        "int_dtype": attempt(lambda: ring_allreduce(np.zeros(4, np.int32))),
        "not_a_buffer": attempt(lambda: ring_allreduce([1.0, 2.0])),
        "out_mismatch": attempt(lambda: ring_allreduce(x, out=np.zeros(11, np.float32))),
        "out_dtype": attempt(lambda: ring_allreduce(x, out=np.zeros(10, np.float64))),
        "out_overlaps": attempt(lambda: ring_allreduce(z[:10], out=z[5:15])),
        "bad_op": attempt(lambda: ring_allreduce(x.copy(), op="mean")),
        "bad_comm": attempt(lambda: ring_allreduce(x.copy(), comm=object())),
        "bad_segment": attempt(lambda: ring_allreduce(x.copy(), segment_bytes=0)),
        "counts_differ": attempt(lambda: ring_allreduce(np.zeros(10 + (rank == n - 1), np.float32))),
        "dtypes_differ": attempt(lambda: ring_allreduce(np.zeros(10, np.float64 if rank == n - 1 else np.float32))),
        "one_rank_bad": attempt(lambda: ring_allreduce(np.zeros(20, np.float32)[::2] if rank == n - 1
                                                       else np.zeros(10, np.float32))),
        # what shapes the messages must agree too (else: other message sizes, a double free, a hang)
        "segments_differ": attempt(lambda: ring_allreduce(np.zeros(100000, np.float32),
                                                          segment_bytes=4096 if rank == n - 1 else None)),
        "depths_differ": attempt(lambda: ring_allreduce(np.zeros(100000, np.float32), depth=3 if rank == n - 1 else 2)),
        "one_rank_bad_comm": attempt(lambda: ring_allreduce(x.copy(), comm=object() if rank == n - 1 else None)),
    }
    t = np.full(100000, rank + 1.0, np.float32)  # reduction threads are each rank's own business
    out["threads_differ"] = attempt(lambda: ring_allreduce(t, threads=2 if rank == n - 1 else 1))
    out["threads_differ_result"] = bool((t == n * (n + 1) / 2).all())
    # mpi4py's ops stand for their names; others are refused
    values = np.arange(6, dtype=np.float32) * (rank + 1) - 2
    by_object = {}
    for name, mpi_op in (("sum", MPI.SUM), ("max", MPI.MAX), ("min", MPI.MIN), ("prod", MPI.PROD)):
        a, b = values.copy(), values.copy()
        ring_allreduce(a, op=mpi_op)
        ring_allreduce(b, op=name)
        by_object[name] = bool(np.array_equal(a, b))
    total = values.copy()
    ring_allreduce(total, op=MPI.SUM)
    by_object["sum_value"] = bool(np.array_equal(total, np.arange(6) * n * (n + 1) / 2 - 2 * n))
    out["mpi_op_objects"] = by_object
    out["mpi_op_band"] = attempt(lambda: ring_allreduce(x.copy(), op=MPI.BAND))
    # after all that, the ring still works on this communicator (no stray messages left behind)
    y = np.full(5, rank + 1.0, np.float32)
    ring_allreduce(y)
    out["works_after_errors"] = y.tolist() == [n * (n + 1) / 2] * 5
    return out


def communicators():
    """A sub-communicator (even/odd ranks) and COMM_SELF: the ring runs on the one it is given."""
    sub = comm.Split(rank % 2, rank)
    members = list(range(rank % 2, n, 2))
    y = torch.full((7,), float(rank))
    ring_allreduce(y, comm=sub)
    z = np.full(3, rank + 0.5)
    ring_allreduce(z, comm=MPI.COMM_SELF, op="avg")
    ok = y.tolist() == [float(sum(members))] * 7 and z.tolist() == [rank + 0.5] * 3
    sub.Free()
    return ok


def main():
    counts = sorted({0, 1, max(1, n - 1), n, 7, 1001})
    segments, depths = [8, 64, 1 << 20], [1, 2, 3]
    i = 0
    for dtype in DTYPES:
        for op in RING_OPS:
            for in_place in (False, True):
                # integer-valued data (exact) at every count; random data (tolerance) at one
                for count, kind in [(c, "int") for c in counts] + [(1001, "random")]:
                    flavour = "torch" if dtype == "bfloat16" or i % 2 else "numpy"
                    check_case(dtype, op, count, kind, in_place, flavour, segments[i % 3], depths[i % 3])
                    i += 1
    for dtype in DTYPES:  # long enough for many segments per chunk, with remainders
        check_case(dtype, "sum", 100003, "int", False, "torch", 4096, 2)
        check_case(dtype, "avg", 100003, "random", True, "torch", 1000, 3)
        # segments of 2^18 elements and chunks of 75,001 or more: the reductions split among threads
        check_case(dtype, "sum", 300007, "int", False, "torch", 1 << 20, 2, threads=2)
        check_case(dtype, "avg", 300007, "random", True, "torch", 1 << 20, 2, threads=3)
    return {"rank": rank, "size": n, "checked": checked, "failures": failures[:20], "errors": errors(),
            "communicators": communicators()}


if __name__ == "__main__":
    try:
        result = main()
    except Exception:
        result = {"rank": rank, "size": n, "crash": traceback.format_exc()}
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # one file per rank: stdout lines can interleave
        json.dump(result, f)
