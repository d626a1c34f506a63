"""Open MPI settings hpclm gives every process before MPI starts, as OMPI_MCA_* variables; a value already
in the environment (the user's, or one of mpirun's own --mca flags, which reach the ranks the same way)
wins. README "Across nodes" has the measurements behind each.

- btl_tcp_links = 2: two TCP connections per pair of ranks on different nodes instead of one. With one,
  MPI_Sendrecv and MPI_Allreduce (Horovod's gradient exchange) reached half of a 1 Gbit/s link; with two,
  all of it. Within a node (shared memory) it changes nothing.
- btl_tcp_eager_limit = 1 MiB (Open MPI's default: 64 KiB): a message up to that size goes to a rank on another
  node at once, without the rendezvous handshake, which waits for the receiver's MPI progress. Horovod reduces
  the first gradients while backward still runs, when that progress is slow (Horovod's thread shares the
  rank's core with backward); the wait after backward on a 1 Gbit/s link about halved, 256 KiB was not
  enough, and unshaped or 10 Gbit/s links did not change. Within a node (shared memory) it changes nothing.
- mpi_yield_when_idle = 1 when the job spans nodes: a rank busy-polling MPI on the core that also runs
  the kernel's TCP work for it held small messages up for milliseconds (1 KiB: 8 ms, not 60 us). Within
  one node polling is faster (about 2 us less per small allreduce), so it stays off there unless set
  (hpclm.dist.init turns it on for Horovod's background thread: `dist.mpi_yield_when_idle`).
"""
from __future__ import annotations

import os

TCP_LINKS = "2"
TCP_EAGER_LIMIT = str(1 << 20)


def _int(env, name):
    try:
        return int(env.get(name, ""))
    except ValueError:
        return None


def spans_nodes(env=None) -> bool:
    """Whether the launcher says this job's ranks run on more than one node: mpirun's (or Horovod's, or a
    PMI launcher's) world size against this node's share, else srun's node count for the step."""
    env = os.environ if env is None else env
    for size, local in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"), ("HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE"),
                        ("PMI_SIZE", "MPI_LOCALNRANKS")):
        if _int(env, size) is not None and _int(env, local) is not None:
            return _int(env, local) < _int(env, size)
    return (_int(env, "SLURM_STEP_NUM_NODES") or 1) > 1


def defaults(env=None) -> dict[str, str]:
    """The MCA settings hpclm would add to this environment (name without the OMPI_MCA_ prefix -> value)."""
    env = os.environ if env is None else env
    out = {"btl_tcp_links": TCP_LINKS, "btl_tcp_eager_limit": TCP_EAGER_LIMIT}
    if spans_nodes(env):
        out["mpi_yield_when_idle"] = "1"
    return {k: v for k, v in out.items() if f"OMPI_MCA_{k}" not in env}


def apply(env=None) -> dict[str, str]:
    """Set defaults() in the environment (before MPI_Init: Open MPI reads them there); what was set."""
    env = os.environ if env is None else env
    added = defaults(env)
    for name, value in added.items():
        env[f"OMPI_MCA_{name}"] = value
    return added
