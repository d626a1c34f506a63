"""`hpclm probe predict`: a data-parallel job's step time and tokens/s at N ranks, before running it.

step = compute + exchange, where
- compute is one rank's training step (forward, backward, optimizer) measured here on the config's model
  and batch with this process's threads; at N ranks, the expected slowest of N such steps (the exchange
  waits for the last rank). Started as `hpclm` with Horovod installed, the command re-runs
  itself as a one-rank Horovod job (mpirun -np 1), so the step carries what Horovod adds to every rank of
  the job: gradient hooks, fusion-buffer copies and a background thread waking every cycle on its cores;
- exchange is Horovod's allreduce of the model's gradient bytes (fp32, or fp16 with dist.fp16_compression)
  under an alpha-beta model t(S) = 2(n-1)*alpha + 2(n-1)/n * S/B (hpclm.bench.costmodel): fitted to the
  Horovod rows of a probe run over the job's links (--probe JSON from `hpclm probe allreduce --json`), else
  to its ring rows plus Horovod's per-step floor; B capped by the link's rate where --link-gbps gives it,
  and with --link-gbps alone that rate less Ethernet, IP and TCP headers.
- overlap: none assumed. Horovod can reduce gradients while backward still runs, so a step can be shorter
  than compute + exchange by up to the smaller of the two (the full-overlap column); measured here, small
  models' exchanges did not overlap and large ones' mostly did (README: Across nodes).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from hpclm.bench.costmodel import fit_ring_model, ring_time
from hpclm.bench.harness import check_writable, format_size, write_json
from hpclm.errors import HpclmError

# TCP payload per byte on the wire of a 1500-byte-MTU Ethernet link: 1448 of 1514 (tc counts the frame
# from the Ethernet header on); what a raw stream reaches on a link shaped with tbf.
TCP_PAYLOAD_SHARE = 1448 / 1514
ALPHA_TCP_S = 30e-6  # seconds per ring step between hosts over TCP when no probe says (README: Across nodes)
HOROVOD_FLOOR_S = 1.1e-3  # Horovod's background cycle: the least time any allreduce takes (probe, README)


def link_model(probe: dict | None, link_gbps: float | None) -> dict:
    """alpha (s per ring step) and B (bytes/s per link) for the exchange, and where each came from."""
    if probe is None and link_gbps is None:
        raise HpclmError("give the link: --link-gbps B (its rate in Gbit/s), or --probe JSON (a probe run's fit "
                         "over the job's own links: hpclm probe allreduce --json JSON)")
    model, source = None, ""
    if probe is not None:
        ranks = probe.get("host", {}).get("ranks", 2)
        horovod = [(r["size"], r["time_us"] * 1e-6) for r in probe.get("rows", [])
                   if r.get("impl") == "horovod" and r.get("time_us")]
        model = fit_ring_model(horovod, ranks) if horovod else None
        if model:
            model, source = {**model, "floor": False}, "probe fit of Horovod's allreduce"
        elif probe.get("summary", {}).get("model"):
            model, source = {**probe["summary"]["model"], "floor": True}, "probe fit of the ring"
        else:
            raise HpclmError("the --probe file has no ring model (run the probe on 2 or more ranks, with at least "
                             "2 sizes)")
    out = {"alpha_s": ALPHA_TCP_S, "bytes_per_s": None, "source": "", "floor_s": HOROVOD_FLOOR_S}
    if model:
        out.update(alpha_s=model["alpha_s"], bytes_per_s=model["link_bytes_per_s"], source=source,
                   floor_s=HOROVOD_FLOOR_S if model["floor"] else 0.0)
    if link_gbps is not None:
        if not link_gbps > 0:
            raise HpclmError(f"--link-gbps {link_gbps}: give the link's rate in Gbit/s, above 0")
        rate = link_gbps * 1e9 / 8 * TCP_PAYLOAD_SHARE
        if out["bytes_per_s"] is None or rate < out["bytes_per_s"]:
            out.update(bytes_per_s=rate, source=(f"{source}, B capped by the " if model else "") +
                       f"{link_gbps:g} Gbit/s link less headers")
    return out


def exchange_seconds(grad_bytes: int, ranks: int, link: dict) -> float:
    if ranks < 2:
        return 0.0
    model = {"alpha_s": link["alpha_s"], "beta_s_per_byte": 1.0 / link["bytes_per_s"]}
    return max(link["floor_s"], ring_time(model, ranks, grad_bytes))


def rerun_as_one_rank_job() -> None:
    """Replace this process by `mpirun -np 1` of the same command where it was started as `hpclm` by no
    launcher and Horovod with MPI is usable; else return (measure in this process)."""
    import os
    import shutil
    import sys

    from hpclm import runtime
    from hpclm.comm.dist import launch_env
    args = runtime.started_as_hpclm(getattr(sys, "orig_argv", []))
    if args is None or launch_env().launcher != "none" or shutil.which("mpirun") is None:
        return
    from hpclm.bench.allreduce import horovod_problem
    if horovod_problem() is not None:
        return
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    sys.stdout.flush()
    os.execvp("mpirun", ["mpirun", "-np", "1", "--bind-to", "none", *root, sys.executable, *args])


def measure_compute(cfg, steps: int, warmup: int) -> dict:
    """One rank's training step on this process's threads: seconds per step (median of `steps` after `warmup`)."""
    from hpclm.comm import dist
    from hpclm.train import loop
    with tempfile.TemporaryDirectory(prefix="hpclm-predict-") as out:
        run = loop.setup(cfg, Path(out) / "run", "never", True, lambda *a: None)
        amp = loop.autocast(cfg.precision, run.device)
        times = []
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            loop.train_step(run, step, amp)
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in run.params)
        return {"step_s": statistics.median(times[warmup:]), "step_times_s": times[warmup:], "parameters": params,
                "tokens_per_step": run.tokens_per_step, "backend": dist.backend()}


def slowest_of(times: list[float], ranks: int) -> float:
    """The expected slowest of `ranks` steps drawn from the measured ones: every rank's step varies, and the
    exchange waits for the last rank. Exact over the samples: E[max] = sum_i x_(i) ((i/m)^n - ((i-1)/m)^n)."""
    xs, m = sorted(times), len(times)
    return sum(x * ((i / m) ** ranks - ((i - 1) / m) ** ranks) for i, x in enumerate(xs, start=1))


def predict(compute: dict, ranks: int, link: dict, fp16_compression: bool) -> dict:
    grad_bytes = compute["parameters"] * (2 if fp16_compression else 4)
    exchange = exchange_seconds(grad_bytes, ranks, link)
    busy = slowest_of(compute["step_times_s"], ranks) if compute.get("step_times_s") else compute["step_s"]
    step = busy + exchange
    overlapped = max(busy, exchange)
    tokens = compute["tokens_per_step"] * ranks  # one rank's batch on every rank
    return {"ranks": ranks, "gradient_bytes": grad_bytes, "compute_s": busy, "exchange_s": exchange,
            "step_s": step, "tokens_per_s": tokens / step, "step_s_full_overlap": overlapped,
            "tokens_per_s_full_overlap": tokens / overlapped, "exchange_share": exchange / step}


def main(args) -> int:
    from hpclm import config
    cfg = config.load(args.config, args.set or [])
    if cfg.model.arch not in ("gpt", "gru"):
        raise HpclmError(f"model.arch = {cfg.model.arch!r} trains without a gradient exchange: the predictor is for "
                         "gpt and gru")
    if cfg.parallel.tensor != 1:
        raise HpclmError("the predictor models data parallelism only: set parallel.tensor = 1")
    for flag, value, low in (("--ranks", args.ranks, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise HpclmError(f"{flag} must be at least {low}, got {value}")
    probe = None
    if args.probe:
        try:
            probe = json.loads(Path(args.probe).read_text())
        except (OSError, ValueError) as e:
            raise HpclmError(f"--probe {args.probe}: {e}") from None
    link = link_model(probe, args.link_gbps)
    if args.json:
        check_writable(args.json, "--json")
    from hpclm.comm.dist import launch_env
    from hpclm.data import load_dataset
    launch = launch_env()
    if launch.size is not None and launch.size > 1:
        raise HpclmError(f"started as rank {launch.rank} of {launch.size}: run hpclm probe predict as one process "
                         "(it measures one rank and models the others); give the job's size with --ranks")
    load_dataset(cfg.data.path, cfg.data.block_size)  # a bad data path: one line here, not mpirun's report
    rerun_as_one_rank_job()
    compute = measure_compute(cfg, args.steps, args.warmup)
    rows = [predict(compute, n, link, cfg.dist.fp16_compression) for n in sorted({1, 2, args.ranks})]
    print(f"# hpclm probe predict: {cfg.model.arch} {compute['parameters'] / 1e6:.2f}M parameters, "
          f"{compute['tokens_per_step']} tokens per rank per step; compute {compute['step_s'] * 1e3:.1f} ms a step "
          f"(one rank, {compute['backend']}, measured here, median of {args.steps}; at N ranks the slowest of N "
          f"such steps); gradients {format_size(rows[-1]['gradient_bytes'])} "
          f"({'fp16' if cfg.dist.fp16_compression else 'fp32'}) a step")
    floor = f", floor {link['floor_s'] * 1e3:.1f} ms" if link["floor_s"] else ""
    print(f"# link: alpha {link['alpha_s'] * 1e6:.1f} us per ring step, B {link['bytes_per_s'] / 1e9:.3f} GB/s{floor} "
          f"({link['source'] or 'default alpha'}); no overlap of exchange and backward assumed")
    print(f"{'ranks':>6} {'compute ms':>11} {'exchange ms':>12} {'step ms':>9} {'tokens/s':>10} {'exchange':>9} {'full-overlap tokens/s':>22}")
    for r in rows:
        print(f"{r['ranks']:6d} {r['compute_s'] * 1e3:11.1f} {r['exchange_s'] * 1e3:12.1f} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f} "
              f"{100 * r['exchange_share']:8.0f}% {r['tokens_per_s_full_overlap']:22.0f}")
    if args.json:
        write_json(args.json, {"tool": "hpclm probe predict", "config": args.config, "set": args.set or [],
                               "link": link, "compute": compute, "rows": rows})
    return 0
