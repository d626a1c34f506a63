"""A raw TCP stream between neighbouring ranks: the probe's `tcp` row, the bound a link between two hosts
sets for anything MPI does over it (as `sendrecv` is the bound of one ring link).

Rank r sends its buffer to rank r+1 over one TCP connection while it receives rank r-1's, each on its
own thread (both directions of every link carry data at once, as in the ring). Each rank listens on the
address Open MPI's TCP transport uses: the interface or subnet named in btl_tcp_if_include (mpirun
passes --mca settings to the ranks as OMPI_MCA_* variables), else the address of its hostname.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import subprocess
import threading

import torch

from hpclm.errors import HpclmError


def _interface_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of every address this host has (iproute2)."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            found.append((parts[1], parts[3].split("/")[0]))
    return found


def listen_address(env=None) -> str:
    """The address this rank's peers reach it at, chosen as Open MPI's TCP transport would."""
    env = os.environ if env is None else env
    wanted = [w.strip() for w in env.get("OMPI_MCA_btl_tcp_if_include", "").split(",") if w.strip()]
    for want in wanted:
        for interface, address in _interface_addresses():
            if "/" in want:
                if ipaddress.ip_address(address) in ipaddress.ip_network(want, strict=False):
                    return address
            elif interface.split("@")[0] == want:
                return address
    if wanted:
        raise HpclmError(f"btl_tcp_if_include={','.join(wanted)} names no address of this host: fix the MCA setting")
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes (any dtype, bfloat16 included, which numpy lacks)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


class Stream:
    """One connection to rank+1 and one from rank-1, made once and reused for every call."""

    def __init__(self, comm):
        rank, n = comm.Get_rank(), comm.Get_size()
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((listen_address(), 0))
        server.listen(1)
        peers = comm.allgather(server.getsockname())
        self.to_next = socket.create_connection(peers[(rank + 1) % n], timeout=60)
        self.from_prev, _ = server.accept()
        server.close()
        for s in (self.to_next, self.from_prev):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(120)

    def shift(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """send -> rank+1 while recv <- rank-1, the whole buffer each way."""
        out, into = _bytes(send), _bytes(recv)
        failure = []

        def sender():
            try:
                self.to_next.sendall(out)
            except OSError as e:
                failure.append(e)
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        got = 0
        while got < len(into):
            k = self.from_prev.recv_into(into[got:])
            if k == 0:
                raise HpclmError("the previous rank closed its TCP stream mid-transfer")
            got += k
        thread.join()
        if failure:
            raise HpclmError(f"TCP stream to the next rank failed: {failure[0]}")

    def close(self):
        for s in (self.to_next, self.from_prev):
            s.close()
