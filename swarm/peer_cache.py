"""The peer cache: DHT peers seen recently, kept across restarts to bootstrap from.

Owns the `peer_cache` table in `<data_dir>/swarm.db` (SQLite, WAL mode). Other modules
keep their own tables in the same file, so this one touches only its table. Every call
opens a short-lived connection and one short transaction, so any thread (or process) may
use it. At most `MAX_ROWS` rows are kept; the least recently seen go first.

Imports only the standard library: never jax or numpy.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from swarm.db import prepare

MAX_ROWS = 200


@dataclass(frozen=True)
class CachedPeer:
    peer_id: str
    host: str
    port: int  # DHT UDP port
    network_id: str
    last_seen: float  # unix time
    source: str  # how the peer was first found: bootstrap, invite, mdns, exchange, cache, contact


class PeerCache:
    """The `peer_cache` table of `<data_dir>/swarm.db`."""

    def __init__(self, data_dir: Path) -> None:
        self.path = prepare(
            data_dir,
            [
                "CREATE TABLE IF NOT EXISTS peer_cache ("
                "peer_id TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL, "
                "network_id TEXT NOT NULL, last_seen REAL NOT NULL, source TEXT NOT NULL)"
            ],
        )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def remember(self, peer_id: str, host: str, port: int, network_id: str, source: str) -> None:
        """Records that `peer_id` answered at `host:port` just now."""
        self.remember_many([CachedPeer(peer_id, host, port, network_id, time.time(), source)])

    def remember_many(self, peers: Iterable[CachedPeer]) -> None:
        """Records several peers in one transaction; a known peer keeps its first `source`."""
        rows = [(p.peer_id, p.host, p.port, p.network_id, p.last_seen, p.source) for p in peers]
        if not rows:
            return
        with closing(self._connect()) as connection, connection:
            connection.executemany(
                "INSERT INTO peer_cache (peer_id, host, port, network_id, last_seen, source) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET "
                "host = excluded.host, port = excluded.port, network_id = excluded.network_id, "
                "last_seen = MAX(last_seen, excluded.last_seen)",
                rows,
            )
            connection.execute(
                "DELETE FROM peer_cache WHERE peer_id NOT IN "
                "(SELECT peer_id FROM peer_cache ORDER BY last_seen DESC LIMIT ?)",
                (MAX_ROWS,),
            )

    def recent(self, network_id: str, limit: int = MAX_ROWS) -> list[CachedPeer]:
        """The peers of `network_id`, most recently seen first."""
        with closing(self._connect()) as connection:
            rows = connection.execute(
                "SELECT peer_id, host, port, network_id, last_seen, source FROM peer_cache "
                "WHERE network_id = ? ORDER BY last_seen DESC LIMIT ?",
                (network_id, limit),
            ).fetchall()
        return [CachedPeer(*row) for row in rows]
