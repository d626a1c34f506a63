"""`hpclm quantize`: a trained GPT or GRU with int8 or int4 weights (hpclm.models.quantized), written as a run
directory with one checkpoint that `hpclm generate`, `eval` and `serve` load like any other."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpclm import atomic, config as config_mod
from hpclm.errors import HpclmError
from hpclm.generate import load_trained
from hpclm.models.quantized import quantizable, quantize_model
from hpclm.train import checkpoint


def quantize_checkpoint(ckpt: str | Path, out: str | Path, scheme: str, force: bool = False) -> tuple[Path, Path]:
    """Write the model of `ckpt`, quantized with `scheme`, as the run directory `out` (whole or not at all):
    (the checkpoint written, the one it came from)."""
    out = Path(out)
    if out.exists() and not force:
        raise HpclmError(f"{out} already exists: pick another --out, or replace it with --force")
    trained = load_trained(ckpt)
    source = Path(trained.path).resolve()
    if source == out.resolve() or out.resolve() in source.parents:
        raise HpclmError(f"--out {out} holds the checkpoint being quantized ({trained.path}): pick another --out")
    if trained.quantization:
        raise HpclmError(f"{trained.path} is already quantized ({trained.quantization['scheme']}): quantize the "
                         f"float checkpoint it came from ({trained.quantization.get('source', 'unknown')})")
    problem = quantizable(trained.model)
    if problem:
        raise HpclmError(f"{trained.path} holds a {trained.cfg.model.arch} model: {problem}")
    model = quantize_model(trained.model, scheme)
    record = {"scheme": scheme, "source": str(trained.path), "source_step": trained.step}
    files = {
        **dict([checkpoint.weights_file(model.state_dict(), trained.cfg.checkpoint.format)]),
        "config.toml": config_mod.to_toml(trained.cfg),
        "meta.json": json.dumps(trained.meta, indent=2) + "\n",
        "tokenizer.json": trained.tokenizer.to_json(),
        checkpoint.QUANTIZATION: json.dumps(record, indent=1) + "\n",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint.save(tmp, trained.step, files, keep_last=1)
        atomic.swap_into_place(tmp, out)
    except BaseException:
        atomic.remove_tree(tmp)
        raise
    return checkpoint.root(out) / checkpoint.name(trained.step), Path(trained.path)


def weights_bytes(folder: Path) -> int:
    """Bytes of a checkpoint folder's model file (0 when it has none, e.g. a nanoGPT ckpt.pt)."""
    return sum(f.stat().st_size for f in [folder / name for name in checkpoint.WEIGHTS.values()] if f.is_file())


def main(args) -> int:
    try:
        path, source = quantize_checkpoint(args.ckpt, args.out, args.scheme, args.force)
    except OSError as e:
        raise HpclmError(f"cannot write --out {args.out}: {e}") from None
    size = weights_bytes(path)
    float_size = weights_bytes(source) if source.is_dir() else 0
    ratio = f", {size / float_size:.2f}x the float model's {float_size / 2**20:.2f} MiB" if float_size else ""
    weights = next(name for name in checkpoint.WEIGHTS.values() if (path / name).is_file())
    print(f"wrote {path} ({args.scheme}: {weights} {size / 2**20:.2f} MiB{ratio}); "
          f"use it as --ckpt {args.out}")
    return 0
