"""Per-request keys (DIAL's): the ``Api-Key`` a deployment's adapter gets with each request.

DIAL Core never sends an adapter the client's key.  For every request it sends to a
deployment's ``endpoint`` it mints a fresh random key, valid while that request is in
flight, that authenticates calls back into the proxy (the adapter calling another
deployment, ``/v1/user/info``, the listings, the limits) **as the caller who started the
request**: same project, roles, per-key quotas and counters (and, for a shared key, the
same shared key), so that everything spent down the chain is charged to that caller.  A
call back that goes to an ``endpoint`` again gets a key of its own (each hop its own).

:func:`PerRequestKeys.mint` makes one for an outbound request (any deployment kind: a
model's adapter, an application, a route's upstream, a feature endpoint), and
:func:`PerRequestKeys.end` ends it when the request ends.  Only the SHA-256 of a key is
kept.  In process memory always (a call back that lands on the same instance never waits
for Redis); with Redis storage also in Redis (``dp:prk:<digest>`` -> the originator's key
digest and shared key digest, with a TTL as a safety net for a process that dies
mid-request), so that a call back landing on another instance works there too: it rebuilds
the originator from the same config.  Redis is the shared keys' client and follows the same
:class:`dialproxy.counting.storage.StorageHealth` (one outage for all): while it is down a key is
minted in memory only, and a key this instance does not know answers 503 (it may be valid
elsewhere: never a 401).

Lookups happen only for a secret with the :data:`PER_REQUEST_KEY_PREFIX` that the config
does not know: a request with a config key pays nothing for any of this.
"""

from __future__ import annotations

import secrets
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dialproxy.auth import PER_REQUEST_KEY_PREFIX, UNKNOWN_KEY, Principal
from dialproxy.config.model import Snapshot
from dialproxy.errors import Unauthorized
from dialproxy.text import key_digest

if TYPE_CHECKING:
    from dialproxy.sharedkeys.model import SharedKey

log = structlog.get_logger("dialproxy.perrequest")

# How long a key stays in Redis if nothing deletes it (its instance died mid-request): the
# safety net only; a key is deleted when its request ends.  A request still running after
# this long keeps its key on its own instance; on the others, it is gone (401).
REDIS_TTL = 3600
REDIS_PREFIX = "dp:prk:"


class RedisCalls(Protocol):
    """What the keys use of the shared keys' Redis store
    (:class:`dialproxy.sharedkeys.redisstore.RedisSharedKeyStore`): its client, and its calls that
    follow the storage's health (503 while Redis is down)."""

    @property
    def client(self) -> Any: ...

    async def call(self, command: Any) -> Any: ...


class SharedKeyByDigest(Protocol):
    async def find_digest(self, digest: str) -> SharedKey | None: ...


@dataclass(frozen=True, slots=True)
class _Origin:
    """Who a per-request key acts for: the originator's config key and the shared key it
    called with, if it did (by their digests: both are looked up again on every use)."""

    owner: str
    shared: str | None


def new_key() -> str:
    """A new per-request key: the prefix + 256 random bits (URL-safe base64)."""
    return PER_REQUEST_KEY_PREFIX + secrets.token_urlsafe(32)


class PerRequestKeys:
    """The per-request keys in flight (this instance's, and with Redis every instance's)."""

    def __init__(self, redis: RedisCalls | None = None, ttl: int = REDIS_TTL) -> None:
        self.redis = redis
        self.ttl = ttl
        self._live: dict[str, _Origin] = {}  # digest -> origin, the keys minted here

    def __len__(self) -> int:
        return len(self._live)

    async def mint(self, principal: Principal) -> str:
        """A new key for an outbound request made on ``principal``'s behalf (a per-request
        key's principal is its originator: the new key acts for the same caller)."""
        secret = new_key()
        digest = key_digest(secret)
        shared = principal.shared
        origin = _Origin(principal.key.digest, shared.digest if shared is not None else None)
        self._live[digest] = origin
        if self.redis is not None:
            value = origin.owner + ("|" + origin.shared if origin.shared else "")
            redis = self.redis
            try:
                await redis.call(lambda: redis.client.set(self._r(digest), value, ex=self.ttl))
            except Exception:  # (memory alone while Redis is down: calls back here work)
                pass
            except BaseException:  # (cancelled: nobody will end the key; in Redis, the TTL)
                del self._live[digest]
                raise
        return secret

    def end(self, secret: str) -> Coroutine[Any, Any, None] | None:
        """The request is over: the key stops working on this instance at once.  Returned
        (None without Redis): the work that deletes it from Redis, for the caller to run in
        the background (the answer need not wait for it; the TTL is the safety net)."""
        digest = key_digest(secret)
        self._live.pop(digest, None)
        return self._forget(digest) if self.redis is not None else None

    async def release(self, secret: str) -> None:
        """:meth:`end`, waiting for Redis too (never raises)."""
        work = self.end(secret)
        if work is not None:
            await work

    async def _forget(self, digest: str) -> None:
        redis = self.redis
        assert redis is not None
        try:
            await redis.call(lambda: redis.client.delete(self._r(digest)))
        except Exception as e:  # (an outage is logged once, by the storage's health)
            log.debug("per_request_key_not_deleted", error=type(e).__name__)

    async def principal(
        self,
        secret: str,
        snapshot: Snapshot,
        shared: SharedKeyByDigest,
        now: datetime,
    ) -> Principal:
        """The originator a per-request key acts for, from this snapshot (its key gone,
        disabled or expired since: 401), or 401 ``Unknown api key``.  The originator's
        address ranges are not checked again: the caller is the adapter, not the client."""
        digest = key_digest(secret)
        origin = self._live.get(digest)
        if origin is None and self.redis is not None:
            redis = self.redis
            value = await redis.call(lambda: redis.client.get(self._r(digest)))
            if value:
                owner, _, shared_digest = str(value).partition("|")
                origin = _Origin(owner, shared_digest or None)
        if origin is None:
            raise Unauthorized(UNKNOWN_KEY)
        key = snapshot.keys.get(origin.owner)
        if key is None:
            raise Unauthorized(UNKNOWN_KEY)
        timed = key.not_before is not None or key.expires_at is not None
        if (key.disabled or timed) and key.state(now) != "active":
            raise Unauthorized(UNKNOWN_KEY)
        found = None
        if origin.shared is not None:  # (deleted, expired or its owner unshared: over too)
            found = await shared.find_digest(origin.shared)
            if found is None or not key.can_share or not found.active(now):
                raise Unauthorized(UNKNOWN_KEY)
        return Principal(key, secret, found, per_request=True)

    def _r(self, digest: str) -> str:
        return REDIS_PREFIX + digest
