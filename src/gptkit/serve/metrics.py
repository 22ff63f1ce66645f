"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per server, so that two
servers in one process (tests) count apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests, tokens in and out, active and queued sequences, time to first token, inter-token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gptkit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("gptkit_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("gptkit_completion_tokens", "tokens generated", registry=r)
        self.active = Gauge("gptkit_active_sequences", "sequences in the decoding batch", registry=r)
        self.queued = Gauge("gptkit_queued_requests", "requests waiting for their first token", registry=r)
        self.ttft = Histogram(
            "gptkit_time_to_first_token_seconds", "from request to its first token", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.inter_token = Histogram(
            "gptkit_inter_token_seconds", "between two tokens of one sequence", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
