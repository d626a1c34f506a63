"""Pieces every hpclm benchmark and probe shares (nccl-tests' habit: one harness times, checks
and prints; each case only says what to run): sizes with K/M/G suffixes, the timing loops (wall,
thread CPU or CUDA-event clock; best of repeats), the host description, fixed-width tables and
atomic JSON/figure writing."""
from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hpclm import atomic
from hpclm.errors import HpclmError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int) -> int:
    """'64K' -> 65536 (binary units, optional trailing B/iB; '1.5M' allowed); plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"'{text}' is not a size: use a number of bytes with an optional K, M, G or T suffix (e.g. 64K, 256M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(nbytes: float) -> str:
    """65536 -> '64 KiB'; exact binary multiples print without decimals."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{nbytes:.0f} B"


def check_writable(path: str | Path, flag: str) -> None:
    """HpclmError unless `path` can be written: not a directory, and its folder exists (or can be made)
    and is writable. Outputs are checked before a run, so a long run never ends on an unwritable path."""
    if Path(path).is_dir():
        raise HpclmError(f"{flag} {path} is a directory: give a file name")
    stop = atomic.blocker(path)
    if stop is not None:
        raise HpclmError(f"{flag} {path}: {stop} is not a writable directory; give another path")


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(ranks: int = 1, **extra: Any) -> dict:
    """The "host" object of every --json output: cpu, cores, ranks (+ whatever the tool adds)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ranks": ranks, "hostname": platform.node(), **extra}


def time_calls(call: Callable[[], Any], iters: int, warmup: int = 0, sync: Callable[[], Any] | None = None,
               clock: Callable[[], float] = time.perf_counter, cuda: bool = False) -> float:
    """Mean seconds per call over `iters` back-to-back calls, after `warmup` untimed ones and `sync()`.

    `clock=time.thread_time` counts the calling thread's CPU time instead of wall time: for single-threaded
    work on a shared machine, the time it would take without the other tenants' preemptions.
    `cuda=True` times the calls between two CUDA events on the current stream (the GPU's own clock)."""
    for _ in range(warmup):
        call()
    if sync is not None:
        sync()
    if cuda:
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / max(1, iters)
    begin = clock()
    for _ in range(iters):
        call()
    return (clock() - begin) / max(1, iters)


def best_time(call: Callable[[], Any], iters: int, repeats: int, warmup: int = 0, **timing: Any) -> float:
    """The best of `repeats` means of `iters` calls (`warmup` untimed calls before the first): on a shared
    machine, the steady figure. `timing`: time_calls' sync, clock or cuda."""
    return min(time_calls(call, iters, warmup if r == 0 else 0, **timing) for r in range(max(1, repeats)))


@dataclass(frozen=True)
class Column:
    """One column of a fixed-width table: header lines, width, and how a value prints."""

    title: str
    width: int
    fmt: str = "{}"
    unit: str = ""

    def cell(self, value: Any) -> str:
        if value is None:
            return "n/a".rjust(self.width)
        return self.fmt.format(value).rjust(self.width)


def format_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]], groups: Sequence[tuple[str, int]] = (),
                 prefix: str = "#") -> list[str]:
    """Header lines (starting with `prefix`) and one line per row; `groups` = [(title, n_columns)] spans."""
    lines = []
    if groups:
        cells, i = [], 0
        for title, span in groups:
            width = sum(c.width for c in columns[i:i + span]) + span - 1
            cells.append(title.center(width) if title else " " * width)
            i += span
        lines.append(prefix + " ".join(cells)[len(prefix):])
    for attr in ("title", "unit"):
        line = " ".join(getattr(c, attr).rjust(c.width) for c in columns)
        if line.strip():
            lines.append(prefix + line[len(prefix):])
    for row in rows:
        lines.append(" ".join(c.cell(v) for c, v in zip(columns, row)))
    return lines


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` through a temporary file and a rename: never half-written."""
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig, path: str | Path, **kwargs: Any) -> None:
    """matplotlib `fig.savefig` through a temporary file and a rename."""
    atomic.replace_file(path, lambda tmp: fig.savefig(tmp, **kwargs))
