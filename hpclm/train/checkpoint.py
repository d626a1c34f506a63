"""Checkpoints that are always complete: OUT/checkpoints/iter_0000100/ and OUT/checkpoints/latest.

Writing (rank 0): every file goes into a temporary folder and is fsynced, manifest.json (size and
SHA-256 of each file) is written last, the folder is renamed to iter_NNNNNNN, then `latest` (the
iteration number) is replaced atomically, and only then are old checkpoints pruned. A process
killed at any point leaves `latest` naming a complete checkpoint.

The model's weights are model.pt (torch.save) or, with checkpoint.format = "safetensors",
model.safetensors (a tied tensor stored once; optimizer and loop state stay .pt); either is read back.

Nothing diverged is written: the drivers check the recent losses, the weights and the optimizer state
first (non_finite), so every checkpoint on disk, and the one `latest` names in particular, is finite.

Reading: a checkpoint is used only when its manifest is well formed, every file matches it, and every
file parses (tensors through torch.load(weights_only=True) or safetensors, config, meta, tokenizer); a truncated or
corrupt `latest` is renamed to iter_NNNNNNN.corrupt and the newest good one before it is used instead.
A run directory that had checkpoints but has none usable left is an error, never a fresh start.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import sys
import tomllib
import warnings
from pathlib import Path

import torch

from hpclm import atomic
from hpclm.comm import dist
from hpclm.errors import HpclmError

DIRNAME = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
WEIGHTS = {"pt": "model.pt", "safetensors": "model.safetensors"}  # the model's file, by checkpoint.format
_NAME = re.compile(r"^iter_(\d{7,})$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-")


def name(step: int) -> str:
    return f"iter_{step:07d}"


def step_of(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (iter_NNNNNNN)")
    return int(m.group(1))


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIRNAME


def listing(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first."""
    r = root(run_dir)
    if not r.is_dir():
        return []
    return sorted((p for p in r.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of)


def tensor_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:  # an install problem, not a corrupt checkpoint: never a reason to move one aside
        raise HpclmError("checkpoint.format = 'safetensors' needs the safetensors package: pip install safetensors "
                         "(scripts/setup.sh installs it)") from None
    return safetensors.torch


def weights_file(state: dict, fmt: str = "pt") -> tuple[str, bytes]:
    """A model state_dict as the checkpoint file checkpoint.format names: ("model.pt", torch.save's bytes) or
    ("model.safetensors", ...). safetensors holds each tensor once, so a tied one (the output embedding) is
    named in the file's metadata ("tied": {name: the name it shares}) and restored by load_weights."""
    if fmt == "pt":
        return WEIGHTS["pt"], tensor_bytes(state)
    first, tied, tensors = {}, {}, {}
    for key, t in state.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in first:
            tied[key] = first[view]
            continue
        first[view] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    return WEIGHTS["safetensors"], _safetensors().save(tensors, metadata={"tied": json.dumps(tied)})


def _weights_from_safetensors(data: bytes) -> dict:
    tensors = _safetensors().load(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    tied = json.loads(json.loads(data[8:8 + header_len]).get("__metadata__", {}).get("tied", "{}"))
    return {**tensors, **{key: tensors[same] for key, same in tied.items()}}


def load_weights(path: Path, map_location="cpu") -> dict:
    """The model state_dict of a checkpoint folder, whichever format it was written in."""
    f = path / WEIGHTS["safetensors"]
    if not f.is_file():
        return load(path, WEIGHTS["pt"], map_location)
    state = _weights_from_safetensors(f.read_bytes())
    return {k: v.to(map_location) for k, v in state.items()}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def discard(path: Path) -> None:
    """Remove a folder so that it never looks like a checkpoint while half deleted."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def non_finite(named: dict) -> list[str]:
    """Names of the floating-point tensors in named (nested dicts, lists and tuples) holding inf or NaN."""
    bad = []

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(prefix)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
    walk("", named)
    return bad


def save_from_rank0(run_dir: str | Path, step: int, make_files, keep_last: int = 3,
                    keep_from: int | None = None) -> Path | None:
    """Every rank enters; rank 0 builds the files (make_files(), which may refuse with an HpclmError) and
    saves them; an error there stops every rank with the same one line. Returns the checkpoint's path on
    rank 0."""
    error, path = None, None
    if dist.is_main():
        try:
            path = save(run_dir, step, make_files(), keep_last, keep_from)
        except HpclmError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot write checkpoint {name(step)} in {run_dir}: {e}"
    if dist.is_distributed():
        error = dist.broadcast_object(error, 0)
    if error:
        raise HpclmError(error)
    return path


def save(run_dir: str | Path, step: int, files: dict[str, bytes | str], keep_last: int = 3,
         keep_from: int | None = None) -> Path:
    """Write files as checkpoint `step`, point `latest` at it, then prune (keep_last, keep_from)."""
    r = root(run_dir)
    r.mkdir(parents=True, exist_ok=True)
    tmp = r / f".tmp-{name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = {"step": step, "files": {}}
        for fname, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            _write(tmp / fname, data)
            manifest["files"][fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        atomic.fsync(tmp)
    except BaseException:  # a full disk, an I/O error: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = r / name(step)
    if final.exists():  # e.g. a step redone after falling back from a corrupt checkpoint
        aside = r / f".old-{final.name}-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    atomic.fsync(r)
    atomic.write_text(r / LATEST, f"{step}\n", durable=True)
    prune(run_dir, keep_last, keep_from)
    return final


def prune(run_dir: str | Path, keep_last: int, keep_from: int | None = None) -> list[Path]:
    """Delete all but the newest keep_last checkpoints (never the one `latest` names); returns those deleted.

    keep_from (a rollback's reach, anomaly.rollback_steps before the current step): the newest checkpoint
    at or before it is kept too, and every one after it, so whichever a rollback from now on picks exists."""
    if keep_last <= 0:
        return []
    latest = read_latest(run_dir)
    found = listing(run_dir)
    reach = None
    if keep_from is not None:
        before = [step_of(p) for p in found if step_of(p) <= keep_from]
        reach = before[-1] if before else -1
    removed = []
    for path in found[:-keep_last]:
        if step_of(path) != latest and (reach is None or step_of(path) < reach):
            discard(path)
            removed.append(path)
    return removed


def clean_leftovers(run_dir: str | Path) -> None:
    """Remove temporary folders a killed writer left behind."""
    r = root(run_dir)
    if r.is_dir():
        for p in r.iterdir():
            if _LEFTOVER.match(p.name) or atomic.is_temporary(p):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_latest(run_dir: str | Path) -> int | None:
    try:
        return int((root(run_dir) / LATEST).read_text().strip())
    except (OSError, ValueError):
        return None


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return "manifest.json lists no files"
    for fname, want in manifest["files"].items():
        if (not isinstance(fname, str) or "/" in fname or fname in ("", ".", "..") or not isinstance(want, dict)
                or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str)):
            return f"manifest.json has a malformed entry for {fname!r}"
    return None


def _content_problem(fname: str, data: bytes, parsed: dict) -> str | None:
    """Why one file of a checkpoint does not parse as what its name says (None: it does)."""
    if fname.endswith(".safetensors"):
        _safetensors()
    try:
        if fname.endswith(".safetensors"):
            _weights_from_safetensors(data)
        elif fname.endswith(".pt"):
            with warnings.catch_warnings():  # torch warns about the pickle protocol of what it then refuses
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        elif fname == "config.toml":
            from hpclm import config
            config.from_dict(tomllib.loads(data.decode("utf-8")))
        elif fname == "tokenizer.json":
            from hpclm.data import tokenizers
            parsed["tokenizer"] = tokenizers.from_json(data.decode("utf-8"))
        elif fname == "meta.json":
            meta = json.loads(data)
            vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
            if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 2**32:
                return f"meta.json has no valid vocab_size (got {vocab!r})"
            parsed["vocab_size"] = vocab
        elif fname.endswith(".json"):
            json.loads(data)
        elif fname.endswith(".toml"):
            tomllib.loads(data.decode("utf-8"))
    except Exception as e:  # unpickling refused, bad JSON/TOML/UTF-8, a config key that does not exist, ...
        text = str(e).splitlines()[0] if str(e) else ""
        return f"{fname} does not parse ({type(e).__name__}: {text[:200]})"
    return None


def verify(path: Path) -> str | None:
    """None when the manifest is well formed, every file matches it and parses, else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    problem = _manifest_problem(manifest)
    if problem:
        return problem
    parsed: dict = {}
    for fname, want in manifest["files"].items():
        f = path / fname
        try:
            data = f.read_bytes()
        except OSError:
            return f"{fname} is missing"
        if len(data) != want["bytes"]:
            return f"{fname} has {len(data)} bytes, the manifest says {want['bytes']}"
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            return f"{fname} does not match its SHA-256 in the manifest"
        problem = _content_problem(fname, data, parsed)
        if problem:
            return problem
    if "tokenizer" in parsed and "vocab_size" in parsed and parsed["tokenizer"].vocab_size != parsed["vocab_size"]:
        return (f"meta.json says vocab_size {parsed['vocab_size']} but tokenizer.json has "
                f"{parsed['tokenizer'].vocab_size} tokens")
    return None


def quarantined(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders earlier reads found corrupt and moved aside (iter_NNNNNNN.corrupt)."""
    r = root(run_dir)
    return sorted(p for p in r.iterdir() if p.name.endswith(".corrupt")) if r.is_dir() else []


def find_resumable(run_dir: str | Path, warn=print, quarantine: bool = True) -> Path | None:
    """The checkpoint to resume from: `latest` if good, else the newest good one before it.

    With quarantine, incomplete or corrupt checkpoints passed over are renamed to *.corrupt (kept
    for inspection, out of the way of pruning and of later saves).
    None only when the run directory never had checkpoints; HpclmError when it had some but none is
    usable (all corrupt, moved aside by an earlier start, or `latest` naming a folder that is gone).
    """
    found = listing(run_dir)
    latest = read_latest(run_dir)
    has_latest = (root(run_dir) / LATEST).exists()
    if not found:
        if not has_latest and not quarantined(run_dir):
            return None
        moved = quarantined(run_dir)
        why = (f"every checkpoint was found corrupt and moved aside ({', '.join(p.name for p in moved)})" if moved else
               f"{root(run_dir) / LATEST} names iteration {latest}, whose folder is gone" if latest is not None else
               f"{root(run_dir) / LATEST} is unreadable")
        raise HpclmError(f"{root(run_dir)} has no usable checkpoint: {why}. Restore them, or train there from step 0 "
                         "with --resume never --force (deletes them), or choose another --out")
    if latest is None:
        warn(f"warning: {root(run_dir) / LATEST} is missing or unreadable; looking for the newest complete checkpoint")
    candidates = [p for p in reversed(found) if latest is None or step_of(p) <= latest]
    if latest is not None and latest not in {step_of(p) for p in found}:
        warn(f"warning: {root(run_dir) / LATEST} names iteration {latest}, which has no folder; "
             "looking for the newest complete checkpoint before it")
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        moved = ""
        if quarantine:
            corrupt = path.with_name(f"{path.name}.corrupt")
            if corrupt.exists():
                shutil.rmtree(corrupt, ignore_errors=True)
            os.rename(path, corrupt)
            moved = f"; moved it to {corrupt.name}"
        warn(f"warning: checkpoint {path} is incomplete or corrupt ({problem}){moved}; "
             "falling back to the previous complete checkpoint")
    raise HpclmError(f"{root(run_dir)} has checkpoints but none is complete: start over with "
                     "--resume never --force, or choose another --out")


def resolve(path: str | Path) -> Path:
    """A checkpoint folder given either itself or its run directory (then `latest`, with fallback)."""
    path = Path(path)
    if _NAME.match(path.name) and path.is_dir():
        problem = verify(path)
        if problem:
            raise HpclmError(f"checkpoint {path} is incomplete or corrupt: {problem}")
        return path
    if path.name == DIRNAME and not (path / DIRNAME).exists():
        path = path.parent  # OUT/checkpoints given for OUT
    if not path.exists():
        raise HpclmError(f"--ckpt {path} does not exist: give a run directory (hpclm train --out) or a checkpoint folder")
    found = find_resumable(path, warn=lambda msg: print(msg, file=sys.stderr), quarantine=False)
    if found is None:
        raise HpclmError(f"{path} holds no checkpoints ({root(path)}/iter_NNNNNNN): train first, or give a checkpoint folder")
    return found


def load(path: Path, fname: str, map_location="cpu"):
    """One file of a checkpoint: tensors via torch.load(weights_only=True), text as str."""
    f = path / fname
    if fname.endswith(".pt"):
        return torch.load(f, map_location=map_location, weights_only=True)
    return f.read_text(encoding="utf-8")


QUANTIZATION = "quantization.json"  # written by hpclm quantize (hpclm/quantize.py)


def quantization(path: Path) -> dict | None:
    """A quantized checkpoint's record ({"scheme", "source", "source_step"}), None for a float one."""
    f = path / QUANTIZATION
    if not f.is_file():
        return None
    record = json.loads(f.read_text(encoding="utf-8"))
    from hpclm.kernels.quant import SCHEMES  # torch is loaded already: this module imports it
    if not isinstance(record, dict) or record.get("scheme") not in SCHEMES:
        raise HpclmError(f"{f} names no known quantization scheme (got {record!r}): re-run hpclm quantize")
    return record


def remove_all(run_dir: str | Path) -> None:
    r = root(run_dir)
    if r.exists():
        discard(r)
