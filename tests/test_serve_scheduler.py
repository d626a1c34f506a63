"""hpclm serve's scheduler and rate limits in-process (no HTTP): every arch batched, admission, buckets."""
from __future__ import annotations

import threading

import pytest
import torch

from hpclm.infer import SamplingParams, generate_ids
from hpclm.serve.config import ServeConfig
from hpclm.serve.limits import ClientLimits, duration
from hpclm.serve.metrics import ServeMetrics
from hpclm.serve.scheduler import Completion, Finished, Piece, Rejected, Scheduler
from test_infer import MODELS


class _Chars:
    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)


def _completion(prompt, max_tokens, events, done, temperature=0.0, seed=0, timeout_s=60.0):
    def emit(event):
        events.append(event)
        if isinstance(event, Finished):
            done.release()
    return Completion(prompt, max_tokens, SamplingParams(temperature), seed, (), timeout_s, emit)


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_arch_batched_gives_each_sequence_its_own_tokens(arch):
    model = MODELS[arch]
    sched = Scheduler(model, _Chars(), ServeConfig(max_running=3, max_prefill_tokens=4), ServeMetrics("m"))
    sched.start()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    runs, done = [], threading.Semaphore(0)
    try:
        for i, p in enumerate(prompts):  # one greedy, two seeded samples, decoded together
            runs.append([])
            sched.submit(_completion(p, 8, runs[-1], done, temperature=0.0 if i == 0 else 1.0, seed=i))
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        sched.stop()
    for i, (p, events) in enumerate(zip(prompts, runs)):
        params = SamplingParams(0.0 if i == 0 else 1.0)
        want = generate_ids(model, p, 8, params, torch.Generator().manual_seed(i))[len(p):]
        text = "".join(e.text for e in events if isinstance(e, Piece))
        assert text == _Chars().decode(want) and events[-1].reason == "length", (arch, i)
        assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (len(p), 8)


def test_admission_bounds_the_queue_and_drain_refuses():
    cfg = ServeConfig(max_running=1, max_queued=2, max_queued_tokens=12)
    sched = Scheduler(MODELS["ngram"], _Chars(), cfg, ServeMetrics("m"))  # not started: requests stay queued
    done = threading.Semaphore(0)
    sched.submit(_completion([1] * 8, 2, [], done))
    with pytest.raises(Rejected, match="prompt tokens queued") as full:  # 8 + 5 > max_queued_tokens 12
        sched.submit(_completion([1] * 5, 2, [], done))
    assert full.value.status == 429 and full.value.reason == "queue_full" and full.value.retry_after >= 1
    sched.submit(_completion([1] * 2, 2, [], done))
    sched.submit(_completion([1], 2, [], done))  # 3 waiting: max_queued 2 + the 1 free slot
    with pytest.raises(Rejected, match="requests queued"):
        sched.submit(_completion([1], 2, [], done))
    sched.begin_drain()
    with pytest.raises(Rejected) as draining:
        sched.submit(_completion([1], 2, [], done))
    assert draining.value.status == 503
    sched.start()
    assert sched.wait_idle(60)  # what was admitted still finishes
    sched.stop()
    assert all(done.acquire(timeout=0) for _ in range(3))


def test_buckets_refuse_with_retry_after_and_refill():
    now = [0.0]
    limits = ClientLimits(requests_per_s=1.0, requests_burst=2, tokens_per_min=120, clock=lambda: now[0])
    assert limits.admit("a", 50).retry_after == 0 and limits.admit("a", 50).retry_after == 0
    refused = limits.admit("a", 1)  # the request burst of 2 is used
    assert refused.limit == "requests" and refused.retry_after == pytest.approx(1.0)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert limits.admit("b", 100).retry_after == 0  # another client has its own buckets
    now[0] = 1.0
    tokens = limits.admit("a", 50)  # a request is back, but 20 + 2 tokens are not 50
    assert tokens.limit == "tokens" and tokens.retry_after == pytest.approx((50 - 22) / 2)
    assert tokens.headers["x-ratelimit-remaining-requests"] == "1"  # the refused request was given back
    limits.refund("a", 40)  # a finished request generated 10 of its 50
    assert limits.admit("a", 50).retry_after == 0
    assert tokens.headers["x-ratelimit-limit-tokens"] == "120"
    assert (duration(0.25), duration(1.2), duration(61)) == ("250ms", "2s", "1m1s")
