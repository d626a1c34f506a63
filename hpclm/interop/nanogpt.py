"""nanoGPT's checkpoints (the `ckpt.pt` its train.py writes) read as hpclm GPTs, with their AdamW state.

hpclm's GPT has nanoGPT's parameter names, initialisation and function (exact GELU, LayerNorm eps 1e-5,
tied embeddings), so the weights load as they are, after two clean-ups: a model trained with
`compile=True` saved its state under `_orig_mod.` (torch.compile's wrapper), and nanoGPT's manual
attention path (no scaled_dot_product_attention) keeps its causal mask as a buffer `attn.bias`.
The model's shape comes from the checkpoint's `model_args`.

nanoGPT keeps a char run's vocabulary in meta.pkl ({stoi, itos, vocab_size}) in its dataset folder, not in
the checkpoint: it is looked for beside ckpt.pt, then in data/<dataset>/ next to the checkpoint's folder
(nanoGPT's own layout) and under the current directory (where nanoGPT's sample.py looks). It is read as
plain data (no code runs from it). A run on GPT-2's BPE has no meta.pkl; hpclm does not bundle GPT-2's
vocabulary, so it is an error.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from hpclm import config as config_mod
from hpclm.data import tokenizers
from hpclm.errors import HpclmError
from hpclm.models import build_model

PREFIX = "nanogpt:"
CKPT = "ckpt.pt"
META = "meta.pkl"
COMPILED_PREFIX = "_orig_mod."
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.bias$")
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def _bad(where, why: str) -> HpclmError:
    return HpclmError(f"{PREFIX}{where}: {why}")


def ckpt_file(path: str | Path) -> Path:
    """PATH itself when it is a file, else PATH/ckpt.pt (nanoGPT's out_dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT
    if not path.is_file():
        raise _bad(path, f"does not exist: give nanoGPT's {CKPT} or the out_dir that holds it")
    return path


def load_checkpoint(path: Path) -> dict:
    """ckpt.pt as tensors and plain values (torch.load with weights_only: nothing in it runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, a truncated file, not a torch file at all
        raise _bad(path, f"does not load as a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_args"), dict):
        raise _bad(path, "is not a nanoGPT checkpoint (train.py's ckpt.pt holds 'model' and 'model_args')")
    missing = [k for k in MODEL_ARGS if k not in ckpt["model_args"]]
    if missing:
        raise _bad(path, f"model_args has no {', '.join(missing)}")
    return ckpt


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The model's state_dict in hpclm's names: the compiled prefix stripped, the manual path's mask dropped."""
    state = {k.removeprefix(COMPILED_PREFIX): v for k, v in ckpt["model"].items()}
    return {k: v.to(torch.float32) for k, v in state.items() if not _MASK_BUFFER.match(k)}


def config_of(ckpt: dict):
    """hpclm's config of the GPT a nanoGPT checkpoint holds (data.path empty: nanoGPT's data is its own format)."""
    args = ckpt["model_args"]
    sets = {"model.arch": "gpt", "model.n_layer": args["n_layer"], "model.n_head": args["n_head"],
            "model.n_embd": args["n_embd"], "model.bias": bool(args["bias"]), "model.activation": "gelu",
            "model.dropout": float(args.get("dropout", 0.0)), "data.block_size": args["block_size"], "data.path": ""}
    return config_mod.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


class _PlainData(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: any class or function in the file is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; meta.pkl holds only stoi, itos and vocab_size")


def _meta_candidates(path: Path, ckpt: dict) -> list[Path]:
    places = [path.parent / META]
    dataset = (ckpt.get("config") or {}).get("dataset")
    if isinstance(dataset, str) and dataset and "/" not in dataset and dataset not in (".", ".."):
        places += [path.parent.parent / "data" / dataset / META, Path("data") / dataset / META]
    return places


def read_tokenizer(path: str | Path, ckpt: dict | None = None) -> tokenizers.CharTokenizer:
    """The char tokenizer of a nanoGPT run, from its meta.pkl (ids as nanoGPT's itos gives them)."""
    path = ckpt_file(path)
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    places = _meta_candidates(path, ckpt)
    meta_path = next((p for p in places if p.is_file()), None)
    if meta_path is None:
        raise _bad(path, f"no {META} (nanoGPT's character vocabulary) in {' or '.join(str(p.parent) for p in places)}: "
                         f"copy data/<dataset>/{META} beside {path.name} (runs on GPT-2's BPE have none; hpclm does not "
                         "bundle GPT-2's vocabulary)")
    try:
        meta = _PlainData(io.BytesIO(meta_path.read_bytes())).load()
        itos = meta["itos"]
        chars = [itos[i] for i in range(len(itos))]
    except Exception as e:  # refused classes, a truncated pickle, a dict without itos
        raise _bad(path, f"{meta_path} is not nanoGPT's meta.pkl ({type(e).__name__}: {str(e)[:200]})") from None
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise _bad(path, f"{meta_path}: itos is not a list of distinct characters")
    tok = tokenizers.CharTokenizer(chars)
    if tok.chars != chars:  # hpclm numbers characters in code-point order, as nanoGPT's prepare.py does
        raise _bad(path, f"{meta_path}: itos is not in code-point order (nanoGPT's sorted(set(text))), so hpclm's "
                         "char tokenizer cannot give the same ids")
    return tok


def read(path: str | Path):
    """A nanoGPT checkpoint as (cfg, hpclm GPT state_dict, tokenizer, meta, its optimizer's state_dict or None)."""
    path = ckpt_file(path)
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt)
    state = model_state(ckpt)
    vocab = int(ckpt["model_args"]["vocab_size"])
    tok = read_tokenizer(path, ckpt)
    if tok.vocab_size > vocab:
        raise _bad(path, f"its meta.pkl has {tok.vocab_size} characters, the model {vocab} tokens")
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        expected = build_model(cfg, vocab).state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"has no tensor '{missing[0]}'" if missing else f"has a tensor '{extra[0]}' hpclm's GPT does not"
        raise _bad(path, f"its model {what} (model_args: {ckpt['model_args']})")
    wrong = next((k for k in expected if state[k].shape != expected[k].shape), None)
    if wrong:
        raise _bad(path, f"tensor '{wrong}' has shape {tuple(state[wrong].shape)}, model_args make it "
                         f"{tuple(expected[wrong].shape)}")
    optimizer = ckpt.get("optimizer") if isinstance(ckpt.get("optimizer"), dict) else None
    meta = {"vocab_size": vocab, "tokenizer_sha256": tok.sha256, "tokenizer": tok.kind}
    return cfg, state, tok, meta, optimizer


def optimizer_state_for(optimizer: torch.optim.Optimizer, theirs: dict) -> tuple[dict | None, str]:
    """nanoGPT's AdamW state_dict made loadable into hpclm's AdamW (same groups: decayed matrices, then the
    rest, in parameter order), with hpclm's hyperparameters kept; (None, why) when the layouts differ."""
    ours = optimizer.state_dict()
    groups, state = theirs.get("param_groups"), theirs.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        return None, "it is not an optimizer state_dict"
    if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in ours["param_groups"]]:
        return None, (f"its parameter groups hold {[len(g.get('params', ())) for g in groups]} tensors, "
                      f"hpclm's {[len(g['params']) for g in ours['param_groups']]}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for i, p in zip(ids, params):
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(i, {}).get(key)
            if t is None or t.shape != p.shape:
                return None, f"its state for parameter {i} has no {key} of shape {tuple(p.shape)}"
    mine = [{**g, "params": their["params"]} for g, their in zip(ours["param_groups"], groups)]
    return {"state": {i: state[i] for i in ids}, "param_groups": mine}, ""
