"""The control plane's one way to reach the node: a client over the node's unix socket.

Every HTTP handler talks to the node through `NodeClient`; nothing else in
`control/` opens the socket. It uses the plain `socket` module, which gevent
patches in the gunicorn worker, so a slow generation blocks only its own greenlet.
A node that is down or still starting gives `NodeUnavailable` (HTTP 503), never a
hang. Must not import jax.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swarm.node_protocol import (
    ERROR_STATUS,
    MAX_LINE_BYTES,
    GenerationRequest,
    ProtocolError,
    encode,
    parse_message,
)

KEEPALIVE = {"event": "keepalive"}


class NodeUnavailable(Exception):
    """The node process cannot be reached (not started, restarting, or crashed)."""


class NodeError(Exception):
    """The node refused or failed a request; `code` is one of node_protocol.ERROR_STATUS."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code if code in ERROR_STATUS else "internal"
        self.message = message

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]


class LineReader:
    """Lines from a socket with plain recv() and a buffer.

    A socket file object cannot be read again after a timeout, and a timeout is
    routine here (keep-alives while a request waits in the node's queue).
    """

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.buffer = b""

    def read_line(self, timeout_s: float) -> bytes | None:
        """The next line, None at end of stream; TimeoutError after timeout_s of silence."""
        self.connection.settimeout(timeout_s)
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE_BYTES:
                raise ProtocolError("message too large")
            chunk = self.connection.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


class Generation:
    """A running generation: iterate for events; close() (or leaving `with`) cancels it.

    Yields {"event": "keepalive"} whenever the node has been quiet for
    `keepalive_s` (queued behind other work), so SSE writers can send pings.
    """

    def __init__(self, reader: LineReader, first: dict[str, Any], keepalive_s: float):
        self._reader = reader
        self._connection = reader.connection
        self._pending: dict[str, Any] | None = first
        self._keepalive_s = keepalive_s
        self.finished = False
        self.start = first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if self.finished:
            raise StopIteration
        try:
            line = self._reader.read_line(self._keepalive_s)
        except TimeoutError:
            return dict(KEEPALIVE)
        except (OSError, ProtocolError) as error:
            self.close()
            return {"event": "error", "code": "unavailable", "message": f"lost the node: {error}"}
        if line is None:
            self.close()
            return {"event": "error", "code": "unavailable", "message": "the node closed the stream"}
        try:
            event = parse_message(line)
        except ProtocolError as error:
            self.close()
            return {"event": "error", "code": "internal", "message": str(error)}
        if event.get("event") in ("done", "error"):
            self.close()
        return event

    def close(self) -> None:
        """Stop reading; the node sees the closed socket and cancels the work."""
        self.finished = True
        with contextlib.suppress(OSError):
            self._connection.close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NodeClient:
    def __init__(
        self,
        socket_path: Path,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        keepalive_s: float = 10.0,
    ):
        self.socket_path = Path(socket_path)
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.keepalive_s = keepalive_s

    def _connect(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(self.connect_timeout_s)
        try:
            connection.connect(str(self.socket_path))
        except OSError as error:
            connection.close()
            raise NodeUnavailable(
                f"the node is not reachable at {self.socket_path}: {error.strerror or error}"
            ) from None
        return connection

    def _exchange(self, op: str, **fields: Any) -> tuple[LineReader, dict[str, Any]]:
        """Send one request and read the node's first answer line (the connection stays open).

        Raises NodeUnavailable when the node cannot be reached or hangs up, and
        NodeError when its first answer is an error.
        """
        connection = self._connect()
        reader = LineReader(connection)
        try:
            connection.settimeout(self.request_timeout_s)
            connection.sendall(encode({"op": op, **fields}))
            line = reader.read_line(self.request_timeout_s)
            first = parse_message(line) if line is not None else None
        except (OSError, ProtocolError) as error:
            connection.close()
            raise NodeUnavailable(f"the node did not answer {op!r}: {error}") from None
        if first is None or first.get("event") == "error":
            connection.close()
            if first is None:
                raise NodeUnavailable(f"the node closed the connection during {op!r}")
            raise NodeError(str(first.get("code")), str(first.get("message")))
        return reader, first

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, one answer; raises NodeError for an error answer."""
        reader, answer = self._exchange(op, **fields)
        reader.connection.close()
        return answer

    def health(self) -> dict[str, Any]:
        return self.call("health")

    def info(self) -> dict[str, Any]:
        return self.call("info")

    def count_tokens(self, request: GenerationRequest) -> int:
        return int(self.call("count_tokens", request=request.to_dict())["prompt_tokens"])

    def embed(self, model: str, inputs: list[str] | list[list[int]]) -> dict[str, Any]:
        """{"model", "embeddings": [[float]], "prompt_tokens"} for each input."""
        return self.call("embed", model=model, inputs=inputs)

    def generate(self, request: GenerationRequest) -> Generation:
        """Start a generation; raises NodeError if the node refuses it up front."""
        reader, first = self._exchange("generate", request=request.to_dict())
        return Generation(reader, first, self.keepalive_s)
