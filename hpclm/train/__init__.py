"""Training: `start` (fresh or resumed, checked first), `loop` (the gradient loop for gpt and gru,
nanoGPT's shape), `classical` (counting and EM for ngram and hmm), `checkpoint` (complete-or-absent
checkpoint folders), `amp` (autocast and loss scaling; public name hpclm.amp), `metrics` (metrics.jsonl,
progress, Prometheus).

    from hpclm import config
    from hpclm.train import train
    summary = train(config.load("configs/demo.toml"), "runs/demo")
"""
from __future__ import annotations

from pathlib import Path


def train(cfg, out: str | Path, *, resume: str | None = None, force: bool = False,
          progress_bar: bool | None = None) -> dict:
    """Train (or fit) the model of cfg into OUT by the method its arch uses; returns a summary (final step,
    losses, throughput, checkpoint). resume: auto/never (default: checkpoint.resume); force: with never,
    delete OUT's checkpoints first."""
    from hpclm.comm.dist import reported_by_rank0
    from hpclm.models import ARCHS
    if ARCHS[cfg.model.arch].fitted_by == "gradient":
        from hpclm.train.loop import train as run
    else:
        from hpclm.train.classical import fit as run
    # every error the drivers raise is met alike by all ranks (agreed in a collective or broadcast from
    # rank 0): it is printed once
    with reported_by_rank0():
        return run(cfg, out, resume=resume, force=force, progress_bar=progress_bar)


def main(args) -> int:
    """`hpclm train`."""
    from hpclm import config
    from hpclm.comm import dist
    from hpclm.comm.dist import reported_by_rank0
    from hpclm.train.start import check_start
    with reported_by_rank0():
        cfg = config.load(args.config, args.set or [])
    out = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem if args.config else "default")
    if args.check:
        print(check_start(cfg, out, args.resume or cfg.checkpoint.resume, args.force))
        return 0
    summary = train(cfg, out, resume=args.resume, force=args.force)
    if dist.is_main() and summary["step"] > summary["start_step"]:
        val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
        print(f"done: step {summary['step']}{val}, {summary['tokens_per_s']:,.0f} tokens/s over "
              f"{summary['train_time_s']:.1f} s of training; checkpoint {summary.get('checkpoint')}")
    return 0
