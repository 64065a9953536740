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
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


class NodeCollector:
    """The node's own counters, read at scrape time from its info answer: how full the
    shared decode batch is and how many rows its steps carry, and what the prefix cache
    holds and saves. They live in the node process, so no worker keeps them."""

    def __init__(self, info: dict[str, Any] | None):
        self.models = [m for m in (info or {}).get("models", []) if isinstance(m, dict)]

    def collect(self) -> Iterator[Metric]:
        families = {
            "slots": GaugeMetricFamily(
                "swarm_batch_slots", "Rows of the shared decode batch", labels=["model"]
            ),
            "in_use": GaugeMetricFamily(
                "swarm_batch_rows_in_use", "Batch rows held by requests now", labels=["model"]
            ),
            "steps": CounterMetricFamily("swarm_batch_steps", "Batched decode calls run", labels=["model"]),
            "rows": CounterMetricFamily(
                "swarm_batch_rows",
                "Decode steps those calls carried (rows / steps = mean batch)",
                labels=["model"],
            ),
            "bytes": GaugeMetricFamily(
                "swarm_prefix_cache_bytes", "Keys and values the prefix cache holds", labels=["model"]
            ),
            "hits": CounterMetricFamily(
                "swarm_prefix_cache_hits", "Prompts that reused cached prefix blocks", labels=["model"]
            ),
            "misses": CounterMetricFamily(
                "swarm_prefix_cache_misses", "Prompts that found no cached prefix", labels=["model"]
            ),
            "reused_tokens": CounterMetricFamily(
                "swarm_prefix_cache_reused_tokens", "Prompt tokens not computed again", labels=["model"]
            ),
        }
        for model in self.models:
            label = [str(model.get("id", ""))]
            for section, names in (
                ("batch", ("slots", "in_use", "steps", "rows")),
                ("prefix_cache", ("bytes", "hits", "misses", "reused_tokens")),
            ):
                values = model.get(section)
                if not isinstance(values, dict):
                    continue
                for name in names:
                    if isinstance(values.get(name), int | float):
                        families[name].add_metric(label, values[name])
        yield from (family for family in families.values() if family.samples)


def render(node_info: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """The exposition text for a scrape (merged across workers when multiprocess), with
    the node's own counters from `node_info` (its info answer; None when it is down)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    node = CollectorRegistry()
    node.register(NodeCollector(node_info))
    return generate_latest(registry) + generate_latest(node), CONTENT_TYPE_LATEST


def worker_exit(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
