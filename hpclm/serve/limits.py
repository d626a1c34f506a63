"""Per-client rate limits: token buckets on requests per second and on generated tokens per minute."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


class TokenBucket:
    """Holds up to `capacity` units and refills at `rate` units per second; starts full."""

    def __init__(self, rate: float, capacity: float, clock=time.monotonic):
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.level, self.stamp = capacity, clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float) -> float:
        """Take n units and return 0, or take nothing and return the seconds until n units are there."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + n)

    def remaining(self) -> int:
        self._refill()
        return max(0, math.floor(self.level))

    def seconds_to_full(self) -> float:
        self._refill()
        return (self.capacity - self.level) / self.rate

    @property
    def full(self) -> bool:
        self._refill()
        return self.level >= self.capacity


def duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Verdict:
    retry_after: float  # 0: admitted
    limit: str  # "requests" or "tokens": the limit that refused
    headers: dict[str, str]


class ClientLimits:
    """The buckets of every client seen, each client's created on its first request. Thread-safe: the event
    loop admits, the scheduler thread refunds."""

    MAX_CLIENTS = 10_000  # beyond, idle (full) buckets are forgotten: they hold nothing a new one would not

    def __init__(self, requests_per_s: float, requests_burst: int, tokens_per_min: int, clock=time.monotonic):
        self.requests_per_s, self.tokens_per_min, self.clock = requests_per_s, tokens_per_min, clock
        self.requests_burst = requests_burst or max(1, math.floor(requests_per_s))
        self.clients: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}
        self.lock = threading.Lock()

    def _buckets(self, client: str):
        if client not in self.clients:
            if len(self.clients) >= self.MAX_CLIENTS:
                self.clients = {k: b for k, b in self.clients.items() if not all(x is None or x.full for x in b)}
            self.clients[client] = (
                TokenBucket(self.requests_per_s, self.requests_burst, self.clock) if self.requests_per_s else None,
                TokenBucket(self.tokens_per_min / 60.0, self.tokens_per_min, self.clock) if self.tokens_per_min else None)
        return self.clients[client]

    def _headers(self, client: str) -> dict[str, str]:
        requests, tokens = self._buckets(client)
        out = {}
        if requests:
            out.update({"x-ratelimit-limit-requests": str(self.requests_burst),
                        "x-ratelimit-remaining-requests": str(requests.remaining()),
                        "x-ratelimit-reset-requests": duration(requests.seconds_to_full())})
        if tokens:
            out.update({"x-ratelimit-limit-tokens": str(self.tokens_per_min),
                        "x-ratelimit-remaining-tokens": str(tokens.remaining()),
                        "x-ratelimit-reset-tokens": duration(tokens.seconds_to_full())})
        return out

    def admit(self, client: str, max_tokens: int) -> Verdict:
        """Take one request and max_tokens generated tokens from the client's buckets, or neither."""
        with self.lock:
            requests, tokens = self._buckets(client)
            wait = requests.take(1) if requests else 0.0
            if wait:
                return Verdict(wait, "requests", self._headers(client))
            wait = tokens.take(max_tokens) if tokens else 0.0
            if wait:
                requests and requests.give_back(1)
                return Verdict(wait, "tokens", self._headers(client))
            return Verdict(0.0, "", self._headers(client))

    def refund(self, client: str, unused_tokens: int) -> None:
        """Give back the tokens a finished request held but did not generate."""
        with self.lock:
            tokens = self._buckets(client)[1]
            if tokens and unused_tokens > 0:
                tokens.give_back(unused_tokens)
