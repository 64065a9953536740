"""Signed DHT records: what a node announces about the layers it serves, and how sets of them merge.

Owns `PeerRecord` (one publisher, one model, one layer range, signed by the publisher's
identity key), the canonical bytes that are signed, the DHT key a model's records live
under, and the record-set format that travels in the DHT: JSON text of a list of record
dicts (bytes as hex). Everything read from the network is untrusted: `from_dict` checks
every field, `decode_set` never raises, and `merge` keeps only records whose signature,
peer id, network and lifetime check out.

Imports only the standard library and swarm's light modules: never jax or numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify

# Domain separation: a record signature can never be mistaken for any other signature.
SIGNING_PREFIX = b"swarm-record-v1\0"
CLOCK_SKEW_S = 60.0  # how far in the future a record's `issued` may lie
MAX_LIFETIME_S = 24 * 3600.0
MAX_RECORDS = 64  # per DHT key, newest first
# One publisher cannot crowd the others out of a key by announcing many ranges.
MAX_RECORDS_PER_PEER = 8
MAX_SET_BYTES = 256 * 1024  # a longer record set is garbage, not parsed
# Printable ASCII only, so a record's JSON size is bounded (64 records fit one UDP datagram).
_MAX_TEXT = {"network_id": 64, "model_id": 128, "address": 100, "dht": 100}
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_PEER_ID = re.compile(r"[a-z2-7]{32}")
_MAX_LAYERS = 1 << 20


class RecordError(SwarmError):
    """A record that is malformed: a missing field, a wrong type, length or range."""


def record_key(network_id: str, model_id: str) -> str:
    """The DHT key under which the records of `model_id` in network `network_id` are stored."""
    return f"swarm/{network_id}/model/{model_id}"


def catalog_key(network_id: str) -> str:
    """The DHT key every publisher of network `network_id` also stores its records under: the
    network's catalog, from which a node learns which models are served at all (it holds the
    newest `MAX_RECORDS`, so in a large network a sample of them; a model's own key holds them all)."""
    return f"swarm/{network_id}/catalog"


@dataclass(frozen=True)
class PeerRecord:
    """One publisher's signed claim: it serves `layers` (end exclusive) of `model_id` at `address`."""

    peer_id: str
    public_key: bytes  # 32-byte Ed25519 key; peer_id is derived from it
    network_id: str
    model_id: str
    layers: tuple[int, int]
    n_layers: int  # the model's total layer count
    address: str  # "host:port" of the publisher's TCP stage server
    dht: str  # "host:port" of the publisher's DHT UDP endpoint
    throughput: float  # layers per second the publisher decodes
    load: float  # active sessions
    issued: float  # unix time
    expires: float  # unix time
    signature: bytes  # 64-byte Ed25519 signature over `signing_bytes()`

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not _PEER_ID.fullmatch(self.peer_id):
            raise RecordError("peer_id must be 32 characters of a-z and 2-7")
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_BYTES)
        _check_bytes("signature", self.signature, SIGNATURE_BYTES)
        for name, limit in _MAX_TEXT.items():
            value = getattr(self, name)
            if not isinstance(value, str) or not _PRINTABLE.fullmatch(value) or len(value) > limit:
                raise RecordError(f"{name} must be 1 to {limit} printable ASCII characters")
        if not _is_int(self.n_layers) or not 1 <= self.n_layers <= _MAX_LAYERS:
            raise RecordError(f"n_layers must be an integer from 1 to {_MAX_LAYERS}")
        layers = self.layers
        if not (
            isinstance(layers, tuple)
            and len(layers) == 2
            and all(_is_int(bound) for bound in layers)
            and 0 <= layers[0] < layers[1] <= self.n_layers
        ):
            raise RecordError(
                f"layers must be [first, end] with 0 <= first < end <= n_layers, got {list(layers)!r:.40}"
            )
        for name in ("throughput", "load", "issued", "expires"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value < 0:
                raise RecordError(f"{name} must be a finite number >= 0")

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        network_id: str,
        model_id: str,
        layers: tuple[int, int],
        n_layers: int,
        address: str,
        dht: str,
        throughput: float,
        load: float,
        ttl: float,
        now: float | None = None,
    ) -> PeerRecord:
        """A record signed by `identity`, valid from `now` for `ttl` seconds."""
        issued = time.time() if now is None else now
        unsigned = cls(
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            network_id=network_id,
            model_id=model_id,
            layers=_layer_pair(layers),
            n_layers=n_layers,
            address=address,
            dht=dht,
            throughput=_number("throughput", throughput),
            load=_number("load", load),
            issued=float(issued),
            expires=float(issued) + _number("ttl", ttl),
            signature=bytes(SIGNATURE_BYTES),
        )
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))

    def signing_bytes(self) -> bytes:
        """The canonical encoding of every field but the signature: what the publisher signs."""
        fields = self.to_dict()
        del fields["signature"]
        return SIGNING_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: bytes as hex, layers as a two-item list."""
        return {
            "peer_id": self.peer_id,
            "public_key": self.public_key.hex(),
            "network_id": self.network_id,
            "model_id": self.model_id,
            "layers": list(self.layers),
            "n_layers": self.n_layers,
            "address": self.address,
            "dht": self.dht,
            "throughput": self.throughput,
            "load": self.load,
            "issued": self.issued,
            "expires": self.expires,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> PeerRecord:
        """The record in `raw` (as `to_dict` makes it); RecordError on anything malformed."""
        if not isinstance(raw, dict):
            raise RecordError("a record must be an object")
        missing = sorted(set(_FIELDS) - set(raw))
        if missing:
            raise RecordError(f"record lacks {', '.join(missing)}")
        return cls(
            peer_id=raw["peer_id"],
            public_key=_hex("public_key", raw["public_key"]),
            network_id=raw["network_id"],
            model_id=raw["model_id"],
            layers=_layer_pair(raw["layers"]),
            n_layers=raw["n_layers"],
            address=raw["address"],
            dht=raw["dht"],
            throughput=_number("throughput", raw["throughput"]),
            load=_number("load", raw["load"]),
            issued=_number("issued", raw["issued"]),
            expires=_number("expires", raw["expires"]),
            signature=_hex("signature", raw["signature"]),
        )

    def valid(self, network_id: str, now: float | None = None) -> bool:
        """Whether the record is genuine, current and of network `network_id`."""
        now = time.time() if now is None else now
        return (
            self.network_id == network_id
            and self.issued <= now + CLOCK_SKEW_S
            and self.issued < self.expires
            and now < self.expires
            and self.expires - self.issued <= MAX_LIFETIME_S
            and peer_id_of(self.public_key) == self.peer_id
            and verify(self.public_key, self.signing_bytes(), self.signature)
        )


_FIELDS = tuple(item.name for item in dataclasses.fields(PeerRecord))


def merge(
    values: Iterable[Iterable[PeerRecord]], network_id: str | None = None, now: float | None = None
) -> list[PeerRecord]:
    """One record per (publisher, model, layer range), the newest `issued` winning, newest first.

    Drops every record that is not `valid` for `network_id` (None: for the network the record
    names itself, as a DHT node storing any network's keys does). Keeps at most
    `MAX_RECORDS_PER_PEER` per publisher and `MAX_RECORDS` in all.
    """
    now = time.time() if now is None else now
    # Identical copies arrive from many nodes; each distinct record is verified once.
    unique = {record for records in values for record in records}
    newest: dict[tuple[str, str, tuple[int, int]], PeerRecord] = {}
    for record in sorted(unique, key=lambda record: (record.issued, record.signature), reverse=True):
        slot = (record.peer_id, record.model_id, record.layers)
        if slot not in newest and record.valid(network_id or record.network_id, now):
            newest[slot] = record
    kept: list[PeerRecord] = []
    per_peer: dict[str, int] = {}
    for record in newest.values():
        if per_peer.get(record.peer_id, 0) < MAX_RECORDS_PER_PEER:
            per_peer[record.peer_id] = per_peer.get(record.peer_id, 0) + 1
            kept.append(record)
    return kept[:MAX_RECORDS]


def encode_set(records: Iterable[PeerRecord]) -> str:
    """A record set as it travels in the DHT: JSON text of a list of record dicts."""
    return json.dumps([record.to_dict() for record in records], separators=(",", ":"))


def encode_chunks(records: Iterable[PeerRecord], max_bytes: int) -> list[str]:
    """`records` as record sets of at most `max_bytes` each (stores merge, so chunks add up)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 2
    for record in records:
        text = json.dumps(record.to_dict(), separators=(",", ":"))
        if current and size + len(text) + 1 > max_bytes:
            chunks.append("[" + ",".join(current) + "]")
            current, size = [], 2
        current.append(text)
        size += len(text) + 1
    if current:
        chunks.append("[" + ",".join(current) + "]")
    return chunks


def decode_set(raw: object) -> list[PeerRecord]:
    """The well-formed records in a record set (str or bytes); anything else gives `[]`.

    Never raises: a set from the network may be garbage, and malformed entries are dropped.
    Signatures are not checked here (see `merge` and `PeerRecord.valid`).
    """
    if not isinstance(raw, str | bytes) or len(raw) > MAX_SET_BYTES:
        return []
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(items, list):
        return []
    records = []
    for item in items[: MAX_RECORDS * 4]:
        try:
            records.append(PeerRecord.from_dict(item))
        except RecordError:
            continue
    return records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{name} must be a number")
    return float(value)


def _layer_pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise RecordError("layers must be a pair [first, end]")
    return (value[0], value[1])


def _hex(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise RecordError(f"{name} must be hex text")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise RecordError(f"{name} must be hex text") from None


def _check_bytes(name: str, value: Any, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise RecordError(f"{name} must be {length} bytes")
