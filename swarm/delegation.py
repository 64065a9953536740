"""Requests for models this node does not serve, handed whole to a peer that serves them.

A node serves one model, but its network may serve others: every model some peer holds
whole (its signed DHT record covers every layer) is a network model here. A request for
one goes, as the node protocol's `GenerationRequest` (chat messages or a prompt, the
sampling, tools), to the nearest such peer in a `Delegate` message (`swarm.wire`); the
peer renders and tokenizes it with its own model's template and tokenizer, runs it
through its own scheduler beside its local requests (admitted by the requester's credit
tier), and streams back the node protocol's events, which are checked field by field
before anything reaches the caller (`node_protocol.check_event`). The peer reads the
request, as a whole-model peer of a routed request reads its tokens; in private mode
only pool members (and LAN peers if allowed) are asked.

Owns, on the requester's side, `NetworkModels` (which models the network serves, from
the DHT) and `DelegatedRun` (one request: the peers to try, nearest first, a refusal
or failure before the first token passes it to the next; the requester pays the peer a
credit receipt for the positions it ran); on the serving side, `serve` (a Delegate
answered through a local runner, as DelegateEvent payloads) and `scheduled` (a
generation run by the node's scheduler for it). Imports no jax.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarm import wire
from swarm.credits import REQUEST_ID
from swarm.dht_client import DhtError, DhtUnavailable
from swarm.errors import ContextOverflowError, InvalidRequestError, SwarmError, UnknownModelError
from swarm.identity import Identity
from swarm.node_protocol import GenerationRequest, ProtocolError, check_event
from swarm.records import PeerRecord
from swarm.secure_channel import ChannelError, ChannelTimeout, SecureChannel

log = logging.getLogger(__name__)

LISTING_TTL_S = 10.0  # how long the network's model list is reused
MAX_HOLDERS_TRIED = 3  # peers a request is offered to before it fails
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 5.0  # a serving peer sends a progress event after this long without another
QUEUE_WAIT_S = 300.0  # how long a requester listens to nothing but keepalives before giving up
MAX_DELEGATED_SHARE = 0.5  # of a node's queue that peers' requests may take up
# Layers a receipt may pay per position: a record's depth is its publisher's say, and no
# GGUF model has a thousand layers, so a peer claiming more is paid for this many.
MAX_PAID_LAYERS = 1024
# Scheduler priorities of peers' requests by credit tier (DESIGN.md §9): the node's own
# requests come at 0, with Platinum peers; lower tiers wait longer, all are served.
TIER_PRIORITY = {"platinum": 0, "gold": -10, "silver": -20, "bronze": -30}


class PeerUnavailableError(SwarmError):
    """No peer serving the model could take the request (503)."""


class PeerOverloadedError(SwarmError):
    """Every peer serving the model is busy (429)."""


class NoHoldersError(SwarmError):
    """No peer this node may ask serves the model whole (404)."""


@dataclass(frozen=True)
class Holder:
    """A peer serving a model whole: where to reach it and what it serves."""

    peer_id: str
    address: str
    public_key: bytes
    n_layers: int
    rtt_ms: float | None = None

    @property
    def stage(self) -> wire.RouteHop:
        """As a route stage, for the credit receipt it is paid with."""
        return wire.RouteHop(self.address, self.public_key, (0, self.n_layers))


class NetworkModels:
    """The models peers of this network serve whole, from the DHT (see the module docstring).

    `dht` is a `swarm.dht_client.DhtClient`; `own` the peer id of this node (never a
    holder); `allowed()` the peers private mode permits (None: any); `rtt()` measured
    round trips by peer id, for nearest first.
    """

    def __init__(
        self,
        dht: Any,
        network_id: str,
        own: str,
        allowed: Callable[[], frozenset[str] | None],
        rtt: Callable[[], dict[str, float]],
    ) -> None:
        self.dht = dht
        self.network_id = network_id
        self.own = own
        self.allowed = allowed
        self.rtt = rtt
        self._lock = threading.Lock()
        self._listing: tuple[float, list[dict[str, Any]]] | None = None

    def holders(self, model_id: str) -> list[Holder]:
        """Peers serving `model_id` whole whose signed records are current, nearest first."""
        return self.find(model_id)[0]

    def find(self, model_id: str) -> tuple[list[Holder], int]:
        """The holders of `model_id` (as `holders`) and the model's depth to pay them for:
        the fewest layers any current record of it names, at most MAX_PAID_LAYERS."""
        try:
            records = self.dht.lookup(model_id)
        except (DhtUnavailable, DhtError) as error:
            raise PeerUnavailableError(f"the DHT cannot be asked who serves {model_id!r}: {error}") from None
        allowed = self.allowed()
        rtt = self.rtt()
        current = [
            record for record in records if record.model_id == model_id and record.valid(self.network_id)
        ]
        holders = [
            Holder(
                record.peer_id, record.address, record.public_key, record.n_layers, rtt.get(record.peer_id)
            )
            for record in current
            if _whole(record) and self._offered(record, allowed)
        ]
        holders.sort(key=lambda holder: (holder.rtt_ms is None, holder.rtt_ms or 0.0))
        depth = min([record.n_layers for record in current] or [0])
        return holders, min(depth, MAX_PAID_LAYERS)

    def _offered(self, record: PeerRecord, allowed: frozenset[str] | None) -> bool:
        """Whether requests may go to the record's publisher: another peer, and a pool
        member when only those are `allowed`."""
        return record.peer_id != self.own and (allowed is None or record.peer_id in allowed)

    def listing(self, exclude: str = "") -> list[dict[str, Any]]:
        """[{id, n_layers, peers}] for each model peers serve whole (but `exclude`), from the
        network's catalog of signed records (`swarm.records.catalog_key`), reused for
        LISTING_TTL_S; empty when the DHT cannot be asked."""
        with self._lock:  # one caller asks the DHT; the others wait for its answer
            if self._listing is None or time.monotonic() - self._listing[0] >= LISTING_TTL_S:
                self._listing = (time.monotonic(), self._fetch_listing())
            found = self._listing[1]
        return [entry for entry in found if entry["id"] != exclude]

    def _fetch_listing(self) -> list[dict[str, Any]]:
        """The listing from the catalog; empty (and kept as such for a while) when the DHT
        cannot be asked, so that callers do not each wait on it."""
        try:
            records = self.dht.catalog()
        except (DhtUnavailable, DhtError):
            return []
        allowed = self.allowed()
        holders: dict[str, dict[str, Any]] = {}
        for record in records:
            if _whole(record) and record.valid(self.network_id) and self._offered(record, allowed):
                entry = holders.setdefault(record.model_id, {"n_layers": record.n_layers, "holders": set()})
                entry["holders"].add(record.peer_id)
        return [
            {"id": model_id, "n_layers": entry["n_layers"], "peers": len(entry["holders"])}
            for model_id, entry in sorted(holders.items())
        ]


def _whole(record: PeerRecord) -> bool:
    """Whether the record's publisher holds every layer of its model."""
    return tuple(record.layers) == (0, record.n_layers)


# --- the requester's side ------------------------------------------------------------------


@dataclass
class DelegatedRun:
    """One request for a network model (see the module docstring).

    `count()` asks a holder for the prompt's token count; `start()` opens the generation
    (the first holder that accepts it) and returns its start event; `events()` then yields
    the rest, ending with done or error. `credits` (a `swarm.credit_desk.CreditDesk`, or
    None) shows this node's balance before and pays the holder after, `paid_layers` layers
    per position (the model's depth as every record of it agrees: `NetworkModels.find`).

    Nothing a holder says is taken on trust: its events are checked, a second start, more
    tokens than asked for, or a model other than the one asked for end the run, a holder
    that only says it is still working is given up on after `queue_wait` seconds, and the
    receipt pays at most what was asked for and seen.
    """

    request: GenerationRequest
    holders: Sequence[Holder]
    identity: Identity
    network_id: str
    timeout: float
    credits: Any = None
    paid_layers: int = 0
    queue_wait: float = QUEUE_WAIT_S
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _channel: SecureChannel | None = None
    _holder: Holder | None = None
    _start: dict[str, Any] | None = None

    @property
    def model_id(self) -> str:
        return self.request.model

    def _payload(self, kind: str) -> bytes:
        body = {"kind": kind, "session_id": self.session_id, "request": self.request.to_dict()}
        try:
            return wire.encode(wire.Delegate(body))
        except wire.WireError as error:  # too large for any peer: the request's own fault
            raise InvalidRequestError(f"the request cannot be handed to a peer: {error}") from None

    def _offer(self, kind: str) -> tuple[SecureChannel, Holder, dict[str, Any]]:
        """The channel, holder and start event of the first holder that takes the request.

        A refusal one holder gives may not be another's (its context window, a model it
        stopped serving since its record), so the next is asked; only when every holder
        asked refuses the request alike is that refusal raised as such."""
        payload = self._payload(kind)
        failures: list[str] = []
        refusals: list[dict[str, Any]] = []
        busy = 0
        for holder in list(self.holders)[:MAX_HOLDERS_TRIED]:
            channel = None
            taken = False
            try:
                channel = SecureChannel.connect(
                    holder.address,
                    self.identity,
                    self.network_id,
                    expected_peer=holder.public_key,
                    timeout=min(CONNECT_TIMEOUT_S, self.timeout),
                )
                if kind == "generate" and self.credits is not None:
                    self.credits.introduce([holder.stage])
                channel.send(payload)
                event = _next_event(channel, self.timeout)
                if event["event"] == "start":
                    if event["model"] != self.model_id:
                        raise ProtocolError(f"it answered for model {event['model']!r}")
                    taken = True
                    return channel, holder, event
                if event["event"] != "error":
                    raise ProtocolError(f"a delegated request began with a {event['event']} event")
                if event["code"] in REFUSALS:
                    refusals.append(event)
                busy += event["code"] == "overloaded"
                failures.append(f"{holder.peer_id[:12]}: {event['message']}")
            except _Retryable as error:
                busy += error.busy
                failures.append(f"{holder.peer_id[:12]}: {error}")
            except (ChannelError, wire.WireError, ProtocolError) as error:
                failures.append(f"{holder.peer_id[:12]}: {error}")
            finally:
                if channel is not None and not taken:
                    channel.close()
        if refusals and len(refusals) == len(failures) and len({event["code"] for event in refusals}) == 1:
            _raise_refusal(refusals[0], self.model_id)
        detail = "; ".join(failures) or "none is known"
        if failures and busy == len(failures):
            raise PeerOverloadedError(f"every peer serving {self.model_id!r} is busy ({detail})")
        raise PeerUnavailableError(f"no peer serving {self.model_id!r} could take the request ({detail})")

    def count(self) -> int:
        """The prompt's token count, as the serving peer's tokenizer has it."""
        if self._start is not None:
            return int(self._start["prompt_tokens"])
        channel, _, start = self._offer("count")
        channel.close()
        return int(start["prompt_tokens"])

    def start(self) -> dict[str, Any]:
        """Opens the generation on the first holder that accepts it; its start event."""
        if self._start is None:
            self._channel, self._holder, self._start = self._offer("generate")
            log.info(
                "request %s for %s delegated to %s at %s",
                self.session_id[:8],
                self.model_id,
                self._holder.peer_id[:12],
                self._holder.address,
            )
        return self._start

    def events(self) -> Iterator[dict[str, Any]]:
        """The generation's events after start, ending with done or error (a lost or
        misbehaving peer ends it with an `unavailable` error). Closing it, or `close()`,
        stops the peer's generation."""
        self.start()
        channel, holder, start = self._channel, self._holder, self._start
        assert channel is not None and holder is not None and start is not None
        tokens = 0
        most = self.request.sampling.max_tokens
        heard = time.monotonic()  # the last event that was not a keepalive
        try:
            while True:
                try:
                    event = _next_event(channel, self.timeout)
                    if event["event"] == "progress":
                        if time.monotonic() - heard > self.queue_wait:
                            raise _Retryable(f"it kept the request waiting over {self.queue_wait:g} s")
                        yield event
                        continue
                    heard = time.monotonic()
                    if event["event"] == "start":
                        raise ProtocolError("it started the generation twice")
                    if event["event"] == "text" and event["token_id"] >= 0:
                        tokens += 1
                        if tokens > most:
                            raise ProtocolError(f"it sent more than the {most} tokens asked for")
                except (ChannelError, wire.WireError, ProtocolError, _Retryable) as error:
                    yield {
                        "event": "error",
                        "code": "unavailable",
                        "message": f"the peer serving {self.model_id!r} stopped answering after "
                        f"{tokens} tokens: {error}",
                    }
                    return
                if event["event"] == "done":
                    self._settle(holder, start, event)  # before the done event: its reader closes this
                yield event
                if event["event"] in ("done", "error"):
                    return
        finally:
            channel.close()

    def _settle(self, holder: Holder, start: dict[str, Any], done: dict[str, Any]) -> None:
        """Pays the holder for the positions it ran: the prompt it counted at the start and
        at most the tokens asked for, whatever its done event claims."""
        if self.credits is None:
            return
        paid = {
            "prompt_tokens": start["prompt_tokens"],
            "completion_tokens": min(done["completion_tokens"], self.request.sampling.max_tokens),
        }
        stage = wire.RouteHop(holder.address, holder.public_key, (0, self.paid_layers or holder.n_layers))
        self.credits.settle(self.session_id, [stage], positions_run(paid))

    def close(self) -> None:
        """Lets go of the holder (its generation stops), whether or not events() ran."""
        if self._channel is not None:
            self._channel.close()


def positions_run(done: dict[str, Any]) -> int:
    """The positions a delegated generation ran, from its done event: the prompt and every
    generated token but the last (sampled, never run). The serving peer counts these, and
    the requester's receipt pays them."""
    return int(done["prompt_tokens"]) + max(int(done["completion_tokens"]) - 1, 0)


class _Retryable(SwarmError):
    def __init__(self, message: str, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


def _next_event(channel: SecureChannel, timeout: float) -> dict[str, Any]:
    try:
        message = wire.decode(channel.recv(timeout=timeout))
    except ChannelTimeout as error:
        raise _Retryable(f"no answer within {timeout:g} s") from error
    if isinstance(message, wire.Error):
        raise _Retryable(f"{message.code}: {message.message}", busy=message.code == wire.OVERLOADED)
    if not isinstance(message, wire.DelegateEvent) or message.body.get("kind") != "event":
        raise ProtocolError(f"expected a DelegateEvent, got {type(message).__name__}")
    return check_event(message.body.get("event"))


# A holder's answer that says the request itself is refused (not that the holder is
# busy or failing), raised as this node's error when every holder asked says it.
REFUSALS = ("context_overflow", "invalid_request", "unknown_model")


def _raise_refusal(event: dict[str, Any], model_id: str) -> None:
    code, message = event["code"], event["message"]
    if code == "context_overflow":
        raise ContextOverflowError(message)
    if code == "invalid_request":
        raise InvalidRequestError(message)
    raise UnknownModelError(f"{model_id!r}: {message}")


# --- the serving side ------------------------------------------------------------------


Runner = Callable[[str, GenerationRequest, bytes, str], Iterator[dict[str, Any]]]


def serve(body: dict[str, Any], requester_key: bytes, runner: Runner) -> Iterator[bytes]:
    """The DelegateEvent payloads answering one Delegate: `runner(kind, request, requester
    key, session id)` yields the node protocol's events (for kind "count", only the start
    event). Any failure ends the answer with an error event."""
    from swarm.node_server import error_event

    events: Iterator[dict[str, Any]] | None = None
    try:
        kind = body.get("kind")
        if kind not in ("generate", "count"):
            raise InvalidRequestError(f"a Delegate is a generate or a count, not {kind!r}")
        session_id = body.get("session_id")
        # It becomes the request id of the receipt the requester pays with.
        if not isinstance(session_id, str) or not REQUEST_ID.fullmatch(session_id):
            raise InvalidRequestError("a Delegate needs a session_id of 1 to 64 letters, digits and _.:-")
        request = GenerationRequest.from_dict(body.get("request"))
        events = runner(kind, request, requester_key, session_id)
        for event in events:
            yield _event_payload(event)
    except OverflowError as error:
        yield _event_payload({"event": "error", "code": "overloaded", "message": str(error)})
    except Exception as error:
        if not isinstance(error, SwarmError):
            log.exception("a delegated request failed")
        yield _event_payload(error_event(error))
    finally:
        if events is not None:
            close = getattr(events, "close", None)
            if close:
                close()


def scheduled(
    scheduler: Any, events: Iterator[dict[str, Any]], priority: int, start: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """A delegated generation run by this node's scheduler (`swarm.node_server.Scheduler`)
    beside its local requests: `start`, then its events until done or error. Progress
    events go out only as keepalives, one after each KEEPALIVE_S without another
    event (while it waits its turn, or a long prompt goes in). Closing it
    early cancels the generation at its next step. OverflowError when the queue is full,
    or MAX_DELEGATED_SHARE full: peers never take all of it."""
    from swarm.node_server import Job

    if scheduler.stats.waiting >= max(1, int(scheduler.max_waiting * MAX_DELEGATED_SHARE)):
        # The rest of the queue is kept for this node's own requests.
        raise OverflowError("this peer's queue is busy")
    job = Job(events, priority=priority, prompt_left=start.get("prompt_tokens"))
    scheduler.submit(job)
    finished = False
    try:
        yield start
        said = time.monotonic()
        while True:
            try:
                event = job.output.get(timeout=KEEPALIVE_S)
            except queue.Empty:
                event = {"event": "progress"}
            if event["event"] == "progress" and time.monotonic() - said < KEEPALIVE_S:
                continue  # device work between answers (a prompt chunk, a held-back token)
            finished = event["event"] in ("done", "error")
            said = time.monotonic()
            yield event
            if finished:
                return
    finally:
        if not finished:
            job.cancelled.set()


def _event_payload(event: dict[str, Any]) -> bytes:
    return wire.encode(wire.DelegateEvent({"kind": "event", "event": event}))
