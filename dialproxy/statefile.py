"""The SQLite files beside the state file (shared keys, the usage ledger): opened, used from
worker threads and closed one way."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

from dialproxy.settings import Settings

STATE_FILE = "dialproxy-state.sqlite"


def state_path(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The state file: ``settings.state``, else ``DIALPROXY_STATE``, else
    ``dialproxy-state.sqlite`` next to the first config file (the shared keys' SQLite store;
    the usage ledger's file is named after it)."""
    env = os.environ if env is None else env
    explicit = settings.state or env.get("DIALPROXY_STATE")
    if explicit:
        return Path(explicit)
    first = settings.config_paths[0] if settings.config_paths else "aidial.config.json"
    return Path(first).resolve().parent / STATE_FILE


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


class StateDb:
    """One such file, opened on first use: :meth:`connect` and the calls on what it returns
    run under :attr:`lock` (in a worker thread, off the event loop)."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self.schema = schema
        self.lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def connect(self, create: bool = True) -> sqlite3.Connection | None:
        """The open connection; None when the file does not exist and ``create`` is false."""
        if self._db is None:
            if not create and not self.path.exists():
                return None
            self._db = open_db(self.path, self.schema)
        return self._db

    async def close(self) -> None:
        def close() -> None:
            with self.lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)
