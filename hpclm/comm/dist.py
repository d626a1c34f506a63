"""Ranks and collectives for data-parallel training.

Horovod (over MPI) is the backend when the process was started by a launcher
(mpirun, horovodrun, srun); a plain `python` process is one rank and needs
neither MPI nor Horovod. Every rank must enter every collective.

    import hpclm.dist as dist
    dist.init()
    total = dist.allreduce(torch.tensor([1.0]), op="sum")
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from hpclm.comm import mca
from hpclm.errors import DistError, HpclmError

OPS = ("sum", "avg", "min", "max", "product")


@dataclass(frozen=True)
class Launch:
    """What the launcher's environment says about this process."""

    launcher: str  # "mpirun", "horovodrun", "pmix", "pmi", "srun" or "none"
    rank: int
    size: int | None  # None where the launcher does not export it (PMIx without Slurm)
    local_rank: int
    local_size: int | None


def _int_env(env, name):
    value = env.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def launch_env(env=None) -> Launch:
    """Read rank/size from Open MPI, Horovod, PMIx, PMI or Slurm (srun task) variables, in that order."""
    env = os.environ if env is None else env
    slurm_size = _int_env(env, "SLURM_STEP_NUM_TASKS")
    slurm_local = _int_env(env, "SLURM_LOCALID")
    table = [
        ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
        ("pmix", "PMIX_RANK", None, None, None),
        ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
    ]
    for launcher, rank_var, size_var, local_var, local_size_var in table:
        rank = _int_env(env, rank_var)
        if rank is None or (launcher == "srun" and slurm_size is None):
            continue  # SLURM_PROCID alone is also set in a batch script's own shell
        size = _int_env(env, size_var) if size_var else slurm_size
        local_rank = _int_env(env, local_var) if local_var else slurm_local
        local_size = _int_env(env, local_size_var) if local_size_var else None
        return Launch(launcher, rank, size, local_rank if local_rank is not None else 0, local_size)
    return Launch("none", 0, 1, 0, 1)


class _SingleProcess:
    name = "single"
    tensor_parallel = 1

    def rank(self):
        return 0

    def size(self):
        return 1

    def local_rank(self):
        return 0

    def local_size(self):
        return 1

    def barrier(self):
        pass

    def allreduce(self, tensor, op):
        return tensor.clone()

    def broadcast(self, tensor, root):
        return tensor

    def broadcast_object(self, obj, root):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def distributed_optimizer(self, optimizer, named_parameters, backward_passes_per_step, fp16_compression):
        return optimizer

    def any_rank(self, flag):
        return flag

    def mean_over_ranks(self, value):
        return value

    def broadcast_training_state(self, model, optimizer, root):
        pass


class _Horovod:
    name = "horovod"

    def __init__(self, hvd, tensor_parallel=1, data_process_set=None):
        self.hvd = hvd
        self.tensor_parallel = tensor_parallel
        self.data_process_set = data_process_set  # this rank's data-parallel replicas (tensor_parallel > 1)
        self.ops = {"sum": hvd.Sum, "avg": hvd.Average, "min": hvd.Min, "max": hvd.Max, "product": hvd.Product}

    def rank(self):
        return self.hvd.rank()

    def size(self):
        return self.hvd.size()

    def local_rank(self):
        return self.hvd.local_rank()

    def local_size(self):
        return self.hvd.local_size()

    def barrier(self):
        self.hvd.barrier()

    def allreduce(self, tensor, op):
        return self.hvd.allreduce(tensor, op=self.ops[op])

    def broadcast(self, tensor, root):
        return self.hvd.broadcast_(tensor, root_rank=root)

    # Horovod names these ops after type(obj) by default, so ranks passing different types (root a
    # dict, the others None) would wait on differently named ops forever: use one fixed name.
    def broadcast_object(self, obj, root):
        return self.hvd.broadcast_object(obj, root_rank=root, name="hpclm.broadcast_object")

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj, name="hpclm.allgather_object")

    @staticmethod
    def _mpi():
        """mpi4py's MPI when Horovod's MPI is initialised with MPI_THREAD_MULTIPLE (safe beside Horovod's thread)."""
        try:
            from mpi4py import MPI
        except ImportError:
            return None
        return MPI if MPI.Is_initialized() and MPI.Query_thread() == MPI.THREAD_MULTIPLE else None

    # One MPI_Allreduce on Horovod's MPI takes microseconds; a Horovod op waits for its ~1 ms cycle, too
    # slow to ask every step. So the per-step agreements go through mpi4py where they can.
    def any_rank(self, flag):
        mpi = self._mpi()
        if mpi is not None:
            return bool(mpi.COMM_WORLD.allreduce(int(flag), op=mpi.MAX))
        return self.allreduce(torch.tensor([float(flag)]), "max").item() > 0

    def mean_over_ranks(self, value):
        mpi = self._mpi()
        if mpi is not None:
            return mpi.COMM_WORLD.allreduce(float(value), op=mpi.SUM) / self.size()
        return float(self.allreduce(torch.tensor([float(value)], dtype=torch.float64), "avg")[0])

    def distributed_optimizer(self, optimizer, named_parameters, backward_passes_per_step, fp16_compression):
        compression = self.hvd.Compression.fp16 if fp16_compression else self.hvd.Compression.none
        if self.tensor_parallel > 1 and self.data_process_set is None:
            return optimizer  # one model replica: nothing to average
        extra = {"process_set": self.data_process_set} if self.data_process_set is not None else {}
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, op=self.hvd.Average,
                                             compression=compression,
                                             backward_passes_per_step=backward_passes_per_step, **extra)

    def broadcast_training_state(self, model, optimizer, root):
        # Sent when any rank has optimizer state (a resume; a start from another tool's AdamW state on root).
        # Horovod first fills an empty state with a zero-gradient step(), which moves weights under weight
        # decay, so the parameters are sent after it.
        has_state = self.allreduce(torch.tensor([float(bool(optimizer.state))]), "max").item() > 0
        if has_state:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=root)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=root)


class _MPIOnly:
    """Every rank one tensor-parallel group (no data replicas, so no gradients to average): the few
    collectives of the loop through mpi4py, without Horovod, whose background thread's cycle would share
    the MPI library and the cores with every TP collective."""
    name = "mpi"

    def __init__(self, MPI, tensor_parallel):
        self.MPI, self.comm, self.tensor_parallel = MPI, MPI.COMM_WORLD, tensor_parallel
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.ops = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "product": MPI.PROD}

    def rank(self):
        return self.comm.Get_rank()

    def size(self):
        return self.comm.Get_size()

    def local_rank(self):
        return self.node.Get_rank()

    def local_size(self):
        return self.node.Get_size()

    def barrier(self):
        self.comm.Barrier()

    def allreduce(self, tensor, op):
        values = tensor.detach().cpu().contiguous()
        work = values.double() if values.dtype in (torch.float16, torch.bfloat16) else values
        out = work.numpy().copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.ops[op])
        result = torch.from_numpy(out)
        if op == "avg":
            result = result / self.size()
        return result.to(tensor.dtype).to(tensor.device)

    def broadcast(self, tensor, root):
        tensor.copy_(self.broadcast_object(tensor.detach().cpu(), root))
        return tensor

    def broadcast_object(self, obj, root):
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def any_rank(self, flag):
        return bool(self.comm.allreduce(int(flag), op=self.MPI.MAX))

    def mean_over_ranks(self, value):
        return self.comm.allreduce(float(value), op=self.MPI.SUM) / self.size()

    def distributed_optimizer(self, optimizer, named_parameters, backward_passes_per_step, fp16_compression):
        return optimizer  # one model replica: nothing to average

    def broadcast_training_state(self, model, optimizer, root):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                self.broadcast(tensor, root)
        if self.comm.allreduce(int(bool(optimizer.state)), op=self.MPI.MAX):
            optimizer.load_state_dict(self.broadcast_object(optimizer.state_dict(), root))


_backend: _SingleProcess | _Horovod | _MPIOnly | None = None


def _horovod_install_hint():
    return ("run scripts/setup.sh, or build it by hand: HOROVOD_WITH_MPI=1 HOROVOD_WITH_PYTORCH=1 "
            "pip install --no-build-isolation horovod==0.28.1 (C++17 note in README)")


def _set_threads_per_rank(local_size):
    """Split this node's cores among its ranks unless the user or the launcher already chose."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cpus_per_task = _int_env(os.environ, "SLURM_CPUS_PER_TASK")
    if cpus_per_task:
        torch.set_num_threads(cpus_per_task)
        return
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if affinity < (os.cpu_count() or affinity):
        torch.set_num_threads(affinity)  # the launcher bound this rank to its own cores
    else:
        torch.set_num_threads(max(1, affinity // max(1, local_size)))


def data_process_sets(world: int, tensor: int) -> list[list[int]]:
    """The ranks that hold the same tensor-parallel shard, one list per TP position: ranks are laid out in
    TP groups of `tensor` consecutive ranks, so position p's replicas are p, p + tensor, p + 2 tensor, ..."""
    return [list(range(p, world, tensor)) for p in range(tensor)]


def init(*, fusion_threshold_mb: float | None = None, cycle_time_ms: float | None = None,
         timeline: str | None = None, mpi_yield_when_idle: bool = True, tensor_parallel: int | None = None):
    """Start the backend once (later calls return it). Horovod tuning applies before hvd.init only.

    tensor_parallel > 1: gradients are averaged over the data-parallel replicas of each TP shard only
    (one Horovod process set per TP position); the world size must be a multiple of it. When all ranks form
    one TP group there is nothing to average and the backend is mpi4py alone (no Horovod thread).

    mpi_yield_when_idle: Horovod's background thread waits inside MPI on the core of the rank's compute
    thread; Open MPI busy-polls unless told to yield, which takes up to half that core whenever the ranks
    fill the cores (README: Data-parallel training has the figures). An OMPI_MCA_mpi_yield_when_idle
    already in the environment wins."""
    global _backend
    if _backend is not None:
        if tensor_parallel not in (None, _backend.tensor_parallel):
            raise DistError(f"hpclm.dist is already started with tensor_parallel = {_backend.tensor_parallel}, "
                            f"asked for {tensor_parallel}: one process trains one layout")
        return _backend
    tensor_parallel = tensor_parallel or 1
    launch = launch_env()
    world = launch.size if launch.size is not None else 1
    if tensor_parallel > 1 and launch.size is None:
        raise DistError(f"parallel.tensor = {tensor_parallel} needs the number of ranks before start, and "
                        f"{launch.launcher} does not say it: launch with mpirun -np N or srun --ntasks N")
    if world % tensor_parallel:
        raise DistError(f"parallel.tensor = {tensor_parallel} does not divide the {world} rank(s) started: start a "
                        f"multiple of {tensor_parallel} ranks (data replicas x tensor, e.g. mpirun -np "
                        f"{tensor_parallel}), or change parallel.tensor")
    if launch.launcher == "none":
        _backend = _SingleProcess()
        return _backend
    if tensor_parallel > 1 and world == tensor_parallel:  # one TP group, nothing to average: no Horovod
        from hpclm.comm.ring import mpi
        _backend = _MPIOnly(mpi(), tensor_parallel)
        _set_threads_per_rank(_backend.local_size())
        return _backend
    for var, value in (("HOROVOD_FUSION_THRESHOLD", None if fusion_threshold_mb is None else int(fusion_threshold_mb * 2**20)),
                       ("HOROVOD_CYCLE_TIME", cycle_time_ms), ("HOROVOD_TIMELINE", timeline)):
        if value is not None:
            os.environ[var] = str(value)
    if mpi_yield_when_idle:
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    mca.apply()
    try:
        import horovod.torch as hvd
        if not hvd.mpi_built():
            raise ImportError("this Horovod was built without MPI")
    except Exception as e:  # ImportError, or a broken build raising at import
        if launch.size == 1:
            _backend = _SingleProcess()
            return _backend
        raise DistError(f"launched by {launch.launcher} as rank {launch.rank} of {launch.size or 'several'} ranks, "
                        f"but Horovod is not usable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        f"{_horovod_install_hint()}") from None
    sets = data_process_sets(world, tensor_parallel) if tensor_parallel > 1 and world > tensor_parallel else []
    if sets:
        process_sets = [hvd.ProcessSet(ranks) for ranks in sets]
        hvd.init(process_sets=process_sets)
    else:
        hvd.init()
    if launch.size is not None and hvd.size() != launch.size:
        raise DistError(f"{launch.launcher} started {launch.size} ranks but Horovod sees {hvd.size()}: "
                        "Horovod and mpirun must use the same MPI library (rebuild Horovod against it)")
    if hvd.size() % tensor_parallel:
        raise DistError(f"parallel.tensor = {tensor_parallel} does not divide the {hvd.size()} ranks started: start "
                        f"a multiple of {tensor_parallel} ranks, or change parallel.tensor")
    mine = process_sets[hvd.rank() % tensor_parallel] if sets else None
    _backend = _Horovod(hvd, tensor_parallel, mine)
    _set_threads_per_rank(hvd.local_size())
    return _backend


def _get():
    return _backend if _backend is not None else init()


def backend() -> str:
    """'horovod' or 'single'."""
    return _get().name


def rank() -> int:
    return _get().rank()


def size() -> int:
    return _get().size()


def local_rank() -> int:
    return _get().local_rank()


def local_size() -> int:
    return _get().local_size()


def tensor_parallel() -> int:
    """Ranks per tensor-parallel group (1: data parallel only)."""
    return _get().tensor_parallel


def data_rank() -> int:
    """This rank's data-parallel replica: the ranks of one TP group train on the same samples."""
    return rank() // tensor_parallel()


def data_size() -> int:
    """Data-parallel replicas: ranks / tensor_parallel."""
    return size() // tensor_parallel()


def is_distributed() -> bool:
    return size() > 1


def is_main() -> bool:
    """Rank 0: the one rank that writes shared files and prints progress."""
    return rank() == 0


def barrier() -> None:
    _get().barrier()


def allreduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor holding `op` over all ranks' tensors (same shape and dtype on every rank)."""
    if op not in OPS:
        raise ValueError(f"unknown allreduce op '{op}': use one of {', '.join(OPS)}")
    return _get().allreduce(tensor, op)


def broadcast(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with root's values, in place; returns it."""
    _check_root(root)
    return _get().broadcast(tensor, root)


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Root's picklable object, on every rank."""
    _check_root(root)
    return _get().broadcast_object(obj, root)


def allgather_object(obj: Any) -> list:
    """Every rank's object, in rank order, on every rank."""
    return _get().allgather_object(obj)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (every rank must call it)."""
    return _get().any_rank(bool(flag))


def mean_over_ranks(value: float) -> float:
    """The mean of a number over ranks, the same on every rank (every rank must call it): microseconds,
    cheap enough for every step."""
    return _get().mean_over_ranks(float(value))


def distributed_optimizer(optimizer: torch.optim.Optimizer, named_parameters, *, backward_passes_per_step: int = 1,
                          fp16_compression: bool = False) -> torch.optim.Optimizer:
    """Horovod's DistributedOptimizer (gradients averaged over ranks after `backward_passes_per_step`
    backward passes, optionally sent as fp16); the optimizer itself on a single rank.

    Use with synchronize_gradients() and step_synchronized()."""
    return _get().distributed_optimizer(optimizer, list(named_parameters), backward_passes_per_step, fp16_compression)


def synchronize_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Wait until every gradient is averaged over ranks (a no-op on a single rank)."""
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()


def step_synchronized(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() after synchronize_gradients(), without a second exchange."""
    if hasattr(optimizer, "skip_synchronize"):
        with optimizer.skip_synchronize():
            optimizer.step()
    else:
        optimizer.step()


def broadcast_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Every rank takes root's parameters and buffers, and its optimizer state when it has one."""
    _check_root(root)
    _get().broadcast_training_state(model, optimizer, root)


@contextlib.contextmanager
def reported_by_rank0():
    """For errors every rank meets alike (arguments, config, data, a start plan): rank 0 raises (the CLI
    prints the one line), the others exit with code 2 silently, so a job's log says it once."""
    try:
        yield
    except HpclmError:
        if launch_env().rank != 0:
            raise SystemExit(2) from None
        raise


def _check_root(root):
    if not 0 <= root < size():
        raise ValueError(f"root rank {root} is outside 0..{size() - 1}")


def _selfcheck() -> int:
    """`python -m hpclm.dist`: an allreduce and a broadcast whose results are known, printed by rank 0."""
    init()
    r, n = rank(), size()
    got_sum = allreduce(torch.tensor([float(r + 1)] * 4), "sum")
    got_max = allreduce(torch.tensor([float(r)]), "max")
    token = broadcast_object({"from": r, "ranks": n}, root=n - 1)
    expect_sum = n * (n + 1) / 2
    ok = bool(torch.all(got_sum == expect_sum)) and got_max.item() == n - 1 and token["from"] == n - 1
    oks = allgather_object(ok)
    if r == 0:
        print(f"hpclm.dist: backend={backend()} ranks={n}: allreduce(sum of rank+1) = {got_sum[0].item():g} "
              f"(expected {expect_sum:g}), allreduce(max of rank) = {got_max.item():g}, "
              f"broadcast_object from rank {n - 1} ok on {sum(oks)}/{n} ranks -> {'OK' if all(oks) else 'WRONG'}")
    return 0 if all(oks) else 1


def selfcheck_main() -> int:
    """`python -m hpclm.dist`: the self-check, exit 2 with one line when the set-up cannot work."""
    try:
        return _selfcheck()
    except DistError as e:
        print(f"hpclm.dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(selfcheck_main())
