"""Shared test helpers. Subprocesses import hpclm from this checkout (PYTHONPATH=repo root),
so the suite tests the tree it lives in, wherever hpclm is installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The project's shared folder sits next to the checkout (../shared), or two levels up from a worktree.
SHARED_DATA = next((p for p in (REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data") if p.is_dir()),
                   REPO.parent / "shared" / "data")


# Every time limit in the suite guards against a hang, not a slow machine: HPCLM_TEST_TIMEOUT_SCALE=3
# gives a machine three times slower than the 2-core one they were set on three times as long.
TIMEOUT_SCALE = float(os.environ.get("HPCLM_TEST_TIMEOUT_SCALE", "1"))


# A second build configuration (no CUDA, a marker define) that the build tests share: the first to build it
# compiles, the others find its CMake tree up to date.
SECOND_BUILD = {"HPCLM_CUDA": "0", "HPCLM_CMAKE_ARGS": "-DCMAKE_CXX_FLAGS=-DHPCLM_TEST_BUILD_OPTION"}
SECOND_BUILD_MARK = "-DHPCLM_TEST_BUILD_OPTION"


def _cpu_paths_supported() -> list[str]:
    try:
        import hpclm._C as C
    except ImportError:  # not built: the kernel tests skip themselves
        return []
    return C.build_info()["cpu_paths_supported"]


@pytest.fixture(params=_cpu_paths_supported())
def cpu_path(request):
    """Each CPU code path of hpclm._C this machine runs, in turn (set_cpu_path); the best one again after."""
    import hpclm._C as C
    C.set_cpu_path(request.param)
    yield request.param
    C.set_cpu_path("auto")


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children first), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def hang_guard(seconds: float) -> float:
    """A time limit of `seconds` on the reference machine, scaled by HPCLM_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    # each `hpclm` child would re-execute itself under jemalloc (hpclm.runtime), ~0.1 s a process: the tests
    # that exercise that path ask for it with HPCLM_ALLOCATOR=auto
    env.setdefault("HPCLM_ALLOCATOR", "system")
    for var in [v for v in env if v.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_", "HOROVOD_"))]:
        del env[var]  # a test starts its own launcher; never inherit one
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"  # tests may start more ranks than this machine has cores
    env.update(extra or {})
    return env


def run_python(args: list[str], *, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process with this checkout's hpclm; output captured as text."""
    return subprocess.run([sys.executable, *args], env=child_env(env), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=hang_guard(timeout))


def mpirun(np: int, args: list[str], *, env: dict | None = None, timeout: float = 180,
           cwd=None, mpirun_args: list[str] = ()) -> subprocess.CompletedProcess:
    """`mpirun -np NP python ARGS` (oversubscribed, allowed as root); output captured as text."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found: Open MPI is not installed (scripts/setup.sh installs it)")
    cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [*mpirun_args, sys.executable, *args]
    return subprocess.run(cmd, env=child_env(env), cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=hang_guard(timeout))


def horovod_available() -> bool:
    try:
        import horovod.torch as hvd
        return bool(hvd.mpi_built())
    except Exception:
        return False


requires_horovod = pytest.mark.skipif(not horovod_available(),
                                      reason="Horovod with MPI is not installed (scripts/setup.sh builds it)")


def run_with_read_only(paths, args: list[str], *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGS` in a private mount namespace where every one of `paths` is a read-only bind mount of
    itself (what a read-only file system looks like to the process, root included; gone when it exits)."""
    if shutil.which("unshare") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private mount namespace (read-only bind mounts)")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("this kernel or container does not allow mount namespaces (unshare -m)")
    binds = [f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
             f"mount -o remount,bind,ro {shlex.quote(str(p))}" for p in paths]
    script = " && ".join([*binds, f"exec {shlex.join([sys.executable, *args])}"])
    return subprocess.run(["unshare", "-m", "sh", "-c", script], env=child_env(env), cwd=REPO, capture_output=True,
                          text=True, timeout=hang_guard(timeout))
