"""Requests for network models (swarm.delegation): handed whole to a peer serving the model.

In process, without a model: stages on loopback whose delegated requests run through a
real scheduler over the mock backend (tests/mock_backend.py), and requesters that hand
them requests. Checked: the events arrive as the backend made them, token counts, a
refusing or busy peer passed over for the next, a bad request refused at once, a peer
lost mid-stream reported, cancellation reaching the serving scheduler, malformed events
from a peer rejected, receipts for the positions run, and the holders a requester picks
from the DHT's signed records. tests/test_network_models.py runs it between real nodes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from swarm import wire
from swarm.delegation import (
    MAX_PAID_LAYERS,
    TIER_PRIORITY,
    DelegatedRun,
    Holder,
    NetworkModels,
    PeerOverloadedError,
    PeerUnavailableError,
    positions_run,
    scheduled,
)
from swarm.errors import ContextOverflowError, InvalidRequestError, UnknownModelError
from swarm.identity import Identity
from swarm.node_protocol import GenerationRequest, ProtocolError, check_event
from swarm.node_server import Scheduler
from swarm.records import PeerRecord
from swarm.sampling import SamplingParams
from swarm.secure_channel import SecureChannel
from swarm.stage import StageConfig, StageServer
from tests.mock_backend import MODEL_ID, MockBackend

NETWORK = "swarm-delegation-test"


def _request(words: int = 3, max_tokens: int = 5, **fields: Any) -> GenerationRequest:
    content = " ".join(f"p{i}" for i in range(words))
    return GenerationRequest(
        model=MODEL_ID,
        sampling=SamplingParams(temperature=0, max_tokens=max_tokens),
        messages=({"role": "user", "content": content},),
        **fields,
    )


class Server:
    """A stage on loopback whose delegated requests run on `backend` through a scheduler."""

    def __init__(self, backend: MockBackend, *, max_active: int = 4, max_waiting: int = 16, delegate=True):
        self.backend = backend
        self.identity = Identity.generate()
        self.scheduler = Scheduler(max_active, max_waiting)
        self.calls: list[tuple[str, GenerationRequest, bytes]] = []
        self.stage = StageServer(
            SimpleNamespace(first=0, last=2),
            self.identity,
            StageConfig(model_id=MODEL_ID, network_id=NETWORK),
            delegate=self.run if delegate else None,
        ).start()

    def run(self, kind: str, request: GenerationRequest, key: bytes, session_id: str) -> Iterator[dict]:
        self.calls.append((kind, request, key))
        prepared = self.backend.prepare(request)
        start = self.backend.start(prepared)
        if kind == "count":
            yield start
            return
        yield from scheduled(self.scheduler, self.backend.run(prepared), TIER_PRIORITY["silver"], start)

    def holder(self) -> Holder:
        return Holder(self.identity.peer_id, self.stage.address, self.identity.public_key, 2)

    def close(self) -> None:
        self.stage.close()
        self.scheduler.stop()


@contextmanager
def servers(*backends: MockBackend, **options: Any) -> Iterator[list[Server]]:
    started = [Server(backend, **options) for backend in backends]
    try:
        yield started
    finally:
        for server in started:
            server.close()


class Payments:
    def __init__(self) -> None:
        self.introduced: list[Any] = []
        self.settled: list[tuple[str, list[Any], int]] = []

    def introduce(self, stages) -> None:
        self.introduced += list(stages)

    def settle(self, session_id, stages, positions) -> None:
        self.settled.append((session_id, list(stages), positions))


def _run(request: GenerationRequest, holders: list[Holder], **options: Any) -> DelegatedRun:
    return DelegatedRun(
        request, holders, Identity.generate(), NETWORK, timeout=options.pop("timeout", 10.0), **options
    )


def _direct(request: GenerationRequest) -> list[dict]:
    backend = MockBackend()
    return list(backend.run(backend.prepare(request)))


def test_a_delegated_generation_streams_the_serving_backends_events() -> None:
    request = _request(words=4, max_tokens=6, logprobs=True)
    with servers(MockBackend()) as (server,):
        payments = Payments()
        run = _run(request, [server.holder()], credits=payments)
        assert run.start() == {"event": "start", "model": MODEL_ID, "prompt_tokens": 4, "cached_tokens": 0}
        events = []
        stream = run.events()
        for event in stream:  # as the node's scheduler reads it: closed at the done event
            events.append(event)
            if event["event"] == "done":
                stream.close()
        events = [event for event in events if event["event"] != "progress"]
    expected = _direct(request)
    assert [e["text"] for e in events if e["event"] == "text"] == [
        e["text"] for e in expected if e["event"] == "text"
    ]
    assert [e["logprob"] for e in events if e["event"] == "text"] == [-0.5] * 6
    assert events[-1] == {**expected[-1], "stop_sequence": None}
    kind, seen, key = server.calls[0]
    assert kind == "generate" and seen.messages == request.messages and key == run.identity.public_key
    # The holder was shown this node's balance before and paid after, for the positions it ran.
    assert payments.introduced == [server.holder().stage]
    assert payments.settled == [(run.session_id, [server.holder().stage], 4 + 6 - 1)]
    assert positions_run(events[-1]) == 9


def test_tool_calls_and_counts_come_through() -> None:
    tools = ({"name": "get_weather", "description": "", "parameters": {}},)
    request = _request(tools=tools, tool_choice="get_weather")
    with servers(MockBackend()) as (server,):
        events = list(_run(request, [server.holder()]).events())
        assert _run(_request(words=7), [server.holder()]).count() == 7
    assert [e["event"] for e in events] == ["tool_call", "arguments", "arguments", "done"]
    assert events[0]["name"] == "get_weather" and events[-1]["finish_reason"] == "tool_calls"
    assert [kind for kind, _, _ in server.calls] == ["generate", "count"]


def test_a_refusing_or_busy_peer_is_passed_over() -> None:
    with (
        servers(MockBackend(), delegate=False) as (refusing,),
        servers(MockBackend(delay_s=0.2), max_active=1, max_waiting=0) as (busy,),
        servers(MockBackend()) as (serving,),
    ):
        blocking = _run(_request(max_tokens=20), [busy.holder()])
        blocking.start()
        deadline = time.monotonic() + 5
        while busy.scheduler.stats.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        run = _run(_request(), [refusing.holder(), busy.holder(), serving.holder()])
        assert run.start()["model"] == MODEL_ID
        assert [e["event"] for e in run.events()][-1] == "done"
        assert not refusing.calls and len(busy.calls) == 2 and len(serving.calls) == 1
        blocking.close()


def test_every_peer_busy_is_overloaded_and_none_reachable_is_unavailable() -> None:
    with servers(MockBackend(delay_s=0.2), max_active=1, max_waiting=0) as (busy,):
        first = _run(_request(max_tokens=20), [busy.holder()])
        first.start()
        deadline = time.monotonic() + 5
        while busy.scheduler.stats.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # admitted: the one place is taken
        with pytest.raises(PeerOverloadedError, match="busy"):
            _run(_request(), [busy.holder()]).start()
        first.close()
    dead = Holder(Identity.generate().peer_id, "127.0.0.1:9", Identity.generate().public_key, 2)
    with pytest.raises(PeerUnavailableError, match="could take the request"):
        _run(_request(), [dead], timeout=2.0).start()
    with pytest.raises(PeerUnavailableError, match="none is known"):
        _run(_request(), []).start()


def test_a_refusal_is_the_requests_only_when_every_peer_gives_it() -> None:
    with servers(MockBackend(), MockBackend()) as (first, second):
        too_long = _request(words=5000)
        with pytest.raises(ContextOverflowError, match="context window"):
            _run(too_long, [first.holder(), second.holder()]).start()
        other = GenerationRequest(model="elsewhere", sampling=SamplingParams(), prompt="hi")
        with pytest.raises(UnknownModelError, match="elsewhere"):
            _run(other, [first.holder(), second.holder()]).count()
        assert len(first.calls) == len(second.calls) == 2
        # One peer's refusal (a shorter context window than the next one's) is only its own.
        first.backend.prepare = lambda request: (_ for _ in ()).throw(ContextOverflowError("too long here"))
        run = _run(_request(), [first.holder(), second.holder()])
        assert run.start()["prompt_tokens"] == 3 and len(second.calls) == 3
        run.close()


def test_a_request_too_large_for_any_peer_is_the_callers_error() -> None:
    huge = GenerationRequest(
        model=MODEL_ID, sampling=SamplingParams(), prompt="x" * (wire.MAX_DELEGATE_JSON_BYTES + 1)
    )
    with pytest.raises(InvalidRequestError, match="cannot be handed to a peer"):
        _run(huge, [Holder("p" * 32, "127.0.0.1:9", bytes(32), 2)]).start()


def test_closing_the_stream_cancels_the_generation_on_the_peer() -> None:
    backend = MockBackend(delay_s=0.05)
    with servers(backend) as (server,):
        run = _run(_request(max_tokens=200), [server.holder()])
        events = run.events()
        texts = [next(events) for _ in range(3)]
        assert all(event["event"] == "text" for event in texts)
        events.close()
        deadline = time.monotonic() + 5
        while backend.cancelled_runs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.cancelled_runs == 1
        assert server.scheduler.stats.cancelled == 1


def test_a_peer_lost_mid_stream_ends_with_an_unavailable_error() -> None:
    with servers(MockBackend(delay_s=0.05)) as (server,):
        events = _run(_request(max_tokens=200), [server.holder()], timeout=3.0).events()
        assert [next(events)["event"] for _ in range(2)] == ["text", "text"]
        server.stage.close()
        rest = list(events)
    assert rest[-1]["event"] == "error" and rest[-1]["code"] == "unavailable"
    assert "stopped answering after" in rest[-1]["message"]


class Liar:
    """A stage that answers every Delegate with the given raw event bodies."""

    def __init__(self, bodies: list[Any]) -> None:
        self.identity = Identity.generate()
        self.bodies = bodies
        self.stage = StageServer(
            SimpleNamespace(first=0, last=2),
            self.identity,
            StageConfig(model_id=MODEL_ID, network_id=NETWORK),
            delegate=lambda *args: iter(()),
        )
        self.stage._answer = self._answer  # every message gets the scripted answer
        self.stage.start()

    def _answer(self, data, opened, connection):
        return iter(
            [wire.encode(wire.DelegateEvent({"kind": "event", "event": body})) for body in self.bodies]
        )

    def holder(self) -> Holder:
        return Holder(self.identity.peer_id, self.stage.address, self.identity.public_key, 2)


def test_malformed_events_from_a_peer_are_rejected() -> None:
    start = {"event": "start", "model": MODEL_ID, "prompt_tokens": 3}
    liar = Liar([{"event": "text", "text": 5, "token_id": 0}])
    honest_after = [start, {"event": "text", "text": "ok", "token_id": 1, "surplus": "x" * 10}]
    second = Liar([*honest_after, {"event": "done", "finish_reason": "exploded", "prompt_tokens": 3}])
    try:
        # A malformed first answer: the next peer is asked.
        run = _run(_request(), [liar.holder(), second.holder()])
        assert run.start() == {**start, "cached_tokens": 0}  # left out: none reused
        events = list(run.events())
        assert events[0] == {"event": "text", "text": "ok", "token_id": 1}  # unknown fields dropped
        assert events[-1]["event"] == "error" and "finish_reason must be one of" in events[-1]["message"]
    finally:
        liar.stage.close()
        second.stage.close()


START = {"event": "start", "model": MODEL_ID, "prompt_tokens": 3}


def _liar_run(bodies: list[Any], **options: Any) -> tuple[list[dict], Payments]:
    liar = Liar(bodies)
    payments = Payments()
    try:
        run = _run(_request(max_tokens=4), [liar.holder()], credits=payments, **options)
        return list(run.events()), payments
    finally:
        liar.stage.close()


def test_a_peer_is_paid_for_what_was_asked_and_seen_not_what_it_claims() -> None:
    done = {"event": "done", "finish_reason": "length", "prompt_tokens": 900, "completion_tokens": 10**7}
    events, payments = _liar_run([START, {"event": "text", "text": "a", "token_id": 1}, done], paid_layers=7)
    assert events[-1]["event"] == "done"
    ((_, (stage,), positions),) = payments.settled
    assert positions == 3 + 4 - 1  # the prompt it counted at the start, at most max_tokens
    assert stage.layer_range == (0, 7)


@pytest.mark.parametrize(
    ("bodies", "message"),
    [
        ([START, START], "started the generation twice"),
        ([START, *[{"event": "text", "text": "a", "token_id": 1}] * 5], "more than the 4 tokens"),
        ([START, {"event": "progress"}, {"event": "progress"}], "waiting over 0 s"),
    ],
    ids=["second-start", "too-many-tokens", "keepalives-forever"],
)
def test_a_misbehaving_peer_ends_the_run_unpaid(bodies: list[Any], message: str) -> None:
    events, payments = _liar_run(bodies, queue_wait=0.0)
    assert events[-1]["event"] == "error" and events[-1]["code"] == "unavailable"
    assert message in events[-1]["message"] and not payments.settled


def test_a_peer_answering_for_another_model_is_passed_over() -> None:
    other = Liar([{**START, "model": "something-else"}])
    with servers(MockBackend()) as (serving,):
        try:
            run = _run(_request(), [other.holder(), serving.holder()])
            assert run.start()["model"] == MODEL_ID and len(serving.calls) == 1
            run.close()
        finally:
            other.stage.close()


def test_a_run_closed_before_its_first_step_lets_the_peer_go() -> None:
    """As when the node's queue is full or the caller leaves before the first step: the
    Detached wrapper's close reaches the run, and the peer's generation is cancelled."""
    from swarm.node_server import Detached

    backend = MockBackend(delay_s=0.05)
    with servers(backend) as (server,):
        run = _run(_request(max_tokens=200), [server.holder()])
        run.start()
        Detached(run.events(), on_close=run.close).close()
        deadline = time.monotonic() + 5
        while backend.cancelled_runs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.cancelled_runs == 1


def test_peers_never_take_the_whole_queue() -> None:
    with servers(MockBackend(delay_s=0.2), max_active=1, max_waiting=4) as (server,):
        first = _run(_request(max_tokens=20), [server.holder()])
        first.start()
        deadline = time.monotonic() + 5
        while server.scheduler.stats.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = [_run(_request(), [server.holder()]) for _ in range(2)]
        for run in waiting:
            run.start()
        with pytest.raises(PeerOverloadedError, match="queue is busy"):
            _run(_request(), [server.holder()]).start()
        for run in (first, *waiting):
            run.close()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"event": "launch"},
        {"event": "start", "model": "m", "prompt_tokens": -1},
        {"event": "start", "model": "m", "prompt_tokens": True},
        {"event": "text", "text": "x" * 300_000, "token_id": 1},
        {"event": "text", "text": "a", "token_id": 1, "logprob": float("nan")},
        {"event": "text", "text": "a", "token_id": 1, "logprob": -1, "top_logprobs": [{"logprob": -1}] * 21},
        {"event": "text", "text": "a", "token_id": 1, "logprob": -1, "bytes": [256]},
        {"event": "tool_call", "index": 0, "id": "c", "name": None},
        {"event": "arguments", "index": -2, "delta": "{"},
        {"event": "done", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": "2"},
        {"event": "start", "model": "m", "prompt_tokens": 5, "cached_tokens": -1},
        {"event": "start", "model": "m", "prompt_tokens": 5, "cached_tokens": 6},
        {
            "event": "done",
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "cached_tokens": 9,
        },
        {
            "event": "done",
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "cached_tokens": 1.5,
        },
    ],
)
def test_check_event_refuses_malformed_events(raw: Any) -> None:
    with pytest.raises(ProtocolError):
        check_event(raw)


def test_check_event_keeps_known_fields_and_unknown_error_codes_become_internal() -> None:
    event = {"event": "text", "text": "a", "token_id": 3, "logprob": -0.25, "top_logprobs": [], "extra": 1}
    assert check_event(event) == {
        "event": "text",
        "text": "a",
        "token_id": 3,
        "token": "",
        "logprob": -0.25,
        "bytes": None,
        "top_logprobs": [],
    }
    assert check_event({"event": "error", "code": "meltdown", "message": "m"})["code"] == "internal"


def test_check_event_counts_no_cached_tokens_where_a_peer_leaves_them_out() -> None:
    start = {"event": "start", "model": "m", "prompt_tokens": 90}
    assert check_event(start)["cached_tokens"] == 0
    assert check_event({**start, "cached_tokens": 64})["cached_tokens"] == 64
    done = {"event": "done", "finish_reason": "stop", "prompt_tokens": 90, "completion_tokens": 3}
    assert check_event(done)["cached_tokens"] == 0
    assert check_event({**done, "cached_tokens": 89})["cached_tokens"] == 89


def test_delegate_messages_round_trip_and_are_bounded() -> None:
    body = {"kind": "generate", "session_id": "s1", "request": _request().to_dict()}
    assert wire.decode(wire.encode(wire.Delegate(body))) == wire.Delegate(body)
    event = wire.DelegateEvent({"kind": "event", "event": {"event": "progress"}})
    assert wire.decode(wire.encode(event)) == event
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode(wire.DelegateEvent({"kind": "event", "text": "x" * (wire.MAX_CREDITS_JSON_BYTES + 1)}))
    with pytest.raises(wire.WireError, match="kind"):
        wire.Delegate({"request": {}})


def test_a_stage_without_a_runner_refuses_and_a_bad_delegate_gets_an_error_event() -> None:
    with servers(MockBackend(), delegate=False) as (refusing,), servers(MockBackend()) as (serving,):
        identity = Identity.generate()
        answers = []
        for server, body in (
            (refusing, {"kind": "generate", "session_id": "s", "request": _request().to_dict()}),
            (serving, {"kind": "stream", "session_id": "s", "request": _request().to_dict()}),
            (serving, {"kind": "generate", "session_id": "", "request": _request().to_dict()}),
            (serving, {"kind": "generate", "session_id": "s", "request": {"model": MODEL_ID}}),
        ):
            channel = SecureChannel.connect(
                server.stage.address, identity, NETWORK, expected_peer=server.identity.public_key, timeout=5
            )
            channel.send(wire.encode(wire.Delegate(body)))
            answers.append(wire.decode(channel.recv(timeout=5)))
            channel.close()
    assert isinstance(answers[0], wire.Error) and answers[0].code == wire.NOT_FOUND
    messages = [answer.body["event"] for answer in answers[1:]]
    assert all(m["event"] == "error" and m["code"] == "invalid_request" for m in messages)
    assert "generate or a count" in messages[0]["message"]
    assert "session_id" in messages[1]["message"]
    assert "messages and prompt" in messages[2]["message"]


def test_a_waiting_request_hears_keepalives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("swarm.delegation.KEEPALIVE_S", 0.1)
    with servers(MockBackend(delay_s=0.3), max_active=1) as (server,):
        first = _run(_request(max_tokens=3), [server.holder()])
        first.start()
        second = _run(_request(max_tokens=1), [server.holder()], timeout=1.0)
        second.start()
        kinds = [event["event"] for event in second.events()]
        list(first.events())
    assert "progress" in kinds and kinds[-1] == "done"


class FakeDht:
    def __init__(self, records: list[PeerRecord]) -> None:
        self.records = records
        self.lookups = 0
        self.catalogs = 0

    def lookup(self, model_id: str) -> list[PeerRecord]:
        self.lookups += 1
        return [record for record in self.records if record.model_id == model_id]

    def catalog(self) -> list[PeerRecord]:
        self.catalogs += 1
        return list(self.records)


def _record(
    identity: Identity, model: str, layers=(0, 18), network=NETWORK, port=7000, **options
) -> PeerRecord:
    return PeerRecord.create(
        identity,
        network_id=network,
        model_id=model,
        layers=layers,
        n_layers=options.get("n_layers", 18),
        address=f"127.0.0.1:{port}",
        dht="127.0.0.1:1",
        throughput=10.0,
        load=0.0,
        ttl=options.get("ttl", 60.0),
        now=options.get("now"),
    )


def test_holders_are_signed_whole_model_peers_nearest_first() -> None:
    own, near, far, partial, foreign, stale, outsider = (Identity.generate() for _ in range(7))
    records = [
        _record(own, "gemma"),
        _record(far, "gemma", port=7001),
        _record(near, "gemma", port=7002),
        _record(partial, "gemma", layers=(0, 9)),
        _record(foreign, "gemma", network="another-network"),
        _record(stale, "gemma", now=time.time() - 120),
        _record(outsider, "gemma", port=7003),
    ]
    forged = PeerRecord(**{**records[1].__dict__, "address": "127.0.0.1:6666"})
    dht = FakeDht([*records, forged, _record(near, "smollm2")])
    allowed: list[frozenset[str] | None] = [None]
    rtt = {near.peer_id: 1.0, far.peer_id: 40.0}
    models = NetworkModels(dht, NETWORK, own.peer_id, lambda: allowed[0], lambda: rtt)
    holders = models.holders("gemma")
    assert [h.peer_id for h in holders] == [near.peer_id, far.peer_id, outsider.peer_id]
    assert [h.address for h in holders][:2] == ["127.0.0.1:7002", "127.0.0.1:7001"]
    assert holders[0].stage.layer_range == (0, 18)
    allowed[0] = frozenset({far.peer_id})  # private mode: pool members only
    assert [h.peer_id for h in models.holders("gemma")] == [far.peer_id]
    allowed[0] = None
    listing = models.listing(exclude="smollm2")
    assert listing == [{"id": "gemma", "n_layers": 18, "peers": 3}]
    catalogs = dht.catalogs
    assert models.listing() == [
        {"id": "gemma", "n_layers": 18, "peers": 3},
        {"id": "smollm2", "n_layers": 18, "peers": 1},
    ]
    assert dht.catalogs == catalogs  # reused within LISTING_TTL_S
    # The depth a holder is paid for is the fewest layers any record of the model names.
    dht.records.append(_record(Identity.generate(), "gemma", layers=(0, 5), port=7100, n_layers=12))
    holders, depth = models.find("gemma")
    assert depth == 12 and len(holders) == 3
    dht.records.append(
        _record(Identity.generate(), "giant", layers=(0, 1 << 20), port=7101, n_layers=1 << 20)
    )
    assert models.find("giant")[1] == MAX_PAID_LAYERS  # a depth no model has is paid as the cap


def test_requests_from_many_threads_each_get_their_own_answer() -> None:
    with servers(MockBackend(delay_s=0.01), max_active=4) as (server,):
        results: dict[int, list[str]] = {}

        def ask(index: int) -> None:
            run = _run(_request(words=index + 1, max_tokens=index + 2), [server.holder()])
            results[index] = [e["text"] for e in run.events() if e["event"] == "text"]
            results[index].append(run.start()["prompt_tokens"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for index in range(6):
        assert results[index][-1] == index + 1
        assert len(results[index]) - 1 == index + 2


def test_invalid_request_from_the_requester_is_invalid_everywhere() -> None:
    with servers(MockBackend()) as (server,):
        bad = GenerationRequest(model=MODEL_ID, sampling=SamplingParams(), prompt="x y")
        # The mock refuses nothing else; a request the peer calls invalid raises as such.
        server.backend.prepare = lambda request: (_ for _ in ()).throw(InvalidRequestError("no thanks"))
        with pytest.raises(InvalidRequestError, match="no thanks"):
            _run(bad, [server.holder()]).start()


def test_a_model_the_node_cannot_find_a_peer_for_is_not_found(tmp_path) -> None:
    """No peer serves the model, or the DHT cannot be asked: unknown (404), saying why."""
    from swarm.config import load_config
    from swarm.delegation import NoHoldersError
    from swarm.node import ModelBackend
    from swarm.node_server import error_event

    backend = ModelBackend("smollm2-135m", tmp_path, load_config(tmp_path, {}))
    request = GenerationRequest(model="gemma3-270m", sampling=SamplingParams(), prompt="hi")
    with pytest.raises(UnknownModelError, match="not in a network"):
        backend.prepare(request)
    failures = iter([NoHoldersError("no peer serves model 'gemma3-270m'"), PeerUnavailableError("DHT down")])

    def delegated(request):
        raise next(failures)

    backend.peering = SimpleNamespace(delegated=delegated)
    for reason in ("no peer serves", "DHT down"):
        with pytest.raises(UnknownModelError, match=reason) as unknown:
            backend.prepare(request)
        assert error_event(unknown.value)["code"] == "unknown_model"
        assert "it serves smollm2-135m" in str(unknown.value)
