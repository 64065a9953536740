"""Pipeline messages between peers: versioned, size-limited, validated on decode.

One message is one `SecureChannel` payload (the channel frames it and bounds its size):

    header  = magic "SWMS" | u16 version | u8 type | u8 flags (0) | u32 body length
    body    = the fields of that type, in order

Integers are big-endian; `str8` is a u8 length and that many bytes of UTF-8; `bytes32` a
u32 length and the bytes. Tensor payloads are little-endian, as in GGUF and ggml.

    1 OpenSession  str8 session_id | str8 model_id | u32 layer_start | u32 layer_end
                   | u8 compression | u32 max_context | 32-byte requester public key
                   | u16 n | sampling parameters as a JSON object (n bytes)
                   | u8 hops | hops x (str8 "host:port" | 32-byte public key
                   | u32 layer_start | u32 layer_end)
    2 Forward      str8 session_id | u32 start_position | u8 compression | u32 rows (T)
                   | u32 cols (d) | bytes32 hidden states
    3 TokenResult  str8 session_id | u32 position | bytes32 sealed token
    4 Close        str8 session_id
    5 Error        str8 session_id (may be empty) | str8 code | u16 n | message (UTF-8)
    6 Ping, 7 Pong u64 nonce | f64 timestamp (Unix seconds)
    8 Generate     str8 session_id | u32 start_position | u32 max_tokens | u16 n
                   | n x u32 end-of-generation token ids

    9 PrefixQuery  str8 model_id | u16 n | n x 16-byte prefix-block keys
   10 PrefixBlock  u16 remaining | 16-byte key | u8 dtype (0 f16, 1 f32) | u32 layers
                   | u32 tokens | u32 kv_heads | u32 key_dim | u32 value_dim | 32-byte digest
                   | bytes32 keys | bytes32 values
   11 Credits      u32 n | a JSON object (n bytes, at most 1 MiB)
   12 PoolMessage  u32 n | a JSON object (n bytes, at most 1 MiB)
   13 Delegate     u32 n | a JSON object (n bytes, at most 4 MiB)
   14 DelegateEvent u32 n | a JSON object (n bytes, at most 1 MiB)

A Credits message carries the credit exchanges of `swarm.credit_desk`, on a channel of
their own: a signed receipt for a finished session, a balance report, the challenge a
stage answers a report with, the proof that answers the challenge, and the stage's
acknowledgement (with its own report). Their fields are checked by `swarm.credits`.
A PoolMessage carries a device's request to join a pool (the owner's invitation and its
signed acceptance) or a member's request for the pool's current state, and the owner's
answer, the signed state (`swarm.pool_desk`, formats in `swarm.pool`).

A Delegate hands a whole request to a peer serving a model this node does not
(`swarm.delegation`): the request as the node protocol's `GenerationRequest` (chat
messages or a prompt, sampling, tools), to count its prompt tokens or to generate.
The peer answers DelegateEvents, each carrying one event of the node protocol
(`swarm.node_protocol`: start, text, tool_call, arguments, progress, done, error),
or an Error when it takes no delegated requests. The requester stops a generation
early by closing the connection.

A PrefixQuery asks a peer that shares its prompt-prefix cache (`network.prefix_sharing`)
for the KV of the blocks named by their chained keys (`swarm.prefix_cache`). It answers
one PrefixBlock per block it holds, from the first key on and stopping at the first it
lacks, each saying how many more follow; an Error (code `not_found`) when it holds none.
The digest is BLAKE2b-256 over the key, the layout fields and the two tensors' bytes
(`prefix_digest`), checked by the asker with the layout and finite values before use.

A Generate goes to a stage that holds the whole model in its session (one-stage route):
it decodes on its own from its last sampled token, at start_position, answering one
TokenResult per token, until it has sent max_tokens or one of the end-of-generation
tokens (DESIGN.md §5, remote-generate). The requester stops it early by closing the
connection.

The hops of an OpenSession are the rest of the route after the stage it is sent to: that
stage opens the session on the first hop and passes it the remaining ones.

Compression 0 is f16: T*d IEEE halves, row-major. Compression 1 is Q8_0, ggml's
`block_q8_0` (`quantize_row_q8_0_ref`): the T*d values row-major, zero-padded to a multiple
of 32, in blocks of an f16 scale followed by 32 int8s (34 bytes per 32 values).

The sealed token in a TokenResult is a `SampledToken` sealed to the requester's identity
key (`swarm.identity.seal_to`), so stages that relay it cannot read it; its plaintext
repeats the session id and position, which the requester checks.

Decoding never trusts a length: every count is checked against the bytes actually
present before anything is allocated, and any bad input raises `WireError`.
`UnsupportedVersionError` carries the version, and `error_reply` turns any `WireError`
into an `Error` message to send back. Imports no jax; numpy only to encode or decode the
tensor of a Forward.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, Identity, SealError, peer_id_of, seal_to
from swarm.secure_channel import host_port

if TYPE_CHECKING:
    import numpy as np

PROTOCOL_VERSION = 1
MAGIC = b"SWMS"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # equals the channel's default frame limit
MAX_SAMPLING_JSON_BYTES = 16 * 1024
MAX_SEALED_TOKEN_BYTES = 64 * 1024
MAX_ERROR_MESSAGE_BYTES = 4096
MAX_TOP_LOGPROBS = 64
MAX_ROUTE_HOPS = 64
MAX_EOG_IDS = 256
MAX_PREFIX_KEYS = 1024
MAX_CREDITS_JSON_BYTES = 1024 * 1024
MAX_DELEGATE_JSON_BYTES = 4 * 1024 * 1024
PREFIX_KEY_BYTES = 16
PREFIX_DIGEST_BYTES = 32
KV_DTYPES = ("f16", "f32")
# Index order is the wire encoding: append only. f32 is lossless (pipeline output equals
# a single node's); f16 halves and q8_0 quarters the bytes, for slow links.
COMPRESSIONS = ("f16", "q8_0", "f32")
Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34

# Error codes; a peer may send others, which decode as they are.
UNSUPPORTED_VERSION = "unsupported_version"
BAD_MESSAGE = "bad_message"
UNKNOWN_SESSION = "unknown_session"
NOT_FOUND = "not_found"
OVERLOADED = "overloaded"
INTERNAL = "internal"

_HEADER = struct.Struct(">4sHBBI")
_SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")
_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,250}:[0-9]{1,5}")
_U32 = 2**32 - 1


class WireError(SwarmError):
    """A message that cannot be encoded, or bytes that are not a valid message."""


class UnsupportedVersionError(WireError):
    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})")
        self.version = version


def _check_session_id(session_id: str, *, allow_empty: bool = False) -> None:
    if not (
        isinstance(session_id, str)
        and (_SESSION_ID.fullmatch(session_id) or (allow_empty and not session_id))
    ):
        raise WireError(f"session id {session_id!r} is not 1-64 characters of A-Z a-z 0-9 _ . : -")


def _check_u32(name: str, value: int, minimum: int = 0) -> None:
    if not (isinstance(value, int) and minimum <= value <= _U32):
        raise WireError(f"{name} {value!r} is not an integer in [{minimum}, 2**32)")


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise WireError(f"unknown compression {compression!r} (expected one of {', '.join(COMPRESSIONS)})")


def _check_sampling(parameters: Any) -> None:
    """Sampling parameters are a flat JSON object: scalars, or lists of scalars (stop strings)."""
    if not isinstance(parameters, dict) or len(parameters) > 64:
        raise WireError("sampling parameters must be a JSON object of at most 64 entries")
    for key, value in parameters.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise WireError(f"sampling parameter name {key!r} is not a 1-64 character string")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > 64:
            raise WireError(f"sampling parameter {key!r} lists more than 64 values")
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise WireError(f"sampling parameter {key!r} is not finite")
            if item is not None and not isinstance(item, str | int | float):
                raise WireError(f"sampling parameter {key!r} has a value of type {type(item).__name__}")


@dataclass(frozen=True)
class RouteHop:
    """One downstream stage of a route: where it listens, who it is, which layers it runs."""

    address: str  # "host:port"
    public_key: bytes
    layer_range: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not _ADDRESS.fullmatch(self.address):
            raise WireError(f"hop address {self.address!r} is not host:port")
        port = int(self.address.rsplit(":", 1)[1])
        if not 1 <= port <= 65535:
            raise WireError(f"hop address {self.address!r} has port {port} outside 1-65535")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise WireError(f"hop public key must be {PUBLIC_KEY_BYTES} bytes")
        start, end = self.layer_range
        object.__setattr__(self, "layer_range", (start, end))
        _check_u32("hop layer range start", start)
        _check_u32("hop layer range end", end)
        if start >= end:
            raise WireError(f"hop layer range [{start}, {end}) is empty")

    @property
    def host_port(self) -> tuple[str, int]:
        return host_port(self.address)

    def describe(self) -> str:
        first, last = self.layer_range
        return f"stage {peer_id_of(self.public_key)} at {self.address} (layers {first}-{last})"


@dataclass(frozen=True)
class OpenSession:
    """Asks a stage to keep KV state for `session_id` over its layers [start, end)."""

    session_id: str
    model_id: str
    layer_range: tuple[int, int]
    sampling: dict[str, Any]
    requester_public_key: bytes
    compression: str = "f32"
    max_context: int = 4096
    route: tuple[RouteHop, ...] = ()  # the stages after this one, in order

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        if not isinstance(self.model_id, str) or not 1 <= len(self.model_id.encode("utf-8")) <= 255:
            raise WireError(f"model id {self.model_id!r} is not 1-255 bytes of UTF-8")
        start, end = self.layer_range
        object.__setattr__(self, "layer_range", (start, end))
        _check_u32("layer range start", start)
        _check_u32("layer range end", end)
        if start >= end:
            raise WireError(f"layer range [{start}, {end}) is empty")
        _check_sampling(self.sampling)
        if (
            not isinstance(self.requester_public_key, bytes)
            or len(self.requester_public_key) != PUBLIC_KEY_BYTES
        ):
            raise WireError(f"requester public key must be {PUBLIC_KEY_BYTES} bytes")
        _check_compression(self.compression)
        _check_u32("max context", self.max_context, minimum=1)
        object.__setattr__(self, "route", tuple(self.route))
        if len(self.route) > MAX_ROUTE_HOPS:
            raise WireError(f"a route has at most {MAX_ROUTE_HOPS} hops, not {len(self.route)}")
        previous_end = end
        for hop in self.route:
            if not isinstance(hop, RouteHop):
                raise WireError(f"route hops must be RouteHop, not {type(hop).__name__}")
            if hop.layer_range[0] != previous_end:
                raise WireError(
                    f"route hop {hop.address} starts at layer {hop.layer_range[0]}, not {previous_end}"
                )
            previous_end = hop.layer_range[1]


@dataclass(frozen=True, eq=False)
class Forward:
    """Hidden states f32[T, d] entering a stage, for positions start_position .. + T - 1."""

    session_id: str
    start_position: int
    hidden_states: np.ndarray
    compression: str = "f32"

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        _check_u32("start position", self.start_position)
        _check_compression(self.compression)
        shape = getattr(self.hidden_states, "shape", None)
        if shape is None or len(shape) != 2 or not (1 <= shape[0] <= _U32 and 1 <= shape[1] <= _U32):
            raise WireError(f"hidden states must be an array of shape [T, d] with T, d >= 1, not {shape}")


@dataclass(frozen=True)
class TokenResult:
    """The token sampled at `position`, sealed to the requester (see `seal_token`)."""

    session_id: str
    position: int
    sealed: bytes

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        _check_u32("position", self.position)
        if not isinstance(self.sealed, bytes) or len(self.sealed) > MAX_SEALED_TOKEN_BYTES:
            raise WireError(f"sealed token must be at most {MAX_SEALED_TOKEN_BYTES} bytes")


@dataclass(frozen=True)
class Close:
    session_id: str

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)


@dataclass(frozen=True)
class Error:
    """A refusal or failure; an empty session id means the connection as a whole."""

    session_id: str
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_session_id(self.session_id, allow_empty=True)
        if not isinstance(self.code, str) or not _ERROR_CODE.fullmatch(self.code):
            raise WireError(f"error code {self.code!r} is not 1-64 characters of a-z 0-9 _")
        if not isinstance(self.message, str) or len(self.message.encode("utf-8")) > MAX_ERROR_MESSAGE_BYTES:
            raise WireError(f"error message must be a string of at most {MAX_ERROR_MESSAGE_BYTES} bytes")


@dataclass(frozen=True)
class Generate:
    """Asks a whole-model stage to decode up to max_tokens on its own (see the module docstring)."""

    session_id: str
    start_position: int
    max_tokens: int
    eog_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_session_id(self.session_id)
        _check_u32("start position", self.start_position)
        _check_u32("max tokens", self.max_tokens, minimum=1)
        object.__setattr__(self, "eog_ids", tuple(self.eog_ids))
        if len(self.eog_ids) > MAX_EOG_IDS:
            raise WireError(f"at most {MAX_EOG_IDS} end-of-generation tokens")
        for token_id in self.eog_ids:
            _check_u32("end-of-generation token id", token_id)


@dataclass(frozen=True)
class _JsonMessage:
    """A message whose body is one JSON object with a "kind" (see the module docstring)."""

    body: dict[str, Any]
    max_bytes = MAX_CREDITS_JSON_BYTES  # the encoded body's limit

    def __post_init__(self) -> None:
        if not isinstance(self.body, dict) or not isinstance(self.body.get("kind"), str):
            raise WireError(f"a {type(self).__name__} message is a JSON object with a kind")


@dataclass(frozen=True)
class Credits(_JsonMessage):
    """A credit exchange: receipt, report, challenge, proof or acknowledgement."""


@dataclass(frozen=True)
class PoolMessage(_JsonMessage):
    """A pool exchange: a join, a request for the member list, or the owner's state."""


@dataclass(frozen=True)
class Delegate(_JsonMessage):
    """A whole request for a model the peer serves: kind "generate" or "count"."""

    max_bytes = MAX_DELEGATE_JSON_BYTES


@dataclass(frozen=True)
class DelegateEvent(_JsonMessage):
    """One node-protocol event of a delegated request (kind "event")."""


@dataclass(frozen=True)
class PrefixQuery:
    """Asks a peer for the KV of prefix blocks (see the module docstring)."""

    model_id: str
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        if not self.model_id or len(self.model_id.encode()) > 255:
            raise WireError("a prefix query needs a model id of 1 to 255 bytes")
        if not 1 <= len(self.keys) <= MAX_PREFIX_KEYS:
            raise WireError(f"a prefix query names 1 to {MAX_PREFIX_KEYS} blocks, not {len(self.keys)}")
        if any(not isinstance(key, bytes) or len(key) != PREFIX_KEY_BYTES for key in self.keys):
            raise WireError(f"prefix block keys are {PREFIX_KEY_BYTES} bytes")


@dataclass(frozen=True)
class PrefixBlock:
    """One block of prefix KV: keys and values f16/f32[layers, tokens, kv_heads, dim]."""

    remaining: int
    key: bytes
    keys: np.ndarray
    values: np.ndarray
    digest: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.remaining <= MAX_PREFIX_KEYS:
            raise WireError(f"remaining blocks {self.remaining} out of range")
        if len(self.key) != PREFIX_KEY_BYTES or len(self.digest) != PREFIX_DIGEST_BYTES:
            raise WireError("bad prefix block key or digest size")
        if self.keys.ndim != 4 or self.values.ndim != 4 or self.keys.shape[:3] != self.values.shape[:3]:
            raise WireError("prefix block keys and values must be [layers, tokens, kv_heads, dim]")
        if self.keys.dtype != self.values.dtype or self.keys.dtype.name not in ("float16", "float32"):
            raise WireError("prefix block tensors must both be f16 or both f32")

    @classmethod
    def of(cls, remaining: int, key: bytes, keys: np.ndarray, values: np.ndarray) -> PrefixBlock:
        """A block with its digest computed."""
        return cls(remaining, key, keys, values, prefix_digest(key, keys, values))


def prefix_digest(key: bytes, keys: np.ndarray, values: np.ndarray) -> bytes:
    """BLAKE2b-256 over a prefix block's key, layout and little-endian tensor bytes."""
    import hashlib

    import numpy as np

    layers, tokens, heads, key_dim = keys.shape
    layout = struct.pack(
        ">BIIIII", KV_DTYPES.index(_kv_dtype(keys)), layers, tokens, heads, key_dim, values.shape[3]
    )
    digest = hashlib.blake2b(key + layout, digest_size=PREFIX_DIGEST_BYTES)
    for tensor in (keys, values):
        digest.update(np.ascontiguousarray(tensor, tensor.dtype.newbyteorder("<")).tobytes())
    return digest.digest()


def _kv_dtype(tensor: np.ndarray) -> str:
    return "f16" if tensor.dtype.name == "float16" else "f32"


@dataclass(frozen=True)
class _Heartbeat:
    nonce: int
    timestamp: float

    def __post_init__(self) -> None:
        if not (isinstance(self.nonce, int) and 0 <= self.nonce < 2**64):
            raise WireError(f"nonce {self.nonce!r} is not a 64-bit unsigned integer")
        if not (isinstance(self.timestamp, int | float) and math.isfinite(self.timestamp)):
            raise WireError(f"timestamp {self.timestamp!r} is not a finite number")


@dataclass(frozen=True)
class Ping(_Heartbeat):
    """Asks the peer to answer with a Pong carrying the same nonce."""


@dataclass(frozen=True)
class Pong(_Heartbeat):
    """Answers a Ping: its nonce, and the answering peer's clock."""


Message = (
    OpenSession
    | Forward
    | TokenResult
    | Close
    | Error
    | Ping
    | Pong
    | Generate
    | PrefixQuery
    | PrefixBlock
    | Credits
    | PoolMessage
    | Delegate
    | DelegateEvent
)


@dataclass(frozen=True)
class SampledToken:
    """What a TokenResult seals: the token and, if asked for, its logprobs."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = field(default=())

    def __post_init__(self) -> None:
        _check_u32("token id", self.token_id)
        if self.logprob is not None:
            _check_logprob(self.logprob)
        if len(self.top_logprobs) > MAX_TOP_LOGPROBS:
            raise WireError(f"at most {MAX_TOP_LOGPROBS} top logprobs")
        object.__setattr__(
            self, "top_logprobs", tuple((token, logprob) for token, logprob in self.top_logprobs)
        )
        for token_id, logprob in self.top_logprobs:
            _check_u32("token id", token_id)
            _check_logprob(logprob)


def _check_logprob(logprob: float) -> None:
    # Logprobs travel as float32: -inf is a real value, NaN and float32 overflow are not.
    if not (isinstance(logprob, int | float) and (logprob == -math.inf or abs(logprob) < 3.4e38)):
        raise WireError(f"logprob {logprob!r} is not a float32 value")


def error_reply(error: WireError, session_id: str = "") -> Error:
    """The Error message that answers a message which failed to decode with `error`."""
    code = UNSUPPORTED_VERSION if isinstance(error, UnsupportedVersionError) else BAD_MESSAGE
    message = str(error).encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
    return Error(session_id, code, message)


# --- encoding ---------------------------------------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def pack(self, fmt: str, *values: Any) -> None:
        self.parts.append(struct.pack(">" + fmt, *values))

    def str8(self, text: str) -> None:
        encoded = text.encode("utf-8")
        self.pack("B", len(encoded))
        self.parts.append(encoded)

    def bytes32(self, data: bytes) -> None:
        self.pack("I", len(data))
        self.parts.append(data)


def encode(message: Message) -> bytes:
    """The bytes of `message`, header included; `WireError` if it cannot be sent."""
    writer = _Writer()
    kind = type(message)
    if kind is OpenSession:
        sampling = json.dumps(
            message.sampling, separators=(",", ":"), sort_keys=True, allow_nan=False
        ).encode()
        if len(sampling) > MAX_SAMPLING_JSON_BYTES:
            raise WireError(f"sampling parameters take {len(sampling)} bytes, over {MAX_SAMPLING_JSON_BYTES}")
        writer.str8(message.session_id)
        writer.str8(message.model_id)
        writer.pack(
            "IIBI", *message.layer_range, COMPRESSIONS.index(message.compression), message.max_context
        )
        writer.parts.append(message.requester_public_key)
        writer.pack("H", len(sampling))
        writer.parts.append(sampling)
        writer.pack("B", len(message.route))
        for hop in message.route:
            writer.str8(hop.address)
            writer.parts.append(hop.public_key)
            writer.pack("II", *hop.layer_range)
    elif kind is Forward:
        payload = encode_hidden_states(message.hidden_states, message.compression)
        rows, cols = message.hidden_states.shape
        writer.str8(message.session_id)
        writer.pack("IBII", message.start_position, COMPRESSIONS.index(message.compression), rows, cols)
        writer.bytes32(payload)
    elif kind is TokenResult:
        writer.str8(message.session_id)
        writer.pack("I", message.position)
        writer.bytes32(message.sealed)
    elif kind is Close:
        writer.str8(message.session_id)
    elif kind is Error:
        text = message.message.encode("utf-8")
        writer.str8(message.session_id)
        writer.str8(message.code)
        writer.pack("H", len(text))
        writer.parts.append(text)
    elif kind in (Ping, Pong):
        writer.pack("Qd", message.nonce, message.timestamp)
    elif kind is Generate:
        writer.str8(message.session_id)
        writer.pack("IIH", message.start_position, message.max_tokens, len(message.eog_ids))
        writer.pack(f"{len(message.eog_ids)}I", *message.eog_ids)
    elif kind in (Credits, PoolMessage, Delegate, DelegateEvent):
        name = kind.__name__
        try:
            body = json.dumps(message.body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            raise WireError(f"{name} message is not JSON: {error}") from None
        if len(body) > kind.max_bytes:
            raise WireError(f"{name} message of {len(body)} bytes exceeds {kind.max_bytes}")
        writer.bytes32(body)
    elif kind is PrefixQuery:
        writer.str8(message.model_id)
        writer.pack("H", len(message.keys))
        writer.parts.extend(message.keys)
    elif kind is PrefixBlock:
        import numpy as np

        layers, tokens, heads, key_dim = message.keys.shape
        writer.pack("H", message.remaining)
        writer.parts.append(message.key)
        writer.pack(
            "BIIIII",
            KV_DTYPES.index(_kv_dtype(message.keys)),
            layers,
            tokens,
            heads,
            key_dim,
            message.values.shape[3],
        )
        writer.parts.append(message.digest)
        for tensor in (message.keys, message.values):
            writer.bytes32(np.ascontiguousarray(tensor, tensor.dtype.newbyteorder("<")).tobytes())
    else:
        raise WireError(f"cannot encode {kind.__name__}")
    body = b"".join(writer.parts)
    if len(body) > MAX_MESSAGE_BYTES - _HEADER.size:
        raise WireError(
            f"{kind.__name__} of {len(body)} bytes exceeds the message limit of {MAX_MESSAGE_BYTES}"
        )
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, _TYPE_IDS[kind], 0, len(body)) + body


# --- decoding ---------------------------------------------------------------------------


class _Reader:
    """Reads fields of one message body, refusing to read past its end."""

    def __init__(self, data: memoryview, offset: int, name: str) -> None:
        self.data = data
        self.offset = offset
        self.name = name

    def take(self, count: int, what: str) -> bytes:
        if len(self.data) - self.offset < count:
            raise WireError(
                f"truncated {self.name}: {what} needs {count} bytes, {len(self.data) - self.offset} left"
            )
        start = self.offset
        self.offset += count
        return bytes(self.data[start : self.offset])

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        layout = struct.Struct(">" + fmt)
        return layout.unpack(self.take(layout.size, what))

    def text(self, count: int, what: str) -> str:
        try:
            return self.take(count, what).decode("utf-8")
        except UnicodeDecodeError as error:
            raise WireError(f"{self.name} {what} is not UTF-8") from error

    def str8(self, what: str) -> str:
        (count,) = self.unpack("B", what)
        return self.text(count, what)

    def bytes32(self, what: str, limit: int) -> bytes:
        (count,) = self.unpack("I", what)
        if count > limit:
            raise WireError(f"{self.name} {what} of {count} bytes exceeds the limit of {limit}")
        return self.take(count, what)

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise WireError(f"{len(self.data) - self.offset} unexpected bytes after the {self.name} body")


def _read_compression(reader: _Reader) -> str:
    (index,) = reader.unpack("B", "compression")
    if index >= len(COMPRESSIONS):
        raise WireError(f"unknown compression tag {index} in {reader.name}")
    return COMPRESSIONS[index]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _decode_open_session(reader: _Reader) -> OpenSession:
    session_id = reader.str8("session id")
    model_id = reader.str8("model id")
    start, end = reader.unpack("II", "layer range")
    compression = _read_compression(reader)
    (max_context,) = reader.unpack("I", "max context")
    public_key = reader.take(PUBLIC_KEY_BYTES, "requester public key")
    (size,) = reader.unpack("H", "sampling length")
    if size > MAX_SAMPLING_JSON_BYTES:
        raise WireError(f"sampling parameters of {size} bytes exceed the limit of {MAX_SAMPLING_JSON_BYTES}")
    text = reader.text(size, "sampling parameters")
    try:
        sampling = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise WireError(f"sampling parameters are not valid JSON: {error}") from error
    (hops,) = reader.unpack("B", "route length")
    if hops > MAX_ROUTE_HOPS:
        raise WireError(f"a route has at most {MAX_ROUTE_HOPS} hops, not {hops}")
    route = tuple(
        RouteHop(
            reader.str8("hop address"),
            reader.take(PUBLIC_KEY_BYTES, "hop public key"),
            reader.unpack("II", "hop layer range"),
        )
        for _ in range(hops)
    )
    return OpenSession(
        session_id, model_id, (start, end), sampling, public_key, compression, max_context, route
    )


def _decode_forward(reader: _Reader) -> Forward:
    session_id = reader.str8("session id")
    (start_position,) = reader.unpack("I", "start position")
    compression = _read_compression(reader)
    rows, cols = reader.unpack("II", "shape")
    payload = reader.bytes32("hidden states", MAX_MESSAGE_BYTES)
    hidden_states = decode_hidden_states(payload, rows, cols, compression)
    return Forward(session_id, start_position, hidden_states, compression)


def _decode_token_result(reader: _Reader) -> TokenResult:
    session_id = reader.str8("session id")
    (position,) = reader.unpack("I", "position")
    return TokenResult(session_id, position, reader.bytes32("sealed token", MAX_SEALED_TOKEN_BYTES))


def _decode_error(reader: _Reader) -> Error:
    session_id = reader.str8("session id")
    code = reader.str8("code")
    (size,) = reader.unpack("H", "message length")
    if size > MAX_ERROR_MESSAGE_BYTES:
        raise WireError(f"error message of {size} bytes exceeds the limit of {MAX_ERROR_MESSAGE_BYTES}")
    return Error(session_id, code, reader.text(size, "message"))


def _decode_generate(reader: _Reader) -> Generate:
    session_id = reader.str8("session id")
    start, max_tokens, count = reader.unpack("IIH", "generate header")
    if count > MAX_EOG_IDS:
        raise WireError(f"{count} end-of-generation tokens exceed the limit of {MAX_EOG_IDS}")
    return Generate(session_id, start, max_tokens, reader.unpack(f"{count}I", "end-of-generation tokens"))


def _decode_prefix_query(reader: _Reader) -> PrefixQuery:
    model_id = reader.str8("model id")
    (count,) = reader.unpack("H", "key count")
    if count > MAX_PREFIX_KEYS:
        raise WireError(f"{count} prefix keys exceed the limit of {MAX_PREFIX_KEYS}")
    return PrefixQuery(model_id, tuple(reader.take(PREFIX_KEY_BYTES, "key") for _ in range(count)))


def _decode_prefix_block(reader: _Reader) -> PrefixBlock:
    import numpy as np

    (remaining,) = reader.unpack("H", "remaining")
    key = reader.take(PREFIX_KEY_BYTES, "key")
    dtype_tag, layers, tokens, heads, key_dim, value_dim = reader.unpack("BIIIII", "layout")
    if dtype_tag >= len(KV_DTYPES):
        raise WireError(f"unknown KV dtype tag {dtype_tag}")
    digest = reader.take(PREFIX_DIGEST_BYTES, "digest")
    dtype = np.dtype("<f2" if KV_DTYPES[dtype_tag] == "f16" else "<f4")
    tensors = []
    for what, dim in (("keys", key_dim), ("values", value_dim)):
        expected = layers * tokens * heads * dim * dtype.itemsize
        payload = reader.bytes32(what, MAX_MESSAGE_BYTES)
        if len(payload) != expected:
            raise WireError(f"prefix block {what} have {len(payload)} bytes, the layout needs {expected}")
        tensors.append(
            np.frombuffer(payload, dtype).reshape(layers, tokens, heads, dim).astype(dtype.newbyteorder("="))
        )
    return PrefixBlock(remaining, key, tensors[0], tensors[1], digest)


def _decode_json(kind: type[_JsonMessage]) -> Any:
    def decode_body(reader: _Reader) -> _JsonMessage:
        payload = reader.bytes32("body", kind.max_bytes)
        try:
            body = json.loads(payload)
        except ValueError as error:
            raise WireError(f"{kind.__name__} message is not JSON: {error}") from None
        return kind(body)

    return decode_body


_DECODERS = {
    1: (OpenSession, _decode_open_session),
    2: (Forward, _decode_forward),
    3: (TokenResult, _decode_token_result),
    4: (Close, lambda reader: Close(reader.str8("session id"))),
    5: (Error, _decode_error),
    6: (Ping, lambda reader: Ping(*reader.unpack("Qd", "body"))),
    7: (Pong, lambda reader: Pong(*reader.unpack("Qd", "body"))),
    8: (Generate, _decode_generate),
    9: (PrefixQuery, _decode_prefix_query),
    10: (PrefixBlock, _decode_prefix_block),
    11: (Credits, _decode_json(Credits)),
    12: (PoolMessage, _decode_json(PoolMessage)),
    13: (Delegate, _decode_json(Delegate)),
    14: (DelegateEvent, _decode_json(DelegateEvent)),
}
_TYPE_IDS = {kind: type_id for type_id, (kind, _) in _DECODERS.items()}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in `data` (one whole channel payload); `WireError` if it is not valid."""
    view = memoryview(data).cast("B")
    if len(view) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(view)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    # Magic and version come first in every version, so a newer peer is recognised as such.
    if len(view) < 6 or bytes(view[:4]) != MAGIC:
        raise WireError("not a swarm pipeline message (bad magic)")
    (version,) = struct.unpack_from(">H", view, 4)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(version)
    if len(view) < _HEADER.size:
        raise WireError(f"message of {len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    _, _, type_id, flags, body_size = _HEADER.unpack_from(view)
    if type_id not in _DECODERS:
        raise WireError(f"unknown message type {type_id}")
    kind, decoder = _DECODERS[type_id]
    if flags:
        raise WireError(f"{kind.__name__} has unknown flags {flags:#04x}")
    if body_size != len(view) - _HEADER.size:
        raise WireError(
            f"{kind.__name__} header announces {body_size} body bytes, {len(view) - _HEADER.size} arrived"
        )
    reader = _Reader(view, _HEADER.size, kind.__name__)
    message = decoder(reader)
    reader.finish()
    return message


# --- hidden states ------------------------------------------------------------------------


def encoded_size(rows: int, cols: int, compression: str) -> int:
    """Bytes of an encoded f32[rows, cols] tensor."""
    count = rows * cols
    if compression == "f32":
        return 4 * count
    if compression == "f16":
        return 2 * count
    return -(-count // Q8_0_BLOCK) * Q8_0_BLOCK_BYTES


def encode_hidden_states(hidden_states: np.ndarray, compression: str) -> bytes:
    """f32[T, d] -> bytes in `compression`; `WireError` if a value is not finite in f16."""
    import numpy as np

    _check_compression(compression)
    values = np.asarray(hidden_states, dtype=np.float32)
    if values.ndim != 2:
        raise WireError(f"hidden states must have shape [T, d], not {values.shape}")
    if compression == "f32":
        if not np.isfinite(values).all():
            raise WireError("hidden states are not finite")
        return values.astype("<f4").tobytes()
    if compression == "f16":
        with np.errstate(over="ignore"):  # overflow shows up as infinity, refused below
            halves = values.astype("<f2")
        if not np.isfinite(halves).all():
            raise WireError("hidden states are not finite in float16")
        return halves.tobytes()
    flat = values.reshape(-1)
    if not np.isfinite(flat).all():
        raise WireError("hidden states are not finite")
    blocks = np.zeros((-(-flat.size // Q8_0_BLOCK), Q8_0_BLOCK), np.float32)
    blocks.reshape(-1)[: flat.size] = flat
    # ggml quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d), scale stored as f16.
    scale = np.abs(blocks).max(axis=1) / 127.0
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    scaled = blocks * inverse[:, None]
    quants = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), -127, 127).astype(np.int8)
    with np.errstate(over="ignore"):
        scales = scale.astype("<f2")
    if not np.isfinite(scales).all():
        raise WireError("hidden states are too large for Q8_0 (block scale overflows float16)")
    packed = np.empty(len(blocks), _q8_0_dtype())
    packed["scale"] = scales
    packed["quants"] = quants
    return packed.tobytes()


def decode_hidden_states(payload: bytes, rows: int, cols: int, compression: str) -> np.ndarray:
    """bytes -> f32[rows, cols]; `WireError` unless sizes agree and every value is finite."""
    import numpy as np

    _check_compression(compression)
    if rows < 1 or cols < 1:
        raise WireError(f"hidden states shape [{rows}, {cols}] is empty")
    expected = encoded_size(rows, cols, compression)
    if len(payload) != expected:
        raise WireError(
            f"{compression} hidden states of shape [{rows}, {cols}] take {expected} bytes, got {len(payload)}"
        )
    if compression == "f32":
        values = np.frombuffer(payload, "<f4").astype(np.float32)
    elif compression == "f16":
        values = np.frombuffer(payload, "<f2").astype(np.float32)
    else:
        blocks = np.frombuffer(payload, _q8_0_dtype())
        values = (blocks["quants"].astype(np.float32) * blocks["scale"].astype(np.float32)[:, None]).reshape(
            -1
        )
        values = values[: rows * cols]
    if not np.isfinite(values).all():
        raise WireError("hidden states contain NaN or infinity")
    return values.reshape(rows, cols)


def _q8_0_dtype() -> np.dtype:
    import numpy as np

    return np.dtype([("scale", "<f2"), ("quants", "i1", (Q8_0_BLOCK,))])


# --- sealed tokens ------------------------------------------------------------------------

_TOKEN_VERSION = 1


def seal_token(
    recipient_public_key: bytes, session_id: str, position: int, token: SampledToken
) -> TokenResult:
    """A TokenResult whose token only the holder of `recipient_public_key` can read."""
    writer = _Writer()
    writer.pack("B", _TOKEN_VERSION)
    writer.str8(session_id)
    has_logprob = token.logprob is not None
    writer.pack("IIBfB", position, token.token_id, has_logprob, token.logprob or 0.0, len(token.top_logprobs))
    for token_id, logprob in token.top_logprobs:
        writer.pack("If", token_id, logprob)
    try:
        sealed = seal_to(recipient_public_key, b"".join(writer.parts))
    except SealError as error:
        raise WireError(str(error)) from error
    return TokenResult(session_id, position, sealed)


def open_token(identity: Identity, result: TokenResult) -> SampledToken:
    """The token in `result`; `WireError` unless it was sealed to `identity` for this step."""
    try:
        plaintext = identity.open_sealed(result.sealed)
    except SealError as error:
        raise WireError(f"token result for {result.session_id} at {result.position}: {error}") from error
    reader = _Reader(memoryview(plaintext), 0, "sealed token")
    (version,) = reader.unpack("B", "version")
    if version != _TOKEN_VERSION:
        raise WireError(f"unsupported sealed token version {version}")
    session_id = reader.str8("session id")
    position, token_id, has_logprob, logprob, count = reader.unpack("IIBfB", "token")
    if (session_id, position) != (result.session_id, result.position):
        raise WireError(
            f"sealed token is for {session_id} at {position}, not {result.session_id} at {result.position}"
        )
    if count > MAX_TOP_LOGPROBS:
        raise WireError(f"sealed token lists {count} top logprobs, over {MAX_TOP_LOGPROBS}")
    top = tuple(reader.unpack("If", "top logprob") for _ in range(count))
    reader.finish()
    return SampledToken(token_id, logprob if has_logprob else None, top)
