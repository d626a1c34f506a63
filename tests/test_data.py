"""hpclm prepare: sources, both tokenizers' round trip, the split, and one-line errors that overwrite nothing."""
import json

import numpy as np
import torch
import pytest

from hpclm import cli, data
from hpclm.data import corpus, tokenizers as tokenizer
from hpclm.errors import HpclmError
from helpers.lm_fixtures import SHAKESPEARE, requires_shakespeare, shakespeare_dir  # noqa: F401 (fixture)

UNICODE = "naïve café — 東京 🚀\ttabs\r\nwindows line\n\n  indented\x0bodd\n"


def _all_tokens(d):
    meta = json.loads((d / "meta.json").read_text())
    parts = [np.fromfile(d / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    return meta, parts


@requires_shakespeare
def test_char_round_trip_and_nanogpt_split(shakespeare_dir):
    meta, (train, val) = _all_tokens(shakespeare_dir)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert (meta["vocab_size"], meta["dtype"], len(train), len(val)) == (65, "uint16", 1003854, 111540)  # nanoGPT's
    assert meta["source_sha256"] == corpus.SHAKESPEARE_SHA256
    tok = tokenizer.load(shakespeare_dir)
    assert tok.decode(np.concatenate([train, val])) == text
    assert tok.decode(train) == text[:1003854]
    assert "".join(tok.chars) == "".join(sorted(set(text)))  # nanoGPT's stoi order


def test_bpe_round_trip(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20 + UNICODE * 5)
    (corpus / "b.md").write_text("def f(x):\n    return x ** 2  # square\n" * 50)
    out = tmp_path / "bpe"
    meta = data.prepare(str(corpus), out, kind="bpe", vocab_size=300, log=lambda *_: None)
    assert meta["tokenizer"] == "bpe" and 256 < meta["vocab_size"] <= 300
    meta, (train, val) = _all_tokens(out)
    tok = tokenizer.load(out)
    expected = ((corpus / "a.txt").read_bytes() + (corpus / "b.md").read_bytes()).decode()  # \r\n kept
    assert tok.decode(np.concatenate([train, val])) == expected
    assert tok.decode(tok.encode(UNICODE + "unseen ∑ symbols")) == UNICODE + "unseen ∑ symbols"
    assert len(train) == int((len(train) + len(val)) * 0.9)


def test_char_tokenizer_round_trip_and_errors():
    tok = tokenizer.CharTokenizer(UNICODE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tokenizer.from_json(tok.to_json()).decode(tok.encode(UNICODE)) == UNICODE
    with pytest.raises(HpclmError, match="character 'Z' is not in the"):
        tok.encode("Z")
    with pytest.raises(HpclmError, match=r"token id 999 is outside the vocabulary \(0\.\."):
        tok.decode([0, 999])


def test_directory_and_glob_sources_skip_binary_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("first file, no newline at the end")
    (src / "sub" / "two.txt").write_text("second file\n")
    (src / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (src / ".hidden").write_text("never read\n")
    c = data.read_corpus(str(src))
    assert c.text == "first file, no newline at the end\nsecond file\n"
    assert [p.endswith("blob.bin") for p in c.skipped] == [True]
    g = data.read_corpus(str(src / "**" / "*.txt"))
    assert g.text == c.text


def test_stdlib_corpus_is_library_sources():
    files = corpus.stdlib_files()
    assert {"os.py", "argparse.py", "__init__.py"} <= {p.name for p in files} and len(files) > 100
    assert all(p.suffix == ".py" and "test" not in p.parts and "site-packages" not in p.parts for p in files)


def _prepare_cli(*argv):
    return cli.main(["prepare", *map(str, argv)])


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "does not exist: give a text file, a directory, a glob, 'stdlib' or 'shakespeare'"),
    (lambda d: (d / "empty.txt").write_text("  \n") and d / "empty.txt", "is empty"),
    (lambda d: (d / "x.bin").write_bytes(b"text\x00more") and d / "x.bin", "is binary (NUL byte at offset 4)"),
    (lambda d: (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1")) and d / "latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (lambda d: (d / "dir").mkdir() or (d / "dir" / "z.bin").write_bytes(b"\x00") and d / "dir", "has no UTF-8 text files (1 binary"),
    (lambda d: (d / "short.txt").write_text("abc") and d / "short.txt", "too few for a train and a validation split"),
    (lambda d: str(d / "nothing-*.txt"), "matches no files"),
])
def test_bad_corpus_is_one_line_error(tmp_path, capsys, make, message):
    src = make(tmp_path)
    assert _prepare_cli(src, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_shakespeare_hash_is_checked(tmp_path, capsys):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare\n" * 100)
    assert _prepare_cli("shakespeare", "--from", fake, "--out", tmp_path / "out") == 2
    assert "is not Tiny Shakespeare: SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_forced(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 200)
    out = tmp_path / "out"
    assert _prepare_cli(src, "--out", out) == 0

    def files():  # contents, and the inodes and times a rewrite would change
        return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in [out, *out.iterdir()]
                if p.is_file()} | {".": (out.stat().st_ino,)}
    first = files()
    assert _prepare_cli(src, "--out", out) == 0  # same source and options: up to date
    assert "is up to date" in capsys.readouterr().out
    assert files() == first  # nothing was written again
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src.write_text("another corpus entirely! " * 200)
    assert _prepare_cli(src, "--out", out) == 2
    assert "already holds a dataset prepared from another source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _prepare_cli(src, "--out", out, "--force") == 0
    assert tokenizer.load(out).decode(np.fromfile(out / "train.bin", np.uint16)).startswith("another corpus")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]  # no temporary folders left


def test_loading_rejects_bad_datasets(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefgh" * 100)
    out = tmp_path / "d"
    data.prepare(str(src), out, log=lambda *_: None)
    assert data.load_dataset(out, block_size=64).vocab_size == 8
    with pytest.raises(HpclmError, match="the val split of .* has 80 tokens, shorter than one block"):
        data.load_dataset(out, block_size=80)
    train = np.fromfile(out / "train.bin", np.uint16)
    train[5] = 8  # one past the vocabulary
    train.tofile(out / "train.bin")
    with pytest.raises(HpclmError, match=r"holds token id 8, outside the vocabulary \(0\.\.7\)"):
        data.load_dataset(out)
    train[5] = 0
    train.tofile(out / "train.bin")
    (out / "val.bin").write_bytes(b"\x00\x00")
    with pytest.raises(HpclmError, match="has 2 bytes but meta.json says 80 uint16 tokens"):
        data.load_dataset(out)
    with pytest.raises(HpclmError, match="has no meta.json: create it with 'hpclm prepare SOURCE --out"):
        data.load_dataset(tmp_path)


def test_batches_are_a_function_of_seed_stream_rank_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = data.get_batch(tokens, 4, 16, data.batch_rng(1, "train", 0, 7))
    x2, y2 = data.get_batch(tokens, 4, 16, data.batch_rng(1, "train", 0, 7))
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (y1[:, :-1] == x1[:, 1:]).all() and (y1[:, -1] == x1[:, -1] + 1).all()
    other_rank, _ = data.get_batch(tokens, 4, 16, data.batch_rng(1, "train", 1, 7))
    other_step, _ = data.get_batch(tokens, 4, 16, data.batch_rng(1, "train", 0, 8))
    assert not (x1 == other_rank).all() and not (x1 == other_step).all()


def test_training_samples_are_a_function_of_seed_and_global_index_alone():
    tokens = np.arange(1000, dtype=np.uint16)
    whole, _ = data.get_samples(tokens, 7, np.arange(8), 16)
    halves = [data.get_samples(tokens, 7, np.arange(4) + k, 16)[0] for k in (0, 4)]  # two ranks' shares
    assert torch.equal(whole, torch.cat(halves))
    assert not torch.equal(whole, data.get_samples(tokens, 8, np.arange(8), 16)[0])  # the seed matters
    starts = data.batches.sample_starts(7, np.arange(20000), 984)
    assert starts.min() >= 0 and starts.max() < 984
    counts = np.bincount(starts // 123, minlength=8)  # 8 bins of the span: near 2500 each
    assert counts.min() > 2200 and counts.max() < 2800, counts


def test_token_dtype_fits_the_vocabulary():
    assert data.token_dtype(65) is np.uint16 and data.token_dtype(65536) is np.uint16
    assert data.token_dtype(65537) is np.uint32


def test_shakespeare_download_is_checked(tmp_path, monkeypatch, capsys):
    import io
    import urllib.error

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    assert _prepare_cli("shakespeare", "--out", tmp_path / "a") == 2
    assert f"cannot download {corpus.SHAKESPEARE_URL}" in capsys.readouterr().err and not (tmp_path / "a").exists()
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered text\n" * 100))
    assert _prepare_cli("shakespeare", "--out", tmp_path / "b") == 2
    assert f"{corpus.SHAKESPEARE_URL} is not Tiny Shakespeare" in capsys.readouterr().err
    if SHAKESPEARE.is_file():
        monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(SHAKESPEARE.read_bytes()))
        assert _prepare_cli("shakespeare", "--out", tmp_path / "c") == 0
        assert json.loads((tmp_path / "c" / "meta.json").read_text())["train_tokens"] == 1003854


def test_val_fraction_sets_the_split_and_is_bounded(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 1000)  # 10,000 characters
    assert _prepare_cli(src, "--out", tmp_path / "quarter", "--val-fraction", "0.25") == 0
    meta, (train, val) = _all_tokens(tmp_path / "quarter")
    assert (len(train), len(val), meta["val_fraction"]) == (7500, 2500, 0.25)
    assert tokenizer.load(tmp_path / "quarter").decode(val) == ("abcdefghij" * 1000)[7500:]  # the last quarter
    for bad in ("0", "1", "-0.1", "nan"):
        assert _prepare_cli(src, "--out", tmp_path / "bad", "--val-fraction", bad) == 2
        assert "--val-fraction must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bpe_vocabulary_starts_at_257(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text(UNICODE * 200)
    assert _prepare_cli(src, "--out", tmp_path / "small", "--tokenizer", "bpe", "--vocab-size", "256") == 2
    assert "--vocab-size 256 is too small for byte-level BPE: use at least 257" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()
    assert _prepare_cli(src, "--out", tmp_path / "least", "--tokenizer", "bpe", "--vocab-size", "257") == 0
    meta, parts = _all_tokens(tmp_path / "least")
    assert meta["vocab_size"] <= 257 and tokenizer.load(tmp_path / "least").decode(np.concatenate(parts)) == UNICODE * 200


def test_a_vocabulary_over_65536_is_stored_as_uint32_and_trains(tmp_path, capsys):
    """70,000 distinct characters (planes 1 and 2): token ids past uint16's range survive prepare, the
    loader, training and sampling."""
    rng = np.random.default_rng(0)
    chars = [chr(0x10000 + i) for i in range(70_000)]
    text = "".join(chars[i] for i in np.concatenate([rng.permutation(70_000), rng.permutation(70_000)]))
    src = tmp_path / "wide.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "wide"
    assert _prepare_cli(src, "--out", out) == 0
    meta, (train, val) = _all_tokens(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 and train.max() >= 65_536
    assert tokenizer.load(out).decode(np.concatenate([train, val])) == text
    dataset = data.load_dataset(out, 8)
    assert np.array_equal(np.asarray(dataset.val), val)  # the loader reads them as uint32 too
    run = tmp_path / "run"
    sets = ["model.n_layer=1", "model.n_head=1", "model.n_embd=8", "data.block_size=8", "train.batch_size=2",
            "train.max_iters=2", "train.eval_interval=0", "train.eval_iters=1"]
    assert cli.main(["train", "--out", str(run), "--set", f"data.path={json.dumps(str(out))}",
                     *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", str(run), "--max-new-tokens", "20", "--prompt", chars[69_999]]) == 0
    sample = capsys.readouterr().out[:-1]
    assert len(sample) == 21 and set(sample) <= set(chars)
