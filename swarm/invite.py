"""Invite codes: `swarm://…` text that lets a new node join a swarm through one known peer.

Owns the code format. The text after `swarm://` is unpadded base64url of:

    version (1 byte, = 1) | public key (32) | DHT UDP port (u16, big-endian)
    | host length (1) | host (UTF-8) | network id length (1) | network id (UTF-8)
    | checksum (4) = first 4 bytes of BLAKE2b-256 (libsodium generichash) of all before

The public key lets the joiner check that the peer it reaches is the one that issued the
code; the checksum catches codes damaged in copying. `Invite.parse` turns every defect
into an `InviteError` that says what is wrong.

Imports only the standard library and swarm's light modules: never jax or numpy.
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass

import libnacl

from swarm.errors import InvalidRequestError
from swarm.identity import PUBLIC_KEY_BYTES, peer_id_of

PREFIX = "swarm://"
VERSION = 1
CHECKSUM_BYTES = 4
MAX_CODE_CHARS = 512
MAX_HOST_BYTES = 253
MAX_NETWORK_ID_BYTES = 64
_DAMAGED = "the invite code is damaged (checksum mismatch): copy it again"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# version, public key and port: the fixed part before the first length byte
_HEAD = struct.Struct(f">B{PUBLIC_KEY_BYTES}sH")


class InviteError(InvalidRequestError):
    """An invite code that cannot be used; the message says why."""


@dataclass(frozen=True)
class Invite:
    """A peer to join through: its DHT UDP endpoint, its identity key, and the swarm's network id."""

    host: str
    port: int
    public_key: bytes
    network_id: str

    def __post_init__(self) -> None:
        if not self.host:
            raise InviteError("the invite code names no host")
        if len(self.host.encode("utf-8")) > MAX_HOST_BYTES:
            raise InviteError(f"an invite's host is at most {MAX_HOST_BYTES} bytes")
        if not self.network_id:
            raise InviteError("the invite code names no network id")
        if len(self.network_id.encode("utf-8")) > MAX_NETWORK_ID_BYTES:
            raise InviteError(f"an invite's network id is at most {MAX_NETWORK_ID_BYTES} bytes")
        if not 1 <= self.port <= 65535:
            raise InviteError(f"the invite code names an invalid port {self.port}")
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise InviteError(f"an invite's public key is {PUBLIC_KEY_BYTES} bytes")

    @property
    def peer_id(self) -> str:
        """The peer id of the inviting peer."""
        return peer_id_of(self.public_key)

    def encode(self) -> str:
        """The `swarm://…` code (at most `MAX_CODE_CHARS` characters)."""
        body = _HEAD.pack(VERSION, self.public_key, self.port)
        for text in (self.host, self.network_id):
            encoded = text.encode("utf-8")
            body += bytes([len(encoded)]) + encoded
        body += _checksum(body)
        return PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, code: str) -> Invite:
        """The invite in `code`; `InviteError` naming the defect otherwise."""
        if not isinstance(code, str):
            raise InviteError("an invite code must be text")
        code = code.strip()
        if not code.startswith(PREFIX):
            raise InviteError(f"an invite code starts with {PREFIX}")
        if len(code) > MAX_CODE_CHARS:
            raise InviteError(f"the invite code is too long (more than {MAX_CODE_CHARS} characters)")
        text = code.removeprefix(PREFIX)
        if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
            raise InviteError("the invite code is not valid base64url text: copy it again")
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        if not data:
            raise InviteError("the invite code is empty")
        if data[0] != VERSION:
            # Every version ends in the same checksum: an intact code is from another version.
            if len(data) > CHECKSUM_BYTES and _checksum(data[:-CHECKSUM_BYTES]) == data[-CHECKSUM_BYTES:]:
                raise InviteError(
                    f"the invite code has version {data[0]}; this swarm reads version {VERSION}"
                )
            raise InviteError(_DAMAGED)
        if len(data) < _HEAD.size + 1:
            raise InviteError("the invite code is truncated: copy it again")
        _, public_key, port = _HEAD.unpack_from(data)
        offset = _HEAD.size
        fields = []
        for _ in range(2):
            if offset >= len(data):
                raise InviteError("the invite code is truncated: copy it again")
            length = data[offset]
            fields.append(data[offset + 1 : offset + 1 + length])
            offset += 1 + length
        if offset + CHECKSUM_BYTES > len(data):
            raise InviteError("the invite code is truncated: copy it again")
        if offset + CHECKSUM_BYTES < len(data):
            raise InviteError("the invite code has extra bytes at its end: copy it again")
        if _checksum(data[:offset]) != data[offset:]:
            raise InviteError(_DAMAGED)
        try:
            host, network_id = (field.decode("utf-8") for field in fields)
        except UnicodeDecodeError:
            raise InviteError("the invite code's host or network id is not UTF-8 text") from None
        return cls(host=host, port=port, public_key=public_key, network_id=network_id)


def _checksum(body: bytes) -> bytes:
    return libnacl.crypto_generichash(body)[:CHECKSUM_BYTES]
