"""Text -> token files -> batches.

`hpclm prepare SOURCE --out DIR` writes DIR/train.bin and DIR/val.bin (uint16 tokens when the
vocabulary fits, else uint32; read with np.memmap), DIR/tokenizer.json and DIR/meta.json. The
last `val_fraction` of the token stream is validation, as in nanoGPT's prepare scripts.

Batches are drawn with a numpy generator seeded by (seed, split, rank, step), so any step's batch
can be recomputed: a resumed run continues the exact batch sequence of an uninterrupted one.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpclm import tokenizer as tokenizers
from hpclm.errors import HpclmError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
META = "meta.json"
FORMAT_VERSION = 1


# --- reading the corpus ------------------------------------------------------------------

@dataclass
class Corpus:
    spec: str  # what the user gave
    files: list[str]
    text: str
    skipped: list[str]  # binary or non-UTF-8 files left out of a directory/glob

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _decode_text(path: Path, raw: bytes) -> str:
    """UTF-8 text, or HpclmError saying why the file is binary."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise HpclmError(f"{path} is binary (NUL byte at offset {nul}): the corpus must be UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HpclmError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                         "convert it (e.g. iconv -t UTF-8) or leave it out") from None


def _join(texts: list[str]) -> str:
    """Concatenate documents, with a newline between two when the first does not end with one."""
    parts = []
    for t in texts:
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(t)
    return "".join(parts)


def _read_many(spec: str, paths: list[Path], exclude: Path | None) -> Corpus:
    texts, used, skipped = [], [], []
    for p in paths:
        if exclude is not None and (p.resolve() == exclude or exclude in p.resolve().parents):
            continue
        try:
            text = _decode_text(p, p.read_bytes())
        except HpclmError:
            skipped.append(str(p))
            continue
        except OSError as e:
            raise HpclmError(f"cannot read {p}: {e.strerror}") from None
        texts.append(text)
        used.append(str(p))
    if not used:
        raise HpclmError(f"corpus '{spec}' has no UTF-8 text files ({len(skipped)} binary or non-UTF-8 skipped)")
    return Corpus(spec, used, _join(texts), skipped)


def _walk(root: Path) -> list[Path]:
    """Regular files under root, sorted, skipping hidden files and folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (no tests, no site-packages): the offline default corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return [p for p in _walk(root) if p.suffix == ".py" and not skip.intersection(p.relative_to(root).parts)]


def _shakespeare(local: str | None) -> Corpus:
    if local is not None:
        try:
            raw = Path(local).read_bytes()
        except OSError as e:
            raise HpclmError(f"--from {local}: {e.strerror}") from None
        origin = local
    else:
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                raw = r.read()
        except Exception as e:  # URLError, timeout, HTTP error
            raise HpclmError(f"cannot download {SHAKESPEARE_URL} ({e}): copy it here and pass --from FILE") from None
        origin = SHAKESPEARE_URL
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise HpclmError(f"{origin} is not Tiny Shakespeare: SHA-256 {digest[:16]}..., expected {SHAKESPEARE_SHA256[:16]}...")
    return Corpus("shakespeare", [origin], raw.decode("utf-8"), [])


def read_corpus(spec: str, *, local: str | None = None, exclude: str | Path | None = None) -> Corpus:
    """SOURCE: a text file, a directory, a glob, 'stdlib' or 'shakespeare' (--from FILE: a local copy)."""
    excl = Path(exclude).resolve() if exclude is not None else None
    if spec == "shakespeare":
        corpus = _shakespeare(local)
    elif local is not None:
        raise HpclmError("--from FILE only applies to SOURCE 'shakespeare'; give the file itself as SOURCE")
    elif spec == "stdlib":
        corpus = _read_many(spec, stdlib_files(), excl)
    elif Path(spec).is_file():
        p = Path(spec)
        corpus = Corpus(spec, [spec], _decode_text(p, p.read_bytes()), [])
    elif Path(spec).is_dir():
        corpus = _read_many(spec, _walk(Path(spec)), excl)
    elif glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise HpclmError(f"glob '{spec}' matches no files")
        corpus = _read_many(spec, paths, excl)
    else:
        raise HpclmError(f"SOURCE '{spec}' does not exist: give a text file, a directory, a glob, 'stdlib' or 'shakespeare'")
    if not corpus.text.strip():
        raise HpclmError(f"corpus '{spec}' is empty ({len(corpus.text)} characters, all whitespace or none)")
    return corpus


# --- prepare -------------------------------------------------------------------------------

def _chunks(text: str, target: int = 1 << 16) -> list[str]:
    """Pieces of about `target` characters cut after a newline: parallel BPE work units."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + target)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _write_bin(path: Path, tokens: np.ndarray, dtype) -> None:
    with open(path, "wb") as f:
        f.write(tokens.astype(dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _existing_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None


def prepare(spec: str, out: str | Path, *, kind: str = "char", vocab_size: int = 8192, val_fraction: float = 0.1,
            local: str | None = None, force: bool = False, log=print) -> dict:
    """Tokenize a corpus into OUT (written to a temporary folder, then renamed into place)."""
    out = Path(out)
    if kind not in tokenizers.KINDS:
        raise HpclmError(f"unknown tokenizer '{kind}': use one of {', '.join(tokenizers.KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise HpclmError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if out.exists() and not out.is_dir():
        raise HpclmError(f"--out {out} exists and is not a directory")
    corpus = read_corpus(spec, local=local, exclude=out)
    old = _existing_meta(out) if out.is_dir() else None
    wanted = {"tokenizer": kind, "val_fraction": val_fraction, "source_sha256": corpus.sha256,
              **({"requested_vocab_size": vocab_size} if kind == "bpe" else {})}
    if old is not None and all(old.get(k) == v for k, v in wanted.items()) and not force:
        log(f"{out} is up to date ({old['tokenizer']} tokenizer, source sha256 {corpus.sha256[:12]}); --force rebuilds it")
        return old
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a dataset prepared from another source or with other options" if old else "other files"
        raise HpclmError(f"--out {out} already holds {what}: pick another --out, or pass --force to replace it")
    for skipped in corpus.skipped[:3]:
        log(f"skipped {skipped} (binary or not UTF-8)")
    if len(corpus.skipped) > 3:
        log(f"... and {len(corpus.skipped) - 3} more binary or non-UTF-8 files skipped")

    chunks = _chunks(corpus.text)
    tok = tokenizers.train_tokenizer(kind, chunks, vocab_size)
    ids = np.concatenate(tok.encode_many(chunks))
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train < 2 or len(ids) - n_train < 2:
        raise HpclmError(f"the corpus has only {len(ids)} tokens: too few for a train and a validation split "
                         f"with --val-fraction {val_fraction}; use a larger corpus")
    dtype = token_dtype(tok.vocab_size)
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        **({"requested_vocab_size": vocab_size} if kind == "bpe" else {}),
        "tokenizer_sha256": tok.sha256,
        "dtype": np.dtype(dtype).name,
        "train_tokens": n_train,
        "val_tokens": len(ids) - n_train,
        "val_fraction": val_fraction,
        "source": corpus.spec,
        "source_files": len(corpus.files),
        "source_chars": len(corpus.text),
        "source_bytes": len(corpus.text.encode("utf-8")),
        "source_sha256": corpus.sha256,
        "skipped_files": len(corpus.skipped),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_bin(tmp / "train.bin", ids[:n_train], dtype)
        _write_bin(tmp / "val.bin", ids[n_train:], dtype)
        tok.save(tmp / tokenizers.FILENAME)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"{meta['tokenizer']} vocabulary {meta['vocab_size']:,} ({meta['dtype']}), "
        f"{meta['source_files']} file(s) from '{meta['source']}', sha256 {meta['source_sha256'][:12]}")
    return meta


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed only afterwards."""
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, aside)
        os.rename(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, out)


# --- loading and batches -------------------------------------------------------------------

@dataclass
class Dataset:
    path: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load(self.path / tokenizers.FILENAME)

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


def _max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_dataset(path: str | Path, block_size: int | None = None, *, check_tokens: bool = True) -> Dataset:
    """Open a prepared directory, checking it is complete and its tokens fit the vocabulary."""
    path = Path(path)
    if not (path / META).is_file():
        what = "does not exist" if not path.exists() else "has no meta.json"
        raise HpclmError(f"data.path '{path}' {what}: create it with 'hpclm prepare SOURCE --out {path}'")
    try:
        meta = json.loads((path / META).read_text())
        dtype = np.dtype(meta["dtype"])
        vocab = int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise HpclmError(f"{path / META} is unreadable ({e}): prepare the data again with --force") from None
    splits = {}
    for name in ("train", "val"):
        f = path / f"{name}.bin"
        expect = int(meta.get(f"{name}_tokens", -1))
        size = f.stat().st_size if f.is_file() else -1
        if size != expect * dtype.itemsize:
            raise HpclmError(f"{f} has {size} bytes but meta.json says {expect} {dtype.name} tokens: "
                             "the dataset is incomplete; prepare it again with --force")
        tokens = np.memmap(f, dtype=dtype, mode="r")
        if check_tokens and len(tokens) and _max_token(tokens) >= vocab:
            raise HpclmError(f"{f} holds token id {_max_token(tokens)}, outside the vocabulary (0..{vocab - 1}) "
                             "of its tokenizer: prepare the data again with --force")
        if block_size is not None and len(tokens) <= block_size:
            raise HpclmError(f"the {name} split of {path} has {len(tokens)} tokens, shorter than one block "
                             f"(data.block_size {block_size} + 1): use a smaller data.block_size or prepare "
                             "with a larger corpus or --val-fraction")
        splits[name] = tokens
    return Dataset(path, meta, splits["train"], splits["val"])


STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}


def batch_rng(seed: int, stream: str, rank: int, index: int) -> np.random.Generator:
    """The generator of one batch: fixed by (seed, stream, rank, index), independent of history.

    Streams: "train" (index = step * grad_accum + micro-step), "eval_train"/"eval_val" (index = eval batch).
    """
    return np.random.default_rng([seed, STREAMS[stream], rank, index])


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1]."""
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def main(args) -> int:
    prepare(args.source, args.out, kind=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
            local=args.local, force=args.force)
    return 0
