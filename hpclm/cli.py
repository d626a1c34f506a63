"""The `hpclm` command (also `python -m hpclm`). Each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import sys

from hpclm.errors import HpclmError


def _add_info(sub):
    p = sub.add_parser("info", help="build and runtime report: kernels, ISA, MPI, Horovod, CUDA")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all-ranks", action="store_true", help="under mpirun/srun, every rank prints (default: rank 0)")

    def run(args):
        from hpclm import info
        return info.main(args)
    p.set_defaults(func=run)


def _add_probe(sub):
    p = sub.add_parser("probe", help="interconnect probes (run under mpirun/srun: every rank runs the command)")
    kinds = p.add_subparsers(dest="probe", required=True, metavar="PROBE")
    a = kinds.add_parser(
        "allreduce", help="ring allreduce vs MPI_Allreduce vs Horovod vs sendrecv: bandwidth, correctness, cost model",
        description="Bus bandwidth of hpclm's ring allreduce next to the MPI library's MPI_Allreduce, Horovod and "
                    "point-to-point sendrecv (nccl-tests style). Rank 0 prints one table; exit code 1 if any "
                    "result is wrong.")
    a.add_argument("-b", "--minbytes", default="64K", help="smallest message, bytes with K/M/G suffix (default 64K)")
    a.add_argument("-e", "--maxbytes", default="256M", help="largest message (default 256M)")
    a.add_argument("-f", "--stepfactor", type=float, default=4.0, help="size multiplier between rows (default 4)")
    a.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size (default 20)")
    a.add_argument("-w", "--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    a.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check every result exactly (default 1)")
    a.add_argument("-d", "--datatype", default="float32",
                   help="float32, float64, float16, bfloat16, comma-separated, or all (default float32)")
    a.add_argument("-o", "--op", default="sum", help="sum, avg, min, max, comma-separated, or all (default sum)")
    a.add_argument("--impl", default=None,
                   help="comma-separated from ring, mpi, horovod, sendrecv (default: all that are usable here)")
    a.add_argument("--in-place", action="store_true", help="reduce in place (default: out of place)")
    a.add_argument("--hugepages", action="store_true",
                   help="back the buffers with transparent huge pages (madvise) instead of torch's allocator")
    a.add_argument("--segment", default=None, help="ring pipeline segment, bytes (default: the ring's own, 512K)")
    a.add_argument("--depth", type=int, default=None, help="ring segments in flight per direction (default: 2)")
    a.add_argument("--threads", type=int, default=1, help="reduction threads per rank in the ring (default 1)")
    a.add_argument("--json", metavar="PATH", help="also write the rows and summary as JSON")
    a.add_argument("--plot", metavar="PNG", help="also plot busbw against size (matplotlib)")

    def run(args):
        from hpclm import probe
        return probe.main(args)
    a.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpclm", description="High-performance language-model training on HPC clusters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_probe):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HpclmError as e:
        print(f"hpclm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
