"""Synchronous client of the DHT process's local socket, and the vocabulary of that socket.

Owns the client side of `<data_dir>/dht.sock`: newline-delimited JSON, one request line
`{"op": ...}` answered by exactly one line `{"ok": true, ...}` or `{"ok": false, "error"}`.
Plain blocking `socket` with a timeout on every call, so it works from the node's threads
and from gevent workers (monkey-patched sockets) alike. One connection per call.

Ops (see `swarm.dht` for the server): publish, lookup, peers, status, invite, bootstrap.

Imports only the standard library and swarm's light modules: never jax or numpy.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from swarm.errors import SwarmError
from swarm.records import PeerRecord, RecordError

SOCKET_NAME = "dht.sock"
STATE_FILE = "dht.json"  # {"pid", "dht": "host:port", "peer_id"}, written once listening
MAX_LINE_BYTES = 16 * 1024 * 1024
# The longest the DHT process works on an op that goes out to the network before it answers;
# the client waits that long beyond its own timeout.
NETWORK_OP_SECONDS = {"publish": 5.0, "lookup": 5.0, "catalog": 5.0, "bootstrap": 10.0}


class DhtUnavailable(SwarmError):
    """The DHT process is not running, or does not answer on its socket."""


class DhtError(SwarmError):
    """The DHT process answered a request with an error."""


class DhtClient:
    """Calls the DHT process of a data dir (or at a socket path ending in `.sock`)."""

    def __init__(self, where: Path | str, timeout: float = 5.0) -> None:
        path = Path(where)
        self.path = path if path.suffix == ".sock" else path / SOCKET_NAME
        self.timeout = timeout

    def publish(self, records: list[dict[str, Any]]) -> int:
        """Replaces this node's announcements: `records` are dicts with model_id, layers [first, end],
        n_layers, address, throughput and load; the DHT process signs and stores them. Returns how
        many it published."""
        return int(self.call("publish", records=records)["published"])

    def lookup(self, model_id: str) -> list[PeerRecord]:
        """The current records of `model_id` in this node's network (its own included)."""
        return _records(self.call("lookup", model_id=model_id)["records"])

    def catalog(self) -> list[PeerRecord]:
        """The current records in this network's catalog: which peers serve which models
        (the newest of them in a large network; `lookup` gives all of one model's)."""
        return _records(self.call("catalog")["records"])

    def peers(self) -> list[dict[str, Any]]:
        """The DHT contacts: peer_id, dht, latency_ms, last_seen, source, network_id, records."""
        return list(self.call("peers")["peers"])

    def status(self) -> dict[str, Any]:
        reply = self.call("status")
        reply.pop("ok", None)
        return reply

    def invite(self) -> str:
        """An invite code (`swarm://…`) through which others can join via this node."""
        return str(self.call("invite")["code"])

    def bootstrap(self, addresses: list[str] | None = None, code: str | None = None) -> int:
        """Joins through DHT endpoints ("host:port") or an invite code; returns the contact count."""
        fields: dict[str, Any] = {}
        if addresses is not None:
            fields["addresses"] = addresses
        if code is not None:
            fields["code"] = code
        return int(self.call("bootstrap", **fields)["contacts"])

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Sends one request and returns the reply; DhtError when it is an error reply."""
        timeout = self.timeout + NETWORK_OP_SECONDS.get(op, 0.0)
        line = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(timeout)
                connection.connect(str(self.path))
                connection.sendall(line)
                reply = _read_line(connection)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DhtUnavailable(f"the DHT process is not running (no answer at {self.path})") from None
        except TimeoutError:
            raise DhtUnavailable(
                f"the DHT process at {self.path} did not answer within {timeout:g} s"
            ) from None
        except OSError as error:
            raise DhtUnavailable(f"cannot reach the DHT process at {self.path}: {error}") from None
        try:
            message = json.loads(reply)
        except ValueError:
            raise DhtUnavailable(f"the DHT process at {self.path} sent a malformed reply") from None
        if not isinstance(message, dict):
            raise DhtUnavailable(f"the DHT process at {self.path} sent a malformed reply")
        if not message.get("ok"):
            raise DhtError(str(message.get("error") or "the DHT process refused the request"))
        return message


def _records(raw: list[Any]) -> list[PeerRecord]:
    records = []
    for item in raw:
        try:
            records.append(PeerRecord.from_dict(item))
        except RecordError:
            continue
    return records


def _read_line(connection: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("the connection closed before a full reply")
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_LINE_BYTES:
            raise ConnectionResetError("the reply is too long")
