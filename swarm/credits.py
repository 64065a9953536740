"""Credits: receipts signed by requesters, balance reports peers can check, and tiers.

Owns the vocabulary of DESIGN.md §9, pure and jax-free (the control plane reads it):

- `Receipt`: when a request completes, its requester signs one per serving stage: the
  request id, the stage, layers x tokens served, the time. A stage earns what others
  sign for it, so no node can mint its own credit. One credit is one layer run for one
  token position.
- A Merkle-sum tree over a node's earned receipts (`merkle_levels`, `prove`,
  `check_path`): every node hashes its children's hashes *and* credit sums, so the
  root commits to the total and to where each receipt sits in it.
- `BalanceReport`: a node's signed totals and the root of its earned receipts. A peer
  checking one sends a fresh nonce; the reporter answers with the receipts found at
  nonce-derived credit offsets (`sample_offsets`) and their paths, which the checker
  verifies (`check_proof`). Inflating the total, or padding it with receipts that are
  forged or not its own, is caught with probability about the padded share per sample.
- `TrustPolicy`: how much a checked receipt counts, by its signer (Sybil resistance):
  young identities and identities never seen serving count little, a signer that
  shares a subnet with the earner and never traded with the checker counts less, and
  every receipt's weight halves each `half_life_s`.
- `tier_of`: Platinum (top 10 % of known standings), Gold (top 30 %), Silver
  (positive), Bronze (zero or negative).

Imports only the standard library and swarm.identity / swarm.errors: never jax or numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify

RECEIPT_PREFIX = b"swarm-receipt-v1\0"
REPORT_PREFIX = b"swarm-balance-v1\0"
CLOCK_SKEW_S = 300.0  # how far in the future a receipt or report may be dated
MAX_TOKENS = 10_000_000  # per receipt
MAX_LAYERS = 1 << 20
MAX_PATH = 64  # Merkle path length: trees of up to 2**64 receipts
SAMPLES = 8  # receipts a checker asks for per report
NONCE_BYTES = 16
TIERS = ("platinum", "gold", "silver", "bronze")  # scheduling order: first served first
_PEER_ID = re.compile(r"[a-z2-7]{32}")
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,64}")
_SUM = struct.Struct(">Q")


class CreditError(SwarmError):
    """A receipt, report or proof that is malformed, forged, replayed or inconsistent."""


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


def _hex(name: str, value: Any, length: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * length:
        raise CreditError(f"{name} must be {length} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CreditError(f"{name} must be {length} bytes of hex") from None


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CreditError(f"{name} must be an integer from {low} to {high}")
    return value


def _time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CreditError(f"{name} must be a unix time")
    return float(value)


def _text(name: str, value: Any, pattern: re.Pattern[str] = _PRINTABLE) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise CreditError(f"{name} is malformed")
    return value


def _fields(raw: Any, names: Iterable[str], what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CreditError(f"a {what} must be an object")
    missing = sorted(set(names) - set(raw))
    if missing:
        raise CreditError(f"{what} lacks {', '.join(missing)}")
    return raw


# --- receipts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """The requester's signed statement that `stage` ran `layers` for `tokens` positions."""

    request_id: str
    network_id: str
    requester: str  # peer id of the signer
    requester_key: bytes
    stage: str  # peer id of the stage that earned it
    layers: tuple[int, int]  # end exclusive
    tokens: int
    issued: float
    signature: bytes

    @property
    def credits(self) -> int:
        return (self.layers[1] - self.layers[0]) * self.tokens

    @property
    def receipt_id(self) -> bytes:
        """32 bytes naming this receipt: the hash of what was signed."""
        return hashlib.blake2b(self.signing_bytes(), digest_size=32).digest()

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        request_id: str,
        network_id: str,
        stage_key: bytes,
        layers: tuple[int, int],
        tokens: int,
        now: float | None = None,
    ) -> Receipt:
        unsigned = cls(
            request_id=request_id,
            network_id=network_id,
            requester=identity.peer_id,
            requester_key=identity.public_key,
            stage=peer_id_of(stage_key),
            layers=(int(layers[0]), int(layers[1])),
            tokens=int(tokens),
            issued=float(time.time() if now is None else now),
            signature=bytes(SIGNATURE_BYTES),
        )
        unsigned.check_fields()
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))

    def check_fields(self) -> None:
        _text("request_id", self.request_id, REQUEST_ID)
        _text("network_id", self.network_id)
        _text("requester", self.requester, _PEER_ID)
        _text("stage", self.stage, _PEER_ID)
        first, last = self.layers
        _int("layers[0]", first, 0, MAX_LAYERS - 1)
        _int("layers[1]", last, first + 1, MAX_LAYERS)
        _int("tokens", self.tokens, 1, MAX_TOKENS)

    def signing_bytes(self) -> bytes:
        fields = self.to_dict()
        del fields["signature"]
        return RECEIPT_PREFIX + _canonical(fields)

    def verify(self, network_id: str, now: float | None = None) -> None:
        """Raises CreditError unless the receipt is genuine, of `network_id`, and not self-dealt."""
        now = time.time() if now is None else now
        self.check_fields()
        if self.network_id != network_id:
            raise CreditError(f"receipt is for network {self.network_id!r}, not {network_id!r}")
        if len(self.requester_key) != PUBLIC_KEY_BYTES or peer_id_of(self.requester_key) != self.requester:
            raise CreditError("receipt's requester key does not match its requester")
        if self.requester == self.stage:
            raise CreditError("a node cannot sign a receipt for its own work")
        if self.issued > now + CLOCK_SKEW_S:
            raise CreditError("receipt is dated in the future")
        if not verify(self.requester_key, self.signing_bytes(), self.signature):
            raise CreditError("receipt signature does not verify")

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "network_id": self.network_id,
            "requester": self.requester,
            "requester_key": self.requester_key.hex(),
            "stage": self.stage,
            "layers": list(self.layers),
            "tokens": self.tokens,
            "issued": self.issued,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Receipt:
        raw = _fields(raw, _RECEIPT_FIELDS, "receipt")
        layers = raw["layers"]
        if not isinstance(layers, list) or len(layers) != 2:
            raise CreditError("layers must be [first, end]")
        receipt = cls(
            request_id=_text("request_id", raw["request_id"], REQUEST_ID),
            network_id=_text("network_id", raw["network_id"]),
            requester=_text("requester", raw["requester"], _PEER_ID),
            requester_key=_hex("requester_key", raw["requester_key"], PUBLIC_KEY_BYTES),
            stage=_text("stage", raw["stage"], _PEER_ID),
            layers=(_int("layers[0]", layers[0], 0, MAX_LAYERS), _int("layers[1]", layers[1], 0, MAX_LAYERS)),
            tokens=_int("tokens", raw["tokens"], 0, MAX_TOKENS),
            issued=_time("issued", raw["issued"]),
            signature=_hex("signature", raw["signature"], SIGNATURE_BYTES),
        )
        receipt.check_fields()
        return receipt


_RECEIPT_FIELDS = tuple(f.name for f in dataclasses.fields(Receipt))


# --- the Merkle-sum tree ------------------------------------------------------------------


def leaf(receipt_id: bytes, credits: int) -> tuple[bytes, int]:
    return hashlib.sha256(b"\0" + receipt_id + _SUM.pack(credits)).digest(), credits


def _parent(left: tuple[bytes, int], right: tuple[bytes, int]) -> tuple[bytes, int]:
    total = left[1] + right[1]
    digest = hashlib.sha256(b"\1" + left[0] + _SUM.pack(left[1]) + right[0] + _SUM.pack(right[1]))
    return digest.digest(), total


EMPTY_ROOT = (hashlib.sha256(b"\2").digest(), 0)


def merkle_levels(leaves: Sequence[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """Every level of the tree, leaves first; a node without a sibling moves up as it is."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [_parent(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def root_of(levels: list[list[tuple[bytes, int]]]) -> tuple[bytes, int]:
    return levels[-1][0] if levels and levels[-1] else EMPTY_ROOT


def locate(levels: list[list[tuple[bytes, int]]], offset: int) -> int:
    """The index of the leaf whose credit range holds `offset` (0 <= offset < total)."""
    index = 0
    for depth in range(len(levels) - 1, 0, -1):
        below = levels[depth - 1]
        left = 2 * index
        if left + 1 < len(below) and offset >= below[left][1]:
            offset -= below[left][1]
            index = left + 1
        else:
            index = left
    return index


def prove(levels: list[list[tuple[bytes, int]]], index: int) -> list[list[Any]]:
    """The path of leaf `index`: [sibling hash hex, sibling sum, "L" | "R"] bottom up."""
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            digest, total = level[sibling]
            path.append([digest.hex(), total, "L" if sibling < index else "R"])
        index //= 2
    return path


def check_path(leaf_node: tuple[bytes, int], path: Any, root: tuple[bytes, int]) -> int:
    """The credit offset at which the leaf starts; CreditError unless the path leads to `root`."""
    if not isinstance(path, list) or len(path) > MAX_PATH:
        raise CreditError("a Merkle path must be a list of at most 64 steps")
    node, offset = leaf_node, 0
    for step in path:
        if not isinstance(step, list) or len(step) != 3 or step[2] not in ("L", "R"):
            raise CreditError("a Merkle path step must be [hash, sum, side]")
        sibling = (_hex("path hash", step[0], 32), _int("path sum", step[1], 0, 2**63 - 1))
        if step[2] == "L":
            node = _parent(sibling, node)
            offset += sibling[1]
        else:
            node = _parent(node, sibling)
    if node != root:
        raise CreditError("the receipt's path does not lead to the reported root")
    return offset


def sample_offsets(nonce: bytes, total: int, count: int = SAMPLES) -> list[int]:
    """Credit offsets in [0, total) the reporter must show the receipts of."""
    if total <= 0:
        return []
    return [
        int.from_bytes(hashlib.sha256(b"swarm-sample\0" + nonce + bytes([i])).digest(), "big") % total
        for i in range(count)
    ]


# --- balance reports ----------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceReport:
    """A node's signed totals: what it earned (with the root of those receipts) and spent."""

    peer_id: str
    public_key: bytes
    network_id: str
    earned: int
    earned_count: int
    earned_root: bytes
    spent: int
    spent_count: int
    issued: float
    signature: bytes

    @classmethod
    def create(
        cls,
        identity: Identity,
        network_id: str,
        *,
        root: tuple[bytes, int],
        earned_count: int,
        spent: int,
        spent_count: int,
        now: float | None = None,
    ) -> BalanceReport:
        unsigned = cls(
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            network_id=network_id,
            earned=root[1],
            earned_count=earned_count,
            earned_root=root[0],
            spent=spent,
            spent_count=spent_count,
            issued=float(time.time() if now is None else now),
            signature=bytes(SIGNATURE_BYTES),
        )
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))

    @property
    def balance(self) -> int:
        return self.earned - self.spent

    @property
    def root(self) -> tuple[bytes, int]:
        return self.earned_root, self.earned

    def signing_bytes(self) -> bytes:
        fields = self.to_dict()
        del fields["signature"]
        return REPORT_PREFIX + _canonical(fields)

    def verify(self, network_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.network_id != network_id:
            raise CreditError(f"report is for network {self.network_id!r}, not {network_id!r}")
        if peer_id_of(self.public_key) != self.peer_id:
            raise CreditError("report's key does not match its peer id")
        if self.issued > now + CLOCK_SKEW_S:
            raise CreditError("report is dated in the future")
        if not verify(self.public_key, self.signing_bytes(), self.signature):
            raise CreditError("report signature does not verify")

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "public_key": self.public_key.hex(),
            "network_id": self.network_id,
            "earned": self.earned,
            "earned_count": self.earned_count,
            "earned_root": self.earned_root.hex(),
            "spent": self.spent,
            "spent_count": self.spent_count,
            "issued": self.issued,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> BalanceReport:
        raw = _fields(raw, _REPORT_FIELDS, "balance report")
        big = 2**62
        return cls(
            peer_id=_text("peer_id", raw["peer_id"], _PEER_ID),
            public_key=_hex("public_key", raw["public_key"], PUBLIC_KEY_BYTES),
            network_id=_text("network_id", raw["network_id"]),
            earned=_int("earned", raw["earned"], 0, big),
            earned_count=_int("earned_count", raw["earned_count"], 0, big),
            earned_root=_hex("earned_root", raw["earned_root"], 32),
            spent=_int("spent", raw["spent"], 0, big),
            spent_count=_int("spent_count", raw["spent_count"], 0, big),
            issued=_time("issued", raw["issued"]),
            signature=_hex("signature", raw["signature"], SIGNATURE_BYTES),
        )


_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(BalanceReport))


def make_proof(
    levels: list[list[tuple[bytes, int]]], receipts: Sequence[Receipt], nonce: bytes
) -> list[dict]:
    """The reporter's answer to `nonce`: the receipt at each sampled offset, with its path."""
    total = root_of(levels)[1]
    samples = []
    for offset in sample_offsets(nonce, total):
        index = locate(levels, offset)
        samples.append({"receipt": receipts[index].to_dict(), "path": prove(levels, index)})
    return samples


def check_proof(report: BalanceReport, nonce: bytes, samples: Any, now: float | None = None) -> list[Receipt]:
    """The sampled receipts, each genuine, earned by the reporter and where the nonce points;
    CreditError at the first that is not."""
    offsets = sample_offsets(nonce, report.earned)
    if not isinstance(samples, list) or len(samples) != len(offsets):
        raise CreditError(f"proof must hold {len(offsets)} samples")
    checked = []
    for offset, sample in zip(offsets, samples, strict=True):
        if not isinstance(sample, dict):
            raise CreditError("a proof sample must be an object")
        receipt = Receipt.from_dict(sample.get("receipt"))
        receipt.verify(report.network_id, now)
        if receipt.stage != report.peer_id:
            raise CreditError("a sampled receipt was earned by another node")
        start = check_path(leaf(receipt.receipt_id, receipt.credits), sample.get("path"), report.root)
        if not start <= offset < start + receipt.credits:
            raise CreditError("a sampled receipt is not the one at the challenged offset")
        checked.append(receipt)
    return checked


# --- trust and tiers ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrustPolicy:
    """How much one checked receipt counts toward its earner's standing (Sybil resistance)."""

    maturity_s: float = 7 * 86400.0  # identities younger than this count in proportion
    min_weight: float = 0.05  # floor for brand-new identities
    unserved_weight: float = 0.25  # signer never seen earning anything itself
    subnet_weight: float = 0.5  # signer shares the earner's subnet and never traded with us
    half_life_s: float = 30 * 86400.0  # every receipt's weight halves this often

    def weight(
        self,
        receipt: Receipt,
        *,
        signer_age_s: float,
        signer_served: bool,
        same_subnet_only: bool,
        now: float | None = None,
    ) -> float:
        now = time.time() if now is None else now
        maturity = 1.0 if self.maturity_s <= 0 else min(1.0, max(0.0, signer_age_s) / self.maturity_s)
        weight = self.min_weight + (1.0 - self.min_weight) * maturity
        if not signer_served:
            weight *= self.unserved_weight
        if same_subnet_only:
            weight *= self.subnet_weight
        age = max(0.0, now - receipt.issued)
        return weight * 0.5 ** (age / self.half_life_s)


def subnet_of(host: str) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) a host address is in; every loopback address is one."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.is_loopback:
        return "loopback"
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def tier_of(standing: float, known: Iterable[float]) -> str:
    """Bronze at zero or below; otherwise by rank among `known` standings (itself included)."""
    if standing <= 0:
        return "bronze"
    others = list(known)
    count = max(1, len(others))
    above = sum(1 for value in others if value > standing)
    if above / count < 0.10:
        return "platinum"
    if above / count < 0.30:
        return "gold"
    return "silver"
