"""A node backend with hand-checkable output, for control-plane tests without a model.

The mock model "mock-1" counts: a prompt of N words (whitespace-split, after the
messages are joined) has N prompt tokens, and generation emits the words
"w0 w1 w2 ..." one token each until max_tokens (finish "length") or until the word
"w{stop_after}" when the prompt contains "stop_after=K" (finish "stop"). A prompt
containing "cached=K" reports its first K tokens as taken from the prefix cache. Stop
strings apply to the joined text. A forced tool call emits
`{"name": <first forced name>, "arguments": {"step": 1}}` as a tool call;
`response_format: json_object` emits `{"answer": 42}`. `delay_s` sleeps per step
so tests can see concurrency and cancellation. The context window is 4096 words.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from swarm.errors import ContextOverflowError, UnknownModelError
from swarm.generate import StopScanner
from swarm.node_protocol import GenerationRequest

MODEL_ID = "mock-1"
CONTEXT = 4096
DIMENSIONS = 8


@dataclass
class Prepared:
    request: GenerationRequest
    words: list[str]


class MockBackend:
    def __init__(self, *, delay_s: float = 0.0, state: str = "ready"):
        self.delay_s = delay_s
        self.state = state
        self.started_runs = 0
        self.cancelled_runs = 0

    def info(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "id": MODEL_ID,
                    "context_length": CONTEXT,
                    "architecture": "mock",
                    "n_layers": 2,
                    "layers": [0, 2],
                    "embedding_length": DIMENSIONS,
                    "aliases": ["default"],
                    # A node's load figures (each run counted as one batched step).
                    "batch": {
                        "slots": 4,
                        "in_use": 0,
                        "context": CONTEXT,
                        "steps": self.started_runs,
                        "rows": self.started_runs,
                        "mean_rows": 1.0,
                        "widest": 1,
                        "prompt_calls": self.started_runs,
                        "prompt_chunks": 2 * self.started_runs,
                    },
                    "prefix_cache": {
                        "bytes": 3 * 2**20,
                        "budget_bytes": 256 * 2**20,
                        "hits": 2,
                        "misses": 5,
                        "reused_tokens": 128,
                    },
                }
            ]
        }

    def _resolve(self, model: str) -> str:
        if model in (MODEL_ID, "default", "") or model.startswith("claude"):
            return MODEL_ID
        raise UnknownModelError(f"model {model!r} is not served here (available: {MODEL_ID})")

    def prepare(self, request: GenerationRequest) -> Prepared:
        self._resolve(request.model)
        if request.prompt is not None:
            text = request.prompt
        else:
            text = " ".join(m.get("content") or "" for m in request.messages or ())
        words = text.split()
        if len(words) + 1 > CONTEXT:
            raise ContextOverflowError(
                f"prompt is too long: {len(words)} tokens, the context window is {CONTEXT} tokens"
            )
        return Prepared(request, words)

    def prompt_tokens(self, prepared: Prepared) -> int:
        return len(prepared.words)

    def served_model(self, prepared: Prepared) -> str:
        return MODEL_ID

    def start(self, prepared: Prepared) -> dict[str, Any]:
        return {
            "event": "start",
            "model": MODEL_ID,
            "prompt_tokens": len(prepared.words),
            "cached_tokens": _cached(prepared),
        }

    def run(self, prepared: Prepared) -> Iterator[dict[str, Any]]:
        self.started_runs += 1
        finished = False
        try:
            for event in self._events(prepared):
                finished = event["event"] == "done"
                yield event
        except GeneratorExit:
            if not finished:
                self.cancelled_runs += 1
            raise

    def _events(self, prepared: Prepared) -> Iterator[dict[str, Any]]:
        request = prepared.request
        done = {
            "event": "done",
            "prompt_tokens": len(prepared.words),
            "cached_tokens": _cached(prepared),
            "stop_sequence": None,
        }
        if request.forced_tools:
            yield {"event": "tool_call", "index": 0, "id": "call_mock0", "name": request.forced_tools[0]}
            for piece in ('{"step"', ": 1}"):
                self._pause()
                yield {"event": "arguments", "index": 0, "delta": piece}
            yield {**done, "finish_reason": "tool_calls", "completion_tokens": 2}
            return
        if request.response_format in ("json_object", "json_schema"):
            for index, piece in enumerate(('{"answer"', ": 42}")):
                self._pause()
                yield {"event": "text", "text": piece, "token_id": index}
            yield {**done, "finish_reason": "stop", "completion_tokens": 2}
            return
        match = re.search(r"stop_after=(\d+)", " ".join(prepared.words))
        stop_after = int(match.group(1)) if match and not request.sampling.ignore_eos else None
        scanner = StopScanner(request.sampling.stop)
        # As the engine does, generation ends where the context window does.
        budget = min(request.sampling.max_tokens, CONTEXT - len(prepared.words))
        for step in range(budget):
            self._pause()
            word = f"w{step}"
            if stop_after is not None and step == stop_after:
                yield {**done, "finish_reason": "stop", "completion_tokens": step}
                return
            event: dict[str, Any] = {"event": "text", "text": scanner.push(word + " "), "token_id": step}
            if request.logprobs:
                event["logprob"] = -0.5
                top = request.sampling.top_logprobs
                event["top_logprobs"] = [
                    {"token": f"w{step}" if k == 0 else f"x{k}", "logprob": -0.5 - k, "bytes": None}
                    for k in range(top)
                ]
            yield event
            if scanner.stopped:
                stop = next(s for s in request.sampling.stop if s)
                yield {**done, "finish_reason": "stop", "completion_tokens": step + 1, "stop_sequence": stop}
                return
        yield {**done, "finish_reason": "length", "completion_tokens": budget}

    def embed(self, model: str, inputs: list[Any]) -> Iterator[dict[str, Any]]:
        self._resolve(model)
        embeddings, tokens = [], 0
        for text in inputs:
            words = text.split() if isinstance(text, str) else [str(t) for t in text]
            tokens += len(words)
            vector = [float(len(words) + k) for k in range(DIMENSIONS)]
            norm = sum(v * v for v in vector) ** 0.5
            embeddings.append([v / norm for v in vector])
        yield {"event": "result", "model": MODEL_ID, "embeddings": embeddings, "prompt_tokens": tokens}

    def _pause(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


def _cached(prepared: Prepared) -> int:
    match = re.search(r"cached=(\d+)", " ".join(prepared.words))
    return min(int(match.group(1)), len(prepared.words) - 1) if match else 0


def json_arguments(events: list[dict[str, Any]]) -> Any:
    """The arguments of the first tool call in a list of node events."""
    return json.loads("".join(e["delta"] for e in events if e.get("event") == "arguments"))
