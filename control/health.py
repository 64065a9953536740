"""Health probes and the Prometheus scrape: `/health`, `/health/ready`, `/health/state`,
`/metrics`.

`/health` says only that this worker answers: it never touches the node, so it stays
instant while generations stream. `/health/ready` asks the node, with a short timeout
of its own, whether the model is loaded. `/metrics` renders control.metrics, first
refreshing the node's queue gauge when the node answers quickly. Auth for these
routes is decided in control.middleware. Must not import jax.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

# control.app imports this module: reach its accessors through the module, at call time.
from control import app as application
from control import metrics
from control.node_client import NodeClient, NodeError, NodeUnavailable

bp = Blueprint("health", __name__)

READY_TIMEOUT_S = 2.0
METRICS_TIMEOUT_S = 0.5
RETRY_AFTER_S = 5


def _prober(timeout_s: float) -> NodeClient:
    """A node client that gives up after `timeout_s`: the app's own client waits as long
    as a generation may take; a probe must not."""
    return NodeClient(
        application.node().socket_path, connect_timeout_s=timeout_s, request_timeout_s=timeout_s
    )


def _probe(timeout_s: float) -> dict[str, Any]:
    """The node's health answer, asked on a client that gives up after `timeout_s`."""
    return _prober(timeout_s).health()


@bp.get("/health")
def health() -> Response:
    return jsonify({"status": "ok"})


def _readiness() -> tuple[dict[str, Any], bool]:
    try:
        answer: dict[str, Any] | None = _probe(READY_TIMEOUT_S)
    except (NodeUnavailable, NodeError):
        answer = None
    model_ready = answer is not None and answer.get("state") == "ready"
    body = {
        "status": "ready" if model_ready else "not_ready",
        "subsystems": {"control": True, "node": answer is not None, "model": model_ready},
        "node": answer,
    }
    return body, model_ready


@bp.get("/health/ready")
def ready() -> Response | tuple[Response, int, dict[str, str]]:
    body, model_ready = _readiness()
    if model_ready:
        return jsonify(body)
    return jsonify(body), 503, {"Retry-After": str(RETRY_AFTER_S)}


@bp.get("/health/state")
def state() -> Response:
    """What /health/ready says, always with 200: for pages that poll while a model
    loads (a browser logs every 503 as an error)."""
    body, _ = _readiness()
    return jsonify(body)


@bp.get("/metrics")
def scrape() -> Response:
    client = _prober(METRICS_TIMEOUT_S)
    try:
        queue = client.health().get("queue") or {}
        info = client.info()
    except (NodeUnavailable, NodeError):
        queue, info = {}, None
    for state in ("active", "waiting"):
        if isinstance(queue.get(state), int | float):
            metrics.NODE_QUEUE.labels(state).set(queue[state])
    body, content_type = metrics.render(info)
    return Response(body, headers={"Content-Type": content_type})
