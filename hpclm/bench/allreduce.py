"""`hpclm probe allreduce`: hpclm's ring allreduce next to the MPI library's MPI_Allreduce, Horovod and
a plain sendrecv (nccl-tests style): bus bandwidth per size, every result checked exactly, and the
ring's alpha-beta model fitted to its rows (hpclm.bench.costmodel).

Each implementation below says only how to call it, its bandwidth factor and what it should produce;
the shared harness times it. mpi4py initializes MPI; Horovod, when measured, is started after that
and adopts the same MPI.
"""
from __future__ import annotations

import math
import mmap
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from hpclm.bench.costmodel import allreduce_bus_factor, crossover_bytes, fit_ring_model, predictions, ring_time
from hpclm.bench.harness import (Column, available_memory, check_writable, format_size, format_table, host_info,
                                 parse_size, save_figure, time_calls, write_json)
from hpclm.comm.dist import reported_by_rank0
from hpclm.comm.ring import DTYPES, extension, mpi
from hpclm.errors import HpclmError

OPS = ("sum", "avg", "min", "max")
IMPLS = ("ring", "mpi", "horovod", "sendrecv", "tcp")
DEFAULT_IMPLS = ("ring", "mpi", "horovod", "sendrecv")  # tcp joins them where ranks sit on several nodes
CORRUPT_ENV = "HPCLM_PROBE_CORRUPT"  # test hook: NAME of an implementation whose checked result gets one bad
                                    # element on each of the last two ranks


# --- exact inputs and expected results ------------------------------------------------------

_EXACT_INTEGERS = {"float32": 2**24, "float64": 2**53, "float16": 2**11, "bfloat16": 2**8}
_BLOCK = 1 << 20  # elements generated / checked at a time


class Pattern:
    """Rank-dependent inputs whose reduction is exact in any order, and the exact expected results.

    Rank r's element i is val((h(i) + r) mod m) / 4, with h a multiplicative hash of i. The values
    are multiples of 1/4 small enough that any partial sum over any set of ranks is exactly
    representable in the dtype, so sum, min and max are exact whatever order an implementation
    reduces in, and avg is the correctly rounded sum / n (what dividing the exact sum gives).
    """

    def __init__(self, dtype: str, ranks: int):
        self.dtype, self.ranks = dtype, ranks
        limit = _EXACT_INTEGERS[dtype]
        k = min(limit // ranks, 4096)
        if k >= 1:   # integers -k..k (in quarters): |any partial sum| <= ranks * k <= limit
            self.m = 2 * k + 1
            vals = np.arange(self.m, dtype=np.float64) - k
        else:        # more ranks than exact integers: a 1 on at most `limit` ranks per element
            self.m = -(-ranks // limit)
            vals = (np.arange(self.m) == 0).astype(np.float64)
        self.values = vals / 4
        total, low, high = np.zeros(self.m), np.full(self.m, np.inf), np.full(self.m, -np.inf)
        residues = np.arange(self.m)
        for r in range(ranks):
            v = self.values[(residues + r) % self.m]
            total += v
            low, high = np.minimum(low, v), np.maximum(high, v)
        self.expected_by_residue = {"sum": total, "avg": total / ranks, "min": low, "max": high}

    def _residues(self, start: int, stop: int, rank: int) -> np.ndarray:
        i = np.arange(start, stop, dtype=np.uint64)
        h = ((i * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)) >> np.uint64(8)
        return ((h + np.uint64(rank % self.m)) % np.uint64(self.m)).astype(np.intp)

    def inputs(self, rank: int, start: int, stop: int) -> np.ndarray:
        return self.values[self._residues(start, stop, rank)]

    def reduced(self, op: str, start: int, stop: int) -> np.ndarray:
        return self.expected_by_residue[op][self._residues(start, stop, 0)]

    def fill(self, t: torch.Tensor, rank: int) -> None:
        for start in range(0, t.numel(), _BLOCK):
            stop = min(t.numel(), start + _BLOCK)
            t[start:stop] = torch.from_numpy(self.inputs(rank, start, stop)).to(t.dtype)

    def count_wrong(self, t: torch.Tensor, expected: Callable[[int, int], np.ndarray]) -> int:
        wrong = 0
        for start in range(0, t.numel(), _BLOCK):
            stop = min(t.numel(), start + _BLOCK)
            want = torch.from_numpy(expected(start, stop)).to(t.dtype)
            wrong += int((t[start:stop] != want).sum())
        return wrong


# --- the implementations: how to call each, its bandwidth factor, what it should produce ------

@dataclass
class Impl:
    name: str
    about: str                                        # one line for the footer
    bus_factor: Callable[[int], float]
    bind: Callable[[torch.Tensor, torch.Tensor, str, str], Callable[[], Any]]  # (send, recv, dtype, op) -> one call
    expects: str = "allreduce"                        # or "shift": rank-1's input (point to point)
    in_place: bool | None = None                      # None: as the run asks; True/False: always
    per_op: bool = True                               # False: the op does not change what is measured
    unsupported: Callable[[str, str], str | None] = lambda dtype, op: None
    session: bool = False                             # True: start() begins a runtime that stop() ends
    start: Callable[[], None] = lambda: None
    stop: Callable[[], None] = lambda: None


def _ring_impl(ext, comm, segment_bytes: int, depth: int, threads: int) -> Impl:
    handle = comm.py2f()

    def bind(send, recv, dtype, op):
        args = (send.data_ptr(), recv.data_ptr(), send.numel(), dtype, op, handle, segment_bytes, depth, threads)
        return lambda: ext.ring_allreduce(*args)
    return Impl("ring", f"hpclm ring: segments of {format_size(segment_bytes)}, {depth} in flight, "
                f"{threads} reduction thread(s) per rank", allreduce_bus_factor, bind)


def _mpi_impl(ext, comm, library: str) -> Impl:
    handle = comm.py2f()

    def bind(send, recv, dtype, op):
        args = (send.data_ptr(), recv.data_ptr(), send.numel(), dtype, op, handle)
        return lambda: ext.mpi_allreduce(*args)
    return Impl("mpi", f"MPI_Allreduce of {library} (avg = sum / n; half types: user-defined op in float32)",
                allreduce_bus_factor, bind)


def _sendrecv_impl(ext, comm) -> Impl:
    handle = comm.py2f()

    def bind(send, recv, dtype, op):
        args = (send.data_ptr(), recv.data_ptr(), send.numel() * send.element_size(), handle)
        return lambda: ext.mpi_sendrecv(*args)
    return Impl("sendrecv", "MPI_Sendrecv to rank+1 from rank-1 (one ring link; busbw = algbw): the ring's bound",
                lambda n: 1.0, bind, expects="shift", per_op=False, in_place=False)


def _tcp_impl(comm) -> Impl:
    from hpclm.bench.tcp import Stream
    streams = []

    def start():
        streams.append(Stream(comm))

    def stop():
        while streams:
            streams.pop().close()

    def bind(send, recv, dtype, op):
        return lambda: streams[0].shift(send, recv)
    return Impl("tcp", "a raw TCP stream to rank+1 from rank-1 (one connection each way, both at once; busbw = algbw): "
                "the bound of a link between hosts", lambda n: 1.0, bind, expects="shift", per_op=False,
                in_place=False, start=start, stop=stop)


def horovod_problem() -> str | None:
    """Why Horovod cannot be used here, or None."""
    try:
        import horovod.torch as hvd
        if not hvd.mpi_built():
            return "this Horovod was built without MPI"
    except Exception as e:  # ImportError, or a broken build raising at import
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _horovod_impl(comm) -> Impl:
    import horovod.torch as hvd
    ops = {"sum": hvd.Sum, "avg": hvd.Average, "min": hvd.Min, "max": hvd.Max}

    def start():
        hvd.init()  # after mpi4py: adopts the running MPI
        if hvd.size() != comm.Get_size():
            raise HpclmError(f"Horovod sees {hvd.size()} ranks but MPI has {comm.Get_size()}: "
                             "Horovod must be built against the MPI library that runs this job")

    def bind(send, recv, dtype, op):
        return lambda: hvd.allreduce_(recv, op=ops[op], name="hpclm.probe")
    return Impl("horovod", "hvd.allreduce_ (in place, as DistributedOptimizer uses it; 1 tensor per call)",
                allreduce_bus_factor, bind, in_place=True,
                unsupported=lambda dtype, op: "Horovod has no bfloat16 allreduce" if dtype == "bfloat16" else None,
                session=True, start=start, stop=hvd.shutdown)


# --- measuring --------------------------------------------------------------------------------

@dataclass
class Settings:
    sizes: list[int]
    dtypes: list[str]
    ops: list[str]
    impls: list[str]
    iters: int = 20
    warmup: int = 5
    check: bool = True
    in_place: bool = False
    segment_bytes: int | None = None  # None: the ring's defaults (hpclm._C.RING_SEGMENT_BYTES, RING_DEPTH)
    depth: int | None = None
    threads: int = 1
    hugepages: bool = False
    notes: list[str] = field(default_factory=list)


def size_series(minbytes: int, maxbytes: int, factor: float) -> list[int]:
    sizes, size = [], minbytes
    while size <= maxbytes:
        sizes.append(size)
        size = max(size + 1, int(size * factor))
    return sizes


def _buffer(count: int, dtype: str, hugepages: bool) -> torch.Tensor:
    """A tensor for the collective: torch's own allocation (what training code hands over), or
    anonymous memory advised to use transparent huge pages (fewer pages for the kernel to pin in
    single-copy transfers such as Open MPI's CMA)."""
    tdtype = getattr(torch, dtype)
    if not hugepages or count == 0:
        return torch.empty(count, dtype=tdtype)
    nbytes = count * torch.empty(0, dtype=tdtype).element_size()
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory gets no THP
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=tdtype, count=count)  # the tensor keeps the mapping alive


def _measure(MPI, comm, impl: Impl, pattern: Pattern, dtype: str, op: str, size: int, s: Settings) -> dict:
    rank, n = comm.Get_rank(), comm.Get_size()
    esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    count = size // esize
    in_place = s.in_place if impl.in_place is None else impl.in_place
    row = {"impl": impl.name, "size": count * esize, "count": count, "type": dtype,
           "redop": op if impl.per_op else None, "in_place": in_place}
    reason = impl.unsupported(dtype, op)
    if reason:
        return {**row, "time_us": None, "algbw": None, "busbw": None, "wrong": None, "unsupported": reason}
    send = _buffer(count, dtype, s.hugepages)
    recv = send if in_place else _buffer(count, dtype, s.hugepages).zero_()
    pattern.fill(send, rank)
    call = impl.bind(send, recv, dtype, op)
    seconds = time_calls(call, s.iters, s.warmup, sync=comm.Barrier)
    seconds = comm.allreduce(seconds, op=MPI.MAX)
    wrong = None
    if s.check:
        pattern.fill(send, rank)
        call()
        if os.environ.get(CORRUPT_ENV) == impl.name and rank >= n - 2 and count:  # the last two ranks
            recv[count // 2] = float("nan")
        if impl.expects == "shift":
            expected = lambda a, b: pattern.inputs((rank - 1) % n, a, b)  # noqa: E731
        else:
            expected = lambda a, b: pattern.reduced(op, a, b)  # noqa: E731
        wrong = comm.allreduce(pattern.count_wrong(recv, expected), op=MPI.SUM)
    algbw = row["size"] / seconds / 1e9 if seconds > 0 else 0.0
    return {**row, "time_us": seconds * 1e6, "algbw": algbw, "busbw": algbw * impl.bus_factor(n), "wrong": wrong}


def run(comm, impls: list[Impl], s: Settings, progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Every implementation over every (dtype, op, size). Those that need no session are measured
    side by side, size by size, so that a change in the machine's load hits them alike; one that
    runs a session (Horovod: a background thread polling MPI) gets a phase of its own, so it never
    disturbs the others."""
    MPI = mpi()
    n = comm.Get_size()
    patterns = {dtype: Pattern(dtype, n) for dtype in s.dtypes}
    plain = [impl for impl in impls if not impl.session]
    phases = ([plain] if plain else []) + [[impl] for impl in impls if impl.session]
    measured = {}
    for phase in phases:
        for impl in phase:
            impl.start()
        try:
            for dtype in s.dtypes:
                esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
                for op in s.ops:
                    progress(f"{','.join(impl.name for impl in phase)} {dtype} {op}")
                    for size in (size for size in s.sizes if size >= esize):
                        for impl in phase:
                            key = (impl.name, dtype, op if impl.per_op else None, size)
                            if key not in measured:
                                measured[key] = _measure(MPI, comm, impl, patterns[dtype], dtype, op, size, s)
        finally:
            for impl in phase:
                impl.stop()
    return [{**measured[impl.name, dtype, op if impl.per_op else None, size], "redop": op}
            for impl in impls for dtype in s.dtypes for op in s.ops for size in s.sizes
            if (impl.name, dtype, op if impl.per_op else None, size) in measured]


# --- the report -------------------------------------------------------------------------------

def transport(MPI, comm) -> dict:
    """The MPI library and what it says about its transport, and how the ranks sit on nodes."""
    ext = extension()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_per_node = [size for size in comm.allgather(local.Get_size() if local.Get_rank() == 0 else 0) if size]
    local.Free()
    hosts = comm.allgather(MPI.Get_processor_name())
    n = comm.Get_size()
    links = [{"from": r, "to": (r + 1) % n, "hosts": [hosts[r], hosts[(r + 1) % n]],
              "via": "shared memory" if hosts[r] == hosts[(r + 1) % n] else "network"} for r in range(n) if n > 1]
    return {"library": MPI.Get_library_version().strip().splitlines()[0].split(",")[0].strip(),
            "says": dict(ext.mpi_transport()), "nodes": len(ranks_per_node), "ranks_per_node": ranks_per_node,
            "ring_links": links}


def _transport_line(t: dict, n: int) -> str:
    says = t["says"]
    parts = [f"{k} {v}" for k, v in says.items()] or ["the library reports nothing through MPI_T"]
    where = (f"{n} rank(s) on 1 node: shared memory between all ranks" if t["nodes"] == 1 else
             f"{n} ranks on {t['nodes']} nodes ({', '.join(map(str, t['ranks_per_node']))} per node): the ring's "
             "slowest link crosses the network")
    lines = f"# MPI: {t['library']}; {'; '.join(parts)}; {where}"
    crossing = [link for link in t.get("ring_links", []) if link["via"] == "network"]
    if crossing:
        lines += ("\n# ring links between hosts (the rest within one, over shared memory): " +
                  ", ".join(f"{l['from']}->{l['to']} ({l['hosts'][0]} -> {l['hosts'][1]})" for l in crossing))
    return lines


def _table_cells(row: dict | None) -> list:
    if row is None:
        return [None] * 4
    return [row["time_us"], row["algbw"], row["busbw"], row["wrong"]]


def table_lines(rows: list[dict], impl_names: list[str]) -> list[str]:
    columns = [Column("size", 12, "{}", "(B)"), Column("count", 12, "{}", "(elements)"),
               Column("type", 9), Column("redop", 6)]
    groups = [("", 4)]
    for name in impl_names:
        columns += [Column("time", 10, "{:.1f}", "(us)"), Column("algbw", 7, "{:.2f}", "(GB/s)"),
                    Column("busbw", 7, "{:.2f}", "(GB/s)"), Column("#wrong", 6, "{}")]
        groups.append((name, 4))
    keyed = {(r["impl"], r["type"], r["redop"], r["size"]): r for r in rows}
    lines_rows, seen = [], set()
    for r in rows:
        key = (r["type"], r["redop"], r["size"])
        if key in seen:
            continue
        seen.add(key)
        cells = [r["size"], r["count"], r["type"], r["redop"]]
        for name in impl_names:
            cells += _table_cells(keyed.get((name, *key)))
        lines_rows.append(cells)
    return format_table(columns, lines_rows, groups)


def summary(rows: list[dict], n: int) -> dict:
    def measured(name):
        return [r for r in rows if r["impl"] == name and r["busbw"] is not None]

    avg = {name: float(np.mean([r["busbw"] for r in measured(name)]))
           for name in dict.fromkeys(r["impl"] for r in rows) if measured(name)}
    out: dict[str, Any] = {"avg_busbw": avg, "wrong": sum(r["wrong"] or 0 for r in rows),
                           "unsupported": {f"{r['impl']} {r['type']}": r["unsupported"]
                                           for r in rows if r.get("unsupported")}}
    by_key = {(r["impl"], r["type"], r["redop"], r["size"]): r for r in rows}
    for peer in ("sendrecv", "tcp", "mpi", "horovod"):
        ratios = []
        for r in measured("ring"):
            other = by_key.get((peer, r["type"], r["redop"], r["size"]))
            if other and other["busbw"]:
                ratios.append((r["busbw"] / other["busbw"], r))
        if ratios:
            low, at = min(ratios, key=lambda p: p[0])
            out[f"ring_vs_{peer}"] = {"mean": float(np.mean([x for x, _ in ratios])), "min": low,
                                      "min_at": {"size": at["size"], "type": at["type"], "redop": at["redop"]}}
    ring_rows = measured("ring")
    model = fit_ring_model([(r["size"], r["time_us"] * 1e-6) for r in ring_rows], n)
    if model:
        sizes = sorted({r["size"] for r in ring_rows})
        smallest = min(r["time_us"] for r in ring_rows if r["size"] == sizes[0]) * 1e-6
        ref = sorted({2**20, sizes[-1]})
        out["model"] = {**model, "alpha_us": model["alpha_s"] * 1e6, "link_GBps": model["link_bytes_per_s"] / 1e9,
                        # latency is only known when it is a visible part of the smallest size's time
                        "latency_resolved": 2 * (n - 1) * model["alpha_s"] >= 0.05 * smallest,
                        "smallest_size": sizes[0], "crossover_bytes": crossover_bytes(model, n),
                        "reference_sizes": ref, "predictions": predictions(model, ref)}
    return out


def footer_lines(summ: dict, impls: list[Impl], n: int, t: dict, s: Settings) -> list[str]:
    lines = ["#"]
    for impl in impls:
        lines.append(f"# {impl.name:9s} {impl.about}")
    lines += [f"# note: {note}" for note in s.notes]
    lines += [f"# n/a: {what}: {why}" for what, why in summ["unsupported"].items()]
    lines.append("# Avg bus bandwidth (GB/s): " + "  ".join(f"{k} {v:.2f}" for k, v in summ["avg_busbw"].items()))
    for peer, title in (("sendrecv", "sendrecv (the ring's bound)"), ("tcp", "tcp (the link's bound)"), ("mpi", "mpi"),
                        ("horovod", "horovod")):
        ratio = summ.get(f"ring_vs_{peer}")
        if ratio:
            at = ratio["min_at"]
            fmt = (lambda v: f"{100 * v:.0f}%") if peer in ("sendrecv", "tcp") else (lambda v: f"{v:.2f}x")
            lines.append(f"# ring vs {title}: busbw {fmt(ratio['mean'])} on average, lowest {fmt(ratio['min'])} "
                         f"at {format_size(at['size'])} {at['type']} {at['redop']}")
    model = summ.get("model")
    if model and not model["latency_resolved"]:
        lines.append(f"# Ring model: B = {model['link_GBps']:.2f} GB/s per link; the latency is not resolved (from "
                     f"{format_size(model['smallest_size'])} up every size is bandwidth-bound): add smaller sizes "
                     "(e.g. -b 4K) for alpha, S* and predictions for larger rings")
    elif model:
        s_star = model["crossover_bytes"]
        threshold = os.environ.get("HOROVOD_FUSION_THRESHOLD")
        current = format_size(int(threshold)) if threshold and threshold.isdigit() else "128 MiB (default)"
        lines += [
            f"# Ring model, fit over its rows: t(S) = 2(n-1)*alpha + 2(n-1)/n*S/B with alpha = {model['alpha_us']:.1f} us "
            f"per step, B = {model['link_GBps']:.2f} GB/s per link",
            f"# Bandwidth dominates above S* = n*alpha*B = {format_size(s_star)} on {n} ranks (latency = bandwidth "
            f"term); a message reaches 90% of B from 9*S* = {format_size(9 * s_star)}.",
            f"# Fusion hint: keep HOROVOD_FUSION_THRESHOLD (now {current}) >= 9*S* of the job's rank count below, "
            "so that fused gradient messages are bandwidth-bound.",
            "# Predicted ring on links like these (same alpha and B per link):",
        ]
        refs = model["reference_sizes"]
        header = "#   ranks" + "".join(f"  {'t(' + format_size(x) + ') us':>16s} {'busbw':>6s}" for x in refs) + \
            f"  {'S*':>10s}  {'9*S*':>10s}"
        lines.append(header)
        for p in model["predictions"]:
            cells = "".join(f"  {p[str(x)]['time_us']:16.1f} {p[str(x)]['busbw']:6.2f}" for x in refs)
            lines.append(f"#   {p['ranks']:5d}{cells}  {format_size(p['crossover_bytes']):>10s}  "
                         f"{format_size(9 * p['crossover_bytes']):>10s}")
    elif n < 2:
        lines.append("# Ring model: needs at least 2 ranks (one rank only copies)")
    lines.append(_transport_line(t, n))
    wrong = summ["wrong"]
    lines.append(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'WRONG'}" if s.check else
                 "# Out of bounds values : not checked (-c 0)")
    return lines


def plot(rows: list[dict], summ: dict, n: int, path: str, host: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple, list] = {}
    for r in rows:
        if r["busbw"] is not None:
            series.setdefault((r["impl"], r["type"], r["redop"]), []).append((r["size"], r["busbw"]))
    several = len({(k[1], k[2]) for k in series}) > 1
    for (impl, dtype, op), pts in series.items():
        label = f"{impl} {dtype} {op}" if several else impl
        ax.plot(*zip(*sorted(pts)), marker="o", label=label)
    model = summ.get("model")
    if model:
        sizes = np.geomspace(min(r["size"] for r in rows), max(r["size"] for r in rows), 100)
        model_bw = [x / ring_time(model, n, x) / 1e9 * allreduce_bus_factor(n) for x in sizes]
        ax.plot(sizes, model_bw, "--", color="gray", label="ring model (alpha-beta fit)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(x).replace(" ", "")))
    ax.set_xlabel("message size")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce bus bandwidth, {n} ranks ({host['cpu']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# --- `hpclm probe allreduce` ----------------------------------------------------------------

def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise HpclmError(f"unknown {what} '{','.join(bad) or text}': use {', '.join(allowed)} or all (comma-separated)")
    return list(dict.fromkeys(items))


def settings_from_args(args, nodes: int = 1) -> Settings:
    try:
        lo, hi = parse_size(args.minbytes), parse_size(args.maxbytes)
        segment = None if args.segment is None else parse_size(args.segment)
    except ValueError as e:
        raise HpclmError(str(e)) from None
    if lo < 1 or lo > hi:
        raise HpclmError(f"-b {args.minbytes} must be at least 1 byte and at most -e {args.maxbytes}")
    if not math.isfinite(args.stepfactor) or (args.stepfactor <= 1 and lo != hi):
        raise HpclmError(f"-f {args.stepfactor} must be greater than 1 (and finite)")
    for flag, value, low in (("-n", args.iters, 1), ("-w", args.warmup, 0), ("--depth", args.depth, 1),
                             ("--threads", args.threads, 1), ("--segment", segment, 1)):
        if value is not None and value < low:
            raise HpclmError(f"{flag} must be at least {low}, got {value}")
    s = Settings(sizes=size_series(lo, hi, args.stepfactor), dtypes=_choices(args.datatype, DTYPES, "dtype"),
                 ops=_choices(args.op, OPS, "op"), impls=[], iters=args.iters, warmup=args.warmup,
                 check=bool(args.check), in_place=args.in_place, segment_bytes=segment, depth=args.depth,
                 threads=args.threads, hugepages=args.hugepages)
    problem = horovod_problem()
    if args.impl is None:
        s.impls = [name for name in DEFAULT_IMPLS if name != "horovod" or problem is None]
        if nodes > 1:
            s.impls.append("tcp")
        if problem:
            s.notes.append(f"horovod left out: {problem}")
    else:
        s.impls = _choices(args.impl, IMPLS, "implementation")
        if "horovod" in s.impls and problem:
            raise HpclmError(f"--impl horovod: Horovod is not usable ({problem}): run scripts/setup.sh "
                             "or leave horovod out of --impl")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise HpclmError("--plot needs matplotlib: pip install matplotlib (in hpclm's dev extra)") from None
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)  # before the run, not after it
    return s


def check_memory(s: Settings, ranks_here: int) -> None:
    """HpclmError when the largest size's buffers (send and receive, on every rank of this node) would not
    fit in the memory the kernel says is available."""
    per_rank = 2 * s.sizes[-1] + 2 * (s.depth or 2) * (s.segment_bytes or 2**19)
    available = available_memory()
    if available is not None and per_rank * ranks_here > available:
        raise HpclmError(f"-e {format_size(s.sizes[-1])} needs about {format_size(per_rank)} per rank for its buffers, "
                         f"{format_size(per_rank * ranks_here)} for the {ranks_here} rank(s) on this node, but "
                         f"{format_size(available)} is available: use a smaller -e")


def main(args) -> int:
    MPI = mpi()
    ext = extension()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    t = transport(MPI, comm)
    with reported_by_rank0():  # the same arguments on every rank: the error once
        s = settings_from_args(args, t["nodes"])
        check_memory(s, max(t["ranks_per_node"]))
    s.segment_bytes = s.segment_bytes or ext.RING_SEGMENT_BYTES
    s.depth = s.depth or ext.RING_DEPTH
    makers = {"ring": lambda: _ring_impl(ext, comm, s.segment_bytes, s.depth, s.threads),
              "mpi": lambda: _mpi_impl(ext, comm, t["library"]),
              "horovod": lambda: _horovod_impl(comm),
              "sendrecv": lambda: _sendrecv_impl(ext, comm),
              "tcp": lambda: _tcp_impl(comm)}
    impls = [makers[name]() for name in s.impls]
    verbose = rank == 0 and sys.stderr.isatty()
    rows = run(comm, impls, s, progress=lambda line: verbose and print(f"# measuring {line}", file=sys.stderr))
    summ = summary(rows, n)
    if rank == 0:
        host = host_info(n, nodes=t["nodes"])
        print(f"# hpclm probe allreduce: {n} ranks, {host['cpu']} ({host['cores']} cores on {host['hostname']}); "
              f"{'in place' if s.in_place else 'out of place'}, "
              f"{'huge-page' if s.hugepages else 'torch-allocated'} buffers, {s.iters} iterations after {s.warmup} warm-up, "
              f"check {'on' if s.check else 'off'}; time = mean over iterations, max over ranks")
        print("\n".join(table_lines(rows, s.impls)))
        print("\n".join(footer_lines(summ, impls, n, t, s)))
        sys.stdout.flush()
        if args.json:
            settings = {k: v for k, v in vars(s).items()}
            write_json(args.json, {"tool": "hpclm probe allreduce", "host": host, "mpi": t, "settings": settings,
                                   "rows": rows, "summary": summ})
        if args.plot:
            plot(rows, summ, n, args.plot, host)
    return 1 if summ["wrong"] else 0
