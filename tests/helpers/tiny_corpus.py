"""A tiny prepared character corpus for the classical models' end-to-end tests (a fixture)."""
from __future__ import annotations

import numpy as np
import pytest

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine.",
    "To be, or not to be, that is the question.", "All that glitters is not gold.",
    "Now is the winter of our discontent.", "The better part of valour is discretion.",
    "What light through yonder window breaks?", "Brevity is the soul of wit.",
]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """(prepared directory, vocabulary size): about 20k characters of shuffled sentences, char tokenizer."""
    from hpclm.data import prepare
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tiny")
    text = "\n".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), 500)) + "\n"
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    meta = prepare(str(root / "corpus.txt"), root / "data", kind="char", val_fraction=0.1, log=lambda *a: None)
    return root / "data", meta["vocab_size"]
