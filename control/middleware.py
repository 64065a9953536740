"""Cross-cutting HTTP behaviour of the control plane, installed by `init_app`.

Owns, in the order a request meets them: the request id (and the logging filter that
puts it on every log line), CORS preflights, API-key auth, the body-size limit, per-IP
rate limits, and on the way out the CORS, security and request-id headers, the metrics
and one access-log line. Also owns the error handlers, which answer every failure in
the route's dialect (control.errors) and never with a traceback, and `json_body()`,
the one way handlers read a JSON request body.

The rate limiter is a token bucket per client IP kept in this worker's memory: with
`api.workers` > 1 each gunicorn worker counts on its own, so a client may get up to
`workers` times the configured rate. Must not import jax.
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import threading
import time
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from control import metrics
from control.errors import ApiError, dialect_for, error_body
from control.node_client import NodeError, NodeUnavailable
from swarm.config import Config
from swarm.errors import InvalidRequestError

log = logging.getLogger("control")
access_log = logging.getLogger("control.access")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A client's id is echoed only if it is 1-128 visible ASCII characters (safe in headers and logs).
_CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

# Routes anyone may call: health probes, Claude Code's warm-up probe, the dashboard's pages.
_PUBLIC_PATHS = frozenset(
    {"/health", "/health/ready", "/health/state", "/api/hello", "/", "/admin", "/chat", "/setup"}
)
_PUBLIC_PREFIXES = ("/admin/", "/chat/", "/static/")
_API_KEY_PATH = "/api/admin/api-key"
# Paths whose responses are JSON or SSE; everything else may be an HTML page and gets a CSP.
_API_PREFIXES = ("/v1", "/mcp", "/api/", "/health", "/metrics")
_CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"

_CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
_CORS_HEADERS = (
    "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta, "
    "mcp-session-id, mcp-protocol-version, x-request-id"
)
_CORS_EXPOSED = "X-Request-Id, Retry-After, Mcp-Session-Id"

# The node's error codes, renamed to what OpenAI clients know (api-wire-formats.md §3.1).
_OPENAI_CODES = {"context_overflow": "context_length_exceeded", "unknown_model": "model_not_found"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str) -> None:
    """Root logging for a worker: one stderr handler whose lines carry the request id."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "swarm_request_ids", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.swarm_request_ids = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())


class RateLimiter:
    """Token buckets per (scope, client address): `per_minute` tokens, refilled evenly.

    In memory of one worker (see the module docstring); safe under gevent and threads.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, scope: str, client: str, per_minute: int) -> int | None:
        """None if the request may go ahead, else the seconds until it may (at least 1)."""
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > 10_000:
                self._forget_idle(now)
            tokens, updated = self._buckets.get((scope, client), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - updated) * rate)
            if tokens >= 1.0:
                self._buckets[(scope, client)] = (tokens - 1.0, now)
                return None
            self._buckets[(scope, client)] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / rate))

    def _forget_idle(self, now: float) -> None:
        # A bucket idle for a minute is full again, the same as a missing one.
        self._buckets = {key: value for key, value in self._buckets.items() if now - value[1] < 60.0}


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        parsed = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(parsed, "ipv4_mapped", None)
    return bool(parsed.is_loopback or (mapped is not None and mapped.is_loopback))


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type says; else ApiError 400.

    A body past MAX_CONTENT_LENGTH, chunked ones included, is ApiError 413.
    """
    data = request.get_data(cache=True)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # Werkzeug's limited stream ends a body without Content-Length (chunked) at the limit
    # without complaint; one more byte from the server's stream tells whether it went on.
    if (
        limit is not None
        and request.content_length is None
        and len(data) >= limit
        and request.environ["wsgi.input"].read(1)
    ):
        raise _too_large(limit)
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _settings() -> Config:
    return current_app.config["SWARM"]


def _cors_origin() -> str | None:
    """The request's Origin if it may read responses: the dashboard's own or a configured one."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    config = _settings()
    port = config.node.listen_port
    allowed = {f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"}
    allowed.update(item.rstrip("/") for item in config.api.cors_origins)
    return origin if origin in allowed or "*" in allowed else None


def _is_public() -> bool:
    path = request.path
    if path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES):
        return True
    if path == _API_KEY_PATH and request.method in ("GET", "HEAD"):
        return True  # the route itself answers loopback clients only
    return (
        path == "/metrics" and not _settings().api.metrics_auth_required and is_loopback(request.remote_addr)
    )


def _presented_keys() -> list[str]:
    """Keys the client sent: `Authorization: Bearer` (OpenAI, Anthropic 2.x) and `x-api-key` (1.x)."""
    keys = []
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        keys.append(credentials.strip())
    if request.headers.get("x-api-key"):
        keys.append(request.headers["x-api-key"].strip())
    return keys


def _check_api_key() -> None:
    presented = _presented_keys()
    if not presented:
        raise ApiError(
            401,
            "no API key given: send `Authorization: Bearer <key>` or `x-api-key: <key>` "
            "(the key is in <data_dir>/api_key)",
            code="invalid_api_key",
        )
    expected = current_app.config["API_KEY"].encode()
    # compare_digest on bytes: constant time, and no TypeError on non-ASCII input.
    if not any(hmac.compare_digest(key.encode(), expected) for key in presented):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def _check_body_size() -> None:
    # A declared length over the limit is refused before anything is read; a chunked
    # body has none, and json_body() stops it once it has read past the limit.
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and (request.content_length or 0) > limit:
        raise _too_large(limit)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is too large: the limit is {limit / 2**20:g} MB (config api.max_body_mb)",
        code="request_too_large",
    )


def _check_rate_limit() -> None:
    path = request.path
    api = _settings().api
    if path.startswith("/v1/") or path == "/v1" or path == "/mcp" or path.startswith("/mcp/"):
        scope, per_minute = "api", api.rate_limit_rpm
    elif path.startswith("/api/admin/"):
        scope, per_minute = "admin", api.rate_limit_admin_rpm
    else:
        return
    if per_minute <= 0:
        return
    limiter: RateLimiter = current_app.extensions["swarm.rate_limiter"]
    wait_s = limiter.take(scope, request.remote_addr or "unknown", per_minute)
    if wait_s is not None:
        raise ApiError(
            429,
            f"rate limit reached: {per_minute} requests per minute from one address; retry in {wait_s} s",
            code="rate_limit_exceeded",
            retry_after_s=wait_s,
        )


def _preflight() -> Response:
    response = Response(status=204)
    if _cors_origin() is not None:
        response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def _before_request() -> Response | None:
    client_id = request.headers.get("X-Request-Id", "")
    g.request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else f"req_{secrets.token_hex(12)}"
    g.started = time.perf_counter()
    REQUEST_ID.set(g.request_id)
    if request.method == "OPTIONS":
        return _preflight()
    if not _is_public():
        _check_api_key()
    _check_body_size()
    _check_rate_limit()
    return None


def _after_request(response: Response) -> Response:
    request_id = getattr(g, "request_id", None) or REQUEST_ID.get()
    response.headers["X-Request-Id"] = request_id
    if dialect_for(request.path) == "anthropic":
        response.headers["request-id"] = request_id  # what the anthropic SDK's `_request_id` reads
    origin = _cors_origin()
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
    response.vary.add("Origin")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith(_API_PREFIXES):
        response.headers["Content-Security-Policy"] = _CONTENT_SECURITY_POLICY

    route = request.endpoint or "unknown"
    started = getattr(g, "started", time.perf_counter())
    # Time to the response headers: for a stream that is the time to its first byte.
    metrics.REQUESTS.labels(route, f"{response.status_code // 100}xx").inc()
    metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
    method, path, status = request.method, request.path, response.status_code

    def log_access() -> None:
        # Runs when the server closes the body, so a stream's line has its whole duration.
        elapsed_ms = (time.perf_counter() - started) * 1000
        access_log.info("%s %s %d %.1fms", method, path, status, elapsed_ms)
        REQUEST_ID.set("-")

    response.call_on_close(log_access)
    return response


def error_response(error: ApiError) -> Response:
    """`error` as a JSON response in the dialect of the current route."""
    body = error_body(error, request.path, getattr(g, "request_id", None))
    response = jsonify(body)
    response.status_code = error.status
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, int(error.retry_after_s)))
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    allowed = ", ".join(getattr(error, "valid_methods", None) or ())
    if status == 404:
        api_error = ApiError(404, f"Invalid URL ({request.method} {request.path}): no such route")
    elif status == 405:
        api_error = ApiError(
            405, f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
        )
    elif status == 413:
        api_error = _too_large(current_app.config.get("MAX_CONTENT_LENGTH") or 0)
    elif status == 400 and isinstance(error.__cause__, BadRequest):
        api_error = ApiError(400, "request body must be a JSON object")  # Flask's get_json failing
    else:
        api_error = ApiError(status, error.description or error.name)
    response = error_response(api_error)
    if status == 405 and allowed:
        response.headers["Allow"] = allowed
    return response


def _node_unavailable(error: NodeUnavailable) -> Response:
    message = f"the node is starting or down, retry shortly ({error})"
    return error_response(ApiError(503, message, code="node_unavailable", retry_after_s=5))


def _node_error(error: NodeError) -> Response:
    retry_after = {429: 1, 503: 5}.get(error.status)
    code = _OPENAI_CODES.get(error.code, error.code)
    return error_response(ApiError(error.status, error.message, code=code, retry_after_s=retry_after))


def _invalid_request(error: InvalidRequestError) -> Response:
    return error_response(ApiError(400, str(error), code="invalid_request"))


def _unexpected(error: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    request_id = getattr(g, "request_id", "-")
    return error_response(ApiError(500, f"internal error (request id {request_id}); see the node's log"))


def _hello() -> Response:
    """Claude Code's optional warm-up probe (HEAD/GET /api/hello) answered without a key."""
    return jsonify({"ok": True})


def init_app(app: Flask) -> None:
    app.extensions["swarm.rate_limiter"] = RateLimiter()
    # The config this process started with: keys marked restart differ from it until a restart.
    app.config.setdefault("SWARM_AT_START", app.config["SWARM"])
    app.add_url_rule("/api/hello", endpoint="hello", view_func=_hello, methods=["GET"])
    app.before_request(_before_request)
    app.after_request(_after_request)
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(NodeUnavailable, _node_unavailable)
    app.register_error_handler(NodeError, _node_error)
    app.register_error_handler(InvalidRequestError, _invalid_request)
    app.register_error_handler(Exception, _unexpected)
