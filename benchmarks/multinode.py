"""Across nodes: data-parallel training on 2 namespace nodes x 1 rank over TCP links, unshaped and shaped to
10 and 1 Gbit/s (tc tbf), against 1 node x 2 ranks over shared memory, with and without Horovod's fp16
gradient compression; `hpclm probe predict`'s figure beside every measured cell.

Each node is a network namespace with one of this machine's cores (hpclm.cluster.netns); the one-node
cells run both ranks in the root namespace on both cores. Per link: a probe run (ring, MPI_Allreduce and a
raw TCP stream; its alpha-beta fit feeds the predictor), then every model's training cells. tokens/s comes
from each run's metrics after the warm-up; the final val loss from its last eval (the same batches with and
without compression: what compression costs in quality). Every cell runs --rounds times, the cells taking
turns, and keeps its fastest run; the predictor runs right after each 2-node run and keeps its fastest
figure (this VM's speed drifts by a third over minutes: a slow spell then falls on one round of a cell, not
on its only run). Goal: the predictor within 15% of every measured 2-node cell. Needs root (namespaces),
Open MPI and Horovod.

    python benchmarks/multinode.py [--quick] [--rounds R] [--models shakespeare-char,gpt-6x384] [--links none,10,1]
                                   [--wire fp32,fp16] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shakespeare_data  # noqa: E402
from train_scaling import LOG_INTERVAL, MODELS, after_warmup, finish, launch, train_args  # noqa: E402
from hpclm.bench import harness  # noqa: E402
from hpclm.bench.costmodel import fit_ring_model  # noqa: E402
from hpclm.cluster.netns import Cluster, why_unavailable  # noqa: E402
from hpclm.errors import HpclmError  # noqa: E402
from hpclm.train.metrics import read_records  # noqa: E402

GOAL_PREDICTION_ERROR = 0.15
ITERS = {"shakespeare-char": (60, 10), "gpt-6x384": (12, 4)}  # (iterations, warm-up) a cell
QUICK_ITERS = {"shakespeare-char": (20, 4), "gpt-6x384": (6, 2)}


def env_for_runs() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_logged(cmd: list[str], log: Path, what: str, timeout: float) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env_for_runs(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finish(proc, what, timeout, log)


def measured(out: Path, warmup: int) -> dict:
    rates = after_warmup(out, warmup)
    train = rates["records"]
    evals = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "eval"]
    return {"tokens_per_s": rates["tokens_per_s"], "step_time_s": rates["step_time_s"],
            "exchange_wait_s": sum(r.get("exchange_wait_s_max", 0.0) for r in train) / len(train),
            "val_loss": evals[-1]["val_loss"] if evals else None}


def best_of(runs: list[dict]) -> dict:
    """The fastest of a cell's rounds, with every round's tokens/s beside it."""
    return {**max(runs, key=lambda r: r["tokens_per_s"]), "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def cell_sets(model: str, data_dir: Path, iters: int, compression: bool) -> list[str]:
    return [f"data.path={json.dumps(str(data_dir))}", *MODELS[model], f"train.max_iters={iters}",
            "train.eval_interval=0", "train.eval_iters=5", f"train.log_interval={LOG_INTERVAL}",
            "checkpoint.every_iters=0", f"dist.fp16_compression={'true' if compression else 'false'}"]


def probe(cluster: Cluster, work: Path, link: str, args) -> dict:
    out = work / f"probe-{link}.json"
    sizes = ["-b", "64K", "-e", "16M", "-f", "4", "-n", "3" if args.quick else "5", "-w", "1"]
    cmd = cluster.mpirun_command([sys.executable, "-m", "hpclm", "probe", "allreduce", *sizes,
                                  "--impl", "ring,mpi,horovod,tcp", "--json", str(out)])
    run_logged(cmd, work / f"probe-{link}.log", f"probe at {link}", args.timeout)
    return json.loads(out.read_text())


def predict(cluster: Cluster, cell_dir: Path, name: str, sets: list[str], probe_json: Path, gbps, args) -> dict:
    """`hpclm probe predict` on the first node (its one core, like a rank's), its output in `cell_dir`."""
    out = cell_dir / "predict.json"
    steps = ["--steps", "3", "--warmup", "1"] if args.quick or "6x384" in name else ["--steps", "10", "--warmup", "3"]
    cmd = [sys.executable, "-m", "hpclm", "probe", "predict", "--config", args.config, *steps,
           "--probe", str(probe_json), "--json", str(out), *[a for s in sets for a in ("--set", s)]]
    if gbps:
        cmd += ["--link-gbps", str(gbps)]
    run_logged(cluster.node_command(0, cmd), cell_dir / "predict.log", f"{name} predict", args.timeout)
    doc = json.loads(out.read_text())
    return next(r for r in doc["rows"] if r["ranks"] == 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shakespeare_data.add_arguments(ap, "multinode")
    ap.add_argument("--models", default="shakespeare-char,gpt-6x384")
    ap.add_argument("--links", default="none,10,1", help="link rates in Gbit/s, comma-separated; none = unshaped")
    ap.add_argument("--wire", default="fp32,fp16", help="gradient wire formats, comma-separated: fp32 (plain), "
                    "fp16 (dist.fp16_compression)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations and one round (a smoke run)")
    ap.add_argument("--rounds", type=int, help="runs of every cell, taking turns; each cell keeps its fastest "
                    "(default 2, --quick 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as hung")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    problem = why_unavailable()
    if problem:
        raise SystemExit(f"multinode: cannot make namespace nodes here: {problem}")
    models = [m.strip() for m in args.models.split(",")]
    try:
        links = [None if x.strip() == "none" else float(x) for x in args.links.split(",")]
    except ValueError:
        raise HpclmError(f"--links {args.links}: give rates in Gbit/s or none, comma-separated (e.g. none,10,1)") from None
    wires = [w.strip() for w in args.wire.split(",")]
    if not wires or set(wires) - {"fp32", "fp16"}:
        raise HpclmError(f"--wire {args.wire}: give fp32, fp16 or both, comma-separated")
    compressions = [w == "fp16" for w in dict.fromkeys(wires)]
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            harness.check_writable(path, flag)
    data_dir = shakespeare_data.prepare(args)
    work = Path(args.work).resolve()
    iters = QUICK_ITERS if args.quick else ITERS
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1:
        raise HpclmError(f"--rounds {args.rounds}: give 1 or more")
    rows, probes = [], {}
    t0 = time.time()
    one_node = {}
    for round_ in range(1, args.rounds + 1):  # one node, two ranks: the reference of every 2-node cell
        for model in models:
            n, warmup = iters[model]
            for compression in compressions:
                name = f"{model}-1node-{'fp16wire' if compression else 'fp32wire'}"
                out = work / name / f"round-{round_}"
                proc = launch(2, 1, train_args(args.config, out / "run", cell_sets(model, data_dir, n, compression)),
                              out / "log.txt")
                finish(proc, name, args.timeout, out / "log.txt")
                one_node.setdefault((model, compression), []).append(measured(out / "run", warmup))
                print(f"# {name} round {round_}: {one_node[model, compression][-1]['tokens_per_s']:.0f} tokens/s",
                      flush=True)
    for (model, compression), runs in one_node.items():
        rows.append({"model": model, "layout": "1 node x 2", "link": "shared memory", "compression": compression,
                     **best_of(runs)})
    with Cluster.create(nodes=2) as cluster:
        for gbps in links:
            label = "unshaped" if gbps is None else f"{gbps:g} Gbit/s"
            cluster.shape(gbps)
            key = "none" if gbps is None else f"{gbps:g}"
            doc = probe(cluster, work, key, args)
            probe_json = work / f"probe-{key}.json"
            bus = {(r["impl"], r["size"]): r["busbw"] for r in doc["rows"]}
            large = [(r["size"], r["time_us"] * 1e-6) for r in doc["rows"] if r["impl"] == "ring" and r["size"] >= 1 << 20]
            probes[label] = {"model": doc["summary"].get("model"), "ring_fit_from_1MiB": fit_ring_model(large, 2),
                             "busbw_16MiB": {impl: bus.get((impl, 16 << 20)) for impl in ("ring", "mpi", "horovod", "tcp")},
                             "busbw_4MiB": {impl: bus.get((impl, 4 << 20)) for impl in ("ring", "mpi", "horovod", "tcp")}}
            print(f"# probe {label}: 16 MiB busbw " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                probes[label]["busbw_16MiB"].items() if v), flush=True)
            cells = {}
            for round_ in range(1, args.rounds + 1):  # every cell once a round: a slow spell falls on one round
                for model in models:
                    n, warmup = iters[model]
                    for compression in compressions:
                        name = f"{model}-{key}-{'fp16wire' if compression else 'fp32wire'}"
                        sets = cell_sets(model, data_dir, n, compression)
                        out = work / name / f"round-{round_}"
                        cmd = cluster.mpirun_command([sys.executable, "-m", "hpclm",
                                                      *train_args(args.config, out / "run", sets)])
                        run_logged(cmd, out / "log.txt", name, args.timeout)
                        run = measured(out / "run", warmup)
                        p = predict(cluster, out, name, sets, probe_json, gbps, args)
                        cells.setdefault((model, compression), []).append((run, p))
                        print(f"# {name} round {round_}: {run['tokens_per_s']:.0f} tokens/s, predicted "
                              f"{p['tokens_per_s']:.0f} ({100 * (p['tokens_per_s'] / run['tokens_per_s'] - 1):+.0f}%)",
                              flush=True)
            for (model, compression), runs in cells.items():
                row = {"model": model, "layout": "2 nodes x 1", "link": label, "compression": compression,
                       **best_of([run for run, _ in runs])}
                p = max((p for _, p in runs), key=lambda p: p["tokens_per_s"])
                row.update(predicted_tokens_per_s=p["tokens_per_s"], predicted_step_s=p["step_s"],
                           predicted_exchange_s=p["exchange_s"], predicted_compute_s=p["compute_s"],
                           rounds_predicted_tokens_per_s=[p["tokens_per_s"] for _, p in runs],
                           prediction_error=p["tokens_per_s"] / row["tokens_per_s"] - 1)
                rows.append(row)
        cluster.shape(None)
    errors = [abs(r["prediction_error"]) for r in rows if "prediction_error" in r]
    summary = {"prediction_error_max": max(errors) if errors else None, "goal": GOAL_PREDICTION_ERROR,
               "pass": bool(errors) and max(errors) <= GOAL_PREDICTION_ERROR, "seconds": time.time() - t0}
    print_tables(rows, probes, summary)
    if args.json:
        harness.write_json(args.json, {"tool": "benchmarks/multinode.py", "host": harness.host_info(2),
                                       "quick": args.quick, "rows": rows, "probes": probes, "summary": summary})
    if args.plot:
        plot(rows, args.plot)
    return 0


def print_tables(rows, probes, summary) -> None:
    print("\n| link | ring | MPI_Allreduce | Horovod | raw TCP | ring / TCP | ring fit B from 1 MiB (GB/s) |")
    print("|---|---|---|---|---|---|---|")
    for label, p in probes.items():
        b, fit = p["busbw_16MiB"], p["ring_fit_from_1MiB"] or {}
        ratio = b["ring"] / b["tcp"] if b.get("ring") and b.get("tcp") else float("nan")
        print(f"| {label} | {b['ring']:.3f} | {b['mpi']:.3f} | {b['horovod']:.3f} | {b['tcp']:.3f} | {100 * ratio:.0f}% | "
              f"{fit.get('link_bytes_per_s', float('nan')) / 1e9:.3f} |")
    print("\n| model | layout | link | gradients on the wire | tokens/s | vs 1 node | predicted | error | val loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    one = {(r["model"], r["compression"]): r["tokens_per_s"] for r in rows if r["layout"] == "1 node x 2"}
    for r in rows:
        pred = f"{r['predicted_tokens_per_s']:.0f}" if "predicted_tokens_per_s" in r else ""
        err = f"{100 * r['prediction_error']:+.0f}%" if "prediction_error" in r else ""
        print(f"| {r['model']} | {r['layout']} | {r['link']} | {'fp16' if r['compression'] else 'fp32'} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one[r['model'], r['compression']]:.2f}x | {pred} | "
              f"{err} | {r['val_loss']:.4f} |")
    worst = summary["prediction_error_max"]
    if worst is not None:
        print(f"\n# predictor: worst error {100 * worst:.0f}% (goal <= {100 * GOAL_PREDICTION_ERROR:.0f}%): "
              f"{'PASS' if summary['pass'] else 'MISSED'}")


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        cells = [r for r in rows if r["model"] == model]
        labels = [f"{'1 node' if r['layout'].startswith('1 node') else r['link']}\n"
                  f"{'fp16' if r['compression'] else 'fp32'} wire" for r in cells]
        x = range(len(cells))
        ax.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in cells], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r.get("predicted_tokens_per_s", 0) for r in cells], 0.4, label="predicted")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("tokens/s (2 ranks)")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.suptitle("data parallel across 2 namespace nodes over TCP vs 1 node", fontsize=10)
    fig.tight_layout()
    harness.save_figure(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HpclmError as e:
        print(f"multinode: error: {e}", file=sys.stderr)
        sys.exit(2)
