"""Run metrics: OUT/metrics.jsonl, progress on the terminal, an optional Prometheus endpoint, and
RunOutputs, the three together as both training drivers (gradient loop, classical fit) use them.

Only rank 0 writes; the drivers hand these objects plain dicts.

    {"kind": "train", "step", "tokens", "loss", "lr", "tokens_per_s", "step_time_s", "grad_norm",
     "loss_scale", "skipped_steps", "ranks"}
    {"kind": "eval", "step", "tokens", "train_loss", "val_loss"}
    {"kind": "anomaly", "step", "action", "why", "loss", "streak", ["to_step", "skipped_samples"]}

A train record also has "anomalies" (answered so far) and, on several ranks, the ranks' compute and
exchange-wait times: compute_s_min/median/max, slowest_rank, exchange_wait_s_max, straggler_rank,
rank_compute_s (a list by rank).

Every record also has "time", the Unix time it was written (seconds), for plots against wall time; an eval
record has "val_whole_split" (true: its val_loss scores the whole val split, else eval_iters random batches).
`step` counts optimizer updates done; `tokens` the training tokens consumed by all ranks so far;
a train record's loss, tokens/s and step time are means over the steps since the previous record.
"""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

from hpclm import atomic
from hpclm.errors import HpclmError

FILENAME = "metrics.jsonl"


def read_records(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends one JSON object per line, flushed at once, so a killed run loses nothing logged."""

    def __init__(self, run_dir: str | Path, keep_through_step: int):
        """Open OUT/metrics.jsonl keeping the records up to keep_through_step (a resumed run's start)."""
        self.path = Path(run_dir) / FILENAME
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= keep_through_step] if keep_through_step else []
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        stamped = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps({k: _clean(v) for k, v in stamped.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_train(r: dict, max_iters: int) -> str:
    extra = ""
    if r.get("loss_scale") not in (None, 1.0):
        extra = f" | scale {r['loss_scale']:g} | skipped {r['skipped_steps']}"
    return (f"step {r['step']}/{max_iters} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {_si(r['tokens_per_s'])} tok/s"
            f" | {r['step_time_s'] * 1e3:.1f} ms/step | grad norm {r['grad_norm']:.3f}{extra}")


def format_eval(r: dict) -> str:
    return f"eval step {r['step']}: train loss {r['train_loss']:.4f}, val loss {r['val_loss']:.4f}"


class Progress:
    """A tqdm bar when stderr is a terminal, else one plain line per record on stdout."""

    def __init__(self, start_step: int, max_iters: int, bar: bool | None = None):
        self.max_iters = max_iters
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max_iters, initial=start_step, unit="step", dynamic_ncols=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def train(self, r: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=_si(r["tokens_per_s"]), lr=f"{r['lr']:.2e}", refresh=False)
        else:
            print(format_train(r, self.max_iters), flush=True)

    def eval(self, r: dict) -> None:
        self.message(format_eval(r))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Prometheus:
    """Gauges at http://HOST:PORT/metrics, served from a daemon thread; HOST is 127.0.0.1 unless configured.

    A scrape sees each gauge's value from the latest record that carried it, the gauges of one record
    always together (a copy taken under a lock, never half an update)."""

    GAUGES = {
        "step": "optimizer updates done", "tokens": "training tokens consumed, all ranks",
        "loss": "training loss (mean since the last record)", "lr": "learning rate",
        "tokens_per_s": "training throughput, all ranks", "step_time_s": "seconds per optimizer step",
        "grad_norm": "gradient norm before clipping", "loss_scale": "FP16 loss scale",
        "skipped_steps": "optimizer steps skipped for non-finite gradients", "ranks": "data-parallel ranks",
        "train_loss": "evaluated training loss", "val_loss": "evaluated validation loss",
        "anomalies": "loss spikes and non-finite steps answered (skip or rollback) so far",
        "compute_s_min": "fastest rank's forward and backward seconds per step",
        "compute_s_median": "median rank's forward and backward seconds per step",
        "compute_s_max": "slowest rank's forward and backward seconds per step",
        "slowest_rank": "the rank with the longest forward and backward in the last log interval",
        "exchange_wait_s_max": "longest wait of a rank for the gradient exchange, seconds per step",
        "straggler_rank": "a rank named as a straggler (-1: none)",
    }

    def __init__(self, port: int, host: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, start_http_server
        self._lock = threading.Lock()
        self._values = {**dict.fromkeys(self.GAUGES, 0.0), "straggler_rank": -1.0}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise HpclmError(f"cannot serve Prometheus metrics on {host}:{port} ({e.strerror}): "
                             "set metrics.prometheus_port to a free port, or 0 for none") from None
        self.url = f"http://{host}:{self.server.server_port}/metrics"

    def update(self, record: dict) -> None:
        numbers = {k: float(v) for k, v in record.items()
                   if k in self.GAUGES and isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self._lock:
            self._values.update(numbers)

    def collect(self):
        """The registry's view (prometheus_client's collector protocol): one gauge per name."""
        from prometheus_client.core import GaugeMetricFamily
        with self._lock:
            values = dict(self._values)
        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"hpclm_{key}", doc, value=values[key])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RunOutputs:
    """Rank 0's outputs of a training run besides checkpoints: OUT/metrics.jsonl (keeping the records up
    to the step the run starts from), the progress display and, when metrics.prometheus_port is set, the
    Prometheus endpoint. On every other rank each method does nothing, so drivers call them on all ranks."""

    def __init__(self, out: str | Path, start_step: int, max_steps: int, metrics_cfg, *, main: bool,
                 progress_bar: bool | None = None):
        self.main = main
        self.log = self.prom = self.progress = None
        if not main:
            return
        if metrics_cfg.prometheus_port:
            self.prom = Prometheus(metrics_cfg.prometheus_port, metrics_cfg.prometheus_host)
        self.log = MetricsLog(out, start_step)
        self.progress = Progress(start_step, max_steps, progress_bar)

    @property
    def prometheus_url(self) -> str | None:
        return self.prom.url if self.prom else None

    def record(self, r: dict, show: bool = True) -> None:
        """Log one record (kind "train" or "eval"), export its gauges and, with `show`, display it."""
        if not self.main:
            return
        self.log.write(r)
        if self.prom:
            self.prom.update(r)
        if show:
            self.progress.train(r) if r["kind"] == "train" else self.progress.eval(r)

    def message(self, text: str) -> None:
        if self.main:
            self.progress.message(text)

    def step(self) -> None:
        if self.main:
            self.progress.step()

    def close(self) -> None:
        for part in (self.progress, self.log, self.prom):
            if part is not None:
                part.close()
