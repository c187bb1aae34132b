"""The Redis store: every instance sees the same keys; one outage for it and the counters."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from dialproxy.counting.rediscounters import uncancelled
from dialproxy.counting.storage import StorageHealth
from dialproxy.errors import StoreUnavailable
from dialproxy.sharedkeys.model import Changes, SharedKey
from dialproxy.sharedkeys.store import parse_time as _time
from dialproxy.sharedkeys.store import unavailable as _unavailable
from dialproxy.text import iso

# A shared key's lookup waits this long at most while Redis does not answer; only the calls
# in flight when an outage starts wait (see StorageHealth), the later ones skip Redis.
REDIS_CONNECT_TIMEOUT = 0.5
REDIS_TIMEOUT = 1.0


_UPDATE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
"""
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HINCRBY', KEYS[1], 'utilized', ARGV[1])
"""
# ARGV[1] added to utilized unless the cap (tokens >= 0) is reached: 1, else 0 (-1: gone).
_RESERVE = """
local cap = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if cap == nil then return -1 end
if cap >= 0 and tonumber(redis.call('HGET', KEYS[1], 'utilized') or '0') >= cap then
    return 0
end
redis.call('HINCRBY', KEYS[1], 'utilized', ARGV[1])
return 1
"""


async def _resolved(value: Any) -> Any:
    """redis-py types every command as sync-or-async; the asyncio client's are awaitable."""
    return await value if inspect.isawaitable(value) else value


def _from_hash(fields: Mapping[str, str]) -> SharedKey | None:
    if not fields or "owner" not in fields:
        return None
    return SharedKey(
        id=fields["id"],
        digest=fields["digest"],
        owner=fields["owner"],
        name=fields["name"],
        tokens=int(fields["tokens"]),
        utilized=int(fields.get("utilized", "0")),
        expires_at=_time(fields.get("expires_at")),
        created_at=_time(fields.get("created_at")),
    )


class RedisSharedKeyStore:
    """Redis: ``{prefix}k:<digest>`` a hash per key, ``{prefix}i:<id>`` -> digest, and
    ``{prefix}o:<owner digest>`` the set of an owner's ids.  Every instance sees them."""

    def __init__(
        self, url: str, prefix: str = "dp:sk:", client: redis.asyncio.Redis | None = None
    ) -> None:
        self.url = url
        self.prefix = prefix
        # The process's one Redis client (the counters'), else one of its own.
        self._shared_client = client
        # Up or down (set by setup(): the counters' when they are in Redis too).  While it is
        # down, calls fail at once; a call that fails marks it down.
        self.health: StorageHealth | None = None
        self._client: redis.asyncio.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}

    @property
    def client(self) -> redis.asyncio.Redis:
        assert self._client is not None, "start() first"
        return self._client

    def _k(self, digest: str) -> str:
        return f"{self.prefix}k:{digest}"

    def _i(self, key_id: str) -> str:
        return f"{self.prefix}i:{key_id}"

    def _o(self, owner: str) -> str:
        return f"{self.prefix}o:{owner}"

    async def start(self) -> None:
        if self._shared_client is not None:
            self._client = self._shared_client
        else:
            self._client = self._own_client()
        self._scripts = {
            name: self._client.register_script(lua)
            for name, lua in (
                ("update", _UPDATE),
                ("delete", _DELETE),
                ("add", _ADD),
                ("reserve", _RESERVE),
            )
        }

    def _own_client(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            # Never retried (redis-py retries 3 times by default): a call that failed is an
            # outage, and a retried HINCRBY could count twice.
            retry=Retry(NoBackoff(), 0),
        )

    async def close(self) -> None:
        if self._client is not None and self._client is not self._shared_client:
            await self._client.aclose()
        self._client = None

    async def probe(self) -> None:
        """The check that Redis answers again (fresh connections, then a PING)."""
        await self.client.connection_pool.disconnect()
        await _resolved(self.client.ping())

    async def _call(self, command: Callable[[], Any]) -> Any:
        """``command()`` (a redis-py call), unless Redis is known to be down."""
        health = self.health
        if health is not None and not health.healthy:
            raise _unavailable()
        try:
            return await uncancelled(_resolved(command()))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            if health is None:
                raise _unavailable(e) from None
            health.failed(e, "shared_keys")  # Redis is down (logged once per outage)
            raise _unavailable() from None
        except redis.RedisError as e:  # Redis answered with an error: this call's alone
            raise _unavailable(e) from None

    async def call(self, command: Callable[[], Any]) -> Any:
        """A call of another user of this Redis (the per-request keys), under the same
        health: 503 (:class:`StoreUnavailable`) while Redis is down or when it fails."""
        return await self._call(command)

    async def find(self, digest: str) -> SharedKey | None:
        fields = await self._call(lambda: self.client.hgetall(self._k(digest)))
        return _from_hash(cast(dict[str, str], fields))

    async def _digest(self, key_id: str) -> str | None:
        return cast(str | None, await self._call(lambda: self.client.get(self._i(key_id))))

    async def get(self, owner: str, key_id: str) -> SharedKey | None:
        digest = await self._digest(key_id)
        key = await self.find(digest) if digest else None
        return key if key is not None and key.owner == owner else None

    async def list(self, owner: str) -> list[SharedKey]:
        ids = cast(set[str], await self._call(lambda: self.client.smembers(self._o(owner))))
        out = []
        for key_id in sorted(ids):
            key = await self.get(owner, key_id)
            if key is not None:
                out.append(key)
        return out

    async def create(self, key: SharedKey) -> None:
        fields = {
            "id": key.id,
            "digest": key.digest,
            "owner": key.owner,
            "name": key.name,
            "tokens": str(key.tokens),
            "utilized": str(key.utilized),
            "expires_at": iso(key.expires_at) if key.expires_at else "",
            "created_at": iso(key.created_at) if key.created_at else "",
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._k(key.digest), mapping=cast(Any, fields))
        pipe.set(self._i(key.id), key.digest)
        pipe.sadd(self._o(key.owner), key.id)
        await self._call(pipe.execute)

    async def update(self, owner: str, key_id: str, changes: Changes) -> SharedKey | None:
        digest = await self._digest(key_id)
        if digest is None:
            return None
        args: list[str] = [owner]
        if changes.name is not None:
            args += ["name", changes.name]
        if changes.tokens is not None:
            args += ["tokens", str(changes.tokens)]
        if changes.set_expires_at:
            args += ["expires_at", iso(changes.expires_at) if changes.expires_at else ""]
        if len(args) > 1:
            script = self._scripts["update"]
            if not await self._call(lambda: script(keys=[self._k(digest)], args=args)):
                return None
        return await self.get(owner, key_id)

    async def delete(self, owner: str, key_id: str) -> bool:
        digest = await self._digest(key_id)
        if digest is None:
            return False
        script = self._scripts["delete"]
        keys = [self._k(digest), self._i(key_id), self._o(owner)]
        return bool(await self._call(lambda: script(keys=keys, args=[owner, key_id])))

    async def reserve(self, key: SharedKey, tokens: int) -> bool:
        script = self._scripts["reserve"]
        args = [tokens]
        return int(await self._call(lambda: script(keys=[self._k(key.digest)], args=args))) != 0

    async def add_utilized(self, key: SharedKey, tokens: int) -> None:
        if tokens == 0:
            return
        script = self._scripts["add"]
        with contextlib.suppress(StoreUnavailable):  # logged
            await self._call(lambda: script(keys=[self._k(key.digest)], args=[tokens]))
