"""Rendering for the OpenAI dialect: node events -> chat.completion / text_completion.

Pure functions over the node's event stream (swarm.node_protocol), used by
control.openai_api: whole objects for non-streaming answers and SSE frames for
streams, in OpenAI's exact wire format (api-wire-formats.md §3.1): one `data:`
event per chunk, the same id/created/model on every chunk, `usage: null` on each
chunk when usage is asked for and then one usage chunk with no choices, tool-call
fragments carrying their `index` (the id, type and name only on the first), and
`data: [DONE]` at the end. Touches no request or app state. Must not import jax.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import swarm
from control.dialect import Reply, api_error, new_id
from control.errors import openai_body
from control.node_client import NodeError
from control.sse import DONE_FRAME, KEEPALIVE_FRAME, data_frame
from swarm.node_protocol import GenerationRequest

SYSTEM_FINGERPRINT = f"swarm-{swarm.__version__}"
FINISH_REASONS = ("stop", "length", "tool_calls")


@dataclass(frozen=True)
class Call:
    """A parsed request: what to generate and how to answer."""

    request: GenerationRequest
    stream: bool
    include_usage: bool
    echo: str = ""  # legacy completions: the prompt, when `echo` is set
    legacy_logprobs: bool = False


def finish_reason(reply_reason: str, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return reply_reason if reply_reason in FINISH_REASONS else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object: prompt_tokens counts every prompt token, and
    prompt_tokens_details.cached_tokens those of them the prefix cache supplied."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode())


def logprob_entry(event: dict[str, Any]) -> dict[str, Any]:
    """One chat logprobs.content entry from a node text event."""
    text = event.get("text", "")
    return {
        "token": text,
        "logprob": event["logprob"],
        "bytes": _token_bytes(text),
        "top_logprobs": [
            {
                "token": top["token"],
                "logprob": top["logprob"],
                "bytes": top.get("bytes") or _token_bytes(top["token"]),
            }
            for top in event.get("top_logprobs") or ()
        ],
    }


def legacy_logprobs(tokens: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The /v1/completions logprobs shape; `offset` is where generated text starts."""
    shape: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in tokens:
        text = event.get("text", "")
        shape["tokens"].append(text)
        shape["token_logprobs"].append(event["logprob"])
        shape["top_logprobs"].append(
            {top["token"]: top["logprob"] for top in event.get("top_logprobs") or ()}
        )
        shape["text_offset"].append(offset)
        offset += len(text)
    return shape


def chat_completion(reply: Reply, call: Call, created: int) -> dict[str, Any]:
    calls = [
        {
            "id": c["id"] or new_id("call_"),
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in reply.tool_calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if calls:
        message["tool_calls"] = calls
        message["content"] = reply.text or None
    logprobs = None
    if call.request.logprobs:
        logprobs = {"content": [logprob_entry(event) for event in reply.tokens], "refusal": None}
    return {
        "id": call.request.request_id,
        "object": "chat.completion",
        "created": created,
        "model": reply.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason(reply.finish_reason, bool(calls)),
            }
        ],
        "usage": usage(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens),
    }


def text_completion(reply: Reply, call: Call, created: int) -> dict[str, Any]:
    logprobs = legacy_logprobs(reply.tokens, len(call.echo)) if call.legacy_logprobs else None
    return {
        "id": call.request.request_id,
        "object": "text_completion",
        "created": created,
        "model": reply.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "text": call.echo + reply.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason(reply.finish_reason, False),
            }
        ],
        "usage": usage(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens),
    }


class _Chunks:
    """Builds the chunks of one stream: same id, created and model on each."""

    def __init__(self, call: Call, created: int, kind: str):
        self.call = call
        self.base = {"id": call.request.request_id, "object": kind, "created": created, "model": ""}
        self.base["system_fingerprint"] = SYSTEM_FINGERPRINT

    def frame(self, choice: dict[str, Any]) -> str:
        chunk: dict[str, Any] = {**self.base, "choices": [{"index": 0, **choice}]}
        if self.call.include_usage:
            chunk["usage"] = None  # every chunk but the last carries a null usage (§3.1)
        return data_frame(chunk)

    def usage_frame(self, done: dict[str, Any]) -> str:
        prompt, completion = int(done.get("prompt_tokens") or 0), int(done.get("completion_tokens") or 0)
        cached = int(done.get("cached_tokens") or 0)
        return data_frame({**self.base, "choices": [], "usage": usage(prompt, completion, cached)})


def chat_frames(events: Iterator[dict[str, Any]], call: Call, created: int) -> Iterator[str]:
    """SSE frames of a chat stream; an error event raises NodeError."""
    chunks = _Chunks(call, created, "chat.completion.chunk")
    tool_calls = False
    for event in events:
        kind = event.get("event")
        if kind == "start":
            chunks.base["model"] = event.get("model", "")
            yield chunks.frame(
                {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        elif kind == "keepalive":
            yield KEEPALIVE_FRAME
        elif kind == "text" and (event.get("text") or "logprob" in event):
            logprobs = None
            if call.request.logprobs and "logprob" in event:
                logprobs = {"content": [logprob_entry(event)], "refusal": None}
            yield chunks.frame(
                {"delta": {"content": event.get("text", "")}, "logprobs": logprobs, "finish_reason": None}
            )
        elif kind == "tool_call":
            tool_calls = True
            fragment = {
                "index": event["index"],
                "id": event.get("id") or new_id("call_"),
                "type": "function",
                "function": {"name": event["name"], "arguments": ""},
            }
            yield chunks.frame({"delta": {"tool_calls": [fragment]}, "logprobs": None, "finish_reason": None})
        elif kind == "arguments":
            fragment = {"index": event["index"], "function": {"arguments": event.get("delta", "")}}
            yield chunks.frame({"delta": {"tool_calls": [fragment]}, "logprobs": None, "finish_reason": None})
        elif kind == "done":
            reason = finish_reason(str(event.get("finish_reason")), tool_calls)
            yield chunks.frame({"delta": {}, "logprobs": None, "finish_reason": reason})
            if call.include_usage:
                yield chunks.usage_frame(event)
            yield DONE_FRAME
            return
        elif kind == "error":
            raise NodeError(str(event.get("code")), str(event.get("message")))
    raise NodeError("unavailable", "the generation ended without a result")


def completion_frames(events: Iterator[dict[str, Any]], call: Call, created: int) -> Iterator[str]:
    """SSE frames of a legacy completion stream; an error event raises NodeError."""
    chunks = _Chunks(call, created, "text_completion")
    offset = len(call.echo)
    for event in events:
        kind = event.get("event")
        if kind == "start":
            chunks.base["model"] = event.get("model", "")
            yield chunks.frame({"text": call.echo, "logprobs": None, "finish_reason": None})
        elif kind == "keepalive":
            yield KEEPALIVE_FRAME
        elif kind == "text" and (event.get("text") or "logprob" in event):
            logprobs = None
            if call.legacy_logprobs and "logprob" in event:
                logprobs = legacy_logprobs([event], offset)
            offset += len(event.get("text", ""))
            yield chunks.frame({"text": event.get("text", ""), "logprobs": logprobs, "finish_reason": None})
        elif kind == "done":
            reason = finish_reason(str(event.get("finish_reason")), False)
            yield chunks.frame({"text": "", "logprobs": None, "finish_reason": reason})
            if call.include_usage:
                yield chunks.usage_frame(event)
            yield DONE_FRAME
            return
        elif kind == "error":
            raise NodeError(str(event.get("code")), str(event.get("message")))
    raise NodeError("unavailable", "the generation ended without a result")


def errors_in_band(frames: Iterator[str]) -> Iterator[str]:
    """A failure after the stream began: one `data: {"error": ...}` frame, then close (§3.1)."""
    try:
        yield from frames
    except NodeError as error:
        yield data_frame(openai_body(api_error(error)))
