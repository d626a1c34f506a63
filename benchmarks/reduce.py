#!/usr/bin/env python3
"""The ring's reduce kernel per CPU path vs numpy: same as `hpclm bench reduce [options]` (see --help).

    python benchmarks/reduce.py --json runs/bench/reduce.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hpclm

from hpclm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "reduce", *sys.argv[1:]]))
