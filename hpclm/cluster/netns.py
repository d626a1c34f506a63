"""Several nodes on one machine: Linux network namespaces joined by a bridge over veth links, each link
shaped with tc's token bucket (tbf) where asked, Open MPI launched across them over TCP.

Every node is a namespace NAME-nI with one interface, eth0, whose peer sits in the cluster's switch
namespace NAME-sw on a bridge; nothing is added to the root namespace. A process run on a node
(`Cluster.node_command`) enters its namespace, gets the node's own hostname (a UTS namespace) and the
node's share of the cores (taskset), so Open MPI and Slurm see one host per node, as on a cluster.
The cluster's own hosts file, bind-mounted over /etc/hosts in a private mount namespace, resolves every
node name there.

    python -m hpclm.cluster up --nodes 2 --gbps 10
    python -m hpclm.cluster mpirun NAME --per-node 1 -- python -m hpclm info --all-ranks
    python -m hpclm.cluster down NAME

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2 and util-linux.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpclm.errors import HpclmError

STATE_ROOT = Path(os.environ.get("HPCLM_CLUSTER_DIR", "/run/hpclm-cluster"))
SUBNET = "10.213.0"  # NODE i is SUBNET.i/24; private to the cluster's own namespaces
TOOLS = ("ip", "tc", "nsenter", "unshare", "taskset")

# A launcher agent for Open MPI's plm_rsh_agent: `AGENT HOST CMD...` runs CMD on HOST (what `ssh HOST CMD`
# does on a cluster), HOST's namespace, hostname and cores included.
AGENT = """#!/bin/sh
# Open MPI's remote-shell agent for the namespace cluster in this folder: HOST CMD... -> CMD on HOST.
host=$1; shift
here=$(dirname "$0")
cpus=$(sed -n "s/^$host //p" "$here/cpus")
exec nsenter --net=/run/netns/"$host" unshare --mount --uts -- /bin/sh -c \\
  'mount --bind "$2" /etc/hosts && hostname "$0" && exec taskset -c "$1" /bin/sh -c "$3"' \\
  "$host" "${cpus:?unknown node $host}" "$here/hosts" "$*"
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def why_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if missing_tools():
        return f"missing tools: {', '.join(missing_tools())} (apt-get install iproute2 util-linux)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"hpclm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HpclmError(f"`{shlex.join(map(str, cmd))}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _netns_pids(ns: str) -> list[int]:
    """The processes living in one namespace (none for a namespace that is gone)."""
    return [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]


def _split_cores(nodes: int, cores: list[int]) -> list[str]:
    """Each node's cores: an even split where there are at least as many cores as nodes, else all of them."""
    if len(cores) < nodes:
        return [",".join(map(str, cores))] * nodes
    share = len(cores) // nodes
    return [",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(nodes)]


def tbf_args(gbps: float) -> list[str]:
    """tc tbf for a link of gbps Gbit/s: a bucket of 1 ms of traffic (at least two 64 KiB GSO segments,
    which must fit in one bucket) so that bursts stay a small part of any transfer worth measuring."""
    rate = int(gbps * 1e9)
    burst = max(2 * 65536 + 4096, rate // 8 // 1000)
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"]


@dataclass
class Cluster:
    name: str
    nodes: list[str]
    addresses: list[str]
    cpus: list[str]
    gbps: float | None = None
    mtu: int = 1500
    state: str = ""
    made: list[str] = field(default_factory=list)  # namespaces made so far

    @property
    def dir(self) -> Path:
        return Path(self.state)

    @property
    def subnet(self) -> str:
        return f"{SUBNET}.0/24"

    @property
    def agent(self) -> Path:
        return self.dir / "agent"

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, nodes: int = 2, gbps: float | None = None, mtu: int = 1500, name: str | None = None,
               cores: list[int] | None = None) -> "Cluster":
        """Make the namespaces, links and files; on any failure remove what was made and raise."""
        problem = why_unavailable()
        if problem:
            raise HpclmError(f"cannot make a namespace cluster here: {problem}")
        if not 1 <= nodes <= 200:
            raise HpclmError(f"--nodes {nodes}: give 1 to 200 nodes")
        if gbps is not None and not gbps > 0:
            raise HpclmError(f"--gbps {gbps}: give a link rate above 0 Gbit/s, or none for unshaped links")
        name = name or f"hc{secrets.token_hex(3)}"
        cores = cores or sorted(os.sched_getaffinity(0))
        node_names = [f"{name}-n{i + 1}" for i in range(nodes)]
        cluster = cls(name, node_names, [f"{SUBNET}.{i + 1}" for i in range(nodes)], _split_cores(nodes, cores),
                      gbps, mtu, str(STATE_ROOT / name))
        try:
            cluster._build()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _build(self):
        if self.dir.exists():
            raise HpclmError(f"{self.dir} exists: a cluster named {self.name} is up (hpclm.cluster down {self.name})")
        self.dir.mkdir(parents=True)
        self._save()
        _run("ip", "netns", "add", self.switch)
        self.made.append(self.switch)
        sw = ["ip", "-n", self.switch]
        _run(*sw, "link", "add", "br0", "type", "bridge")
        _run(*sw, "link", "set", "br0", "up")
        _run(*sw, "link", "set", "lo", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addresses, self.nodes))
        for i, (node, address) in enumerate(zip(self.nodes, self.addresses)):
            _run("ip", "netns", "add", node)
            self.made.append(node)
            port = f"p{i + 1}"
            _run("ip", "link", "add", "eth0", "netns", node, "mtu", self.mtu, "type", "veth",
                 "peer", "name", port, "netns", self.switch, "mtu", self.mtu)
            _run(*sw, "link", "set", port, "master", "br0")
            _run(*sw, "link", "set", port, "up")
            nd = ["ip", "-n", node]
            _run(*nd, "addr", "add", f"{address}/24", "dev", "eth0")
            _run(*nd, "link", "set", "eth0", "up")
            _run(*nd, "link", "set", "lo", "up")
            self._save()
        (self.dir / "hosts").write_text(hosts)
        self.shape(self.gbps)
        self.agent.write_text(AGENT)
        self.agent.chmod(0o755)
        (self.dir / "cpus").write_text("".join(f"{n} {c}\n" for n, c in zip(self.nodes, self.cpus)))
        self._save()

    def shape(self, gbps: float | None):
        """Limit every node link to gbps Gbit/s each way (tc tbf on the node's eth0 and on its switch port),
        or lift the limit (None); applies to a running cluster too."""
        if gbps is not None and not gbps > 0:
            raise HpclmError(f"link rate {gbps} Gbit/s: give a rate above 0, or none for unshaped links")
        for i, node in enumerate(self.nodes):
            for ns, dev in ((node, "eth0"), (self.switch, f"p{i + 1}")):
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)  # none yet: fine
                if gbps:
                    _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(gbps))
        self.gbps = gbps
        if self.state:
            self._save()

    def _save(self):
        (self.dir / "cluster.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, name: str) -> "Cluster":
        path = STATE_ROOT / name / "cluster.json"
        if not path.exists():
            known = sorted(p.name for p in STATE_ROOT.glob("*/cluster.json")) if STATE_ROOT.exists() else []
            raise HpclmError(f"no namespace cluster named {name} (up now: {', '.join(known) or 'none'})")
        return cls(**json.loads(path.read_text()))

    def pids(self) -> list[int]:
        """Every process living in one of the cluster's namespaces."""
        return [pid for ns in [*self.nodes, self.switch] for pid in _netns_pids(ns)]

    def kill_node(self, node: str, sig=signal.SIGKILL) -> int:
        """Signal every process on one node (what losing the machine does to its ranks); how many."""
        pids = _netns_pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def destroy(self, timeout: float = 10.0):
        """Kill what still runs in the namespaces, then remove every namespace (with its links) and the state folder."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + timeout / 2
            while self.pids() and time.time() < deadline:
                time.sleep(0.1)
        for ns in reversed(self.made):  # deleting a namespace deletes its end of every veth pair, hence the pair
            _run("ip", "netns", "del", ns, check=False)
        self.made.clear()
        if self.state:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    # -- running things on the nodes ---------------------------------------------------------
    def node_command(self, node: str | int, cmd: list[str]) -> list[str]:
        """cmd run on one node: its namespace, its hostname, its cores."""
        node = self.nodes[node] if isinstance(node, int) else node
        cpus = self.cpus[self.nodes.index(node)]
        # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup (which slurmd needs)
        return ["nsenter", f"--net=/run/netns/{node}", "unshare", "--mount", "--uts", "--", "/bin/sh", "-c",
                'mount --bind "$2" /etc/hosts && hostname "$0" && cpus=$1 && shift 2 && exec taskset -c "$cpus" "$@"',
                node, cpus, str(self.dir / "hosts"), *cmd]

    def mpi_options(self) -> list[str]:
        """Open MPI over the cluster's links: TCP between nodes (shared memory within one), the agent to
        start daemons on the other nodes, the cluster's subnet for both MPI traffic and the runtime's.
        --bind-to none: each node's processes already run on its own cores (taskset), and Open MPI's own
        binding would count cores of the whole machine, putting every node's first rank on core 0."""
        return ["--bind-to", "none", "--mca", "plm_rsh_agent", str(self.agent), "--mca", "btl", "tcp,vader,self",
                "--mca", "btl_tcp_if_include", self.subnet, "--mca", "oob_tcp_if_include", self.subnet]

    def mpirun_command(self, cmd: list[str], per_node: int = 1, nodes: int | None = None,
                       extra: list[str] = ()) -> list[str]:
        """mpirun, started on the first node, with per_node ranks on each of the first `nodes` nodes."""
        nodes = len(self.nodes) if nodes is None else nodes
        hosts = ",".join(f"{n}:{per_node}" for n in self.nodes[:nodes])
        mpirun = ["mpirun", "--host", hosts, "-np", str(per_node * nodes), *self.mpi_options(), *extra, *cmd]
        return self.node_command(0, mpirun)
