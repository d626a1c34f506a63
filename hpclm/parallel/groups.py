"""Tensor-parallel groups: the layout of ranks (TP groups of consecutive ranks, data replicas across them)
and the collectives inside one TP group, through hpclm's C++ over MPI or through torch.distributed."""
from __future__ import annotations

import atexit
import gc
import os
import socket
import time
import weakref
from dataclasses import dataclass

import torch

from hpclm.errors import HpclmError

BACKENDS = ("auto", "mpi", "torch")
# MPIGroup's allreduce: messages up to SHM_BYTES go through the group's shared-memory segment when its
# ranks share a node; otherwise recursive doubling (one exchange per doubling round, power-of-two
# groups) up to SMALL_BYTES, the pipelined ring above (README: Tensor parallel measures the three).
SHM_BYTES = 512 << 10
SLOT_BYTES = 256 << 10  # the segment holds 2 slots per rank; longer messages go through it in pieces
SMALL_BYTES = 16 << 10


@dataclass(frozen=True)
class Layout:
    """World = data x tensor ranks; rank r is TP position r % tensor of data replica r // tensor."""
    world: int
    tensor: int
    rank: int

    @property
    def data(self) -> int:
        return self.world // self.tensor

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor

    @property
    def tp_ranks(self) -> list[int]:
        first = self.dp_rank * self.tensor
        return list(range(first, first + self.tensor))

    def describe(self, hosts: list[str] | None = None) -> str:
        """The layout in one line; with every rank's host, where each TP group runs, and a warning for a
        group that spans hosts (its collectives, one per layer, would cross the network)."""
        groups, split = [], []
        for d in range(self.data):
            ranks = list(range(d * self.tensor, (d + 1) * self.tensor))
            text = "[" + ",".join(map(str, ranks)) + "]"
            if hosts:
                on = list(dict.fromkeys(hosts[r] for r in ranks))
                text += " on " + "+".join(on)
                if len(on) > 1:
                    split.append(text)
            groups.append(text)
        line = (f"{self.world} rank(s) = {self.data} data replica(s) x {self.tensor} tensor-parallel; "
                f"TP groups {', '.join(groups)}")
        if split:
            line += (f"; warning: TP group(s) {', '.join(split)} span hosts: start one node's ranks consecutively "
                     "(mpirun --map-by slot, srun's block distribution) with a multiple of parallel.tensor per node")
        return line


class TensorGroup:
    """The ranks that split one model. Collectives return new tensors and count their own seconds."""
    name = "base"
    size = 1
    rank = 0
    layout: Layout | None = None  # set by make_group

    def __init__(self):
        self.seconds = 0.0  # wall time inside collectives since the last take_seconds()
        self._calls = 0
        self.transport = self.name

    @property
    def calls(self) -> int:
        """Collectives run so far."""
        return self._calls

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", inplace: bool = False) -> torch.Tensor:
        """Sum (or max) over the group; into `tensor` itself when inplace (and it is contiguous), as the
        autograd mappings do with the fresh tensors they reduce."""
        if self.size == 1:
            return tensor
        start = time.perf_counter()
        source = tensor.contiguous()
        out = self._allreduce(source, op, source if inplace else None)
        self.seconds += time.perf_counter() - start
        self._calls += 1
        return out

    def allgather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The group's tensors concatenated along `dim`, in rank order."""
        return tensor if self.size == 1 else torch.cat(self.allgather_parts(tensor), dim=dim)

    def allgather_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (each of this one's shape), in rank order."""
        if self.size == 1:
            return [tensor]
        start = time.perf_counter()
        parts = self._allgather(tensor.contiguous())
        self.seconds += time.perf_counter() - start
        self._calls += 1
        return parts

    def _allreduce(self, tensor, op, out):
        raise NotImplementedError

    def _allgather(self, tensor):
        raise NotImplementedError


class SingleRank(TensorGroup):
    """No tensor parallelism: every collective is the identity."""
    name = "none"


class MPIGroup(TensorGroup):
    """hpclm's C++ collectives (csrc/comm/tp_collectives.cpp) on an MPI sub-communicator of the TP group:
    allreduce through one C++ TpComm, which counts its own calls and seconds."""
    name = "mpi"

    def __init__(self, layout: Layout, small_bytes: int = SMALL_BYTES, shm_bytes: int = SHM_BYTES,
                 slot_bytes: int = SLOT_BYTES):
        super().__init__()
        from hpclm.comm.ring import extension, mpi
        MPI = mpi()
        self.ext = extension()
        if not hasattr(self.ext, "TpComm"):
            raise HpclmError("hpclm._C lacks TpComm (built from older sources): rebuild with `make build`")
        self.comm = MPI.COMM_WORLD.Split(color=layout.dp_rank, key=layout.tp_rank)
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.fortran = self.comm.py2f()
        self.native = self.ext.TpComm(self.fortran, small_bytes, shm_bytes, slot_bytes)
        self.transport = self.native.transport
        self._dtypes = {getattr(torch, name): code for name, code in self.ext.TP_DTYPES.items()}
        self._ops = dict(self.ext.TP_OPS)
        self._reduce = self.native.allreduce

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", inplace: bool = False) -> torch.Tensor:
        # the mappings' call (in place, contiguous) in as few Python steps as possible: at a decoding
        # step's size the Python around the call costs as much as the exchange itself
        if inplace and tensor.is_contiguous() and tensor.is_cpu:
            dtype, code = self._dtypes.get(tensor.dtype), self._ops.get(op)
            if dtype is not None and code is not None:
                ptr = tensor.data_ptr()
                self._reduce(ptr, ptr, tensor.numel(), dtype, code)
                return tensor
        source = tensor.contiguous()
        dtype = self._dtype(source)
        if op not in self._ops:
            raise HpclmError(f"TP allreduce op must be one of {', '.join(self._ops)}, got {op!r}")
        out = source if inplace else torch.empty_like(source)
        self._reduce(source.data_ptr(), out.data_ptr(), source.numel(), dtype, self._ops[op])
        return out

    def take_seconds(self) -> float:
        return super().take_seconds() + self.native.take_seconds()

    @property
    def calls(self) -> int:
        return self._calls + self.native.calls  # allgathers counted here, allreduces in C++

    def _dtype(self, tensor) -> int:
        dtype = self._dtypes.get(tensor.dtype)
        if dtype is None or not tensor.is_cpu:
            raise HpclmError(f"parallel.backend = 'mpi' reduces CPU float tensors, got a {tensor.dtype} tensor on "
                             f"{tensor.device}: use parallel.backend = 'torch' (NCCL) for CUDA tensors")
        return dtype

    def _allgather(self, tensor):
        self._dtype(tensor)
        out = torch.empty((self.size,) + tuple(tensor.shape), dtype=tensor.dtype)
        self.ext.allgather_bytes(tensor.data_ptr(), out.data_ptr(), tensor.numel() * tensor.element_size(),
                                 self.fortran)
        return list(out.unbind(0))


_torch_groups: "weakref.WeakSet[TorchGroup]" = weakref.WeakSet()


def _release_torch_groups(td) -> None:
    for group in list(_torch_groups):
        group.group = None
    if td.is_initialized():
        td.destroy_process_group()
    gc.collect()


class TorchGroup(TensorGroup):
    """torch.distributed (gloo for CPU tensors, NCCL for CUDA ones), rendezvous at rank 0's address."""
    name = "torch"

    def __init__(self, layout: Layout, device: torch.device):
        super().__init__()
        import torch.distributed as td
        self.td = td
        if not td.is_initialized():
            from hpclm.comm.ring import mpi
            MPI = mpi()
            world = MPI.COMM_WORLD
            address = None
            if world.Get_rank() == 0:
                host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
                port = int(os.environ.get("MASTER_PORT", "0")) or _free_port(host)
                address = f"tcp://{host}:{port}"
            address = world.bcast(address, root=0)
            backend = "nccl" if device.type == "cuda" else "gloo"
            td.init_process_group(backend, init_method=address, rank=layout.rank, world_size=layout.world)
            # gloo's worker threads must stop before the interpreter finalizes (else they abort the process):
            # destroy every group, and let go of the ones TorchGroups hold, while Python still runs
            atexit.register(_release_torch_groups, td)
        # every rank creates every TP group, in the same order (torch.distributed requires it)
        mine = None
        for d in range(layout.data):
            ranks = list(range(d * layout.tensor, (d + 1) * layout.tensor))
            group = td.new_group(ranks)
            if d == layout.dp_rank:
                mine = group
        self.group = mine
        self.size, self.rank = layout.tensor, layout.tp_rank
        _torch_groups.add(self)

    def _allreduce(self, tensor, op, out):
        out = tensor.clone() if out is None else out
        self.td.all_reduce(out, op=self.td.ReduceOp.MAX if op == "max" else self.td.ReduceOp.SUM, group=self.group)
        return out

    def _allgather(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.td.all_gather(parts, tensor, group=self.group)
        return parts


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_group(layout: Layout, backend: str = "auto", device: torch.device | str = "cpu") -> TensorGroup:
    """The TP group of this rank: SingleRank at tensor = 1; backend auto = mpi for CPU, torch (NCCL) for CUDA."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise HpclmError(f"parallel.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "torch" if device.type == "cuda" else "mpi"
    if layout.tensor == 1:
        group = SingleRank()
    else:
        group = MPIGroup(layout) if backend == "mpi" else TorchGroup(layout, device)
    group.layout = layout
    return group
