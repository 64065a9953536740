"""Authenticated, encrypted, framed channel between two peers over one TCP connection.

Everything on the wire is a record: `u32 big-endian length || body`.

Handshake (both sides send their hello at once, then their signature; the connecting
side is the crypto_kx *client*, the accepting side the *server*):

    hello body  = magic "SWCH" | u16 version | u8 role (0 client, 1 server)
                  | identity key (Ed25519, 32) | ephemeral key (crypto_kx X25519, 32)
                  | u8 n | network id (n bytes of UTF-8, 1 <= n <= 255)
    signature   = Ed25519 by the identity key (64 bytes) over
                  "swarm secure channel v1\\0" | u8 signer role
                  | u16 len | client hello body | u16 len | server hello body

Each side checks the peer's hello (magic, version, role, network id, and `expected_peer`
if given) and then its signature. The signature binds the signer's ephemeral key, the
network id and version to *both* hellos, hence to the other side's fresh ephemeral key:
it cannot be replayed into another handshake, and the role byte stops it being reflected.
Session keys: `crypto_kx_client_session_keys` / `crypto_kx_server_session_keys`, one key
per direction; the ephemeral secret is dropped once they are derived and never stored.

Frames after the handshake:

    u32 big-endian n | ChaCha20-Poly1305-IETF ciphertext and tag (n bytes)

with the 4 length bytes as associated data and nonce = 4 zero bytes | u64 big-endian
counter. Each direction has its own key and counter, starting at 0, never sent: both
sides count. A frame that is tampered with, replayed, reordered or follows a dropped one
fails authentication, and the channel closes. n is checked against the frame limit
(payload limit + 16) before any of the body is read.

The cipher and handshake state are plain objects with no I/O (`FrameCipher`,
`Handshake`), so an asyncio transport can reuse them; `SecureChannel` is the blocking
socket transport. Imports only the standard library, libnacl and `swarm.identity`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import libnacl

from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify

logger = logging.getLogger(__name__)

CHANNEL_VERSION = 1
HELLO_MAGIC = b"SWCH"
CLIENT, SERVER = 0, 1
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024  # payload bytes; the wire adds TAG_BYTES
TAG_BYTES = libnacl.crypto_aead_chacha20poly1305_ietf_ABYTES  # 16
MAX_COUNTER = 2**64 - 1
MAX_NETWORK_ID_BYTES = 255

_SIGNATURE_CONTEXT = b"swarm secure channel v1\x00"
_LENGTH = struct.Struct(">I")
_HELLO_HEAD = struct.Struct(">4sHB32s32sB")
_MAX_HELLO_BYTES = 512  # a hello body is at most 72 + 255; room for later versions
_READ_CHUNK = 1 << 20  # the body buffer grows with what arrives, not with what is claimed
_ROLE_NAMES = {CLIENT: "client", SERVER: "server"}


def host_port(address: str) -> tuple[str, int]:
    """("host", port) of a "host:port" or "[v6 host]:port" address; ValueError if the port is not a number."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class ChannelError(SwarmError):
    """The channel failed; unless said otherwise it is closed."""


class HandshakeError(ChannelError):
    """The peer could not be authenticated or speaks another version or network."""


class ChannelTimeout(ChannelError):
    """Nothing arrived in time. The channel stays open only when no frame had begun."""


class HandshakeTimeout(HandshakeError, ChannelTimeout):
    """The handshake did not finish in time."""


class ChannelClosedError(ChannelError):
    """The channel was closed by this side or the peer."""


def _encode_network_id(network_id: str) -> bytes:
    encoded = network_id.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_NETWORK_ID_BYTES:
        raise ValueError(f"network id must be 1 to {MAX_NETWORK_ID_BYTES} bytes of UTF-8, not {len(encoded)}")
    return encoded


@dataclass(frozen=True)
class Hello:
    """The first record of a handshake; see the module docstring for its layout."""

    version: int
    role: int
    identity_key: bytes
    ephemeral_key: bytes
    network_id: str

    def encode(self) -> bytes:
        network_id = _encode_network_id(self.network_id)
        head = _HELLO_HEAD.pack(
            HELLO_MAGIC, self.version, self.role, self.identity_key, self.ephemeral_key, len(network_id)
        )
        return head + network_id

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        if len(body) < 6 or body[:4] != HELLO_MAGIC:
            raise HandshakeError("peer does not speak the swarm channel protocol (bad hello magic)")
        (version,) = struct.unpack_from(">H", body, 4)
        if version != CHANNEL_VERSION:
            raise HandshakeError(
                f"unsupported channel protocol version {version} (this node speaks {CHANNEL_VERSION})"
            )
        if len(body) < _HELLO_HEAD.size:
            raise HandshakeError(f"peer hello is truncated ({len(body)} bytes)")
        _, _, role, identity_key, ephemeral_key, size = _HELLO_HEAD.unpack_from(body)
        if len(body) != _HELLO_HEAD.size + size or size == 0:
            raise HandshakeError("peer hello has an inconsistent network id length")
        try:
            network_id = body[_HELLO_HEAD.size :].decode("utf-8")
        except UnicodeDecodeError as error:
            raise HandshakeError("peer network id is not UTF-8") from error
        if role not in _ROLE_NAMES:
            raise HandshakeError(f"peer hello has unknown role {role}")
        return cls(version, role, identity_key, ephemeral_key, network_id)


class FrameCipher:
    """One direction of a channel: a key and the counter that makes each nonce."""

    __slots__ = ("_counter", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._counter = 0

    def _next_nonce(self) -> bytes:
        if self._counter > MAX_COUNTER:
            raise ChannelError("frame counter exhausted; the channel must be re-established")
        nonce = bytes(4) + self._counter.to_bytes(8, "big")
        self._counter += 1
        return nonce

    def seal(self, payload: bytes) -> bytes:
        """The whole frame for `payload`: length prefix and ciphertext."""
        header = _LENGTH.pack(len(payload) + TAG_BYTES)
        nonce = self._next_nonce()
        return header + libnacl.crypto_aead_chacha20poly1305_ietf_encrypt(payload, header, nonce, self._key)

    def open(self, header: bytes, ciphertext: bytes) -> bytes:
        """The payload of the next frame; `ChannelError` if it is not authentic."""
        nonce = self._next_nonce()
        try:
            return libnacl.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, header, nonce, self._key)
        except ValueError as error:
            raise ChannelError(
                "frame failed authentication (tampered, replayed, reordered or after a dropped frame)"
            ) from error


@dataclass(frozen=True)
class HandshakeResult:
    peer_identity_key: bytes
    send: FrameCipher
    receive: FrameCipher


class Handshake:
    """The handshake of one side, without I/O: hello out, hello in, signature out, signature in."""

    def __init__(
        self, identity: Identity, network_id: str, role: int, *, expected_peer: bytes | None = None
    ) -> None:
        self._identity = identity
        self._role = role
        self._expected_peer = expected_peer
        self._ephemeral_public, self._ephemeral_secret = libnacl.crypto_kx_keypair()
        self.hello = Hello(
            CHANNEL_VERSION, role, identity.public_key, self._ephemeral_public, network_id
        ).encode()
        self._network_id = network_id
        self._peer: Hello | None = None
        self._transcript = b""

    def receive_hello(self, body: bytes) -> Hello:
        peer = Hello.decode(body)
        if peer.role == self._role:
            raise HandshakeError(f"peer also claims the {_ROLE_NAMES[peer.role]} role")
        if peer.network_id != self._network_id:
            raise HandshakeError(
                f"network id mismatch: peer is on {peer.network_id!r}, this node on {self._network_id!r}"
            )
        if self._expected_peer is not None and peer.identity_key != self._expected_peer:
            raise HandshakeError(
                f"peer is {peer_id_of(peer.identity_key)}, expected {peer_id_of(self._expected_peer)}"
            )
        client, server = (self.hello, body) if self._role == CLIENT else (body, self.hello)
        self._transcript = _LENGTH.pack(len(client))[2:] + client + _LENGTH.pack(len(server))[2:] + server
        self._peer = peer
        return peer

    def _signed_data(self, role: int) -> bytes:
        return _SIGNATURE_CONTEXT + bytes([role]) + self._transcript

    def signature(self) -> bytes:
        if self._peer is None:
            raise RuntimeError("signature() before receive_hello()")
        return self._identity.sign(self._signed_data(self._role))

    def finish(self, peer_signature: bytes) -> HandshakeResult:
        peer = self._peer
        if peer is None:
            raise RuntimeError("finish() before receive_hello()")
        if not verify(peer.identity_key, self._signed_data(peer.role), peer_signature):
            raise HandshakeError(f"handshake signature from {peer_id_of(peer.identity_key)} is invalid")
        derive = (
            libnacl.crypto_kx_client_session_keys
            if self._role == CLIENT
            else libnacl.crypto_kx_server_session_keys
        )
        receive_key, send_key, status = derive(
            self._ephemeral_public, self._ephemeral_secret, peer.ephemeral_key
        )
        # Forward secrecy: the ephemeral secret exists only in memory, only until here.
        self._ephemeral_secret = b""
        if status != 0:
            raise HandshakeError("peer ephemeral key is not a usable X25519 key")
        return HandshakeResult(peer.identity_key, FrameCipher(send_key), FrameCipher(receive_key))


class _Reader:
    """Reads exact byte counts from a socket before a deadline, without socket timeouts.

    Waiting is done with poll so that a receiving thread never changes the socket timeout
    that a sending thread relies on.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def read(self, count: int, deadline: float, *, idle: bool = False) -> bytes:
        """`count` bytes, or: `_Idle` if `idle` and nothing came by the deadline;
        `TimeoutError` if some but not all came; `EOFError(bytes received)` at end of stream.
        """
        buffer = bytearray()
        while len(buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
                if time.monotonic() < deadline:
                    continue
                if idle and not buffer:
                    raise _Idle
                raise TimeoutError
            chunk = self._sock.recv(min(count - len(buffer), _READ_CHUNK))
            if not chunk:
                raise EOFError(len(buffer))
            buffer += chunk
        return bytes(buffer)


class _Idle(Exception):
    """No byte of a new frame arrived before the deadline."""


class SecureChannel:
    """A handshaken connection: `send` and `recv` whole payloads, each authenticated.

    One thread may send while another receives. Every `ChannelError` leaves the channel
    closed except two that lose nothing: a `recv` timeout before any byte of a frame, and
    a `send` refused locally for exceeding the frame limit.
    """

    def __init__(
        self,
        sock: socket.socket,
        result: HandshakeResult,
        identity: Identity,
        network_id: str,
        *,
        timeout: float,
        max_frame_bytes: int,
    ) -> None:
        self._sock = sock
        self._reader = _Reader(sock)
        self._send_cipher = result.send
        self._receive_cipher = result.receive
        self.identity = identity
        self.network_id = network_id
        self.peer_public_key: bytes = result.peer_identity_key
        self.peer_id: str = peer_id_of(result.peer_identity_key)
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self._send_lock = threading.Lock()
        self._receive_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(
        cls,
        address: tuple[str, int] | str,
        identity: Identity,
        network_id: str,
        *,
        expected_peer: bytes | None = None,
        timeout: float,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> SecureChannel:
        """Connects to `address` ((host, port) or "host:port") and runs the client side of the handshake.

        `timeout` bounds the connect and the whole handshake, and is the default for each
        later `send` and `recv`. With `expected_peer`, any other identity is refused.
        """
        if expected_peer is not None and len(expected_peer) != PUBLIC_KEY_BYTES:
            raise ValueError(f"expected_peer must be a {PUBLIC_KEY_BYTES}-byte public key")
        handshake = Handshake(identity, network_id, CLIENT, expected_peer=expected_peer)
        deadline = time.monotonic() + timeout
        host, port = host_port(address) if isinstance(address, str) else address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as error:
            raise ChannelTimeout(f"connecting to {host}:{port} timed out after {timeout:g} s") from error
        except OSError as error:
            raise ChannelError(f"cannot connect to {host}:{port}: {error.strerror or error}") from error
        return cls._establish(sock, handshake, identity, network_id, deadline, timeout, max_frame_bytes)

    @classmethod
    def accept(
        cls,
        sock: socket.socket,
        identity: Identity,
        network_id: str,
        *,
        timeout: float,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> SecureChannel:
        """Runs the server side of the handshake on a socket returned by `listen.accept()`.

        Takes ownership of `sock`: on failure it is closed.
        """
        deadline = time.monotonic() + timeout
        try:
            handshake = Handshake(identity, network_id, SERVER)
        except BaseException:
            sock.close()
            raise
        return cls._establish(sock, handshake, identity, network_id, deadline, timeout, max_frame_bytes)

    @classmethod
    def _establish(
        cls,
        sock: socket.socket,
        handshake: Handshake,
        identity: Identity,
        network_id: str,
        deadline: float,
        timeout: float,
        max_frame_bytes: int,
    ) -> SecureChannel:
        where = _describe(sock)
        try:
            sock.settimeout(timeout)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = _Reader(sock)
            sock.sendall(_LENGTH.pack(len(handshake.hello)) + handshake.hello)
            handshake.receive_hello(_read_record(reader, _MAX_HELLO_BYTES, deadline))
            signature = handshake.signature()
            sock.sendall(_LENGTH.pack(len(signature)) + signature)
            result = handshake.finish(_read_record(reader, SIGNATURE_BYTES, deadline))
        except HandshakeError as error:
            logger.warning("handshake with %s failed: %s", where, error)
            sock.close()
            raise
        except TimeoutError as error:
            sock.close()
            raise HandshakeTimeout(f"handshake with {where} timed out after {timeout:g} s") from error
        except (EOFError, ConnectionError) as error:
            sock.close()
            raise HandshakeError(f"{where} closed the connection during the handshake") from error
        except OSError as error:
            sock.close()
            raise HandshakeError(f"handshake with {where} failed: {error.strerror or error}") from error
        except BaseException:
            sock.close()
            raise
        return cls(sock, result, identity, network_id, timeout=timeout, max_frame_bytes=max_frame_bytes)

    def send(self, payload: bytes, *, timeout: float | None = None) -> None:
        """Sends one payload (at most `max_frame_bytes`). `timeout` defaults to the channel's."""
        payload = bytes(payload)
        if len(payload) > self.max_frame_bytes:
            raise ChannelError(
                f"payload of {len(payload)} bytes exceeds the frame limit of {self.max_frame_bytes}"
            )
        with self._send_lock:
            self._check_open()
            try:
                frame = self._send_cipher.seal(payload)
            except ChannelError as error:
                self._fail(str(error))
                raise
            try:
                self._sock.settimeout(self.timeout if timeout is None else timeout)
                self._sock.sendall(frame)
            except TimeoutError as error:
                self._fail("send timed out")
                raise ChannelTimeout(f"sending to {self.peer_id} timed out; channel closed") from error
            except OSError as error:
                if self._closed:
                    raise ChannelClosedError("channel is closed") from error
                self._fail(f"send failed: {error.strerror or error}")
                raise ChannelClosedError(
                    f"connection to {self.peer_id} lost: {error.strerror or error}"
                ) from error

    def recv(self, *, timeout: float | None = None) -> bytes:
        """The next payload. `timeout` (default: the channel's) bounds the wait.

        If nothing at all arrives in time, `ChannelTimeout` is raised and the channel stays
        open; a frame that starts but does not finish in time closes it.
        """
        with self._receive_lock:
            self._check_open()
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            header = b""
            try:
                header = self._reader.read(_LENGTH.size, deadline, idle=True)
                (length,) = _LENGTH.unpack(header)
                if length > self.max_frame_bytes + TAG_BYTES:
                    raise _Refused(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes + TAG_BYTES}"
                    )
                if length < TAG_BYTES:
                    raise _Refused(f"frame of {length} bytes is shorter than its authentication tag")
                ciphertext = self._reader.read(length, deadline)
                return self._receive_cipher.open(header, ciphertext)
            except _Idle as error:
                raise ChannelTimeout(
                    f"no frame from {self.peer_id} within {_seconds(timeout, self.timeout)}"
                ) from error
            except _Refused as error:
                self._fail(str(error))
                raise ChannelError(f"{error}; channel to {self.peer_id} closed") from error
            except ChannelError as error:
                self._fail(str(error))
                raise ChannelError(f"{error}; channel to {self.peer_id} closed") from error
            except TimeoutError as error:
                self._fail("frame did not arrive in time")
                raise ChannelTimeout(
                    f"frame from {self.peer_id} did not finish in time; channel closed"
                ) from error
            except EOFError as error:
                closed_by_us = self._closed
                middle = " in the middle of a frame" if header or error.args[0] else ""
                # Hanging up between frames is how a peer ends a session: no warning.
                self._fail(
                    f"peer closed the connection{middle}", logging.WARNING if middle else logging.DEBUG
                )
                if closed_by_us:
                    raise ChannelClosedError("channel is closed") from error
                raise ChannelClosedError(f"{self.peer_id} closed the connection{middle}") from error
            except OSError as error:
                closed_by_us = self._closed
                self._fail(f"receive failed: {error.strerror or error}")
                if closed_by_us:
                    raise ChannelClosedError("channel is closed") from error
                raise ChannelClosedError(
                    f"connection to {self.peer_id} lost: {error.strerror or error}"
                ) from error

    def close(self) -> None:
        """Closes the connection; a blocked `recv` in another thread returns at once. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosedError(f"channel to {self.peer_id} is closed")

    def _fail(self, reason: str, level: int = logging.WARNING) -> None:
        if not self._closed:
            logger.log(level, "closing channel to %s: %s", self.peer_id, reason)
        self.close()

    def __enter__(self) -> SecureChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SecureChannel(peer_id={self.peer_id!r}, network_id={self.network_id!r}, {state})"


class _Refused(Exception):
    """A frame header that is refused before its body is read."""


def _seconds(timeout: float | None, default: float) -> str:
    return f"{default if timeout is None else timeout:g} s"


def _read_record(reader: _Reader, limit: int, deadline: float) -> bytes:
    (length,) = _LENGTH.unpack(reader.read(_LENGTH.size, deadline))
    if length > limit:
        raise HandshakeError(f"handshake record of {length} bytes exceeds the limit of {limit}")
    return reader.read(length, deadline)


def _describe(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "peer"
    return f"{host}:{port}"
