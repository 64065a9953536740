"""Server-sent events framing shared by the OpenAI and Anthropic streaming routes.

Owns the frame encoders (`data:` only for OpenAI, `event:` plus `data:` for
Anthropic, whose SDK skips events without an `event:` line) and `event_stream`,
which turns a generator of frames into a Flask response that never buffers and
always cancels the node's generation when the stream ends for any reason: done,
error, or the client hanging up (the WSGI server then closes the response, which
raises GeneratorExit into the generator). Must not import jax.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

# OpenAI ends every stream with this frame (api-wire-formats.md §3.1).
DONE_FRAME = "data: [DONE]\n\n"
# A comment line: clients ignore it, proxies see traffic (the SSE spec's keep-alive idiom).
KEEPALIVE_FRAME = ": keep-alive\n\n"

HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and friends buffer responses unless told not to.
    "X-Accel-Buffering": "no",
}


def encode_json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def data_frame(payload: Any) -> str:
    """One `data:` event; the blank line ends it (one newline would merge two events)."""
    return f"data: {encode_json(payload)}\n\n"


def event_frame(name: str, payload: Any) -> str:
    """One named event, as Anthropic streams them: `event: <type>` then `data: <json>`."""
    return f"event: {name}\ndata: {encode_json(payload)}\n\n"


def event_stream(frames: Iterator[str], on_close: Callable[[], None]) -> Response:
    """A text/event-stream response of `frames`; `on_close` runs exactly when the stream ends.

    `on_close` also runs if the server closes the response before ever iterating it
    (a generator that never started skips its own `finally`).
    """
    closed = False

    def close_once() -> None:
        nonlocal closed
        if not closed:
            closed = True
            on_close()

    def guarded() -> Iterator[str]:
        try:
            yield from frames
        finally:
            close_once()

    response = Response(guarded(), mimetype="text/event-stream", headers=HEADERS)
    response.call_on_close(close_once)
    return response
