"""The ring allreduce (hpclm.ring.ring_allreduce) and `hpclm probe allreduce`, under real mpirun."""
import json
import os
import re
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, horovod_available, mpirun, run_python
from hpclm.bench import allreduce as probe, costmodel, harness
from hpclm.comm import ring
from hpclm.cli import build_parser
from hpclm.errors import HpclmError
from helpers.lm_fixtures import TINY, shakespeare_dir  # noqa: F401 (fixture)


# Waiting ranks yield the core: these tests check results, not speed, on a small shared machine.
YIELD = {"OMPI_MCA_mpi_yield_when_idle": "1"}


@pytest.fixture(scope="module", params=[1, 2, 3, 4])
def ring_run(request, tmp_path_factory):
    """tests/helpers/ring_cases.py under mpirun -np N; each rank's findings."""
    n = request.param
    out = tmp_path_factory.mktemp(f"ring{n}")
    proc = mpirun(n, [str(REPO / "tests" / "helpers" / "ring_cases.py"), str(out)], env=YIELD, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    for r in rows:
        assert "crash" not in r, r.get("crash")
    return n, rows


def test_ring_equals_mpi_allreduce(ring_run):
    """Every dtype and op, counts 0, 1, n-1, n, odd, long; in place and out of place; numpy and torch;
    1 to 3 reduction threads."""
    n, rows = ring_run
    for r in rows:
        assert r["failures"] == []
        counts = {0, 1, max(1, n - 1), n, 7, 1001}
        assert r["checked"] == 4 * 5 * 2 * (len(counts) + 1) + 16  # the whole grid ran
    assert {r["size"] for r in rows} == {n}


def test_ring_runs_on_the_given_communicator(ring_run):
    _, rows = ring_run
    assert all(r["communicators"] for r in rows)


def test_bad_arguments_raise_clear_errors_on_every_rank(ring_run):
    n, rows = ring_run
    expect = {
        "noncontig_numpy": ("ValueError", "buf is not C-contiguous"),
        "noncontig_torch": ("ValueError", "buf is not contiguous"),
        "readonly_in_place": ("ValueError", "buf is read-only"),
        "readonly_out": ("ValueError", "out is read-only"),
        "int_dtype": ("ValueError", "buf has dtype int32"),
        "not_a_buffer": ("TypeError", "numpy array or a CPU torch tensor, not list"),
        "out_mismatch": ("ValueError", "out (11 x float32) must match buf (10 x float32)"),
        "out_dtype": ("ValueError", "must match"),
        "out_overlaps": ("ValueError", "out overlaps buf"),
        "bad_op": ("ValueError", "unknown op 'mean'"),
        "bad_comm": ("TypeError", "mpi4py intracommunicator"),
        "bad_segment": ("ValueError", "segment_bytes must be a positive integer"),
        "mpi_op_band": ("ValueError", "unsupported MPI.Op"),
    }
    for r in rows:
        errors = r["errors"]
        for case, (kind, text) in expect.items():
            assert errors[case] is not None and errors[case][0] == kind and text in errors[case][1], (case, errors[case])
        assert errors["works_after_errors"]
        last = r["rank"] == n - 1
        if n == 1:
            assert errors["counts_differ"] is None and errors["dtypes_differ"] is None
        else:
            assert "ranks pass different element counts (10 to 11" in errors["counts_differ"][1]
            assert "ranks pass different dtypes" in errors["dtypes_differ"][1]
        bad = errors["one_rank_bad"]
        assert bad[0] == "ValueError"
        assert ("not C-contiguous" in bad[1]) if last else (f"rank {n - 1} passed invalid arguments" in bad[1])
        bad_comm = errors["one_rank_bad_comm"]
        assert (bad_comm[0], "mpi4py intracommunicator" in bad_comm[1]) == ("TypeError", True) if last else \
            (bad_comm[0], f"rank {n - 1} passed invalid arguments" in bad_comm[1]) == ("ValueError", True), bad_comm
        for case, what in (("segments_differ", "segment_bytes"), ("depths_differ", "depth")):
            if n == 1:
                assert errors[case] is None, errors[case]
            else:
                assert errors[case][0] == "ValueError" and f"ranks pass different {what}s" in errors[case][1], errors[case]
        assert errors["threads_differ"] is None and errors["threads_differ_result"]
        assert errors["mpi_op_objects"] == {"sum": True, "max": True, "min": True, "prod": True,
                                            "sum_value": True}


# --- the probe command ----------------------------------------------------------------------

def _table(stdout):
    """{(type, redop, size): {impl: [time, algbw, busbw, wrong]}} from the printed table."""
    lines = stdout.splitlines()
    group_line = next(line for line in lines if line.startswith("#") and "ring" in line and "size" not in line)
    impls = group_line[1:].split()
    table = {}
    for line in lines:
        if line.startswith("#") or not line.strip() or not line.split()[0].isdigit():
            continue
        cells = line.split()
        size, count, dtype, op = int(cells[0]), int(cells[1]), cells[2], cells[3]
        table[dtype, op, size] = {"count": count}
        for i, impl in enumerate(impls):
            table[dtype, op, size][impl] = cells[4 + 4 * i: 8 + 4 * i]
    return impls, table


def _assert_json_matches_table(doc, impls, table):
    assert len(doc["rows"]) == len(table) * len(impls)
    for row in doc["rows"]:
        cells = table[row["type"], row["redop"], row["size"]]
        assert cells["count"] == row["count"]
        time, algbw, busbw, wrong = cells[row["impl"]]
        if row["time_us"] is None:
            assert [time, algbw, busbw, wrong] == ["n/a"] * 4
            continue
        assert time == f"{row['time_us']:.1f}" and algbw == f"{row['algbw']:.2f}" and busbw == f"{row['busbw']:.2f}"
        assert wrong == str(row["wrong"])


def test_probe_table_json_and_plot(tmp_path):
    impl = "ring,mpi,horovod,sendrecv" if horovod_available() else "ring,mpi,sendrecv"
    out_json, out_png = tmp_path / "probe.json", tmp_path / "probe.png"
    proc = mpirun(2, ["-m", "hpclm", "probe", "allreduce", "-b", "4", "-e", "64K", "-f", "16", "-n", "2", "-w", "1",
                      "-d", "all", "-o", "all", "--impl", impl, "--segment", "1K",
                      "--json", str(out_json), "--plot", str(out_png)], env=YIELD, timeout=240,
                  mpirun_args=["--mca", "pml_base_verbose", "10"])  # Open MPI logs the PML it selects
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    impls, table = _table(proc.stdout)
    assert impls == impl.split(",")
    # sizes 4 B .. 64 KiB by 16, every dtype and op (float64 has no 4-byte row)
    assert len(table) == 4 * 4 * 4 - 4
    for key, cells in table.items():
        for name in impls:
            if name == "horovod" and key[0] == "bfloat16":
                assert cells[name] == ["n/a"] * 4  # Horovod has no bfloat16 allreduce
            else:
                assert cells[name][3] == "0", (key, name, cells[name])
    doc = json.loads(out_json.read_text())
    _assert_json_matches_table(doc, impls, table)
    assert doc["tool"] == "hpclm probe allreduce" and doc["host"]["ranks"] == 2 and doc["host"]["cores"] >= 1
    assert doc["mpi"]["nodes"] == 1 and doc["summary"]["wrong"] == 0
    model = doc["summary"]["model"]
    assert model["link_GBps"] > 0 and model["alpha_us"] >= 0
    assert [p["ranks"] for p in model["predictions"]] == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert "# Out of bounds values : 0 OK" in proc.stdout
    assert re.search(r"# Avg bus bandwidth \(GB/s\): ring [\d.]+ +mpi [\d.]+", proc.stdout)
    assert "Bandwidth dominates above S*" in proc.stdout and "# MPI: Open MPI" in proc.stdout
    if doc["mpi"]["library"].startswith("Open MPI"):  # the PML hpclm reports is the one Open MPI's log names
        selected = set(re.findall(r"selected (\w+) best priority", proc.stdout + proc.stderr))
        assert len(selected) == 1 and f"pml selected {selected.pop()}" in proc.stdout, proc.stderr[-2000:]
    if "horovod" in impls:
        assert "# n/a: horovod bfloat16: Horovod has no bfloat16 allreduce" in proc.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MPI_THREAD_MULTIPLE" not in proc.stderr  # reading MPI_T must not lower MPI's thread level


def test_probe_reports_a_corrupted_result_and_fails(tmp_path):
    """Three ranks in place; one element of the ring's checked result is overwritten on each of the last two
    ranks: #wrong counts both (a MAX over ranks instead of a SUM would show 1)."""
    out_json = tmp_path / "bad.json"
    proc = mpirun(3, ["-m", "hpclm", "probe", "allreduce", "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-w", "0",
                      "-d", "float32,bfloat16", "-o", "sum,avg", "--in-place", "--hugepages", "--impl", "ring,mpi,sendrecv",
                      "--json", str(out_json)], env={probe.CORRUPT_ENV: "ring", **YIELD}, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    impls, table = _table(proc.stdout)
    assert len(table) == 2 * 2 * 3
    for cells in table.values():
        assert cells["ring"][3] == "2" and cells["mpi"][3] == "0" and cells["sendrecv"][3] == "0"
    doc = json.loads(out_json.read_text())
    _assert_json_matches_table(doc, impls, table)
    assert doc["summary"]["wrong"] == 2 * len(table)
    assert f"# Out of bounds values : {2 * len(table)} WRONG" in proc.stdout
    assert "in place, huge-page buffers" in proc.stdout


def test_probe_single_process_and_cli_errors():
    """No launcher: one rank (busbw 0 by definition, no model); bad flags: one line, exit code 2."""
    proc = run_python(["-m", "hpclm", "probe", "allreduce", "-b", "1K", "-e", "4K", "-n", "1", "-w", "0",
                       "--impl", "ring,mpi"])
    assert proc.returncode == 0, proc.stderr
    _, table = _table(proc.stdout)
    assert [cells["ring"][2] for cells in table.values()] == ["0.00", "0.00"]
    assert "Ring model: needs at least 2 ranks" in proc.stdout
    bad = run_python(["-m", "hpclm", "probe", "allreduce", "-b", "12Q"])
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("hpclm probe: error: '12Q' is not a size: use a number of bytes with an optional "
                                  "K, M, G or T suffix (e.g. 64K, 256M)")


@pytest.mark.parametrize("argv, message", [
    (["-b", "1M", "-e", "1K"], "-b 1M must be at least 1 byte and at most -e 1K"),
    (["-f", "1"], "-f 1.0 must be greater than 1"),
    (["-n", "0"], "-n must be at least 1"),
    (["-d", "int8"], "unknown dtype 'int8'"),
    (["-o", "sum,mean"], "unknown op 'mean'"),
    (["--impl", "ring,nccl"], "unknown implementation 'nccl'"),
    (["--segment", "0"], "--segment must be at least 1"),
])
def test_probe_flag_errors(argv, message):
    args = build_parser().parse_args(["probe", "allreduce", *argv])
    with pytest.raises(HpclmError, match=re.escape(message)):
        probe.settings_from_args(args)


def test_probe_flags_to_settings():
    args = build_parser().parse_args(["probe", "allreduce", "-b", "1K", "-e", "1M", "-f", "4", "-d", "all",
                                      "-o", "avg,max", "--impl", "mpi,ring", "--segment", "256K", "--in-place"])
    s = probe.settings_from_args(args)
    assert s.sizes == [1024, 4096, 16384, 65536, 262144, 1048576]
    assert s.dtypes == list(probe.DTYPES) and s.ops == ["avg", "max"] and s.impls == ["mpi", "ring"]
    assert s.segment_bytes == 256 * 1024 and s.in_place and s.check


# --- pure pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", probe.DTYPES)
@pytest.mark.parametrize("ranks", [1, 2, 3, 7, 100, 1024, 3000])
def test_pattern_is_exact_in_any_reduction_order(dtype, ranks):
    """Accumulating the ranks' inputs in the dtype, forwards and backwards (as a ring would, with
    half types rounded after every step), gives exactly the pattern's expected sum/min/max."""
    pattern = probe.Pattern(dtype, ranks)
    tdtype = getattr(torch, dtype)
    start, stop = 12345, 12345 + 2000
    inputs = np.stack([pattern.inputs(r, start, stop) for r in range(ranks)])
    assert np.array_equal(torch.from_numpy(inputs).to(tdtype).double().numpy(), inputs)  # representable
    distinct = min(ranks, 3, pattern.m)  # rank r + m repeats rank r's values (m residues)
    assert len({inputs[r].tobytes() for r in range(distinct)}) == distinct
    for order in (range(ranks), reversed(range(ranks))):
        acc = None
        for r in order:
            x = torch.from_numpy(inputs[r]).to(tdtype)
            acc = x if acc is None else (acc.float() + x.float()).to(tdtype) if dtype in ("float16", "bfloat16") \
                else acc + x
        assert np.array_equal(acc.double().numpy(), pattern.reduced("sum", start, stop))
    assert np.array_equal(inputs.min(axis=0), pattern.reduced("min", start, stop))
    assert np.array_equal(inputs.max(axis=0), pattern.reduced("max", start, stop))
    assert np.array_equal(pattern.reduced("avg", start, stop), inputs.sum(axis=0) / ranks)


def test_pattern_counts_wrong_elements():
    pattern = probe.Pattern("float16", 3)
    t = torch.empty(5000, dtype=torch.float16)
    t[:] = torch.from_numpy(pattern.reduced("sum", 0, 5000)).half()
    assert pattern.count_wrong(t, lambda a, b: pattern.reduced("sum", a, b)) == 0
    t[17] += 1
    t[4000] = float("nan")
    assert pattern.count_wrong(t, lambda a, b: pattern.reduced("sum", a, b)) == 2


def test_ring_model_fit_recovers_alpha_and_bandwidth():
    n, alpha, bandwidth = 4, 7e-6, 3e9
    sizes = [2**k for k in range(10, 28, 2)]
    points = [(s, 2 * (n - 1) * alpha + 2 * (n - 1) / n * s / bandwidth) for s in sizes]
    model = costmodel.fit_ring_model(points, n)
    assert model["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert model["link_bytes_per_s"] == pytest.approx(bandwidth, rel=1e-6)
    assert costmodel.crossover_bytes(model, n) == pytest.approx(n * alpha * bandwidth)
    big = costmodel.predictions(model, [2**30])[-1]
    assert big["ranks"] == 1024 and big[str(2**30)]["busbw"] < bandwidth / 1e9
    # times that shrink faster than linear would give a negative latency: clamped to 0
    clamped = costmodel.fit_ring_model([(1000, 1e-7), (2000, 1e-6)], 2)
    assert clamped["alpha_s"] == 0 and clamped["link_bytes_per_s"] > 0
    assert costmodel.fit_ring_model(points, 1) is None and costmodel.fit_ring_model(points[:1], n) is None


def test_sizes_and_units():
    assert [harness.parse_size(x) for x in ("8", "64K", "1.5M", "2G", "4KiB", "16mb")] == \
        [8, 65536, 1572864, 2**31, 4096, 16 * 2**20]
    with pytest.raises(ValueError, match="'1X' is not a size"):
        harness.parse_size("1X")
    assert harness.format_size(2**20) == "1 MiB" and harness.format_size(1536) == "1.5 KiB" and \
        harness.format_size(100) == "100 B"
    assert probe.size_series(4, 64, 2) == [4, 8, 16, 32, 64] and probe.size_series(5, 5, 1) == [5]


def test_outputs_are_replaced_whole_with_the_usual_permissions(tmp_path):
    from hpclm import atomic
    path = tmp_path / "sub" / "out.json"
    harness.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600

    def half_then_fail(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_file(path, half_then_fail)  # the old file stays whole, the temporary goes
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure()
    harness.save_figure(fig, tmp_path / "sub" / "plot.png")  # the format comes from the temporary's suffix
    plt.close(fig)
    assert (tmp_path / "sub" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json", "plot.png"]


def test_reduce_to_and_divide_by_kernels():
    """The per-ISA kernels the ring adds: three-operand reduce (out of place) and the avg division."""
    from hpclm import native
    ext = native.require()
    for path in ext.build_info()["cpu_paths_supported"]:
        ext.set_cpu_path(path)
        for dtype in probe.DTYPES:
            tdtype = getattr(torch, dtype)
            a = torch.arange(-50, 51, dtype=tdtype) / 8  # 101 elements: vector body and tail
            b = torch.flip(a, [0]) * 3
            refs = {"sum": a.float() + b.float(), "prod": a.float() * b.float(),
                    "min": torch.minimum(a, b).float(), "max": torch.maximum(a, b).float()}
            for op, ref in refs.items():
                dst = torch.empty_like(a)
                ext.reduce_to(dst.data_ptr(), a.data_ptr(), b.data_ptr(), a.numel(), dtype, op)
                assert torch.equal(dst, ref.to(tdtype)), (path, dtype, op)
            ext.reduce_to(dst.data_ptr(), dst.data_ptr(), a.data_ptr(), a.numel(), dtype, "sum")  # dst is a
            assert torch.equal(dst, (refs["max"] + a.float()).to(tdtype)), (path, dtype)
            x = torch.arange(1, 200, dtype=tdtype)
            ext.divide_by(x.data_ptr(), x.numel(), dtype, 3.0)
            want = (torch.arange(1, 200, dtype=torch.float64) / 3).to(tdtype)
            assert torch.equal(x, want), (path, dtype)
    ext.set_cpu_path("auto")


def test_footer_model_lines():
    """Resolved latency: S* and predictions; sizes that are all bandwidth-bound: it says so instead."""
    def rows(alpha, sizes, n=2, bandwidth=4e9):
        return [{"impl": "ring", "size": x, "count": x // 4, "type": "float32", "redop": "sum", "in_place": False,
                 "time_us": (2 * (n - 1) * alpha + 2 * (n - 1) / n * x / bandwidth) * 1e6,
                 "algbw": 1.0, "busbw": 1.0, "wrong": 0} for x in sizes]
    settings = probe.Settings(sizes=[], dtypes=["float32"], ops=["sum"], impls=["ring"])
    where = {"library": "Open MPI v4.1.4", "says": {"pml selected": "ob1"}, "nodes": 1, "ranks_per_node": [2]}
    small = probe.summary(rows(20e-6, [4096, 65536, 2**20, 2**24]), 2)
    text = "\n".join(probe.footer_lines(small, [], 2, where, settings))
    assert small["model"]["latency_resolved"] and small["model"]["alpha_us"] == pytest.approx(20)
    assert "S* = n*alpha*B = 156 KiB on 2 ranks" in text and "#    1024" in text
    big = probe.summary(rows(1e-6, [2**24, 2**26, 2**28]), 2)
    text = "\n".join(probe.footer_lines(big, [], 2, where, settings))
    assert not big["model"]["latency_resolved"]
    assert "the latency is not resolved (from 16 MiB up every size is bandwidth-bound)" in text
    assert "Predicted ring" not in text
    assert "# MPI: Open MPI v4.1.4; pml selected ob1; 2 rank(s) on 1 node" in text


def test_native_calls_before_mpi_init_raise():
    """hpclm._C never initializes MPI: called before mpi4py has, it raises instead of aborting."""
    script = textwrap.dedent("""
        import numpy as np
        from hpclm import native
        ext = native.require()
        x = np.ones(4, np.float32)
        for name, call in [("ring_allreduce", lambda: ext.ring_allreduce(x.ctypes.data, x.ctypes.data, 4, "float32", "sum", 0)),
                           ("mpi_allreduce", lambda: ext.mpi_allreduce(x.ctypes.data, x.ctypes.data, 4, "float32", "sum", 0)),
                           ("mpi_sendrecv", lambda: ext.mpi_sendrecv(x.ctypes.data, x.ctypes.data, 16, 0)),
                           ("mpi_transport", ext.mpi_transport)]:
            try:
                call()
                print(name, "no error")
            except RuntimeError as e:
                print(e)
    """)
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    for name, line in zip(["ring_allreduce", "mpi_allreduce", "mpi_sendrecv", "mpi_transport"], lines):
        assert line.startswith(f"{name}: MPI is not initialized; import mpi4py first"), line


def test_mpi_errors_raise_runtime_error_with_mpis_text():
    """An MPI call that fails (here: a communicator handle MPI does not know) raises RuntimeError with
    the library's own error string; it does not abort the process."""
    script = textwrap.dedent("""
        import numpy as np
        from mpi4py import MPI
        from hpclm import native
        ext = native.require()
        x = np.ones(4, np.float32)
        bad = 987654  # no such Fortran handle
        for name, call in [("ring_allreduce", lambda: ext.ring_allreduce(x.ctypes.data, x.ctypes.data, 4, "float32", "sum", bad)),
                           ("mpi_allreduce", lambda: ext.mpi_allreduce(x.ctypes.data, x.ctypes.data, 4, "float32", "sum", bad)),
                           ("mpi_sendrecv", lambda: ext.mpi_sendrecv(x.ctypes.data, x.ctypes.data, 16, bad))]:
            try:
                call()
                print(name, "no error")
            except RuntimeError as e:
                print(name, "RuntimeError", e)
    """)
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr
    MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (scripts/setup.sh installs it)")
    text = MPI.Get_error_string(MPI.ERR_COMM)  # what this MPI library calls the error
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[n, "RuntimeError"] for n in
                                                    ("ring_allreduce", "mpi_allreduce", "mpi_sendrecv")], proc.stdout
    assert all(line.endswith(f"failed: {text}") for line in lines), proc.stdout


# --- hpclm probe predict ------------------------------------------------------------------------

def test_predict_link_model_takes_the_slower_of_probe_and_link():
    from hpclm.bench import predict
    fit = {"summary": {"model": {"alpha_s": 50e-6, "link_bytes_per_s": 0.9e9}}}
    on_1g = predict.link_model(fit, 1.0)  # the link is slower than the fit: it bounds B, alpha stays the fit's
    assert on_1g["bytes_per_s"] == pytest.approx(1e9 / 8 * 1448 / 1514) and on_1g["alpha_s"] == 50e-6
    on_10g = predict.link_model(fit, 10.0)  # the cores, not the link, set what the probe measured
    assert on_10g["bytes_per_s"] == 0.9e9 and on_10g["source"] == "probe fit of the ring"
    assert on_10g["floor_s"] == predict.HOROVOD_FLOOR_S  # the ring's fit knows nothing of Horovod's cycle
    rows = [{"impl": "horovod", "size": size, "time_us": 1000 + size / 0.1e9 * 1e6} for size in (1 << 16, 1 << 20, 1 << 24)]
    horovod = predict.link_model({"host": {"ranks": 2}, "rows": rows, "summary": fit["summary"]}, None)
    assert horovod["source"] == "probe fit of Horovod's allreduce" and horovod["floor_s"] == 0
    assert horovod["bytes_per_s"] == pytest.approx(0.1e9, rel=1e-6) and horovod["alpha_s"] == pytest.approx(500e-6)
    assert predict.link_model(None, 1.0)["alpha_s"] == predict.ALPHA_TCP_S
    for probe_doc, gbps, message in ((None, None, "give the link"), ({"summary": {}}, None, "no ring model"),
                                     (None, 0.0, "above 0")):
        with pytest.raises(HpclmError, match=message):
            predict.link_model(probe_doc, gbps)


def test_predict_compute_is_the_slowest_of_the_ranks_steps():
    from hpclm.bench import predict
    steps = [1.0, 2.0, 3.0, 4.0]
    assert predict.slowest_of(steps, 1) == pytest.approx(2.5)  # one rank: the mean step
    assert predict.slowest_of(steps, 2) == pytest.approx((1 * 1 + 2 * 3 + 3 * 5 + 4 * 7) / 16)
    assert 3.9 < predict.slowest_of(steps, 64) <= 4.0  # many ranks: nearly always one at the slowest step seen
    compute = {"step_s": 2.5, "step_times_s": steps, "parameters": 10, "tokens_per_step": 100}
    rows = [predict.predict(compute, n, predict.link_model(None, 10.0), False) for n in (1, 2, 8)]
    assert rows[0]["compute_s"] < rows[1]["compute_s"] < rows[2]["compute_s"]


def test_predict_exchange_follows_gradient_bytes_and_link():
    from hpclm.bench import predict
    compute = {"step_s": 0.05, "parameters": 10_000_000, "tokens_per_step": 3072}
    slow, fast = predict.link_model(None, 1.0), predict.link_model(None, 10.0)
    fp32, fp16 = predict.predict(compute, 2, slow, False), predict.predict(compute, 2, slow, True)
    assert fp32["gradient_bytes"] == 40_000_000 and fp16["gradient_bytes"] == 20_000_000
    # 2 ranks: each sends half its gradients twice (reduce-scatter, allgather) = S bytes at B
    assert fp32["exchange_s"] == pytest.approx(2 * slow["alpha_s"] + 40e6 / slow["bytes_per_s"])
    assert fp16["exchange_s"] < fp32["exchange_s"] and predict.predict(compute, 2, fast, False)["exchange_s"] < fp32["exchange_s"]
    assert fp32["tokens_per_s"] == pytest.approx(2 * 3072 / (0.05 + fp32["exchange_s"]))
    assert fp32["tokens_per_s"] < fp32["tokens_per_s_full_overlap"]
    one = predict.predict(compute, 1, slow, False)  # one rank exchanges nothing
    assert one["exchange_s"] == 0 and one["tokens_per_s"] == pytest.approx(3072 / 0.05)
    tiny = predict.predict({**compute, "parameters": 10}, 2, fast, False)
    assert tiny["exchange_s"] == predict.HOROVOD_FLOOR_S  # Horovod's cycle: no allreduce is faster


def test_predict_cli_measures_compute_and_writes_json(tmp_path, shakespeare_dir):
    out = tmp_path / "predict.json"
    sets = [f"data.path={json.dumps(str(shakespeare_dir))}", *TINY]
    proc = run_python(["-m", "hpclm", "probe", "predict", "--ranks", "4", "--link-gbps", "1", "--steps", "3",
                       "--warmup", "1", "--json", str(out), *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert [r["ranks"] for r in doc["rows"]] == [1, 2, 4]
    assert doc["compute"]["tokens_per_step"] == 4 * 32 and doc["compute"]["step_s"] > 0  # TINY: batch 4, block 32
    assert doc["rows"][0]["gradient_bytes"] == 4 * doc["compute"]["parameters"]
    assert "ranks" in proc.stdout and "1 Gbit/s link less headers" in proc.stdout
    # started as hpclm by no launcher, it measures one rank of a Horovod job (mpirun -np 1), as the job runs it
    assert doc["compute"]["backend"] == ("horovod" if horovod_available() else "single")
    bad = run_python(["-m", "hpclm", "probe", "predict", *[a for s in sets for a in ("--set", s)]])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--link-gbps" in bad.stderr, bad.stderr
    missing = run_python(["-m", "hpclm", "probe", "predict", "--link-gbps", "1", "--set", 'data.path="/nonexistent"'])
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "/nonexistent" in missing.stderr, missing.stderr
    ngram = run_python(["-m", "hpclm", "probe", "predict", "--link-gbps", "1", "--config", "configs/ngram.toml",
                        "--set", f"data.path={json.dumps(str(shakespeare_dir))}"])
    assert ngram.returncode == 2 and "gpt and gru" in ngram.stderr, ngram.stderr
