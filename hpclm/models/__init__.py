"""The language models and their registry: one entry per `model.arch`, with how to build it, which
settings fix its parameter shapes (the checkpoint signature) and how it is fitted.

    gpt    nanoGPT-equivalent transformer (models/gpt.py)         fitted by the gradient loop
    gru    Embedding -> GRU -> Linear (models/gru.py)             fitted by the gradient loop
    ngram  interpolated Kneser-Ney n-gram (models/ngram.py)       fitted by counting
    hmm    discrete HMM, Baum-Welch (models/hmm.py)               fitted by EM

This file imports no torch: the config reads the arch names from here, and the model classes load
when first built or named (`from hpclm.models import GPT`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


def _gpt(cfg, vocab_size):
    from hpclm.models.gpt import GPT
    m = cfg.model
    return GPT(vocab_size, cfg.data.block_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
               dropout=m.dropout, bias=m.bias, softmax=m.softmax,
               activation=m.activation)


def _gru(cfg, vocab_size):
    from hpclm.models.gru import GRULM
    m = cfg.model
    return GRULM(vocab_size, cfg.data.block_size, embd=m.n_embd, hidden_size=m.hidden_size, n_layer=m.n_layer,
                 dropout=m.dropout, bias=m.bias)


def _ngram(cfg, vocab_size):
    from hpclm.models.ngram import NgramLM
    return NgramLM(vocab_size, order=cfg.model.order, block_size=cfg.data.block_size, discount=cfg.model.discount)


def _hmm(cfg, vocab_size):
    from hpclm.models.hmm import HMMLM
    return HMMLM(vocab_size, states=cfg.model.states, block_size=cfg.data.block_size)


@dataclass(frozen=True)
class Arch:
    build: Callable  # (cfg, vocab_size) -> nn.Module
    shape_keys: tuple[str, ...]  # the config keys that fix the parameter shapes (besides vocab_size)
    fitted_by: str  # "gradient" (hpclm.train.loop) or "counting" / "em" (hpclm.train.classical)


ARCHS = {
    "gpt": Arch(_gpt, ("model.n_layer", "model.n_embd", "model.bias", "model.n_head", "data.block_size",
                        "model.activation"), "gradient"),
    "gru": Arch(_gru, ("model.n_layer", "model.n_embd", "model.bias", "model.hidden_size"), "gradient"),
    "ngram": Arch(_ngram, ("model.order", "model.discount"), "counting"),
    "hmm": Arch(_hmm, ("model.states",), "em"),
}
CLASSICAL = tuple(name for name, arch in ARCHS.items() if arch.fitted_by != "gradient")


def build_model(cfg, vocab_size: int):
    """The untrained model of cfg.model.arch for this vocabulary."""
    if cfg.model.arch not in ARCHS:
        raise ValueError(f"unknown model.arch {cfg.model.arch!r}")
    return ARCHS[cfg.model.arch].build(cfg, vocab_size)


def model_signature(cfg, vocab_size: int) -> dict:
    """The settings that fix the parameter shapes: checkpoints with another signature are another model."""
    def value(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)
    return {"model.arch": cfg.model.arch, **{k: value(k) for k in ARCHS[cfg.model.arch].shape_keys},
            "vocab_size": vocab_size}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


_CLASSES = {"GPT": "gpt", "GRULM": "gru", "HMMLM": "hmm", "NgramLM": "ngram"}


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"hpclm.models.{_CLASSES[name]}"), name)
    raise AttributeError(f"module 'hpclm.models' has no attribute {name!r}")


__all__ = ["ARCHS", "CLASSICAL", "GPT", "GRULM", "HMMLM", "NgramLM", "build_model", "count_parameters",
           "model_signature"]
