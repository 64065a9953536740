"""The seven MCP tools: their input schemas, argument checks and implementations.

Owns `TOOLS` (what `tools/list` shows), `call_tool` (what `tools/call` runs) and
`ToolError`, the failure a caller's model sees as an `isError` result with a
readable message (MCP 2025-11-25 tools spec: bad arguments and execution failures
are results, not JSON-RPC errors, so the model can correct itself). The tool set
and argument defaults follow the reference product (product-design-notes §6).
Every tool gets the node client passed in; this module knows nothing of HTTP or
JSON-RPC and must not import jax or Flask.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import swarm
from control.metrics import GenerationTracker
from control.node_client import NodeClient, NodeError, NodeUnavailable
from control.openai_render import usage as openai_usage
from swarm.errors import InvalidRequestError
from swarm.node_protocol import GenerationRequest
from swarm.sampling import SamplingParams

MAX_TOKENS_CAP = 4096
FAN_OUT_CONCURRENCY = 4  # generations in flight at once for compare/research/batch
UNREACHABLE = "the node is not reachable (starting or down)"


class ToolError(Exception):
    """A tool failed in a way the calling model should read (an isError result)."""


# --- input schemas (JSON Schema objects, checked by hand with clear messages) -------------


def _max_tokens(default: int) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_TOKENS_CAP,
        "default": default,
        "description": f"Most tokens to generate per answer (1-{MAX_TOKENS_CAP}).",
    }


TEMPERATURE = {
    "type": "number",
    "minimum": 0,
    "maximum": 2,
    "default": 0.7,
    "description": "Sampling temperature (0 = greedy, up to 2).",
}
SYSTEM = {"type": "string", "description": "Optional system prompt."}
MODEL = {"type": "string", "description": "Model id as listed by the models tool."}
PROMPT = {"type": "string", "description": "The user prompt."}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


MESSAGE = _object(
    {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
    ("role", "content"),
)
TASK = _object(
    {
        "id": {"type": "string", "description": "Your name for this task; results are keyed by it."},
        "model": MODEL,
        "prompt": PROMPT,
        "system": SYSTEM,
        "max_tokens": _max_tokens(1024),
        "temperature": TEMPERATURE,
    },
    ("id", "model", "prompt"),
)


def _check(value: Any, schema: dict[str, Any], path: str) -> Any:
    """`value` checked against the subset of JSON Schema used here, with defaults filled in."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise ToolError(f"{path} must be an object")
        properties = schema["properties"]
        for key in value:
            if key not in properties:
                known = ", ".join(properties) or "none"
                raise ToolError(f"{path}.{key} is not a known argument (known: {known})")
        for key in schema.get("required", ()):
            if value.get(key) is None:
                raise ToolError(f"{path}.{key} is required")
        checked = {}
        for key, field_schema in properties.items():
            if value.get(key) is not None:
                checked[key] = _check(value[key], field_schema, f"{path}.{key}")
            elif "default" in field_schema:
                checked[key] = field_schema["default"]
        return checked
    if kind == "array":
        items = schema["items"]
        noun = {"string": "strings", "object": "objects"}[items["type"]]
        if not isinstance(value, list):
            raise ToolError(f"{path} must be a list of {noun}")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if len(value) < low or (high is not None and len(value) > high):
            limit = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ToolError(f"{path} must have {limit} items, got {len(value)}")
        if items["type"] == "string" and not all(isinstance(item, str) for item in value):
            raise ToolError(f"{path} must be a list of strings")
        return [_check(item, items, f"{path}[{index}]") for index, item in enumerate(value)]
    if kind == "string":
        if not isinstance(value, str):
            raise ToolError(f"{path} must be a string")
        if "enum" in schema and value not in schema["enum"]:
            raise ToolError(f"{path} must be one of {', '.join(schema['enum'])}, got {value!r}")
        return value
    # integer or number; JSON has one number type, so 512.0 is accepted as an integer.
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind == "integer" and not integral):
        raise ToolError(f"{path} must be {'an integer' if kind == 'integer' else 'a number'}")
    if not schema["minimum"] <= value <= schema["maximum"]:
        raise ToolError(f"{path} must be between {schema['minimum']} and {schema['maximum']}, got {value}")
    return int(value) if kind == "integer" else float(value)


# --- generation ------------------------------------------------------------------------


def _messages(prompt: str, system: str | None) -> list[dict[str, Any]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def generate(
    node: NodeClient, model: str, messages: list[dict[str, Any]], *, temperature: float, max_tokens: int
) -> dict[str, Any]:
    """One non-streaming generation: {model, content, usage, finish_reason}.

    Raises NodeUnavailable, NodeError (refused or failed) or InvalidRequestError.
    """
    request = GenerationRequest(
        model=model,
        sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens),
        messages=tuple(messages),
        request_id=f"mcp-{uuid.uuid4().hex}",
    )
    tracker = GenerationTracker("mcp")
    try:
        with node.generate(request) as generation:
            served = str(generation.start.get("model") or model)
            pieces: list[str] = []
            for event in generation:
                kind = event.get("event")
                if kind == "text":
                    tracker.token()
                    pieces.append(str(event.get("text", "")))
                elif kind == "error":
                    raise NodeError(str(event.get("code")), str(event.get("message")))
                elif kind == "done":
                    prompt_tokens, completion_tokens = event["prompt_tokens"], event["completion_tokens"]
                    tracker.finish(prompt_tokens, completion_tokens)
                    usage = openai_usage(
                        prompt_tokens, completion_tokens, int(event.get("cached_tokens") or 0)
                    )
                    return {
                        "model": served,
                        "content": "".join(pieces),
                        "usage": usage,
                        "finish_reason": event.get("finish_reason"),
                    }
    finally:
        tracker.abandon()
    raise NodeUnavailable("the node ended the generation without a result")


def _attempt(node: NodeClient, model: str, messages: list[dict[str, Any]], **sampling: Any) -> dict[str, Any]:
    """A generation whose refusal is reported, not raised: status ok or error."""
    try:
        return {"status": "ok", **generate(node, model, messages, **sampling)}
    except (NodeError, InvalidRequestError) as error:
        return {"model": model, "status": "error", "error": getattr(error, "message", str(error))}


def _run_all(jobs: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run jobs a few at a time (threads, which are greenlets under gunicorn's gevent
    workers); the node batches concurrent generations. Re-raises the first exception."""
    results: list[Any] = [None] * len(jobs)
    pending = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            try:
                results[index] = jobs[index]()
            except Exception as error:
                results[index] = error

    threads = [
        threading.Thread(target=worker, daemon=True) for _ in range(min(FAN_OUT_CONCURRENCY, len(jobs)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _section(title: str, entry: dict[str, Any]) -> str:
    body = entry["content"] if entry["status"] == "ok" else f"error: {entry['error']}"
    return f"### {title}\n{body}"


def _served_models(node: NodeClient) -> list[dict[str, Any]]:
    """This node's model, then the models peers serve whole (`"network": true`), which it
    hands requests to."""
    info = node.info()
    network = [{**model, "network": True} for model in info.get("network_models") or [] if model.get("id")]
    return [*(info.get("models") or []), *network]


# --- the registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[NodeClient, dict[str, Any]], tuple[str, dict[str, Any]]]
    idempotent: bool = False  # generation samples, so asking twice may answer differently

    def describe(self) -> dict[str, Any]:
        """The tools/list entry (MCP 2025-11-25 Tool)."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "inputSchema": self.input_schema,
            # No tool changes anything or reaches past this node.
            "annotations": {
                "title": self.title,
                "readOnlyHint": True,
                "destructiveHint": False,
                "idempotentHint": self.idempotent,
                "openWorldHint": False,
            },
        }


TOOLS: dict[str, Tool] = {}
Run = Callable[[NodeClient, dict[str, Any]], tuple[str, dict[str, Any]]]


def _tool(title: str, description: str, input_schema: dict[str, Any], *, idempotent: bool = False):
    """Registers the decorated function as the tool of the same name, in listing order."""

    def register(run: Run) -> Run:
        TOOLS[run.__name__] = Tool(run.__name__, title, description, input_schema, run, idempotent)
        return run

    return register


# --- the tools -------------------------------------------------------------------------


@_tool(
    "Chat",
    "Send a conversation to a model served by this node and get its reply.",
    _object(
        {
            "model": MODEL,
            "messages": {"type": "array", "items": MESSAGE, "minItems": 1, "maxItems": 4096},
            "temperature": TEMPERATURE,
            "max_tokens": _max_tokens(1024),
        },
        ("model", "messages"),
    ),
)
def chat(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    try:
        result = generate(
            node,
            arguments["model"],
            arguments["messages"],
            temperature=arguments["temperature"],
            max_tokens=arguments["max_tokens"],
        )
    except (NodeError, InvalidRequestError) as error:
        raise ToolError(getattr(error, "message", str(error))) from None
    return result["content"], result


@_tool(
    "List models",
    "List the models this node serves, with context length and size, and the models peers"
    " in its network serve, which it hands requests to.",
    _object({}),
    idempotent=True,
)
def models(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    served = _served_models(node)
    lines = [
        f"{m['id']}: served by {m.get('peers')} peer(s) in the network, {m.get('n_layers')} layers"
        if m.get("network")
        else f"{m['id']}: context {m.get('context_length')} tokens, {m.get('architecture')}, "
        f"{m.get('n_layers')} layers, aliases {', '.join(m.get('aliases') or []) or 'none'}"
        for m in served
    ]
    return "\n".join(lines) or "no model is served", {"models": served}


@_tool(
    "Compare models",
    "Run one prompt on several models (up to 10) and show their answers side by side.",
    _object(
        {
            "prompt": PROMPT,
            "models": {"type": "array", "items": MODEL, "minItems": 1, "maxItems": 10},
            "system": SYSTEM,
            "temperature": TEMPERATURE,
            "max_tokens": _max_tokens(1024),
        },
        ("prompt", "models"),
    ),
)
def compare(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    messages = _messages(arguments["prompt"], arguments.get("system"))
    sampling = {"temperature": arguments["temperature"], "max_tokens": arguments["max_tokens"]}
    results = _run_all([lambda m=m: _attempt(node, m, messages, **sampling) for m in arguments["models"]])
    for name, entry in zip(arguments["models"], results, strict=True):
        entry["requested"] = name
    text = "\n\n".join(_section(f"{e['requested']} ({e['status']})", e) for e in results)
    return text, {"prompt": arguments["prompt"], "results": results}


SYNTHESIS = (
    "Question: {question}\n\nHere are answers from several models:\n\n{answers}\n\n"
    "Write the best possible answer to the question: keep what is correct and useful in these "
    "answers, fix their mistakes, and answer directly."
)
REFINEMENT = (
    "Question: {question}\n\nHere is a first answer:\n\n{answers}\n\n"
    "Write the best possible answer to the question: check this answer, fix its mistakes, "
    "make it clearer, and answer directly."
)


@_tool(
    "Research",
    "Ask several models a question, then have one synthesise the best answer from theirs.",
    _object(
        {
            "question": {"type": "string", "description": "The question to research."},
            "system": SYSTEM,
            "models": {
                "type": "array",
                "items": MODEL,
                "maxItems": 10,
                "description": "Default: every served model.",
            },
            "max_models": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5},
            "max_tokens": _max_tokens(2048),
        },
        ("question",),
    ),
)
def research(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    names = arguments.get("models") or [m["id"] for m in _served_models(node)]
    names = names[: arguments["max_models"]]
    if not names:
        raise ToolError("no model is served, so there is nobody to ask")
    question, system = arguments["question"], arguments.get("system")
    sampling = {"temperature": 0.7, "max_tokens": arguments["max_tokens"]}
    answers = _run_all(
        [lambda m=m: _attempt(node, m, _messages(question, system), **sampling) for m in names]
    )
    good = [a for a in answers if a["status"] == "ok"]
    if not good:
        raise ToolError("every model failed: " + "; ".join(f"{a['model']}: {a['error']}" for a in answers))
    template = SYNTHESIS if len(good) > 1 else REFINEMENT
    listing = "\n\n".join(f"[Answer {i + 1}, from {a['model']}]\n{a['content']}" for i, a in enumerate(good))
    prompt = template.format(question=question, answers=listing)
    synthesis = _attempt(node, good[0]["model"], _messages(prompt, system), **sampling)
    text = "\n\n".join(
        [
            *(_section(f"{a['model']} ({a['status']})", a) for a in answers),
            _section(f"Synthesis by {good[0]['model']}", synthesis),
        ]
    )
    return text, {"question": question, "answers": answers, "synthesis": synthesis}


@_tool(
    "Batch prompts",
    "Run up to 50 independent prompts; each result is keyed by its task id.",
    _object({"tasks": {"type": "array", "items": TASK, "minItems": 1, "maxItems": 50}}, ("tasks",)),
)
def batch_prompts(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    tasks = arguments["tasks"]
    ids = [task["id"] for task in tasks]
    if len(set(ids)) != len(ids):
        raise ToolError("arguments.tasks ids must be unique")
    jobs = [
        lambda t=t: _attempt(
            node,
            t["model"],
            _messages(t["prompt"], t.get("system")),
            temperature=t["temperature"],
            max_tokens=t["max_tokens"],
        )
        for t in tasks
    ]
    results = dict(zip(ids, _run_all(jobs), strict=True))
    text = "\n\n".join(
        _section(f"{key} ({entry['model']}, {entry['status']})", entry) for key, entry in results.items()
    )
    succeeded = sum(entry["status"] == "ok" for entry in results.values())
    return text, {"results": results, "succeeded": succeeded, "failed": len(results) - succeeded}


@_tool(
    "Delegate",
    "Hand a prompt to a model picked by tier: fast or cheap (the smallest served model) or smart (the largest).",
    _object(
        {
            "prompt": PROMPT,
            "tier": {"type": "string", "enum": ["fast", "cheap", "smart"]},
            "system": SYSTEM,
            "max_tokens": _max_tokens(1024),
        },
        ("prompt", "tier"),
    ),
)
def delegate(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    served = _served_models(node)
    if not served:
        raise ToolError("no model is served, so there is nobody to delegate to")

    # A model's size in this sense: its depth times its width, from the GGUF metadata.
    def size(model: dict[str, Any]) -> int:
        return int(model.get("n_layers") or 0) * int(model.get("embedding_length") or 0)

    tier = arguments["tier"]
    chosen = (max if tier == "smart" else min)(served, key=size)["id"]
    messages = _messages(arguments["prompt"], arguments.get("system"))
    try:
        result = generate(node, chosen, messages, temperature=0.7, max_tokens=arguments["max_tokens"])
    except (NodeError, InvalidRequestError) as error:
        raise ToolError(getattr(error, "message", str(error))) from None
    return f"[answered by {result['model']}, tier {tier}]\n{result['content']}", {"tier": tier, **result}


@_tool(
    "Node info",
    "Show this node's health: state, queue, models, uptime and version.",
    _object({}),
    idempotent=True,
)
def node_info(node: NodeClient, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    info = node.info()
    structured = {
        "state": info.get("state"),
        "version": swarm.__version__,
        "uptime_s": info.get("uptime_s"),
        "queue": info.get("queue"),
        "totals": info.get("totals"),
        "models": info.get("models") or [],
    }
    return json.dumps(structured, indent=2), structured


def call_tool(node: NodeClient, name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check the arguments and run tool `name` (which must be in TOOLS).

    Raises ToolError with a message meant for the calling model.
    """
    tool = TOOLS[name]
    checked = _check(arguments, tool.input_schema, "arguments")
    try:
        return tool.run(node, checked)
    except NodeUnavailable:
        raise ToolError(UNREACHABLE) from None
    except NodeError as error:
        raise ToolError(error.message) from None
