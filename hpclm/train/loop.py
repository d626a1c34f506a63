"""The gradient loop of `hpclm train` (gpt, gru): config in, loop, eval, checkpoint (nanoGPT's train.py).

Every rank runs this same program. Rank 0 alone writes OUT/config.toml, OUT/metrics.jsonl and
checkpoints, and prints progress; every collective is entered by every rank. Each step:

    for each micro-batch: forward, backward  the next global samples (data.get_samples), this rank's share
    synchronize_gradients                    Horovod's DistributedOptimizer averages over ranks
    the rank-averaged loss                   one MPI_Allreduce of a number; judged by anomaly.SpikeDetector
    scaler.unscale_and_check                 fp16: hpclm.amp.DynamicLossScaler, agreed over ranks
    clip, optimizer.step, scaler.update      lr = lr_at(applied updates): warmup + cosine decay;
                                             a step skipped for overflow or an anomaly does not advance it

An anomaly (a loss spike, a non-finite loss or gradient norm) is answered per anomaly.action: skip the
update, roll back to a checkpoint and skip the batches since it and anomaly.skip_batches more, or stop.
A hang watchdog (hpclm.train.watchdog) ends a rank whose step runs past anomaly.hang_timeout_s, and every
log interval the ranks' compute times are gathered to name stragglers.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpclm import atomic, config as config_mod
from hpclm.comm import dist
from hpclm.config import Config, OptimConfig
from hpclm.data import Dataset, get_samples, load_dataset
from hpclm.errors import EXIT_PREEMPTED, HpclmError, Preempted
from hpclm.evaluate import estimate_loss
from hpclm.models import build_model, count_parameters
from hpclm.parallel.gpt import TensorParallelGPT, full_optimizer_state, shard_optimizer_state
from hpclm.parallel.gpt import grad_norm_and_clip as tensor_parallel_norm
from hpclm.parallel.groups import Layout, make_group
from hpclm.train import checkpoint
from hpclm.train.anomaly import SpikeDetector, StragglerWatch
from hpclm.train.amp import CPU_HALF_FLAGS, LossScaleError, autocast, cpu_computes, make_loss_scaler
from hpclm.train.metrics import RunOutputs
from hpclm.train.start import PREEMPTED_MARKER, open_run_dir, refuse_diverged, resolve_device
from hpclm.train.watchdog import HangWatchdog

STATE_FORMAT = 1


# --- pieces of one step --------------------------------------------------------------------------

def lr_at(step: int, o: OptimConfig, max_iters: int) -> float:
    """nanoGPT's schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters (0: max_iters)."""
    decay_iters = o.lr_decay_iters or max_iters
    if step < o.warmup_iters:
        return o.lr * (step + 1) / (o.warmup_iters + 1)
    if step > decay_iters:
        return o.min_lr
    ratio = (step - o.warmup_iters) / max(1, decay_iters - o.warmup_iters)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (o.lr - o.min_lr)


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (dim >= 2) only, not on biases, norms or 1-d gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # one kernel per step (CPU and CUDA)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def grad_norm_and_clip(params, max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping; clips to max_norm unless it is 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


# --- start: fresh or resumed (hpclm.train.start decides) ---------------------------------------

@dataclass
class Run:
    """What the loop needs, made once at start."""

    cfg: Config
    out: Path
    data: Dataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    device: torch.device
    params: list = field(default_factory=list)
    start_step: int = 0
    start_tokens: int = 0  # training tokens consumed before start_step (all ranks, at whatever rank count ran them)
    lr_step: int = 0  # optimizer updates applied: the LR schedule's position (fp16 skips do not count)
    next_sample: int = 0  # the first global training sample the next step trains on
    detector: SpikeDetector | None = None
    resumed_from: str | None = None
    sample_log: object = None  # debug.record_samples: this rank's file of the sample indices it trained on
    compiled: torch.nn.Module | None = None  # train.compile: torch.compile(model), sharing its parameters

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: per-replica batch x data replicas x gradient accumulation (the ranks
        of one tensor-parallel group train on the same sequences)."""
        t = self.cfg.train
        return t.batch_size * dist.data_size() * t.grad_accum

    @property
    def tensor_group(self):
        """The model's tensor-parallel group (hpclm.parallel), None without tensor parallelism."""
        return getattr(self.model, "group", None) if dist.tensor_parallel() > 1 else None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.cfg.data.block_size

    def tokens_at(self, step: int) -> int:
        """Training tokens consumed through `step`: a resume on another rank count keeps the earlier steps' count."""
        return self.start_tokens + (step - self.start_step) * self.tokens_per_step


def _restore(run: Run, path: Path) -> None:
    """Weights, optimizer, scaler, RNG and loop state of a checkpoint (full tensors: each TP rank keeps its slices)."""
    weights, optimizer = checkpoint.load_weights(path, run.device), checkpoint.load(path, "optimizer.pt", run.device)
    if run.tensor_group is not None:
        run.model.load_full_state_dict(weights)
        optimizer = shard_optimizer_state(run.model, run.optimizer, optimizer)
    else:
        run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(optimizer)
    state = checkpoint.load(path, "state.pt")
    run.scaler.load_state_dict(state["loss_scaler"])
    run.start_step = int(state["step"])
    run.lr_step = int(state.get("lr_step", run.start_step))
    run.start_tokens = int(state.get("tokens", run.start_step * run.tokens_per_step))
    run.next_sample = int(state.get("data", {}).get("next_sample", run.start_tokens // run.cfg.data.block_size))
    run.detector.load_state_dict(state.get("anomaly", {}))
    rng = state["rng"]["torch"]
    if len(rng) == dist.size():
        torch.set_rng_state(rng[dist.rank()])
        if run.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state(state["rng"]["cuda"][dist.rank()], run.device)
    else:  # on another number of ranks (open_run_dir said what happens to the batch): dropout reseeded
        torch.manual_seed(run.cfg.train.seed + 1 + dist.data_rank() + run.start_step)
    run.resumed_from = str(path)


def _start_from(run: Run, imported, say) -> None:
    """Rank 0: the weights of init.from, and its AdamW state when it has one laid out as hpclm's."""
    run.model.load_state_dict(imported.state)
    if imported.optimizer is None:
        return
    from hpclm.interop import nanogpt
    state, why = nanogpt.optimizer_state_for(run.optimizer, imported.optimizer)
    if state is None:
        say(f"note: the optimizer state in {run.cfg.init.from_} is not used ({why}): AdamW starts fresh")
        return
    run.optimizer.load_state_dict(state)
    step = next(iter(run.optimizer.state.values()), {}).get("step")
    say(f"hpclm train: AdamW continues from that checkpoint's state ({int(step) if step is not None else 0} updates)")


def setup(cfg: Config, out: Path, resume: str, force: bool, say) -> Run:
    dist.init(fusion_threshold_mb=cfg.dist.fusion_threshold_mb or None, cycle_time_ms=cfg.dist.cycle_time_ms or None,
              timeline=cfg.dist.timeline or None, mpi_yield_when_idle=cfg.dist.mpi_yield_when_idle,
              tensor_parallel=cfg.parallel.tensor)
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data.path, cfg.data.block_size)
    scaler = make_loss_scaler(cfg.precision)
    start = open_run_dir(cfg, out, data, resume, force, say)  # first: a resume may set train.grad_accum
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (broadcast makes sure)
    model = build_model(cfg, data.vocab_size)
    if cfg.parallel.tensor > 1:  # each rank keeps its slices of the model built above
        layout = Layout(dist.size(), cfg.parallel.tensor, dist.rank())
        model = TensorParallelGPT(model, make_group(layout, cfg.parallel.backend, device))
    model = model.to(device)
    # Horovod rebuilds the optimizer when wrapping it, so wrap first and load a checkpoint's state after.
    optimizer = dist.distributed_optimizer(make_optimizer(model, cfg.optim), model.named_parameters(),
                                           backward_passes_per_step=cfg.train.grad_accum,
                                           fp16_compression=cfg.dist.fp16_compression)
    torch.manual_seed(cfg.train.seed + 1 + dist.data_rank())  # dropout differs across replicas, not within a TP group
    run = Run(cfg, out, data, model, optimizer, scaler, device, params=[p for p in model.parameters() if p.requires_grad],
              detector=SpikeDetector.from_config(cfg.anomaly))
    if start.ckpt:
        _restore(run, Path(start.ckpt))
    elif cfg.init.from_:
        if dist.is_main():  # read and checked by open_run_dir; the other ranks take it from the broadcast below
            _start_from(run, start.imported, say)
        say(f"hpclm train: starting from the weights of {cfg.init.from_}")
    if dist.is_distributed() and run.tensor_group is None:  # TP shards: the same seed and files on every rank
        dist.broadcast_training_state(run.model, run.optimizer, root=0)
    if cfg.train.compile:
        run.compiled = compile_model(run.model)
    return run


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) of the model for training steps; evals call the eager model, which shares the
    parameters. Compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/hpclm/inductor), so
    a repeated or resumed run of the same model reuses it instead of compiling again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "hpclm" / "inductor"))
    return torch.compile(model)


def save_checkpoint(run: Run, step: int, recent_losses=0.0) -> Path | None:
    """Every rank enters (RNG states and whether this rank's `recent_losses` are finite are gathered);
    rank 0 writes, unless a recent loss or the state is not finite; an error stops every rank."""
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    mine = {"rng": rng, "losses_finite": bool(torch.isfinite(torch.as_tensor(recent_losses)))}
    gathered = dist.allgather_object(mine) if dist.is_distributed() else [mine]
    rngs = {kind: [g["rng"][kind] for g in gathered] for kind in rng}
    o = run.cfg.optim
    if run.tensor_group is not None:  # the TP-independent layout: full tensors, held by the writing rank only
        writer = dist.is_main()
        model_state = run.model.full_state_dict(keep=writer)
        optimizer_state = full_optimizer_state(run.model, run.optimizer, keep=writer)
    else:
        model_state, optimizer_state = run.model.state_dict(), run.optimizer.state_dict()

    def files():
        refuse_diverged(step, run.out, {"model": model_state, "optimizer": optimizer_state},
                        losses_finite=all(g["losses_finite"] for g in gathered))
        state = {
            "format": STATE_FORMAT, "step": step, "tokens": run.tokens_at(step), "world_size": dist.size(),
            "data_parallel": dist.data_size(), "tensor_parallel": dist.tensor_parallel(), "rng": rngs, "loss_scaler": run.scaler.state_dict(), "lr_step": run.lr_step,
            "lr_schedule": {"lr": lr_at(run.lr_step, o, run.cfg.train.max_iters), "max_lr": o.lr, "min_lr": o.min_lr,
                            "warmup_iters": o.warmup_iters, "decay_iters": o.lr_decay_iters or run.cfg.train.max_iters},
            "data": {"sampler": "global samples, window of sample g fixed by (seed, g)", "seed": run.cfg.train.seed,
                     "next_step": step, "next_sample": run.next_sample, "grad_accum": run.cfg.train.grad_accum},
            "global_batch": run.global_batch, "anomaly": run.detector.state_dict(),
        }
        return {
            **dict([checkpoint.weights_file(model_state, run.cfg.checkpoint.format)]),
            "optimizer.pt": checkpoint.tensor_bytes(optimizer_state),
            "state.pt": checkpoint.tensor_bytes(state),
            "config.toml": config_mod.to_toml(run.cfg),
            "meta.json": json.dumps(run.data.meta, indent=2) + "\n",
            "tokenizer.json": (run.data.path / "tokenizer.json").read_text(encoding="utf-8"),
        }
    keep_from = step - run.cfg.anomaly.rollback_steps if run.cfg.anomaly.action == "rollback" else None
    return checkpoint.save_from_rank0(run.out, step, files, run.cfg.checkpoint.keep_last, keep_from)


# --- the loop --------------------------------------------------------------------------------------

class PreemptionSignals:
    """Remembers a SIGUSR1 (Slurm's --signal warning) or SIGTERM (time limit, scancel) for the loop,
    which asks every rank at each step boundary (dist.any_rank) so all stop after the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)



def micro_batches(run: Run, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's grad_accum batches for `step`: micro-batch m of rank r holds the global samples
    next_sample + (m * ranks + r) * batch_size + 0..batch_size-1, so the step as a whole trains on the next
    global_batch samples whatever the layout. Ranks here are data replicas: a TP group shares its batches."""
    cfg, batch, ranks = run.cfg, run.cfg.train.batch_size, dist.data_size()
    out = []
    for micro in range(cfg.train.grad_accum):
        indices = run.next_sample + (micro * ranks + dist.data_rank()) * batch + np.arange(batch)
        if run.sample_log is not None:
            run.sample_log.write(f"{step + 1} {' '.join(map(str, indices.tolist()))}\n")
        out.append(get_samples(run.data.train, cfg.train.seed, indices, cfg.data.block_size, run.device))
    return out


def forward_backward(run: Run, batches, amp, loss_factor: float = 1.0) -> torch.Tensor:
    """Accumulate the (loss-scaled) gradients of the mean loss over `batches`; returns this rank's mean loss.
    loss_factor multiplies the loss (debug.inject_spike_at)."""
    loss_sum = torch.zeros((), device=run.device)
    model = run.model if run.compiled is None else run.compiled
    for x, y in batches:
        with amp:
            _, loss = model(x, y)
        loss = loss * loss_factor
        run.scaler.scale_loss(loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    return loss_sum / len(batches)


@dataclass
class StepResult:
    loss: float | torch.Tensor  # averaged over ranks (anomaly.action "off": this rank's, a tensor)
    norm: float
    applied: bool
    anomaly: str | None  # why the step is an anomaly (its update was not applied), else None
    compute_s: float  # this rank's forward and backward
    wait_s: float  # this rank's wait for the gradient exchange


def apply_update(run: Run, local_loss: torch.Tensor) -> StepResult:
    """Average gradients over ranks, unscale and check them, judge the step, clip, step.

    Every rank reaches the same decisions: the overflow flag is agreed by a MAX allreduce, the loss is
    averaged over ranks, and the gradient norm is computed from the averaged gradients."""
    opt = run.optimizer
    t0 = time.perf_counter()
    dist.synchronize_gradients(opt)
    wait = time.perf_counter() - t0
    judged = run.cfg.anomaly.action != "off"
    # judged: the rank-averaged loss as a number, every step (on a GPU a device sync); off: this rank's loss
    # tensor, read (and averaged over ranks) at each log interval
    loss = local_loss.detach()
    if judged:
        loss = dist.mean_over_ranks(float(loss)) if dist.is_distributed() else float(loss)
    finite = run.scaler.unscale_and_check(run.params)
    norm = float("inf")
    if finite and run.tensor_group is not None:
        norm = float(tensor_parallel_norm(run.model, run.cfg.optim.grad_clip))
    elif finite:
        norm = float(grad_norm_and_clip(run.params, run.cfg.optim.grad_clip))
    why = None
    if judged:  # an fp16 overflow is the loss scaler's to handle, not an anomaly
        why = run.detector.judge(loss, norm_finite=math.isfinite(norm) or not finite)
    applied = finite and why is None
    if applied:
        lr = lr_at(run.lr_step, run.cfg.optim, run.cfg.train.max_iters)
        for group in opt.param_groups:
            group["lr"] = lr
        dist.step_synchronized(opt)
        run.lr_step += 1
    if why is None:
        run.scaler.update(finite)
    opt.zero_grad()
    return StepResult(loss, norm, applied, why, 0.0, wait)


def train_step(run: Run, step: int, amp) -> StepResult:
    """One optimizer update on the next global batch of samples."""
    d = run.cfg.debug
    if d.inject_hang_rank == dist.rank() and d.inject_hang_at == step + 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # debug.inject_hang_*: this rank stops as a SIGSTOP would stop it
    injected = d.inject_spike_at == step + 1 and not any(h["step"] == step + 1 for h in run.detector.history)
    t0 = time.perf_counter()
    loss = forward_backward(run, micro_batches(run, step), amp, d.inject_spike_scale if injected else 1.0)
    compute = time.perf_counter() - t0
    if d.inject_slow_rank == dist.rank():  # debug.inject_slow_*: this rank computes inject_slow_factor x as long
        time.sleep((d.inject_slow_factor - 1) * compute)
        compute *= d.inject_slow_factor
    result = apply_update(run, loss)
    result.compute_s = compute
    run.next_sample += run.global_batch
    return result


def rollback_target(run: Run, step: int) -> Path | None:
    """Rank 0's pick, known to every rank: the newest complete checkpoint at least anomaly.rollback_steps
    steps before `step` (None: there is none)."""
    path = None
    if dist.is_main():
        limit = step - run.cfg.anomaly.rollback_steps
        good = [p for p in reversed(checkpoint.listing(run.out)) if checkpoint.step_of(p) <= limit]
        path = next((str(p) for p in good if checkpoint.verify(p) is None), None)
    if dist.is_distributed():
        path = dist.broadcast_object(path, 0)
    return Path(path) if path else None


def handle_anomaly(run: Run, step: int, result: StepResult, say, record) -> int:
    """The answer to an anomaly in the update that would have made step+1; returns the step to run next."""
    a, done, why = run.cfg.anomaly, step + 1, result.anomaly
    action = a.action
    target = rollback_target(run, step) if action == "rollback" else None
    if action == "rollback" and target is None:
        action = "skip"  # nothing to roll back to yet
    entry = {"action": action, "why": why}
    if action == "rollback":
        skip_to = run.next_sample + a.skip_batches * run.global_batch  # next_sample is already past the spike's batch
        history = run.detector.state_dict()
        _restore(run, target)  # weights, optimizer, scaler, RNG, the loss window, the checkpoint's next_sample
        entry.update({"to_step": run.start_step, "skipped_samples": [run.next_sample, skip_to]})
        run.detector.load_state_dict({**history, "losses": run.detector.losses})
        run.next_sample = skip_to
    in_bounds = run.detector.note(done, entry)
    if a.action == "stop" or not in_bounds:
        newest = checkpoint.read_latest(run.out)
        kept = (f"{checkpoint.root(run.out) / checkpoint.name(newest)} stays the newest checkpoint" if newest is not None
                else "no checkpoint was written")
        streak = run.detector.history[-run.detector.streak:]
        what = ("anomaly.action = 'stop'" if a.action == "stop" else
                f"{len(streak)} anomalies in a row, more than anomaly.max_rollbacks = {a.max_rollbacks} (answered by "
                + ", ".join(f"{h['action']} at step {h['step']}" + (f" to step {h['to_step']}" if "to_step" in h else "")
                            for h in streak[:-1]) + ")")
        raise HpclmError(f"training diverged: at step {done} {why}; {what}; {kept}: resume from it with a lower optim.lr, "
                         "a longer optim.warmup_iters or optim.grad_clip")
    record({"kind": "anomaly", "step": done, **entry, "loss": result.loss, "streak": run.detector.streak}, show=False)
    if action == "skip":
        say(f"hpclm train: anomaly at step {done}: {why}; the update is skipped "
            f"(streak {run.detector.streak} of at most {a.max_rollbacks})")
        return done
    back = run.start_step
    if dist.is_main():
        for path in checkpoint.listing(run.out):  # the abandoned trajectory's checkpoints
            if checkpoint.step_of(path) > back:
                checkpoint.discard(path)
    save_checkpoint(run, back)  # the rollback is durable: a resume from here replays the same skip
    first, last = entry["skipped_samples"]
    say(f"hpclm train: anomaly at step {done}: {why}; rolled back to step {back} ({target.name}), skipping global "
        f"samples {first}..{last - 1} (those since the checkpoint and anomaly.skip_batches = {a.skip_batches} batches "
        f"more); streak {run.detector.streak} of at most {a.max_rollbacks}")
    return back


def rank_times(compute_s: float, wait_s: float, loss: float, stragglers: StragglerWatch, say) -> tuple[dict, float]:
    """Every rank: each rank's compute and gradient-exchange wait per step over the last log interval, and
    the mean over ranks of `loss`, from one allreduce; the ranks slow long enough are named (once) through
    `say`. Returns the fields of a train record and the mean loss."""
    ranks, me = dist.size(), dist.rank()
    mine = torch.zeros(2 * ranks + 1, dtype=torch.float64)
    mine[me], mine[ranks + me], mine[-1] = compute_s, wait_s, loss
    both = dist.allreduce(mine, "sum").tolist()
    compute, wait = both[:ranks], both[ranks:-1]
    for rank, ratio in stragglers.observe(compute):
        say(f"hpclm train: rank {rank} is a straggler: its forward and backward take {compute[rank] * 1e3:.1f} ms a step, "
            f"{ratio:.2f}x the other ranks' median ({compute[rank] / ratio * 1e3:.1f} ms), for "
            f"{stragglers.intervals} log intervals in a row; the others wait for it in every gradient exchange")
    order = sorted(compute)
    return {"compute_s_min": order[0], "compute_s_median": order[len(order) // 2], "compute_s_max": order[-1],
            "slowest_rank": compute.index(order[-1]), "exchange_wait_s_max": max(wait),
            "straggler_rank": stragglers.slowest() if stragglers.named else -1, "rank_compute_s": compute}, both[-1] / ranks


def train(cfg: Config, out: str | Path, *, resume: str | None = None, force: bool = False,
          progress_bar: bool | None = None) -> dict:
    """Train a gradient-fitted model (gpt, gru) per cfg into OUT; returns a summary (final step, losses,
    throughput, checkpoint)."""
    out = Path(out)
    say = print if dist.launch_env().rank == 0 else (lambda *a, **k: None)
    run = setup(cfg, out, resume or cfg.checkpoint.resume, force, say)
    t, max_iters = cfg.train, cfg.train.max_iters
    amp = autocast(cfg.precision, run.device)
    outputs = RunOutputs(out, run.start_step, max_iters, cfg.metrics, main=dist.is_main(), progress_bar=progress_bar)
    say = outputs.message
    tp = run.tensor_group
    parameters = run.model.parameter_count() if tp is not None else count_parameters(run.model)
    if tp is not None:
        hosts = dist.allgather_object(socket.gethostname())
        say(f"hpclm train: layout {tp.layout.describe(hosts)}; TP collectives "
            f"over {tp.name}" + (f" ({tp.transport})" if tp.transport != tp.name else ""))
    say(f"hpclm train: {cfg.model.arch} {parameters / 1e6:.2f}M parameters, {dist.size()} rank(s) "
        f"({dist.backend()}), {run.device}, {cfg.precision.dtype}; data {cfg.data.path} ({run.data.meta['tokenizer']}, "
        f"vocabulary {run.data.vocab_size}); global batch {run.global_batch} = {t.batch_size} per replica x "
        f"{dist.data_size()} data replica(s) x {t.grad_accum} accumulation ({run.tokens_per_step} tokens/step); out {out}"
        + (f"; resumed from {run.resumed_from}" if run.resumed_from else "")
        + (f"; Prometheus at {outputs.prometheus_url}" if outputs.prometheus_url else ""))
    if run.device.type == "cpu" and cfg.precision.dtype == "fp16":
        say("hpclm train: note: fp16 on a CPU converts around every op (an order of magnitude slower than fp32); "
            "precision.dtype = 'bf16' is the fast half precision of CPUs with AVX512-BF16 or AMX")
    elif run.device.type == "cpu" and cfg.precision.dtype == "bf16" and not cpu_computes("bf16"):
        say(f"hpclm train: note: this CPU has no bf16 instructions ({' or '.join(CPU_HALF_FLAGS['bf16'])}), so torch "
            "converts around every op: expect steps an order of magnitude slower than fp32")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if restarts:
        say(f"Slurm job {os.environ.get('SLURM_JOB_ID')}: restart {restarts}")
    summary = {"start_step": run.start_step, "step": run.start_step, "out": str(out)}
    record = outputs.record

    def evaluate(step: int) -> None:
        losses = estimate_loss(run.model, run.data, cfg, run.device, amp)
        record({"kind": "eval", "step": step, "tokens": run.tokens_at(step), **losses,
                "val_whole_split": cfg.train.eval_whole_val})
        summary.update(losses)

    signals = PreemptionSignals()
    a = cfg.anomaly
    watchdog = HangWatchdog(out, dist.rank(), dist.size(), a.hang_timeout_s).start() if a.hang_timeout_s >= 0 else None
    stragglers = StragglerWatch(a.straggler_ratio, a.straggler_intervals)
    if cfg.debug.record_samples:
        (out / "debug").mkdir(parents=True, exist_ok=True)
        run.sample_log = open(out / "debug" / f"samples-rank-{dist.rank()}.txt", "a", buffering=1)
    try:
        signals.__enter__()
        if run.start_step >= max_iters:
            say(f"already at step {run.start_step} (train.max_iters = {max_iters}): raise train.max_iters to train further")
        elif run.start_step == 0 and t.eval_interval and t.eval_at_start:
            evaluate(0)
        loss_acc, loss_n, steps_acc, time_acc, compute_acc, wait_acc = 0.0, 0, 0, 0.0, 0.0, 0.0
        train_time, updates, steps_run = 0.0, 0, 0
        step = run.start_step
        while step < max_iters:
            t0 = time.perf_counter()
            if watchdog:
                watchdog.step_started(step)
            result = train_step(run, step, amp)
            if watchdog:
                watchdog.step_done()
            if result.anomaly:
                resume_at = handle_anomaly(run, step, result, say, record)
                if resume_at != step + 1:  # rolled back: the interval's figures restart with it
                    step, loss_acc, loss_n, steps_acc, time_acc, compute_acc, wait_acc = resume_at, 0.0, 0, 0, 0.0, 0.0, 0.0
                    continue
            else:
                loss_acc, loss_n = loss_acc + result.loss, loss_n + 1
            updates += result.applied
            if run.device.type == "cuda" and (step + 1) % t.log_interval == 0:
                torch.cuda.synchronize(run.device)
            dt = time.perf_counter() - t0
            time_acc, steps_acc, train_time, steps_run = time_acc + dt, steps_acc + 1, train_time + dt, steps_run + 1
            compute_acc, wait_acc = compute_acc + result.compute_s, wait_acc + result.wait_s
            done = step = step + 1
            outputs.step()
            if done % t.log_interval == 0 or done == max_iters:
                mean_loss = float(loss_acc) / loss_n if loss_n else float("nan")  # anomalous steps' losses left out
                times = {}
                if dist.is_distributed():  # every rank logs at the same steps: one small allreduce of their times
                    times, mean_of_ranks = rank_times(compute_acc / steps_acc, wait_acc / steps_acc, mean_loss,
                                                      stragglers, say)
                    mean_loss = mean_loss if a.action != "off" else mean_of_ranks
                refuse_diverged(done, out, {}, losses_finite=math.isfinite(mean_loss))  # the same on every rank
                rec = {"kind": "train", "step": done, "tokens": run.tokens_at(done), "loss": mean_loss,
                       "lr": lr_at(max(run.lr_step - 1, 0), cfg.optim, max_iters),
                       "tokens_per_s": run.tokens_per_step * steps_acc / time_acc, "step_time_s": time_acc / steps_acc,
                       "grad_norm": result.norm, "loss_scale": float(run.scaler.scale),
                       "skipped_steps": int(run.scaler.skipped_steps), "ranks": dist.size(),
                       "anomalies": len(run.detector.history), **times}
                if tp is not None:  # this rank's seconds per step inside TP collectives
                    rec["tp_collective_s"] = tp.take_seconds() / steps_acc
                record(rec)
                summary["loss"] = mean_loss
                loss_acc, loss_n, steps_acc, time_acc, compute_acc, wait_acc = 0.0, 0, 0, 0.0, 0.0, 0.0
            reached = False
            if (t.eval_interval and done % t.eval_interval == 0) or done == max_iters:
                evaluate(done)
                reached = 0 < summary["val_loss"] <= t.target_val_loss  # the same figure on every rank
            every = cfg.checkpoint.every_iters
            saved = (every and done % every == 0) or done == max_iters or reached
            if saved:
                summary["checkpoint"] = str(save_checkpoint(run, done, loss_acc))
            summary["step"] = done
            if reached:
                summary["target_reached_step"] = done
                say(f"hpclm train: val loss {summary['val_loss']:.4f} <= train.target_val_loss = {t.target_val_loss} at "
                    f"step {done}: stopping; checkpoint {summary['checkpoint']}")
                break
            # any_rank is an MPI call beside Horovod: had one rank left it and exited, Horovod's shutdown would
            # finalize MPI under a rank still inside it (seen: exit 139). So a Horovod op follows every call on
            # every rank before any can exit: the next step's gradient allreduce, or the barrier below.
            if done < max_iters and dist.any_rank(signals.received is not None):
                path = summary["checkpoint"] if saved else str(save_checkpoint(run, done, loss_acc))
                dist.barrier()
                if dist.is_main():  # for a batch script whose srun reports 143 when it killed a rank still exiting with 75
                    atomic.write_text(out / PREEMPTED_MARKER, f"{done}\n")
                name = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
                raise Preempted(f"stopped after step {done} on {name}; checkpoint {path} written; the same command "
                                f"resumes from it (exit code {EXIT_PREEMPTED}: requeue)")
        if steps_run and not updates:  # e.g. fp16 overflowing at every scale the run reached
            raise LossScaleError(f"every one of the {steps_run} steps of this run was skipped (fp16 gradients overflowed at "
                                 f"every loss scale down to {run.scaler.scale:g}): nothing was trained; lower "
                                 "precision.init_scale or optim.lr, or use precision.dtype bf16 or fp32")
        if steps_run:
            summary["train_time_s"] = train_time
            summary["tokens_per_s"] = run.tokens_per_step * steps_run / train_time
        summary["anomalies"] = [dict(h) for h in run.detector.history]
    finally:
        signals.__exit__()
        if watchdog:
            watchdog.close()
        if run.sample_log is not None:
            run.sample_log.close()
        outputs.close()
    return summary
