"""transformers' GPT-2 format (`GPT2LMHeadModel` folders): hpclm's GPT written as one, and one read back.

hpclm's GPT is GPT-2's function with these differences, which the export settles so transformers
computes the same logits: no biases (`model.bias = false`: written as zeros, GPT-2 always has them),
exact GELU (`activation_function = "gelu"`; GPT-2's own `gelu_new` is `model.activation = "gelu_tanh"`),
LayerNorm eps 1e-5 (GPT-2's too). GPT-2 stores its projections as Conv1D, [in, out]: the transpose
of torch's Linear. The output embedding is tied to the input one in both.

A folder written here holds config.json, generation_config.json, model.safetensors, tokenizer.json
(a `tokenizers` file: BPE runs' own; char runs' as a BPE with no merges, one token per character),
tokenizer_config.json, and hpclm's own tokenizer.json and config.toml (hpclm_tokenizer.json,
hpclm_config.toml), so reading it back gives the run's model, tokenizer and data path exactly.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch

from hpclm import config as config_mod
from hpclm.data import tokenizers
from hpclm.errors import HpclmError

PREFIX = "hf:"
WEIGHTS = "model.safetensors"
HPCLM_TOKENIZER = "hpclm_tokenizer.json"
HPCLM_CONFIG = "hpclm_config.toml"
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}  # GPT-2 name -> hpclm
LN_EPS = 1e-5
# The tensors of each block, named alike in hpclm's GPT and GPT-2; those GPT-2 keeps as Conv1D ([in, out])
_BLOCK = tuple(f"{part}.{kind}" for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
               for kind in ("weight", "bias"))
_CONV1D = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


def gpt2_config(cfg, vocab_size: int) -> dict:
    """config.json of the GPT2LMHeadModel that computes what hpclm's GPT with cfg computes."""
    m = cfg.model
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
            "n_positions": cfg.data.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
            "n_inner": None, "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": LN_EPS, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"}


def to_gpt2_state(state: dict, n_layer: int) -> dict[str, torch.Tensor]:
    """hpclm GPT state_dict -> GPT2LMHeadModel's (biases hpclm has not: zeros; lm_head tied, not stored)."""
    width = state["transformer.wte.weight"].shape[1]
    out = {"transformer.wte.weight": state["transformer.wte.weight"],
           "transformer.wpe.weight": state["transformer.wpe.weight"],
           "transformer.ln_f.weight": state["transformer.ln_f.weight"],
           "transformer.ln_f.bias": state.get("transformer.ln_f.bias", torch.zeros(width))}
    for i in range(n_layer):
        for name in _BLOCK:
            key = f"transformer.h.{i}.{name}"
            if key in state:
                out[key] = state[key].t() if name in _CONV1D else state[key]
            else:  # a bias hpclm's model does not have: the same function with zeros
                out[key] = torch.zeros(state[key.replace(".bias", ".weight")].shape[0])
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def char_tokenizer_json(tok) -> str:
    """A `tokenizers` file giving a char tokenizer's ids: BPE over the characters, no merges, no spaces
    added when decoding."""
    from tokenizers import Tokenizer, decoders, models
    hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    hf.decoder = decoders.Fuse()
    return hf.to_str()


def write(folder: Path, model_state: dict, cfg, tok, vocab_size: int) -> None:
    """The files of a GPT-2 folder, into `folder` (which exists and is empty)."""
    from safetensors.torch import save_file
    save_file(to_gpt2_state(model_state, cfg.model.n_layer), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(gpt2_config(cfg, vocab_size), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "max_length": cfg.data.block_size,
                                                               "bos_token_id": None, "eos_token_id": None}, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(tok.to_json() if tok.kind == "bpe" else char_tokenizer_json(tok),
                                           encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "model_max_length": cfg.data.block_size}) + "\n")
    tok.save(folder / HPCLM_TOKENIZER)
    (folder / HPCLM_CONFIG).write_text(config_mod.to_toml(cfg))


def _bad(folder, why: str) -> HpclmError:
    return HpclmError(f"{PREFIX}{folder}: {why}")


def read(folder: str | Path):
    """A GPT-2 folder as (cfg, hpclm GPT state_dict, tokenizer, meta). cfg is the folder's hpclm config
    when it has one, else derived from config.json (bias on, as GPT-2 has it; data.path empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _bad(folder, "is not a folder (a GPT-2 folder holds config.json and model.safetensors)")
    for name in ("config.json", WEIGHTS):
        if not (folder / name).is_file():
            raise _bad(folder, f"has no {name}: give a folder written by save_pretrained or hpclm export")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(folder, f"config.json is not JSON ({e})") from None
    if hf.get("model_type") != "gpt2" and "GPT2LMHeadModel" not in hf.get("architectures", []):
        raise _bad(folder, f"holds a {hf.get('model_type') or hf.get('architectures')!r} model; hpclm reads GPT-2 "
                           "(model_type gpt2)")
    activation = ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise _bad(folder, f"activation_function {hf['activation_function']!r}: hpclm's GPT has "
                           f"{', '.join(ACTIVATIONS)}")
    unsupported = [(key, hf.get(key), want) for key, want in
                   (("layer_norm_epsilon", LN_EPS), ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("tie_word_embeddings", True))
                   if hf.get(key, want) != want]
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        unsupported.append(("n_inner", hf["n_inner"], "4 x n_embd"))
    if unsupported:
        key, got, want = unsupported[0]
        raise _bad(folder, f"{key} = {got!r}; hpclm's GPT computes with {want!r}")

    if (folder / HPCLM_CONFIG).is_file():
        cfg = config_mod.from_dict(tomllib.loads((folder / HPCLM_CONFIG).read_text()))
    else:
        sets = {"model.arch": "gpt", "model.n_layer": hf["n_layer"], "model.n_head": hf["n_head"],
                "model.n_embd": hf["n_embd"], "model.bias": True, "model.activation": activation,
                "model.dropout": 0.0, "data.block_size": hf.get("n_positions", hf.get("n_ctx", 1024)), "data.path": ""}
        cfg = config_mod.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    tok = read_tokenizer(folder)
    vocab = int(hf["vocab_size"])
    if tok.vocab_size > vocab:
        raise _bad(folder, f"its tokenizer has {tok.vocab_size} tokens, the model {vocab}")
    state = _from_gpt2_state(folder, cfg)
    if state["transformer.wte.weight"].shape[0] != vocab:
        raise _bad(folder, f"config.json says vocab_size {vocab}, the embedding has "
                           f"{state['transformer.wte.weight'].shape[0]} rows")
    return cfg, state, tok, {"vocab_size": vocab, "tokenizer_sha256": tok.sha256, "tokenizer": tok.kind}


def read_tokenizer(folder: str | Path) -> tokenizers.Tokenizer:
    """The tokenizer of a GPT-2 folder: hpclm's own when hpclm wrote it, else its tokenizer.json."""
    folder = Path(folder)
    tok_file = folder / HPCLM_TOKENIZER if (folder / HPCLM_TOKENIZER).is_file() else folder / "tokenizer.json"
    if not tok_file.is_file():
        raise _bad(folder, "has no tokenizer.json: hpclm encodes text with it")
    try:
        return tokenizers.from_json(tok_file.read_text(encoding="utf-8"))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise _bad(folder, f"{tok_file.name} is not a tokenizer file ({str(e).splitlines()[0][:200]})") from None


def _from_gpt2_state(folder: Path, cfg) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        raw = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise _bad(folder, f"{WEIGHTS} does not read as safetensors ({e})") from None
    theirs = {k.removeprefix("transformer."): v for k, v in raw.items()}
    def take(name):
        if name not in theirs:
            raise _bad(folder, f"{WEIGHTS} has no tensor '{name}' (a GPT-2 of {cfg.model.n_layer} layers has it)")
        return theirs[name].to(torch.float32)

    state = {f"transformer.{k}": take(k) for k in ("wte.weight", "wpe.weight", "ln_f.weight")}
    names = [n for n in _BLOCK if cfg.model.bias or not n.endswith(".bias")]
    if not cfg.model.bias:  # hpclm's config says no biases: those in the file must be the zeros export wrote
        nonzero = next((k for k, v in theirs.items() if k.endswith(".bias") and v.dim() == 1 and v.any()), None)
        if nonzero:
            raise _bad(folder, f"tensor '{nonzero}' is not zero but {HPCLM_CONFIG} says model.bias = false")
    if cfg.model.bias:
        state["transformer.ln_f.bias"] = take("ln_f.bias")
    for i in range(cfg.model.n_layer):
        for name in names:
            t = take(f"h.{i}.{name}")
            state[f"transformer.h.{i}.{name}"] = t.t().contiguous() if name in _CONV1D else t
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
