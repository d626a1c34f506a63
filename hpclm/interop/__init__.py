"""Other tools' model formats, each named by a prefix wherever hpclm takes a model (--ckpt, init.from,
--tokenizer-from): hf.py (`hf:DIR`, transformers' GPT-2 folders; also what `hpclm export` writes) and
nanogpt.py (`nanogpt:PATH`, nanoGPT's ckpt.pt)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpclm.errors import HpclmError

SPECS = "hf:DIR (a GPT-2 folder in transformers' format) or nanogpt:PATH (nanoGPT's ckpt.pt or its out_dir)"


@dataclass
class Imported:
    """A model another tool wrote, as hpclm's: config, GPT state_dict, tokenizer, meta (vocab_size, tokenizer_sha256)."""

    cfg: object
    state: dict
    tokenizer: object
    meta: dict
    where: Path
    optimizer: dict | None = None  # the tool's AdamW state_dict, when it saved one (nanoGPT)


def _formats():
    from hpclm.interop import hf, nanogpt
    return {hf.PREFIX: hf, nanogpt.PREFIX: nanogpt}


def is_foreign(spec) -> bool:
    """Whether spec names another tool's model (hf:..., nanogpt:...) rather than an hpclm run or checkpoint."""
    return any(str(spec).startswith(prefix) for prefix in _formats())


def _split(spec: str, what: str):
    for prefix, module in _formats().items():
        if str(spec).startswith(prefix):
            return module, Path(str(spec)[len(prefix):])
    raise HpclmError(f"{what} {spec}: give {SPECS}")


def read(spec: str, what: str = "--ckpt") -> Imported:
    module, path = _split(spec, what)
    cfg, state, tok, meta, *optimizer = module.read(path)
    return Imported(cfg, state, tok, meta, path, optimizer[0] if optimizer else None)


def read_tokenizer(spec: str, what: str = "--tokenizer-from"):
    module, path = _split(spec, what)
    return module.read_tokenizer(path)
