"""Classical baselines against the neural models on Tiny Shakespeare (char level): val loss, perplexity, time.

Each row is one `hpclm train` command, run as its own process exactly as printed, then scored over
the whole val split with the code behind `hpclm eval` (every val token predicted once, in blocks of
the run's data.block_size). Rows: n-gram orders 3, 5 and 7, the HMM, the GRU and the GPT.

    python benchmarks/baselines.py [--data DIR] [--source FILE] [--out DIR] [--json PATH] [--rows a,b] [--threads N]

Writes a JSON object ("tool", "host", "rows") and prints a Markdown table. Times: `train_s` is the
time spent fitting (sum of the logged step times: counting, EM iterations or optimizer steps);
`wall_s` is the whole command (start-up, periodic evals and checkpoints included).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hpclm.bench import harness  # noqa: E402
# The project's shared folder sits next to the checkout, or two levels up from a worktree (as in tests/conftest.py).
SHAKESPEARE = next((p for p in (REPO.parent / "shared", REPO.parent.parent / "shared") if p.is_dir()),
                   REPO.parent / "shared") / "data" / "tinyshakespeare.txt"

ROWS = {  # name: (config, extra --set overrides)
    "ngram-3": ("configs/ngram.toml", ["model.order=3"]),
    "ngram-5": ("configs/ngram.toml", ["model.order=5"]),
    "ngram-7": ("configs/ngram.toml", ["model.order=7"]),
    "hmm": ("configs/hmm.toml", []),
    "gru": ("configs/gru.toml", []),
    "gpt": ("configs/shakespeare-char.toml", []),
}


def host(threads: str | None) -> dict:
    import torch
    threads = threads or os.environ.get("OMP_NUM_THREADS") or f"unset (torch: {torch.get_num_threads()})"
    return harness.host_info(torch=torch.__version__, omp_num_threads=threads, load_average_at_start=os.getloadavg()[0])


def train_seconds(run_dir: Path) -> tuple[float, int]:
    """(sum of logged step times, steps): each train record covers the steps since the previous one."""
    from hpclm.train.metrics import read_records
    total, prev = 0.0, 0
    for r in read_records(run_dir / "metrics.jsonl"):
        if r.get("kind") == "train":
            total += r["step_time_s"] * (r["step"] - prev)
            prev = r["step"]
    return total, prev


def score(run_dir: Path) -> tuple[float, int]:
    """What `hpclm eval --ckpt RUN_DIR` prints: mean val loss (nats/token) and tokens scored."""
    from hpclm.data import load_dataset
    from hpclm.evaluate import split_loss
    from hpclm.generate import load_trained
    trained = load_trained(run_dir)
    data = load_dataset(trained.cfg.data.path, trained.cfg.data.block_size)
    return split_loss(trained.model, data.val, trained.cfg.data.block_size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare-char", help="prepared data directory (made if missing)")
    p.add_argument("--source", default=str(SHAKESPEARE),
                   help="text to prepare when --data is missing (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--out", default="runs/baselines", help="run directories go here")
    p.add_argument("--json", default="runs/baselines/baselines.json", metavar="PATH")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--threads", help="OMP_NUM_THREADS for every command (default: inherited)")
    args = p.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = args.threads
    hpclm = [sys.executable, "-m", "hpclm"]

    if not (Path(args.data) / "meta.json").is_file():
        subprocess.run(hpclm + ["prepare", args.source, "--out", args.data], env=env, check=True, cwd=REPO)
    report = {"tool": "baselines", "host": host(args.threads), "data": args.data, "rows": []}
    for name in rows:
        config, sets = ROWS[name]
        out = Path(args.out) / name
        if args.data != p.get_default("data"):
            sets = sets + [f"data.path={json.dumps(args.data)}"]
        cmd = ["hpclm", "train", "--config", config, *[a for s in sets for a in ("--set", s)], "--out", str(out),
               "--resume", "never", "--force"]
        print(f"\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(hpclm + cmd[1:], env=env, check=True, cwd=REPO)
        wall = time.perf_counter() - t0
        fit_s, steps = train_seconds(REPO / out)
        loss, tokens = score(REPO / out)
        row = {"name": name, "command": shlex.join(cmd), "eval_command": f"hpclm eval --ckpt {out}", "steps": steps,
               "train_s": round(fit_s, 2), "wall_s": round(wall, 2), "val_loss": round(loss, 4),
               "perplexity": round(math.exp(loss), 3), "val_tokens": tokens}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    report["host"]["load_average_at_end"] = os.getloadavg()[0]
    harness.write_json(args.json, report)

    print(f"\n| model | val loss (nats/token) | perplexity | train s | wall s | command |\n|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['name']} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | {r['train_s']:.1f} | {r['wall_s']:.1f} "
              f"| `{r['command']}` |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
