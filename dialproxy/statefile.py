"""The SQLite files beside the state file (shared keys, the usage ledger): opened one way."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """``path`` opened (made, readable by its owner only, if new) in WAL mode, for use from
    worker threads under the caller's lock, with ``schema`` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(schema)
    except sqlite3.Error:
        db.close()
        raise
    return db
