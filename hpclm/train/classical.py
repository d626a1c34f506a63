"""`hpclm train` for the classical baselines: n-gram counting and HMM Baum-Welch.

The run directory, metrics, eval and checkpoints are those of the gradient loop: the same start
(hpclm.train.start), outputs (RunOutputs: OUT/metrics.jsonl, progress, Prometheus), checkpoints
(OUT/checkpoints/iter_NNNNNNN/: model.pt, state.pt, config.toml, meta.json, tokenizer.json, and
`latest`) and evals on the same seeded batches (hpclm.evaluate.estimate_loss). A step is
one pass over the training split: the n-gram model takes one (every order counted), the HMM one per
EM iteration, train.max_iters at most, fewer once an iteration improves the train loss by less than
model.em_tol.

Under mpirun every rank runs this. Each rank counts the whole split for the n-gram model (the counts
are identical); the HMM's training windows are dealt out to ranks and the expected counts summed
with one allreduce per iteration.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from hpclm import config as config_mod
from hpclm.comm import dist
from hpclm.config import Config
from hpclm.data import Dataset, load_dataset
from hpclm.errors import HpclmError
from hpclm.evaluate import estimate_loss
from hpclm.models import build_model
from hpclm.models.hmm import Counts
from hpclm.train import checkpoint
from hpclm.train.metrics import RunOutputs
from hpclm.train.start import open_run_dir, refuse_diverged, resolve_device

STATE_FORMAT = 1


def hmm_windows(data: Dataset, block_size: int, rank: int = 0, ranks: int = 1) -> tuple[torch.Tensor, int]:
    """This rank's share of the training split cut into windows of block_size + 1 tokens (the eval
    windows' length; the tail shorter than one window is left out), and the token count of all shares."""
    length = block_size + 1
    n = len(data.train) // length
    if n < 1:
        raise HpclmError(f"the train split of {data.path} has {len(data.train)} tokens, fewer than one HMM window "
                         f"(data.block_size + 1 = {length}): use a smaller data.block_size")
    windows = np.asarray(data.train[:n * length]).reshape(n, length)
    return torch.from_numpy(windows[rank::ranks].astype(np.int64)), n * length


def count_ngrams(model, data: Dataset, say) -> dict:
    """The n-gram model's one step: count every order of the training split."""
    t0 = time.perf_counter()
    model.fit(np.asarray(data.train))
    dt = time.perf_counter() - t0
    sizes = [len(model.tables[f"rowkey.{n}"]) for n in range(1, model.order + 1)]
    say(f"counted orders 1-{model.order} of {len(data.train):,} tokens in {dt:.2f} s: n-grams "
        + "/".join(f"{s:,}" for s in sizes) + ", discounts " + "/".join(f"{d:.3f}" for d in model.discounts))
    return {"tokens": len(data.train), "tokens_per_s": len(data.train) / dt, "step_time_s": dt, "ngrams": sizes}


def em_iteration(model, windows: torch.Tensor, total_tokens: int, cfg: Config, state: dict, say) -> dict:
    """One Baum-Welch iteration; its loss is the train loss of the parameters it started from."""
    t0 = time.perf_counter()
    counts = model.expected_counts(windows)
    if dist.is_distributed():
        counts = Counts.unflat(dist.allreduce(counts.flat().cpu(), "sum").to(windows.device), model.states,
                               model.vocab_size)
    model.maximize(counts, cfg.model.em_pseudocount)
    if windows.device.type == "cuda":
        torch.cuda.synchronize(windows.device)
    dt = time.perf_counter() - t0
    loss = -float(counts.log_likelihood) / total_tokens
    gain = state["loss"] - loss if state.get("loss") is not None else None
    step = state["step"] + 1
    state.update(loss=loss, gain=gain)
    say(f"em iteration {step}/{cfg.train.max_iters} | train loss {loss:.4f}"
        + (f" | gain {gain:.2e}" if gain is not None else "") + f" | {total_tokens / dt / 1e3:.0f}k tok/s | {dt:.2f} s"
        + (" | converged (gain < model.em_tol)" if converged(state, cfg) else ""))
    return {"tokens": step * total_tokens, "loss": loss, "loss_gain": gain, "tokens_per_s": total_tokens / dt,
            "step_time_s": dt}


def converged(state: dict, cfg: Config) -> bool:
    """EM stops once an iteration's gain falls below model.em_tol (re-checked on resume with the current value)."""
    return state.get("gain") is not None and state["gain"] < cfg.model.em_tol


def save(cfg: Config, out: Path, data: Dataset, model, state: dict) -> Path:
    """Every rank enters; rank 0 writes the checkpoint; a write error stops every rank."""
    def files():
        refuse_diverged(state["step"], out, {"model": model.state_dict()},
                        losses_finite=state.get("loss") is None or math.isfinite(state["loss"]))
        return {
            **dict([checkpoint.weights_file(model.state_dict(), cfg.checkpoint.format)]),
            "state.pt": checkpoint.tensor_bytes({"format": STATE_FORMAT, **state}),
            "config.toml": config_mod.to_toml(cfg),
            "meta.json": (data.path / "meta.json").read_text(encoding="utf-8"),
            "tokenizer.json": (data.path / "tokenizer.json").read_text(encoding="utf-8"),
        }
    return checkpoint.save_from_rank0(out, state["step"], files, cfg.checkpoint.keep_last)


def fit(cfg: Config, out: str | Path, *, resume: str | None = None, force: bool = False,
        progress_bar: bool | None = None) -> dict:
    """Fit an ngram or hmm model per cfg into OUT; returns the summary the gradient loop returns."""
    out, arch = Path(out), cfg.model.arch
    main = dist.launch_env().rank == 0
    dist.init()
    device = torch.device("cpu") if arch == "ngram" else resolve_device(cfg.train.device)
    data = load_dataset(cfg.data.path, cfg.data.block_size)
    model = build_model(cfg, data.vocab_size).to(device)
    if arch == "hmm":
        windows, total_tokens = hmm_windows(data, cfg.data.block_size, dist.rank(), dist.size())
        windows = windows.to(device)
    ckpt = open_run_dir(cfg, out, data, resume or cfg.checkpoint.resume, force).ckpt
    state = {"step": 0}
    if ckpt:
        model.load_state_dict(checkpoint.load_weights(Path(ckpt), device))
        state = {k: v for k, v in checkpoint.load(Path(ckpt), "state.pt").items() if k != "format"}
    elif arch == "hmm":
        unigram = torch.bincount(torch.from_numpy(np.asarray(data.train).astype(np.int64)), minlength=data.vocab_size)
        model.randomize(unigram / unigram.sum(), torch.Generator().manual_seed(cfg.train.seed))
    max_steps = 1 if arch == "ngram" else cfg.train.max_iters
    outputs = RunOutputs(out, state["step"], max_steps, cfg.metrics, main=main, progress_bar=progress_bar)
    message = outputs.message
    what = f"order {cfg.model.order}" if arch == "ngram" else f"{cfg.model.states} states, {max_steps} EM iterations at most"
    message(f"hpclm train: {arch} ({what}), {dist.size()} rank(s), {device}; data {cfg.data.path} "
            f"({data.meta['tokenizer']}, vocabulary {data.vocab_size}, {len(data.train):,} train tokens); out {out}"
            + (f"; resumed from {ckpt}" if ckpt else ""))
    summary = {"start_step": state["step"], "step": state["step"], "out": str(out)}

    def evaluate(step: int, tokens: int) -> None:
        losses = estimate_loss(model, data, cfg, device, contextlib.nullcontext())
        outputs.record({"kind": "eval", "step": step, "tokens": tokens, **losses})
        summary.update(losses)

    try:
        if arch == "ngram" and state["step"]:
            message(f"already fitted ({ckpt}): nothing to do; --resume never --force fits again")
        elif converged(state, cfg):
            message(f"EM already converged at step {state['step']} (gain {state['gain']:.2e} < model.em_tol): lower "
                    "model.em_tol to continue")
        elif state["step"] >= max_steps:
            message(f"already at step {state['step']} (train.max_iters = {max_steps}): raise train.max_iters to continue EM")
        train_time, tokens = 0.0, 0
        while state["step"] < max_steps and not converged(state, cfg):
            if arch == "ngram":
                r = count_ngrams(model, data, message)
            else:
                r = em_iteration(model, windows, total_tokens, cfg, state, message)
            state["step"] += 1
            step, tokens, train_time = state["step"], r["tokens"], train_time + r["step_time_s"]
            outputs.record({"kind": "train", "step": step, **r, "ranks": dist.size()}, show=False)  # r printed its line
            outputs.step()
            last = step == max_steps or converged(state, cfg)
            if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or last:
                evaluate(step, tokens)
            if (cfg.checkpoint.every_iters and step % cfg.checkpoint.every_iters == 0) or last:
                summary["checkpoint"] = str(save(cfg, out, data, model, state))
            summary["step"] = step
        if summary["step"] > summary["start_step"]:
            summary["train_time_s"] = train_time
            summary["tokens_per_s"] = (len(data.train) if arch == "ngram" else total_tokens) \
                * (summary["step"] - summary["start_step"]) / train_time
    finally:
        outputs.close()
    return summary
