"""A node's credit desk: pays the stages it uses, checks who pays it, and queues by tier.

Owns `CreditDesk`, the one object through which a node's pipeline code touches credits
(`swarm.credits` holds the formats, `swarm.ledger` the storage):

- As a stage: it counts the positions each session ran (`served`), and answers the
  `Credits` wire messages of requesters. A receipt is stored only if its signature
  verifies, it names this stage, the session it names ran here for that requester with
  these layers and at least that many positions, and it was not stored before. A
  balance report is answered with a fresh challenge; the proof that comes back
  (`swarm.credits.check_proof`) gives the reporter's standing here: its earned total
  times the mean trust weight of the sampled receipts, minus what it spent (never less
  than the receipts it signed that this node holds).
- As a requester: before a session it shows its balance report to every stage of the
  route that has not checked the current one (`introduce`); when a session ends it signs
  one receipt per stage (`settle`), stores it as spent and delivers it in the background.
- Pools share credit: a requester that shows its pool's signed member list with its
  report is ranked by the sum of the checked standings of the members this node knows.
- `TierGate`: a stage's admission of sessions, at most `limit` at once; waiting ones go
  in tier order, then arrival order, and every one is admitted in the end.

Imports no jax: the control plane reads balances and standings through `summary`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from swarm import wire
from swarm.credits import (
    TIERS,
    BalanceReport,
    CreditError,
    Receipt,
    TrustPolicy,
    check_proof,
    make_proof,
    subnet_of,
    tier_of,
)
from swarm.identity import Identity, peer_id_of
from swarm.ledger import Ledger
from swarm.pool import PoolError, PoolState
from swarm.secure_channel import ChannelError, SecureChannel

log = logging.getLogger(__name__)

MAX_SERVED_SESSIONS = 100_000  # sessions whose work a receipt may still be given for
REPORT_MAX_AGE_S = 600.0  # a balance report older than this is not accepted
INTRODUCE_AGAIN_S = 300.0  # a stage that checked our report is shown a new one after this
DELIVERY_ATTEMPTS = 3
EXCHANGE_TIMEOUT_S = 5.0
POPULATION_S = 2.0  # how long the standings tiers are ranked among are reused


@dataclass
class _Served:
    requester: str
    layers: tuple[int, int]
    positions: int


class CreditDesk:
    """See the module docstring. Thread-safe."""

    def __init__(
        self,
        ledger: Ledger,
        identity: Identity,
        network_id: str,
        policy: TrustPolicy | None = None,
        pool_state: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.ledger = ledger
        # The signed member list of this node's pool (shown with its report), or None.
        self.pool_state = pool_state or (lambda: None)
        self.identity = identity
        self.network_id = network_id
        self.policy = policy or TrustPolicy()
        self._lock = threading.Lock()
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._introduced: dict[bytes, tuple[bytes, float]] = {}  # stage key -> (our root, when)
        self._deliveries: queue.Queue[tuple[str, bytes, Receipt]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._population_cache: tuple[float, float, list[float]] | None = None

    # --- the stage's side ---------------------------------------------------------------

    def served(self, session_id: str, requester_key: bytes, layers: tuple[int, int], positions: int) -> None:
        """Counts `positions` run for a session of the requester holding `requester_key`
        (not for this node's own sessions: nobody pays for those)."""
        if requester_key == self.identity.public_key:
            return
        requester = peer_id_of(requester_key)
        with self._lock:
            entry = self._served.get(session_id)
            if entry is None:
                entry = self._served[session_id] = _Served(requester, layers, 0)
                while len(self._served) > MAX_SERVED_SESSIONS:
                    self._served.popitem(last=False)
            elif (entry.requester, entry.layers) != (requester, layers):
                return  # another requester's session id (or other layers): counts for neither
            entry.positions += positions

    def answer(self, request: dict[str, Any], connection: dict[str, Any]) -> dict[str, Any]:
        """The reply to one Credits message; CreditError for a refusal. `connection` holds
        state across one channel's messages (the peer's host, a pending challenge)."""
        kind = request.get("kind")
        if kind == "receipt":
            self._accept_receipt(Receipt.from_dict(request.get("receipt")), connection)
            return self._ack()
        if kind == "report":
            report = BalanceReport.from_dict(request.get("report"))
            self._check_report_header(report, connection)
            if request.get("pool") is not None:
                self._note_pool(report.peer_id, request["pool"])
            if report.earned == 0:
                self._record(report, [])
                return self._ack()
            nonce = os.urandom(16)
            connection["challenge"] = (report, nonce)
            return {"kind": "challenge", "nonce": nonce.hex()}
        if kind == "proof":
            pending = connection.pop("challenge", None)
            if pending is None:
                raise CreditError("a proof answers a challenge, and none is pending")
            report, nonce = pending
            try:
                sampled = check_proof(report, nonce, request.get("samples"))
            except CreditError:
                self.ledger.record_standing(report, -float(report.spent) - 1.0, verified=False)
                raise
            self._record(report, sampled)
            return self._ack()
        raise CreditError(f"unknown credits message {kind!r}")

    def _ack(self) -> dict[str, Any]:
        return {"kind": "ack", "report": self.ledger.report(self.identity, self.network_id).to_dict()}

    def _accept_receipt(self, receipt: Receipt, connection: dict[str, Any]) -> None:
        receipt.verify(self.network_id)
        if receipt.stage != self.identity.peer_id:
            raise CreditError("the receipt pays another stage")
        with self._lock:
            served = self._served.get(receipt.request_id)
        if served is None or served.requester != receipt.requester:
            raise CreditError(f"this stage served no request {receipt.request_id} for {receipt.requester}")
        if served.layers != receipt.layers:
            raise CreditError(
                f"this stage served layers {served.layers[0]}-{served.layers[1]} for that request"
            )
        if receipt.tokens > served.positions:
            raise CreditError(
                f"the receipt claims {receipt.tokens} positions; this stage ran {served.positions}"
            )
        self.ledger.see(receipt.requester, subnet=connection.get("subnet"))
        self.ledger.add(receipt)
        self._population_cache = None

    def _check_report_header(self, report: BalanceReport, connection: dict[str, Any]) -> None:
        report.verify(self.network_id)
        if report.peer_id == self.identity.peer_id:
            raise CreditError("a node does not report its balance to itself")
        if time.time() - report.issued > REPORT_MAX_AGE_S:
            raise CreditError("the balance report is too old")
        held_credits, held_count = self.ledger.spent_by(report.peer_id)
        if report.spent < held_credits or report.spent_count < held_count:
            self.ledger.record_standing(report, -float(held_credits) - 1.0, verified=False)
            raise CreditError(
                f"the report says {report.peer_id} spent {report.spent} credits; this node holds"
                f" {held_credits} worth of its receipts"
            )
        self.ledger.see(report.peer_id, subnet=connection.get("subnet"), served=report.earned > 0)

    def _note_pool(self, peer_id: str, raw: Any) -> None:
        try:
            state = PoolState.from_dict(raw)
            state.verify()
        except PoolError as error:
            raise CreditError(f"the pool shown with the report does not verify: {error}") from None
        if peer_id not in state.member_ids():
            raise CreditError("the pool shown with the report does not list its reporter")
        self.ledger.record_pool(peer_id, state.pool_id, state.version, state.member_ids())
        self._population_cache = None

    def _record(self, report: BalanceReport, sampled: Sequence[Receipt]) -> None:
        weight = 1.0
        if sampled:
            weight = sum(self._weight(r, report.peer_id) for r in sampled) / len(sampled)
        held_credits, _ = self.ledger.spent_by(report.peer_id)
        standing = report.earned * weight - max(report.spent, held_credits)
        self.ledger.record_standing(report, standing, verified=True)
        self._population_cache = None

    def _weight(self, receipt: Receipt, earner: str, signers: dict[str, tuple] | None = None) -> float:
        """The trust weight of one receipt earned by `earner`; `signers` caches what is
        looked up per signer across the receipts of one computation."""
        now = time.time()
        known = signers.get(receipt.requester) if signers is not None else None
        if known is None:
            first_seen, subnet, served = self.ledger.identity(receipt.requester)
            if first_seen is None:
                self.ledger.see(receipt.requester)
                first_seen = now
            earner_subnet = self.ledger.identity(earner)[1] if earner != self.identity.peer_id else None
            traded_with_us = self.ledger.spent_by(receipt.requester)[1] > 0
            known = (
                first_seen,
                served,
                subnet is not None and subnet == earner_subnet and not traded_with_us,
            )
            if signers is not None:
                signers[receipt.requester] = known
        first_seen, served, same_subnet_only = known
        return self.policy.weight(
            receipt,
            signer_age_s=now - first_seen,
            signer_served=served,
            same_subnet_only=same_subnet_only,
            now=now,
        )

    # --- standings and tiers ------------------------------------------------------------

    def own_standing(self) -> float:
        """This node's standing by its own ledger: weighted earnings minus spending."""
        _, receipts = self.ledger.earned_tree()
        signers: dict[str, tuple] = {}
        earned = sum(r.credits * self._weight(r, self.identity.peer_id, signers) for r in receipts)
        return earned - self.ledger.spent_by(self.identity.peer_id)[0]

    def _population(self) -> tuple[float, list[float]]:
        """(own standing, every known standing), recomputed at most every POPULATION_S."""
        with self._lock:
            cached = self._population_cache
        if cached is not None and time.monotonic() - cached[0] < POPULATION_S:
            return cached[1], cached[2]
        own = self.own_standing()
        known = [s.standing for s in self.ledger.standings() if s.peer_id != self.identity.peer_id] + [own]
        with self._lock:
            self._population_cache = (time.monotonic(), own, known)
        return own, known

    def tier(self, peer_id: str) -> str:
        """The tier of a requester here; Bronze for one that has shown no checked report."""
        own, known = self._population()
        if peer_id == self.identity.peer_id:
            return tier_of(own, known)
        standing = self.ledger.standing_of(peer_id)
        if standing is None or not standing.verified:
            return "bronze"
        return tier_of(self._pooled(peer_id, standing.standing, own), known)

    def _pooled(self, peer_id: str, standing: float, own: float) -> float:
        """A requester's standing with its pool's: the sum over the members checked here."""
        pool = self.ledger.pool_of(peer_id)
        if pool is None:
            return standing
        total = 0.0
        for member in pool[1]:
            if member == self.identity.peer_id:
                total += own
                continue
            known = self.ledger.standing_of(member)
            if known is not None and known.verified:
                total += known.standing
        return total

    # --- the requester's side -----------------------------------------------------------

    def introduce(self, stages: Sequence[Any]) -> None:
        """Shows this node's balance report to each stage (`.address`, `.public_key`) that has
        not checked the current one. Failures only cost priority: they are logged."""
        report: BalanceReport | None = None
        for stage in stages:
            if stage.public_key == self.identity.public_key:
                continue
            if report is None:
                report = self.ledger.report(self.identity, self.network_id)
            with self._lock:
                known = self._introduced.get(stage.public_key)
            pool = self.pool_state()
            fingerprint = (
                report.earned_root
                + report.spent.to_bytes(8, "big")
                + str((pool or {}).get("version")).encode()
            )
            if known and known[0] == fingerprint and time.time() - known[1] < INTRODUCE_AGAIN_S:
                continue
            try:
                self._show_report(stage, report)
            except (ChannelError, CreditError, wire.WireError) as error:
                log.info("showing our balance to %s failed: %s", stage.address, error)
                continue
            with self._lock:
                self._introduced[stage.public_key] = (fingerprint, time.time())

    def _show_report(self, stage: Any, report: BalanceReport) -> None:
        with self._channel(stage.address, stage.public_key) as channel:
            message: dict[str, Any] = {"kind": "report", "report": report.to_dict()}
            pool = self.pool_state()
            if pool is not None:
                message["pool"] = pool
            reply = self._exchange(channel, message)
            if reply.get("kind") == "challenge":
                nonce = bytes.fromhex(str(reply.get("nonce", "")))
                levels, receipts = self.ledger.earned_tree()
                reply = self._exchange(
                    channel, {"kind": "proof", "samples": make_proof(levels, receipts, nonce)}
                )
            self._learn(reply, stage.public_key)

    def settle(self, session_id: str, stages: Sequence[Any], positions: int) -> None:
        """Signs and stores a receipt for each other stage of a finished session; delivers them
        in the background."""
        if positions <= 0:
            return
        for stage in stages:
            if stage.public_key == self.identity.public_key:
                continue
            try:
                receipt = Receipt.create(
                    self.identity,
                    request_id=session_id,
                    network_id=self.network_id,
                    stage_key=stage.public_key,
                    layers=tuple(stage.layer_range),
                    tokens=positions,
                )
                self.ledger.add(receipt)
            except (CreditError, sqlite3.Error) as error:  # the generation itself succeeded
                log.warning("could not record the receipt for %s: %s", stage.address, error)
                continue
            self._deliveries.put((stage.address, stage.public_key, receipt))
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._deliver_loop, name="receipts", daemon=True)
                self._worker.start()

    def _deliver_loop(self) -> None:
        while True:
            address, key, receipt = self._deliveries.get()
            for attempt in range(DELIVERY_ATTEMPTS):
                try:
                    with self._channel(address, key) as channel:
                        self._learn(
                            self._exchange(channel, {"kind": "receipt", "receipt": receipt.to_dict()}), key
                        )
                    break
                except CreditError as error:  # refused: retrying cannot help
                    log.warning("stage %s refused receipt %s: %s", address, receipt.request_id, error)
                    break
                except (ChannelError, wire.WireError) as error:
                    log.info(
                        "delivering a receipt to %s failed (attempt %d): %s", address, attempt + 1, error
                    )
                    time.sleep(1.0 + attempt)

    def pending_deliveries(self) -> int:
        return self._deliveries.qsize()

    def _learn(self, reply: dict[str, Any], stage_key: bytes) -> None:
        """Notes the stage's own report from an ack: it served us, so it is seen earning;
        its standing stays unverified until it shows a proof here."""
        if reply.get("kind") != "ack":
            raise CreditError(f"expected an ack, got {reply.get('kind')!r}")
        with contextlib.suppress(CreditError):
            report = BalanceReport.from_dict(reply.get("report"))
            report.verify(self.network_id)
            if report.public_key == stage_key:
                self.ledger.see(report.peer_id, served=True)
                current = self.ledger.standing_of(report.peer_id)
                if current is None or not current.verified:
                    self.ledger.record_standing(report, float(report.balance), verified=False)

    @contextlib.contextmanager
    def _channel(self, address: str, key: bytes):
        channel = SecureChannel.connect(
            address,
            self.identity,
            self.network_id,
            expected_peer=key,
            timeout=EXCHANGE_TIMEOUT_S,
        )
        try:
            yield channel
        finally:
            channel.close()

    def _exchange(self, channel: SecureChannel, message: dict[str, Any]) -> dict[str, Any]:
        channel.send(wire.encode(wire.Credits(message)), timeout=EXCHANGE_TIMEOUT_S)
        reply = wire.decode(channel.recv(timeout=EXCHANGE_TIMEOUT_S))
        if isinstance(reply, wire.Error):
            raise CreditError(f"{reply.code}: {reply.message}")
        if not isinstance(reply, wire.Credits):
            raise CreditError(f"unexpected {type(reply).__name__}")
        return reply.body


def connection_state(host: str, peer_key: bytes) -> dict[str, Any]:
    """The per-channel state `CreditDesk.answer` keeps (and the pool desk reads), for the
    peer holding `peer_key` connecting from `host`."""
    return {"subnet": subnet_of(host), "peer_key": peer_key}


def _ranked(ledger: Ledger, identity: Identity, network_id: str) -> tuple[list[dict[str, Any]], Any]:
    """Known peers and this node ("self": True), highest standing first, each with its
    tier; and this node's ledger totals."""
    own = CreditDesk(ledger, identity, network_id).own_standing()
    totals = ledger.totals()
    others = [s for s in ledger.standings() if s.peer_id != identity.peer_id]
    known = [s.standing for s in others] + [own]  # ranked unrounded, as CreditDesk.tier does
    rows = [s.to_dict() | {"tier": tier_of(s.standing, known)} for s in others]
    rows.append(
        {
            "peer_id": identity.peer_id,
            "standing": round(own, 3),
            "earned": totals.earned,
            "spent": totals.spent,
            "balance": totals.balance,
            "verified": True,
            "checked_at": time.time(),
            "self": True,
            "tier": tier_of(own, known),
        }
    )
    rows.sort(key=lambda row: (-row["standing"], row["peer_id"]))
    return rows, totals


def summary(
    ledger: Ledger, identity: Identity, network_id: str, recent: int = 20, board: int = 0
) -> dict[str, Any]:
    """This node's credits as the admin API and `swarm credits` show them; with `board`,
    also the first `board` rows of the leaderboard."""
    rows, totals = _ranked(ledger, identity, network_id)
    me = next(row for row in rows if row.get("self"))
    answer = {
        "peer_id": identity.peer_id,
        "earned": totals.earned,
        "spent": totals.spent,
        "balance": totals.balance,
        "standing": me["standing"],
        "tier": me["tier"],
        "receipts": {"earned": totals.earned_count, "spent": totals.spent_count},
        "known_peers": len(rows) - 1,
        "recent": ledger.recent(recent),
    }
    if board:
        answer["leaderboard"] = rows[:board]
    return answer


def leaderboard(ledger: Ledger, identity: Identity, network_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """Known peers and this node ranked by standing, each with its tier."""
    return _ranked(ledger, identity, network_id)[0][:limit]


# --- admission by tier --------------------------------------------------------------------


class TierGate:
    """At most `limit` sessions at once (0: no limit); waiters go in tier, then arrival, order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiting: list[list[Any]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self.admitted = dict.fromkeys(TIERS, 0)
        self.waited = dict.fromkeys(TIERS, 0)
        self.history: deque[str] = deque(maxlen=64)  # tiers in admission order, for /health

    def enter(self, tier: str, timeout: float) -> bool:
        """Blocks until admitted (True) or `timeout` passes (False)."""
        rank = TIERS.index(tier)
        deadline = time.monotonic() + timeout
        with self._condition:
            if self.limit <= 0 or (self.active < self.limit and not self._waiting):
                self._admit(tier)
                return True
            entry = [rank, next(self._order), tier]
            heapq.heappush(self._waiting, entry)
            self.waited[tier] += 1
            while not (self._waiting[0] is entry and self.active < self.limit):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                    self._condition.notify_all()  # the next waiter may be first now
                    return False
                self._condition.wait(remaining)
            heapq.heappop(self._waiting)
            self._admit(tier)
            self._condition.notify_all()
            return True

    def _admit(self, tier: str) -> None:
        self.active += 1
        self.admitted[tier] += 1
        self.history.append(tier)

    def leave(self) -> None:
        with self._condition:
            self.active = max(0, self.active - 1)
            self._condition.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._condition:
            return {
                "limit": self.limit,
                "active": self.active,
                "waiting": len(self._waiting),
                "admitted": dict(self.admitted),
                "waited": dict(self.waited),
                "order": list(self.history),
            }
