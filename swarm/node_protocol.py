"""The local protocol between the control plane and the node process.

Owns the vocabulary that crosses the node's unix socket: the one internal request
type every API dialect adapts to (`GenerationRequest`), the event stream a generation
produces, the error codes, and the framing (one JSON object per line). The control
plane and the node both import it, so it must stay free of jax (numpy comes in only
through `SamplingParams`).

Framing: the client writes one line `{"op": ..., ...}`; the node answers with one
line, or, for `generate`, a stream of event lines ending with a `done` or `error`
event. Closing the connection cancels a generation.

Events of a generation, in order:
  {"event": "start", "model", "prompt_tokens", "cached_tokens"}
  {"event": "text", "text", "token_id", "logprob"?, "top_logprobs"?: [{"token", "logprob", "bytes"}]}
  {"event": "tool_call", "index", "id", "name"}        a tool call begins
  {"event": "arguments", "index", "delta"}             a fragment of its arguments JSON
  {"event": "done", "finish_reason", "stop_sequence", "prompt_tokens", "cached_tokens", "completion_tokens"}
  {"event": "error", "code", "message"}
cached_tokens: the prompt tokens taken from the prefix cache instead of computed (at
start, what the cache holds then; at done, what the prefill reused). A peer that leaves
it out reused none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from swarm.errors import InvalidRequestError
from swarm.sampling import SamplingParams

PROTOCOL_VERSION = 1
SOCKET_NAME = "node.sock"
MAX_LINE_BYTES = 64 * 1024 * 1024

# Error codes a node answers with; the control plane maps them to HTTP statuses.
ERROR_STATUS = {
    "invalid_request": 400,
    "context_overflow": 400,
    "unknown_model": 404,
    "overloaded": 429,
    "unavailable": 503,
    "internal": 500,
}

FINISH_REASONS = ("stop", "length", "tool_calls")
TOOL_CHOICES = ("auto", "none", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
ROLES = ("system", "user", "assistant", "tool")


class ProtocolError(InvalidRequestError):
    """A malformed message on the node socket."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    line = stream.readline(MAX_LINE_BYTES + 1)
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("message too large")
    return parse_message(line)


def parse_message(line: bytes) -> dict[str, Any]:
    """One framed message (a JSON object on one line)."""
    try:
        message = json.loads(line)
    except ValueError as error:
        raise ProtocolError(f"malformed message: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def _message(raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"messages[{index}] must be an object")
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}")
    content = raw.get("content")
    if content is not None and not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content must be a string")
    message: dict[str, Any] = {"role": role, "content": content}
    calls = raw.get("tool_calls") or []
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise InvalidRequestError(f"messages[{index}].tool_calls belong on assistant messages")
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise InvalidRequestError(f"messages[{index}].tool_calls entries need a name")
            if not isinstance(call.get("arguments", ""), str):
                raise InvalidRequestError(f"messages[{index}].tool_calls arguments must be a JSON string")
        message["tool_calls"] = [
            {"id": str(c.get("id", "")), "name": c["name"], "arguments": c.get("arguments") or "{}"}
            for c in calls
        ]
    for key in ("tool_call_id", "name"):
        if isinstance(raw.get(key), str):
            message[key] = raw[key]
    return message


MAX_PRIORITY = 100


@dataclass(frozen=True)
class GenerationRequest:
    """What every API dialect is turned into before it reaches the node.

    Exactly one of `messages` (a chat, rendered with the model's template) and
    `prompt` (raw text) is set. Messages are plain dicts: role, content (str or
    None), and for tool use `tool_calls` [{id, name, arguments (JSON text)}] on
    assistant messages and `tool_call_id`/`name` on tool messages.
    """

    model: str
    sampling: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    tools: tuple[dict[str, Any], ...] = ()  # {"name", "description", "parameters"}
    tool_choice: str = "auto"  # auto | none | required | the name of one tool
    response_format: str = "text"  # text | json_object | json_schema
    json_schema: dict[str, Any] | None = None  # the schema, with response_format json_schema
    logprobs: bool = False  # report each generated token's log-probability
    request_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # dialect hints, passed through
    priority: int = 0  # higher is admitted sooner; equal priorities are first come, first served

    def __post_init__(self) -> None:
        if (
            not isinstance(self.priority, int)
            or isinstance(self.priority, bool)
            or abs(self.priority) > MAX_PRIORITY
        ):
            raise InvalidRequestError(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}")
        if not isinstance(self.model, str):
            raise InvalidRequestError("model must be a string")
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequestError("a request needs exactly one of messages and prompt")
        if self.messages is not None and not self.messages:
            raise InvalidRequestError("messages must not be empty")
        if self.response_format not in RESPONSE_FORMATS:
            raise InvalidRequestError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
        names = {tool["name"] for tool in self.tools}
        if self.tool_choice not in TOOL_CHOICES and self.tool_choice not in names:
            raise InvalidRequestError(f"tool_choice names no declared tool: {self.tool_choice!r}")
        if self.response_format == "json_schema" and not isinstance(self.json_schema, dict):
            raise InvalidRequestError("response_format json_schema needs a schema object")
        if self.tool_choice == "required" and not self.tools:
            raise InvalidRequestError("tool_choice 'required' needs tools")

    @property
    def forced_tools(self) -> tuple[str, ...]:
        """The tool names the output is constrained to (empty when not forced)."""
        if not self.tools or self.tool_choice in ("auto", "none"):
            return ()
        if self.tool_choice == "required":
            return tuple(tool["name"] for tool in self.tools)
        return (self.tool_choice,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sampling": self.sampling.to_dict(),
            "messages": list(self.messages) if self.messages is not None else None,
            "prompt": self.prompt,
            "tools": list(self.tools),
            "tool_choice": self.tool_choice,
            "response_format": self.response_format,
            "json_schema": self.json_schema,
            "logprobs": self.logprobs,
            "request_id": self.request_id,
            "extra": self.extra,
            "priority": self.priority,
        }

    @classmethod
    def from_dict(cls, data: Any) -> GenerationRequest:
        if not isinstance(data, dict):
            raise InvalidRequestError("request must be an object")
        messages = data.get("messages")
        if messages is not None:
            if not isinstance(messages, list):
                raise InvalidRequestError("messages must be a list")
            messages = tuple(_message(m, i) for i, m in enumerate(messages))
        prompt = data.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string")
        tools = data.get("tools") or []
        if not isinstance(tools, list):
            raise InvalidRequestError("tools must be a list")
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise InvalidRequestError("every tool needs a name")
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise InvalidRequestError("sampling must be an object")
        extra = data.get("extra") or {}
        return cls(
            model=data.get("model", ""),
            sampling=SamplingParams.from_dict(sampling),
            messages=messages,
            prompt=prompt,
            tools=tuple(
                {
                    "name": t["name"],
                    "description": str(t.get("description") or ""),
                    "parameters": t.get("parameters") if isinstance(t.get("parameters"), dict) else {},
                }
                for t in tools
            ),
            tool_choice=str(data.get("tool_choice") or "auto"),
            response_format=str(data.get("response_format") or "text"),
            json_schema=data.get("json_schema") if isinstance(data.get("json_schema"), dict) else None,
            logprobs=bool(data.get("logprobs")),
            request_id=str(data.get("request_id") or ""),
            extra=extra if isinstance(extra, dict) else {},
            priority=data.get("priority", 0),
        )


# --- events received from peers ------------------------------------------------------

MAX_EVENT_TEXT = 256 * 1024  # characters of one text piece, tool name or argument fragment
MAX_EVENT_TOP_LOGPROBS = 20
EVENT_KINDS = ("start", "text", "tool_call", "arguments", "progress", "done", "error")


def _field(raw: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = raw.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            f"a {raw.get('event')} event needs {name} of type {getattr(kind, '__name__', kind)}"
        )
    if isinstance(value, str) and len(value) > MAX_EVENT_TEXT:
        raise ProtocolError(f"the {name} of a {raw.get('event')} event is over {MAX_EVENT_TEXT} characters")
    return value


def _count(raw: dict[str, Any], name: str) -> int:
    value = _field(raw, name, int)
    if value < 0:
        raise ProtocolError(f"the {name} of a {raw.get('event')} event is negative")
    return value


def _cached(raw: dict[str, Any], prompt_tokens: int) -> int:
    """An event's cached_tokens: 0 where left out, never more than its prompt."""
    if raw.get("cached_tokens") is None:
        return 0
    value = _count(raw, "cached_tokens")
    if value > prompt_tokens:
        raise ProtocolError(f"the cached_tokens of a {raw.get('event')} event exceed its prompt_tokens")
    return value


def _number(raw: dict[str, Any], name: str) -> float:
    value = float(_field(raw, name, (int, float)))
    if value != value or value in (float("inf"), float("-inf")):
        raise ProtocolError(f"the {name} of a {raw.get('event')} event is not finite")
    return value


def _logprob_entry(raw: Any) -> dict[str, Any]:
    """One token's log-probability entry: token text, logprob, and its bytes (or null)."""
    if not isinstance(raw, dict):
        raise ProtocolError("a top_logprobs entry must be an object")
    raw = {**raw, "event": "text"}
    data = raw.get("bytes")
    if data is not None and (
        not isinstance(data, list)
        or len(data) > 64
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in data)
    ):
        raise ProtocolError("a logprob entry's bytes must be null or a list of at most 64 byte values")
    return {
        "token": _field(raw, "token", str, optional=True) or "",
        "logprob": _number(raw, "logprob"),
        "bytes": None if data is None else list(data),
    }


def check_event(raw: Any) -> dict[str, Any]:
    """A generation event from a peer (see the module docstring), checked field by field and
    rebuilt from the known fields only; ProtocolError when anything is off."""
    if not isinstance(raw, dict) or raw.get("event") not in EVENT_KINDS:
        raise ProtocolError(f"an event must be an object whose event is one of {', '.join(EVENT_KINDS)}")
    kind = raw["event"]
    event: dict[str, Any] = {"event": kind}
    if kind == "start":
        event.update(model=_field(raw, "model", str), prompt_tokens=_count(raw, "prompt_tokens"))
        event.update(cached_tokens=_cached(raw, event["prompt_tokens"]))
    elif kind == "text":
        event.update(text=_field(raw, "text", str), token_id=_field(raw, "token_id", int))
        if "logprob" in raw:
            entry = _logprob_entry(raw)
            tops = raw.get("top_logprobs") or []
            if not isinstance(tops, list) or len(tops) > MAX_EVENT_TOP_LOGPROBS:
                raise ProtocolError(f"top_logprobs must be a list of at most {MAX_EVENT_TOP_LOGPROBS}")
            event.update(entry, top_logprobs=[_logprob_entry(top) for top in tops])
    elif kind == "tool_call":
        event.update(index=_count(raw, "index"), id=_field(raw, "id", str), name=_field(raw, "name", str))
    elif kind == "arguments":
        event.update(index=_count(raw, "index"), delta=_field(raw, "delta", str))
    elif kind == "done":
        finish = raw.get("finish_reason")
        if finish not in FINISH_REASONS:
            raise ProtocolError(f"finish_reason must be one of {', '.join(FINISH_REASONS)}")
        event.update(
            finish_reason=finish,
            stop_sequence=_field(raw, "stop_sequence", str, optional=True),
            prompt_tokens=_count(raw, "prompt_tokens"),
            completion_tokens=_count(raw, "completion_tokens"),
        )
        event.update(cached_tokens=_cached(raw, event["prompt_tokens"]))
    elif kind == "error":
        code = raw.get("code")
        event.update(
            code=code if code in ERROR_STATUS else "internal",
            message=_field(raw, "message", str)[:4096],
        )
    return event
