"""``/v1/sharedkeys``: the owner key's five handlers, and the shared keys' wiring into the app
(the store chosen by the counter storage, opened and closed with the app)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from dialproxy import perrequest
from dialproxy.auth import Principal, authenticate
from dialproxy.counting.rediscounters import RedisCounters
from dialproxy.counting.storage import StorageHealth
from dialproxy.errors import Forbidden, InvalidField, NotFound
from dialproxy.settings import Settings
from dialproxy.sharedkeys.model import MAX_NAME, MAX_TOKENS, Changes, SharedKey
from dialproxy.sharedkeys.redisstore import RedisSharedKeyStore
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.sharedkeys.sqlite import SqliteSharedKeyStore
from dialproxy.sharedkeys.store import SharedKeyStore
from dialproxy.statefile import state_path
from dialproxy.text import (
    SHARED_KEY_PREFIX,
    has_control,
    iso,
    key_digest,
    lone_surrogate,
    new_secret,
    parse_datetime,
    within,
)
from dialproxy.web.appkeys import BACKGROUND, LIMITER, SETTINGS, SHARED, STORE
from dialproxy.web.body import read_json_body
from dialproxy.web.finish import held_done
from dialproxy.web.guard import guarded, json_response

log = structlog.get_logger("dialproxy.sharedkeys")
_MAX_BODY = 64 * 1024


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
    app[SHARED] = SharedKeys[perrequest.PerRequestKeys](store, health=health)
    app[SHARED].per_request = perrequest.PerRequestKeys(
        store if isinstance(store, RedisSharedKeyStore) else None
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = app[SHARED].store
        await store.start()
        yield
        await held_done(app[BACKGROUND])  # usage records still adding to utilized
        await app[SHARED].close()  # (the give-backs of requests cancelled mid-reservation)
        if health is not None:
            await health.close()  # (no probe of a closed store)
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/sharedkeys", guarded(create))
    app.router.add_get("/v1/sharedkeys", guarded(list_keys))
    app.router.add_get("/v1/sharedkeys/{id}", guarded(get))
    app.router.add_patch("/v1/sharedkeys/{id}", guarded(update))
    app.router.add_delete("/v1/sharedkeys/{id}", guarded(delete))


async def _owner(request: web.Request) -> tuple[Principal, SharedKeys[perrequest.PerRequestKeys]]:
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
            raise InvalidField(field, "unknown field (expected name, tokens, expiresAt)")
    return body


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidField("name", "must be a non-empty string")
    if len(value) > MAX_NAME or has_control(value) or lone_surrogate(value) is not None:
        raise InvalidField(
            "name", f"at most {MAX_NAME} characters, no control characters, valid Unicode"
        )
    return value


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_TOKENS:
        raise InvalidField("tokens", "must be an integer: the cap on tokens, or -1 for no cap")
    return value


def _expires(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(
            "expiresAt", "must be an ISO 8601 date-time such as 2026-01-01T00:00:00Z"
        )
    try:
        when = parse_datetime(value)
    except ValueError:
        raise InvalidField(
            "expiresAt", "must be an ISO 8601 date-time such as 2026-01-01T00:00:00Z"
        ) from None
    try:
        within(when, value)  # (stored in UTC: past the year 9999 it overflows)
    except ValueError as e:
        raise InvalidField("expiresAt", str(e)) from None
    if when <= now:
        raise InvalidField("expiresAt", "must be in the future")
    return when


async def create(request: web.Request) -> web.Response:
    """``POST /v1/sharedkeys``: 201 with the secret in ``key`` (shown this once)."""
    principal, shared = await _owner(request)
    body = await _body(request)
    for field in ("name", "tokens"):
        if field not in body:
            raise InvalidField(field, "required")
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
