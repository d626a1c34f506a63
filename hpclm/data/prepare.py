"""`hpclm prepare SOURCE --out DIR`: a corpus -> DIR/train.bin, DIR/val.bin, DIR/tokenizer.json, DIR/meta.json.

Tokens are uint16 when the vocabulary fits, else uint32 (read with np.memmap). The last
`val_fraction` of the token stream is validation, as in nanoGPT's prepare scripts. The dataset is
written into a temporary folder and renamed into place, so DIR is always whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from hpclm import atomic
from hpclm.data import tokenizers
from hpclm.data.batches import META, token_dtype
from hpclm.data.corpus import read_corpus
from hpclm.errors import HpclmError

FORMAT_VERSION = 1


def _chunks(text: str, target: int = 1 << 16) -> list[str]:
    """Pieces of about `target` characters cut after a newline: parallel BPE work units."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + target)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


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
            local: str | None = None, force: bool = False, log=print, tokenizer_from: str | None = None) -> dict:
    """Tokenize a corpus into OUT (written to a temporary folder, then renamed into place), with a tokenizer
    trained on it, or with a model's (tokenizer_from: "hf:DIR" or "nanogpt:PATH", for fine-tuning it)."""
    out = Path(out)
    given = None
    if tokenizer_from:
        from hpclm import interop
        given = interop.read_tokenizer(tokenizer_from)
        kind = given.kind
    if kind not in tokenizers.KINDS:
        raise HpclmError(f"unknown tokenizer '{kind}': use one of {', '.join(tokenizers.KINDS)}")
    if not 0.0 < val_fraction < 1.0:
        raise HpclmError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if out.exists() and not out.is_dir():
        raise HpclmError(f"--out {out} exists and is not a directory")
    corpus = read_corpus(spec, local=local, exclude=out)
    old = _existing_meta(out) if out.is_dir() else None
    wanted = {"tokenizer": kind, "val_fraction": val_fraction, "source_sha256": corpus.sha256,
              **({"tokenizer_sha256": given.sha256} if given else
                 {"requested_vocab_size": vocab_size} if kind == "bpe" else {})}
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
    tok = given or tokenizers.train_tokenizer(kind, chunks, vocab_size)
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
        **({"requested_vocab_size": vocab_size} if kind == "bpe" and not given else {}),
        **({"tokenizer_from": tokenizer_from} if given else {}),
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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise HpclmError(f"cannot write --out {out} ({e.strerror}: {e.filename}): pick a writable place") from None
    try:
        _write_bin(tmp / "train.bin", ids[:n_train], dtype)
        _write_bin(tmp / "val.bin", ids[n_train:], dtype)
        tok.save(tmp / tokenizers.FILENAME)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        atomic.swap_into_place(tmp, out)
    except OSError as e:
        atomic.remove_tree(tmp)
        raise HpclmError(f"cannot write --out {out} ({e.strerror}); it is as it was") from None
    except BaseException:
        atomic.remove_tree(tmp)
        raise
    log(f"prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
        f"{meta['tokenizer']} vocabulary {meta['vocab_size']:,} ({meta['dtype']}), "
        f"{meta['source_files']} file(s) from '{meta['source']}', sha256 {meta['source_sha256'][:12]}")
    return meta


def main(args) -> int:
    prepare(args.source, args.out, kind=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
            local=args.local, force=args.force, tokenizer_from=args.tokenizer_from)
    return 0
