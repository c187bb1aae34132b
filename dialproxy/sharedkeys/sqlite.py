"""The SQLite store: one file, one proxy process (several instances need Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from dialproxy.errors import StoreUnavailable
from dialproxy.sharedkeys.model import Changes, SharedKey
from dialproxy.sharedkeys.store import parse_time as _time
from dialproxy.sharedkeys.store import unavailable as _unavailable
from dialproxy.statefile import StateDb
from dialproxy.text import iso

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shared_keys (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    utilized INTEGER NOT NULL DEFAULT 0,
    expires_at TEXT,
    created_at TEXT
);
CREATE INDEX IF NOT EXISTS shared_keys_owner ON shared_keys (owner);
"""
_COLUMNS = "id, digest, owner, name, tokens, utilized, expires_at, created_at"


def _row(row: tuple[Any, ...]) -> SharedKey:
    key_id, digest, owner, name, tokens, utilized, expires_at, created_at = row
    return SharedKey(
        key_id,
        digest,
        owner,
        name,
        int(tokens),
        int(utilized),
        _time(expires_at),
        _time(created_at),
    )


class SqliteSharedKeyStore:
    """SQLite (stdlib) in one file, read once at start into memory; writes go through to
    the file off the event loop.  One proxy process per file: several instances need Redis.
    The file is created only when the first shared key is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = StateDb(path, _SCHEMA)
        self._by_digest: dict[str, SharedKey] = {}
        self._by_id: dict[str, str] = {}

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            with self._file.lock:
                db = self._file.connect()
                assert db is not None  # (created when missing)
                return fn(db)

        try:
            return await asyncio.to_thread(call)
        except (sqlite3.Error, OSError) as e:
            raise _unavailable(e) from None

    async def start(self) -> None:
        if not self.path.exists():
            return

        def load(db: sqlite3.Connection) -> list[SharedKey]:
            return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM shared_keys")]

        for key in await self._run(load):
            self._by_digest[key.digest] = key
            self._by_id[key.id] = key.digest

    async def close(self) -> None:
        await self._file.close()

    async def find(self, digest: str) -> SharedKey | None:
        return self._by_digest.get(digest)

    async def get(self, owner: str, key_id: str) -> SharedKey | None:
        key = self._by_digest.get(self._by_id.get(key_id, ""))
        return key if key is not None and key.owner == owner else None

    async def list(self, owner: str) -> list[SharedKey]:
        return [k for k in self._by_digest.values() if k.owner == owner]

    async def create(self, key: SharedKey) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO shared_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.digest,
                    key.owner,
                    key.name,
                    key.tokens,
                    key.utilized,
                    iso(key.expires_at) if key.expires_at else None,
                    iso(key.created_at) if key.created_at else None,
                ),
            )

        await self._run(insert)
        self._by_digest[key.digest] = key
        self._by_id[key.id] = key.digest

    async def update(self, owner: str, key_id: str, changes: Changes) -> SharedKey | None:
        current = await self.get(owner, key_id)
        if current is None:
            return None
        wanted = changes.apply(current)

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE shared_keys SET name = ?, tokens = ?, expires_at = ? WHERE id = ?",
                (
                    wanted.name,
                    wanted.tokens,
                    iso(wanted.expires_at) if wanted.expires_at else None,
                    key_id,
                ),
            )

        await self._run(write)
        latest = self._by_digest.get(current.digest)  # utilized may have grown meanwhile
        if latest is None:
            return None
        self._by_digest[current.digest] = updated = changes.apply(latest)
        return updated

    async def delete(self, owner: str, key_id: str) -> bool:
        current = await self.get(owner, key_id)
        if current is None:
            return False
        await self._run(lambda db: db.execute("DELETE FROM shared_keys WHERE id = ?", (key_id,)))
        self._by_digest.pop(current.digest, None)
        self._by_id.pop(key_id, None)
        return True

    async def reserve(self, key: SharedKey, tokens: int) -> bool:
        """``tokens`` added to ``utilized`` unless the cap is reached: one step (the keys
        are this process's: checked and added in memory, then written)."""
        current = self._by_digest.get(key.digest)
        if current is not None and current.capped:
            return False
        await self.add_utilized(key, tokens)
        return True

    async def add_utilized(self, key: SharedKey, tokens: int) -> None:
        current = self._by_digest.get(key.digest)
        if current is None or tokens == 0:
            return
        utilized = max(current.utilized + tokens, 0)
        self._by_digest[key.digest] = replace(current, utilized=utilized)

        def add(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE shared_keys SET utilized = utilized + ? WHERE id = ?", (tokens, key.id)
            )

        with contextlib.suppress(StoreUnavailable):  # logged; the count in memory stands
            await self._run(add)
