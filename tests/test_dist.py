"""hpclm.dist: launcher detection, single-process use, and real multi-rank collectives under mpirun."""
import json
import math
import os
import re
import textwrap

import pytest
import torch

import hpclm.dist as dist
from conftest import REPO, mpirun, requires_horovod, run_python

COLLECTIVES = textwrap.dedent("""
    import json, sys, torch
    import hpclm.dist as dist
    dist.init()
    r, n = dist.rank(), dist.size()
    x = torch.arange(5, dtype=torch.float32) + 10 * r
    out = {
        "backend": dist.backend(), "rank": r, "size": n, "local_rank": dist.local_rank(),
        "local_size": dist.local_size(), "distributed": dist.is_distributed(),
        "threads": torch.get_num_threads(),
        "sum": dist.allreduce(x, "sum").tolist(), "avg": dist.allreduce(x, "avg").tolist(),
        "min": dist.allreduce(x, "min").tolist(), "max": dist.allreduce(x, "max").tolist(),
        "isum": dist.allreduce(torch.tensor([r + 1], dtype=torch.int64), "sum").tolist(),
        "x_after": x.tolist(),
        "bcast": dist.broadcast(torch.full((3,), float(r)), root=n - 1).tolist(),
        "prod": dist.allreduce(torch.tensor([r + 2.0, 1.5]), "product").tolist(),
        "obj": dist.broadcast_object({"root": r, "tag": "hello" * r}, root=n - 1),
        "obj_from_root_only": dist.broadcast_object({"x": 1} if r == 0 else None, root=0),
        "gathered_mixed": dist.allgather_object(None if r % 2 else [r]),
        "gathered": dist.allgather_object(r * r),
    }
    in_place = torch.full((4,), float(r))
    returned = dist.broadcast(in_place, root=n - 1)
    out["bcast_in_place"], out["bcast_returns_it"] = in_place.tolist(), returned is in_place
    dist.barrier()
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:  # one file per rank: mpirun interleaves stdout
        json.dump(out, f)
""")


def _results(proc, out_dir, n):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == list(range(n)), proc.stdout
    return rows


def _check_collectives(rows, n):
    base = torch.arange(5, dtype=torch.float32)
    ranks_x = [base + 10 * r for r in range(n)]
    for row in rows:
        r = row["rank"]
        assert row["size"] == n and row["distributed"] == (n > 1)
        assert row["sum"] == sum(ranks_x).tolist()
        assert row["avg"] == pytest.approx((sum(ranks_x) / n).tolist())
        assert row["min"] == ranks_x[0].tolist()
        assert row["max"] == ranks_x[-1].tolist()
        assert row["isum"] == [n * (n + 1) // 2]
        assert row["x_after"] == ranks_x[r].tolist(), "allreduce must not modify its input"
        assert row["bcast"] == [float(n - 1)] * 3
        assert row["bcast_in_place"] == [float(n - 1)] * 4 and row["bcast_returns_it"]  # documented: in place
        assert row["prod"] == pytest.approx([math.prod(q + 2.0 for q in range(n)), 1.5 ** n])
        assert row["obj"] == {"root": n - 1, "tag": "hello" * (n - 1)}
        assert row["gathered"] == [q * q for q in range(n)]
        assert row["obj_from_root_only"] == {"x": 1}  # other ranks pass None: must not deadlock
        assert row["gathered_mixed"] == [None if q % 2 else [q] for q in range(n)]


def test_single_process_needs_no_launcher(tmp_path):
    proc = run_python(["-c", COLLECTIVES, str(tmp_path)])
    rows = _results(proc, tmp_path, 1)
    assert rows[0]["backend"] == "single"
    _check_collectives(rows, 1)


@requires_horovod
@pytest.mark.parametrize("n", [2, 3])
def test_collectives_under_mpirun(n, tmp_path):
    rows = _results(mpirun(n, ["-c", COLLECTIVES, str(tmp_path)]), tmp_path, n)
    assert {r["backend"] for r in rows} == {"horovod"}
    assert {r["local_size"] for r in rows} == {n}
    assert sorted(r["local_rank"] for r in rows) == list(range(n))
    _check_collectives(rows, n)


YIELD_SETTING = textwrap.dedent("""
    import json, sys
    import hpclm.dist as dist
    from hpclm import native
    dist.init(mpi_yield_when_idle=sys.argv[2] == "on")
    says = dict(native.require().mpi_transport())  # the value Open MPI itself reports through MPI_T
    with open(f"{sys.argv[1]}/rank{dist.rank()}.json", "w") as f:
        json.dump(says.get("mpi_yield_when_idle"), f)
""")


@requires_horovod
@pytest.mark.parametrize("setting, env_value, expect", [
    ("on", None, "true"), ("off", None, "false"), ("on", "0", "false"),  # a value in the environment wins
])
def test_open_mpi_yields_when_idle_by_default(setting, env_value, expect, tmp_path):
    env = {"OMPI_MCA_mpi_yield_when_idle": env_value} if env_value else {}
    # 2 ranks on 2 slots: not oversubscribed, so Open MPI would not turn yielding on by itself
    proc = mpirun(2, ["-c", YIELD_SETTING, str(tmp_path), setting], env={**env, "OMPI_MCA_rmaps_base_oversubscribe": "0"},
                  mpirun_args=["--host", "localhost:2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [expect, expect]


def test_several_ranks_without_horovod_is_one_line_error(tmp_path):
    fake = tmp_path / "horovod"  # shadows the real package: Horovod "not installed"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named horovod (hidden by test)')\n")
    proc = mpirun(2, ["-m", "hpclm.dist"], env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if "Horovod is not usable" in line]
    assert err, proc.stderr
    assert "scripts/setup.sh" in err[0] and "rank" in err[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("env, expect", [
    ({}, ("none", 0, 1, 0)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ("mpirun", 3, 4, 1)),
    ({"PMIX_RANK": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "0", "SLURM_PROCID": "2"}, ("pmix", 2, 8, 0)),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1"}, ("srun", 5, 6, 1)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, ("none", 0, 1, 0)),  # a batch script's own shell
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1"}, ("horovodrun", 1, 2, 1)),
])
def test_launch_env(env, expect):
    launch = dist.launch_env(env)
    assert (launch.launcher, launch.rank, launch.size, launch.local_rank) == expect


def test_bad_op_and_root_are_value_errors():
    with pytest.raises(ValueError, match="unknown allreduce op 'mean'"):
        dist.allreduce(torch.ones(1), "mean")
    with pytest.raises(ValueError, match="root rank 1 is outside 0..0"):
        dist.broadcast(torch.ones(1), root=1)


THREADS = "import json, sys, torch; import hpclm.dist as dist; dist.init(); print(json.dumps([dist.rank(), torch.get_num_threads()]))"


@requires_horovod
def test_each_rank_gets_its_share_of_the_cores_unless_told():
    """Under a launcher: cores / ranks on the node torch threads, unless OMP_NUM_THREADS or SLURM_CPUS_PER_TASK
    says otherwise."""
    cores = len(os.sched_getaffinity(0))

    def threads(n, **env):
        proc = mpirun(n, ["-c", THREADS], env={"OMP_NUM_THREADS": "", **env})
        assert proc.returncode == 0, proc.stderr
        # every [rank, threads] wherever it falls: mpirun has joined two ranks' lines into one
        return sorted(tuple(json.loads(m)) for m in re.findall(r"\[\d+, \d+\]", proc.stdout))

    assert threads(1) == [(0, cores)]
    assert threads(2) == [(0, max(1, cores // 2)), (1, max(1, cores // 2))]
    assert threads(1, SLURM_CPUS_PER_TASK="3") == [(0, 3)]
    assert threads(1, OMP_NUM_THREADS="1") == [(0, 1)]  # torch takes it; hpclm leaves it alone


@pytest.mark.parametrize("env, spans", [
    ({}, False),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, True),   # mpirun, 2 nodes x 2
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, False),  # mpirun, one node
    ({"SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "0"}, True),                 # srun across 2 nodes
    ({"SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": "1"}, False),
    ({"HOROVOD_SIZE": "8", "HOROVOD_LOCAL_SIZE": "4"}, True),
])
def test_open_mpi_defaults_follow_the_launchers_node_count(env, spans):
    from hpclm.comm import mca
    assert mca.spans_nodes(env) is spans
    assert mca.defaults(env) == {"btl_tcp_links": "2", "btl_tcp_eager_limit": str(1 << 20),
                                 **({"mpi_yield_when_idle": "1"} if spans else {})}
    mine = {**env, "OMPI_MCA_btl_tcp_links": "4", "OMPI_MCA_mpi_yield_when_idle": "0",  # the user's values win
            "OMPI_MCA_btl_tcp_eager_limit": "65536"}
    assert mca.apply(mine) == {} and mine["OMPI_MCA_btl_tcp_links"] == "4" and mine["OMPI_MCA_mpi_yield_when_idle"] == "0"
    assert mine["OMPI_MCA_btl_tcp_eager_limit"] == "65536"
    fresh = dict(env)
    assert mca.apply(fresh) == mca.defaults(env) and fresh["OMPI_MCA_btl_tcp_links"] == "2"
