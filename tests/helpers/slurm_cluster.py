"""A real Slurm cluster (munge + slurmctld + slurmd) for tests: one node on localhost, or one slurmd per node
of a namespace cluster (hpclm.cluster.netns), where slurmctld and every client run on the first node.

Everything lives under one temporary directory, on free ports; clients find it through
SLURM_CONF; stop() cancels jobs and kills the daemons by PID.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import hang_guard

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _tool(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (all held open together while they are chosen). Another process may
    still take one before a daemon binds it: LocalSlurm.start then tries other ports."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_topology():
    out = subprocess.run([_tool("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    fields = dict(item.split("=", 1) for item in first.split())
    fields.pop("NodeName")
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    return " ".join(f"{k}={v}" for k, v in fields.items())


@dataclass
class Node:
    name: str
    address: str
    hardware: str  # the slurm.conf node fields after NodeName and NodeAddr (CPUs, memory, ...)


class LocalSlurm:
    def __init__(self, root: Path, cluster=None):
        """cluster: a hpclm.cluster.netns.Cluster, one Slurm node per namespace node; None: localhost alone."""
        self.root = Path(root)
        self.conf = self.root / "etc" / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.cluster = cluster
        if cluster is None:
            self.nodes = [Node("localhost", "127.0.0.1", _node_topology())]
        else:
            memory = int(_node_topology().split("RealMemory=")[1].split()[0]) // len(cluster.nodes)
            self.nodes = [Node(name, address, f"CPUs={len(cpus.split(','))} RealMemory={memory}")
                          for name, address, cpus in zip(cluster.nodes, cluster.addresses, cluster.cpus)]

    def on_node(self, index: int, cmd: list[str]) -> list[str]:
        """cmd as it runs on node `index` (the first node also runs slurmctld and the clients)."""
        return cmd if self.cluster is None else self.cluster.node_command(index, cmd)

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args, check=True, timeout=30) -> subprocess.CompletedProcess:
        return subprocess.run(self.on_node(0, [_tool(args[0]), *args[1:]]), env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout=30.0):
        d = self.root
        for sub in ("munge", "state", "log", "etc", *(f"{kind}/{node.name}" for node in self.nodes
                                                      for kind in ("spool", "tmp"))):
            (d / sub).mkdir(parents=True, exist_ok=True)  # a slurmd's spool must exist before it starts
        for path in (d, d / "munge"):  # munged refuses a socket path that is not o+x all the way
            path.chmod(0o755)
        key, sock = d / "munge" / "munge.key", d / "munge" / "munge.socket"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        subprocess.run([_tool("munged"), f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                        f"--seed-file={d}/munge/munge.seed"], check=True, capture_output=True)
        self._remember_pid("munged", d / "munge" / "munged.pid")
        for attempt in range(3):  # a port taken between choosing and binding: other ports
            try:
                return self._start_slurm(sock, timeout)
            except (RuntimeError, subprocess.CalledProcessError):
                self._terminate(*self.daemons)
                if attempt == 2:
                    raise

    def _start_slurm(self, sock, timeout):
        d = self.root
        self.conf.write_text(self._config(sock, *_free_ports(2)))
        self.run("slurmctld", "-f", str(self.conf))
        self._remember_pid("slurmctld", d / "slurmctld.pid")
        for i, node in enumerate(self.nodes):
            subprocess.run(self.on_node(i, [_tool("slurmd"), "-f", str(self.conf), "-N", node.name]), env=self.env,
                           capture_output=True, text=True, check=True, timeout=30)
            self._remember_pid(f"slurmd {node.name}", d / f"slurmd-{node.name}.pid")
        deadline = time.time() + timeout
        states = None
        while time.time() < deadline and all(self._alive(name) for name in self.pids if name != "munged"):
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if states == ["idle"] * len(self.nodes):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"Slurm did not become idle within {timeout} s (states {states!r}); logs in {d / 'log'}")

    @property
    def daemons(self) -> list[str]:
        return [f"slurmd {node.name}" for node in self.nodes] + ["slurmctld"]

    def _alive(self, name) -> bool:
        try:
            os.kill(self.pids[name], 0)
            return True
        except (KeyError, ProcessLookupError):
            return False

    def _terminate(self, *names):
        for name in names:
            pid = self.pids.pop(name, None)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _config(self, sock, ctld_port, slurmd_port):
        d = self.root
        head = self.nodes[0]
        return "\n".join([
            "ClusterName=hpclmtest", f"SlurmctldHost={head.name}({head.address})", "SlurmUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock},cred_expire=5",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=pmix", "ReturnToService=2", "KillWait=5",
            "EnforcePartLimits=ALL", "SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",  # %n: each slurmd its own
            f"TmpFS={d}/tmp/%n",  # PMIx's per-step folders: two "nodes" share this machine's /tmp
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd-%n.log",
            *(f"NodeName={n.name} NodeAddr={n.address} {n.hardware} State=UNKNOWN" for n in self.nodes),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            "",
        ])

    def _remember_pid(self, name, pid_file, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:  # daemons delete their pid file on exit: copy it at once
            try:
                self.pids[name] = int(pid_file.read_text().strip())
                return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not start (no {pid_file}); logs in {self.root / 'log'}")

    def stop(self, timeout=30.0):
        if "slurmctld" in self.pids:
            self.run("scancel", "--user", os.environ.get("USER", "root"), check=False)
            deadline = time.time() + timeout
            while time.time() < deadline and self.run("squeue", "-h", "-t", "R,CG", check=False).stdout.strip():
                time.sleep(0.5)
        self._terminate(*self.daemons, "munged")

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(self, *args, cwd=None, env=None) -> int:
        full_env = self.env | (env or {})
        proc = subprocess.run(self.on_node(0, [_tool("sbatch"), "--parsable", *args]), env=full_env, cwd=cwd,
                              capture_output=True, text=True, timeout=hang_guard(30))
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id) -> dict:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id, timeout=300.0, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")) -> dict:
        """Poll scontrol until the job reaches one of `until` (sbatch --wait can return ~30 s late)."""
        deadline = time.time() + hang_guard(timeout)
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")
