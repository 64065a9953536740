"""Request-parsing and result-collecting pieces shared by the API dialects.

The dialects (control.openai_api, control.anthropic_api) are pure adapters around
`swarm.node_protocol.GenerationRequest`: body dict -> GenerationRequest, node events
-> response. This module holds what both need: typed field readers that answer a
wrong type with a 400 naming the field, the size limits of the reference product
(product-design-notes.md §6), the SamplingParams builder, the mapping of node
errors to HTTP errors, and `collect`, which folds a generation's events into one
`Reply`. Nothing here touches Flask's request except through its callers. Must not
import jax.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from control.errors import ApiError
from control.metrics import GenerationTracker
from control.node_client import Generation, NodeClient, NodeError
from swarm.errors import InvalidRequestError
from swarm.node_protocol import GenerationRequest
from swarm.sampling import SamplingParams

# Validation limits (product-design-notes.md §6). Tool descriptions get far more room
# than the reference's 4096 characters: Claude Code's own Bash tool description is
# longer than that, and refusing it would break every Claude Code turn.
MAX_MODEL_NAME = 256
MAX_MESSAGES = 4096
MAX_MESSAGE_BYTES = 2 * 2**20
MAX_PROMPT_BYTES = 4 * 2**20
MAX_TOOLS = 128
MAX_TOOL_DESCRIPTION = 64 * 1024
MAX_TOOL_SCHEMA_BYTES = 64 * 1024
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _present(body: dict[str, Any], name: str) -> bool:
    # JSON null means "not given": SDKs send it for explicitly unset optional fields.
    return body.get(name) is not None


def get_string(
    body: dict[str, Any], name: str, *, required: bool = False, max_length: int | None = None
) -> str | None:
    if not _present(body, name):
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return None
    value = body[name]
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", param=name)
    if max_length is not None and len(value) > max_length:
        raise ApiError(400, f"'{name}' is longer than {max_length} characters", param=name)
    return value


def get_bool(body: dict[str, Any], name: str) -> bool:
    if not _present(body, name):
        return False
    value = body[name]
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean", param=name)
    return value


def get_int(
    body: dict[str, Any],
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    required: bool = False,
) -> int | None:
    if not _present(body, name):
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return None
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if not -(2**63) <= value < 2**63:  # 1e300 is an integer too; nothing downstream takes it
        # The value is not echoed: an integer of hundreds of digits has no float to show.
        raise ApiError(400, f"'{name}' is out of range: it must fit a signed 64-bit integer", param=name)
    _check_range(name, value, low, high)
    return value


def get_number(
    body: dict[str, Any], name: str, *, low: float | None = None, high: float | None = None
) -> float | None:
    if not _present(body, name):
        return None
    value = body[name]
    # Python's json module reads NaN and Infinity; no sampling knob means anything by them.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", param=name)
    _check_range(name, value, low, high)
    return float(value)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {value}", param=name)


def get_object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    if not _present(body, name):
        return None
    if not isinstance(body[name], dict):
        raise ApiError(400, f"'{name}' must be an object", param=name)
    return body[name]


def get_list(
    body: dict[str, Any], name: str, *, required: bool = False, max_items: int | None = None
) -> list[Any]:
    if not _present(body, name):
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return []
    value = body[name]
    if not isinstance(value, list):
        raise ApiError(400, f"'{name}' must be a list", param=name)
    if required and not value:
        raise ApiError(400, f"'{name}' must not be empty", param=name)
    if max_items is not None and len(value) > max_items:
        raise ApiError(400, f"'{name}' has {len(value)} items; at most {max_items} are allowed", param=name)
    return value


def get_stop(body: dict[str, Any], name: str) -> tuple[str, ...]:
    """A stop string or a list of up to 16 stop strings of 1-256 characters."""
    if not _present(body, name):
        return ()
    value = body[name]
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(item, str) for item in strings):
        raise ApiError(400, f"'{name}' must be a string or a list of strings", param=name)
    if len(strings) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'{name}' may hold at most {MAX_STOP_STRINGS} strings", param=name)
    if not all(1 <= len(item) <= MAX_STOP_LENGTH for item in strings):
        raise ApiError(400, f"each '{name}' string must be 1 to {MAX_STOP_LENGTH} characters", param=name)
    return tuple(strings)


def get_model(body: dict[str, Any]) -> str:
    return get_string(body, "model", required=True, max_length=MAX_MODEL_NAME) or ""


def sampling_params(**given: Any) -> SamplingParams:
    """SamplingParams from the fields a request gave (None = the node's default)."""
    fields = {name: value for name, value in given.items() if value is not None}
    if "seed" in fields:
        # OpenAI seeds are any int64; numpy's generator wants a non-negative one.
        fields["seed"] = fields["seed"] % 2**64
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as error:
        name = str(error).split(" ", 1)[0]
        raise ApiError(400, str(error), param=name if name in fields else None) from None


def generation_request(**fields: Any) -> GenerationRequest:
    """A GenerationRequest, its own checks (tool_choice naming a tool...) answered with 400."""
    try:
        request = GenerationRequest(**fields)
    except InvalidRequestError as error:
        param = "tool_choice" if "tool_choice" in str(error) else None
        raise ApiError(400, str(error), param=param) from None
    check_sizes(request.messages or ())
    return request


def check_sizes(messages: Iterable[dict[str, Any]], param: str = "messages") -> None:
    total = 0
    for index, message in enumerate(messages):
        if index >= MAX_MESSAGES:
            raise ApiError(400, f"at most {MAX_MESSAGES} messages are allowed", param=param)
        size = len((message.get("content") or "").encode())
        size += sum(len(call["arguments"].encode()) for call in message.get("tool_calls", ()))
        if size > MAX_MESSAGE_BYTES:
            raise ApiError(
                400, f"{param}[{index}] is larger than {MAX_MESSAGE_BYTES // 2**20} MB", param=param
            )
        total += size
    if total > MAX_PROMPT_BYTES:
        raise ApiError(400, f"the prompt is larger than {MAX_PROMPT_BYTES // 2**20} MB", param=param)


def tool_definition(
    name: Any, description: Any, parameters: Any, *, pattern: str, param: str
) -> dict[str, Any]:
    """One node tool {name, description, parameters}, checked against the limits."""
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ApiError(400, f"tool names must match {pattern}, got {name!r}", param=param)
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"the description of tool {name!r} must be a string", param=param)
    if len(description or "") > MAX_TOOL_DESCRIPTION:
        raise ApiError(
            400, f"the description of tool {name!r} is over {MAX_TOOL_DESCRIPTION} characters", param=param
        )
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ApiError(400, f"the schema of tool {name!r} must be a JSON object", param=param)
    if len(json.dumps(parameters)) > MAX_TOOL_SCHEMA_BYTES:
        raise ApiError(
            400, f"the schema of tool {name!r} is over {MAX_TOOL_SCHEMA_BYTES // 1024} KB", param=param
        )
    return {"name": name, "description": description or "", "parameters": parameters}


def prompt_too_long(message: str) -> str:
    """The node's overflow message as "prompt is too long: N tokens > M maximum".

    Claude Code compacts the conversation only on that phrase (api-wire-formats.md
    §3.3). The node's messages name the prompt's length first and the window second.
    """
    numbers = re.findall(r"\d+", message)
    if len(numbers) >= 2:
        return f"prompt is too long: {numbers[0]} tokens > {numbers[1]} maximum"
    return f"prompt is too long: {message}"


def api_error(error: NodeError, *, anthropic: bool = False) -> ApiError:
    """A node's refusal as the HTTP error clients act on (api-wire-formats.md §3.1-3.3)."""
    if error.code == "context_overflow":
        message = prompt_too_long(error.message) if anthropic else error.message
        return ApiError(400, message, code="context_length_exceeded", param="messages")
    if error.code == "unknown_model":
        return ApiError(404, error.message, code="model_not_found", param="model")
    if error.code == "overloaded":
        return ApiError(429, error.message, code="rate_limit_exceeded", retry_after_s=1)
    if error.code == "unavailable":
        return ApiError(503, error.message, code="node_unavailable", retry_after_s=5)
    if error.code == "invalid_request":
        return ApiError(400, error.message, code="invalid_request")
    return ApiError(500, error.message, code="internal_error")


def tracked(events: Iterable[dict[str, Any]], tracker: GenerationTracker) -> Iterator[dict[str, Any]]:
    """`events`, passed through, timing each token into the metrics."""
    try:
        for event in events:
            kind = event.get("event")
            if (kind == "text" and event.get("token_id", 0) >= 0) or kind == "arguments":
                tracker.token()
            elif kind == "done":
                tracker.finish(int(event.get("prompt_tokens") or 0), int(event.get("completion_tokens") or 0))
            yield event
    finally:
        tracker.abandon()


@dataclass
class Reply:
    """A whole generation, folded from its events."""

    model: str = ""
    text: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # {"id", "name", "arguments"}
    tokens: list[dict[str, Any]] = field(default_factory=list)  # text events that carry a logprob
    finish_reason: str = "stop"
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the prefix cache supplied
    completion_tokens: int = 0


def collect(events: Iterable[dict[str, Any]]) -> Reply:
    """Fold node events into a Reply; an error event raises NodeError."""
    reply = Reply()
    calls: dict[int, dict[str, str]] = {}
    for event in events:
        kind = event.get("event")
        if kind == "start":
            reply.model = str(event.get("model", ""))
            reply.prompt_tokens = int(event.get("prompt_tokens") or 0)
            reply.cached_tokens = int(event.get("cached_tokens") or 0)
        elif kind == "text":
            reply.text += event.get("text", "")
            if "logprob" in event:
                reply.tokens.append(event)
        elif kind == "tool_call":
            calls[event["index"]] = {"id": str(event.get("id", "")), "name": event["name"], "arguments": ""}
        elif kind == "arguments" and event.get("index") in calls:
            calls[event["index"]]["arguments"] += event.get("delta", "")
        elif kind == "done":
            reply.finish_reason = str(event.get("finish_reason") or "stop")
            reply.stop_sequence = event.get("stop_sequence")
            reply.prompt_tokens = int(event.get("prompt_tokens") or reply.prompt_tokens)
            reply.cached_tokens = int(event.get("cached_tokens") or 0)
            reply.completion_tokens = int(event.get("completion_tokens") or 0)
            break
        elif kind == "error":
            raise NodeError(str(event.get("code")), str(event.get("message")))
    else:
        raise NodeError("unavailable", "the generation ended without a result")
    reply.tool_calls = [calls[index] for index in sorted(calls)]
    return reply


class Run:
    """A started generation and its metrics; `close()` cancels it and is safe to repeat."""

    def __init__(self, generation: Generation, tracker: GenerationTracker):
        self.generation = generation
        self.tracker = tracker

    def events(self) -> Iterator[dict[str, Any]]:
        return tracked(self.generation, self.tracker)

    def close(self) -> None:
        self.generation.close()
        self.tracker.abandon()


def start_run(node: NodeClient, request: GenerationRequest, route: str, *, anthropic: bool = False) -> Run:
    """Start `request` on the node, timed under metrics `route`; refusals become ApiError.

    NodeUnavailable passes through: control.middleware answers it with 503 in every dialect.
    """
    tracker = GenerationTracker(route)
    try:
        generation = node.generate(request)
    except NodeError as error:
        tracker.abandon()
        raise api_error(error, anthropic=anthropic) from None
    except BaseException:
        tracker.abandon()
        raise
    return Run(generation, tracker)
