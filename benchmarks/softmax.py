#!/usr/bin/env python3
"""Fused softmax vs torch on this machine: same as `hpclm bench softmax [options]` (see --help).

    python benchmarks/softmax.py --threads 1 --json runs/bench/softmax.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hpclm

from hpclm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "softmax", *sys.argv[1:]]))
