"""`hpclm info`: what was built and what this process can use (the spirit of `horovodrun --check-build`).

Every probe catches its own failure and reports it as text, so the command always exits 0.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import platform
import shutil
import sys

from hpclm.bench.harness import cpu_model


def _probe(fn):
    try:
        return fn()
    except Exception as e:  # a broken piece is reported, never raised
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")}


def _package(name):
    def probe():
        mod = importlib.import_module(name)
        return {"ok": True, "version": getattr(mod, "__version__", "unknown")}
    return _probe(probe)


def _mpi():
    from hpclm import native
    ext = native.extension()
    if ext is not None and ext.build_info()["with_mpi"]:
        version, source = ext.mpi_library_version(), "hpclm._C"
    else:
        from mpi4py import MPI  # loads the MPI library but does not initialize it
        version, source = MPI.Get_library_version(), "mpi4py"
    return {"ok": True, "library_version": version.strip("\x00 \n"), "source": source, "mpirun": shutil.which("mpirun")}


def _horovod():
    import horovod
    import horovod.torch as hvd
    root = os.path.dirname(horovod.__file__)
    built = lambda sub: bool(glob.glob(os.path.join(root, sub, "mpi_lib*.so")))  # noqa: E731
    return {
        "ok": bool(hvd.mpi_built()),
        "version": horovod.__version__,
        "frameworks": {"pytorch": built("torch"), "tensorflow": built("tensorflow"), "mxnet": built("mxnet")},
        "controllers": {"mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built())},
        "tensor_operations": {"nccl": bool(hvd.nccl_built()), "ddl": bool(hvd.ddl_built()),
                              "ccl": bool(hvd.ccl_built()), "mpi": bool(hvd.mpi_built()),
                              "gloo": bool(hvd.gloo_built())},
        **({} if hvd.mpi_built() else {"error": "built without MPI: rebuild with HOROVOD_WITH_MPI=1"}),
    }


def _native():
    from hpclm import native
    ext = native.require()
    build = ext.build_info()
    return {"ok": True, "path": ext.__file__, "cpu_path": build["cpu_path"], "build": build,
            "cuda": {"built": build["with_cuda"], "archs": build["cuda_archs"], **ext.cuda_devices()},
            "kernels": _kernels(ext, build)}


def _kernels(ext, build) -> dict:
    """Each kernel of hpclm._C: its CPU paths (every one compiled; the in-use one is build's cpu_path), whether a
    CUDA version is built, and what it takes."""
    from hpclm.kernels.quant import SCHEMES
    cpu, cuda = build["cpu_paths_compiled"], bool(build["with_cuda"])
    table = {
        "fused_softmax": ("softmax_forward", {"cuda": cuda and hasattr(ext, "softmax_forward_cuda"),
                                              "dtypes": ["float32", "float16", "bfloat16", "float64"]}),
        "gemm_packed": ("gemm_packed", {"cuda": False, "dtypes": ["float32"]}),
        "decode_attention": ("decode_attention", {"cuda": False, "dtypes": ["float32"]}),
        "quant_matmul": ("quant_matmul", {"cuda": False, "dtypes": ["float32", "bfloat16"],
                                          "schemes": list(SCHEMES)}),
    }
    return {name: {"cpu_paths": cpu, **extra} for name, (symbol, extra) in table.items() if hasattr(ext, symbol)}


def _torch_runtime():
    import torch
    return {"ok": True, "version": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "cuda_device_count": torch.cuda.device_count(), "threads": torch.get_num_threads()}


def _threads():
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cores": os.cpu_count(), "affinity": affinity, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK")}


def _allocator():
    """The allocator this process runs under, and the caching allocators installed (hpclm.runtime)."""
    from hpclm import runtime
    return {"in_use": runtime.loaded(), "choice": os.environ.get(runtime.ALLOCATOR_ENV, "auto"),
            "installed": {name: runtime.find(name) for name in runtime.LIBRARIES}}


def _launch():
    from hpclm.comm.dist import launch_env
    launch = launch_env()
    return {"launched_by": launch.launcher, "rank": launch.rank, "size": launch.size,
            "local_rank": launch.local_rank, "local_size": launch.local_size}


def collect() -> dict:
    import hpclm
    return {
        "hpclm": {"ok": True, "version": hpclm.__version__, "path": os.path.dirname(hpclm.__file__)},
        "python": {"ok": True, "version": platform.python_version(), "executable": sys.executable},
        "host": {"ok": True, "hostname": platform.node(), "machine": platform.machine(), "cpu": cpu_model()},
        "packages": {name: _package(name) for name in ("torch", "numpy", "mpi4py", "horovod")},
        "torch": _probe(_torch_runtime),
        "mpi": _probe(_mpi),
        "horovod": _probe(_horovod),
        "native": _probe(_native),
        "threads": _threads(),
        "allocator": _allocator(),
        "launch": _probe(_launch),
    }


def _mark(ok):
    return "[X]" if ok else "[ ]"


def format_report(r: dict) -> str:
    lines = [f"hpclm {r['hpclm']['version']} ({r['hpclm']['path']})",
             f"Python {r['python']['version']} ({r['python']['executable']})",
             f"Host {r['host']['hostname']}: {r['host']['cpu']}, {r['threads']['cores']} cores"]

    def status(entry):
        return entry.get("version", "") if entry.get("ok") else f"missing: {entry.get('error')}"

    lines.append("\nPackages:")
    for name, entry in r["packages"].items():
        lines.append(f"    {_mark(entry['ok'])} {name:8s} {status(entry)}")
    mpi = r["mpi"]
    lines.append("\nMPI:")
    lines.append(f"    {_mark(mpi['ok'])} {mpi['library_version'] if mpi['ok'] else 'missing: ' + mpi['error']}")
    if mpi.get("ok"):
        lines.append(f"        mpirun: {mpi['mpirun'] or 'not on PATH'}")
    h = r["horovod"]
    lines.append("\nHorovod:" + (f" {h['version']}" if "version" in h else ""))
    if "frameworks" in h:
        for title, key in (("Available Frameworks", "frameworks"), ("Available Controllers", "controllers"),
                           ("Available Tensor Operations", "tensor_operations")):
            lines.append(f"    {title}:")
            lines += [f"        {_mark(v)} {k}" for k, v in h[key].items()]
    if h.get("error"):
        lines.append(f"    [ ] not usable: {h['error']}")
    n = r["native"]
    lines.append("\nNative kernels (hpclm._C):")
    if n["ok"]:
        b = n["build"]
        lines.append(f"    [X] {n['path']}")
        lines.append(f"        compiler: {b['compiler']} ({b['build_type']}, {b['cxx_flags'].strip()})")
        lines.append(f"        CPU paths compiled: {', '.join(b['cpu_paths_compiled'])}; "
                     f"this CPU runs: {', '.join(b['cpu_paths_supported'])}")
        lines.append(f"        CPU path in use: {b['cpu_path']} ({b['cpu_path_reason']})")
        lines.append(f"        OpenMP: {'yes' if b['openmp'] else 'no'}")
        for name, k in n["kernels"].items():
            extra = f"; schemes {', '.join(k['schemes'])}" if "schemes" in k else ""
            lines.append(f"        kernel {name}: CPU paths {', '.join(k['cpu_paths'])}{', CUDA' if k['cuda'] else ''} "
                         f"({', '.join(k['dtypes'])}{extra})")
        lines.append(f"        {_mark(b['with_mpi'])} MPI part" + (f" ({b['mpi_library_version']})" if b['with_mpi'] else " (not built: MPI not found at build time)"))
        c = n["cuda"]
        if c["built"]:
            devices = ", ".join(f"{d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')})" for d in c["devices"])
            seen = devices or f"no device ({c['error']})"
            lines.append(f"        [X] CUDA part (CUDA {b['cuda_compiler_version']}, archs {', '.join(c['archs'])}); devices: {seen}")
        else:
            lines.append(f"        [ ] CUDA part (not built; HPCLM_CUDA={b['cuda_requested']})")
    else:
        lines.append(f"    [ ] {n['error']}")
    t, th = r["torch"], r["threads"]
    lines.append("\nRuntime:")
    if t["ok"]:
        lines.append(f"    torch threads: {t['threads']}; torch CUDA: "
                     f"{t['cuda_device_count']} device(s)" if t["cuda_available"] else
                     f"    torch threads: {t['threads']}; torch CUDA: not available")
    lines.append(f"    cores: {th['cores']}, affinity: {th['affinity']}, OMP_NUM_THREADS={th['omp_num_threads']}")
    al = r["allocator"]
    installed = ", ".join(f"{k} {v}" for k, v in al["installed"].items() if v) or "none (apt-get install libjemalloc2)"
    lines.append(f"    allocator: {al['in_use']} (HPCLM_ALLOCATOR={al['choice']}; installed: {installed})")
    la = r["launch"]
    if la.get("ok", True) and la.get("launched_by") != "none":
        lines.append(f"    launched by {la['launched_by']}: rank {la['rank']} of {la['size']}, local rank {la['local_rank']}")
    else:
        lines.append("    single process (no MPI launcher)")
    return "\n".join(lines)


def main(args) -> int:
    report = collect()
    if report["launch"].get("rank", 0) != 0 and not args.all_ranks:
        return 0
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        prefix = f"[rank {report['launch']['rank']}] " if args.all_ranks else ""
        print("\n".join(prefix + line for line in format_report(report).splitlines()))
    return 0
