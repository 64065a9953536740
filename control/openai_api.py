"""The OpenAI dialect: /v1/chat/completions and /v1/completions.

A pure adapter (api-wire-formats.md §3.1): the request body becomes one
`GenerationRequest` (parsed here), and the node's events become a
`chat.completion` / `text_completion` object or SSE chunks (control.openai_render).
Embeddings and models are served on this blueprint from control.openai_extras.
Defaults follow OpenAI where it has one
(temperature 1, max_tokens 16 for legacy completions); top_k, min_p and
repetition_penalty are extensions, and otherwise the node's sampling defaults
apply. presence_penalty and frequency_penalty are checked and then ignored: the
node's repetition penalty is a different function and mapping one onto the other
would mislead. Client errors raise ApiError, rendered by control.middleware. Must
not import jax.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from control import app as application
from control import openai_extras
from control.dialect import (
    Reply,
    api_error,
    collect,
    generation_request,
    get_bool,
    get_int,
    get_list,
    get_model,
    get_number,
    get_object,
    get_stop,
    new_id,
    sampling_params,
    start_run,
    tool_definition,
)
from control.errors import ApiError
from control.middleware import json_body
from control.node_client import NodeError
from control.openai_render import (
    Call,
    chat_completion,
    chat_frames,
    completion_frames,
    errors_in_band,
    text_completion,
)
from control.sse import event_stream

bp = Blueprint("openai_api", __name__)

# OpenAI's function-name rule.
TOOL_NAME = r"[A-Za-z0-9_-]{1,64}"
_UNSUPPORTED_PARTS = {
    "image_url": "images are not supported",
    "input_audio": "audio input is not supported",
    "file": "file inputs are not supported",
}


def content_text(value: Any, param: str) -> str | None:
    """Message content (a string or a list of parts) as text; text parts joined by newlines."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ApiError(400, f"'{param}' must be a string or a list of content parts", param=param)
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _UNSUPPORTED_PARTS:
            raise ApiError(400, _UNSUPPORTED_PARTS[kind], param=param)
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("text", "refusal") or not isinstance(part.get(key), str):
            raise ApiError(400, f"'{param}' parts must be {{'type': 'text', 'text': <string>}}", param=param)
        texts.append(part[key])
    return "\n".join(texts)


def _tool_calls(value: Any, param: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ApiError(400, f"'{param}' must be a list", param=param)
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"'{param}' entries need function.name", param=param)
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            # OpenAI sends a JSON string; some clients send the object itself.
            arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        calls.append({"id": str(call.get("id") or ""), "name": function["name"], "arguments": arguments})
    return calls


def chat_messages(raw: list[Any]) -> tuple[dict[str, Any], ...]:
    """OpenAI messages as node messages (developer becomes system)."""
    messages = []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{param}' must be an object", param=param)
        role = "system" if item.get("role") == "developer" else item.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(
                400, f"'{param}.role' must be one of system, developer, user, assistant, tool", param=param
            )
        message: dict[str, Any] = {
            "role": role,
            "content": content_text(item.get("content"), f"{param}.content"),
        }
        if role == "assistant" and item.get("tool_calls"):
            message["tool_calls"] = _tool_calls(item["tool_calls"], f"{param}.tool_calls")
        if role == "tool" and isinstance(item.get("tool_call_id"), str):
            message["tool_call_id"] = item["tool_call_id"]
        messages.append(message)
    return tuple(messages)


def _tools(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    tools = []
    for tool in get_list(body, "tools", max_items=128):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ApiError(400, "only tools of type 'function' are supported", param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ApiError(400, "each tool needs a 'function' object", param="tools")
        tools.append(
            tool_definition(
                function.get("name"),
                function.get("description"),
                function.get("parameters"),
                pattern=TOOL_NAME,
                param="tools",
            )
        )
    return tuple(tools)


def _tool_choice(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (
            (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        )
        if isinstance(name, str):
            return name
    raise ApiError(
        400,
        "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _response_format(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(text | json_object | json_schema, the schema): the node constrains decoding to it."""
    value = get_object(body, "response_format")
    kind = (value or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(
            400, "'response_format.type' must be text, json_object or json_schema", param="response_format"
        )
    if kind != "json_schema":
        return kind, None
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(
            400, "'response_format.json_schema.schema' must be a JSON Schema object", param="response_format"
        )
    return kind, schema


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling fields both endpoints share, checked; `n`/`best_of` must be 1."""
    for name in ("n", "best_of"):
        count = get_int(body, name, low=1)
        if count not in (None, 1):
            raise ApiError(400, f"only '{name}': 1 is supported", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        get_number(body, name, low=-2, high=2)
    return {
        "temperature": get_number(body, "temperature", low=0, high=2),
        "top_p": get_number(body, "top_p", low=0, high=1),
        "top_k": get_int(body, "top_k", low=0),
        "min_p": get_number(body, "min_p", low=0, high=1),
        "repetition_penalty": get_number(body, "repetition_penalty", low=0),
        "seed": get_int(body, "seed"),
        "stop": get_stop(body, "stop"),
        # vLLM's extension: decode past end-of-generation tokens up to max_tokens
        # (benchmarks and load tests want replies of a known length).
        "ignore_eos": get_bool(body, "ignore_eos") or None,
    }


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = get_bool(body, "stream")
    return stream, stream and get_bool(get_object(body, "stream_options") or {}, "include_usage")


def parse_chat(body: dict[str, Any], default_max_tokens: int) -> Call:
    model = get_model(body)
    messages = chat_messages(get_list(body, "messages", required=True))
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get_int(body, "top_logprobs", low=0, high=20)
    if top_logprobs and not logprobs:
        raise ApiError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    max_tokens = get_int(body, "max_completion_tokens", low=1) or get_int(body, "max_tokens", low=1)
    stream, include_usage = _stream_options(body)
    sampling = sampling_params(
        **{"temperature": 1.0, **{k: v for k, v in _common(body).items() if v is not None}},
        max_tokens=max_tokens or default_max_tokens,
        top_logprobs=top_logprobs,
    )
    response_format, json_schema = _response_format(body)
    request = generation_request(
        model=model,
        sampling=sampling,
        messages=messages,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        response_format=response_format,
        json_schema=json_schema,
        logprobs=logprobs,
        request_id=new_id("chatcmpl-"),
    )
    return Call(request, stream, include_usage)


def parse_completion(body: dict[str, Any]) -> Call:
    model = get_model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        raise ApiError(400, "only one prompt per request is supported", param="prompt")
    if isinstance(prompt, list):
        raise ApiError(400, "token-id prompts are not supported: send the prompt as text", param="prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' is required and must be a string", param="prompt")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' (fill-in-the-middle) is not supported", param="suffix")
    logprobs = get_int(body, "logprobs", low=0, high=5)
    stream, include_usage = _stream_options(body)
    sampling = sampling_params(
        **{"temperature": 1.0, **{k: v for k, v in _common(body).items() if v is not None}},
        max_tokens=get_int(body, "max_tokens", low=1) or 16,
        top_logprobs=logprobs,
    )
    request = generation_request(
        model=model,
        sampling=sampling,
        prompt=prompt,
        logprobs=logprobs is not None,
        request_id=new_id("cmpl-"),
    )
    echo = prompt if get_bool(body, "echo") else ""
    return Call(request, stream, include_usage, echo=echo, legacy_logprobs=logprobs is not None)


Frames = Callable[[Iterator[dict[str, Any]], Call, int], Iterator[str]]
Build = Callable[[Reply, Call, int], dict[str, Any]]


def _answer(call: Call, route: str, frames: Frames, build: Build) -> Response:
    """Start the generation; stream it as SSE or answer with one object."""
    run = start_run(application.node(), call.request, route)
    created = int(time.time())
    if call.stream:
        return event_stream(errors_in_band(frames(run.events(), call, created)), run.close)
    try:
        reply = collect(run.events())
    except NodeError as error:
        raise api_error(error) from None
    finally:
        run.close()
    return jsonify(build(reply, call, created))


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    call = parse_chat(json_body(), application.settings().inference.default_max_tokens)
    return _answer(call, "openai_chat", chat_frames, chat_completion)


@bp.post("/v1/completions")
def completions() -> Response:
    return _answer(parse_completion(json_body()), "openai_completions", completion_frames, text_completion)


# The routes that generate nothing live in their own module (embeddings, models).
bp.add_url_rule("/v1/embeddings", view_func=openai_extras.embeddings, methods=["POST"])
bp.add_url_rule("/v1/models", view_func=openai_extras.list_models, methods=["GET"])
bp.add_url_rule("/v1/models/<path:model_id>", view_func=openai_extras.retrieve_model, methods=["GET"])
