"""`hpclm report RUN_DIR`: PNG plots from a run's metrics.jsonl.

loss.png: train and val loss against step (left) and against training tokens (right);
throughput.png: tokens/s of all ranks together and step time against step, both axes from zero.
"""
from __future__ import annotations

from pathlib import Path

from hpclm.bench.harness import save_figure
from hpclm.errors import HpclmError
from hpclm.train.metrics import FILENAME, read_records

FEW_POINTS = 50  # series shorter than this get a marker per point (an n-gram fit logs a single one)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records, kind, key):
    rows = [r for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [r.get("tokens", 0) for r in rows], [r[key] for r in rows]


def loss_figure(records: list[dict], title: str):
    plt = _pyplot()
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, key, label, marker in (("train", "loss", "train (logged)", None), ("eval", "train_loss", "train (eval)", "o"),
                                     ("eval", "val_loss", "val", "s")):
        steps, tokens, values = _series(records, kind, key)
        if steps:
            marker = marker or ("o" if len(steps) < FEW_POINTS else None)
            for ax, x in ((by_step, steps), (by_tokens, tokens)):
                ax.plot(x, values, "-", marker=marker, label=label, markersize=3, linewidth=1.2)
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("training tokens (all ranks)")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: loss")
    fig.tight_layout()
    return fig


def throughput_figure(records: list[dict], title: str):
    """None when the run logged no train record."""
    steps, _, tps = _series(records, "train", "tokens_per_s")
    if not steps:
        return None
    step_ms = [s * 1e3 for s in _series(records, "train", "step_time_s")[2]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    marker = "o" if len(steps) < FEW_POINTS else None
    tokens_line, = ax.plot(steps, tps, "-", marker=marker, color="tab:green", label="tokens/s (all ranks)")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_ylim(0, max(tps) * 1.1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ms_line, = ax2.plot(steps, step_ms, ":", marker=marker, color="tab:gray", label="ms per step")
    ax2.set_ylabel("ms per step")
    ax2.set_ylim(0, max(step_ms) * 1.1)
    ranks = records[-1].get("ranks") or next((r.get("ranks") for r in records if r.get("ranks")), "?")
    ax.set_title(f"{title}: throughput ({ranks} rank(s))")
    # below the x label, where it covers neither a curve nor a tick label
    ax.legend(handles=[tokens_line, ms_line], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    run_dir = Path(run_dir)
    records = read_records(run_dir / FILENAME)
    if not records:
        raise HpclmError(f"{run_dir / FILENAME} is missing or empty: give the --out directory of an 'hpclm train' run")
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    plt = _pyplot()
    written = []
    for name, fig in (("loss.png", loss_figure(records, title)), ("throughput.png", throughput_figure(records, title))):
        if fig is not None:
            written.append(out_dir / name)
            save_figure(fig, written[-1], dpi=110)
            plt.close(fig)
    return written


def main(args) -> int:
    for path in write_plots(args.run_dir, args.out):
        print(path)
    return 0
