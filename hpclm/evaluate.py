"""A model's loss: `estimate_loss` over fixed random batches (the evals during training) and
`split_loss` over a whole split (`hpclm eval`, which also prints the perplexity).

`hpclm eval` predicts every position of val.bin (but the last, partial block) once, in consecutive
blocks of data.block_size tokens; under mpirun the blocks are shared among ranks.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from hpclm.comm import dist
from hpclm.data import Dataset, batch_rng, get_batch, load_dataset
from hpclm.errors import HpclmError
from hpclm.generate import load_trained


@torch.no_grad()
def estimate_loss(model, data: Dataset, cfg, device, amp) -> dict[str, float]:
    """Mean loss over train.eval_iters fixed batches per split, averaged over ranks; with train.eval_whole_val
    the val loss is split_loss over the whole val split instead (its blocks shared among data replicas)."""
    model.eval()
    means = []
    splits = ("train",) if cfg.train.eval_whole_val else ("train", "val")
    for split in splits:
        total = torch.zeros((), device=device)
        for k in range(cfg.train.eval_iters):
            x, y = get_batch(data.split(split), cfg.train.batch_size, cfg.data.block_size,
                             batch_rng(cfg.train.seed, f"eval_{split}", dist.data_rank(), k), device)
            with amp:
                _, loss = model(x, y)
            total += loss.float()
        means.append(total / cfg.train.eval_iters)
    result = torch.stack(means).cpu()
    if dist.is_distributed():
        result = dist.allreduce(result, "avg")
    losses = {"train_loss": result[0].item()}
    if cfg.train.eval_whole_val:  # the same figure on every rank
        losses["val_loss"] = split_loss(model, data.val, cfg.data.block_size, rank=dist.data_rank(),
                                        ranks=dist.data_size(), device=device, amp=amp)[0]
    else:
        losses["val_loss"] = result[1].item()
    model.train()
    return losses


@torch.no_grad()
def split_loss(model, tokens: np.ndarray, block_size: int, batch_size: int = 32, rank: int = 0, ranks: int = 1,
               device="cpu", amp=None) -> tuple[float, int]:
    """(mean cross-entropy in nats, tokens predicted) over consecutive blocks of `tokens`, block i on rank
    i % ranks; with ranks > 1 the sums are allreduced over every rank. Ranks that share blocks (a
    tensor-parallel group) scale sum and count alike, so the mean stays right."""
    n_blocks = (len(tokens) - 1) // block_size
    mine = np.arange(rank, n_blocks, ranks)
    total, count = 0.0, 0
    offsets = np.arange(block_size + 1)
    for i in range(0, len(mine), batch_size):
        starts = mine[i:i + batch_size] * block_size
        w = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64)).to(device)
        with amp or contextlib.nullcontext():
            _, loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * w[:, 1:].numel()
        count += w[:, 1:].numel()
    if ranks > 1:
        both = dist.allreduce(torch.tensor([total, float(count)], dtype=torch.float64), "sum")
        total, count = both[0].item(), int(both[1].item())
    return total / max(count, 1), count


def main(args) -> int:
    dist.init()
    trained = load_trained(args.ckpt)
    if not (args.data or trained.cfg.data.path):
        raise HpclmError(f"{args.ckpt} names no dataset of its own: give --data DIR (prepared with its tokenizer)")
    data_dir = Path(args.data) if args.data else Path(trained.cfg.data.path)
    data = load_dataset(data_dir, trained.cfg.data.block_size)
    if data.meta.get("tokenizer_sha256") != trained.meta.get("tokenizer_sha256"):
        raise HpclmError(f"{data_dir} was tokenized with another tokenizer than {trained.path}: "
                         "prepare it again with the same tokenizer, or evaluate on the run's own data")
    loss, count = split_loss(trained.model, data.val, trained.cfg.data.block_size, rank=dist.rank(), ranks=dist.size())
    if dist.is_main():
        print(f"val loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {count:,} tokens of {data_dir / 'val.bin'} "
              f"({trained.path}, step {trained.step})")
    return 0
