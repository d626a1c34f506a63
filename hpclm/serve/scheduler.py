"""The scheduler loop: one thread owns the model and batches every running sequence (continuous batching).

Each step it admits waiting requests into free slots, decodes one token for every sequence past its
prompt (one batched call), then feeds prompts up to max_prefill_tokens (chunked, so a long prompt does
not stall the running streams), and ends sequences at once when they stop, reach max_tokens, pass
their deadline or lose their client. Requests learn what happened through their `emit` callback.
"""
from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hpclm.infer import SamplingParams, make_decoder, next_token, next_tokens

log = logging.getLogger("hpclm.serve")


@dataclass
class Piece:
    text: str  # new completion text (may be empty when a token only ends a multi-byte character)


@dataclass
class Finished:
    reason: str  # stop | length | timeout | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion
    error: str = ""


class Rejected(Exception):
    """A request the scheduler does not take: status 429 (full) or 503 (draining)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class TextStream:
    """A completion's text as tokens arrive: the part safe to send (never the start of a stop string that
    may still complete, nor a partly decoded character), and where a stop string cut it."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.clean = 0  # ids before this index decode to whole characters: self.stable
        self.stable = ""
        self.sent = 0
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the completion)."""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.clean:])  # only the ids since the last whole character
        text = self.stable + tail
        if not tail.endswith("\ufffd"):
            self.stable, self.clean = text, len(self.ids)
        cuts = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if cuts:
            self.text = text[:min(cuts)]
            return self._advance(len(self.text)), True
        self.text = text
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        return self._advance(len(text) - hold), False

    def flush(self) -> str:
        return self._advance(len(self.text))

    def _advance(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


@dataclass(eq=False)
class Completion:
    """One request in the scheduler: what it asks, and where it is."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop: tuple[str, ...]
    timeout_s: float
    emit: Callable[[Piece | Finished], None]  # called from the scheduler thread; must not block
    on_finish: Callable[["Completion"], None] = lambda c: None
    arrival: float = field(default_factory=time.monotonic)
    slot: int = -1
    fed: int = 0  # prompt tokens prefilled
    output: list[int] = field(default_factory=list)
    pending: int | None = None  # the last token sampled, fed at the next decode step
    generator: torch.Generator | None = None  # seeded when the prompt is in: sampling sees only this request's draws
    text: TextStream | None = None
    cancelled: bool = False
    done: bool = False
    last_token_at: float = 0.0

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s


class Scheduler:
    def __init__(self, model, tokenizer, cfg, metrics):
        self.tokenizer, self.cfg, self.metrics = tokenizer, cfg, metrics
        self.decoder = make_decoder(model, cfg.max_running)
        self.max_length = self.decoder.max_length
        self.free_slots = list(range(cfg.max_running))
        self.waiting: collections.deque[Completion] = collections.deque()
        self.waiting_tokens = 0
        self.running: list[Completion] = []
        self.cond = threading.Condition()
        self.draining = self.stopped = False
        self.recent_e2e = collections.deque(maxlen=64)  # seconds, for Retry-After estimates
        self.started, self.ended = threading.Event(), threading.Event()

    def run(self) -> None:
        """The scheduler loop on the calling thread, until stop()."""
        self.started.set()
        try:
            self._loop()
        finally:
            self.ended.set()

    def start(self) -> None:
        """The scheduler loop on a thread of its own."""
        threading.Thread(target=self.run, name="hpclm-scheduler", daemon=True).start()

    # --- called from the server's threads ------------------------------------------------------------

    def alive(self) -> bool:
        return self.started.is_set() and not self.ended.is_set()

    def submit(self, c: Completion) -> None:
        """Queue c, or raise Rejected when draining or full."""
        with self.cond:
            if self.draining or self.stopped:
                self.metrics.reject("draining")
                raise Rejected(503, "draining", "the server is shutting down and takes no new requests; "
                               "send this one to another replica")
            room = self.cfg.max_queued + len(self.free_slots)
            over_tokens = self.waiting and self.waiting_tokens + len(c.prompt) > self.cfg.max_queued_tokens
            if len(self.waiting) >= room or over_tokens:
                self.metrics.reject("queue_full")
                what = "prompt tokens" if over_tokens else "requests"
                raise Rejected(429, "queue_full", f"the server is at capacity ({what} queued): retry after the "
                               "Retry-After seconds", self._retry_after())
            self.waiting.append(c)
            self.waiting_tokens += len(c.prompt)
            self.metrics.waiting.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, c: Completion) -> None:
        """The client went away: c ends at the next step and frees its slot."""
        with self.cond:
            c.cancelled = True
            self.cond.notify()

    def begin_drain(self) -> None:
        with self.cond:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is waiting or running (True), or timeout seconds pass (False)."""
        end = time.monotonic() + timeout
        with self.cond:
            while self.waiting or self.running:
                left = end - time.monotonic()
                if left <= 0 or self.ended.is_set():
                    return False
                self.cond.wait(min(left, 0.05))
            return True

    def stop(self, message: str = "the server is shutting down") -> None:
        """End every request still admitted with an error, then stop the loop."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.started.is_set():
            self.ended.wait(timeout=30)
        with self.cond:
            ended, self.waiting, self.waiting_tokens = [*self.waiting, *self.running], collections.deque(), 0
            for c in ended:
                self._finish(c, "error", message)
            self.metrics.waiting.set(0)

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the recent mean request time x the queue ahead per slot."""
        mean = sum(self.recent_e2e) / len(self.recent_e2e) if self.recent_e2e else 1.0
        return min(60.0, max(1.0, mean * (len(self.waiting) + 1) / self.cfg.max_running))

    # --- the scheduler loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.cfg.threads:  # OpenMP's thread count is per calling thread: this one runs the model
            torch.set_num_threads(self.cfg.threads)
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.stopped):
                    self.cond.wait()
                if self.stopped:
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # a failed step ends its sequences with an error; the server goes on
                log.exception("scheduler step failed")
                with self.cond:
                    for c in list(self.running):
                        self._finish(c, "error", f"generation failed: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.waiting if c.cancelled or now > c.deadline]:
            self.waiting.remove(c)
            self.waiting_tokens -= len(c.prompt)
            self._finish(c, "cancelled" if c.cancelled else "timeout")
        while self.waiting and self.free_slots:
            c = self.waiting.popleft()
            self.waiting_tokens -= len(c.prompt)
            c.slot = self.free_slots.pop(0)
            self.running.append(c)
            self.metrics.queue_time.observe(now - c.arrival)
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.running.set(len(self.running))

    @torch.no_grad()
    def _step(self) -> None:
        now = time.monotonic()
        with self.cond:
            for c in [c for c in self.running if c.cancelled or now > c.deadline]:
                self._finish(c, "cancelled" if c.cancelled else "timeout")
            running = list(self.running)
        decoding = sorted((c for c in running if c.pending is not None), key=lambda c: c.slot)
        if decoding:
            logits = self.decoder.decode([c.slot for c in decoding], [c.pending for c in decoding])
            tokens = next_tokens(logits, [c.params for c in decoding], [c.generator for c in decoding])
            for c, token in zip(decoding, tokens):
                c.pending = None
                self._take(c, token)
        budget = self.cfg.max_prefill_tokens
        for c in running:
            if budget == 0:
                break
            if c.done or c.fed == len(c.prompt):
                continue
            n = min(budget, len(c.prompt) - c.fed)
            logits = self.decoder.prefill(c.slot, c.prompt[c.fed:c.fed + n])
            c.fed += n
            budget -= n
            self.metrics.prompt_tokens.inc(n)
            if c.fed == len(c.prompt):
                c.generator = torch.Generator().manual_seed(c.seed)
                c.text = TextStream(self.tokenizer, c.stop)
                self._take(c, next_token(logits, c.params, c.generator))

    def _take(self, c: Completion, token: int) -> None:
        """Record c's new token: send its text, and end c when it stops or is long enough."""
        now = time.monotonic()
        if c.output:
            self.metrics.inter_token_latency.observe(now - c.last_token_at)
        else:
            self.metrics.time_to_first_token.observe(now - c.arrival)
        c.last_token_at = now
        c.output.append(token)
        self.metrics.generation_tokens.inc()
        piece, stopped = c.text.add(token)
        if piece:
            c.emit(Piece(piece))
        if stopped or len(c.output) >= c.max_tokens:
            with self.cond:
                self._finish(c, "stop" if stopped else "length")
        else:
            c.pending = token

    def _finish(self, c: Completion, reason: str, error: str = "") -> None:
        """End c (under self.cond): free its slot, send what is left and how it ended."""
        if c.done:
            return
        c.done = True
        if c in self.running:
            self.running.remove(c)
        if c.slot >= 0:
            self.decoder.release(c.slot)
            bisect.insort(self.free_slots, c.slot)
        text = c.text
        if text is not None and reason in ("length", "stop"):
            rest = text.flush()
            if rest:
                c.emit(Piece(rest))
        e2e = time.monotonic() - c.arrival
        self.recent_e2e.append(e2e)
        self.metrics.e2e_latency.observe(e2e)
        self.metrics.finish(reason)
        self.metrics.running.set(len(self.running))
        c.emit(Finished(reason, len(c.prompt), len(c.output), text.text if text is not None else "", error))
        c.on_finish(c)
        self.cond.notify_all()
