"""How a training run starts: fresh or resumed, decided and checked before any training.

Rank 0 looks at OUT: the checkpoint to resume (the newest complete one), whether it is the same model
as the config asks for, and whether OUT may be written; every rank learns the decision or the one-line
error. `hpclm train --check` runs the same checks and writes nothing.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from hpclm import atomic, config as config_mod
from hpclm.comm import dist
from hpclm.config import Config
from hpclm.data import Dataset, load_dataset
from hpclm.errors import HpclmError
from hpclm.models import model_signature
from hpclm.train import checkpoint

PREEMPTED_MARKER = "preempted"  # OUT/preempted: the step of the checkpoint a preempted run wrote last


def resolve_device(name: str) -> torch.device:
    """train.device: auto (this rank's GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device(f"cuda:{dist.local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HpclmError(f"train.device = '{name}' but torch sees no CUDA device: use 'cpu' or 'auto'")
    return device


def _read_ckpt_signature(path: Path) -> tuple[dict, str]:
    meta = json.loads(checkpoint.load(path, "meta.json"))
    ckpt_cfg = config_mod.from_dict(tomllib.loads(checkpoint.load(path, "config.toml")))
    return model_signature(ckpt_cfg, int(meta["vocab_size"])), meta.get("tokenizer_sha256", "")


def initial_weights(cfg: Config, data: Dataset):
    """The model a fresh run starts from (init.from, as an interop.Imported), after checking it is this
    config's model over this dataset's tokenizer; None without init.from."""
    spec = cfg.init.from_
    if not spec:
        return None
    from hpclm import interop
    imported = interop.read(spec, "init.from")
    theirs, meta = imported.cfg, imported.meta
    if cfg.model.arch != "gpt":
        raise HpclmError(f"init.from {spec} holds a GPT, but model.arch = {cfg.model.arch!r}: set model.arch = 'gpt'")
    for key in ("model.n_layer", "model.n_head", "model.n_embd", "model.bias", "model.activation", "data.block_size"):
        section, name = key.split(".")
        ours, want = getattr(getattr(cfg, section), name), getattr(getattr(theirs, section), name)
        if ours != want:
            raise HpclmError(f"init.from {spec}: {key} = {ours!r} here but {want!r} in that model: set {key} = "
                             f"{config_mod.toml_value(want)} (fine-tuning keeps the model's shape)")
    if meta["tokenizer_sha256"] != data.meta.get("tokenizer_sha256") or int(meta["vocab_size"]) != data.vocab_size:
        raise HpclmError(f"init.from {spec}: {data.path} was tokenized with another tokenizer than that model's: "
                         f"prepare it with `hpclm prepare SOURCE --out DIR --tokenizer-from {spec}`")
    return imported


def plan_start(out: Path, cfg: Config, data: Dataset, resume: str, force: bool, warn) -> str | None:
    """Rank 0: the checkpoint to resume from (None: start fresh), after the safety checks."""
    if force and resume != "never":
        raise HpclmError("--force only applies with --resume never (start over, deleting OUT's checkpoints)")
    existing = checkpoint.listing(out)
    if resume == "never":
        if existing and not force:
            raise HpclmError(f"{out} already has checkpoints (newest {existing[-1].name}): resume them (--resume auto), "
                             "pick another --out, or start over with --resume never --force (deletes them)")
        return None
    ckpt = checkpoint.find_resumable(out, warn)
    if ckpt is None:
        return None
    if checkpoint.quantization(ckpt):
        raise HpclmError(f"{ckpt} is a quantized checkpoint (hpclm quantize), for inference only: resume or fine-tune "
                         "from the float checkpoint it came from, or pick another --out")
    theirs, tokenizer_sha = _read_ckpt_signature(ckpt)
    ours = model_signature(cfg, data.vocab_size)
    diffs = [f"{k}: {theirs.get(k)} in the checkpoint, {v} now" for k, v in ours.items() if theirs.get(k) != v]
    if not diffs and tokenizer_sha != data.meta.get("tokenizer_sha256"):
        diffs = ["the tokenizer differs from data.path's"]
    if diffs:
        raise HpclmError(f"{out} holds checkpoints of a different model ({'; '.join(diffs)}): pick another --out, "
                         "or start over with --resume never --force (deletes them)")
    return str(ckpt)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_outputs(cfg: Config, out: Path, *, write_probe: bool) -> None:
    """The Prometheus port is free, and OUT (or the folder that would hold it) and OUT/checkpoints can be
    written. write_probe: create OUT/checkpoints and write a file there (the start); else permissions only
    (--check, which writes nothing)."""
    port = cfg.metrics.prometheus_port
    if port:
        with socket.socket(socket.AF_INET6 if ":" in cfg.metrics.prometheus_host else socket.AF_INET) as sock:
            try:
                sock.bind((cfg.metrics.prometheus_host, port))
            except OSError as e:
                raise HpclmError(f"cannot serve Prometheus metrics on {cfg.metrics.prometheus_host}:{port} "
                                 f"({e.strerror}): set metrics.prometheus_port to a free port, or 0 for none") from None
    ckpts = checkpoint.root(out)
    if write_probe:
        probe = ckpts / f".write-test-{os.getpid()}"
        try:
            ckpts.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise HpclmError(f"cannot write checkpoints to {ckpts} ({e.strerror}): make it writable or pick another "
                             "--out") from None
    else:
        stop = atomic.blocker(ckpts / checkpoint.LATEST)  # the folder that would hold checkpoints
        if stop is not None:
            raise HpclmError(f"cannot write to {out}: {stop} is not a writable directory; pick another --out")


def resume_layout(cfg: Config, ckpt: str | Path, world: int) -> tuple[dict, str]:
    """Resuming on another number of ranks than wrote the checkpoint: the train.grad_accum (else
    train.batch_size) that keeps its global batch when the config's batch settings are the checkpoint's,
    and a note saying what changes. ({}, "") on the same number of ranks."""
    state = checkpoint.load(Path(ckpt), "state.pt")
    before = int(state.get("data_parallel", state.get("world_size", world)))
    if before == world:
        return {}, ""
    old = config_mod.from_dict(tomllib.loads(checkpoint.load(Path(ckpt), "config.toml"))).train
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    total = int(state.get("global_batch", old.batch_size * before * old.grad_accum))
    head = f"note: the checkpoint was written by {before} ranks, this run has {world}"
    tail = "training continues at the next unseen global sample, so none is trained on twice or skipped"
    if batch * world * accum == total:
        return {}, f"{head}: the global batch stays {total} sequences; {tail}"
    if (batch, accum) == (old.batch_size, old.grad_accum):
        if total % (world * batch) == 0:
            return {"grad_accum": total // (world * batch)}, (f"{head}: train.grad_accum becomes {total // (world * batch)} "
                                                              f"to keep the global batch of {total} sequences; {tail}")
        if total % (world * accum) == 0:
            return {"batch_size": total // (world * accum)}, (f"{head}: train.batch_size becomes {total // (world * accum)} "
                                                              f"to keep the global batch of {total} sequences; {tail}")
    return {}, (f"{head}: the global batch changes from {total} to {batch * world * accum} sequences (the learning-rate "
                f"schedule keeps its steps); {tail}")


@dataclass
class StartPlan:
    ckpt: str | None  # the checkpoint to resume from (None: a fresh start)
    imported: object = None  # rank 0, a fresh start with init.from: the model it read and checked (interop.Imported)


def open_run_dir(cfg: Config, out: Path, data: Dataset, resume: str, force: bool, say=None) -> StartPlan:
    """Every rank: rank 0 checks OUT, writes OUT/config.toml and picks the checkpoint to resume (None: fresh).
    Everything is checked before anything is written. With `say` (the gradient loop), a resume on another
    number of ranks sets cfg.train.grad_accum or batch_size on every rank as resume_layout decides."""
    plan, imported = None, None
    if dist.is_main():
        try:
            ckpt = plan_start(out, cfg, data, resume, force, warn)
            layout, note = resume_layout(cfg, ckpt, dist.data_size()) if ckpt and say else ({}, "")
            for key, value in layout.items():
                setattr(cfg.train, key, value)
            if ckpt is None:
                imported = initial_weights(cfg, data)  # refused here, before anything is written
            check_outputs(cfg, out, write_probe=True)
            if force:
                checkpoint.remove_all(out)
            checkpoint.clean_leftovers(out)
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)
            atomic.write_text(out / "config.toml", config_mod.to_toml(cfg, "resolved config of this run (hpclm train)"))
            plan = {"ckpt": ckpt, "layout": layout, "note": note}
        except (HpclmError, OSError) as e:
            plan = {"error": str(e) if isinstance(e, HpclmError) else f"cannot write to {out}: {e}"}
    if dist.is_distributed():
        plan = dist.broadcast_object(plan, 0)
    if "error" in plan:
        raise HpclmError(plan["error"])
    for key, value in plan["layout"].items():
        setattr(cfg.train, key, value)
    if plan["note"]:
        say(plan["note"])
    return StartPlan(plan["ckpt"], imported)


def check_start(cfg: Config, out: Path, resume: str, force: bool) -> str:
    """What `train` would check first, without writing anything: raises HpclmError if it could not start."""
    if cfg.model.arch != "ngram":  # counted on the CPU whatever train.device says
        resolve_device(cfg.train.device)
    data = load_dataset(cfg.data.path, cfg.data.block_size)
    ckpt = plan_start(out, cfg, data, resume, force, warn)
    if ckpt is None:
        initial_weights(cfg, data)
    check_outputs(cfg, out, write_probe=False)
    start = f"resume from {ckpt}" if ckpt else f"start fresh in {out}"
    return f"hpclm train: ok: {cfg.model.arch} on {cfg.data.path} (vocabulary {data.vocab_size}); would {start}"


def refuse_diverged(step: int, out: Path, named: dict, losses_finite: bool = True) -> None:
    """Rank 0, before a checkpoint is written: HpclmError when a loss since the last check, or a weight or
    optimizer tensor, is inf or NaN, so a diverged state never becomes a checkpoint (nor pushes a good
    one out by pruning)."""
    bad = checkpoint.non_finite(named)
    if losses_finite and not bad:
        return
    what = ("the loss" if not losses_finite else bad[0]) + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    newest = checkpoint.read_latest(out)
    kept = (f"{checkpoint.root(out) / checkpoint.name(newest)} stays the newest checkpoint" if newest is not None
            else "no checkpoint was written")
    raise HpclmError(f"training diverged: {what} is not finite at step {step}, so it was not checkpointed; "
                     f"{kept}: resume from it with a lower optim.lr, a longer optim.warmup_iters or optim.grad_clip")
