"""`hpclm export`: a trained GPT as a folder another tool loads (transformers' GPT-2 format)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpclm import atomic
from hpclm.errors import HpclmError
from hpclm.generate import load_trained
from hpclm.interop import hf


def export_hf(ckpt: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the GPT of `ckpt` to `out` as a GPT2LMHeadModel folder; out is replaced whole or not at all."""
    out = Path(out)
    if out.exists() and not force:
        raise HpclmError(f"{out} already exists: pick another --out, or replace it with --force")
    trained = load_trained(ckpt)
    if trained.quantization:
        raise HpclmError(f"{trained.path} is quantized ({trained.quantization['scheme']}); GPT-2's format holds float "
                         f"weights: export the checkpoint it came from ({trained.quantization.get('source', '?')})")
    if trained.cfg.model.arch != "gpt":
        raise HpclmError(f"{trained.path} holds a {trained.cfg.model.arch} model; only gpt exports to GPT-2's format")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hf.write(tmp, trained.model.state_dict(), trained.cfg, trained.tokenizer, int(trained.meta["vocab_size"]))
        atomic.swap_into_place(tmp, out)
    except BaseException:
        atomic.remove_tree(tmp)
        raise
    return out


def main(args) -> int:
    try:
        out = export_hf(args.ckpt, args.out, args.force)
    except OSError as e:
        raise HpclmError(f"cannot write --out {args.out}: {e}") from None
    print(f"wrote {out} (GPT2LMHeadModel: config.json, {hf.WEIGHTS}, tokenizer.json) from {args.ckpt}; "
          f"load it with transformers' AutoModelForCausalLM.from_pretrained, or use --ckpt {hf.PREFIX}{out}")
    return 0
