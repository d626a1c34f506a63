"""What the training benchmarks share: their config/data/work options and Tiny Shakespeare at character level."""
from __future__ import annotations

import argparse
from pathlib import Path

from hpclm import data as data_mod

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(ap: argparse.ArgumentParser, benchmark: str) -> None:
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-char.toml"))
    ap.add_argument("--from", dest="local", help="a local copy of Tiny Shakespeare (default: ../shared/data if present, "
                    "else download)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench" / benchmark), help="data and run directory")


def prepare(args: argparse.Namespace) -> Path:
    """WORK/shakespeare-char (absolute), prepared from --from, the project's shared copy, or the download."""
    local = args.local
    if local is None:
        shared = [p / "shared" / "data" / "tinyshakespeare.txt" for p in (ROOT.parent, ROOT.parent.parent)]
        local = next((str(p) for p in shared if p.is_file()), None)
    data_dir = (Path(args.work) / "shakespeare-char").resolve()
    data_mod.prepare("shakespeare", data_dir, local=local)
    return data_dir
