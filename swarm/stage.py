"""A pipeline stage: one engine for layers [first, last) of a model, served over secure channels.

Owns `StageServer`: the listening socket, a thread per upstream connection, and the
per-session state of DESIGN.md §5 (KV cache, next position, the sampler and the tokens it
drew, the requester's key, the channel to the next stage). The protocol, per session:

    upstream -> OpenSession (with the rest of the route)   no reply on success, else Error
    upstream -> Forward (hidden states f32[T, d])           one reply: TokenResult or Error
    upstream -> Close                                       no reply
    requester -> Generate (whole-model sessions only)       TokenResult per token, or Error
    anyone    -> Credits (on a channel of its own)          Credits, or Error
    anyone    -> PoolMessage (on a channel of its own)      PoolMessage, or Error
    anyone    -> Delegate (on a channel of its own)         DelegateEvents, or Error

A Delegate is a whole request for the node's model (`swarm.delegation`), answered by
the node's own scheduler through the `delegate` runner the stage is given; a stage
without one refuses it.

With a credit desk (`swarm.credit_desk`) the stage counts the positions it runs for each
session, takes the requester's receipts and balance reports, and admits at most
`max_sessions` sessions at once: the others wait, highest tier first (DESIGN.md §9).

A stage that is not last opens the session on the next hop and forwards its hidden states
there, then relays the reply upstream byte for byte, so the token sealed to the requester
travels back along the chain unread. The last stage samples with the session's parameters
and seals the token to the requester. Stages only ever receive hidden states: the requester
embeds locally, so even the first stage runs its engine on hidden states (`StageEngine`).

Every failure is answered with an `Error` naming this stage (peer id, address, layers); a
failing connection or session never stops the server.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from swarm import delegation, wire
from swarm.batching import SlotBatch
from swarm.credit_desk import CreditDesk, TierGate, connection_state
from swarm.credits import CreditError
from swarm.engine import Engine
from swarm.errors import SwarmError
from swarm.identity import Identity, peer_id_of
from swarm.pool import PoolError
from swarm.pool_desk import PoolDesk
from swarm.prefix_cache import PrefixCache
from swarm.prefix_share import answer_query
from swarm.sampling import Sampler, SamplingParams, token_logprobs
from swarm.secure_channel import ChannelError, ChannelTimeout, SecureChannel, host_port

logger = logging.getLogger(__name__)

NEXT_HOP_FAILED = "next_hop_failed"
LAYER_MISMATCH = "layer_mismatch"
CREDIT_REFUSED = "credit_refused"
POOL_REFUSED = "pool_refused"
ADMISSION_WAIT_SHARE = 0.8  # of hop_timeout: how long an OpenSession may wait for a free session
_POLL_SECONDS = 0.5  # how often idle loops look at the stop flag and expiry clock


class StageEngine(Engine):
    """An Engine whose inputs are always hidden states, even from layer 0.

    The requester embeds its tokens itself (DESIGN.md §5), so the first stage never
    sees a token id; its range still starts at layer 0.
    """

    @property
    def is_first(self) -> bool:
        return False


@dataclass(frozen=True)
class StageConfig:
    """How a stage listens and how long it waits."""

    model_id: str
    network_id: str = "swarm-local"
    host: str = "127.0.0.1"
    port: int = 0
    handshake_timeout: float = 10.0
    hop_timeout: float = 60.0  # waiting for the next stage's reply to one Forward
    session_timeout: float = 300.0  # an idle session is dropped after this long
    max_sessions: int = 0  # sessions open at once; more wait by tier (0: no limit)
    prefill_chunk: int = 0  # prompt rows per device call in the shared batch (0: all at once)


@dataclass
class _Session:
    session_id: str
    cache: object  # its own cache, or None while it holds a row of the stage's batch
    next_position: int
    max_context: int
    params: SamplingParams
    sampler: Sampler
    requester_public_key: bytes
    downstream: SecureChannel | None = None
    next_hop: wire.RouteHop | None = None
    sampled: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    batch: SlotBatch | None = None  # with `slot`: the shared cache row its keys live in
    slot: int | None = None
    closed: bool = False
    gate: TierGate | None = None  # the admission this session holds, given back on close

    def close(self) -> None:
        if self.closed:
            return
        if self.downstream is not None:
            with contextlib.suppress(ChannelError, wire.WireError):
                self.downstream.send(wire.encode(wire.Close(self.session_id)), timeout=1.0)
            self.downstream.close()
        self.cache = None
        self.closed = True
        if self.batch is not None and self.slot is not None:
            self.batch.release(self.slot)
            self.slot = None
        if self.gate is not None:
            self.gate.leave()
            self.gate = None


class _Refusal(SwarmError):
    """A request this stage answers with an Error of `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StageServer:
    """Serves `engine`'s layers to requesters and upstream stages; `start()`, then `close()`."""

    def __init__(
        self,
        engine: Engine,
        identity: Identity,
        config: StageConfig,
        *,
        embed: Callable[[Sequence[int]], np.ndarray] | None = None,
        batch: SlotBatch | None = None,
        prefix_cache: PrefixCache | None = None,
        credits: CreditDesk | None = None,
        pool: PoolDesk | None = None,
        delegate: delegation.Runner | None = None,
    ) -> None:
        self.engine = engine
        # Runs whole requests for this node's model handed over by peers; None: refuses them.
        self.delegate = delegate
        # Answers devices joining, and members asking for, this node's pool; None: refuses.
        self.pool = pool
        # Counts work per session, takes receipts and reports; None: no credits here.
        self.credits = credits
        self.gate = TierGate(config.max_sessions)
        # Answers peers' PrefixQuery from this cache (network.prefix_sharing); None: refuses.
        self.prefix_cache = prefix_cache
        # A shared cache over `engine` whose sessions' single-token steps run together
        # (continuous batching across requesters); None: every session has its own cache.
        self.batch = batch
        # token ids -> hidden states, for a stage holding the whole model to decode on its
        # own (Generate); None: this stage only ever runs the hidden states it is sent.
        self.embed = embed
        self.identity = identity
        self.config = config
        self.layer_range = (engine.first, engine.last)
        self._listener: socket.socket | None = None
        self._address = ""
        self._stopping = threading.Event()
        self._device_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._sessions_lock = threading.Lock()
        self._channels: set[SecureChannel] = set()
        self._threads: list[threading.Thread] = []
        self._opened_total = 0
        self._forwards_total = 0
        self._generations_total = 0  # Generate requests: whole requests handed to this stage

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> StageServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.host, self.config.port))
        listener.listen(64)
        listener.settimeout(_POLL_SECONDS)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self._address = f"{host}:{port}"
        for target in (self._accept_loop, self._expire_loop):
            thread = threading.Thread(target=target, name=f"stage-{port}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def address(self) -> str:
        """ "host:port" this stage listens on (after `start`)."""
        return self._address

    @property
    def host_port(self) -> tuple[str, int]:
        return host_port(self._address)

    def describe(self) -> str:
        first, last = self.layer_range
        return f"stage {self.identity.peer_id} at {self._address} (layers {first}-{last})"

    def close(self) -> None:
        """Stops listening, drops every connection and session. Idempotent."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._sessions_lock:
            channels = list(self._channels)
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for channel in channels:
            channel.close()
        for session in sessions:
            session.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)

    def __enter__(self) -> StageServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        self._stopping.wait()

    def stats(self) -> dict[str, Any]:
        """Sessions open now, sessions opened and forwards run since start, admissions by tier."""
        with self._sessions_lock:
            return {
                "sessions": len(self._sessions),
                "sessions_opened": self._opened_total,
                "forwards": self._forwards_total,
                "generations": self._generations_total,
                "admission": self.gate.stats(),
            }

    def observe(self, message: wire.Message) -> None:
        """Called with every message this stage decodes; a no-op (a hook for tests and metrics)."""

    # --- connections -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            sock.settimeout(None)
            thread = threading.Thread(target=self._serve_connection, args=(sock,), daemon=True)
            thread.start()

    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            host = str(sock.getpeername()[0])
        except OSError:
            host = ""
        try:
            channel = SecureChannel.accept(
                sock, self.identity, self.config.network_id, timeout=self.config.handshake_timeout
            )
        except ChannelError as error:
            logger.info("%s refused a connection: %s", self.describe(), error)
            return
        with self._sessions_lock:
            if self._stopping.is_set():
                channel.close()
                return
            self._channels.add(channel)
        opened: dict[str, _Session] = {}  # what this connection opened, by id
        connection = connection_state(host, channel.peer_public_key)
        try:
            while not self._stopping.is_set():
                try:
                    # close() closes this channel, which ends a blocked recv at once; a
                    # short timeout here would also cut off a frame arriving slowly.
                    data = channel.recv(timeout=self.config.session_timeout)
                except ChannelTimeout:
                    continue
                except ChannelError:
                    return
                reply = self._answer(data, opened, connection)
                if isinstance(reply, bytes):
                    channel.send(reply)
                elif reply is not None:  # a Generate or a Delegate: one message per token
                    try:
                        for part in reply:
                            channel.send(part)
                    finally:
                        close = getattr(reply, "close", None)
                        if close is not None:
                            close()  # a requester gone mid-stream stops the generation
        except ChannelError as error:
            logger.info("%s lost a connection: %s", self.describe(), error)
        finally:
            channel.close()
            with self._sessions_lock:
                self._channels.discard(channel)
            for session in opened.values():
                self._drop_session(session)

    def _answer(
        self, data: bytes, opened: dict[str, _Session], connection: dict[str, Any]
    ) -> bytes | Iterator[bytes] | None:
        """The bytes to send back for one received payload, or None. `connection`: what
        this channel's Credits and PoolMessages share (`credit_desk.connection_state`)."""
        session_id = ""
        try:
            message = wire.decode(data)
            self.observe(message)
            session_id = getattr(message, "session_id", "")
            if isinstance(message, wire.OpenSession):
                opened[message.session_id] = self._open(message)
                return None
            if isinstance(message, wire.Forward | wire.Generate | wire.Close) and not self._owns(
                opened, session_id
            ):
                # A session is its connection's own: no other peer steps, ends or fails it.
                session_id = ""
                if isinstance(message, wire.Close):
                    return None
                raise _Refusal(wire.UNKNOWN_SESSION, f"no session {message.session_id} on this connection")
            if isinstance(message, wire.Forward):
                return self._forward(message)
            if isinstance(message, wire.Close):
                self._drop_session(opened.pop(message.session_id))
                return None
            if isinstance(message, wire.Ping):
                return wire.encode(wire.Pong(message.nonce, time.time()))
            if isinstance(message, wire.Generate):
                return self._generate(self._generating_session(message), message)
            if isinstance(message, wire.PrefixQuery):
                if self.prefix_cache is None:
                    raise _Refusal(wire.NOT_FOUND, "this peer does not share prompt prefixes")
                if message.model_id != self.config.model_id:
                    raise _Refusal(wire.NOT_FOUND, f"serves model {self.config.model_id!r}")
                return answer_query(self.prefix_cache, message)
            if isinstance(message, wire.Delegate):
                if self.delegate is None:
                    raise _Refusal(wire.NOT_FOUND, "this peer takes no whole requests")
                return delegation.serve(message.body, connection["peer_key"], self.delegate)
            if isinstance(message, wire.PoolMessage):
                if self.pool is None:
                    raise _Refusal(POOL_REFUSED, "this node keeps no pool")
                try:
                    answer = self.pool.answer(message.body, connection["peer_key"])
                    return wire.encode(wire.PoolMessage(answer))
                except PoolError as error:
                    raise _Refusal(POOL_REFUSED, str(error)) from None
            if isinstance(message, wire.Credits):
                if self.credits is None:
                    raise _Refusal(CREDIT_REFUSED, "this stage keeps no credit ledger")
                try:
                    return wire.encode(wire.Credits(self.credits.answer(message.body, connection)))
                except CreditError as error:
                    raise _Refusal(CREDIT_REFUSED, str(error)) from None
            raise _Refusal(wire.BAD_MESSAGE, f"a stage does not accept {type(message).__name__}")
        except wire.WireError as error:
            reply = wire.error_reply(error, session_id)
            return wire.encode(wire.Error(reply.session_id, reply.code, self._named(reply.message)))
        except _Refusal as error:
            return self._error(session_id, error.code, str(error))
        except SwarmError as error:
            self._drop_own(session_id, opened)
            return self._error(session_id, wire.BAD_MESSAGE, str(error))
        except Exception as error:  # a bug or a device failure must not take the server down
            logger.exception("%s failed on a message", self.describe())
            self._drop_own(session_id, opened)
            return self._error(session_id, wire.INTERNAL, f"{type(error).__name__}: {error}")

    def _owns(self, opened: dict[str, _Session], session_id: str) -> bool:
        """Whether `session_id` is a session this connection opened and still open (not one
        that expired and whose id another connection has opened since)."""
        session = opened.get(session_id)
        with self._sessions_lock:
            return session is not None and self._sessions.get(session_id) is session

    def _drop_own(self, session_id: str, opened: dict[str, _Session]) -> None:
        """Drops a session a failed message named, if this connection opened it (a failed
        OpenSession naming another connection's session leaves that one alone)."""
        session = opened.pop(session_id, None)
        if session is not None:
            self._drop_session(session)

    def _named(self, message: str) -> str:
        return f"{self.describe()}: {message}"

    def _error(self, session_id: str, code: str, message: str) -> bytes:
        text = self._named(message).encode("utf-8")[: wire.MAX_ERROR_MESSAGE_BYTES]
        return wire.encode(wire.Error(session_id, code, text.decode("utf-8", "ignore")))

    # --- sessions --------------------------------------------------------------------

    def _open(self, message: wire.OpenSession) -> _Session:
        if message.layer_range != self.layer_range:
            first, last = message.layer_range
            raise _Refusal(LAYER_MISMATCH, f"asked for layers {first}-{last}")
        if message.model_id != self.config.model_id:
            raise _Refusal(
                wire.BAD_MESSAGE, f"serves model {self.config.model_id!r}, not {message.model_id!r}"
            )
        if self.engine.is_last and message.route:
            raise _Refusal(wire.BAD_MESSAGE, "the last stage cannot forward to more hops")
        if not self.engine.is_last and not message.route:
            raise _Refusal(wire.BAD_MESSAGE, f"the route ends at layer {self.layer_range[1]}")
        params = SamplingParams.from_dict(message.sampling)
        with self._sessions_lock:
            if message.session_id in self._sessions:
                raise _Refusal(wire.BAD_MESSAGE, f"session {message.session_id} is already open")
        tier = self.credits.tier(peer_id_of(message.requester_public_key)) if self.credits else "silver"
        # Refused before the hop upstream gives up on us: an explicit refusal makes the
        # requester try again (or another route) instead of failing over a "stalled" stage.
        wait = ADMISSION_WAIT_SHARE * self.config.hop_timeout
        if not self.gate.enter(tier, wait):
            raise _Refusal(wire.OVERLOADED, f"no session free within {wait:.0f} s ({tier} tier)")
        try:
            return self._start_session(message, params)
        except BaseException:
            self.gate.leave()  # a session that failed to start never took the admission over
            raise

    def _start_session(self, message: wire.OpenSession, params: SamplingParams) -> _Session:
        capacity = self.engine.cache_capacity(message.max_context)
        slot = self.batch.acquire(message.max_context) if self.batch is not None else None
        cache = None
        if slot is None:
            with self._device_lock:
                cache = self.engine.new_cache(capacity)
        session = _Session(
            message.session_id,
            cache,
            0,
            message.max_context,
            params,
            Sampler(params),
            message.requester_public_key,
            batch=self.batch if slot is not None else None,
            slot=slot,
        )
        if message.route:
            hop, rest = message.route[0], message.route[1:]
            session.next_hop = hop
            try:
                session.downstream = SecureChannel.connect(
                    hop.host_port,
                    self.identity,
                    self.config.network_id,
                    expected_peer=hop.public_key,
                    timeout=self.config.hop_timeout,
                )
                session.downstream.send(
                    wire.encode(
                        wire.OpenSession(
                            message.session_id,
                            message.model_id,
                            hop.layer_range,
                            message.sampling,
                            message.requester_public_key,
                            message.compression,
                            message.max_context,
                            rest,
                        )
                    )
                )
            except ChannelError as error:
                session.close()
                raise _Refusal(NEXT_HOP_FAILED, f"{_hop_name(hop)} failed: {error}") from error
        with self._sessions_lock:
            session.gate = self.gate
            self._sessions[message.session_id] = session
            self._opened_total += 1
        return session

    def _unlist(self, session: _Session) -> bool:
        """Takes `session` out of the table if it is still the one open under its id."""
        with self._sessions_lock:
            if self._sessions.get(session.session_id) is not session:
                return False
            del self._sessions[session.session_id]
            return True

    def _drop_session(self, session: _Session) -> None:
        """Ends `session` after the step under way in its cache row, never during one."""
        self._unlist(session)
        with session.lock:
            session.close()

    def _drop_held(self, session: _Session) -> None:
        """`_drop_session` for a caller holding the session's lock (a step whose next hop failed)."""
        self._unlist(session)
        session.close()

    def _expire_loop(self) -> None:
        while not self._stopping.wait(_POLL_SECONDS):
            now = time.monotonic()
            with self._sessions_lock:
                idle = [
                    (sid, session)
                    for sid, session in self._sessions.items()
                    if now - session.last_used > self.config.session_timeout
                ]
            for session_id, session in idle:
                # A session busy now is not idle: it is skipped, not waited for.
                if not session.lock.acquire(blocking=False):
                    continue
                try:
                    # Used since it was listed, or already gone: not this loop's to end.
                    if time.monotonic() - session.last_used <= self.config.session_timeout:
                        continue
                    if not self._unlist(session):
                        continue
                    logger.info("%s: session %s expired", self.describe(), session_id)
                    session.close()
                finally:
                    session.lock.release()

    def _session(self, session_id: str) -> _Session:
        with self._sessions_lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise _Refusal(wire.UNKNOWN_SESSION, f"no session {session_id}")
        return session

    def _prefill(self, session: _Session, batch: SlotBatch, slot: int, hidden: np.ndarray) -> np.ndarray:
        """A prompt's rows into the session's row of the shared batch, `prefill_chunk` rows
        per call: the other sessions' decode steps (the node's own requests too, when it
        shares its batch) run between the chunks instead of waiting for the whole prompt."""
        chunk = self.config.prefill_chunk or hidden.shape[0]
        start = session.next_position
        outputs = []
        for first in range(0, hidden.shape[0], chunk):
            if session.closed:  # the stage is closing: the row may have a new owner
                raise _Refusal(wire.UNKNOWN_SESSION, f"session {session.session_id} is closed")
            outputs.append(batch.prefill(slot, hidden[first : first + chunk], start + first))
        # The last range answers the last row's logits; others every row's hidden state.
        return outputs[-1] if self.engine.is_last else np.concatenate(outputs)

    def _advance(self, session: _Session, hidden: np.ndarray) -> np.ndarray:
        """Runs `hidden` (or, in a batch that embeds them, token ids) at the session's next
        positions, its lock held; the output rows."""
        if session.closed or (session.cache is None and session.slot is None):
            raise _Refusal(wire.UNKNOWN_SESSION, f"session {session.session_id} is closed")
        if session.batch is not None and session.slot is not None:
            batch, slot = session.batch, session.slot
            if hidden.shape[0] == 1:  # a decode step: runs with the other sessions' steps
                out = batch.run(slot, hidden[0], session.next_position)
                out = out if self.engine.is_last else out[None]
            else:
                out = self._prefill(session, batch, slot, hidden)
        else:
            cache, session.cache = session.cache, None  # donated: a failure leaves none behind
            with self._device_lock:
                out, session.cache = self.engine.forward(hidden, session.next_position, cache)
        session.next_position += hidden.shape[0]
        self._forwards_total += 1
        if self.credits is not None:
            self.credits.served(
                session.session_id, session.requester_public_key, self.layer_range, hidden.shape[0]
            )
        return out

    def _forward(self, message: wire.Forward) -> bytes:
        session = self._session(message.session_id)
        with session.lock:
            session.last_used = time.monotonic()
            hidden = message.hidden_states
            rows, cols = hidden.shape
            if cols != self.engine.config.d_model:
                raise _Refusal(
                    wire.BAD_MESSAGE, f"hidden states have width {cols}, not {self.engine.config.d_model}"
                )
            if message.start_position != session.next_position:
                raise _Refusal(
                    wire.BAD_MESSAGE,
                    f"forward starts at position {message.start_position}, expected {session.next_position}",
                )
            if message.start_position + rows > session.max_context:
                raise _Refusal(
                    wire.BAD_MESSAGE, f"positions past the session's context of {session.max_context}"
                )
            out = self._advance(session, hidden)
            if session.downstream is None:
                return wire.encode(self._sample(session, out, session.next_position))
            return self._relay(
                session, wire.Forward(message.session_id, message.start_position, out, message.compression)
            )

    def _generating_session(self, message: wire.Generate) -> _Session:
        """The session a Generate may run in; refuses it otherwise."""
        if self.embed is None or not (self.engine.is_last and self.layer_range[0] == 0):
            raise _Refusal(
                wire.BAD_MESSAGE, "this stage does not hold the whole model and cannot generate alone"
            )
        session = self._session(message.session_id)
        if not session.sampled or message.start_position != session.next_position:
            raise _Refusal(
                wire.BAD_MESSAGE,
                f"generate starts at position {message.start_position}, the session is at"
                f" {session.next_position} with {len(session.sampled)} sampled tokens",
            )
        if message.start_position + message.max_tokens > session.max_context:
            raise _Refusal(wire.BAD_MESSAGE, f"positions past the session's context of {session.max_context}")
        return session

    def _generate(self, session: _Session, message: wire.Generate) -> Iterator[bytes]:
        """Decodes from the session's last sampled token; yields each TokenResult's bytes."""
        assert self.embed is not None
        eog = frozenset(message.eog_ids)
        with self._sessions_lock:
            self._generations_total += 1
        try:
            # A row of a batch that embeds token ids itself (a whole-model node's own
            # batch) takes the id: its steps then need no mixing with the node's requests.
            embeds = session.slot is not None and getattr(session.batch.engine, "is_first", False)
            for _ in range(message.max_tokens):
                with session.lock:
                    session.last_used = time.monotonic()
                    token = session.sampled[-1]
                    step = np.asarray([token], np.int32) if embeds else self.embed([token])
                    logits = self._advance(session, step)
                    result = self._sample(session, logits, session.next_position)
                yield wire.encode(result)
                if session.sampled[-1] in eog:
                    return
        except _Refusal as error:
            yield self._error(session.session_id, error.code, str(error))
        except Exception as error:  # a device failure must not take the server down
            logger.exception("%s failed while generating", self.describe())
            self._drop_session(session)
            yield self._error(session.session_id, wire.INTERNAL, f"{type(error).__name__}: {error}")

    def _sample(self, session: _Session, logits: np.ndarray, position: int) -> wire.TokenResult:
        """logits: f32[vocab] -> the next token, sealed to the requester."""
        params = session.params
        token = session.sampler.sample(logits, session.sampled)
        session.sampled.append(token)
        logprob = None
        alternatives: list[tuple[int, float]] = []
        if params.top_logprobs:
            logprob, alternatives = token_logprobs(logits, token, params.top_logprobs)
        sampled = wire.SampledToken(token, logprob, tuple(alternatives))
        return wire.seal_token(session.requester_public_key, session.session_id, position, sampled)

    def _relay(self, session: _Session, forward: wire.Forward) -> bytes:
        """Sends `forward` to the next stage; its reply, unchanged. Runs with the
        session's lock held."""
        assert session.downstream is not None and session.next_hop is not None
        try:
            session.downstream.send(wire.encode(forward), timeout=self.config.hop_timeout)
            reply = session.downstream.recv(timeout=self.config.hop_timeout)
            answer = wire.decode(reply)
        except (ChannelError, wire.WireError) as error:
            self._drop_held(session)
            raise _Refusal(NEXT_HOP_FAILED, f"{_hop_name(session.next_hop)} failed: {error}") from error
        if not isinstance(answer, wire.TokenResult | wire.Error) or answer.session_id != session.session_id:
            self._drop_held(session)
            raise _Refusal(
                NEXT_HOP_FAILED, f"{_hop_name(session.next_hop)} answered with {type(answer).__name__}"
            )
        if isinstance(answer, wire.Error):
            self._drop_held(session)
        return reply


def _hop_name(hop: wire.RouteHop) -> str:
    return f"next {hop.describe()}"
