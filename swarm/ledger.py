"""The credit ledger: receipts earned and spent, identities seen, standings of known peers.

Owns three tables of `<data_dir>/swarm.db` (SQLite, WAL, synchronous=FULL, so a crash
loses nothing that was committed):

- `credit_receipts`, append-only (triggers refuse UPDATE and DELETE): every receipt this
  node earned (its stage served the request) or spent (it signed). A receipt is stored
  once per (request, stage): a replay is refused.
- `credit_identities`: when this node first saw a peer id, its subnet, whether it was
  seen earning. What `TrustPolicy` needs about a receipt's signer.
- `credit_standings`: the latest checked balance report of every peer this node knows,
  with the standing it computed: the leaderboard and the population tiers are ranked in.
- `credit_pools`: the pool each such peer showed it belongs to (a verified, owner-signed
  member list): members share credit, so a member's tier counts its pool's standings.

Every call opens a short-lived connection and one transaction, so any thread or process
(the node, the control plane) may use it. Imports only the standard library and
swarm.credits: never jax.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.credits import BalanceReport, CreditError, Receipt, leaf, merkle_levels, root_of
from swarm.db import prepare

MAX_STANDINGS = 10_000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS credit_receipts ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, receipt_id BLOB NOT NULL UNIQUE,"
    " request_id TEXT NOT NULL, requester TEXT NOT NULL, stage TEXT NOT NULL,"
    " layer_first INTEGER NOT NULL, layer_last INTEGER NOT NULL, tokens INTEGER NOT NULL,"
    " credits INTEGER NOT NULL, issued REAL NOT NULL, stored_at REAL NOT NULL, body TEXT NOT NULL,"
    " UNIQUE (request_id, stage))",
    "CREATE INDEX IF NOT EXISTS credit_receipts_requester ON credit_receipts (requester)",
    "CREATE INDEX IF NOT EXISTS credit_receipts_stage ON credit_receipts (stage)",
    "CREATE TRIGGER IF NOT EXISTS credit_receipts_no_update BEFORE UPDATE ON credit_receipts"
    " BEGIN SELECT RAISE(ABORT, 'the credit ledger is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS credit_receipts_no_delete BEFORE DELETE ON credit_receipts"
    " BEGIN SELECT RAISE(ABORT, 'the credit ledger is append-only'); END",
    "CREATE TABLE IF NOT EXISTS credit_identities ("
    " peer_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, subnet TEXT, served INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS credit_standings ("
    " peer_id TEXT PRIMARY KEY, standing REAL NOT NULL, earned INTEGER NOT NULL, spent INTEGER NOT NULL,"
    " verified INTEGER NOT NULL, checked_at REAL NOT NULL, report TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS credit_pools ("
    " peer_id TEXT PRIMARY KEY, pool_id TEXT NOT NULL, version INTEGER NOT NULL, members TEXT NOT NULL,"
    " updated_at REAL NOT NULL)",
)


@dataclass(frozen=True)
class Totals:
    earned: int
    earned_count: int
    spent: int
    spent_count: int

    @property
    def balance(self) -> int:
        return self.earned - self.spent


@dataclass(frozen=True)
class Standing:
    """A known peer's latest checked report and the standing this node computed from it."""

    peer_id: str
    standing: float
    earned: int
    spent: int
    verified: bool
    checked_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "standing": round(self.standing, 3),
            "earned": self.earned,
            "spent": self.spent,
            "balance": self.earned - self.spent,
            "verified": self.verified,
            "checked_at": self.checked_at,
        }


class Ledger:
    """The credit tables of `<data_dir>/swarm.db` for the node `peer_id`."""

    def __init__(self, data_dir: Path, peer_id: str) -> None:
        self.path = prepare(data_dir, _SCHEMA)
        self.peer_id = peer_id
        self._tree_lock = threading.Lock()
        self._tree: tuple[int, list, list[Receipt]] | None = None  # (last seq, levels, receipts)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10)
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    # --- receipts -----------------------------------------------------------------------

    def add(self, receipt: Receipt) -> None:
        """Stores a receipt this node earned or signed; CreditError if it is neither or a replay.

        The caller has verified the signature (`Receipt.verify`)."""
        if self.peer_id not in (receipt.stage, receipt.requester):
            raise CreditError("the receipt neither pays nor is signed by this node")
        row = (
            receipt.receipt_id,
            receipt.request_id,
            receipt.requester,
            receipt.stage,
            receipt.layers[0],
            receipt.layers[1],
            receipt.tokens,
            receipt.credits,
            receipt.issued,
            time.time(),
            json.dumps(receipt.to_dict(), sort_keys=True),
        )
        try:
            with closing(self._connect()) as connection, connection:
                connection.execute(
                    "INSERT INTO credit_receipts (receipt_id, request_id, requester, stage, layer_first,"
                    " layer_last, tokens, credits, issued, stored_at, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
        except sqlite3.IntegrityError:
            raise CreditError(
                f"a receipt for request {receipt.request_id} at this stage is already recorded (replay)"
            ) from None

    def totals(self) -> Totals:
        earned, earned_count = self._sum("stage", self.peer_id)
        spent, spent_count = self.spent_by(self.peer_id)
        return Totals(earned, earned_count, spent, spent_count)

    def spent_by(self, peer_id: str) -> tuple[int, int]:
        """(credits, count) of the receipts `peer_id` signed that this node holds."""
        return self._sum("requester", peer_id)

    def _sum(self, column: str, peer_id: str) -> tuple[int, int]:
        """(credits, count) of the receipts whose `column` (stage or requester) is `peer_id`."""
        with closing(self._connect()) as connection:
            credits, count = connection.execute(
                f"SELECT COALESCE(SUM(credits), 0), COUNT(*) FROM credit_receipts WHERE {column} = ?",
                (peer_id,),
            ).fetchone()
        return int(credits), int(count)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest receipts, earned and spent, as dicts with a `direction`."""
        with closing(self._connect()) as connection:
            rows = connection.execute(
                "SELECT body, stored_at FROM credit_receipts ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        out = []
        for body, stored_at in rows:
            receipt = json.loads(body)
            receipt["direction"] = "earned" if receipt["stage"] == self.peer_id else "spent"
            receipt["credits"] = (receipt["layers"][1] - receipt["layers"][0]) * receipt["tokens"]
            receipt["stored_at"] = stored_at
            out.append(receipt)
        return out

    def earned_tree(self) -> tuple[list, list[Receipt]]:
        """The Merkle-sum levels over the earned receipts in ledger order, and the receipts.

        Receipts read once are kept: a call reads only the rows stored since the last one
        (the table is append-only, so earlier rows never change)."""
        with self._tree_lock:
            last, levels, receipts = self._tree if self._tree is not None else (0, [[]], [])
            with closing(self._connect()) as connection:
                rows = connection.execute(
                    "SELECT seq, body FROM credit_receipts WHERE stage = ? AND seq > ? ORDER BY seq",
                    (self.peer_id, last),
                ).fetchall()
            if rows or self._tree is None:
                receipts = receipts + [Receipt.from_dict(json.loads(body)) for _, body in rows]
                leaves = levels[0] + [leaf(r.receipt_id, r.credits) for r in receipts[len(levels[0]) :]]
                levels = merkle_levels(leaves)
                last = rows[-1][0] if rows else last
                self._tree = (last, levels, receipts)
            return levels, receipts

    def report(self, identity: Any, network_id: str) -> BalanceReport:
        """This node's signed balance report."""
        levels, receipts = self.earned_tree()
        spent, spent_count = self.spent_by(self.peer_id)
        return BalanceReport.create(
            identity,
            network_id,
            root=root_of(levels),
            earned_count=len(receipts),
            spent=spent,
            spent_count=spent_count,
        )

    # --- identities -----------------------------------------------------------------------

    def see(self, peer_id: str, *, subnet: str | None = None, served: bool = False) -> None:
        """Notes that `peer_id` was seen now (first sight is kept), its subnet, and if it earned."""
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT INTO credit_identities (peer_id, first_seen, subnet, served) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (peer_id) DO UPDATE SET subnet = COALESCE(excluded.subnet, subnet),"
                " served = MAX(served, excluded.served)",
                (peer_id, time.time(), subnet, int(served)),
            )

    def identity(self, peer_id: str) -> tuple[float | None, str | None, bool]:
        """(first seen, subnet, seen earning) of a peer; (None, None, False) if never seen."""
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT first_seen, subnet, served FROM credit_identities WHERE peer_id = ?", (peer_id,)
            ).fetchone()
        return (row[0], row[1], bool(row[2])) if row else (None, None, False)

    # --- standings ------------------------------------------------------------------------

    def record_standing(self, report: BalanceReport, standing: float, *, verified: bool) -> None:
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT INTO credit_standings (peer_id, standing, earned, spent, verified, checked_at, report)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET"
                " standing = excluded.standing, earned = excluded.earned, spent = excluded.spent,"
                " verified = excluded.verified, checked_at = excluded.checked_at, report = excluded.report",
                (
                    report.peer_id,
                    standing,
                    report.earned,
                    report.spent,
                    int(verified),
                    time.time(),
                    json.dumps(report.to_dict()),
                ),
            )
            connection.execute(
                "DELETE FROM credit_standings WHERE peer_id NOT IN"
                " (SELECT peer_id FROM credit_standings ORDER BY checked_at DESC LIMIT ?)",
                (MAX_STANDINGS,),
            )

    def standings(self, limit: int = MAX_STANDINGS) -> list[Standing]:
        """Known peers' standings, highest first."""
        with closing(self._connect()) as connection:
            rows = connection.execute(
                "SELECT peer_id, standing, earned, spent, verified, checked_at FROM credit_standings"
                " ORDER BY standing DESC, peer_id LIMIT ?",
                (limit,),
            ).fetchall()
        return [_standing(row) for row in rows]

    def record_pool(self, peer_id: str, pool_id: str, version: int, members: frozenset[str]) -> None:
        """Notes the pool `peer_id` showed it is a member of (the caller verified the state)."""
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "INSERT INTO credit_pools (peer_id, pool_id, version, members, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (peer_id) DO UPDATE SET pool_id = excluded.pool_id, version = excluded.version,"
                " members = excluded.members, updated_at = excluded.updated_at"
                " WHERE excluded.pool_id != pool_id OR excluded.version >= version",
                (peer_id, pool_id, version, json.dumps(sorted(members)), time.time()),
            )

    def pool_of(self, peer_id: str) -> tuple[str, frozenset[str]] | None:
        """(pool id, member peer ids) of the pool `peer_id` showed, or None."""
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT pool_id, members FROM credit_pools WHERE peer_id = ?", (peer_id,)
            ).fetchone()
        return (row[0], frozenset(json.loads(row[1]))) if row else None

    def standing_of(self, peer_id: str) -> Standing | None:
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT peer_id, standing, earned, spent, verified, checked_at FROM credit_standings"
                " WHERE peer_id = ?",
                (peer_id,),
            ).fetchone()
        return _standing(row) if row else None


def _standing(row: tuple) -> Standing:
    """A Standing from a `credit_standings` row (peer_id, standing, earned, spent, verified, checked_at)."""
    return Standing(row[0], float(row[1]), int(row[2]), int(row[3]), bool(row[4]), float(row[5]))
