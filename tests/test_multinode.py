"""Across nodes: a cluster of network-namespace nodes on this machine (hpclm.cluster.netns), Open MPI over
TCP between them, links shaped with tc tbf. Every namespace, link and file is removed after the module."""
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, child_env, hang_guard, requires_horovod
from helpers.lm_fixtures import TINY, records, shakespeare_dir  # noqa: F401 (fixture)
from hpclm.cluster.netns import Cluster, why_unavailable

_PROBLEM = why_unavailable()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no namespace cluster here: {_PROBLEM}")


@pytest.fixture(scope="module")
def cluster():
    with Cluster.create(nodes=2) as c:
        yield c


def cluster_mpirun(cluster, args, per_node=1, env=None, timeout=180, extra=()) -> subprocess.CompletedProcess:
    cmd = cluster.mpirun_command([sys.executable, *args], per_node=per_node, extra=list(extra))
    return subprocess.run(cmd, env=child_env(env), cwd=REPO, capture_output=True, text=True,
                          timeout=hang_guard(timeout))


WHO = textwrap.dedent("""
    import json, socket, sys
    import hpclm.dist as dist
    dist.init()
    print("WHO " + json.dumps({"rank": dist.rank(), "size": dist.size(), "local_rank": dist.local_rank(),
                               "local_size": dist.local_size(), "host": socket.gethostname(),
                               "sum": dist.allreduce(__import__("torch").tensor([dist.rank() + 1.0]), op="sum").item()}))
""")


@requires_horovod
def test_ranks_know_their_node(cluster):
    proc = cluster_mpirun(cluster, ["-c", WHO], per_node=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("WHO ")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    assert {r["size"] for r in rows} == {4} and {r["local_size"] for r in rows} == {2}
    assert {r["sum"] for r in rows} == {10.0}
    by_host = {}
    for r in rows:
        by_host.setdefault(r["host"], []).append(r["local_rank"])
    assert sorted(by_host) == cluster.nodes  # mpirun's --host order: ranks 0,1 on n1, 2,3 on n2
    assert all(sorted(local) == [0, 1] for local in by_host.values())


def test_info_all_ranks_shows_two_hosts(cluster):
    proc = cluster_mpirun(cluster, ["-m", "hpclm", "info", "--json", "--all-ranks"], per_node=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads(chunk) for chunk in _json_objects(proc.stdout)]
    assert sorted(r["host"]["hostname"] for r in reports) == cluster.nodes


def _json_objects(text: str):
    """The top-level JSON objects printed one after another (one per rank)."""
    decoder, i = json.JSONDecoder(), 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return
        obj, end = decoder.raw_decode(text, i)
        yield json.dumps(obj)
        i = end
