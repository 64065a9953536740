"""Prometheus metrics for the HTTP APIs, correct with several gunicorn workers.

Owns the metric objects and the `/metrics` rendering. When gunicorn runs more than
one worker, the supervisor points PROMETHEUS_MULTIPROC_DIR at an empty directory
before the workers start; each worker then writes its samples there and a scrape
merges them (prometheus_client multiprocess mode). Labels stay low-cardinality:
route names and status classes, never request ids. Must not import jax.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("swarm_http_requests_total", "HTTP requests answered", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "swarm_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("swarm_prompt_tokens_total", "Prompt tokens processed", ["route"])
GENERATION_TOKENS = Counter("swarm_generation_tokens_total", "Tokens generated", ["route"])
TIME_TO_FIRST_TOKEN = Histogram(
    "swarm_time_to_first_token_seconds",
    "Request start to first generated token",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "swarm_inter_token_latency_seconds", "Time between generated tokens", ["route"], buckets=LATENCY_BUCKETS
)
STREAMS_OPEN = Gauge(
    "swarm_requests_running", "Generations being streamed right now", ["route"], multiprocess_mode="livesum"
)
NODE_QUEUE = Gauge(
    "swarm_node_requests", "Generations in the node, by state", ["state"], multiprocess_mode="max"
)


class GenerationTracker:
    """Times one generation: call token() per generated token, finish() once."""

    def __init__(self, route: str):
        self.route = route
        self.started = time.perf_counter()
        self.last_token: float | None = None
        self.finished = False
        STREAMS_OPEN.labels(route).inc()

    def token(self) -> None:
        now = time.perf_counter()
        if self.last_token is None:
            TIME_TO_FIRST_TOKEN.labels(self.route).observe(now - self.started)
        else:
            INTER_TOKEN_LATENCY.labels(self.route).observe(now - self.last_token)
        self.last_token = now

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.finished:
            return
        self.finished = True
        STREAMS_OPEN.labels(self.route).dec()
        PROMPT_TOKENS.labels(self.route).inc(prompt_tokens)
        GENERATION_TOKENS.labels(self.route).inc(completion_tokens)

    def abandon(self) -> None:
        """The stream ended without a result (error or disconnect)."""
        if not self.finished:
            self.finished = True
            STREAMS_OPEN.labels(self.route).dec()


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape (merged across workers when multiprocess)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def worker_exit(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
