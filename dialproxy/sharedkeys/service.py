"""What the app holds of the shared keys: the store, the clock, and the lookups' policy
while the store's Redis is down."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Generic, TypeVar

import structlog

from dialproxy.counting.storage import FailurePolicy, StorageHealth
from dialproxy.errors import StoreUnavailable
from dialproxy.sharedkeys.model import SharedKey, check_cap
from dialproxy.sharedkeys.store import SharedKeyStore
from dialproxy.text import SHARED_KEY_PREFIX, key_digest

log = structlog.get_logger("dialproxy.sharedkeys")
Clock = Callable[[], datetime]
# Under `local` and `allow`, while Redis is down, a shared key this instance found in the
# last hour still works as it was then (at most this many are remembered, the latest used).
REMEMBER_SECONDS = 3600.0
REMEMBER_KEYS = 10_000
# What the app keeps beside the shared keys: the per-request keys in flight
# (:class:`dialproxy.perrequest.PerRequestKeys`), a type parameter rather than an import: they
# act as a Principal (dialproxy.auth), which stands above this package's model.
PerRequest = TypeVar("PerRequest")


class SharedKeys(Generic[PerRequest]):
    """The app's shared keys: the store, and the clock (None: the system clock; tests set
    one to move time).

    With ``health`` (the store is in Redis), lookups follow the ``--storage-failure`` policy
    while Redis is down, without waiting for it: ``deny``, 503; ``local`` and ``allow``, the
    keys found in the last :data:`REMEMBER_SECONDS` work as they were last seen (their own
    cap counted here meanwhile), any other shared key gets the 503.  A shared key acts as
    its owner, and only the store knows who that is: no policy can let an unknown one in.
    """

    def __init__(
        self,
        store: SharedKeyStore,
        clock: Clock | None = None,
        *,
        health: StorageHealth | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.health = health
        self.remembers = health is not None and health.policy is not FailurePolicy.DENY
        # The per-request keys in flight (set by setup(); in the same Redis when these are).
        self.per_request: PerRequest | None = None
        self._seen: dict[str, tuple[SharedKey, datetime]] = {}  # digest -> key, when found
        self.fallbacks = 0  # lookups answered from what was seen, while the store was down
        self._giving_back: set[asyncio.Task[None]] = set()  # (see _left)
        self._reserving: set[asyncio.Future[bool]] = set()  # (left by their callers)

    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    async def find(self, secret: str) -> SharedKey | None:
        """The shared key a secret names (only ``dps_`` secrets are looked up)."""
        if not secret.startswith(SHARED_KEY_PREFIX):
            return None
        return await self.find_digest(key_digest(secret))

    async def find_digest(self, digest: str) -> SharedKey | None:
        """The shared key of a digest (a per-request key's record names its shared key so)."""
        if not self.remembers:
            return await self.store.find(digest)
        seen = self._seen
        try:
            key = await self.store.find(digest)
        except StoreUnavailable:
            found = seen.get(digest)
            if found is None or (self.now() - found[1]).total_seconds() > REMEMBER_SECONDS:
                raise
            self.fallbacks += 1
            return found[0]
        seen.pop(digest, None)  # (re-inserted last: the oldest are dropped first)
        if key is not None:
            seen[digest] = (key, self.now())
            if len(seen) > REMEMBER_KEYS:
                del seen[next(iter(seen))]
        return key

    async def reserve(self, key: SharedKey, tokens: int) -> int:
        """Before forwarding: ``tokens`` held in the key's ``utilized`` (settled by
        :meth:`record` with the difference), or 429 when its cap is reached, in one step,
        so that requests arriving together see each other.  With the store down, the cap
        as the key was last seen.  Returns what it holds (0: nothing)."""
        if key.tokens < 0:
            return 0
        # (run to its end even when the request is cancelled, its client gone: what the
        # store took is then given back, not kept in utilized for ever)
        call = asyncio.ensure_future(self.store.reserve(key, tokens))
        try:
            held = await asyncio.shield(call)
        except StoreUnavailable:
            check_cap(key)
            return 0
        except asyncio.CancelledError:
            self._reserving.add(call)
            call.add_done_callback(self._reserving.discard)
            call.add_done_callback(functools.partial(self._left, key, tokens))
            raise
        if not held:
            check_cap(replace(key, utilized=max(key.utilized, key.tokens)))
        self._remember_use(key, tokens)
        return tokens

    async def close(self) -> None:
        """Once the reservations still being taken and given back are done (the store
        stays open: its owner closes it)."""
        while self._giving_back or self._reserving:
            await asyncio.gather(*self._giving_back, *self._reserving, return_exceptions=True)

    def _left(self, key: SharedKey, tokens: int, call: asyncio.Future[bool]) -> None:
        """A reservation whose request was cancelled before the store answered: when the
        store took it, it is given back (in a task of its own)."""
        if call.cancelled() or call.exception() is not None or not call.result():
            return
        task = asyncio.get_running_loop().create_task(self.store.add_utilized(key, -tokens))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    def _remember_use(self, key: SharedKey, tokens: int) -> None:
        """The remembered copy counts too, so that its cap goes on counting here while
        Redis is down."""
        found = self._seen.get(key.digest) if self.remembers else None
        if found is not None:
            utilized = max(found[0].utilized + tokens, 0)
            self._seen[key.digest] = (replace(found[0], utilized=utilized), found[1])

    async def record(self, key: SharedKey, tokens: int) -> None:
        """Add a finished request's tokens to ``utilized`` (runs after the response; less
        what :meth:`reserve` held: negative, given back)."""
        self._remember_use(key, tokens)
        try:
            await self.store.add_utilized(key, tokens)
        except Exception as e:  # never lose the owner's counters to this
            log.error("shared_key_record_failed", id=key.id, error=type(e).__name__)
