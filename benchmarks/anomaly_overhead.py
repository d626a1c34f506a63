"""What anomaly handling costs a normal run: tokens/s with [anomaly] on (the defaults: spike detection on
the rank-averaged loss every step, the hang watchdog's thread and heartbeats, the straggler gather) against
the same run with it off (anomaly.action = "off", anomaly.hang_timeout_s = -1), in alternating rounds.

Each round launches both settings once (`mpirun -np 2 hpclm train`, shakespeare-char, checkpoints and
evals off), in an order that alternates between rounds so a drift in the machine's speed falls on both;
tokens/s comes from the runs' metrics.jsonl after the warm-up (train_scaling.timed_run). The figure is
the median over rounds of on / off; goal: >= 0.98 (at most 2% slower).

    python benchmarks/anomaly_overhead.py [--rounds 5] [--iters 60] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shakespeare_data  # noqa: E402
from train_scaling import LOG_INTERVAL, timed_run, uptime  # noqa: E402
from hpclm.bench import harness  # noqa: E402

GOAL_RATIO_MIN = 0.98
SETTINGS = {"on": [], "off": ['anomaly.action="off"', "anomaly.hang_timeout_s=-1.0"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shakespeare_data.add_arguments(ap, "anomaly_overhead")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of both settings (default 5)")
    ap.add_argument("--iters", type=int, default=60, help="iterations per run (default 60)")
    ap.add_argument("--warmup", type=int, default=10, help="leading iterations not timed (default 10, even)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    data_dir = shakespeare_data.prepare(args)
    work = Path(args.work).resolve()
    base = [f"data.path={json.dumps(str(data_dir))}", f"train.max_iters={args.iters}", "train.eval_interval=0",
            "train.eval_iters=1", f"train.log_interval={LOG_INTERVAL}", "checkpoint.every_iters=0"]
    print(f"anomaly overhead: {args.ranks} ranks, {args.iters} iterations per run, {args.rounds} rounds; {uptime()}")
    rounds = []
    for i in range(args.rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        got = {name: timed_run(args.ranks, 1, base + SETTINGS[name], work / f"round{i}-{name}", args.warmup, args,
                               f"round {i} anomaly {name}")["tokens_per_s"] for name in order}
        rounds.append({"on": got["on"], "off": got["off"], "ratio": got["on"] / got["off"], "order": list(order)})
        print(f"  round {i}: on {got['on']:,.0f} tok/s, off {got['off']:,.0f} tok/s, on/off {got['on'] / got['off']:.3f}")
    ratio = statistics.median(r["ratio"] for r in rounds)
    met = ratio >= GOAL_RATIO_MIN
    print(f"anomaly handling on / off, tokens/s, median of {len(rounds)} rounds: {ratio:.3f} "
          f"(goal >= {GOAL_RATIO_MIN}: {'met' if met else 'MISSED'})")
    if args.json:
        harness.write_json(args.json, {"benchmark": "anomaly_overhead", "host": harness.host_info(ranks=args.ranks),
                                       "settings": {k: getattr(args, k) for k in ("iters", "warmup", "rounds", "ranks")},
                                       "rounds": rounds, "ratio_median": ratio,
                                       "goal": {"ratio_min": GOAL_RATIO_MIN, "met": met}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
