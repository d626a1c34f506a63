"""`hpclm report RUN_DIR`: PNG plots from a run's metrics.jsonl.

loss.png: train and val loss against step (left) and against training tokens (right);
throughput.png: tokens/s of all ranks together and step time against step.
"""
from __future__ import annotations

from pathlib import Path

from hpclm.errors import HpclmError
from hpclm.bench.harness import save_figure
from hpclm.train.metrics import FILENAME, read_records


def _series(records, kind, key):
    rows = [r for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [r.get("tokens", 0) for r in rows], [r[key] for r in rows]


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_records(run_dir / FILENAME)
    if not records:
        raise HpclmError(f"{run_dir / FILENAME} is missing or empty: give the --out directory of an 'hpclm train' run")
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    written = []

    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, key, label, style in (("train", "loss", "train (logged)", "-"), ("eval", "train_loss", "train (eval)", "o-"),
                                    ("eval", "val_loss", "val", "s-")):
        steps, tokens, values = _series(records, kind, key)
        if steps:
            by_step.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
            by_tokens.plot(tokens, values, style, label=label, markersize=3, linewidth=1.2)
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("training tokens (all ranks)")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: loss")
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    save_figure(fig, written[-1], dpi=110)
    plt.close(fig)

    steps, _, tps = _series(records, "train", "tokens_per_s")
    if steps:
        step_time = _series(records, "train", "step_time_s")[2]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(steps, tps, "-", color="tab:green", label="tokens/s")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s (all ranks)")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(steps, [s * 1e3 for s in step_time], ":", color="tab:gray", label="ms/step")
        ax2.set_ylabel("ms per step")
        ranks = records[-1].get("ranks") or next((r.get("ranks") for r in records if r.get("ranks")), "?")
        ax.set_title(f"{title}: throughput ({ranks} rank(s))")
        fig.legend(loc="lower right")
        fig.tight_layout()
        written.append(out_dir / "throughput.png")
        save_figure(fig, written[-1], dpi=110)
        plt.close(fig)
    return written


def main(args) -> int:
    for path in write_plots(args.run_dir, args.out):
        print(path)
    return 0
