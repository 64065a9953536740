"""`<data_dir>/swarm.db`: the one SQLite file the peer cache, the pool and the credit
ledger keep their tables in (`swarm.peer_cache`, `swarm.pool`, `swarm.ledger`).

Owns the file's name and its set-up: WAL mode, so a reader in one process never blocks a
writer in another, and each module's `CREATE ... IF NOT EXISTS` statements. Each module
opens its own short-lived connections and touches only its own tables. Imports only the
standard library.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

DB_FILE = "swarm.db"


def prepare(data_dir: Path, schema: Iterable[str]) -> Path:
    """The path of `data_dir`'s database, created if needed, in WAL mode, with `schema` run."""
    path = Path(data_dir) / DB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, timeout=10)) as connection, connection:
        connection.execute("PRAGMA journal_mode=WAL")
        for statement in schema:
            connection.execute(statement)
    return path
