"""hpclm._C: build facts, run-time CPU path selection, and the dispatched reduce kernel on every path."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import SECOND_BUILD, SECOND_BUILD_MARK, hang_guard, REPO, run_python
from hpclm import native

C = native.require()
INFO = C.build_info()
FIELDS = {"compiler", "cxx_flags", "build_type", "cpu_paths_compiled", "cpu_paths_supported", "cpu_path",
          "cpu_path_reason", "openmp", "openmp_version", "openmp_max_threads", "with_mpi", "mpi_standard",
          "mpi_library_version", "cuda_requested", "with_cuda", "cuda_archs", "cuda_compiler_version",
          "cuda_runtime_version"}


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_build_info_has_every_field():
    assert FIELDS <= set(INFO), FIELDS - set(INFO)
    assert INFO["build_type"] == "Release" and "-O3" in INFO["cxx_flags"]
    assert "-march=native" not in INFO["cxx_flags"], "CPU paths must be chosen at run time"


def test_cpu_paths_match_this_cpu():
    flags = _cpu_flags()
    assert INFO["cpu_paths_compiled"][0] == "scalar"
    if os.uname().machine == "x86_64":
        assert set(INFO["cpu_paths_compiled"]) == {"scalar", "avx2", "avx512", "avx512_vnni"}
    expect = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        expect.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        expect.append("avx512")
        if "avx512_vnni" in flags:
            expect.append("avx512_vnni")
    assert INFO["cpu_paths_supported"] == [p for p in INFO["cpu_paths_compiled"] if p in expect]
    assert INFO["cpu_path"] == INFO["cpu_paths_supported"][-1]


def test_mpi_part_matches_build_machine():
    assert INFO["with_mpi"] == (shutil.which("mpicc") is not None)
    if INFO["with_mpi"]:
        assert INFO["mpi_library_version"].startswith(("Open MPI", "MPICH", "Intel", "MVAPICH"))
        assert C.mpi_library_version() == INFO["mpi_library_version"]


def test_cuda_part_matches_what_was_asked():
    asked = INFO["cuda_requested"]
    assert asked in ("auto", "0", "1")
    expect = {"0": False, "1": True, "auto": shutil.which("nvcc") is not None}[asked]
    assert INFO["with_cuda"] == expect
    devices = C.cuda_devices()
    if INFO["with_cuda"]:
        assert INFO["cuda_archs"] == ["80-real", "90-real", "90-virtual"]
        assert INFO["cuda_runtime_version"] >= 11000
        # the statically linked runtime imports and answers with or without a driver
        assert devices["devices"] or devices["error"]
    else:
        assert INFO["cuda_archs"] == [] and devices == {"devices": [], "error": "built without CUDA"}


@pytest.mark.parametrize("asked, expect_path, expect_reason", [
    ("scalar", "scalar", "HPCLM_CPU_PATH=scalar"),
    ("sse9", None, "is not scalar|avx2|avx512|avx512_vnni"),
])
def test_cpu_path_environment_override(asked, expect_path, expect_reason):
    proc = run_python(["-c", "import hpclm._C as C; i = C.build_info(); print(i['cpu_path']); print(i['cpu_path_reason'])"],
                      env={"HPCLM_CPU_PATH": asked})
    assert proc.returncode == 0, proc.stderr
    path, reason = proc.stdout.splitlines()
    assert path == (expect_path or INFO["cpu_paths_supported"][-1])
    assert expect_reason in reason


def test_set_cpu_path_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError, match="unknown CPU path 'neon'"):
        C.set_cpu_path("neon")
    assert C.cpu_path() == INFO["cpu_path"]


DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
NP_OPS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}


def _bf16_round(x32):
    """float32 -> bfloat16 -> float32, round to nearest even (numpy reference)."""
    u = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (u.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(params=INFO["cpu_paths_supported"])
def cpu_path(request):
    C.set_cpu_path(request.param)
    yield request.param
    C.set_cpu_path("auto")


@pytest.mark.parametrize("count", [0, 1, 7, 1000, 70001])
@pytest.mark.parametrize("op", list(NP_OPS))
def test_reduce_into_every_path(cpu_path, count, op):
    rng = np.random.default_rng(count)
    for name, dt in DTYPES.items():
        a = rng.standard_normal(count).astype(dt)
        b = rng.standard_normal(count).astype(dt)
        expect = NP_OPS[op](a.astype(np.float64), b.astype(np.float64)).astype(dt)
        C.reduce_into(a.ctypes.data, b.ctypes.data, count, name, op, 2)
        np.testing.assert_array_equal(a, expect, err_msg=f"{cpu_path} {name} {op}")
    # bfloat16 as raw uint16 bits: combine in float32, round once
    a32 = _bf16_round(rng.standard_normal(count).astype(np.float32))
    b32 = _bf16_round(rng.standard_normal(count).astype(np.float32))
    a16 = (a32.view(np.uint32) >> 16).astype(np.uint16)
    b16 = (b32.view(np.uint32) >> 16).astype(np.uint16)
    C.reduce_into(a16.ctypes.data, b16.ctypes.data, count, "bfloat16", op, 1)
    got = (a16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, _bf16_round(NP_OPS[op](a32, b32)), err_msg=f"{cpu_path} bfloat16 {op}")


def test_reduce_into_rejects_bad_names():
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        C.reduce_into(a.ctypes.data, a.ctypes.data, 4, "int8", "sum")
    with pytest.raises(ValueError, match="unsupported reduce op 'avg'"):
        C.reduce_into(a.ctypes.data, a.ctypes.data, 4, "float32", "avg")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cuda_required_without_nvcc_fails_at_configure(tmp_path):
    """HPCLM_CUDA=1 on a machine without nvcc stops at configure time and says so."""
    import pybind11
    bin_dir = tmp_path / "bin"  # a PATH with the compilers but without nvcc
    bin_dir.mkdir()
    for tool in ("cc", "c++", "gcc", "g++", "mpicc", "make", "ld", "as", "ar"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_PATH"}
    env["PATH"] = str(bin_dir)
    env["CUDA_HOME"] = str(tmp_path / "no-cuda-here")
    proc = subprocess.run([shutil.which("cmake"), "-S", str(REPO), "-B", str(tmp_path / "build"), "-DHPCLM_CUDA=1",
                           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                          env=env, capture_output=True, text=True, timeout=hang_guard(120))
    assert proc.returncode != 0
    assert "HPCLM_CUDA=1 but nvcc was not found" in proc.stdout + proc.stderr


def test_make_build_rebuilds_what_a_changed_option_changes():
    """`make build` after a change of build options installs that configuration's module, and going back
    installs the first one's again (each configuration links its own module; the chosen one is copied)."""
    def build(extra):
        proc = subprocess.run(["make", "build"], cwd=REPO, env={**os.environ, **extra}, capture_output=True,
                              text=True, timeout=hang_guard(600))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        info = run_python(["-c", "import json, hpclm._C as C; i = C.build_info(); "
                           "print(json.dumps([i['cxx_flags'], i['with_cuda']]))"])
        return __import__("json").loads(info.stdout)

    mark, other = SECOND_BUILD_MARK, SECOND_BUILD
    default = {"HPCLM_CUDA": INFO["cuda_requested"], "HPCLM_CMAKE_ARGS": ""}
    try:
        for _ in range(2):  # the second round finds both configurations built and up to date
            flags, with_cuda = build(other)
            assert mark in flags and with_cuda is False
            flags, with_cuda = build(default)
            assert mark not in flags and with_cuda == INFO["with_cuda"]
    finally:
        build(default)
