"""Error responses in each API dialect: OpenAI, Anthropic, JSON-RPC (MCP).

Owns `ApiError`, which any handler raises, and the renderers that turn it into
the body its caller's SDK parses. The dialect follows the route: /v1/messages*
speaks Anthropic, /mcp JSON-RPC, everything else OpenAI's shape. No handler ever
lets a traceback out: unexpected exceptions become a 500 in the same shapes.
Must not import jax.
"""

from __future__ import annotations

from typing import Any

# Anthropic's error type per status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}

# OpenAI's error type per status.
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """An HTTP error with a status, a message and an optional machine code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


def dialect_for(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/mcp"):
        return "jsonrpc"
    return "openai"


def openai_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def anthropic_body(error: ApiError, request_id: str | None = None) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def jsonrpc_body(error: ApiError, request_id: Any = None) -> dict[str, Any]:
    # -32001 for auth failures as common MCP servers do; -32000 is "server error" (retry later).
    code = {400: -32600, 401: -32001, 403: -32001, 404: -32601, 413: -32600, 429: -32000, 503: -32000}.get(
        error.status, -32603
    )
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": error.message}}


def error_body(error: ApiError, path: str, request_id: str | None = None) -> dict[str, Any]:
    dialect = dialect_for(path)
    if dialect == "anthropic":
        return anthropic_body(error, request_id)
    if dialect == "jsonrpc":
        return jsonrpc_body(error)
    return openai_body(error)
