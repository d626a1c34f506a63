"""A prepared dataset (train.bin, val.bin, meta.json, tokenizer.json) and the batches drawn from it.

Training samples are numbered globally (0, 1, 2, ... across all ranks and steps) and sample g's window
is fixed by (seed, g) alone (sample_starts), so a run resumed on another number of ranks continues at
the next unseen sample: no window is trained on twice or skipped, whatever the layout. Eval batches
are drawn with a numpy generator seeded by (seed, split, rank, index).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpclm.data import tokenizers
from hpclm.errors import HpclmError

META = "meta.json"


def token_dtype(vocab_size: int):
    """uint16 tokens when the vocabulary fits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class Dataset:
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load(self.path / tokenizers.FILENAME)

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


def _max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_dataset(path: str | Path, block_size: int | None = None, *, check_tokens: bool = True) -> Dataset:
    """Open a prepared directory, checking it is complete and its tokens fit the vocabulary."""
    path = Path(path)
    if not (path / META).is_file():
        what = "does not exist" if not path.exists() else "has no meta.json"
        raise HpclmError(f"data.path '{path}' {what}: create it with 'hpclm prepare SOURCE --out {path}'")
    try:
        meta = json.loads((path / META).read_text())
        dtype = np.dtype(meta["dtype"])
        vocab = meta["vocab_size"]
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 2**32:
            raise ValueError(f"vocab_size {vocab!r} is not a whole number of tokens from 1 to 2**32")
    except (ValueError, KeyError, TypeError) as e:
        raise HpclmError(f"{path / META} is unreadable ({e}): prepare the data again with --force") from None
    tokenizer = tokenizers.load(path)  # one line if it is missing or does not parse
    if tokenizer.vocab_size != vocab:
        raise HpclmError(f"{path / META} says vocab_size {vocab} but {path / tokenizers.FILENAME} has "
                         f"{tokenizer.vocab_size} tokens: prepare the data again with --force")
    splits = {}
    for name in ("train", "val"):
        f = path / f"{name}.bin"
        expect = int(meta.get(f"{name}_tokens", -1))
        size = f.stat().st_size if f.is_file() else -1
        if size != expect * dtype.itemsize:
            raise HpclmError(f"{f} has {size} bytes but meta.json says {expect} {dtype.name} tokens: "
                             "the dataset is incomplete; prepare it again with --force")
        tokens = np.memmap(f, dtype=dtype, mode="r")
        if check_tokens and len(tokens) and _max_token(tokens) >= vocab:
            raise HpclmError(f"{f} holds token id {_max_token(tokens)}, outside the vocabulary (0..{vocab - 1}) "
                             "of its tokenizer: prepare the data again with --force")
        if block_size is not None and len(tokens) <= block_size:
            raise HpclmError(f"the {name} split of {path} has {len(tokens)} tokens, shorter than one block "
                             f"(data.block_size {block_size} + 1): use a smaller data.block_size or prepare "
                             "with a larger corpus or --val-fraction")
        splits[name] = tokens
    return Dataset(path, meta, splits["train"], splits["val"])


STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}


def batch_rng(seed: int, stream: str, rank: int, index: int) -> np.random.Generator:
    """The generator of one batch: fixed by (seed, stream, rank, index), independent of history.

    Streams: "eval_train"/"eval_val" (index = eval batch); "train" is not drawn this way (sample_starts).
    """
    return np.random.default_rng([seed, STREAMS[stream], rank, index])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_starts(seed: int, indices, span: int) -> np.ndarray:
    """Window starts in 0..span-1 of the global training samples `indices`, each fixed by (seed, index)
    alone: a counter-based hash (splitmix64), independent of which rank or step draws it."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    return (_splitmix64(np.asarray(indices, dtype=np.uint64) ^ key) % np.uint64(span)).astype(np.int64)


def get_samples(tokens: np.ndarray, seed: int, indices, block_size: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The training windows of global samples `indices` (sample_starts)."""
    return windows(tokens, sample_starts(seed, indices, len(tokens) - block_size), block_size, device)


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows drawn from rng."""
    return windows(tokens, rng.integers(0, len(tokens) - block_size, size=batch_size), block_size, device)


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[i : i+T], y = tokens[i+1 : i+T+1] for each start i."""
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


