"""Discrete HMM: forward pass and E-step against enumeration of every state path, EM monotonicity,
the predictive loss, generation support, resume, and train/eval/generate end to end."""
from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import mpirun, requires_horovod, run_python
from hpclm import config
from hpclm.train import checkpoint
from hpclm.models.hmm import HMMLM
from helpers.tiny_corpus import tiny_corpus  # noqa: F401 (a fixture)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and a second OpenMP thread on a busy machine costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(V=4, K=3, seed=0) -> HMMLM:
    g = torch.Generator().manual_seed(seed)
    return HMMLM(V, states=K).randomize(torch.rand(V, generator=g, dtype=F64), g, noise=1.0)


def brute_force(model: HMMLM, obs: list[int]):
    """Sum over all K^T state paths: (P(obs), expected initial, transition, emission counts)."""
    pi, A, B = model.initial, model.transition, model.emission
    K, T = model.states, len(obs)
    total = 0.0
    init, trans, emit = torch.zeros(K, dtype=F64), torch.zeros(K, K, dtype=F64), torch.zeros(K, model.vocab_size, dtype=F64)
    for path in itertools.product(range(K), repeat=T):
        p = pi[path[0]] * B[path[0], obs[0]]
        for t in range(1, T):
            p = p * A[path[t - 1], path[t]] * B[path[t], obs[t]]
        total += p
        init[path[0]] += p
        for t in range(T):
            emit[path[t], obs[t]] += p
            if t:
                trans[path[t - 1], path[t]] += p
    return total, init / total, trans / total, emit / total


def test_forward_log_likelihood_and_expected_counts_match_enumeration():
    model = random_model()
    obs = torch.tensor([[0, 1, 3, 3, 2], [2, 2, 0, 1, 0], [3, 0, 0, 0, 1]])
    want = [brute_force(model, row.tolist()) for row in obs]
    ll = model.log_likelihood(obs, F64)
    np.testing.assert_allclose(ll.numpy(), [math.log(w[0]) for w in want], rtol=1e-13)
    np.testing.assert_allclose(model.log_likelihood(obs).numpy(), ll.numpy(), rtol=1e-5)  # float32 default
    counts = model.expected_counts(obs, batch_size=2, dtype=F64)  # two batches
    assert counts.log_likelihood.item() == pytest.approx(ll.sum().item(), rel=1e-13)
    for got, index in ((counts.initial, 1), (counts.transition, 2), (counts.emission, 3)):
        np.testing.assert_allclose(got.numpy(), sum(w[index] for w in want).numpy(), rtol=1e-11, atol=1e-14)


def test_em_never_decreases_training_likelihood():
    g = torch.Generator().manual_seed(1)
    truth = random_model(V=6, K=4, seed=5)  # sample training windows from another HMM
    obs = torch.stack([sample_path(truth, 12, g) for _ in range(40)])
    for pseudocount in (0.0, 0.5):
        model = random_model(V=6, K=4, seed=2)
        objective = []
        for _ in range(25):
            prior = model.log_prior(pseudocount)
            counts = model.expected_counts(obs, dtype=F64)
            objective.append(counts.log_likelihood.item() + prior)  # MAP-EM's objective; the likelihood at 0
            model.maximize(counts, pseudocount)
        steps = np.diff(objective)
        assert (steps >= -1e-9 * abs(objective[0])).all(), steps
        assert objective[-1] > objective[0] + 1.0  # and it does learn


def sample_path(model: HMMLM, T: int, g: torch.Generator) -> torch.Tensor:
    out, state = [], torch.multinomial(model.initial, 1, generator=g)
    for _ in range(T):
        out.append(torch.multinomial(model.emission[state[0]], 1, generator=g)[0])
        state = torch.multinomial(model.transition[state[0]], 1, generator=g)
    return torch.stack(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_e_step_matches_cpu():
    model = random_model(V=7, K=5, seed=6)
    obs = torch.randint(0, 7, (50, 16), generator=torch.Generator().manual_seed(0))
    cpu = model.expected_counts(obs).flat()
    gpu = model.to("cuda").expected_counts(obs.cuda()).flat().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-6)


def test_predictions_are_the_forward_pass_conditionals():
    model = random_model(V=5, K=3, seed=4)
    window = torch.tensor([[0, 4, 4, 1, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])
    logits, loss = model(window[:, :-1], window[:, 1:])
    np.testing.assert_allclose(logits.exp().sum(-1).numpy(), 1.0, rtol=1e-12)
    # sum_t log P(o_{t+1} | o_<=t) = log P(window) - log P(o_0)
    first = (model.initial @ model.emission)[window[:, 0]].log()
    want = -(model.log_likelihood(window, F64) - first).sum() / window[:, 1:].numel()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    last, none = model(window[:, :-1])
    assert none is None and torch.allclose(last[:, 0], logits[:, -1])


def test_generation_emits_only_tokens_the_model_can_emit():
    from hpclm.generate import sample
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 3, (30, 20), generator=g)  # tokens 3..5 of a 6-token vocabulary never occur
    model = random_model(V=6, K=4, seed=3)
    for _ in range(5):
        model.maximize(model.expected_counts(obs), pseudocount=0.0)
    assert (model.emission[:, 3:] == 0).all()
    drawn = sample(model, torch.tensor([[0, 1]]), 400, temperature=1.0, top_k=None, generator=g)[0]
    assert set(drawn.tolist()) == {0, 1, 2}


def test_resumed_em_equals_uninterrupted(tiny_corpus, tmp_path):
    from hpclm.train.classical import fit
    data, _ = tiny_corpus
    overrides = [f"data.path='{data}'", "model.arch='hmm'", "model.states=6", "model.em_tol=0.0", "data.block_size=32",
                 "train.eval_interval=0", "train.eval_iters=2", "checkpoint.every_iters=1"]
    straight = fit(config.load(None, overrides + ["train.max_iters=3"]), tmp_path / "a", progress_bar=False)
    fit(config.load(None, overrides + ["train.max_iters=2"]), tmp_path / "b", progress_bar=False)
    resumed = fit(config.load(None, overrides + ["train.max_iters=3"]), tmp_path / "b", progress_bar=False)
    assert resumed["start_step"] == 2 and resumed["step"] == straight["step"] == 3
    a = checkpoint.load(checkpoint.resolve(tmp_path / "a"), "model.pt")
    b = checkpoint.load(checkpoint.resolve(tmp_path / "b"), "model.pt")
    for name in ("initial", "transition", "emission"):
        assert torch.equal(a[name], b[name]), name
    again = fit(config.load(None, overrides + ["train.max_iters=3"]), tmp_path / "b", progress_bar=False)
    assert again["step"] == 3 and "train_time_s" not in again  # nothing left to do
    # early stop: the second iteration's gain is below a huge tolerance; a resume sees it converged
    stop = overrides + ["train.max_iters=50", "model.em_tol=10.0"]
    assert fit(config.load(None, stop), tmp_path / "c", progress_bar=False)["step"] == 2
    assert checkpoint.read_latest(tmp_path / "c") == 2
    assert "train_time_s" not in fit(config.load(None, stop), tmp_path / "c", progress_bar=False)


@requires_horovod
def test_two_ranks_sum_expected_counts_to_the_one_rank_result(tiny_corpus, tmp_path):
    from hpclm.train.classical import fit
    data, _ = tiny_corpus
    overrides = [f"data.path='{data}'", "model.arch='hmm'", "model.states=6", "model.em_tol=0.0", "data.block_size=32",
                 "train.max_iters=3", "train.eval_interval=0", "train.eval_iters=2"]
    fit(config.load(None, overrides), tmp_path / "one", progress_bar=False)
    r = mpirun(2, ["-m", "hpclm", "train", "--out", str(tmp_path / "two")] + [a for o in overrides for a in ("--set", o)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s)" in r.stdout and r.stdout.count("em iteration 3/3") == 1  # rank 0 alone prints
    a = checkpoint.load(checkpoint.resolve(tmp_path / "one"), "model.pt")
    b = checkpoint.load(checkpoint.resolve(tmp_path / "two"), "model.pt")
    for name in ("initial", "transition", "emission"):  # the same EM up to float32 summation order
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-9)
    losses = [[x["loss"] for x in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if x["kind"] == "train"] for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_config_rejects_bad_classical_settings():
    for bad, message in (("model.states=0", "model.states must be >= 1"), ("model.order=0", "model.order must be >= 1"),
                         ("model.em_tol=-1.0", "model.em_tol must be >= 0"), ("model.arch='markov'", "must be one of")):
        with pytest.raises(config.ConfigError, match=message):
            config.load(None, [bad])


def test_train_eval_generate_end_to_end(tiny_corpus, tmp_path):
    data, vocab = tiny_corpus
    out = tmp_path / "run"
    r = run_python(["-m", "hpclm", "train", "--config", "configs/hmm.toml", "--out", str(out),
                    "--set", f"data.path='{data}'", "--set", "data.block_size=32", "--set", "model.states=8",
                    "--set", "train.max_iters=4", "--set", "train.eval_interval=2", "--set", "model.em_tol=0.0"])
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"em iteration \d/4 \| train loss", r.stdout)) == 4 and "done: step 4" in r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and train[-1]["loss"] < train[0]["loss"]
    assert [x["step"] for x in records if x["kind"] == "eval"] == [2, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "4"

    r = run_python(["-m", "hpclm", "eval", "--ckpt", str(out)])
    assert r.returncode == 0, r.stderr
    loss, ppl = map(float, re.search(r"val loss ([\d.]+), perplexity ([\d.]+)", r.stdout).groups())
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3) and loss < math.log(vocab)
    # the same loss from the checkpoint's parameters with a plain forward pass: per 33-token window,
    # -(log P(window) - log P(first token)) / 32
    params = checkpoint.load(checkpoint.resolve(out), "model.pt")
    pi, A, B = (params[k].double().numpy() for k in ("initial", "transition", "emission"))
    val = np.fromfile(data / "val.bin", np.uint16)
    nll = []
    for b in range(0, ((len(val) - 1) // 32) * 32, 32):
        w = val[b:b + 33]
        alpha, log_p = pi * B[:, w[0]], 0.0
        first = math.log(alpha.sum())
        for t in range(len(w)):
            if t:
                alpha = (alpha @ A) * B[:, w[t]]
            log_p += math.log(alpha.sum())
            alpha = alpha / alpha.sum()
        nll.append(-(log_p - first) / 32)
    assert loss == pytest.approx(float(np.mean(nll)), abs=1e-4)

    r = run_python(["-m", "hpclm", "generate", "--ckpt", str(out), "--prompt", "To ", "--max-new-tokens", "60"])
    assert r.returncode == 0, r.stderr
    text = r.stdout[:-1]
    from hpclm.data.tokenizers import load
    assert text.startswith("To ") and len(text) == 63 and set(text) <= set(load(data).chars)

    r = run_python(["-m", "hpclm", "train", "--config", "configs/hmm.toml", "--out", str(out),
                    "--set", f"data.path='{data}'", "--set", "model.states=9"])
    assert r.returncode == 2 and "model.states: 8 in the checkpoint, 9 now" in r.stderr  # another model: refused
