"""Device pools: one owner's nodes, joined by signed invitations, described by a signed state.

Owns the pool vocabulary and its checks, with no networking:
- `Invitation`: the owner's signed offer to join, shared as a `swarmpool://` code (unpadded
  base64url of compact JSON);
- `Acceptance`: the joining device's signature over that invitation;
- `PoolState`: the owner-signed member list (owner first), versioned so newer states win,
  with the peers removed and the invitations they used, so an old acceptance cannot put a
  removed device back;
- `PoolStore`: the `pool_state` and `pool_invitations` tables in `<data_dir>/swarm.db`
  (SQLite, WAL, short-lived connections; other modules own the other tables);
- `admit`: the owner's step that turns an issued invitation and its acceptance into a saved state.

Every signature is made over a purpose prefix and canonical JSON (sorted keys, bytes as
hex). Everything read from a code, a peer or the database is untrusted: `from_code` and
`from_dict` check every field and raise only `PoolError`.

Imports only the standard library, swarm.identity and swarm.errors: never jax or numpy.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from swarm.db import prepare
from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify

INVITATION_PREFIX = b"swarm-pool-invitation-v1\0"
ACCEPTANCE_PREFIX = b"swarm-pool-acceptance-v1\0"
STATE_PREFIX = b"swarm-pool-state-v1\0"
CODE_SCHEME = "swarmpool://"
MAX_CODE_CHARS = 4096
CLOCK_SKEW_S = 60.0
MAX_INVITATION_TTL_S = 30 * 24 * 3600.0
MAX_NAME_CHARS = 64
MAX_ACTIVE_INVITATIONS = 5
MAX_MEMBERS = 256  # a hard bound on what is parsed; the configured pool size is smaller
MAX_REMOVED = 1024  # removed peers (and their invitations) remembered, the oldest forgotten first
INVITATION_RETENTION_S = 30 * 24 * 3600.0  # expired invitations are deleted this long after
_PEER_ID = re.compile(r"[a-z2-7]{32}")
_INVITATION_ID = re.compile(r"[0-9a-f]{32}")
_ASCII = re.compile(r"[\x20-\x7e]*")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class PoolError(SwarmError):
    """A pool operation refused: a bad or expired invitation, a wrong signature, a full pool..."""


class _Record:
    """The shared part of the pool records: field checks, the JSON form, the signed bytes."""

    _prefix: ClassVar[bytes] = b""  # the domain-separation prefix of a signed record

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            check, description = _RULES[item.name]
            if not check(getattr(self, item.name)):
                raise PoolError(f"{item.name} of a {type(self).__name__} must be {description}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: bytes as hex, tuples as lists, nested records as objects."""
        return {item.name: _encode(getattr(self, item.name)) for item in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        """The record in `raw` (as `to_dict` makes it); PoolError on anything malformed."""
        if not isinstance(raw, dict):
            raise PoolError(f"a {cls.__name__} must be an object")
        names = [item.name for item in dataclasses.fields(cls)]  # type: ignore[arg-type]
        missing = [name for name in names if name not in raw]
        if missing:
            raise PoolError(f"a {cls.__name__} lacks {', '.join(missing)}")
        return cls(**{name: _decode(name, raw[name]) for name in names})

    def signing_bytes(self) -> bytes:
        """The prefix and canonical JSON of every field but the signature: what gets signed."""
        fields = self.to_dict()
        fields.pop("signature", None)
        return self._prefix + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class Invitation(_Record):
    """The owner's signed offer for one device to join pool `pool_id` before `expires`."""

    _prefix = INVITATION_PREFIX
    invitation_id: str  # 16 random bytes as hex
    pool_id: str  # the owner's peer id
    pool_name: str
    owner_key: bytes  # the owner's Ed25519 public key
    owner_address: str  # "host:port" of the owner's peer stage, or ""
    network_id: str
    device_name: str  # a suggested label for the joining device, or ""
    issued: float  # unix time
    expires: float  # unix time
    signature: bytes  # the owner's, over `signing_bytes()`

    @classmethod
    def create(
        cls,
        owner_identity: Identity,
        *,
        pool_name: str,
        owner_address: str,
        network_id: str,
        ttl_s: float,
        device_name: str = "",
        now: float | None = None,
    ) -> Invitation:
        """A fresh invitation to `owner_identity`'s pool, valid for `ttl_s` seconds from `now`."""
        issued, ttl_s = _time("now", time.time() if now is None else now), _time("ttl_s", ttl_s)
        if not 0 < ttl_s <= MAX_INVITATION_TTL_S:
            raise PoolError(f"an invitation lasts more than 0 and at most {MAX_INVITATION_TTL_S:.0f} seconds")
        owner = owner_identity.peer_id
        unsigned = cls(
            *(secrets.token_hex(16), owner, pool_name, owner_identity.public_key, owner_address, network_id),
            *(device_name, issued, issued + ttl_s, bytes(SIGNATURE_BYTES)),
        )
        return dataclasses.replace(unsigned, signature=owner_identity.sign(unsigned.signing_bytes()))

    def signed_by_owner(self) -> bool:
        """Whether the owner key matches the pool id and signed this invitation (expiry aside)."""
        valid = verify(self.owner_key, self.signing_bytes(), self.signature)
        return valid and peer_id_of(self.owner_key) == self.pool_id

    def verify(self, now: float | None = None) -> None:
        """Raises PoolError unless the owner signed this invitation and it is valid at `now`."""
        now = time.time() if now is None else now
        if not self.signed_by_owner():
            raise PoolError("the invitation's signature is not its pool owner's: it was altered or forged")
        if not 0 < self.expires - self.issued <= MAX_INVITATION_TTL_S:
            raise PoolError("the invitation's lifetime is out of range")
        if now >= self.expires:
            raise PoolError(f"the invitation to pool {self.pool_name!r} has expired: ask for a new one")
        if self.issued > now + CLOCK_SKEW_S:
            raise PoolError("the invitation is issued in the future: check this device's clock")

    def to_code(self) -> str:
        """The text a user copies to the joining device."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        return CODE_SCHEME + base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")

    @classmethod
    def from_code(cls, text: Any) -> Invitation:
        """The invitation in a `swarmpool://` code; the signature is not checked (call `verify`)."""
        if not isinstance(text, str):
            raise PoolError("a pool invitation code must be text")
        text = text.strip()
        if len(text) > MAX_CODE_CHARS:
            raise PoolError(f"the pool invitation code is longer than {MAX_CODE_CHARS} characters")
        if not text.startswith(CODE_SCHEME):
            raise PoolError(f"a pool invitation code starts with {CODE_SCHEME}")
        body = text[len(CODE_SCHEME) :]
        if not _BASE64URL.fullmatch(body):
            raise PoolError("the pool invitation code is damaged: it is not base64url text")
        try:
            raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError, RecursionError):
            raise PoolError("the pool invitation code is damaged: copy it again") from None
        return cls.from_dict(raw)


@dataclass(frozen=True)
class Acceptance(_Record):
    """A device's signed answer to one invitation: its key joins pool `pool_id`."""

    _prefix = ACCEPTANCE_PREFIX
    invitation_id: str
    pool_id: str
    member_key: bytes  # the joining device's Ed25519 public key
    device_name: str
    accepted_at: float  # unix time
    signature: bytes  # the member's, over `signing_bytes()`

    @classmethod
    def create(
        cls,
        member_identity: Identity,
        invitation: Invitation,
        device_name: str = "",
        now: float | None = None,
    ) -> Acceptance:
        """`member_identity`'s acceptance of `invitation`, which must be valid at `now`."""
        now = _time("now", time.time() if now is None else now)
        invitation.verify(now)
        unsigned = cls(
            *(invitation.invitation_id, invitation.pool_id, member_identity.public_key),
            *(device_name or invitation.device_name, now, bytes(SIGNATURE_BYTES)),
        )
        acceptance = dataclasses.replace(unsigned, signature=member_identity.sign(unsigned.signing_bytes()))
        acceptance.verify(invitation)
        return acceptance

    def verify(self, invitation: Invitation) -> None:
        """Raises PoolError unless the member signed this answer to `invitation` while it was valid."""
        if (self.invitation_id, self.pool_id) != (invitation.invitation_id, invitation.pool_id):
            raise PoolError("the acceptance answers a different invitation")
        if not verify(self.member_key, self.signing_bytes(), self.signature):
            raise PoolError("the acceptance's signature is not the joining device's")
        if not invitation.issued - CLOCK_SKEW_S <= self.accepted_at < invitation.expires:
            raise PoolError("the acceptance was not made while its invitation was valid")
        if self.member_key == invitation.owner_key:
            raise PoolError("the pool owner cannot join its own pool")


@dataclass(frozen=True)
class Member(_Record):
    """One device of a pool, with the invitation and acceptance that admitted it (None: the owner)."""

    peer_id: str
    public_key: bytes
    device_name: str
    joined_at: float
    invitation: Invitation | None
    acceptance: Acceptance | None

    def verify(self, pool_id: str, owner_key: bytes) -> None:
        """Raises PoolError unless this is the owner, or a device the owner invited and that accepted."""
        if peer_id_of(self.public_key) != self.peer_id:
            raise PoolError(f"member {self.peer_id}'s peer id does not match its key")
        invitation, acceptance = self.invitation, self.acceptance
        if invitation is None or acceptance is None:
            if invitation is not None or acceptance is not None or self.public_key != owner_key:
                raise PoolError(f"member {self.peer_id} lacks an invitation or an acceptance")
            return
        # Expiry is not checked: the invitation only had to be valid when it was accepted.
        if (
            invitation.pool_id != pool_id
            or invitation.owner_key != owner_key
            or not invitation.signed_by_owner()
        ):
            raise PoolError(f"member {self.peer_id}'s invitation was not signed by the pool owner")
        if acceptance.member_key != self.public_key:
            raise PoolError(f"member {self.peer_id}'s acceptance was made by another key")
        acceptance.verify(invitation)


@dataclass(frozen=True)
class PoolState(_Record):
    """The owner-signed description of a pool; a higher `version` supersedes a lower one."""

    _prefix = STATE_PREFIX
    pool_id: str  # the owner's peer id
    name: str
    owner_key: bytes
    created_at: float
    updated_at: float
    version: int  # 1 at creation, +1 on each change
    members: tuple[Member, ...]  # the owner first
    removed: tuple[str, ...]  # peer ids removed and not admitted again, oldest first
    retired_invitations: tuple[str, ...]  # ids of the invitations that removed members had used
    signature: bytes  # the owner's, over `signing_bytes()`

    @classmethod
    def create(
        cls, owner_identity: Identity, name: str, device_name: str = "", now: float | None = None
    ) -> PoolState:
        """A new pool owned by `owner_identity`, with the owner as its only member."""
        now = _time("now", time.time() if now is None else now)
        owner_id, owner_key = owner_identity.peer_id, owner_identity.public_key
        owner = Member(owner_id, owner_key, device_name, now, None, None)
        unsigned = cls(owner_id, name, owner_key, now, now, 1, (owner,), (), (), bytes(SIGNATURE_BYTES))
        return dataclasses.replace(unsigned, signature=owner_identity.sign(unsigned.signing_bytes()))

    def member_ids(self) -> frozenset[str]:
        return frozenset(member.peer_id for member in self.members)

    def newer_than(self, other: PoolState) -> bool:
        """Whether this state supersedes `other`: the same pool at a higher version."""
        return self.pool_id == other.pool_id and self.version > other.version

    def with_member(
        self,
        owner_identity: Identity,
        invitation: Invitation,
        acceptance: Acceptance,
        max_size: int,
        now: float | None = None,
    ) -> PoolState:
        """The next state, with the device that made `acceptance` of `invitation` admitted."""
        now = _time("now", time.time() if now is None else now)
        self._require_owner(owner_identity)
        invitation.verify(now)
        if invitation.pool_id != self.pool_id:
            raise PoolError(f"the invitation is for another pool than {self.name!r}")
        acceptance.verify(invitation)
        if invitation.invitation_id in self._used_invitations():
            raise PoolError("the invitation was already used: ask the pool owner for a new one")
        peer_id = peer_id_of(acceptance.member_key)
        if peer_id in self.member_ids():
            raise PoolError(f"device {peer_id} is already a member of pool {self.name!r}")
        if len(self.members) >= min(max_size, MAX_MEMBERS):
            raise PoolError(f"pool {self.name!r} is full ({len(self.members)} of {max_size} devices)")
        name = acceptance.device_name or invitation.device_name
        member = Member(peer_id, acceptance.member_key, name, now, invitation, acceptance)
        removed = tuple(item for item in self.removed if item != peer_id)
        return self._next(owner_identity, now, members=(*self.members, member), removed=removed)

    def without_member(self, owner_identity: Identity, peer_id: str, now: float | None = None) -> PoolState:
        """The next state, without `peer_id`; the invitation it used can never admit anyone again."""
        now = _time("now", time.time() if now is None else now)
        self._require_owner(owner_identity)
        if peer_id == self.pool_id:
            raise PoolError("the pool owner cannot remove itself: dissolve the pool instead")
        leaving = next((member for member in self.members if member.peer_id == peer_id), None)
        if leaving is None or leaving.invitation is None:
            raise PoolError(f"device {peer_id} is not a member of pool {self.name!r}")
        return self._next(
            owner_identity,
            now,
            members=tuple(member for member in self.members if member is not leaving),
            removed=(*self.removed, peer_id)[-MAX_REMOVED:],
            retired_invitations=(*self.retired_invitations, leaving.invitation.invitation_id)[-MAX_REMOVED:],
        )

    def verify(self) -> None:
        """Raises PoolError unless the owner signed this state and every member entry checks out."""
        if peer_id_of(self.owner_key) != self.pool_id:
            raise PoolError("the pool id does not match the pool owner's key")
        if not verify(self.owner_key, self.signing_bytes(), self.signature):
            raise PoolError(f"the state of pool {self.name!r} is not signed by its owner")
        if not self.members or self.members[0].peer_id != self.pool_id:
            raise PoolError("the pool owner is not the first member")
        for member in self.members:
            member.verify(self.pool_id, self.owner_key)
        if len(self.member_ids()) != len(self.members):
            raise PoolError("a device appears twice among the pool members")
        used = self._used_invitations()
        if len(used) != len(self.members) - 1 + len(self.retired_invitations):
            raise PoolError("an invitation admitted more than one member")
        if self.member_ids() & set(self.removed):
            raise PoolError("a removed device is still listed as a member")

    def _used_invitations(self) -> set[str]:
        admitted = {
            member.invitation.invitation_id for member in self.members if member.invitation is not None
        }
        return admitted | set(self.retired_invitations)

    def _require_owner(self, identity: Identity) -> None:
        if identity.public_key != self.owner_key:
            raise PoolError(f"{identity.peer_id} is not the owner of pool {self.name!r}")

    def _next(self, owner_identity: Identity, now: float, **changes: Any) -> PoolState:
        updated_at = max(now, self.updated_at)
        unsigned = dataclasses.replace(self, version=self.version + 1, updated_at=updated_at, **changes)
        return dataclasses.replace(unsigned, signature=owner_identity.sign(unsigned.signing_bytes()))


@dataclass(frozen=True)
class IssuedInvitation:
    """An invitation this node issued, and who used it when (None while unused)."""

    invitation: Invitation
    used_by: str | None
    used_at: float | None


class PoolStore:
    """The `pool_state` (one row: this node's pool) and `pool_invitations` tables of `swarm.db`."""

    def __init__(self, data_dir: Path) -> None:
        self.path = prepare(
            data_dir,
            [
                "CREATE TABLE IF NOT EXISTS pool_state (slot INTEGER PRIMARY KEY CHECK (slot = 0), "
                "pool_id TEXT NOT NULL, version INTEGER NOT NULL, signature TEXT NOT NULL, "
                "state TEXT NOT NULL, saved_at REAL NOT NULL)",
                "CREATE TABLE IF NOT EXISTS pool_invitations (invitation_id TEXT PRIMARY KEY, "
                "pool_id TEXT NOT NULL, signature TEXT NOT NULL, invitation TEXT NOT NULL, "
                "issued REAL NOT NULL, expires REAL NOT NULL, used_by TEXT, used_at REAL)",
            ],
        )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10, isolation_level=None)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock first, so check-then-write is atomic."""
        with closing(self._connect()) as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def state(self) -> PoolState | None:
        """This node's pool, verified; None without one, or when the stored row is unreadable."""
        with closing(self._connect()) as connection:
            return _read_state(connection)

    def save(self, state: PoolState) -> None:
        """Stores `state` if it verifies and is not older than the stored state, which must be of its pool."""
        state.verify()
        with self._transaction() as connection:
            _write_state(connection, state)

    def leave(self) -> None:
        """Forgets this node's pool and the invitations it issued."""
        with self._transaction() as connection:
            connection.execute("DELETE FROM pool_state")
            connection.execute("DELETE FROM pool_invitations")

    def record_invitation(self, invitation: Invitation, now: float | None = None) -> None:
        """Remembers an invitation this node issued; at most MAX_ACTIVE_INVITATIONS are open at once."""
        now = time.time() if now is None else now
        invitation.verify(now)
        text = json.dumps(invitation.to_dict(), separators=(",", ":"))
        times = (invitation.issued, invitation.expires)
        with self._transaction() as connection:
            connection.execute(
                "DELETE FROM pool_invitations WHERE expires < ?", (now - INVITATION_RETENTION_S,)
            )
            query = "SELECT COUNT(*) FROM pool_invitations WHERE used_by IS NULL AND expires > ?"
            (active,) = connection.execute(query, (now,)).fetchone()
            if active >= MAX_ACTIVE_INVITATIONS:
                raise PoolError(
                    f"{active} invitations are open already, the most allowed: "
                    "wait until one is used or expires, or revoke one"
                )
            try:
                connection.execute(
                    "INSERT INTO pool_invitations (invitation_id, pool_id, signature, invitation, issued, expires) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (invitation.invitation_id, invitation.pool_id, invitation.signature.hex(), text, *times),
                )
            except sqlite3.IntegrityError:
                raise PoolError(f"invitation {invitation.invitation_id} is recorded already") from None

    def revoke_invitation(self, invitation_id: str) -> bool:
        """Deletes an unused invitation; whether there was one."""
        with self._transaction() as connection:
            query = "DELETE FROM pool_invitations WHERE invitation_id = ? AND used_by IS NULL"
            return connection.execute(query, (invitation_id,)).rowcount == 1

    def invitations(self, now: float | None = None, active_only: bool = True) -> list[IssuedInvitation]:
        """The invitations this node issued, newest first; `active_only`: just the unused, unexpired ones."""
        now = time.time() if now is None else now
        with closing(self._connect()) as connection:
            query = "SELECT invitation, used_by, used_at, expires FROM pool_invitations ORDER BY issued DESC"
            rows = connection.execute(query).fetchall()
        issued = []
        for text, used_by, used_at, expires in rows:
            if not active_only or (used_by is None and expires > now):
                with suppress(PoolError, ValueError, TypeError, RecursionError):
                    issued.append(IssuedInvitation(Invitation.from_dict(json.loads(text)), used_by, used_at))
        return issued

    def mark_used(self, invitation_id: str, peer_id: str, now: float | None = None) -> None:
        """Records that `peer_id` used the invitation; PoolError if it is unknown, expired or used."""
        with self._transaction() as connection:
            _mark_used(connection, invitation_id, peer_id, time.time() if now is None else now)


def admit(
    store: PoolStore,
    owner_identity: Identity,
    invitation: Invitation,
    acceptance: Acceptance,
    max_size: int,
    now: float | None = None,
) -> PoolState:
    """Admits the device behind `acceptance` with an invitation `store` issued; returns the saved state.

    One transaction consumes the invitation and saves the new state, so a refusal at any step
    leaves the invitation unused, and concurrent admissions each build on the other's state.
    """
    now = _time("now", time.time() if now is None else now)
    with store._transaction() as connection:
        state = _read_state(connection)
        if state is None:
            raise PoolError("this node has no pool to admit devices to")
        query = "SELECT signature FROM pool_invitations WHERE invitation_id = ?"
        row = connection.execute(query, (invitation.invitation_id,)).fetchone()
        if row is None or row[0] != invitation.signature.hex():
            raise PoolError("the invitation was not issued by this node")
        _mark_used(connection, invitation.invitation_id, peer_id_of(acceptance.member_key), now)
        new_state = state.with_member(owner_identity, invitation, acceptance, max_size, now)
        _write_state(connection, new_state)
    return new_state


def _read_state(connection: sqlite3.Connection) -> PoolState | None:
    row = connection.execute("SELECT state FROM pool_state WHERE slot = 0").fetchone()
    if row is None:
        return None
    try:
        state = PoolState.from_dict(json.loads(row[0]))
        state.verify()
    except (PoolError, ValueError, TypeError, RecursionError):
        return None
    return state


def _write_state(connection: sqlite3.Connection, state: PoolState) -> None:
    row = connection.execute("SELECT pool_id, version, signature FROM pool_state WHERE slot = 0").fetchone()
    if row is not None:
        pool_id, version, signature = row
        if pool_id != state.pool_id:
            raise PoolError(f"this node belongs to pool {pool_id}: leave it before joining another")
        if version > state.version:
            raise PoolError(f"pool state version {state.version} is older than the stored version {version}")
        if version == state.version and signature != state.signature.hex():
            raise PoolError(f"pool state version {version} differs from the stored one of the same version")
    text = json.dumps(state.to_dict(), separators=(",", ":"))
    connection.execute(
        "INSERT OR REPLACE INTO pool_state (slot, pool_id, version, signature, state, saved_at) "
        "VALUES (0, ?, ?, ?, ?, ?)",
        (state.pool_id, state.version, state.signature.hex(), text, time.time()),
    )


def _mark_used(connection: sqlite3.Connection, invitation_id: str, peer_id: str, now: float) -> None:
    # One conditional UPDATE: of two joins racing for one code, only one changes the row.
    cursor = connection.execute(
        "UPDATE pool_invitations SET used_by = ?, used_at = ? "
        "WHERE invitation_id = ? AND used_by IS NULL AND expires > ?",
        (peer_id, now, invitation_id, now),
    )
    if cursor.rowcount == 1:
        return
    query = "SELECT used_by FROM pool_invitations WHERE invitation_id = ?"
    row = connection.execute(query, (invitation_id,)).fetchone()
    if row is None:
        raise PoolError(f"unknown invitation {invitation_id}: this node did not issue it")
    if row[0] is not None:
        raise PoolError(f"the invitation was already used by {row[0]}: ask for a new one")
    raise PoolError("the invitation has expired: ask for a new one")


def _is_text(value: Any, pattern: re.Pattern[str], limit: int = MAX_NAME_CHARS) -> bool:
    return isinstance(value, str) and len(value) <= limit and pattern.fullmatch(value) is not None


def _is_name(value: Any, required: bool) -> bool:
    text_ok = isinstance(value, str) and len(value) <= MAX_NAME_CHARS and value.isprintable()
    return text_ok and (bool(value.strip()) or not required)


def _is_tuple_of(value: Any, limit: int, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, tuple) and len(value) <= limit and all(check(item) for item in value)


def _is_time(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0


_PEER_ID_RULE = (lambda value: _is_text(value, _PEER_ID), "a peer id")
_NAME_RULE = (lambda value: _is_name(value, required=True), f"1 to {MAX_NAME_CHARS} printable characters")
_KEY_RULE = (lambda value: isinstance(value, bytes) and len(value) == PUBLIC_KEY_BYTES, "32 bytes")
_TIME_RULE = (_is_time, "a finite unix time")
_INVITATION_ID_RULE = (lambda value: _is_text(value, _INVITATION_ID), "32 lowercase hex digits")
# How every field of the records is checked, by field name (the names mean the same everywhere).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "invitation_id": _INVITATION_ID_RULE,
    "pool_id": _PEER_ID_RULE,
    "peer_id": _PEER_ID_RULE,
    "pool_name": _NAME_RULE,
    "name": _NAME_RULE,
    "device_name": (
        lambda value: _is_name(value, required=False),
        f"0 to {MAX_NAME_CHARS} printable characters",
    ),
    "owner_address": (lambda value: _is_text(value, _ASCII, 100), "at most 100 printable ASCII characters"),
    "network_id": (
        lambda value: _is_text(value, _ASCII, 64) and value != "",
        "1 to 64 printable ASCII characters",
    ),
    "owner_key": _KEY_RULE,
    "member_key": _KEY_RULE,
    "public_key": _KEY_RULE,
    "signature": (lambda value: isinstance(value, bytes) and len(value) == SIGNATURE_BYTES, "64 bytes"),
    "issued": _TIME_RULE,
    "expires": _TIME_RULE,
    "accepted_at": _TIME_RULE,
    "joined_at": _TIME_RULE,
    "created_at": _TIME_RULE,
    "updated_at": _TIME_RULE,
    "version": (lambda value: type(value) is int and 1 <= value < 2**53, "a positive integer"),
    "invitation": (lambda value: value is None or isinstance(value, Invitation), "an invitation or null"),
    "acceptance": (lambda value: value is None or isinstance(value, Acceptance), "an acceptance or null"),
    "members": (
        lambda value: _is_tuple_of(value, MAX_MEMBERS, lambda item: isinstance(item, Member)),
        f"a list of at most {MAX_MEMBERS} members",
    ),
    "removed": (lambda value: _is_tuple_of(value, MAX_REMOVED, _PEER_ID_RULE[0]), "a list of peer ids"),
    "retired_invitations": (
        lambda value: _is_tuple_of(value, MAX_REMOVED, _INVITATION_ID_RULE[0]),
        "a list of invitation ids",
    ),
}
_BYTES_FIELDS = {"owner_key", "member_key", "public_key", "signature"}
_TIME_FIELDS = {name for name, rule in _RULES.items() if rule is _TIME_RULE}
_NESTED: dict[str, type[_Record]] = {"invitation": Invitation, "acceptance": Acceptance}


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value.to_dict() if isinstance(value, _Record) else value


def _decode(name: str, value: Any) -> Any:
    """`value` of field `name` as read from JSON, converted where it is well formed (checks follow)."""
    if name in _BYTES_FIELDS and isinstance(value, str) and re.fullmatch(r"(?:[0-9a-f]{2})*", value):
        return bytes.fromhex(value)
    if name in _TIME_FIELDS and type(value) is int and abs(value) < 2**53:
        return float(value)
    if name in _NESTED and value is not None:
        return _NESTED[name].from_dict(value)
    if name == "members" and isinstance(value, list) and len(value) <= MAX_MEMBERS:
        return tuple(Member.from_dict(item) for item in value)
    return tuple(value) if isinstance(value, list) else value


def _time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**53:
        raise PoolError(f"{name} must be a finite number >= 0")
    return float(value)
