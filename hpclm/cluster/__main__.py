"""`python -m hpclm.cluster`: bring a namespace cluster up, run on it, take it down (root only).

    python -m hpclm.cluster up [--nodes 2] [--gbps 10] [--name NAME]    prints the cluster's name
    python -m hpclm.cluster exec NAME NODE -- CMD...                    CMD on one node (NODE: 1, 2, ... or a name)
    python -m hpclm.cluster mpirun NAME [--per-node 1] -- CMD...        mpirun across every node over TCP
    python -m hpclm.cluster shape NAME [--gbps 1]                       change (or lift) the links' rate
    python -m hpclm.cluster down NAME
    python -m hpclm.cluster list
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from hpclm.cluster.netns import STATE_ROOT, Cluster
from hpclm.errors import HpclmError


def _node(cluster: Cluster, text: str) -> str:
    if text.isdigit() and 1 <= int(text) <= len(cluster.nodes):
        return cluster.nodes[int(text) - 1]
    if text in cluster.nodes:
        return text
    raise HpclmError(f"no node {text} in {cluster.name}: give 1..{len(cluster.nodes)} or one of {', '.join(cluster.nodes)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpclm.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    up = sub.add_parser("up", help="make the namespaces and links; prints the name")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--gbps", type=float, default=None, help="shape every node link to this rate (tc tbf); default unshaped")
    up.add_argument("--mtu", type=int, default=1500)
    up.add_argument("--name", default=None)
    ex = sub.add_parser("exec", help="run a command on one node")
    ex.add_argument("name")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    mp = sub.add_parser("mpirun", help="mpirun across the nodes (extra mpirun flags go before --)")
    mp.add_argument("name")
    mp.add_argument("--per-node", type=int, default=1)
    mp.add_argument("--nodes", type=int, default=None, help="use the first N nodes (default all)")
    mp.add_argument("cmd", nargs=argparse.REMAINDER)
    sh = sub.add_parser("shape", help="change every node link's rate on a running cluster")
    sh.add_argument("name")
    sh.add_argument("--gbps", type=float, default=None, help="the new rate; leave out to lift the limit")
    dn = sub.add_parser("down", help="kill what runs on the nodes and remove everything made")
    dn.add_argument("name")
    sub.add_parser("list", help="the clusters up now")
    args = p.parse_args(argv)
    try:
        if args.what == "up":
            c = Cluster.create(args.nodes, args.gbps, args.mtu, args.name)
            print(c.name)
            for node, address, cpus in zip(c.nodes, c.addresses, c.cpus):
                print(f"# {node} {address} cores {cpus}", file=sys.stderr)
            return 0
        if args.what == "list":
            for path in sorted(STATE_ROOT.glob("*/cluster.json")) if STATE_ROOT.exists() else []:
                print(path.parent.name)
            return 0
        c = Cluster.load(args.name)
        if args.what == "down":
            c.destroy()
            return 0
        if args.what == "shape":
            c.shape(args.gbps)
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise HpclmError(f"{args.what}: give the command after --")
        if args.what == "exec":
            full = c.node_command(_node(c, args.node), cmd)
        else:
            extra = []
            if cmd[0].startswith("-") and "--" in cmd:  # mpirun flags, then -- CMD
                cut = cmd.index("--")
                extra, cmd = cmd[:cut], cmd[cut + 1:]
            full = c.mpirun_command(cmd, per_node=args.per_node, nodes=args.nodes, extra=extra)
        return subprocess.run(full, env=os.environ).returncode
    except HpclmError as e:
        print(f"hpclm.cluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
