"""The server's Prometheus metrics (vLLM's names, prefixed hpclm_serve_), in a registry of their own."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)


class ServeMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(f"hpclm_serve_{name}", doc, ["model_name"], registry=r).labels(**labels)

        def histogram(name, doc):
            return Histogram(f"hpclm_serve_{name}", doc, ["model_name"], buckets=LATENCY_BUCKETS,
                             registry=r).labels(**labels)

        def counter(name, doc):
            return Counter(f"hpclm_serve_{name}", doc, ["model_name"], registry=r).labels(**labels)

        self.running = gauge("num_requests_running", "Requests holding a decoding slot")
        self.waiting = gauge("num_requests_waiting", "Admitted requests waiting for a slot")
        self.rejected = Counter("hpclm_serve_requests_rejected", "Requests refused, by reason",
                                ["model_name", "reason"], registry=r)
        self.finished = Counter("hpclm_serve_requests_finished", "Requests answered, by finish reason",
                                ["model_name", "finish_reason"], registry=r)
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to the first generated token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between a request's tokens")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to the last token or the error")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to a decoding slot")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.model_name = model_name

    def reject(self, reason: str) -> None:
        self.rejected.labels(model_name=self.model_name, reason=reason).inc()

    def finish(self, reason: str) -> None:
        self.finished.labels(model_name=self.model_name, finish_reason=reason).inc()

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
