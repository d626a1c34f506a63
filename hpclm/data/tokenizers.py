"""Tokenizers: `char` (the corpus' characters, nanoGPT's shakespeare_char) and `bpe` (byte-level BPE
trained with the `tokenizers` library). Both are stored as one `tokenizer.json`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hpclm.errors import HpclmError

KINDS = ("char", "bpe")
FILENAME = "tokenizer.json"


class Tokenizer:
    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise HpclmError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1}) "
                             f"of this {self.kind} tokenizer")
        return ids

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


class CharTokenizer(Tokenizer):
    """One token per Unicode character; ids follow code-point order (nanoGPT's `sorted(set(text))`)."""

    kind = "char"

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise HpclmError("a char tokenizer needs at least one character")
        self.vocab_size = len(self.chars)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._table = np.array(self.chars, dtype=object)

    @classmethod
    def train(cls, texts: list[str]) -> "CharTokenizer":
        chars = set()
        for t in texts:
            chars.update(t)
        return cls(chars)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, self.vocab_size - 1)] == codes
        if not known.all():
            ch = chr(int(codes[np.argmin(known)]))
            raise HpclmError(f"character {ch!r} is not in the {self.vocab_size}-character vocabulary of this tokenizer")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self._table[self.check_ids(ids)])

    def to_json(self) -> str:
        return json.dumps({"hpclm_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization): any text encodes, decode(encode(t)) == t."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BpeTokenizer":
        from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers
        if vocab_size < 257:
            raise HpclmError(f"--vocab-size {vocab_size} is too small for byte-level BPE: use at least 257 "
                             "(256 byte tokens plus merges)")
        tok = HfTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tok.encode(text).ids, dtype=np.int64)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode(self.check_ids(ids).tolist())

    def to_json(self) -> str:
        return self.tok.to_str()


def train_tokenizer(kind: str, texts: list[str], vocab_size: int = 8192) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BpeTokenizer.train(texts, vocab_size)
    raise HpclmError(f"unknown tokenizer '{kind}': use one of {', '.join(KINDS)}")


def from_json(text: str) -> Tokenizer:
    data = json.loads(text)
    if data.get("hpclm_tokenizer") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer as HfTokenizer
    return BpeTokenizer(HfTokenizer.from_str(text))


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    try:
        return from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HpclmError(f"no tokenizer at {path}: prepare the data with 'hpclm prepare'") from None
    except Exception as e:  # bad JSON, or JSON the tokenizers library rejects
        raise HpclmError(f"{path} is not a usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
