"""Reading a corpus: a text file, a directory or glob of text files, 'stdlib' or 'shakespeare'."""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hpclm.errors import HpclmError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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
    """Regular files under root, sorted, skipping hidden files and folders (and FIFOs, sockets, devices,
    which are not text files and whose reads can block)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [p for p in (Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")) if p.is_file()]
    return out


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (no tests, no site-packages): the offline default corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return [p for p in _walk(root) if p.suffix == ".py" and not skip.intersection(p.relative_to(root).parts)]


def _shakespeare(local: str | None) -> Corpus:
    if local is not None:
        if Path(local).exists() and not Path(local).is_file():
            raise HpclmError(f"--from {local} is not a regular file: give the downloaded text file")
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
    elif Path(spec).exists():
        raise HpclmError(f"SOURCE '{spec}' is not a regular file or a directory (a FIFO, socket or device): "
                         "give a text file, a directory or a glob")
    else:
        raise HpclmError(f"SOURCE '{spec}' does not exist: give a text file, a directory, a glob, 'stdlib' or 'shakespeare'")
    if not corpus.text.strip():
        raise HpclmError(f"corpus '{spec}' is empty ({len(corpus.text)} characters, all whitespace or none)")
    return corpus


