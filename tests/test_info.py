"""`hpclm info`: every field present, broken pieces reported with a reason (exit 0), rank/size under mpirun."""
import json

import pytest

from conftest import REPO, horovod_available, mpirun, run_python
from hpclm import runtime

SECTIONS = {"hpclm", "python", "host", "packages", "torch", "mpi", "horovod", "native", "threads", "allocator", "launch"}


def _info_json(env=None, cwd=None):
    proc = run_python(["-m", "hpclm", "info", "--json"], env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def test_info_json_has_every_field():
    r = _info_json()
    assert set(r) == SECTIONS
    assert set(r["packages"]) == {"torch", "numpy", "mpi4py", "horovod"}
    assert r["packages"]["torch"]["ok"] and r["packages"]["numpy"]["ok"]
    assert r["hpclm"]["path"] == str(REPO / "hpclm")
    assert {"threads", "cuda_available", "cuda_device_count"} <= set(r["torch"])
    assert {"cores", "affinity", "omp_num_threads"} <= set(r["threads"])
    n = r["native"]
    assert n["ok"] and n["cpu_path"] == n["build"]["cpu_path"]
    assert {"built", "archs", "devices", "error"} <= set(n["cuda"])
    assert set(n["kernels"]) == {"fused_softmax", "gemm_packed", "decode_attention", "quant_matmul"}
    quant = n["kernels"]["quant_matmul"]
    assert quant["cpu_paths"] == n["build"]["cpu_paths_compiled"] and "int4-block32" in quant["schemes"]
    MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (scripts/setup.sh installs it)")
    assert r["mpi"]["ok"] and r["mpi"]["library_version"] == MPI.Get_library_version().strip("\x00 \n")  # its own words
    assert r["launch"] == {"launched_by": "none", "rank": 0, "size": 1, "local_rank": 0, "local_size": 1}
    h = r["horovod"]
    assert h["ok"] == horovod_available()
    if h["ok"]:
        assert h["frameworks"]["pytorch"] and h["controllers"]["mpi"] and h["tensor_operations"]["mpi"]


def _expected_allocator():
    """What HPCLM_ALLOCATOR=auto runs under here: jemalloc, else tcmalloc, else glibc's malloc."""
    return next((name for name in ("jemalloc", "tcmalloc") if runtime.find(name)), "glibc malloc")


def test_compute_commands_run_under_the_caching_allocator_unless_told_not_to():
    """CI installs jemalloc (scripts/setup.sh): there `hpclm` re-executes itself with it preloaded."""
    auto = _info_json(env={"HPCLM_ALLOCATOR": "auto"})["allocator"]
    assert auto["in_use"].startswith(_expected_allocator()) and auto["choice"] == "auto"
    if auto["installed"]["jemalloc"]:
        assert auto["in_use"] == f"jemalloc ({auto['installed']['jemalloc']})"
    assert _info_json(env={"HPCLM_ALLOCATOR": "system"})["allocator"]["in_use"] == "glibc malloc"
    for bad, words in (("bogus", "is not an allocator choice"), *(
            [("tcmalloc", "no libtcmalloc_minimal.so.4 is installed")] if not runtime.find("tcmalloc") else [])):
        proc = run_python(["-m", "hpclm", "info"], env={"HPCLM_ALLOCATOR": bad})
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_only_a_process_started_as_hpclm_re_executes_itself():
    py = "/usr/bin/python3"
    assert runtime.started_as_hpclm([py, "-m", "hpclm", "train"]) == ["-m", "hpclm", "train"]
    assert runtime.started_as_hpclm([py, "-u", "-X", "dev", "-m", "hpclm", "eval"]) == ["-u", "-X", "dev", "-m", "hpclm", "eval"]
    assert runtime.started_as_hpclm([py, "/usr/local/bin/hpclm", "info", "-m", "x"]) == ["/usr/local/bin/hpclm", "info", "-m", "x"]
    for other in ([py, "-c", "from hpclm.cli import main; main()", "train"], [py, "run.py", "-m", "hpclm"],
                  [py, "-m", "pytest", "-m", "hpclm"], [py]):
        assert runtime.started_as_hpclm(other) is None, other


@pytest.mark.skipif(not runtime.find("jemalloc"), reason="libjemalloc2 is not installed (scripts/setup.sh installs it)")
def test_jemalloc_as_hpclm_preloads_it_keeps_freed_pages_for_the_next_tensor():
    """Page faults, not time: a 64 MiB tensor allocated again faults its pages in under glibc, not under jemalloc."""
    script = ("import resource, torch\n"
              "def faults():\n"
              "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "    torch.empty(16 << 20).fill_(1.0)\n"
              "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
              "faults()\n"
              "print(faults())\n")
    pages = (64 << 20) // 4096
    glibc = run_python(["-c", script])
    jemalloc = run_python(["-c", script], env=runtime.preload_env(runtime.find("jemalloc"), {}))
    assert glibc.returncode == 0 and jemalloc.returncode == 0, glibc.stderr + jemalloc.stderr
    assert int(glibc.stdout) > pages / 2 and int(jemalloc.stdout) < pages / 20, (glibc.stdout, jemalloc.stdout)


def test_info_text_report():
    proc = run_python(["-m", "hpclm", "info"])
    assert proc.returncode == 0, proc.stderr
    for heading in ("Packages:", "MPI:", "Horovod:", "Native kernels (hpclm._C):", "CPU path in use:", "Runtime:"):
        assert heading in proc.stdout
    assert "kernel quant_matmul: CPU paths scalar" in proc.stdout and "int8-block32" in proc.stdout
    assert "single process (no MPI launcher)" in proc.stdout


def test_missing_pieces_are_reported_not_raised(tmp_path):
    """Horovod and mpi4py hidden, the extension broken: each shown with its reason, exit 0."""
    for name in ("horovod", "mpi4py"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by the test')\n")
    shadow = tmp_path / "shadow"  # a copy of the package whose _C cannot load
    (shadow / "hpclm").mkdir(parents=True)
    for src in (REPO / "hpclm").glob("*.py"):
        (shadow / "hpclm" / src.name).write_text(src.read_text())
    (shadow / "hpclm" / "_C.py").write_text("raise ImportError('libmpi.so.40: cannot open shared object file')\n")
    r = _info_json(env={"PYTHONPATH": f"{shadow}:{tmp_path}"}, cwd=tmp_path)
    assert r["packages"]["horovod"] == {"ok": False, "error": "ImportError: horovod hidden by the test"}
    assert r["horovod"]["ok"] is False and "horovod hidden by the test" in r["horovod"]["error"]
    assert r["native"]["ok"] is False and "libmpi.so.40" in r["native"]["error"]
    assert r["mpi"]["ok"] is False and "mpi4py hidden by the test" in r["mpi"]["error"]
    assert r["hpclm"]["path"] == str(shadow / "hpclm")
    text = run_python(["-m", "hpclm", "info"], env={"PYTHONPATH": f"{shadow}:{tmp_path}"}, cwd=tmp_path)
    assert text.returncode == 0 and "Traceback" not in text.stdout + text.stderr
    assert "[ ] horovod  missing: ImportError: horovod hidden by the test" in text.stdout


def test_info_under_mpirun_reports_rank_and_size(tmp_path):
    # --output-filename: one file per rank, as mpirun may interleave the ranks' stdout
    proc = mpirun(2, ["-m", "hpclm", "info", "--json", "--all-ranks"], mpirun_args=["--output-filename", str(tmp_path)],
                  env={"HPCLM_ALLOCATOR": "auto"})
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("stdout"))]
    assert sorted((r["launch"]["rank"], r["launch"]["size"]) for r in reports) == [(0, 2), (1, 2)]
    assert {r["launch"]["launched_by"] for r in reports} == {"mpirun"}
    assert all(r["allocator"]["in_use"].startswith(_expected_allocator()) for r in reports)  # re-executed in place
