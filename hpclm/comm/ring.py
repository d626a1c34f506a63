"""hpclm's ring allreduce: C++ over MPI point-to-point (csrc/comm/ring_allreduce.cpp), zero-copy on
numpy arrays and CPU torch tensors. Public name: hpclm.probe.ring_allreduce.

    from hpclm.probe import ring_allreduce
    ring_allreduce(grad)                            # in place, sum over MPI_COMM_WORLD
    ring_allreduce(x, op="avg", comm=sub, out=y)    # out of place, on an mpi4py communicator

mpi4py initializes MPI (hpclm never calls MPI_Init).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpclm import native
from hpclm.comm import mca
from hpclm.errors import HpclmError

DTYPES = ("float32", "float64", "float16", "bfloat16")
RING_OPS = ("sum", "avg", "min", "max", "prod")


# --- MPI and the extension ------------------------------------------------------------------

def mpi():
    """mpi4py's MPI module; importing it initializes MPI (and loads libmpi for Open MPI's plugins), with
    hpclm's Open MPI defaults (hpclm.comm.mca) in place first."""
    mca.apply()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise HpclmError(f"mpi4py is not usable ({e}): pip install mpi4py (scripts/setup.sh installs it)") from None
    return MPI


def extension():
    """hpclm._C with its MPI part, after MPI is initialized."""
    mpi()  # MPI must be initialized before _C touches it
    ext = native.require()
    if not hasattr(ext, "ring_allreduce"):
        raise HpclmError("hpclm._C was built without MPI (CMake found no MPI library): install libopenmpi-dev "
                         "(or load your MPI module), then rebuild with `make build`")
    return ext


# --- ring_allreduce: the Python entry point -------------------------------------------------

@dataclass(frozen=True)
class _Memory:
    ptr: int
    count: int
    dtype: str
    nbytes: int
    writable: bool


def _memory(buf, what: str) -> _Memory:
    """Address, element count and dtype of a contiguous CPU buffer, or a ValueError/TypeError saying why not."""
    if isinstance(buf, torch.Tensor):
        dtype = str(buf.dtype).removeprefix("torch.")
        if buf.device.type != "cpu":
            raise ValueError(f"{what} is on {buf.device}: ring_allreduce reduces host memory, pass a CPU tensor")
        if dtype not in DTYPES:
            raise ValueError(f"{what} has dtype {dtype}: ring_allreduce supports {', '.join(DTYPES)}")
        if not buf.is_contiguous():
            raise ValueError(f"{what} is not contiguous: ring_allreduce works on the memory in place, "
                             "pass .contiguous() and copy the result back")
        return _Memory(buf.data_ptr(), buf.numel(), dtype, buf.numel() * buf.element_size(), True)
    if isinstance(buf, np.ndarray):
        dtype = buf.dtype.name
        if dtype not in DTYPES:
            raise ValueError(f"{what} has dtype {dtype}: ring_allreduce supports {', '.join(DTYPES)}")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{what} is not C-contiguous: ring_allreduce works on the memory in place, "
                             "pass np.ascontiguousarray(...) and copy the result back")
        return _Memory(buf.ctypes.data, buf.size, dtype, buf.nbytes, bool(buf.flags.writeable))
    raise TypeError(f"{what} must be a numpy array or a CPU torch tensor, not {type(buf).__name__}")


def _positive(value, name: str):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _op_name(MPI, op):
    """op as one of RING_OPS: a name, or mpi4py's MPI.SUM / MAX / MIN / PROD."""
    if isinstance(op, MPI.Op):
        for known, name in ((MPI.SUM, "sum"), (MPI.MAX, "max"), (MPI.MIN, "min"), (MPI.PROD, "prod")):  # unhashable
            if op == known:
                return name
        raise ValueError(f"unsupported MPI.Op {op!r}: the ring reduces with MPI.SUM, MPI.MAX, MPI.MIN or MPI.PROD "
                         f"(or one of the names {', '.join(RING_OPS)})")
    return op


def _plan(buf, op, out, segment_bytes, depth, threads) -> tuple[_Memory, _Memory]:
    """Local checks of one rank's arguments: (source, destination) or a ValueError/TypeError."""
    if op not in RING_OPS:
        raise ValueError(f"unknown op '{op}': use one of {', '.join(RING_OPS)}")
    _positive(segment_bytes, "segment_bytes")
    _positive(depth, "depth")
    _positive(threads, "threads")
    src = _memory(buf, "buf")
    if out is None or out is buf:
        if not src.writable:
            raise ValueError("buf is read-only: pass a writable array, or a writable out= for the result")
        return src, src
    dst = _memory(out, "out")
    if dst.dtype != src.dtype or dst.count != src.count:
        raise ValueError(f"out ({dst.count} x {dst.dtype}) must match buf ({src.count} x {src.dtype})")
    if not dst.writable:
        raise ValueError("out is read-only: pass a writable array")
    same = dst.ptr == src.ptr and src.nbytes > 0  # empty buffers may share the null address
    if not same and src.nbytes and dst.ptr < src.ptr + src.nbytes and src.ptr < dst.ptr + dst.nbytes:
        raise ValueError("out overlaps buf: pass out=buf (or no out) for in place, or a separate buffer")
    return src, (src if same else dst)


# What every rank must pass alike: the values that shape the messages of the ring.
_AGREED = ("element count", "dtype", "op", "segment_bytes", "depth")


def _agree(MPI, comm, plan, error):
    """One small MPI_Allreduce: every rank learns whether all ranks have valid arguments that agree on
    everything that shapes the ring's messages, and all raise together (instead of some entering the
    ring with other message sizes and hanging or writing past a buffer)."""
    rank = comm.Get_rank()
    if plan is None:
        values = [0] * len(_AGREED)
    else:
        src, op, segment, depth = plan["src"], plan["op"], plan["segment"], plan["depth"]
        values = [src.count, DTYPES.index(src.dtype), RING_OPS.index(op), segment, depth]
    local = [x for v in values for x in (v, -v)] + [rank if plan is None else -1]
    both = np.array(local, dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    if error is not None:
        raise error
    if both[-1] >= 0:
        raise ValueError(f"ring_allreduce: rank {both[-1]} passed invalid arguments (its own error says which); "
                         "no rank reduced anything")
    mine = dict(zip(_AGREED, [plan["src"].count, plan["src"].dtype, plan["op"], plan["segment"], plan["depth"]]))
    for i, what in enumerate(_AGREED):
        high, low = both[2 * i], -both[2 * i + 1]
        if high != low:
            shown = f" ({low} to {high})" if what in ("element count", "segment_bytes", "depth") else ""
            raise ValueError(f"ring_allreduce: ranks pass different {what}s{shown}; this rank {mine[what]!r}: every "
                             f"rank must pass the same {what}")


def ring_allreduce(buf, op: str = "sum", comm=None, out=None, *, segment_bytes: int | None = None,
                   depth: int | None = None, threads: int | None = None):
    """Allreduce `buf` over the ranks of `comm` (an mpi4py intracommunicator, default COMM_WORLD)
    with hpclm's pipelined ring, zero-copy. In place unless `out` (same size and dtype) is given;
    returns the buffer holding the result.

    buf/out: contiguous numpy arrays or CPU torch tensors of float32, float64, float16 or bfloat16
    (half types are reduced in float32). op: sum, avg, min, max or prod, or mpi4py's MPI.SUM, MPI.MAX,
    MPI.MIN or MPI.PROD. Every rank of `comm` must
    call it; ranks first agree (one small MPI_Allreduce) that counts, dtypes, ops, segment_bytes and
    depth match and that no rank's buffer is unusable, and all raise ValueError otherwise.
    segment_bytes / depth / threads tune the pipeline (message size, segments in flight, reduction
    threads per rank; threads may differ between ranks). A rank whose `comm` is not an
    intracommunicator takes part in the agreement on COMM_WORLD, so ranks calling with the default
    communicator raise instead of waiting for it.
    """
    MPI = mpi()
    ext = extension()
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        _agree(MPI, MPI.COMM_WORLD, None, TypeError(f"comm must be an mpi4py intracommunicator such as "
                                                    f"MPI.COMM_WORLD, not {comm!r}"))
    plan, error = None, None
    try:
        op = _op_name(MPI, op)
        src, dst = _plan(buf, op, out, segment_bytes, depth, threads)
        plan = {"src": src, "dst": dst, "op": op, "segment": segment_bytes or ext.RING_SEGMENT_BYTES,
                "depth": depth or ext.RING_DEPTH}
    except (TypeError, ValueError) as e:
        error = e
    _agree(MPI, comm, plan, error)
    src, dst = plan["src"], plan["dst"]
    if src.count:
        ext.ring_allreduce(src.ptr, dst.ptr, src.count, src.dtype, op, comm.py2f(), plan["segment"], plan["depth"],
                           threads or 1)
    return buf if dst is src else out
