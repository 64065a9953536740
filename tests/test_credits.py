"""Credits: receipts, the ledger, balance reports and their proofs, trust, tiers, admission.

The formats and rules are tested directly; `test_stages_are_paid_exactly_for_what_they_ran`
runs a tiny model through two stages on loopback and checks each stage's ledger against
the positions it ran.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from swarm.credit_desk import CreditDesk, TierGate, leaderboard, summary
from swarm.credits import (
    BalanceReport,
    CreditError,
    Receipt,
    TrustPolicy,
    check_path,
    check_proof,
    leaf,
    locate,
    make_proof,
    merkle_levels,
    prove,
    root_of,
    subnet_of,
    tier_of,
)
from swarm.identity import Identity
from swarm.ledger import Ledger

NETWORK = "swarm-test"


def _receipt(
    requester: Identity, stage: Identity, *, request_id: str = "r1", tokens: int = 10, **kw
) -> Receipt:
    return Receipt.create(
        requester,
        request_id=request_id,
        network_id=NETWORK,
        stage_key=stage.public_key,
        layers=kw.get("layers", (0, 15)),
        tokens=tokens,
        now=kw.get("now"),
    )


def _desk(tmp_path, name: str, identity: Identity | None = None) -> CreditDesk:
    identity = identity or Identity.generate()
    return CreditDesk(Ledger(tmp_path / name, identity.peer_id), identity, NETWORK)


# --- receipts -----------------------------------------------------------------------------


def test_a_receipt_verifies_and_any_change_breaks_it():
    requester, stage = Identity.generate(), Identity.generate()
    receipt = _receipt(requester, stage)
    assert receipt.credits == 150
    receipt.verify(NETWORK)
    assert Receipt.from_dict(receipt.to_dict()) == receipt
    for field, value in (("tokens", 11), ("layers", [0, 16]), ("stage", Identity.generate().peer_id)):
        forged = Receipt.from_dict({**receipt.to_dict(), field: value})
        with pytest.raises(CreditError, match="signature"):
            forged.verify(NETWORK)
    with pytest.raises(CreditError, match="network"):
        receipt.verify("another-network")


def test_a_node_cannot_sign_for_its_own_work_or_in_another_name():
    node = Identity.generate()
    with pytest.raises(CreditError, match="own work"):
        _receipt(node, node).verify(NETWORK)
    other = Identity.generate()
    receipt = _receipt(node, Identity.generate())
    impostor = Receipt.from_dict({**receipt.to_dict(), "requester": other.peer_id})
    with pytest.raises(CreditError, match="key does not match"):
        impostor.verify(NETWORK)


@pytest.mark.parametrize(
    "change",
    [
        {"request_id": "x" * 65},
        {"tokens": -1},
        {"tokens": True},
        {"tokens": "12"},
        {"layers": [3, 3]},
        {"layers": [0]},
        {"requester_key": "00"},
        {"signature": "zz" * 64},
        {"issued": float("nan")},
    ],
)
def test_malformed_receipts_are_refused_with_credit_errors(change):
    base = _receipt(Identity.generate(), Identity.generate()).to_dict()
    with pytest.raises(CreditError):
        Receipt.from_dict({**base, **change})
    for raw in (None, [], {"tokens": 1}):
        with pytest.raises(CreditError):
            Receipt.from_dict(raw)


# --- Merkle-sum tree and proofs ------------------------------------------------------------


def test_every_credit_offset_proves_the_receipt_that_holds_it():
    credits = [5, 1, 7, 3, 3, 9, 2]
    leaves = [leaf(bytes([i]) * 32, c) for i, c in enumerate(credits)]
    levels = merkle_levels(leaves)
    root = root_of(levels)
    assert root[1] == sum(credits)
    start = 0
    for index, amount in enumerate(credits):
        for offset in range(start, start + amount):
            assert locate(levels, offset) == index
        assert check_path(leaves[index], prove(levels, index), root) == start
        start += amount
    with pytest.raises(CreditError, match="root"):
        check_path(leaves[0], prove(levels, 0), (root[0], root[1] + 1))
    with pytest.raises(CreditError, match="root"):
        check_path(leaf(b"\0" * 32, 6), prove(levels, 0), root)


def _earned(tmp_path, count: int = 12):
    """A ledger whose node earned `count` receipts from three other nodes."""
    node = Identity.generate()
    ledger = Ledger(tmp_path / "earner", node.peer_id)
    payers = [Identity.generate() for _ in range(3)]
    for i in range(count):
        ledger.add(_receipt(payers[i % 3], node, request_id=f"req{i}", tokens=1 + i))
    return node, ledger, payers


def test_an_honest_report_passes_its_challenge(tmp_path):
    node, ledger, payers = _earned(tmp_path)
    report = ledger.report(node, NETWORK)
    assert report.earned == 15 * sum(range(1, 13)) and report.earned_count == 12
    report.verify(NETWORK)
    levels, receipts = ledger.earned_tree()
    nonce = b"n" * 16
    sampled = check_proof(report, nonce, make_proof(levels, receipts, nonce))
    assert {r.requester for r in sampled} <= {p.peer_id for p in payers}


def test_an_inflated_or_padded_report_fails_its_challenge(tmp_path):
    node, ledger, _ = _earned(tmp_path)
    levels, receipts = ledger.earned_tree()
    honest = root_of(levels)
    # The total claimed is ten times the receipts: nine in ten samples land on nothing.
    inflated = BalanceReport.create(
        node, NETWORK, root=(honest[0], honest[1] * 10), earned_count=12, spent=0, spent_count=0
    )
    with pytest.raises(CreditError):
        check_proof(inflated, b"x" * 16, make_proof(levels, receipts, b"x" * 16))
    # Padding with receipts signed by itself, so the tree and the total agree.
    padded = [*receipts, *(_receipt(node, node, request_id=f"self{i}", tokens=500) for i in range(4))]
    padded_levels = merkle_levels([leaf(r.receipt_id, r.credits) for r in padded])
    report = BalanceReport.create(
        node, NETWORK, root=root_of(padded_levels), earned_count=16, spent=0, spent_count=0
    )
    with pytest.raises(CreditError, match="own work"):
        check_proof(report, b"y" * 16, make_proof(padded_levels, padded, b"y" * 16))


# --- the ledger ---------------------------------------------------------------------------


def test_the_ledger_is_append_only_refuses_replays_and_survives_reopening(tmp_path):
    node, ledger, payers = _earned(tmp_path, count=3)
    receipt = _receipt(payers[0], node, request_id="req0", tokens=1)
    with pytest.raises(CreditError, match="replay"):
        ledger.add(receipt)
    with pytest.raises(CreditError, match="neither"):
        ledger.add(_receipt(payers[0], payers[1], request_id="elsewhere"))
    with (
        sqlite3.connect(ledger.path) as connection,
        pytest.raises(sqlite3.DatabaseError, match="append-only"),
    ):
        connection.execute("UPDATE credit_receipts SET credits = 1000000")
    with (
        sqlite3.connect(ledger.path) as connection,
        pytest.raises(sqlite3.DatabaseError, match="append-only"),
    ):
        connection.execute("DELETE FROM credit_receipts")
    reopened = Ledger(tmp_path / "earner", node.peer_id)
    assert reopened.totals() == ledger.totals()
    assert reopened.totals().earned == 15 * (1 + 2 + 3)
    # The tree is extended as receipts arrive, and equals one built from scratch.
    first_root = root_of(ledger.earned_tree()[0])
    ledger.add(_receipt(payers[1], node, request_id="later", tokens=4))
    extended = root_of(ledger.earned_tree()[0])
    assert extended != first_root and extended[1] == first_root[1] + 60
    assert extended == root_of(Ledger(tmp_path / "earner", node.peer_id).earned_tree()[0])


# --- trust and tiers ----------------------------------------------------------------------


def test_young_unserved_and_clustered_signers_count_little_and_receipts_decay():
    policy = TrustPolicy()
    receipt = _receipt(Identity.generate(), Identity.generate(), now=time.time())
    now = receipt.issued

    def weight(**changes):
        args = {"signer_age_s": 30 * 86400.0, "signer_served": True, "same_subnet_only": False, "now": now}
        return policy.weight(receipt, **{**args, **changes})

    assert weight() == pytest.approx(1.0)
    assert weight(signer_age_s=0.0) == pytest.approx(policy.min_weight)
    assert weight(signer_age_s=3.5 * 86400) == pytest.approx(0.525)
    assert weight(signer_served=False) == pytest.approx(policy.unserved_weight)
    assert weight(same_subnet_only=True) == pytest.approx(policy.subnet_weight)
    assert weight(now=now + policy.half_life_s) == pytest.approx(0.5)
    assert subnet_of("10.1.2.3") == subnet_of("10.1.2.200") != subnet_of("10.1.3.1")
    assert subnet_of("127.0.0.1") == subnet_of("::1") == "loopback"


def test_tiers_rank_standings_and_bronze_is_zero_or_less():
    known = [float(v) for v in range(1, 21)]  # 20 positive standings
    assert tier_of(20, known) == tier_of(19, known) == "platinum"
    assert tier_of(18, known) == tier_of(15, known) == "gold"
    assert tier_of(14, known) == tier_of(1, known) == "silver"
    assert tier_of(0, known) == tier_of(-5, known) == "bronze"


# --- the desk: receipts and reports between nodes -----------------------------------------


def test_a_stage_takes_only_receipts_for_work_it_ran(tmp_path):
    stage = _desk(tmp_path, "stage")
    requester = Identity.generate()
    stage.served("session-1", requester.public_key, (0, 15), 12)
    state: dict = {"subnet": "loopback"}
    too_many = _receipt(requester, stage.identity, request_id="session-1", tokens=13)
    with pytest.raises(CreditError, match="ran 12"):
        stage.answer({"kind": "receipt", "receipt": too_many.to_dict()}, state)
    unknown = _receipt(requester, stage.identity, request_id="session-2", tokens=1)
    with pytest.raises(CreditError, match="served no request"):
        stage.answer({"kind": "receipt", "receipt": unknown.to_dict()}, state)
    other_layers = _receipt(requester, stage.identity, request_id="session-1", tokens=12, layers=(0, 16))
    with pytest.raises(CreditError, match="layers"):
        stage.answer({"kind": "receipt", "receipt": other_layers.to_dict()}, state)
    stranger = _receipt(Identity.generate(), stage.identity, request_id="session-1", tokens=12)
    with pytest.raises(CreditError, match="served no request"):
        stage.answer({"kind": "receipt", "receipt": stranger.to_dict()}, state)
    good = _receipt(requester, stage.identity, request_id="session-1", tokens=12)
    reply = stage.answer({"kind": "receipt", "receipt": good.to_dict()}, state)
    assert reply["kind"] == "ack" and BalanceReport.from_dict(reply["report"]).earned == 180
    with pytest.raises(CreditError, match="replay"):
        stage.answer({"kind": "receipt", "receipt": good.to_dict()}, state)
    forged = {**good.to_dict(), "request_id": "session-1", "tokens": 6}
    with pytest.raises(CreditError, match="signature"):
        stage.answer({"kind": "receipt", "receipt": forged}, state)
    assert stage.ledger.totals().earned == 180


def test_another_requesters_work_under_the_same_session_id_counts_for_neither(tmp_path):
    stage = _desk(tmp_path, "stage")
    requester, intruder = Identity.generate(), Identity.generate()
    stage.served("shared-id", requester.public_key, (0, 15), 4)
    stage.served("shared-id", intruder.public_key, (0, 15), 100)  # ignored: not its session
    stage.served("shared-id", requester.public_key, (0, 9), 100)  # other layers: ignored too
    state: dict = {"subnet": "loopback"}
    inflated = _receipt(requester, stage.identity, request_id="shared-id", tokens=5)
    with pytest.raises(CreditError, match="ran 4"):
        stage.answer({"kind": "receipt", "receipt": inflated.to_dict()}, state)
    claimed = _receipt(intruder, stage.identity, request_id="shared-id", tokens=1)
    with pytest.raises(CreditError, match="served no request"):
        stage.answer({"kind": "receipt", "receipt": claimed.to_dict()}, state)


def _prove_to(verifier: CreditDesk, reporter: CreditDesk) -> None:
    """Runs the report / challenge / proof exchange between two desks, without a network."""
    state: dict = {"subnet": "loopback"}
    report = reporter.ledger.report(reporter.identity, NETWORK)
    message = {"kind": "report", "report": report.to_dict()}
    if reporter.pool_state() is not None:
        message["pool"] = reporter.pool_state()
    reply = verifier.answer(message, state)
    if reply["kind"] == "challenge":
        levels, receipts = reporter.ledger.earned_tree()
        samples = make_proof(levels, receipts, bytes.fromhex(reply["nonce"]))
        reply = verifier.answer({"kind": "proof", "samples": samples}, state)
    assert reply["kind"] == "ack"


def _pay(payer: CreditDesk, stage: CreditDesk, session: str, positions: int) -> None:
    stage.served(session, payer.identity.public_key, (0, 15), positions)
    receipt = _receipt(payer.identity, stage.identity, request_id=session, tokens=positions)
    payer.ledger.add(receipt)
    stage.answer({"kind": "receipt", "receipt": receipt.to_dict()}, {"subnet": "loopback"})


def test_checked_reports_give_tiers_and_a_richer_peer_goes_first(tmp_path):
    server, rich, poor = _desk(tmp_path, "server"), _desk(tmp_path, "rich"), _desk(tmp_path, "poor")
    _pay(poor, rich, "s1", 40)  # the poor node used the rich one's stage
    _prove_to(server, rich)
    _prove_to(server, poor)
    assert server.tier(rich.identity.peer_id) == "platinum"
    assert server.tier(poor.identity.peer_id) == "bronze"
    assert server.tier(Identity.generate().peer_id) == "bronze"  # never showed a report
    board = leaderboard(server.ledger, server.identity, NETWORK)
    assert board[0]["peer_id"] == rich.identity.peer_id and board[0]["tier"] == "platinum"
    assert board[-1]["peer_id"] == poor.identity.peer_id and board[-1]["tier"] == "bronze"
    mine = summary(rich.ledger, rich.identity, NETWORK)
    assert (mine["earned"], mine["spent"], mine["balance"]) == (600, 0, 600)
    assert mine["recent"][0]["direction"] == "earned"


def test_a_node_cannot_raise_its_own_standing(tmp_path):
    server, cheat, payer = _desk(tmp_path, "server"), _desk(tmp_path, "cheat"), _desk(tmp_path, "payer")
    _pay(payer, cheat, "honest", 10)
    _pay(cheat, server, "spent", 20)  # the cheat spent 300 credits at the server
    # Hiding that spending: the server holds the receipt, so the report is refused.
    levels, _ = cheat.ledger.earned_tree()
    hidden = BalanceReport.create(
        cheat.identity, NETWORK, root=root_of(levels), earned_count=1, spent=0, spent_count=0
    )
    with pytest.raises(CreditError, match="spent 0"):
        server.answer({"kind": "report", "report": hidden.to_dict()}, {})
    assert server.tier(cheat.identity.peer_id) == "bronze"
    # Claiming ten times its earnings: the proof fails and it stays Bronze.
    inflated = BalanceReport.create(
        cheat.identity, NETWORK, root=(levels[-1][0][0], 1500), earned_count=1, spent=300, spent_count=1
    )
    state: dict = {}
    reply = server.answer({"kind": "report", "report": inflated.to_dict()}, state)
    _, receipts = cheat.ledger.earned_tree()
    with pytest.raises(CreditError):
        server.answer(
            {"kind": "proof", "samples": make_proof(levels, receipts, bytes.fromhex(reply["nonce"]))}, state
        )
    assert server.tier(cheat.identity.peer_id) == "bronze"
    # A receipt it signs for itself is never stored.
    with pytest.raises(CreditError, match="own work"):
        cheat.answer({"kind": "receipt", "receipt": _receipt(cheat.identity, cheat.identity).to_dict()}, {})
    assert cheat.ledger.totals().earned == 150


# --- admission ----------------------------------------------------------------------------


def test_waiting_sessions_are_admitted_by_tier_and_every_one_gets_in():
    gate = TierGate(1)
    assert gate.enter("silver", timeout=1)
    admitted: list[str] = []

    def wait(tier: str) -> None:
        assert gate.enter(tier, timeout=10)
        admitted.append(tier)
        time.sleep(0.05)
        gate.leave()

    threads = []
    for tier in ("bronze", "gold", "bronze", "platinum"):
        threads.append(threading.Thread(target=wait, args=(tier,)))
        threads[-1].start()
        time.sleep(0.05)
    assert gate.stats()["waiting"] == 4
    gate.leave()
    for thread in threads:
        thread.join(timeout=10)
    assert admitted == ["platinum", "gold", "bronze", "bronze"]
    assert gate.stats()["admitted"] == {"platinum": 1, "gold": 1, "silver": 1, "bronze": 2}
    assert gate.enter("bronze", timeout=1)
    assert not gate.enter("platinum", timeout=0.2)  # full until someone leaves
    assert gate.stats()["waiting"] == 0


# --- on loopback: a requester pays the stages of its route ---------------------------------


def test_stages_are_paid_exactly_for_what_they_ran(tiny_model, data_dir, tmp_path):
    from swarm.engine import EngineSettings
    from swarm.loader import open_model
    from swarm.pipeline import Embedder, Requester, RouteStage
    from swarm.sampling import SamplingParams
    from swarm.stage import StageConfig, StageEngine, StageServer

    model = open_model(str(tiny_model("llama-tiny")), data_dir)
    settings = EngineSettings(kv_cache="f32", max_context=128)
    desks, stages = [], []
    try:
        for index, layers in enumerate(((0, 1), (1, 3))):
            desk = _desk(tmp_path, f"stage{index}")
            engine = StageEngine.load(model.gguf, model.config, layers, settings)
            config = StageConfig(model_id="tiny", network_id=NETWORK, max_sessions=2)
            stages.append(StageServer(engine, desk.identity, config, credits=desk).start())
            desks.append(desk)
        route = [RouteStage(s.address, s.identity.public_key, s.layer_range) for s in stages]
        payer = _desk(tmp_path, "requester")
        requester = Requester(
            payer.identity,
            Embedder(model.gguf, model.config),
            model.tokenizer,
            route,
            model_id="tiny",
            network_id=NETWORK,
            credits=payer,
        )
        prompt = model.tokenizer.encode("the quick brown fox")
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        requester.generate(prompt, params)
        positions = len(prompt) + params.max_tokens - 1  # the last token is never fed back
        deadline = time.monotonic() + 10
        while payer.pending_deliveries() or any(d.ledger.totals().earned_count == 0 for d in desks):
            assert time.monotonic() < deadline, "receipts were not delivered"
            time.sleep(0.05)
        assert [d.ledger.totals().earned for d in desks] == [1 * positions, 2 * positions]
        assert payer.ledger.totals().spent == 3 * positions
        # The requester showed its report before the session: both stages checked it.
        for desk in desks:
            standing = desk.ledger.standing_of(payer.identity.peer_id)
            assert standing is not None and standing.verified
        assert [s.stats()["admission"]["admitted"]["bronze"] for s in stages] == [1, 1]
        # Malformed credit messages get an answer naming the problem; nothing is stored.
        from swarm import wire
        from swarm.secure_channel import SecureChannel

        channel = SecureChannel.connect(stages[1].address, Identity.generate(), NETWORK, timeout=10)
        try:
            for body, reason in (
                ({"kind": "receipt", "receipt": {"tokens": "many"}}, "receipt lacks"),
                ({"kind": "proof", "samples": []}, "none is pending"),
                ({"kind": "gift"}, "unknown credits message"),
            ):
                channel.send(wire.encode(wire.Credits(body)))
                reply = wire.decode(channel.recv(timeout=10))
                assert isinstance(reply, wire.Error) and reply.code == "credit_refused", reply
                assert reason in reply.message
            channel.send(wire.encode(wire.Ping(5, 0.0)))
            assert isinstance(wire.decode(channel.recv(timeout=10)), wire.Pong)
        finally:
            channel.close()
        assert desks[1].ledger.totals().earned == 2 * positions
    finally:
        for stage in stages:
            stage.close()


def test_pool_members_share_credit(tmp_path):
    from swarm.pool import Acceptance, Invitation, PoolState

    server, rich, poor, payer = (_desk(tmp_path, name) for name in ("server", "rich", "poor", "payer"))
    _pay(payer, rich, "s1", 40)
    owner = rich.identity
    state = PoolState.create(owner, "home")
    invitation = Invitation.create(owner, pool_name="home", owner_address="", network_id=NETWORK, ttl_s=60)
    state = state.with_member(owner, invitation, Acceptance.create(poor.identity, invitation), max_size=4)
    rich.pool_state = poor.pool_state = state.to_dict
    _prove_to(server, poor)
    assert server.tier(poor.identity.peer_id) == "bronze"  # its pool's rich member is unknown here
    _prove_to(server, rich)
    server._population_cache = None
    assert server.tier(poor.identity.peer_id) == "platinum"
    # A pool list the reporter is not on, or one not signed by its owner, is refused.
    stranger = _desk(tmp_path, "stranger")
    stranger.pool_state = state.to_dict
    with pytest.raises(CreditError, match="does not list"):
        _prove_to(server, stranger)
    forged = {**state.to_dict(), "name": "other"}
    stranger.pool_state = lambda: forged
    with pytest.raises(CreditError, match="does not verify"):
        _prove_to(server, stranger)


def test_a_crash_mid_write_loses_no_committed_receipt(tmp_path):
    """A process storing receipts is killed at an arbitrary moment: every receipt it
    reported committed is in the ledger afterwards, and the ledger still opens."""
    import os
    import signal
    import subprocess
    import sys

    # The writer signs as a fixed identity and reports each commit on stdout.
    seed = os.urandom(32)
    writer = Identity(seed)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from swarm.credits import Receipt\n"
        "from swarm.identity import Identity\n"
        "from swarm.ledger import Ledger\n"
        f"me = Identity(bytes.fromhex({seed.hex()!r}))\n"
        f"ledger = Ledger(Path({str(tmp_path)!r}), me.peer_id)\n"
        "stage = Identity.generate()\n"
        "for i in range(100000):\n"
        "    ledger.add(Receipt.create(me, request_id=f'r{i}', network_id='n', stage_key=stage.public_key,"
        " layers=(0, 1), tokens=1))\n"
        "    print(i, flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = -1
    assert process.stdout is not None
    for line in process.stdout:
        committed = int(line)
        if committed >= 40:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    totals = Ledger(tmp_path, writer.peer_id).totals()
    assert totals.spent_count >= committed + 1  # all reported commits survived (maybe one more)
    assert totals.spent == totals.spent_count
