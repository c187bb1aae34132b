"""Where shared keys live: the protocol both stores follow, and the 503 of one that fails."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import structlog

from dialproxy.errors import RETRY_AFTER, StoreUnavailable
from dialproxy.sharedkeys.model import Changes, SharedKey
from dialproxy.text import parse_datetime

log = structlog.get_logger("dialproxy.sharedkeys")


class SharedKeyStore(Protocol):
    """Where shared keys live.  Every method may raise :class:`StoreUnavailable`, except
    :meth:`add_utilized`, which logs its failures (it runs after the response)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def find(self, digest: str) -> SharedKey | None: ...
    async def get(self, owner: str, key_id: str) -> SharedKey | None: ...
    async def list(self, owner: str) -> list[SharedKey]: ...
    async def create(self, key: SharedKey) -> None: ...
    async def update(self, owner: str, key_id: str, changes: Changes) -> SharedKey | None: ...
    async def delete(self, owner: str, key_id: str) -> bool: ...
    async def add_utilized(self, key: SharedKey, tokens: int) -> None: ...

    async def reserve(self, key: SharedKey, tokens: int) -> bool: ...


def unavailable(e: BaseException | None = None) -> StoreUnavailable:
    """The 503 of a store that did not answer; ``e`` is logged (not when an outage of the
    shared storage is logged once by its :class:`StorageHealth` instead)."""
    if e is not None:
        log.error("shared_key_store_error", error=type(e).__name__, detail=str(e)[:200])
    return StoreUnavailable(
        "The shared key store is unavailable", headers={"Retry-After": str(RETRY_AFTER)}
    )


def parse_time(value: str | None) -> datetime | None:
    return parse_datetime(value) if value else None
