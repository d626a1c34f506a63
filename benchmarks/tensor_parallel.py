"""Tensor parallel on 2 ranks: memory per rank, tokens/s and TP collective time of hpclm train, and the
latency of one TP allreduce through hpclm's path against its peers, all measured in this run.

Training cells (real `hpclm train` processes, eval and checkpoints off; tokens/s over the steps after the
warm-up from metrics.jsonl): T=2 (2 ranks, 1 thread each, one TP group), D=2 (2 data-parallel ranks, 1
thread each) and T=1 (1 rank, 2 threads), for the 6x384 GPT (block 256) and a 12-layer 768-wide GPT.
Parameter + gradient + AdamW bytes per rank come from the shard shapes hpclm.parallel gives each rank
(fp32: 16 bytes a parameter); peak RSS per rank from each rank's own getrusage at exit.

Latency cells (`mpirun -np 2`): hpclm's TP allreduce (hpclm.parallel.groups.MPIGroup: the group's shared
memory where its ranks share a node, as here), the same with shared memory off (`hpclm-mpi`: doubling or
the ring over MPI, what a group across nodes gets) and mpi4py's Allreduce, interleaved in one process;
torch.distributed gloo and a Horovod allreduce on the process set of both ranks, one process each (their
background threads would skew the others); on an activation [8, 256, 384] and a decoding step's
[1, 1, 768], fp32. Each figure is the best of 15 rounds of --latency-iters calls; in the shared process
the rounds are --latency-pause seconds apart, and that process runs twice, before the training cells and
after them, so a slow spell of the machine (every path slower in it; seconds to minutes long on the VM this
was built on) cannot take all of them.

Goals: T=2 bytes per rank <= 0.55 x T=1; hpclm's allreduce at least as fast as mpi4py's and gloo at every
size, and >= 10x faster than Horovod's below 1 MiB.

    python benchmarks/tensor_parallel.py [--quick] [--from tinyshakespeare.txt] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shakespeare_data  # noqa: E402
from hpclm.bench import harness  # noqa: E402
from hpclm.errors import HpclmError  # noqa: E402
from hpclm.train.metrics import read_records  # noqa: E402

GOALS = {"bytes_ratio_max": 0.55, "ours_over_peer_latency_max": 1.0, "horovod_over_ours_min_below_1mib": 10.0}
MODELS = {
    "gpt-6x384": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 8},
    "gpt-12x768": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 256, "batch_size": 2},
}
QUICK_MODELS = {"gpt-2x64": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "batch_size": 4}}
LAYOUTS = {"T=2": (2, 1, 2), "D=2": (2, 1, 1), "T=1": (1, 2, 1)}  # ranks, threads per rank, parallel.tensor
SHAPES = {"activation [8,256,384]": (8, 256, 384), "decode [1,1,768]": (1, 1, 768)}
ROUNDS = 15  # timed rounds per implementation and message
IMPLS = ("hpclm", "hpclm-mpi", "mpi4py", "gloo", "horovod")  # hpclm-mpi: shared memory off (a group across nodes)
# each rank of a training cell writes its peak RSS here at exit (RSS_DIR/rank<r>.txt)
RSS_HOOK = ("import atexit, os, resource, runpy, sys\n"
            "def _rss():\n"
            "    r = os.environ.get('OMPI_COMM_WORLD_RANK', '0')\n"
            "    open(os.path.join(os.environ['HPCLM_RSS_DIR'], f'rank{r}.txt'), 'w').write(\n"
            "        str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))\n"
            "atexit.register(_rss)\n"
            "sys.argv = ['hpclm'] + sys.argv[1:]\n"
            "runpy.run_module('hpclm', run_name='__main__')\n")


def mpirun_prefix(ranks: int, *extra_env: str) -> list[str]:
    if ranks == 1:
        return []
    if shutil.which("mpirun") is None:
        raise HpclmError("mpirun not found: install Open MPI (scripts/setup.sh) to run the 2-rank cells")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none", *root,
            *[a for name in ("OMP_NUM_THREADS", "PYTHONPATH", "MASTER_ADDR", *extra_env) for a in ("-x", name)]]


def run(cmd: list[str], env: dict, log: Path, timeout: float, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise HpclmError(f"{what} ran past {timeout:.0f} s: raise --timeout or lower the iterations") from None
    if proc.returncode:
        raise HpclmError(f"{what} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")


def child_env(threads: int, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def bytes_per_rank(model: dict, vocab: int, tensor: int) -> int:
    """Parameter + gradient + two AdamW moments (fp32) of TP rank 0's shard: the shapes hpclm.parallel keeps."""
    import torch
    from hpclm.models.gpt import GPT
    from hpclm.parallel.gpt import shard_tensor
    with torch.device("meta"):
        full = GPT(vocab_size=vocab, block_size=model["block_size"], n_layer=model["n_layer"],
                   n_head=model["n_head"], n_embd=model["n_embd"])
    names = {id(p): n for n, p in full.named_parameters()}  # tied weights once
    numel = sum(shard_tensor(name, p, tensor, 0).numel() if tensor > 1 else p.numel()
                for p, name in ((p, names[id(p)]) for p in full.parameters()))
    return numel * 4 * 4


def train_cell(name: str, model: dict, layout: str, args, data_dir: Path, work: Path) -> dict:
    ranks, threads, tensor = LAYOUTS[layout]
    out = work / f"{name}-{layout.replace('=', '')}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "rss").mkdir(parents=True)
    sets = {"data.path": json.dumps(str(data_dir)), "model.n_layer": model["n_layer"], "model.n_head": model["n_head"],
            "model.n_embd": model["n_embd"], "data.block_size": model["block_size"],
            "train.batch_size": model["batch_size"], "train.max_iters": args.iters, "train.eval_interval": 0,
            "train.eval_iters": 1, "train.log_interval": 1, "checkpoint.every_iters": 0, "parallel.tensor": tensor,
            "model.dropout": 0.0}
    cmd = [*mpirun_prefix(ranks, "HPCLM_RSS_DIR"), sys.executable, "-c", RSS_HOOK, "train", "--config", args.config, "--out",
           str(out / "run"), "--resume",
           "never", "--force", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    run(cmd, child_env(threads, HPCLM_RSS_DIR=str(out / "rss")), out / "log.txt", args.timeout, f"{name} {layout}")
    recs = [r for r in read_records(out / "run" / "metrics.jsonl") if r["kind"] == "train" and r["step"] > args.warmup]
    steps = sum(r["step_time_s"] for r in recs)
    tokens = recs[0]["tokens"] / recs[0]["step"] * len(recs)
    rss = [int((out / "rss" / f"rank{r}.txt").read_text()) for r in range(ranks)]
    row = {"model": name, "layout": layout, "ranks": ranks, "threads": threads, "tensor": tensor,
           "tokens_per_s": tokens / steps, "step_time_s": steps / len(recs), "peak_rss_bytes_per_rank": rss,
           "wall_s": time.perf_counter() - t0}
    if tensor > 1:
        tp = sum(r["tp_collective_s"] for r in recs) / len(recs)
        row.update({"tp_collective_s_per_step": tp, "tp_collective_share": tp / row["step_time_s"]})
    return row


# --- latency: one process per implementation under mpirun -np 2 ------------------------------------

def latency_worker(impls: list[str], out: str, iters: int, pause: float) -> None:
    """Time one allreduce per shape for each of `impls` in this process, in interleaved rounds `pause`
    seconds apart (the best round of each), so the machine's drift falls on all of them alike."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    from hpclm.parallel.groups import Layout, MPIGroup, TorchGroup
    layout = Layout(world.Get_size(), world.Get_size(), rank)
    makers = {"hpclm": lambda: MPIGroup(layout), "hpclm-mpi": lambda: MPIGroup(layout, shm_bytes=0),
              "gloo": lambda: TorchGroup(layout, torch.device("cpu"))}
    groups = {impl: makers[impl]() for impl in impls if impl in makers}
    if "horovod" in impls:
        import horovod.torch as hvd
        hvd.init()
        ps = hvd.global_process_set  # the set of both ranks (Horovod refuses a second set equal to it)
    results = {impl: {} for impl in impls}
    for label, shape in SHAPES.items():
        x = torch.randn(shape)
        flat = x.numpy().reshape(-1)
        recv = np.empty_like(flat)
        calls = {}
        for impl in impls:
            if impl in groups:  # in place, as the autograd mappings call it (zeros: the values stay finite)
                zeros, group = torch.zeros(shape), groups[impl]
                calls[impl] = lambda z=zeros, g=group: g.allreduce(z, inplace=True)
            elif impl == "mpi4py":
                calls[impl] = lambda: world.Allreduce(flat, recv, op=MPI.SUM)
            else:
                calls[impl] = lambda: hvd.allreduce(x, op=hvd.Sum, process_set=ps)
        n = iters if x.numel() < 100_000 else max(10, iters // 20)
        best = dict.fromkeys(impls, float("inf"))
        for round_ in range(ROUNDS + 1):  # a warm-up round, then the best of many short ones spread over
            # ROUNDS x pause seconds: slow spells of the machine (seconds long here, all paths slower) spare some
            if round_ > 1:
                world.Barrier()
                time.sleep(pause)
            for impl, call in calls.items():
                world.Barrier()
                t0 = time.perf_counter()
                for _ in range(n if round_ else min(20, n)):
                    call()
                if round_:
                    best[impl] = min(best[impl], (time.perf_counter() - t0) / n)
        for impl in impls:
            results[impl][label] = world.allreduce(best[impl], op=MPI.MAX)  # the slower rank's time
    if rank == 0:
        Path(out).write_text(json.dumps({"latency_s": results,
                                         "transport": {impl: g.transport for impl, g in groups.items()}}))


TOGETHER = ("hpclm", "hpclm-mpi", "mpi4py")


def latency_cells(args, work: Path, impls: list[str], tag: str) -> list[dict]:
    """hpclm's paths and mpi4py (no background threads) share one process; gloo and Horovod, whose
    threads would run beside the others' loops, get one each."""
    together = [i for i in impls if i in TOGETHER]
    batches = ([together] if together else []) + [[i] for i in impls if i not in together]
    rows = []
    for batch in batches:
        out = work / f"latency-{tag}-{'+'.join(batch)}.json"
        cmd = [*mpirun_prefix(2), sys.executable, str(Path(__file__).resolve()), "--latency-worker",
               ",".join(batch), "--worker-out", str(out), "--latency-iters", str(args.latency_iters),
               "--latency-pause", str(args.latency_pause if batch is together else 0.0)]  # spread only the close race
        run(cmd, child_env(1), work / f"latency-{tag}-{'+'.join(batch)}.log", args.timeout,
            f"latency {'+'.join(batch)}")
        doc = json.loads(out.read_text())
        for impl, shapes in doc["latency_s"].items():
            for label, seconds in shapes.items():
                rows.append({"impl": impl, "shape": label, "bytes": 4 * _numel(SHAPES[label]), "latency_s": seconds,
                             "transport": doc["transport"].get(impl, impl)})
    return rows


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def best_of_passes(passes: list[list[dict]]) -> list[dict]:
    """One row per (impl, shape): the fastest pass's, with every pass's seconds beside it."""
    best = {}
    for rows in passes:
        for r in rows:
            key = (r["impl"], r["shape"])
            seen = best.setdefault(key, {**r, "passes_s": []})
            seen["passes_s"].append(r["latency_s"])
            seen["latency_s"] = min(seen["passes_s"])
    return list(best.values())


def judge(train_rows: list[dict], latency_rows: list[dict], memory: dict) -> dict:
    goals = {"bytes_ratio": {m: v["ratio"] for m, v in memory.items()}}
    goals["bytes_ok"] = all(v["ratio"] <= GOALS["bytes_ratio_max"] for v in memory.values())
    lat = {(r["impl"], r["shape"]): r["latency_s"] for r in latency_rows}
    vs = {}
    for shape in SHAPES:
        ours = lat.get(("hpclm", shape))
        for peer in ("mpi4py", "gloo", "horovod"):
            if ours and (peer, shape) in lat:
                vs[f"{peer} / hpclm, {shape}"] = lat[(peer, shape)] / ours
    goals["peer_over_ours"] = vs
    goals["latency_ok"] = all(v >= 1.0 / GOALS["ours_over_peer_latency_max"] for k, v in vs.items()
                              if k.startswith(("mpi4py", "gloo")))
    small = [v for k, v in vs.items() if k.startswith("horovod")
             and next(r["bytes"] for r in latency_rows if r["shape"] in k) < 2**20]
    goals["horovod_ok"] = bool(small) and all(v >= GOALS["horovod_over_ours_min_below_1mib"] for v in small)
    speed = {}
    for m in {r["model"] for r in train_rows}:
        cells = {r["layout"]: r["tokens_per_s"] for r in train_rows if r["model"] == m}
        if {"T=2", "D=2", "T=1"} <= set(cells):
            speed[m] = {"T2_over_D2": cells["T=2"] / cells["D=2"], "T2_over_T1_2threads": cells["T=2"] / cells["T=1"]}
    goals["tokens_per_s_ratios"] = speed
    goals["pass"] = goals["bytes_ok"] and goals["latency_ok"] and goals["horovod_ok"]
    return goals


def plot(doc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    models = sorted({r["model"] for r in doc["train"]})
    layouts = list(LAYOUTS)
    for i, layout in enumerate(layouts):
        vals = [next((r["tokens_per_s"] for r in doc["train"] if r["model"] == m and r["layout"] == layout), 0)
                for m in models]
        a.bar([j + i * 0.25 for j in range(len(models))], vals, width=0.25, label=layout)
    a.set_xticks([j + 0.25 for j in range(len(models))], models)
    a.set_ylabel("tokens/s")
    a.set_title("hpclm train on 2 cores")
    a.legend()
    impls = [i for i in IMPLS if any(r["impl"] == i for r in doc["latency"])]
    for i, impl in enumerate(impls):
        vals = [next((r["latency_s"] * 1e6 for r in doc["latency"] if r["impl"] == impl and r["shape"] == s), 0)
                for s in SHAPES]
        b.bar([j + i * 0.16 for j in range(len(SHAPES))], vals, width=0.16, label=impl)
    b.set_xticks([j + 0.32 for j in range(len(SHAPES))], list(SHAPES))
    b.set_yscale("log")
    top = max(r["latency_s"] for r in doc["latency"]) * 1e6
    b.set_ylim(top=top * 300)  # room above the bars for the legend
    b.set_ylabel("microseconds per allreduce (2 ranks)")
    b.set_title("one TP allreduce")
    b.legend(ncol=3, fontsize=8, loc="upper center")
    harness.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2x64 GPT, few iterations (a smoke run)")
    shakespeare_data.add_arguments(p, "tensor-parallel")
    p.add_argument("--models", default=None, help="comma-separated subset of the models")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated latency implementations")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--latency-iters", type=int, default=1000, help="allreduces per timed round (default 1000)")
    p.add_argument("--latency-pause", type=float, default=1.0, help="seconds between timed rounds (default 1)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=str(ROOT / "build" / "tensor_parallel.json"))
    p.add_argument("--plot", default=str(ROOT / "build" / "tensor_parallel.png"))
    p.add_argument("--latency-worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.latency_worker:
        latency_worker(args.latency_worker.split(","), args.worker_out, args.latency_iters, args.latency_pause)
        return 0
    try:
        harness.check_writable(args.json, "--json")
        harness.check_writable(args.plot, "--plot")
        models = QUICK_MODELS if args.quick else MODELS
        if args.models:
            unknown = set(args.models.split(",")) - set(models)
            if unknown:
                raise HpclmError(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(models)}")
            models = {k: v for k, v in models.items() if k in args.models.split(",")}
        args.impls = args.impls.split(",")
        if set(args.impls) - set(IMPLS):
            raise HpclmError(f"--impls: choose from {', '.join(IMPLS)}")
        args.iters = args.iters or (6 if args.quick else 12)
        args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 4)
        if args.quick:
            args.latency_iters = min(args.latency_iters, 200)
            args.latency_pause = 0.0
        work = Path(args.work)
        data_dir = shakespeare_data.prepare(args)
        vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
        # the close race (our paths against mpi4py) is timed before the training cells and again after them:
        # the VM this was built on sometimes ran every path 2x slower at small sizes after them, for minutes
        first = latency_cells(args, work, [i for i in args.impls if i in TOGETHER], "before")
        memory, train_rows = {}, []
        for name, model in models.items():
            one, two = bytes_per_rank(model, vocab, 1), bytes_per_rank(model, vocab, 2)
            memory[name] = {"T1_bytes_per_rank": one, "T2_bytes_per_rank": two, "ratio": two / one}
            for layout in LAYOUTS:
                row = train_cell(name, model, layout, args, data_dir, work)
                train_rows.append(row)
                print(f"{name:11s} {layout:4s} {row['tokens_per_s']:9.0f} tokens/s  {row['step_time_s'] * 1e3:8.1f} ms/step  "
                      f"peak RSS {max(row['peak_rss_bytes_per_rank']) / 2**20:7.0f} MiB/rank"
                      + (f"  TP collectives {row['tp_collective_s_per_step'] * 1e3:.1f} ms/step "
                         f"({row['tp_collective_share']:.0%})" if "tp_collective_s_per_step" in row else ""),
                      flush=True)
        latency_rows = best_of_passes([first, latency_cells(args, work, args.impls, "after")])
        for r in latency_rows:
            print(f"allreduce {r['shape']:22s} {r['impl']:9s} {r['latency_s'] * 1e6:10.1f} us  ({r['transport']}; "
                  f"passes {', '.join(f'{x * 1e6:.1f}' for x in r['passes_s'])})", flush=True)
        goals = judge(train_rows, latency_rows, memory)
        doc = {"host": harness.host_info(ranks=2), "memory": memory, "train": train_rows, "latency": latency_rows,
               "goals": GOALS, "result": goals, "pass": goals["pass"]}
        for m, v in memory.items():
            print(f"{m}: parameter+gradient+AdamW bytes per rank T=2 / T=1 = {v['ratio']:.3f} (goal <= 0.55)")
        for k, v in goals["peer_over_ours"].items():
            print(f"latency {k} = {v:.2f}x")
        for m, v in goals["tokens_per_s_ratios"].items():
            print(f"{m}: tokens/s T=2 / D=2 = {v['T2_over_D2']:.2f}, T=2 / T=1 (2 threads) = {v['T2_over_T1_2threads']:.2f}")
        print("goals: " + ("met" if goals["pass"] else "MISSED") +
              f" (bytes {'ok' if goals['bytes_ok'] else 'missed'}, latency vs mpi4py/gloo "
              f"{'ok' if goals['latency_ok'] else 'missed'}, vs Horovod {'ok' if goals['horovod_ok'] else 'missed'})")
        harness.write_json(args.json, doc)
        plot(doc, args.plot)
        print(f"wrote {args.json} and {args.plot}")
    except HpclmError as e:
        print(f"tensor_parallel: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
