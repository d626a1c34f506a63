"""Run configuration: TOML sections -> typed dataclasses, `--set section.key=value` overrides.

Every key has a default; a file or override names only what it changes. Unknown keys, wrong
types and out-of-range values raise ConfigError (one line naming the key and the valid choices).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hpclm.errors import HpclmError
from hpclm.models import ARCHS


class ConfigError(HpclmError):
    """A config file or override that cannot be used as written."""


@dataclass
class DataConfig:
    path: str = "data/shakespeare-char"  # a directory written by `hpclm prepare`
    block_size: int = 64


@dataclass
class ModelConfig:
    arch: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # gpt: width; gru: embedding size
    hidden_size: int = 128  # gru only
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"  # gpt MLP: gelu (exact, nanoGPT's) or gelu_tanh (GPT-2's gelu_new)
    softmax: str = "auto"  # gpt attention: auto (fused under CPU autocast, else sdpa), fused (hpclm.ops), torch, sdpa
    order: int = 5  # ngram: tokens per n-gram (context of order - 1)
    discount: float = 0.0  # ngram: Kneser-Ney discount for every order; 0: estimated per order, n1 / (n1 + 2 n2)
    states: int = 64  # hmm: hidden states
    em_tol: float = 1e-4  # hmm: stop EM when the train loss (nats/token) improves by less; 0: run train.max_iters
    em_pseudocount: float = 0.01  # hmm: added to every expected emission count (keeps unseen tokens possible)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over train.max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12  # per rank, per micro-step
    grad_accum: int = 1
    eval_interval: int = 250  # 0: only at the end
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto: cuda:<local rank> when CUDA is available, else cpu
    eval_at_start: bool = True  # an eval before the first step of a fresh run (the untrained model's loss)
    eval_whole_val: bool = False  # evals score the whole val split (hpclm eval's figure), not eval_iters batches
    target_val_loss: float = 0.0  # stop (with a checkpoint) at the first eval whose val loss is <= this; 0: off
    compile: bool = False  # torch.compile the model's training forward/backward (evals run eager)


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    init_scale: float = 65536.0
    growth_interval: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    max_consecutive_skips: int = 50


@dataclass
class DistConfig:
    fp16_compression: bool = False  # allreduce gradients in fp16
    fusion_threshold_mb: float = 0.0  # 0: Horovod's default (or HOROVOD_FUSION_THRESHOLD)
    cycle_time_ms: float = 0.0  # 0: Horovod's default (or HOROVOD_CYCLE_TIME)
    timeline: str = ""  # a Horovod timeline JSON path; empty: off
    mpi_yield_when_idle: bool = True  # Open MPI's progress loop yields the core when idle (unless OMPI_MCA_ set)


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel ranks per model replica (gpt only); ranks = data replicas x tensor
    backend: str = "auto"  # TP collectives: auto (mpi for CPU tensors, torch for CUDA), mpi (hpclm's C++), torch


@dataclass
class CheckpointConfig:
    every_iters: int = 100
    keep_last: int = 3  # 0: keep all
    resume: str = "auto"
    format: str = "pt"  # the weights' file: "pt" (torch.save) or "safetensors"; optimizer and loop state stay .pt


@dataclass
class InitConfig:
    from_: str = ""  # key `from`: the weights a fresh run starts from, "hf:DIR" (a GPT-2 folder) or "nanogpt:PATH"; "": random


@dataclass
class MetricsConfig:
    prometheus_port: int = 0  # 0: no endpoint
    prometheus_host: str = "127.0.0.1"


@dataclass
class AnomalyConfig:
    action: str = "rollback"  # on a loss spike or a non-finite step: rollback | skip | stop | off
    window: int = 50  # steps of rank-averaged loss a step's loss is judged against
    min_window: int = 10  # steps the window holds before a spike can be called
    spike_ratio: float = 2.0  # a spike: loss > spike_ratio x the window's mean ...
    spike_sigmas: float = 6.0  # ... and > the mean + spike_sigmas x its standard deviation
    skip_batches: int = 20  # rollback: global batches skipped after the spike's, besides those since the checkpoint
    rollback_steps: int = 50  # rollback to the newest checkpoint at least this many steps before the spike
    max_rollbacks: int = 3  # anomalies in one streak (each within `window` steps of the last) before stopping
    hang_timeout_s: float = 0.0  # a step running longer is a hang (0: max(300 s, 20 x median step); < 0: off)
    straggler_ratio: float = 1.3  # a straggler: compute time > this x the median of the other ranks ...
    straggler_intervals: int = 3  # ... for this many log intervals in a row


@dataclass
class DebugConfig:
    """Fault injection for tests and drills: off by default."""
    inject_spike_at: int = 0  # multiply the loss of the update that makes this step by inject_spike_scale (0: off)
    inject_spike_scale: float = 20.0
    inject_slow_rank: int = -1  # this rank's compute takes inject_slow_factor x as long (-1: off)
    inject_slow_factor: float = 1.5
    inject_hang_rank: int = -1  # this rank stops answering (sleeps) at step inject_hang_at (-1: off)
    inject_hang_at: int = 0
    record_samples: bool = False  # each rank writes the global sample indices it trains on to OUT/debug/


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    init: InitConfig = field(default_factory=InitConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        """Sections -> keys -> values, keys as written in TOML (a field `from_` is the key `from`)."""
        return {section: {_key(k): v for k, v in body.items()} for section, body in dataclasses.asdict(self).items()}


def _key(field_name: str) -> str:
    """A field named after a Python keyword carries a trailing underscore; its key does not."""
    return field_name[:-1] if field_name.endswith("_") else field_name


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
CHOICES = {
    "model.arch": tuple(ARCHS),
    "model.softmax": ("auto", "fused", "torch", "sdpa"),
    "precision.dtype": ("fp32", "fp16", "bf16"),
    "checkpoint.resume": ("auto", "never"),
    "checkpoint.format": ("pt", "safetensors"),
    "parallel.backend": ("auto", "mpi", "torch"),
    "anomaly.action": ("rollback", "skip", "stop", "off"),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of strings"}


_DEFAULTS = Config()
MAX_SEED = 2**62  # seeds are offset by rank and step for torch and numpy generators (64-bit): room to spare


def _sections(cfg) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cfg))


def _key_types(section: str, defaults=_DEFAULTS) -> dict[str, type]:
    """Key -> type (int, float, bool, str or list of str: the type of its default) of one section."""
    body = getattr(defaults, section)
    return {_key(f.name): type(getattr(body, f.name)) for f in dataclasses.fields(body)}


def _unknown(kind: str, name: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {kind} '{name}'{where}{hint}; valid: {', '.join(valid)}")


def _coerce(key: str, value, want: type, where: str):
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, int) and not isinstance(value, bool) if want is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, list) and all(isinstance(v, str) for v in value) if want is list else
          isinstance(value, str))
    if not ok:
        raise ConfigError(f"{key}{where} must be {_TYPE_NAMES[want]}, got {value!r} ({type(value).__name__})")
    value = float(value) if want is float else value
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}{where} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _apply(cfg, section: str, key: str, value, where: str) -> None:
    """Set one key of cfg (a Config, or another dataclass of section dataclasses such as the serve config)."""
    sections = _sections(cfg)
    if section not in sections:
        raise _unknown("section", section, sections, where)
    types = _key_types(section, _DEFAULTS if isinstance(cfg, Config) else type(cfg)())
    if key not in types:
        raise _unknown(f"key in [{section}]", key, sorted(types), where)
    body = getattr(cfg, section)
    name = f"{key}_" if hasattr(body, f"{key}_") else key  # the field of a keyword key (`from` -> from_)
    setattr(body, name, _coerce(f"{section}.{key}", value, types[key], where))


def apply_dict(cfg, data: dict, where: str = ""):
    for section, body in data.items():
        if not isinstance(body, dict):
            if section in _sections(cfg):
                raise ConfigError(f"'{section}'{where} must be a [{section}] table, got {body!r}")
            raise _unknown("section", section, _sections(cfg), where)
        for key, value in body.items():
            _apply(cfg, section, key, value, where)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value); value parsed as TOML, else taken as a plain string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set '{text}' must look like section.key=value (e.g. train.max_iters=500)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def load(path: str | Path | None = None, overrides: list[str] | tuple = (), make=None, check=None):
    """Defaults, then the TOML file (if any), then `section.key=value` overrides; validated. A Config, or
    `make()` checked by `check(cfg)` for another file of sections (the serve config)."""
    cfg = make() if make else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found (shipped configs are in configs/)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        apply_dict(cfg, data, f" in {path}")
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, " (from --set)")
    (check or validate)(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    cfg = apply_dict(Config(), data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    checks = [
        (cfg.data.block_size >= 1, "data.block_size must be >= 1"),
        (cfg.model.n_layer >= 1, "model.n_layer must be >= 1"),
        (cfg.model.n_head >= 1, "model.n_head must be >= 1"),
        (cfg.model.n_embd >= 1, "model.n_embd must be >= 1"),
        (cfg.model.hidden_size >= 1, "model.hidden_size must be >= 1"),
        (cfg.model.arch != "gpt" or cfg.model.n_embd % cfg.model.n_head == 0,
         f"model.n_embd ({cfg.model.n_embd}) must be a multiple of model.n_head ({cfg.model.n_head})"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.init.from_ == "" or cfg.init.from_.startswith(("hf:", "nanogpt:")),
         f"init.from must be \"hf:DIR\" (a GPT-2 folder in transformers' format), \"nanogpt:PATH\" (nanoGPT's "
         f"ckpt.pt) or empty, got {cfg.init.from_!r}"),
        (cfg.model.activation in ("gelu", "gelu_tanh"),
         f"model.activation must be gelu or gelu_tanh, got {cfg.model.activation!r}"),
        (cfg.model.order >= 1, "model.order must be >= 1"),
        (0.0 <= cfg.model.discount <= 1.0, "model.discount must be in [0, 1] (0: estimated per order)"),
        (cfg.model.states >= 1, "model.states must be >= 1"),
        (cfg.model.em_tol >= 0, "model.em_tol must be >= 0 (0: run train.max_iters EM iterations)"),
        (cfg.model.em_pseudocount >= 0, "model.em_pseudocount must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr must be in [0, optim.lr]"),
        (cfg.optim.warmup_iters >= 0, "optim.warmup_iters must be >= 0"),
        (cfg.optim.lr_decay_iters >= 0, "optim.lr_decay_iters must be >= 0 (0: train.max_iters)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0: off)"),
        (cfg.train.max_iters >= 0, "train.max_iters must be >= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.eval_interval >= 0, "train.eval_interval must be >= 0 (0: only at the end)"),
        (cfg.train.eval_iters >= 1, "train.eval_iters must be >= 1"),
        (cfg.train.log_interval >= 1, "train.log_interval must be >= 1"),
        (cfg.train.target_val_loss >= 0, "train.target_val_loss must be >= 0 (0: off)"),
        (not cfg.train.compile or cfg.model.arch == "gpt",
         f"train.compile compiles a GPT; model.arch {cfg.model.arch!r} trains eager: set train.compile = false"),
        (not cfg.train.compile or cfg.parallel.tensor == 1,
         f"train.compile with parallel.tensor = {cfg.parallel.tensor} is not supported (the TP collectives are not "
         "traced): set train.compile = false or parallel.tensor = 1"),
        (0 <= cfg.train.seed < MAX_SEED, f"train.seed must be in 0..2**62 - 1, got {cfg.train.seed}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device) is not None,
         f"train.device must be auto, cpu, cuda or cuda:N (N a device number), got {cfg.train.device!r}"),
        (cfg.precision.init_scale > 0 and cfg.precision.min_scale > 0, "precision.init_scale and min_scale must be > 0"),
        (cfg.precision.growth_interval >= 1 and cfg.precision.hysteresis >= 1, "precision.growth_interval and hysteresis must be >= 1"),
        (cfg.precision.max_consecutive_skips >= 1, "precision.max_consecutive_skips must be >= 1"),
        (cfg.dist.fusion_threshold_mb >= 0 and cfg.dist.cycle_time_ms >= 0, "dist.fusion_threshold_mb and cycle_time_ms must be >= 0"),
        (cfg.parallel.tensor >= 1, "parallel.tensor must be >= 1 (1: no tensor parallelism)"),
        (cfg.parallel.tensor == 1 or cfg.model.arch == "gpt",
         f"parallel.tensor = {cfg.parallel.tensor} splits a GPT's layers; model.arch {cfg.model.arch!r} trains with "
         "parallel.tensor = 1 (data parallel only)"),
        (cfg.parallel.tensor < 1 or cfg.model.n_head % cfg.parallel.tensor == 0,
         f"model.n_head ({cfg.model.n_head}) must be a multiple of parallel.tensor ({cfg.parallel.tensor}): "
         "each tensor-parallel rank computes whole attention heads (so n_embd splits evenly too)"),
        (cfg.parallel.tensor <= 1 or not cfg.init.from_,
         f"init.from with parallel.tensor = {cfg.parallel.tensor} is not supported: start from it at "
         "parallel.tensor = 1, then resume that run's checkpoint at any parallel.tensor"),
        (cfg.checkpoint.every_iters >= 0, "checkpoint.every_iters must be >= 0 (0: only at the end)"),
        (cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last must be >= 0 (0: keep all)"),
        (0 <= cfg.metrics.prometheus_port <= 65535, "metrics.prometheus_port must be in 0..65535 (0: off)"),
        (cfg.anomaly.window >= 1 and 1 <= cfg.anomaly.min_window <= cfg.anomaly.window,
         "anomaly.window must be >= 1 and anomaly.min_window in 1..anomaly.window"),
        (cfg.anomaly.spike_ratio > 1 and cfg.anomaly.spike_sigmas >= 0, "anomaly.spike_ratio must be > 1, spike_sigmas >= 0"),
        (cfg.anomaly.skip_batches >= 0 and cfg.anomaly.rollback_steps >= 0 and cfg.anomaly.max_rollbacks >= 0,
         "anomaly.skip_batches, rollback_steps and max_rollbacks must be >= 0"),
        (cfg.anomaly.straggler_ratio > 1 and cfg.anomaly.straggler_intervals >= 1,
         "anomaly.straggler_ratio must be > 1 and straggler_intervals >= 1"),
        (cfg.debug.inject_spike_scale > 0 and cfg.debug.inject_slow_factor >= 1,
         "debug.inject_spike_scale must be > 0 and inject_slow_factor >= 1"),
    ]
    for section in SECTIONS:  # no setting means anything as inf or NaN (an infinite loss scale skips every step)
        body = getattr(cfg, section)
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a TOML basic string


def to_toml(cfg: Config | dict, header: str = "") -> str:
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    lines = [f"# {line}" for line in header.splitlines()]
    for section, body in data.items():
        lines += ["" if lines else None, f"[{section}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in body.items()]
    return "\n".join(line for line in lines if line is not None) + "\n"
