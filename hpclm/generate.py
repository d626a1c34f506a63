"""`hpclm generate`: sample text from a trained checkpoint (nanoGPT's sample.py)."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from hpclm import config as config_mod, interop
from hpclm.config import Config
from hpclm.data import tokenizers
from hpclm.errors import HpclmError
from hpclm.infer import SamplingParams, generate_ids, next_token
from hpclm.models import build_model
from hpclm.train import checkpoint


@dataclass
class Trained:
    model: torch.nn.Module
    cfg: Config
    meta: dict
    tokenizer: tokenizers.Tokenizer
    step: int
    path: Path
    quantization: dict | None = None  # a quantized checkpoint's record (hpclm.models.quantized)


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """The model of a checkpoint folder, of a run directory's latest complete checkpoint, or of another
    tool's (`hf:DIR`, a GPT-2 folder in transformers' format; `nanogpt:PATH`, nanoGPT's ckpt.pt), in eval mode."""
    if interop.is_foreign(path):
        imported = interop.read(str(path))
        cfg, state, tok, meta, where, step = (imported.cfg, imported.state, imported.tokenizer, imported.meta,
                                              imported.where, 0)
    else:
        where = checkpoint.resolve(path)
        cfg = config_mod.from_dict(tomllib.loads(checkpoint.load(where, "config.toml")))
        meta = json.loads(checkpoint.load(where, "meta.json"))
        tok = tokenizers.from_json(checkpoint.load(where, "tokenizer.json"))
        state, step = checkpoint.load_weights(where, device), checkpoint.step_of(where)
    model = build_model(cfg, int(meta["vocab_size"]))
    quantization = checkpoint.quantization(where) if not interop.is_foreign(path) else None
    if quantization:
        from hpclm.models.quantized import quantize_model
        model = quantize_model(model, quantization["scheme"])  # the quantized form's shapes; the weights load next
    model.load_state_dict(state)
    return Trained(model.to(device).eval(), cfg, meta, tok, step, where, quantization)


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 200,
           generator: torch.Generator | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Append max_new_tokens tokens to idx [B, T] by full recomputation: each step runs the model over the last
    block_size tokens of every row (the reference the incremental decoders of hpclm.infer are tested against)."""
    params = SamplingParams(temperature, top_k or 0, top_p)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.block_size:])
        nxt = [[next_token(row, params, generator)] for row in logits[:, -1]]
        idx = torch.cat([idx, torch.tensor(nxt, dtype=idx.dtype, device=idx.device)], dim=1)
    return idx


def generate_text(trained: Trained, prompt: str = "\n", max_new_tokens: int = 500, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, top_p: float = 1.0) -> str:
    """prompt and max_new_tokens tokens after it, drawn by the incremental decoder (hpclm.infer)."""
    params = SamplingParams(temperature, top_k or 0, top_p).check(lambda name: "--" + name.replace("_", "-"))
    if not 0 <= seed < 2**63:
        raise HpclmError(f"--seed must be in 0..2**63 - 1, got {seed}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HpclmError(f"--prompt is not valid text: position {e.start} holds {prompt[e.start]!r}, which is not a "
                         "character (a byte the terminal's encoding could not decode)") from None
    if max_new_tokens < 0:
        raise HpclmError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    ids = trained.tokenizer.encode(prompt)
    if len(ids) == 0:
        raise HpclmError("--prompt encodes to no tokens: give at least one character")
    device = next(iter([*trained.model.parameters(), *trained.model.buffers()]), torch.empty(0)).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate_ids(trained.model, [int(i) for i in ids], max_new_tokens, params, g)
    return trained.tokenizer.decode(out)


def main(args) -> int:
    trained = load_trained(args.ckpt)
    print(generate_text(trained, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.top_p))
    return 0
