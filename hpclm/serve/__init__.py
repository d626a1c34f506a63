"""`hpclm serve`: a trained checkpoint behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    config.py     the [serve] settings
    scheduler.py  the one loop that batches every running sequence (continuous batching)
    app.py        the HTTP routes, request checks and responses
    limits.py     per-client token buckets
    metrics.py    Prometheus metrics

SIGTERM (or Ctrl-C) drains: no new requests (503, /ready false), the admitted ones finish within
serve.drain_timeout_s (then end with an error), and the process exits 0.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from hpclm.errors import HpclmError


def _imports():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise HpclmError(f"hpclm serve needs FastAPI and uvicorn ({e}): pip install 'hpclm[serve]' "
                         "(scripts/setup.sh installs them)") from None
    return uvicorn


def build(ckpt: str, cfg):
    """(Served, the loaded model's Trained) for a checkpoint; its scheduler is not running yet."""
    import torch
    from hpclm import interop
    from hpclm.generate import load_trained
    from hpclm.serve.app import Served
    from hpclm.serve.metrics import ServeMetrics
    from hpclm.serve.scheduler import Scheduler
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trained = load_trained(ckpt)
    where = ckpt.split(":", 1)[1] if interop.is_foreign(ckpt) else ckpt
    name = cfg.model_name or Path(where).resolve().name or "model"
    metrics = ServeMetrics(name)
    scheduler = Scheduler(trained.model, trained.tokenizer, cfg, metrics)
    return Served(scheduler, trained.tokenizer, name, cfg, metrics, int(trained.meta["vocab_size"])), trained


def main(args) -> int:
    from hpclm.serve import config as serve_config
    uvicorn = _imports()
    overrides = [*(args.set or []), *([f"serve.host={json.dumps(args.host)}"] if args.host else []),
                 *([f"serve.port={args.port}"] if args.port is not None else [])]
    cfg = serve_config.load(args.config, overrides)
    logging.getLogger("hpclm.serve").addHandler(logging.StreamHandler(sys.stderr))  # a failed step's traceback
    try:  # before the model loads: a port in use is known at once
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    except OSError as e:
        raise HpclmError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port "
                         "(0: any free one)") from None
    try:
        served, trained = build(args.ckpt, cfg)
    except BaseException:
        sock.close()
        raise
    from hpclm.serve.app import create_app
    host, port = sock.getsockname()[:2]
    server = draining_server(uvicorn, uvicorn.Config(create_app(served), log_level="warning", access_log=False,
                                                     timeout_graceful_shutdown=5), served)
    window = served.scheduler.max_length
    print(f"hpclm serve: model '{served.name}' ({trained.cfg.model.arch}, {trained.path}, step {trained.step}, "
          f"context {window or 'unbounded'}) on http://{host}:{port}/v1 "
          f"(max_running {cfg.max_running}, max_queued {cfg.max_queued})", flush=True)
    http = threading.Thread(target=_serve_http, args=(server, sock, served.scheduler), name="hpclm-http")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    http.start()
    # The model runs on the main thread: run from a second thread, OpenMP's workers sleep between parallel
    # regions instead of spinning (libgomp's throttled wait once it manages more threads than there are
    # cores), and every region of a decoding step pays a wake-up.
    try:
        served.scheduler.run()
    finally:  # the loop ended: stopped by a drain, or the HTTP side ended, or it failed; the server stops too
        server.should_exit = True
        http.join()
    print(f"hpclm serve: stopped ({'drained' if server.drained else 'requests ended with an error'})", flush=True)
    return 0


def _serve_http(server, sock, scheduler) -> None:
    """uvicorn's loop on this thread; when it ends, for whatever reason, the scheduler stops too."""
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()


def draining_server(uvicorn, config, served):
    """uvicorn's server whose handle_exit (the main thread's SIGTERM/SIGINT handler) drains the scheduler before
    the server stops (a second signal stops at once); it exits 0, not re-raising the signal as uvicorn does."""

    class DrainingServer(uvicorn.Server):
        drained = False

        def handle_exit(self, sig, frame):
            if served.scheduler.draining:
                self.force_exit = True
                return
            served.scheduler.begin_drain()
            threading.Thread(target=self._drain, name="hpclm-drain", daemon=True).start()

        def _drain(self):
            self.drained = served.scheduler.wait_idle(served.cfg.drain_timeout_s)
            served.scheduler.stop(f"the server shut down before this request finished (serve.drain_timeout_s = "
                                  f"{served.cfg.drain_timeout_s} s)")
            self.should_exit = True

    return DrainingServer(config)

