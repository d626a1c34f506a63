"""Fixtures for the training tests: Tiny Shakespeare prepared once per session, tiny run configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from hpclm import config, data

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
requires_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found (the project's shared data)")

# A GPT small enough that a step takes a few milliseconds on one core.
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.block_size=32", "train.batch_size=4",
        "train.eval_iters=2", "train.log_interval=1", "optim.warmup_iters=5", "optim.lr=3e-3", "optim.min_lr=3e-4"]


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (the project's shared data)")
    out = tmp_path_factory.mktemp("data") / "shakespeare-char"
    data.prepare("shakespeare", out, local=str(SHAKESPEARE), log=lambda *_: None)
    return out


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads, and OpenMP threads stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(data_dir: Path, *overrides: str) -> config.Config:
    return config.load(None, [f"data.path={json.dumps(str(data_dir))}", *TINY, *overrides])


def records(run_dir: Path, kind: str) -> list[dict]:
    from hpclm.train.metrics import read_records
    return [r for r in read_records(Path(run_dir) / "metrics.jsonl") if r["kind"] == kind]
