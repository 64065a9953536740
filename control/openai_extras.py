"""The routes of the OpenAI dialect that generate nothing: embeddings and models.

control.openai_api registers them on its blueprint. `/v1/models` answers with ONE
payload that both SDKs parse (api-wire-formats.md §3.2 "Models"): OpenAI's
`object`/`created`/`owned_by` and Anthropic's `type`/`display_name`/`created_at`
on every model. Each served model is also listed as `claude-swarm-<id>`, because
Claude Code shows only ids starting with "claude" (§3.3); the node maps any
"claude-*" name to its model. Must not import jax.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from datetime import UTC, datetime
from typing import Any

from flask import Response, jsonify, request

from control import app as application
from control.dialect import api_error, get_int, get_list, get_model, get_string
from control.errors import ApiError
from control.metrics import GenerationTracker
from control.middleware import json_body
from control.node_client import NodeError

MAX_EMBEDDING_INPUTS = 2048
ALIAS_PREFIX = "claude-swarm-"


def embedding_inputs(body: dict[str, Any]) -> list[str] | list[list[int]]:
    """`input` as a list of texts or a list of token-id lists (one flat id list is one input)."""
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    items = get_list({"input": value}, "input", required=True, max_items=MAX_EMBEDDING_INPUTS)
    if all(isinstance(item, str) for item in items):
        if not all(items):
            raise ApiError(400, "'input' must not contain empty strings", param="input")
        return items
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return [items]
    if all(isinstance(item, list) and item and all(_is_id(token) for token in item) for item in items):
        return items
    raise ApiError(
        400,
        "'input' must be a string, a list of strings, or token ids (a list of ints or of int lists)",
        param="input",
    )


def _is_id(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and token >= 0


def shorten(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` components, scaled back to unit length (OpenAI's `dimensions`)."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in head))
    return [value / norm for value in head] if norm > 0 else head


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64: what the openai SDK decodes by default."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings() -> Response:
    body = json_body()
    model = get_model(body)
    inputs = embedding_inputs(body)
    encoding = get_string(body, "encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = get_int(body, "dimensions", low=1)
    tracker = GenerationTracker("openai_embeddings")
    try:
        result = application.node().embed(model, inputs)
        tracker.finish(int(result.get("prompt_tokens") or 0), 0)
    except NodeError as error:
        raise api_error(error) from None
    finally:
        tracker.abandon()
    data = []
    for index, vector in enumerate(result["embeddings"]):
        if dimensions is not None and dimensions > len(vector):
            raise ApiError(
                400,
                f"'dimensions' is {dimensions} but the model's embeddings have {len(vector)}",
                param="dimensions",
            )
        if dimensions is not None:
            vector = shorten(vector, dimensions)
        embedding: list[float] | str = encode_base64(vector) if encoding == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = int(result.get("prompt_tokens") or 0)
    return jsonify(
        {
            "object": "list",
            "data": data,
            "model": result.get("model", model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def model_entries(info: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """Every id this node answers to, in the merged OpenAI + Anthropic shape: its own model
    (`owned_by` "swarm") and the models peers serve whole, which requests are handed to
    (`owned_by` "network")."""
    # "created" is when the node started serving: stable for its lifetime.
    started = int((now if now is not None else time.time()) - float(info.get("uptime_s") or 0))
    created_at = datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries = []

    def entry(name: str, display_name: str, owner: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": owner,
            "type": "model",
            "display_name": display_name,
            "created_at": created_at,
            "lifecycle": "active",
        }

    for model in info.get("models") or ():
        names = [model["id"]]
        if not model["id"].startswith("claude"):
            names.append(ALIAS_PREFIX + model["id"])
        context = int(model.get("context_length") or 0)
        for name in names:
            display_name = model["id"] if name == model["id"] else f"{model['id']} (swarm)"
            entries.append(
                {
                    **entry(name, display_name, "swarm"),
                    "context_length": context,
                    "max_input_tokens": context,
                    "max_tokens": context,
                }
            )
    own = {entry["id"] for entry in entries}
    for model in info.get("network_models") or ():
        if isinstance(model, dict) and isinstance(model.get("id"), str) and model["id"] not in own:
            entries.append(
                {**entry(model["id"], model["id"], "network"), "peers": int(model.get("peers") or 0)}
            )
    return entries


def list_models() -> Response:
    limit = get_int({"limit": request.args.get("limit", type=int)}, "limit", low=1)
    if "limit" in request.args and limit is None:
        raise ApiError(400, "'limit' must be an integer", param="limit")
    entries = model_entries(application.node().info())
    # Anthropic's cursor pagination: the SDK asks again `after_id` the last id while has_more.
    ids = [entry["id"] for entry in entries]
    if request.args.get("after_id") in ids:
        entries = entries[ids.index(request.args["after_id"]) + 1 :]
    elif request.args.get("before_id") in ids:
        entries = entries[: ids.index(request.args["before_id"])]
    data = entries[:limit] if limit else entries
    return jsonify(
        {
            "object": "list",
            "data": data,
            "has_more": len(data) < len(entries),
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


def retrieve_model(model_id: str) -> Response:
    for entry in model_entries(application.node().info()):
        if entry["id"] == model_id:
            return jsonify(entry)
    raise ApiError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
