"""`hpclm generate`: sample text from a trained checkpoint (nanoGPT's sample.py)."""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from hpclm import config as config_mod, interop
from hpclm.config import Config
from hpclm.data import tokenizers
from hpclm.errors import HpclmError
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
    model.load_state_dict(state)
    return Trained(model.to(device).eval(), cfg, meta, tok, step, where)


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 200,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Append max_new_tokens tokens to idx [B, T], each drawn from the model's last-position distribution."""
    for _ in range(max_new_tokens):
        context = idx[:, -model.block_size:]
        logits, _ = model(context)
        logits = logits[:, -1, :].float()
        # shifted to a max of 0 first, so a tiny temperature sharpens to the likeliest token instead of overflowing
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def generate_text(trained: Trained, prompt: str = "\n", max_new_tokens: int = 500, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337) -> str:
    if not (math.isfinite(temperature) and temperature > 0):
        raise HpclmError(f"--temperature must be a finite number > 0, got {temperature}")
    if not 0 <= seed < 2**63:
        raise HpclmError(f"--seed must be in 0..2**63 - 1, got {seed}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HpclmError(f"--prompt is not valid text: position {e.start} holds {prompt[e.start]!r}, which is not a "
                         "character (a byte the terminal's encoding could not decode)") from None
    if max_new_tokens < 0:
        raise HpclmError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 0:
        raise HpclmError(f"--top-k must be >= 0 (0: off), got {top_k}")
    ids = trained.tokenizer.encode(prompt)
    if len(ids) == 0:
        raise HpclmError("--prompt encodes to no tokens: give at least one character")
    device = next(iter([*trained.model.parameters(), *trained.model.buffers()]), torch.empty(0)).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = sample(trained.model, torch.tensor(ids, dtype=torch.long, device=device)[None], max_new_tokens,
                 temperature, top_k or None, g)
    return trained.tokenizer.decode(out[0].cpu().numpy())


def main(args) -> int:
    trained = load_trained(args.ckpt)
    print(generate_text(trained, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0
