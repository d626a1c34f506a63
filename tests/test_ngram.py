"""Interpolated Kneser-Ney n-gram model: hand-derived probabilities, a plain-Python reference,
normalization, back-off for unseen contexts, checkpoint round trip, and train/eval/generate end to end."""
from __future__ import annotations

import functools
import io
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import run_python
from hpclm.errors import HpclmError
from hpclm.models.ngram import NgramLM
from helpers.tiny_corpus import tiny_corpus  # noqa: F401 (a fixture)

A, B, C = 0, 1, 2
PAD = -1


def test_hand_checked_order3_probabilities():
    # Corpus "ababca" (a=0, b=1, c=2), order 3, fixed discount D = 0.5, V = 3.
    # Order 3 (raw counts): aba 1, bab 1, abc 1, bca 1.
    # Order 2 (continuation counts N1+(.xw)): ab 1 (only "bab": the ab at the start has no left
    #   neighbour), ba 1 (aba), bc 1 (abc), ca 1 (bca).
    # Order 1 (N1+(.w) = distinct bigrams ending in w): a 2 (ba, ca), b 1 (ab), c 1 (bc); S = 4, T = 3.
    #   P1(a) = (2-.5)/4 + .5*3/4 * 1/3 = .375 + .125 = .5;  P1(b) = P1(c) = .5/4 + .125 = .25
    # Order 2, P2(w|x) = (max(v-.5,0) + .5*T*P1(w)) / S:
    #   x=a: ab 1 (S=1,T=1): P(b|a) = .5 + .5*.25 = .625, P(a|a) = .5*.5 = .25, P(c|a) = .5*.25 = .125
    #   x=b: ba 1, bc 1 (S=2,T=2): P(a|b) = (.5 + .5) / 2 = .5, P(b|b) = .25/2 = .125, P(c|b) = (.5+.25)/2 = .375
    #   x=c: ca 1 (S=1,T=1): P(a|c) = .5 + .25 = .75, P(b|c) = P(c|c) = .125
    # Order 3, raw counts:
    #   h=ab: aba 1, abc 1 (S=2,T=2): P(a|ab) = (.5 + .5*2*P2(a|b))/2 = (.5 + .5)/2 = .5,
    #         P(c|ab) = (.5 + 1*.375)/2 = .4375, P(b|ab) = (0 + 1*.125)/2 = .0625
    #   h=ba: bab 1 (S=1,T=1): P(b|ba) = .5 + .5*.625 = .8125, P(a|ba) = .5*.25 = .125, P(c|ba) = .0625
    #   h=ca: seen only at the end (no continuation, S=0): P3(.|ca) = P2(.|a)
    #   h=cc, cb: never seen: P2(.|c), P2(.|b); no history at all: P1.
    model = NgramLM(3, order=3, discount=0.5).fit(np.array([A, B, A, B, C, A]))
    expected = {
        (PAD, PAD): [.5, .25, .25],
        (PAD, A): [.25, .625, .125], (PAD, B): [.5, .125, .375], (PAD, C): [.75, .125, .125],
        (A, B): [.5, .0625, .4375], (B, A): [.125, .8125, .0625],
        (C, A): [.25, .625, .125], (C, C): [.75, .125, .125], (C, B): [.5, .125, .375],
    }
    history = np.array(list(expected), dtype=np.int64)
    want = np.array(list(expected.values()))
    np.testing.assert_allclose(model.distributions(history), want, rtol=0, atol=1e-15)
    for w in (A, B, C):  # the targets-only path agrees entry by entry
        np.testing.assert_allclose(model.target_probs(history, np.full(len(history), w)), want[:, w], atol=1e-15)


def test_estimated_discounts_are_n1_over_n1_plus_2n2():
    # "ababca", order 3: order-3 counts 1,1,1,1 and order-2 continuation counts 1,1,1,1 -> n2 = 0,
    # D = n1/n1 = 1; order 1 continuation counts a 2, b 1, c 1 -> n1 = 2, n2 = 1, D = 2/(2+2) = 0.5.
    model = NgramLM(3, order=3).fit(np.array([A, B, A, B, C, A]))
    np.testing.assert_allclose(model.discounts, [0.5, 1.0, 1.0])
    # No count equal to 1 at some order (here all unigram counts are 2+): D falls back to 0.5.
    assert NgramLM.estimate_discount(np.array([2, 3, 2])) == 0.5


def reference_kn(tokens: list[int], vocab: int, order: int):
    """Plain-Python interpolated Kneser-Ney straight from the formulas: dicts of n-gram tuples."""
    raw = {n: Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, order + 1)}
    values = {order: raw[order]}
    for n in range(1, order):
        values[n] = Counter(g[1:] for g in raw[n + 1])  # N1+(. g): distinct left neighbours
    discount = {}
    for n, counter in values.items():
        n1 = sum(v == 1 for v in counter.values())
        n2 = sum(v == 2 for v in counter.values())
        discount[n] = n1 / (n1 + 2 * n2) if n1 else 0.5

    def prob(w: int, history: tuple) -> float:
        p = 1.0 / vocab
        for n in range(1, min(order, len(history) + 1) + 1):
            context = history[len(history) - (n - 1):] if n > 1 else ()
            row = {g[-1]: v for g, v in values[n].items() if g[:-1] == context}
            S = sum(row.values())
            if S:
                D = discount[n]
                p = (max(row.get(w, 0) - D, 0) + D * len(row) * p) / S
        return p

    return prob, [discount[n] for n in range(1, order + 1)]


@pytest.mark.parametrize("order,vocab,alphabet,length", [(4, 6, 4, 300), (2, 5, 5, 40), (5, 7, 3, 500)])
def test_matches_plain_python_reference(order, vocab, alphabet, length):
    rng = np.random.default_rng(order * 100 + length)
    # A skewed source so that counts of 1, 2 and more all occur; tokens >= alphabet never appear.
    tokens = rng.choice(alphabet, size=length, p=np.arange(1, alphabet + 1) / (alphabet * (alphabet + 1) / 2))
    model = NgramLM(vocab, order=order).fit(tokens)
    prob, discounts = reference_kn(tokens.tolist(), vocab, order)
    np.testing.assert_allclose(model.discounts, discounts, rtol=1e-12)
    histories = rng.integers(0, vocab, size=(60, order - 1))
    seen = [tokens[i:i + order - 1] for i in rng.integers(0, length - order, size=40)]  # contexts from the corpus
    histories = np.concatenate([histories, np.array(seen).reshape(-1, order - 1)])
    for row in histories[::7]:
        row[: rng.integers(0, order)] = PAD  # shorter histories: the start of a window
    got = model.distributions(histories)
    for h, dist in zip(histories, got):
        history = tuple(int(t) for t in h if t >= 0)
        np.testing.assert_allclose(dist, [prob(w, history) for w in range(vocab)], rtol=1e-12, atol=1e-15)


def test_probabilities_sum_to_one_and_are_positive_for_random_contexts():
    rng = np.random.default_rng(7)
    vocab = 50
    tokens = rng.zipf(1.5, size=20_000) % 40  # tokens 40..49 never occur in training
    model = NgramLM(vocab, order=5).fit(tokens)
    history = np.concatenate([tokens[i:i + 4][None] for i in rng.integers(0, len(tokens) - 4, 200)]
                             + [rng.integers(0, vocab, size=(300, 4))])
    history[rng.random(history.shape) < 0.1] = PAD
    dist = model.distributions(history)
    np.testing.assert_allclose(dist.sum(1), 1.0, rtol=0, atol=1e-12)
    assert (dist > 0).all()
    targets = rng.integers(0, vocab, size=len(history))
    np.testing.assert_allclose(model.target_probs(history, targets), dist[np.arange(len(history)), targets], rtol=1e-12)


def test_unseen_context_backs_off_with_nonzero_mass():
    tokens = np.array([A, B, A, B, C, A] * 5)
    model = NgramLM(5, order=3, discount=0.5).fit(tokens)  # tokens 3 and 4 never occur
    unigram = model.distributions(np.array([[PAD, PAD]]))[0]
    unseen = model.distributions(np.array([[4, 3], [3, 3], [PAD, 4]]))
    np.testing.assert_allclose(unseen, np.repeat(unigram[None], 3, 0), atol=1e-15)  # straight to order 1
    assert (unigram > 0).all() and unigram[3] == unigram[4] < unigram[C]
    # A seen token after an unseen one: the order-2 context (that token) is used, not the unigram.
    np.testing.assert_allclose(model.distributions(np.array([[4, A]]))[0], model.distributions(np.array([[PAD, A]]))[0])
    assert not np.allclose(model.distributions(np.array([[4, A]]))[0], unigram)


def test_forward_loss_checkpoint_round_trip_and_errors():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 6, size=400)
    model = NgramLM(8, order=4, block_size=16).fit(tokens)
    idx = torch.from_numpy(rng.integers(0, 8, size=(3, 10)))
    targets = torch.from_numpy(rng.integers(0, 8, size=(3, 10)))
    logits, loss = model(idx, targets)
    assert logits is None
    x = idx.numpy()  # position t of a window sees the window's tokens 0..t only
    hist = np.array([[x[b, t - k] if t - k >= 0 else PAD for k in (2, 1, 0)] for b in range(3) for t in range(10)])
    want = -np.log(model.distributions(hist)[np.arange(30), targets.numpy().reshape(-1)]).mean()
    assert loss.item() == pytest.approx(want, rel=1e-12)
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, 8)
    np.testing.assert_allclose(last[:, 0].exp().numpy(), model.distributions(hist[9::10]), rtol=1e-12)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = NgramLM(8, order=4)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(loaded.distributions(hist), model.distributions(hist))
    with pytest.raises(HpclmError, match="order-3 n-gram"):
        NgramLM(8, order=3).load_state_dict(model.state_dict())
    with pytest.raises(HpclmError, match="no counts yet"):
        NgramLM(8, order=3)(idx)
    with pytest.raises(HpclmError, match="token ids must be in 0..7"):
        NgramLM(8, order=3).fit(np.array([1, 8]))


def test_generation_emits_valid_tokens_and_follows_the_counts():
    from hpclm.generate import sample
    cycle = np.array([A, B, C] * 50)
    model = NgramLM(5, order=3, block_size=8).fit(cycle)
    out = sample(model, torch.tensor([[A, B]]), 12, temperature=1.0, top_k=1)
    assert out[0].tolist() == [A, B] + [C, A, B] * 4
    g = torch.Generator().manual_seed(0)
    drawn = sample(model, torch.tensor([[A]]), 300, temperature=1.0, top_k=None, generator=g)[0]
    assert ((drawn >= 0) & (drawn < 5)).all()
    assert (drawn[:-1].remainder(3) + 1).remainder(3).eq(drawn[1:]).float().mean() > 0.9  # mostly a -> b -> c


def test_train_eval_generate_end_to_end(tiny_corpus, tmp_path):
    data, vocab = tiny_corpus
    out = tmp_path / "run"
    r = run_python(["-m", "hpclm", "train", "--config", "configs/ngram.toml", "--out", str(out),
                    "--set", f"data.path='{data}'", "--set", "data.block_size=32", "--set", "model.order=4"])
    assert r.returncode == 0, r.stderr
    assert "counted orders 1-4" in r.stdout and "done: step 1" in r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r_["kind"] for r_ in records] == ["train", "eval"] and len(records[0]["ngrams"]) == 4
    assert (out / "checkpoints" / "latest").read_text().strip() == "1"

    r = run_python(["-m", "hpclm", "eval", "--ckpt", str(out)])
    assert r.returncode == 0, r.stderr
    m = re.search(r"val loss ([\d.]+), perplexity ([\d.]+) over ([\d,]+) tokens", r.stdout)
    loss, ppl = float(m.group(1)), float(m.group(2))
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3)
    # the loss hpclm eval prints is the plain-Python reference's over the same blocks of the val split:
    # every token after the first of each 33-token window, predicted from its last 3 tokens in the window
    from hpclm.data import load_dataset
    ds = load_dataset(data)
    prob = functools.lru_cache(maxsize=None)(reference_kn(np.asarray(ds.train).tolist(), vocab, 4)[0])
    val = np.asarray(ds.val).tolist()
    nll = [-math.log(prob(val[b + t + 1], tuple(val[max(b, b + t - 2):b + t + 1])))
           for b in range(0, ((len(val) - 1) // 32) * 32, 32) for t in range(32)]
    assert int(m.group(3).replace(",", "")) == len(nll)
    assert loss == pytest.approx(sum(nll) / len(nll), abs=1e-4)
    assert loss < math.log(vocab)

    r = run_python(["-m", "hpclm", "generate", "--ckpt", str(out), "--prompt", "The ", "--max-new-tokens", "80"])
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1]  # print's newline
    assert text.startswith("The ") and len(text) == 84 and set(text) <= set(ds.tokenizer().chars)
