"""MCP at /mcp: JSON-RPC 2.0 over Streamable HTTP, in both protocol eras.

Owns the transport: one JSON-RPC message per POST, answered with one plain JSON
response (fully conformant, and simplest under gunicorn), 202 for notifications,
405 for GET (a tools-only server opens no server-initiated stream), DELETE to end
a session, and Origin checks against DNS rebinding. The tools themselves live in
`control.mcp_tools`. See api-wire-formats.md §3.4 for the two eras:

- handshake era (2024-11-05 … 2025-11-25): `initialize` assigns an
  `Mcp-Session-Id`. Ids are self-validating (an HMAC keyed with the API key over
  a random part), so every gunicorn worker accepts every session without shared
  state; ended sessions are listed in a small file in the data dir that every
  worker reads.
- modern era (2026-07-28): stateless; a request is modern when its
  `params._meta` names a version, the `MCP-Protocol-Version` header names the
  modern one, or it is `server/discover`. A modern request must carry the
  `_meta` envelope and mirror it in the `MCP-Protocol-Version`, `Mcp-Method` and
  `Mcp-Name` headers; `initialize` and `ping` no longer exist there. Results
  carry `resultType`, list results `ttlMs`/`cacheScope`, and all carry the
  server info in `_meta`.

A request with neither a modern `_meta` nor a modern header (curl, handshake-era
clients) is served leniently in the handshake era, with or without a session.

Authentication is the middleware's job. Must not import jax.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

import control.app
import swarm
from control.mcp_tools import TOOLS, ToolError, call_tool

log = logging.getLogger(__name__)

bp = Blueprint("mcp_api", __name__)

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
SUPPORTED_VERSIONS = (*reversed(MODERN_VERSIONS), *reversed(HANDSHAKE_VERSIONS))  # newest first

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"

# JSON-RPC 2.0 codes, plus the 2026-07-28 transport codes.
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
HEADER_MISMATCH, UNSUPPORTED_VERSION = -32020, -32022
# 2026-07-28 maps error codes to HTTP statuses; the handshake era answers method-level
# errors with 200 and only malformed messages with 400.
MODERN_STATUS = {INVALID_PARAMS: 400, METHOD_NOT_FOUND: 404}
TRANSPORT_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, HEADER_MISMATCH: 400, UNSUPPORTED_VERSION: 400}

SERVER_INFO = {"name": "swarm", "version": swarm.__version__, "title": "swarm node"}
# Prompts and resources are declared (with empty lists) because we answer their methods:
# a server that answers prompts/list MUST declare prompts (2026-07-28 server/discover).
CAPABILITIES = {
    "tools": {"listChanged": False},
    "prompts": {"listChanged": False},
    "resources": {"listChanged": False},
}
INSTRUCTIONS = (
    "Tools for the language models this swarm node serves. Use `chat` for a conversation, "
    "`compare` to see several models answer one prompt, `research` for a synthesised answer, "
    "`batch_prompts` for many independent prompts, `delegate` to pick a model by tier (fast, "
    "cheap, smart), and `models` and `node_info` to see what is served and how the node is doing."
)
LIST_METHODS = ("tools/list", "resources/list", "resources/templates/list", "prompts/list", "server/discover")
EMPTY_LISTS = {
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
    "prompts/list": "prompts",
}
HANDSHAKE_ONLY_METHODS = ("initialize", "ping")  # removed in 2026-07-28
# The methods whose target the `Mcp-Name` header mirrors, and the param it mirrors.
NAMED_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ENDED_SESSIONS_FILE = "mcp_ended_sessions"
ENDED_SESSIONS_KEPT = 10_000

# Per worker: the ended-sessions file's (mtime, size) and contents when last read.
_ended_cache: dict[Path, tuple[tuple[int, int], frozenset[str]]] = {}
_ended_lock = threading.Lock()


class RpcError(Exception):
    def __init__(self, code: int, message: str, *, status: int | None = None, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.status, self.data = code, message, status, data


# --- sessions ----------------------------------------------------------------------------


def _session_tag(random_part: str) -> str:
    key = current_app.config["API_KEY"].encode()
    digest = hmac.new(key, b"swarm-mcp-session:" + random_part.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_session_id() -> str:
    """A session id any worker can verify: visible ASCII `<random>.<hmac>`."""
    random_part = secrets.token_urlsafe(18)
    return f"{random_part}.{_session_tag(random_part)}"


def session_is_live(session_id: str) -> bool:
    random_part, _, tag = session_id.partition(".")
    if not random_part or not hmac.compare_digest(tag.encode(), _session_tag(random_part).encode()):
        return False
    return random_part not in _ended_sessions(_ended_path())


def end_session(session_id: str) -> None:
    """Remember `session_id` as ended in a file every worker reads, so a later request
    with it gets 404 from any worker (MCP transport spec, session management)."""
    path = _ended_path()
    with path.open("a", encoding="ascii") as ended:
        ended.write(session_id.partition(".")[0] + "\n")  # one short O_APPEND write: atomic
    lines = path.read_text(encoding="ascii").split()
    if len(lines) > ENDED_SESSIONS_KEPT:
        # Forget the oldest half; a session that old is long abandoned by its client.
        spare = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
        spare.write_text("\n".join(lines[-ENDED_SESSIONS_KEPT // 2 :]) + "\n", encoding="ascii")
        os.replace(spare, path)


def _ended_path() -> Path:
    return Path(current_app.config["DATA_DIR"]) / ENDED_SESSIONS_FILE


def _ended_sessions(path: Path) -> frozenset[str]:
    """The ended sessions' random parts, re-read only when the file has changed."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return frozenset()
    stamp = (status.st_mtime_ns, status.st_size)
    with _ended_lock:
        cached = _ended_cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    ended = frozenset(path.read_text(encoding="ascii").split())
    with _ended_lock:
        _ended_cache[path] = (stamp, ended)
    return ended


# --- HTTP --------------------------------------------------------------------------------


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status=status, headers=headers, mimetype="application/json")


def _error(error: RpcError, request_id: Any = None, *, modern: bool = False) -> Response:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    status = (
        error.status
        or TRANSPORT_STATUS.get(error.code)
        or (MODERN_STATUS.get(error.code, 200) if modern else 200)
    )
    return _json({"jsonrpc": "2.0", "id": request_id, "error": body}, status)


def origin_allowed(origin: str) -> bool:
    """Loopback origins and the configured CORS origins (MCP transport security:
    servers must validate Origin, or a rebinding DNS name could reach a local server)."""
    try:
        parts = urlsplit(origin)
        loopback = parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS and parts.port != 0
    except ValueError:  # a malformed port
        return False
    if loopback:
        return True
    allowed = {item.rstrip("/") for item in control.app.settings().api.cors_origins}
    return origin.rstrip("/") in allowed or "*" in allowed  # "*": the user opted out, as for CORS


@bp.before_request
def check_origin() -> Response | None:
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin):
        return _error(RpcError(INVALID_REQUEST, f"origin {origin!r} is not allowed", status=403))
    return None


@bp.get("/mcp")
def open_stream() -> Response:
    # A tools-only server sends nothing unprompted, so it offers no GET stream.
    error = RpcError(INVALID_REQUEST, "this server opens no event stream; POST JSON-RPC messages", status=405)
    response = _error(error)
    response.headers["Allow"] = "POST, DELETE"
    return response


@bp.delete("/mcp")
def delete_session() -> Response:
    session_id = request.headers.get(SESSION_HEADER)
    if not session_id:
        return _error(RpcError(INVALID_REQUEST, f"DELETE needs the {SESSION_HEADER} header", status=400))
    if not session_is_live(session_id):
        return _error(RpcError(INVALID_REQUEST, "unknown or ended session", status=404))
    end_session(session_id)
    return Response(status=204)


@bp.post("/mcp")
def handle_post() -> Response:
    try:
        message = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError) as error:
        return _error(RpcError(PARSE_ERROR, f"the body is not JSON: {error}"))
    if isinstance(message, list):
        return _error(RpcError(INVALID_REQUEST, "batches are not supported"))
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _error(
            RpcError(INVALID_REQUEST, 'the body must be one JSON-RPC 2.0 message ("jsonrpc": "2.0")')
        )
    if "method" not in message and ("result" in message or "error" in message):
        return Response(status=202)  # a reply to a server request; this server sends none
    request_id = message.get("id")
    is_notification = "id" not in message
    if not is_notification and (isinstance(request_id, bool) or not isinstance(request_id, str | int)):
        return _error(RpcError(INVALID_REQUEST, "id must be a string or an integer"))
    method = message.get("method")
    if not isinstance(method, str):
        return _error(RpcError(INVALID_REQUEST, "method must be a string"), request_id)
    params = message.get("params")
    params = {} if params is None else params
    modern = False
    try:
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object")
        modern = _is_modern(method, params)
        if not modern and method != "initialize":
            session_id = request.headers.get(SESSION_HEADER)
            # Clients without a session (curl) are served; a stale one is told to re-initialize.
            if session_id is not None and not session_is_live(session_id):
                raise RpcError(INVALID_REQUEST, "unknown or ended session; initialize again", status=404)
        if is_notification:
            # 2026-07-28 defines no client notifications over HTTP, but clients still post
            # them; like the reference SDK, accept them without the envelope checks.
            return Response(status=202)
        if modern:
            _check_envelope(method, params)
        result, headers = _dispatch(method, params, modern)
    except RpcError as error:
        return _error(error, request_id, modern=modern)
    return _json({"jsonrpc": "2.0", "id": request_id, "result": result}, headers=headers)


def _decode_header(value: str | None) -> str | None:
    """A 2026-07-28 header value: verbatim, or `=?base64?…?=` for non-ASCII text;
    None when absent or malformed, so it never matches a body value by accident."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    try:
        return base64.b64decode(value[9:-2], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def _header(name: str) -> str | None:
    value = request.headers.get(name)
    return None if value is None else value.strip(" \t")  # RFC 9110 §5.5: no surrounding whitespace


def _is_modern(method: str, params: dict[str, Any]) -> bool:
    """Which era a request speaks. A handshake-era request with an unknown
    `MCP-Protocol-Version` header is refused here; a modern one is checked by
    `_check_envelope`."""
    header_version = _header(VERSION_HEADER)
    meta = params.get("_meta")
    body_version = meta.get(VERSION_KEY) if isinstance(meta, dict) else None
    if body_version is not None or header_version in MODERN_VERSIONS or method == "server/discover":
        return True
    if header_version is not None and header_version not in SUPPORTED_VERSIONS:
        raise _unsupported(header_version)
    return False


def _check_envelope(method: str, params: dict[str, Any]) -> None:
    """The 2026-07-28 checks on a modern request, in the order of the reference SDK
    (`mcp.shared.inbound.classify_inbound_request`), first failure wins:

    1. `params._meta` carries the protocol version and client capabilities, else
       -32602 (basic/index "Per-request protocol fields"; client info is optional);
    2. the `MCP-Protocol-Version`, `Mcp-Method` and (for `NAMED_PARAMS` methods)
       `Mcp-Name` headers are present and mirror the body, else -32020
       HeaderMismatch (transports, "Standard request headers"); this comes before
       the version check so a client that contradicts itself is told so. (WSGI
       folds a repeated header into one comma-joined value, which cannot match.)
    3. the version is one we serve, else -32022 listing the supported ones. (A
       non-string version never gets here: it cannot equal the header.)
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        raise RpcError(
            INVALID_PARAMS,
            f"params._meta must be an object with {VERSION_KEY!r} and {CLIENT_CAPABILITIES_KEY!r}",
        )
    missing = [key for key in (VERSION_KEY, CLIENT_CAPABILITIES_KEY) if key not in meta]
    if missing:
        raise RpcError(INVALID_PARAMS, f"params._meta lacks {' and '.join(map(repr, missing))}")
    version = meta[VERSION_KEY]
    if _header(VERSION_HEADER) != version:
        raise RpcError(
            HEADER_MISMATCH, f"the {VERSION_HEADER} header must equal params._meta[{VERSION_KEY!r}]"
        )
    if _header(METHOD_HEADER) != method:
        raise RpcError(HEADER_MISMATCH, f"the {METHOD_HEADER} header must equal the method")
    named = NAMED_PARAMS.get(method)
    target = params.get(named) if named else None
    if target is not None and _decode_header(_header(NAME_HEADER)) != target:
        raise RpcError(HEADER_MISMATCH, f"the {NAME_HEADER} header must equal params.{named}")
    if version not in MODERN_VERSIONS:
        raise _unsupported(version)


def _unsupported(version: Any) -> RpcError:
    data = {"supported": list(SUPPORTED_VERSIONS), "requested": str(version)}
    return RpcError(UNSUPPORTED_VERSION, f"unsupported protocol version {version!r}", data=data)


# --- methods -----------------------------------------------------------------------------


def _dispatch(method: str, params: dict[str, Any], modern: bool) -> tuple[dict[str, Any], dict[str, str]]:
    headers: dict[str, str] = {}
    if modern and method in HANDSHAKE_ONLY_METHODS:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method} (removed in {MODERN_VERSIONS[-1]})")
    if method == "initialize":
        requested = params.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        headers[SESSION_HEADER] = new_session_id()
        result = {
            "protocolVersion": version,
            "capabilities": CAPABILITIES,
            "serverInfo": SERVER_INFO,
            "instructions": INSTRUCTIONS,
        }
        return result, headers
    if method == "server/discover":
        result = {
            "supportedVersions": list(SUPPORTED_VERSIONS),
            "capabilities": CAPABILITIES,
            "instructions": INSTRUCTIONS,
        }
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": [tool.describe() for tool in TOOLS.values()]}
    elif method == "tools/call":
        result = _call(params)
    elif method in EMPTY_LISTS:
        result = {EMPTY_LISTS[method]: []}
    elif method in ("resources/read", "prompts/get"):
        _unknown_target(method, params)
    else:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
    if modern:
        result = {**result, "resultType": "complete", "_meta": {SERVER_INFO_KEY: SERVER_INFO}}
        if method in LIST_METHODS:
            result.update(ttlMs=0, cacheScope="private")
    return result, headers


def _unknown_target(method: str, params: dict[str, Any]) -> NoReturn:
    """This server has no resources or prompts: any read or get names an unknown one,
    which is -32602 with the name in `data` (2026-07-28 resources, SEP-2164)."""
    key = NAMED_PARAMS[method]
    target = params.get(key)
    if not isinstance(target, str):
        raise RpcError(INVALID_PARAMS, f"params.{key} must be a string")
    kind = "resource" if key == "uri" else "prompt"
    raise RpcError(INVALID_PARAMS, f"{kind} not found: {target!r}; this server has none", data={key: target})


def _call(params: dict[str, Any]) -> dict[str, Any]:
    name = params.get("name")
    if not isinstance(name, str):
        raise RpcError(INVALID_PARAMS, "params.name must be a string")
    if name not in TOOLS:
        raise RpcError(INVALID_PARAMS, f"unknown tool {name!r}; tools/list shows {', '.join(TOOLS)}")
    arguments = params.get("arguments")
    arguments = {} if arguments is None else arguments
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, "params.arguments must be an object")
    try:
        text, structured = call_tool(control.app.node(), name, arguments)
    except ToolError as error:
        return {"content": [{"type": "text", "text": str(error)}], "isError": True}
    except Exception:
        log.exception("MCP tool %s failed", name)
        return {
            "content": [{"type": "text", "text": f"the {name} tool failed unexpectedly"}],
            "isError": True,
        }
    return {"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": False}
