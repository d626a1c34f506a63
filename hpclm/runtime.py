"""The memory allocator `hpclm` runs its compute commands under, chosen before torch loads.

glibc's malloc gives large blocks back to the kernel when they are freed, so every large tensor allocated
again faults its pages in anew; a caching allocator keeps them for reuse. As torch's own CPU launcher
(torch.backends.xeon.run_cpu) does, `hpclm` preloads jemalloc (else tcmalloc) when one is installed.
LD_PRELOAD acts only when a process starts, so the command re-executes itself once with it set (only a
process started as `hpclm`: the console script or `python -m hpclm`); the process keeps its PID, so a
launcher (mpirun, srun) sees the same rank.

    HPCLM_ALLOCATOR=auto       jemalloc, else tcmalloc, else glibc's malloc (the default)
    HPCLM_ALLOCATOR=jemalloc   that one (a one-line error when it is not installed); also tcmalloc
    HPCLM_ALLOCATOR=system     glibc's malloc, no re-execution

This module imports nothing heavy: it runs before torch and MPI are loaded.
"""
from __future__ import annotations

import glob
import os
import sys

from hpclm.errors import HpclmError

ALLOCATOR_ENV = "HPCLM_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
_REEXECUTED = "HPCLM_ALLOCATOR_PRELOADED"  # set in the re-executed process: never twice
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
# freed pages stay with the process for reuse (decay -1: never purged). run_cpu's decay of 9000000000 ms
# left this jemalloc (5.3) faulting a 64 MiB tensor's pages in again at every allocation, as glibc does.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _library_dirs() -> list[str]:
    dirs = [os.path.join(p, "lib") for p in (os.environ.get("CONDA_PREFIX"), sys.prefix) if p]
    return dirs + ["/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"]


def find(allocator: str) -> str | None:
    """The path of an installed shared library of `allocator` (jemalloc, tcmalloc), or None."""
    for directory in _library_dirs():
        for name in LIBRARIES[allocator]:
            hits = glob.glob(os.path.join(directory, name))
            if hits:
                return hits[0]
    return None


def loaded(maps_path: str = "/proc/self/maps") -> str:
    """The allocator this process runs: the jemalloc or tcmalloc library mapped into it, else glibc's malloc."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for allocator in LIBRARIES:
        for line in maps.splitlines():
            if f"lib{allocator}" in line:
                return f"{allocator} ({line.split()[-1]})"
    return "glibc malloc"


def choice() -> str:
    value = os.environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise HpclmError(f"{ALLOCATOR_ENV}={value!r} is not an allocator choice: use one of {', '.join(CHOICES)}")
    return value


def preload_target() -> str | None:
    """The library to preload under HPCLM_ALLOCATOR, None for none (system, auto with none installed, or
    one already loaded)."""
    wanted = choice()
    if wanted == "system" or loaded() != "glibc malloc":
        return None
    for allocator in (("jemalloc", "tcmalloc") if wanted == "auto" else (wanted,)):
        path = find(allocator)
        if path:
            return path
    if wanted != "auto":
        raise HpclmError(f"{ALLOCATOR_ENV}={wanted} but no {LIBRARIES[wanted][0]} is installed (Debian: apt-get install "
                         f"{'libjemalloc2' if wanted == 'jemalloc' else 'libtcmalloc-minimal4'}): install it, or use "
                         f"{ALLOCATOR_ENV}=auto or system")
    return None


def preload_env(path: str, env) -> dict:
    """`env` with the allocator library at `path` preloaded (and jemalloc told to keep freed pages)."""
    env = dict(env)
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env[_REEXECUTED] = "1"
    if "jemalloc" in os.path.basename(path):
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def started_as_hpclm(orig_argv: list[str]) -> list[str] | None:
    """The interpreter's arguments when they start `hpclm` itself (`python [options] -m hpclm ...` or the
    console script `hpclm ...`), else None: a program of the user's that calls hpclm.cli.main is never
    replaced by a re-execution (its atexit hooks and state would be lost)."""
    args, i = list(orig_argv[1:]), 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c", "-"):
        i += 2 if args[i] in ("-X", "-W", "-Q") else 1  # the options that take a separate value
    if i + 1 < len(args) and args[i] == "-m" and args[i + 1] == "hpclm":
        return args
    if i < len(args) and os.path.basename(args[i]) == "hpclm":
        return args
    return None


def reexec_with_allocator() -> None:
    """Replace this process by itself (the same interpreter arguments) with the caching allocator preloaded,
    when it was started as `hpclm`, there is an allocator to preload and this is not already the
    re-executed process; else return."""
    if os.environ.get(_REEXECUTED):
        return
    args = started_as_hpclm(getattr(sys, "orig_argv", []))
    path = preload_target() if args is not None else None
    if path is None:
        return
    env = preload_env(path, os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)
