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


def _add_bench(sub):
    p = sub.add_parser("bench", help="kernel benchmarks against torch (JSON with --json)")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    s = kinds.add_parser(
        "softmax", help="fused scaled masked softmax vs torch: forward/backward time, GB/s, speedups",
        description="hpclm.ops.fused_softmax next to torch.softmax, the unfused torch composition and autograd's "
                    "backward of it, with copy bandwidth as the ceiling, all in one run. Exit code 1 if a result "
                    "differs from torch beyond the dtype's tolerance.")
    from hpclm.bench import add_arguments
    add_arguments(s)

    def run(args):
        from hpclm import bench
        return bench.main(args)
    s.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpclm", description="High-performance language-model training on HPC clusters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_bench):
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
