"""The Anthropic Messages dialect: /v1/messages and /v1/messages/count_tokens.

A pure adapter (api-wire-formats.md §3.2-3.3): the body becomes one
`GenerationRequest`; node events become Anthropic stream events, which are either
sent as SSE (`event:` + `data:` lines, strictly sequential content blocks) or
folded into one `message` object, so both paths agree block for block. Built for
Claude Code: every field it sends is accepted (thinking, context_management,
output_config, cache_control, server tools...) and ignored where the node has no
use for it; a too-long prompt answers with the "prompt is too long" phrase that
makes it compact; `stop_reason` is `tool_use` whenever a tool_use block went out.
Images and documents are refused (400). Client errors raise ApiError, rendered by
control.middleware. Must not import jax.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from control import app as application
from control.dialect import (
    api_error,
    generation_request,
    get_bool,
    get_int,
    get_list,
    get_model,
    get_number,
    get_stop,
    new_id,
    prompt_too_long,
    sampling_params,
    start_run,
    tool_definition,
)
from control.errors import ApiError
from control.middleware import json_body
from control.node_client import NodeError
from control.sse import event_frame, event_stream
from swarm.node_protocol import GenerationRequest

log = logging.getLogger("control.anthropic")

bp = Blueprint("anthropic_api", __name__)

# Anthropic's rule, widened to the names Claude Code gives MCP tools (mcp__server__tool).
TOOL_NAME = r"[A-Za-z0-9_.-]{1,128}"
_IMAGES = ("image", "document", "file", "container_upload")
_DROPPED = ("thinking", "redacted_thinking")  # replayed reasoning: the node has none to match


def _error(message: str, param: str = "messages") -> ApiError:
    return ApiError(400, message, param=param)


def _text_of(content: Any, param: str) -> str:
    """A text-only content value (string or text blocks) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _error(f"'{param}' must be a string or a list of text blocks", param)
    texts = []
    for block in content:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise _error(f"'{param}' must hold only text blocks", param)
        texts.append(block["text"])
    return "\n".join(texts)


def _tool_result(block: dict[str, Any], param: str) -> str:
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        parts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            elif kind in _IMAGES:
                # A tool that returned a picture (Claude Code's Read on a PNG): say so and go on.
                parts.append("[image omitted: images are not supported]")
            else:
                raise _error(f"'{param}.content' blocks must be text", param)
        text = "\n".join(parts)
    else:
        raise _error(f"'{param}.content' must be a string or a list of blocks", param)
    return "Error: " + text if block.get("is_error") else text


def node_messages(raw: list[Any], system: Any) -> tuple[dict[str, Any], ...]:
    """Anthropic system + messages as node messages (tool results become `tool` messages)."""
    messages: list[dict[str, Any]] = []
    system_texts = [_text_of(system, "system")] if system is not None else []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        role = item.get("role") if isinstance(item, dict) else None
        if role == "system":
            # Claude Code sends per-turn instructions as system messages inside `messages`;
            # small models' templates want one leading system prompt, so they join it.
            system_texts.append(_text_of(item.get("content"), f"{param}.content"))
            continue
        if role not in ("user", "assistant"):
            raise _error(f"'{param}.role' must be 'user', 'assistant' or 'system'")
        content = item.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _error(f"'{param}.content' must be a string or a list of content blocks")
        texts: list[str] = []
        calls: list[dict[str, str]] = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in _DROPPED:
                continue
            elif kind in _IMAGES:
                raise _error("images are not supported")
            elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {"id": str(block.get("id") or ""), "name": block["name"], "arguments": arguments}
                )
            elif kind == "tool_result" and role == "user":
                if texts:  # keep the order the client wrote
                    messages.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(block.get("tool_use_id") or ""),
                        "content": _tool_result(block, f"{param}.content"),
                    }
                )
            else:
                raise _error(f"'{param}' has a content block of unsupported type {kind!r}")
        if role == "assistant" and (texts or calls):
            message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
        elif role == "user" and (texts or not content):
            messages.append({"role": "user", "content": "\n".join(texts)})
    if not messages:
        raise _error("'messages' must hold at least one user or assistant message", "messages")
    system_text = "\n\n".join(text for text in system_texts if text)
    if system_text:
        messages.insert(0, {"role": "system", "content": system_text})
    return tuple(messages)


def _tools(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    tools = []
    for tool in get_list(body, "tools", max_items=128):
        if not isinstance(tool, dict):
            raise _error("each tool must be an object", "tools")
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool (web_search_20250305...): nothing here can run it
        tools.append(
            tool_definition(
                tool.get("name"),
                tool.get("description"),
                tool.get("input_schema"),
                pattern=TOOL_NAME,
                param="tools",
            )
        )
    return tuple(tools)


def _tool_choice(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return choice["name"]
    raise _error("'tool_choice.type' must be auto, any, tool (with a name) or none", "tool_choice")


def parse_messages(body: dict[str, Any], *, count_only: bool = False) -> tuple[GenerationRequest, bool]:
    """(the node request, whether to stream); count_tokens bodies carry no max_tokens."""
    model = get_model(body)
    max_tokens = get_int(body, "max_tokens", low=1, required=not count_only)
    messages = node_messages(get_list(body, "messages", required=True), body.get("system"))
    sampling = sampling_params(
        temperature=_or(get_number(body, "temperature", low=0, high=1), 1.0),  # Anthropic's default
        top_p=get_number(body, "top_p", low=0, high=1),
        top_k=get_int(body, "top_k", low=0),
        stop=get_stop(body, "stop_sequences"),
        max_tokens=max_tokens or 1,
    )
    request = generation_request(
        model=model,
        sampling=sampling,
        messages=messages,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        request_id=new_id("msg_"),
    )
    return request, (not count_only and get_bool(body, "stream"))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _tool_use_id(node_id: str) -> str:
    # Claude Code expects "toolu_" ids; the node's are "call_<random>".
    return "toolu_" + node_id.removeprefix("call_") if node_id else new_id("toolu_")


def _usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, int]:
    """Anthropic's usage object for a prompt of `prompt_tokens`, `cached_tokens` of them
    from the prefix cache: as Anthropic counts, input_tokens are the others, and the
    whole input is input_tokens + cache_read_input_tokens + cache_creation_input_tokens
    (always 0: every prompt is cached as it goes in, with no breakpoint to ask for it)."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    return {
        "input_tokens": prompt_tokens - cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_events(events: Iterator[dict[str, Any]], message_id: str) -> Iterator[dict[str, Any]]:
    """Anthropic stream events for node events; an error event raises NodeError.

    Blocks are strictly sequential (start, deltas, stop, then the next index). The
    text block opens on the first non-empty text, so a reply that is only a tool
    call has no empty text block; a reply with nothing gets one empty text block.
    """
    index, open_kind, open_call, used_tool, prompt_tokens, cached_tokens = -1, None, None, False, 0, 0
    for event in events:
        kind = event.get("event")
        if kind == "start":
            prompt_tokens = int(event.get("prompt_tokens") or 0)
            cached_tokens = int(event.get("cached_tokens") or 0)  # what the cache holds now
            message = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": event.get("model", ""),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage(prompt_tokens, 1, cached_tokens),
            }
            yield {"type": "message_start", "message": message}
            yield {"type": "ping"}
        elif kind == "keepalive":
            yield {"type": "ping"}
        elif kind == "text" and event.get("text"):
            if open_kind != "text":
                if open_kind is not None:
                    yield {"type": "content_block_stop", "index": index}
                index, open_kind = index + 1, "text"
                yield {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                }
            yield {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": event["text"]},
            }
        elif kind == "tool_call":
            if open_kind is not None:
                yield {"type": "content_block_stop", "index": index}
            index, open_kind, open_call, used_tool = index + 1, "tool_use", event.get("index"), True
            block = {
                "type": "tool_use",
                "id": _tool_use_id(str(event.get("id") or "")),
                "name": event["name"],
                "input": {},
            }
            yield {"type": "content_block_start", "index": index, "content_block": block}
        elif kind == "arguments":
            if open_kind == "tool_use" and event.get("index") == open_call:
                delta = {"type": "input_json_delta", "partial_json": event.get("delta", "")}
                yield {"type": "content_block_delta", "index": index, "delta": delta}
            else:
                log.warning("dropped arguments for tool call %s: its block is closed", event.get("index"))
        elif kind == "done":
            if open_kind is not None:
                yield {"type": "content_block_stop", "index": index}
            elif index < 0:
                yield {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
                yield {"type": "content_block_stop", "index": 0}
            stop_sequence = event.get("stop_sequence")
            if used_tool:
                reason, stop_sequence = "tool_use", None
            elif event.get("finish_reason") == "length":
                reason, stop_sequence = "max_tokens", None
            else:
                reason = "stop_sequence" if stop_sequence else "end_turn"
            output_tokens = int(event.get("completion_tokens") or 0)
            input_tokens = int(event.get("prompt_tokens") or prompt_tokens)
            # Cumulative, as message_delta's usage is: the input fields repeat with what the
            # prefill reused, which the start's count could only foresee.
            cached = int(event.get("cached_tokens") or 0)
            yield {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                "usage": _usage(input_tokens, output_tokens, cached),
            }
            yield {"type": "message_stop"}
            return
        elif kind == "error":
            raise NodeError(str(event.get("code")), str(event.get("message")))
    raise NodeError("unavailable", "the generation ended without a result")


def fold_message(events: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming `message` object the stream events describe."""
    message: dict[str, Any] = {}
    arguments: dict[int, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = copy.deepcopy(event["message"])
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta" and event["delta"]["type"] == "text_delta":
            message["content"][event["index"]]["text"] += event["delta"]["text"]
        elif kind == "content_block_delta":
            arguments[event["index"]] = arguments.get(event["index"], "") + event["delta"]["partial_json"]
        elif kind == "content_block_stop" and message["content"][event["index"]]["type"] == "tool_use":
            message["content"][event["index"]]["input"] = _tool_input(arguments.get(event["index"], ""))
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    return message


def _tool_input(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("tool call arguments are not a JSON object; sending {}: %.200s", text)
        return {}
    return value


def _stream_error_type(code: str) -> str:
    if code in ("overloaded", "unavailable"):
        return "overloaded_error"
    return "api_error" if code == "internal" else "invalid_request_error"


def _frames(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    """SSE frames; a failure mid-stream is one `event: error` frame, never a message_stop (§3.2)."""
    try:
        for event in events:
            yield event_frame(event["type"], event)
    except NodeError as error:
        message = prompt_too_long(error.message) if error.code == "context_overflow" else error.message
        body = {"type": "error", "error": {"type": _stream_error_type(error.code), "message": message}}
        yield event_frame("error", body)


@bp.post("/v1/messages")
def messages() -> Response:
    request, stream = parse_messages(json_body())
    run = start_run(application.node(), request, "anthropic_messages", anthropic=True)
    events = message_events(run.events(), request.request_id)
    if stream:
        return event_stream(_frames(events), run.close)
    try:
        message = fold_message(events)
    except NodeError as error:
        raise api_error(error, anthropic=True) from None
    finally:
        run.close()
    return jsonify(message)


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    request, _ = parse_messages(json_body(), count_only=True)
    try:
        tokens = application.node().count_tokens(request)
    except NodeError as error:
        raise api_error(error, anthropic=True) from None
    return jsonify({"input_tokens": tokens})
