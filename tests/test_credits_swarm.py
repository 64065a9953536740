"""Credits, tiers, pools and private mode across full nodes on loopback (DESIGN.md §9).

One swarm of SmolLM2 nodes (`swarm.local_swarm`: supervisor, DHT, node and control
processes each), its story told in order:

1. `client` (layers 15-30) routes through `rich` (0-15): rich's earned balance rises by
   exactly the receipts client signed, 15 layers x the positions rich ran.
2. Forged, replayed and made-up receipts sent to rich's stage are refused; its balance
   does not move.
3. client leaves; `server` (15-30, one session at a time) and `poor` (0-15) join. A Bronze
   request (poor, who never served) and a Platinum one (rich, checked by server) queue
   behind a long one: Platinum is admitted first, Bronze still completes. (Rich's
   earnings were signed by a brand-new identity that never served, so server counts
   them at 5 % x 25 %: a few requests' spending would make rich Bronze too.)
4. poor cannot raise its standing at server with an inflated balance report.
5. rich owns a pool that server joins; `outsider` (15-30) is outside it. In private mode
   rich's requests go only through server, checked on outsider's own counters; with
   server gone they fail rather than touch outsider; off again, outsider serves them.
6. rich and server restart every process: balances and pool membership are intact.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx2
import pytest

from swarm import wire
from swarm.credits import BalanceReport, Receipt, leaf, make_proof, merkle_levels, root_of
from swarm.identity import Identity
from swarm.ledger import Ledger
from swarm.local_swarm import LocalNode, LocalSwarm
from swarm.pool import Invitation, PoolState, PoolStore
from swarm.pool_desk import request_join
from swarm.secure_channel import SecureChannel

pytestmark = [pytest.mark.integration, pytest.mark.realmodel]

MODEL = "smollm2-135m"
NETWORK = "credits-test"
PROMPT = "The history of the printing press begins"
# Waiting in a queue must not look like a stalled stage to the hop before it.
ENV = {"SWARM_NETWORK_STAGE_TIMEOUT_S": "90", "SWARM_NETWORK_RECORD_TTL_S": "10"}


@pytest.fixture(scope="module")
def model_path(data_dir: Path) -> Path:
    from swarm.models import resolve_model

    return resolve_model(MODEL, data_dir, install_missing=False)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, model_path: Path):
    root = tmp_path_factory.mktemp("credits")
    with LocalSwarm(root, model_path, model_id=MODEL, network_id=NETWORK, env=ENV) as local:
        local.add((0, 15), name="rich")
        local.add((15, 30), name="client")
        local.wait_ready()
        yield local


def node(swarm: LocalSwarm, name: str) -> LocalNode:
    return [n for n in swarm.nodes if n.name == name and n.process and n.process.poll() is None][-1]


def complete(target: LocalNode, max_tokens: int = 12, prompt: str = PROMPT) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {target.api_key}"}
    response = httpx2.post(f"{target.api}/v1/completions", json=body, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def credits(target: LocalNode) -> dict:
    status, body = target.get("/api/admin/credits")
    assert status == 200, status
    return body


def stage(target: LocalNode) -> dict:
    status, body = target.get("/api/admin/peers")
    assert status == 200, status
    return body["node"]["stage"]


def identity(target: LocalNode) -> Identity:
    return Identity.load_or_create(target.data_dir)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def ask_stage(target: LocalNode, message: wire.Message, who: Identity | None = None) -> wire.Message:
    host, port = stage(target)["address"].rsplit(":", 1)
    channel = SecureChannel.connect((host, int(port)), who or Identity.generate(), NETWORK, timeout=10)
    try:
        channel.send(wire.encode(message))
        return wire.decode(channel.recv(timeout=30))
    finally:
        channel.close()


def positions(answer: dict) -> int:
    """Positions every stage ran for a completion that stopped at max_tokens: the prompt,
    then each generated token but the last, which is never fed back."""
    assert answer["choices"][0]["finish_reason"] == "length"
    usage = answer["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def test_a_stage_earns_exactly_the_receipts_its_requester_signed(swarm: LocalSwarm):
    rich, client = node(swarm, "rich"), node(swarm, "client")
    wait_until(lambda: _routes(client), "client's route through rich")
    # Receipts travel after the answer: let those of the requests above arrive first.
    wait_until(lambda: credits(rich)["earned"] == credits(client)["spent"] > 0, "earlier receipts")
    before = credits(rich)["earned"]
    ran = sum(positions(complete(client, max_tokens=n)) for n in (12, 20))
    wait_until(lambda: credits(rich)["earned"] > before + 15 * ran - 1, "receipts reaching rich")
    time.sleep(1.0)  # nothing more arrives
    after = credits(rich)
    assert after["earned"] - before == 15 * ran
    paid = [r for r in credits(client)["recent"] if r["direction"] == "spent"]
    assert sum(r["credits"] for r in paid) == credits(client)["spent"] >= 15 * ran
    assert {r["stage"] for r in paid} == {identity(rich).peer_id}  # never itself
    assert after["recent"][0]["requester"] == identity(client).peer_id


def _routes(target: LocalNode) -> bool:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {target.api_key}"}
    return (
        httpx2.post(f"{target.api}/v1/completions", json=body, headers=headers, timeout=300).status_code
        == 200
    )


def test_forged_replayed_and_made_up_receipts_are_refused(swarm: LocalSwarm):
    rich, client = node(swarm, "rich"), node(swarm, "client")
    earned = credits(rich)["earned"]
    stored = Ledger(client.data_dir, identity(client).peer_id).recent(1)[0]
    genuine = Receipt.from_dict({k: v for k, v in stored.items() if k in Receipt.__dataclass_fields__})
    forged = {**genuine.to_dict(), "tokens": genuine.tokens + 100}
    stranger = Identity.generate()
    made_up = Receipt.create(
        stranger,
        request_id="never-ran",
        network_id=NETWORK,
        stage_key=identity(rich).public_key,
        layers=(0, 15),
        tokens=50,
    )
    for receipt, reason in (
        (genuine.to_dict(), "replay"),
        (forged, "signature"),
        (made_up.to_dict(), "served no"),
    ):
        reply = ask_stage(rich, wire.Credits({"kind": "receipt", "receipt": receipt}), stranger)
        assert isinstance(reply, wire.Error) and reason in reply.message, reply
    assert credits(rich)["earned"] == earned


def test_platinum_is_admitted_before_bronze_and_bronze_still_completes(swarm: LocalSwarm):
    swarm.stop_node(node(swarm, "client"))
    server = swarm.add((15, 30), name="server", env={"SWARM_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    poor = swarm.add((0, 15), name="poor")
    swarm.wait_ready([server, poor])
    rich = node(swarm, "rich")
    time.sleep(12)  # client's record expires (its TTL is 10 s)
    # Only poor tries its route: rich must not spend before it asks (its earnings come
    # from a young identity that never served, so they count for little: see the docstring).
    wait_until(lambda: _routes(poor), "poor's route through server", timeout=120)
    finished: dict[str, float] = {}
    answers: dict[str, dict] = {}

    def run(name: str, who: LocalNode, tokens: int) -> None:
        answers[name] = complete(who, max_tokens=tokens)
        finished[name] = time.monotonic()

    blocker = threading.Thread(target=run, args=("blocker", poor, 120))
    blocker.start()
    wait_until(lambda: stage(server)["admission"]["active"] == 1, "the long request to hold server")
    bronze = threading.Thread(target=run, args=("bronze", poor, 16))
    bronze.start()
    wait_until(lambda: stage(server)["admission"]["waiting"] == 1, "the bronze request to wait")
    platinum = threading.Thread(target=run, args=("platinum", rich, 16))
    platinum.start()
    wait_until(lambda: stage(server)["admission"]["waiting"] == 2, "the platinum request to wait")
    for thread in (blocker, bronze, platinum):
        thread.join(timeout=300)
    assert set(answers) == {"blocker", "bronze", "platinum"}
    admission = stage(server)["admission"]
    _, board = server.get("/api/credits/leaderboard")
    assert finished["platinum"] < finished["bronze"], (admission, board, finished)
    assert stage(server)["admission"]["order"][-2:] == ["platinum", "bronze"]
    assert answers["bronze"]["usage"]["completion_tokens"] == 16


def test_a_node_cannot_raise_its_own_standing(swarm: LocalSwarm):
    server, poor = node(swarm, "server"), node(swarm, "poor")
    me = identity(poor)
    fake = [
        Receipt.create(
            me, request_id=f"self{i}", network_id=NETWORK, stage_key=me.public_key, layers=(0, 15), tokens=900
        )
        for i in range(8)
    ]
    levels = merkle_levels([leaf(r.receipt_id, r.credits) for r in fake])
    report = BalanceReport.create(me, NETWORK, root=root_of(levels), earned_count=8, spent=0, spent_count=0)
    host, port = stage(server)["address"].rsplit(":", 1)
    channel = SecureChannel.connect((host, int(port)), me, NETWORK, timeout=10)
    try:
        channel.send(wire.encode(wire.Credits({"kind": "report", "report": report.to_dict()})))
        challenge = wire.decode(channel.recv(timeout=10))
        if isinstance(challenge, wire.Credits):
            samples = make_proof(levels, fake, bytes.fromhex(challenge.body["nonce"]))
            channel.send(wire.encode(wire.Credits({"kind": "proof", "samples": samples})))
            refused = wire.decode(channel.recv(timeout=10))
        else:
            refused = challenge  # it already spent at server: the report under-states it
    finally:
        channel.close()
    assert isinstance(refused, wire.Error), refused
    status, board = server.get("/api/credits/leaderboard")
    assert status == 200, status
    row = next(r for r in board["peers"] if r["peer_id"] == me.peer_id)
    assert row["tier"] == "bronze" and row["standing"] <= 0


def test_private_mode_routes_only_through_the_pool(swarm: LocalSwarm):
    rich, server = node(swarm, "rich"), node(swarm, "server")
    owner = identity(rich)
    store = PoolStore(rich.data_dir)
    store.save(PoolState.create(owner, "home"))
    invitation = Invitation.create(
        owner, pool_name="home", owner_address=stage(rich)["address"], network_id=NETWORK, ttl_s=600
    )
    store.record_invitation(invitation)
    joined = request_join(
        identity(server), NETWORK, invitation.to_code(), "server", PoolStore(server.data_dir)
    )
    assert joined.member_ids() == {owner.peer_id, identity(server).peer_id}
    assert store.state() == joined

    outsider = swarm.add((15, 30), name="outsider")
    swarm.wait_ready([outsider])
    _set_private(rich, True)
    served_before = stage(server)["forwards"]
    for _ in range(3):
        complete(rich, max_tokens=6)
    assert stage(outsider)["sessions_opened"] == 0
    assert stage(server)["forwards"] > served_before

    swarm.stop_node(server)
    time.sleep(12)  # server's record expires: outsider is the only route left
    headers = {"Authorization": f"Bearer {rich.api_key}"}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
    refused = httpx2.post(f"{rich.api}/v1/completions", json=body, headers=headers, timeout=300)
    assert refused.status_code != 200 and "private mode" in refused.text, refused.text
    assert stage(outsider)["sessions_opened"] == 0

    _set_private(rich, False)
    complete(rich, max_tokens=6)
    assert stage(outsider)["sessions_opened"] > 0


def _set_private(target: LocalNode, on: bool) -> None:
    headers = {"Authorization": f"Bearer {target.api_key}"}
    reply = httpx2.put(f"{target.api}/api/admin/config", json={"pool": {"private_mode": on}}, headers=headers)
    assert reply.status_code == 200, reply.text
    reply = httpx2.post(f"{target.api}/api/admin/config/reload", headers=headers)
    assert reply.status_code == 200, reply.text
    time.sleep(2)  # the node reloads on the supervisor's SIGHUP


def test_restarting_every_process_keeps_balances_and_the_pool(swarm: LocalSwarm):
    rich = node(swarm, "rich")
    before = credits(rich)
    pool = PoolStore(rich.data_dir).state()
    swarm.stop_node(rich)
    again = swarm.add((0, 15), name="rich")
    server = swarm.add((15, 30), name="server")
    swarm.wait_ready([again, server])
    after = credits(again)
    assert (after["earned"], after["spent"], after["receipts"]) == (
        before["earned"],
        before["spent"],
        before["receipts"],
    )
    assert PoolStore(again.data_dir).state() == pool
    assert PoolStore(server.data_dir).state() == pool
