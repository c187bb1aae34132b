"""Shared keys (after AI Horde): keys that a ``canShare`` key hands out to others.

A shared key acts with its owner's project and roles: it is bound by the owner's limits,
per-key quotas and model restriction, and consumes the owner's counters.  Its own ``tokens``
cap (-1: none) stops it, and only it, once ``utilized >= tokens``.  It is tied to its owner
by the owner key's digest, which is looked up in the *current* config snapshot on every
request: when the owner key is removed, disabled, expired or loses ``canShare``, its shared
keys stop working with it.

The secret (``dps_`` + 43 base62 characters) is shown once, when the key is created; stores
keep only its SHA-256.  Two stores behind one protocol, chosen by the counter storage:
SQLite (stdlib; one proxy process per file, for memory counters) and Redis (every instance
sees the same keys).  While Redis is down (the counters' :class:`StorageHealth`, shared),
lookups follow the ``--storage-failure`` policy without waiting for it (see
:class:`SharedKeys`).

HTTP: ``POST/GET /v1/sharedkeys``, ``GET/PATCH/DELETE /v1/sharedkeys/{id}``, for the owner
key only (a shared key is refused with 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import redis.asyncio
import structlog
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from dialproxy import perrequest
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import key_digest
from dialproxy.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ProxyError,
)
from dialproxy.keys import SHARED_KEY_PREFIX, iso, new_secret, parse_datetime
from dialproxy.rediscounters import RedisCounters, uncancelled
from dialproxy.settings import Settings
from dialproxy.statefile import StateDb
from dialproxy.storage import RETRY_AFTER, FailurePolicy, StorageHealth
from dialproxy.web.appkeys import BACKGROUND, LIMITER, SETTINGS, SHARED, STORE
from dialproxy.web.body import read_json_body
from dialproxy.web.guard import guarded, json_response

log = structlog.get_logger("dialproxy.sharedkeys")
Clock = Callable[[], datetime]
STATE_FILE = "dialproxy-state.sqlite"
MAX_TOKENS = 2**62
MAX_NAME = 200
_MAX_BODY = 64 * 1024
# A shared key's lookup waits this long at most while Redis does not answer; only the calls
# in flight when an outage starts wait (see StorageHealth), the later ones skip Redis.
REDIS_CONNECT_TIMEOUT = 0.5
REDIS_TIMEOUT = 1.0
# Under `local` and `allow`, while Redis is down, a shared key this instance found in the
# last hour still works as it was then (at most this many are remembered, the latest used).
REMEMBER_SECONDS = 3600.0
REMEMBER_KEYS = 10_000
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SharedKey:
    """One shared key.  ``owner`` is the owner key's digest; the secret is not kept."""

    id: str
    digest: str
    owner: str
    name: str
    tokens: int  # cap on the tokens used through it in total; -1: no cap of its own
    utilized: int = 0
    expires_at: datetime | None = None
    created_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def capped(self) -> bool:
        return 0 <= self.tokens <= self.utilized

    def public(self, project: str) -> dict[str, Any]:
        """What the API shows of it (never the secret)."""
        return {
            "id": self.id,
            "name": self.name,
            "project": project,
            "tokens": self.tokens,
            "utilized": self.utilized,
            "expiresAt": iso(self.expires_at) if self.expires_at else None,
        }


@dataclass(frozen=True, slots=True)
class Changes:
    """A PATCH: the fields to set (``set_expires_at`` with ``expires_at=None`` removes it)."""

    name: str | None = None
    tokens: int | None = None
    expires_at: datetime | None = None
    set_expires_at: bool = False

    def apply(self, key: SharedKey) -> SharedKey:
        return replace(
            key,
            name=key.name if self.name is None else self.name,
            tokens=key.tokens if self.tokens is None else self.tokens,
            expires_at=self.expires_at if self.set_expires_at else key.expires_at,
        )


class StoreUnavailable(ProxyError):
    status = 503


class SharedKeyCapReached(ProxyError):
    status = 429


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


def _unavailable(e: BaseException | None = None) -> StoreUnavailable:
    """The 503 of a store that did not answer; ``e`` is logged (not when an outage of the
    shared storage is logged once by its :class:`StorageHealth` instead)."""
    if e is not None:
        log.error("shared_key_store_error", error=type(e).__name__, detail=str(e)[:200])
    return StoreUnavailable(
        "The shared key store is unavailable", headers={"Retry-After": str(RETRY_AFTER)}
    )


def _time(value: str | None) -> datetime | None:
    return parse_datetime(value) if value else None


# --- SQLite ---------------------------------------------------------------------------------

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


# --- Redis ----------------------------------------------------------------------------------

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


# --- what the app holds ---------------------------------------------------------------------


class SharedKeys:
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
        self.per_request: perrequest.PerRequestKeys | None = None
        self._seen: dict[str, tuple[SharedKey, datetime]] = {}  # digest -> key, when found
        self.fallbacks = 0  # lookups answered from what was seen, while the store was down

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
        try:
            held = await self.store.reserve(key, tokens)
        except StoreUnavailable:
            check_cap(key)
            return 0
        if not held:
            check_cap(replace(key, utilized=max(key.utilized, key.tokens)))
        self._remember_use(key, tokens)
        return tokens

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


def check_cap(key: SharedKey) -> None:
    """Before forwarding: 429 once the shared key's own token cap is used up."""
    if key.capped:
        raise SharedKeyCapReached(
            f"The shared key's token cap is reached: {key.utilized} / {key.tokens} tokens "
            "used. Its owner can raise the cap.",
            extra={"limit_type": "shared_key_tokens"},
        )


def state_path(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The SQLite file: ``settings.state``, else ``DIALPROXY_STATE``, else
    ``dialproxy-state.sqlite`` next to the first config file."""
    env = os.environ if env is None else env
    explicit = settings.state or env.get("DIALPROXY_STATE")
    if explicit:
        return Path(explicit)
    first = settings.config_paths[0] if settings.config_paths else "aidial.config.json"
    return Path(first).resolve().parent / STATE_FILE


def store_for(settings: Settings, counters: object = None) -> SharedKeyStore:
    """Redis when the counters are in Redis (every instance sees the keys; on the counters'
    client when they are given: one Redis client a process), else SQLite."""
    uri = settings.storage.removeprefix("async+")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    client = counters.client if isinstance(counters, RedisCounters) else None
    if scheme in ("redis", "rediss"):
        return RedisSharedKeyStore(uri, client=client)
    if scheme == "redis+unix":  # the limits library's spelling; redis-py's is unix://
        return RedisSharedKeyStore("unix://" + uri.split("://", 1)[1], client=client)
    return SqliteSharedKeyStore(state_path(settings))


def setup(app: web.Application) -> None:
    """Create the store (by the app's settings), open and close it with the app, and add the
    ``/v1/sharedkeys`` routes.  A Redis store shares the counters' :class:`StorageHealth`
    when they are in Redis too (one outage, one log, one probe), else has one of its own."""
    settings = app[SETTINGS]
    store = store_for(settings, app[LIMITER].storage)
    health = None
    if isinstance(store, RedisSharedKeyStore):
        guard = app[LIMITER].guard
        if guard.backend == "redis":
            health = guard.state
        else:  # (memory counters with a Redis store: tests build that)
            health = StorageHealth("redis", settings.storage_failure)
        health.add_probe(store.probe)
        store.health = health
    app[SHARED] = SharedKeys(store, health=health)
    app[SHARED].per_request = perrequest.PerRequestKeys(
        store if isinstance(store, RedisSharedKeyStore) else None
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = app[SHARED].store
        await store.start()
        yield
        background = app[BACKGROUND]
        pending = list(background)  # usage records still adding to utilized
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if health is not None:
            await health.close()  # (no probe of a closed store)
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/sharedkeys", guarded(create))
    app.router.add_get("/v1/sharedkeys", guarded(list_keys))
    app.router.add_get("/v1/sharedkeys/{id}", guarded(get))
    app.router.add_patch("/v1/sharedkeys/{id}", guarded(update))
    app.router.add_delete("/v1/sharedkeys/{id}", guarded(delete))


# --- HTTP -----------------------------------------------------------------------------------


class Invalid(BadRequest):
    """400 naming the field that is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"Invalid field '{field}': {message}", extra={"field": field})


async def _owner(request: web.Request) -> tuple[Principal, SharedKeys]:
    shared = request.app[SHARED]
    snapshot = request.app[STORE].snapshot
    principal = await authenticate(request.headers, snapshot, request.remote, shared)
    if principal.shared is not None:
        raise Forbidden("A shared key cannot create, change or list shared keys")
    if principal.per_request:
        raise Forbidden("A per-request key cannot create, change or list shared keys")
    if not principal.key.can_share:
        raise Forbidden('This key may not share: its config entry has no "canShare": true')
    return principal, shared


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json_body(request, _MAX_BODY)
    for field in body:
        if field not in ("name", "tokens", "expiresAt"):
            raise Invalid(field, "unknown field (expected name, tokens, expiresAt)")
    return body


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("name", "must be a non-empty string")
    if len(value) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Invalid("name", f"at most {MAX_NAME} characters, no control characters")
    return value


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_TOKENS:
        raise Invalid("tokens", "must be an integer: the cap on tokens, or -1 for no cap")
    return value


def _expires(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid("expiresAt", "must be an ISO 8601 date-time such as 2026-01-01T00:00:00Z")
    try:
        when = parse_datetime(value)
    except ValueError:
        raise Invalid(
            "expiresAt", "must be an ISO 8601 date-time such as 2026-01-01T00:00:00Z"
        ) from None
    if when <= now:
        raise Invalid("expiresAt", "must be in the future")
    return when


async def create(request: web.Request) -> web.Response:
    """``POST /v1/sharedkeys``: 201 with the secret in ``key`` (shown this once)."""
    principal, shared = await _owner(request)
    body = await _body(request)
    for field in ("name", "tokens"):
        if field not in body:
            raise Invalid(field, "required")
    now = shared.now()
    secret = new_secret(SHARED_KEY_PREFIX)
    key = SharedKey(
        id=str(uuid.uuid4()),
        digest=key_digest(secret),
        owner=principal.key.digest,
        name=_name(body["name"]),
        tokens=_tokens(body["tokens"]),
        expires_at=_expires(body.get("expiresAt"), now),
        created_at=now,
    )
    await shared.store.create(key)
    log.info(
        "shared_key_created",
        id=key.id,
        owner=principal.fingerprint,
        project=principal.project,
        tokens=key.tokens,
        expires_at=iso(key.expires_at) if key.expires_at else None,
    )
    data = {"id": key.id, "key": secret} | key.public(principal.project)
    return json_response(data, 201, {"Location": f"/v1/sharedkeys/{key.id}"})


async def list_keys(request: web.Request) -> web.Response:
    """``GET /v1/sharedkeys``: the caller's shared keys, oldest first."""
    principal, shared = await _owner(request)
    keys = await shared.store.list(principal.key.digest)
    keys.sort(key=lambda k: (k.created_at or datetime.min.replace(tzinfo=UTC), k.id))
    return json_response({"data": [k.public(principal.project) for k in keys]})


async def get(request: web.Request) -> web.Response:
    principal, shared = await _owner(request)
    key_id = request.match_info["id"]
    key = await shared.store.get(principal.key.digest, key_id)
    if key is None:
        raise NotFound(f"Unknown shared key: {key_id}")
    return json_response(key.public(principal.project))


async def update(request: web.Request) -> web.Response:
    """``PATCH /v1/sharedkeys/{id}``: ``tokens`` (a new cap), ``expiresAt`` (null removes
    it), ``name``."""
    principal, shared = await _owner(request)
    key_id = request.match_info["id"]
    body = await _body(request)
    changes = Changes(
        name=_name(body["name"]) if "name" in body else None,
        tokens=_tokens(body["tokens"]) if "tokens" in body else None,
        expires_at=_expires(body.get("expiresAt"), shared.now()),
        set_expires_at="expiresAt" in body,
    )
    key = await shared.store.update(principal.key.digest, key_id, changes)
    if key is None:
        raise NotFound(f"Unknown shared key: {key_id}")
    log.info(
        "shared_key_updated",
        id=key.id,
        owner=principal.fingerprint,
        fields=sorted(body),
        tokens=key.tokens,
    )
    return json_response(key.public(principal.project))


async def delete(request: web.Request) -> web.Response:
    """``DELETE /v1/sharedkeys/{id}``: it stops working at once."""
    principal, shared = await _owner(request)
    key_id = request.match_info["id"]
    if not await shared.store.delete(principal.key.digest, key_id):
        raise NotFound(f"Unknown shared key: {key_id}")
    log.info("shared_key_deleted", id=key_id, owner=principal.fingerprint)
    return web.Response(status=204)
