"""Shared keys over HTTP, on both stores (SQLite and a real Redis): their whole life, the
owner's limits binding them, the 403s and 404s, restarts, and no secret anywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from dialproxy.settings import Settings
from dialproxy.sharedkeys.model import SharedKey
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.sharedkeys.sqlite import SqliteSharedKeyStore
from dialproxy.statefile import STATE_FILE, state_path
from dialproxy.web.appkeys import BACKGROUND, SHARED
from tests.conftest import (
    SECRETS,
    Backend,
    Clock,
    Proxy,
    ProxyFactory,
    chat_model,
    new_key,
    utc_day_end,
)
from tests.redis_server import RedisServer

OWNER = new_key()
PLAIN = new_key()  # no canShare
OTHER_OWNER = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # 3 + 4 = 7 tokens
SHARED_SECRET = re.compile(r"dps_[A-Za-z0-9]{43}")


def config(backend: Backend, owner: dict[str, Any] | None = None, **role: Any) -> dict[str, Any]:
    return {
        "models": {
            "chat": chat_model(backend),
            "other": chat_model(backend),
            "embed": {
                "type": "embedding",
                "upstreams": [{"endpoint": backend.url("/v1/embeddings")}],
            },
        },
        "roles": {"user": {"limits": {"chat": role or {"day": 100_000}}}},
        "keys": {
            OWNER: {"project": "friends", "role": "user", "canShare": True} | (owner or {}),
            PLAIN: {"project": "plain", "role": "user"},
            OTHER_OWNER: {"project": "others", "role": "user", "canShare": True},
        },
    }


@pytest.fixture(params=["sqlite", "redis"])
def storage_uri(request: pytest.FixtureRequest) -> str:
    """The counter storage setting, which picks the shared key store."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        return server.url
    return "memory://"


class Shared:
    """A proxy with a controlled clock, and the calls the tests make on it."""

    def __init__(self, proxy: Proxy, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session
        self.clock = Clock()
        proxy.app[SHARED].clock = self.clock

    async def call(self, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
        resp = await self.session.request(
            method,
            self.proxy.url(path),
            headers={"Api-Key": key},
            json=body,
        )
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None

    async def create(self, key: str = OWNER, **body: Any) -> dict[str, Any]:
        status, data = await self.call("POST", "/v1/sharedkeys", key, body)
        assert status == 201, data
        SECRETS.append(data["key"])  # the session's logs are searched for it
        return dict(data)

    async def chat(self, key: str, model: str = "chat") -> tuple[int, Any]:
        status, data = await self.call(
            "POST", f"/openai/deployments/{model}/chat/completions", key, CHAT
        )
        await self.proxy.settle()
        return status, data


def settings_for(tmp_path: Path, storage: str) -> Settings:
    return Settings(config_paths=(str(tmp_path / "aidial.config.json"),), storage=storage)


@pytest.fixture
async def sk(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    storage_uri: str,
) -> Shared:
    """A proxy with the standard config and the storage under test."""
    return await start(make_proxy, session, config(backend), settings_for(tmp_path, storage_uri))


async def start(
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    cfg: dict[str, Any],
    settings: Settings,
) -> Shared:
    return Shared(await make_proxy(cfg, settings=settings), session)


async def test_the_whole_life_of_a_shared_key(
    sk: Shared,
) -> None:
    expires = (sk.clock.now + timedelta(days=2)).replace(microsecond=0)
    created = await sk.create(name="for my friend", tokens=10, expiresAt=expires.isoformat())
    secret = created.pop("key")
    assert SHARED_SECRET.fullmatch(secret)
    assert created == {
        "id": created["id"],
        "name": "for my friend",
        "project": "friends",
        "tokens": 10,
        "utilized": 0,
        "expiresAt": expires.isoformat().replace("+00:00", "Z"),
    }

    # It works in place of a key: generation, listings, its user info and limits.
    assert (await sk.chat(secret))[0] == 200
    status, info = await sk.call("GET", "/v1/user/info", secret)
    assert (status, info) == (200, {"project": "friends", "roles": ["user"]})
    status, models = await sk.call("GET", "/openai/models", secret)
    assert status == 200 and {m["id"] for m in models["data"]} == {"chat", "other", "embed"}
    status, embedded = await sk.call(
        "POST", "/openai/deployments/embed/embeddings", secret, {"input": "hi"}
    )
    assert status == 200 and embedded["data"]
    status, limits = await sk.call("GET", "/v1/user/limits", secret)
    assert status == 200
    assert limits["sharedKey"] | {"id": "-"} == {
        "id": "-",
        "name": "for my friend",
        "project": "friends",
        "tokens": 10,
        "utilized": 7 + 1,  # the chat, and the embedding's one token
        "expiresAt": created["expiresAt"],
        "remaining": 2,
        "capReached": False,
    }
    status, day = await sk.call("GET", "/v1/deployments/chat/limits", secret)
    assert status == 200 and day["dayTokenStats"] == {
        "total": 100_000,
        "used": 7,
        "resetsAt": utc_day_end(),
    }

    # The owner sees it (never its secret); the cap stops it, and only it.
    status, listed = await sk.call("GET", "/v1/sharedkeys", OWNER)
    assert status == 200 and [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0] and listed["data"][0]["utilized"] == 8
    assert (await sk.chat(secret))[0] == 200  # 8 < 10: admitted, and it overshoots to 15
    status, error = await sk.chat(secret)
    assert status == 429
    assert error["error"]["message"] == (
        "The shared key's token cap is reached: 15 / 10 tokens used. Its owner can raise the cap."
    )
    assert (await sk.chat(OWNER))[0] == 200
    status, one = await sk.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert (status, one["utilized"], one["tokens"]) == (200, 15, 10)

    # A top-up, a rename.
    status, patched = await sk.call(
        "PATCH", f"/v1/sharedkeys/{created['id']}", OWNER, {"tokens": 100, "name": "topped"}
    )
    assert status == 200 and (patched["tokens"], patched["name"]) == (100, "topped")
    assert (await sk.chat(secret))[0] == 200

    # Expiry, then the expiry removed.
    sk.clock.advance(days=3)
    status, error = await sk.chat(secret)
    assert (status, error["error"]["message"]) == (401, "Unknown api key")
    status, patched = await sk.call(
        "PATCH", f"/v1/sharedkeys/{created['id']}", OWNER, {"expiresAt": None}
    )
    assert status == 200 and patched["expiresAt"] is None
    assert (await sk.chat(secret))[0] == 200

    # Delete: it ends at once.
    status, _ = await sk.call("DELETE", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert status == 204
    assert (await sk.chat(secret))[0] == 401
    status, _ = await sk.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert status == 404
    status, listed = await sk.call("GET", "/v1/sharedkeys", OWNER)
    assert listed == {"data": []}


async def restarted(
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    backend: Backend,
    settings: Settings,
    first: Shared,
    key_id: str,
) -> tuple[Shared, dict[str, Any]]:
    """``first`` stopped and a new proxy started on the same storage: it, and the shared
    key ``key_id`` as its owner reads it there."""
    await first.proxy.server.close()  # the old process goes away
    second = await start(make_proxy, session, config(backend), settings)
    status, one = await second.call("GET", f"/v1/sharedkeys/{key_id}", OWNER)
    assert status == 200
    return second, one


async def test_a_restart_keeps_shared_keys_and_their_use(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    storage_uri: str,
) -> None:
    settings = settings_for(tmp_path, storage_uri)
    first = await start(make_proxy, session, config(backend), settings)
    created = await first.create(name="kept", tokens=15)
    assert (await first.chat(created["key"]))[0] == 200
    assert (await first.chat(created["key"]))[0] == 200
    second, one = await restarted(make_proxy, session, backend, settings, first, created["id"])
    assert (one["utilized"], one["tokens"], one["name"]) == (14, 15, "kept")
    assert (await second.chat(created["key"]))[0] == 200  # 14 < 15
    status, error = await second.chat(created["key"])
    assert status == 429 and "token cap is reached: 21 / 15" in error["error"]["message"]
    if storage_uri == "memory://":
        assert (tmp_path / STATE_FILE).is_file()


async def test_the_owners_limits_quotas_and_models_bind_its_shared_keys(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    storage_uri: str,
) -> None:
    owner = {"models": ["chat", "embed"], "limits": {"embed": {"requestHour": 1}}}
    cfg = config(backend, owner, day=14)
    sk = await start(make_proxy, session, cfg, settings_for(tmp_path, storage_uri))
    created = await sk.create(name="no cap of its own", tokens=-1)
    secret = created["key"]

    # The owner's model restriction: not callable, not listed.
    status, error = await sk.chat(secret, "other")
    assert (status, error["error"]["message"]) == (403, "Forbidden deployment: other")
    status, models = await sk.call("GET", "/openai/models", secret)
    assert {m["id"] for m in models["data"]} == {"chat", "embed"}

    # The owner's per-key quota: one embedding an hour, for the owner and its shared keys.
    body = {"input": "hi"}
    assert (await sk.call("POST", "/openai/deployments/embed/embeddings", secret, body))[0] == 200
    status, error = await sk.call("POST", "/openai/deployments/embed/embeddings", OWNER, body)
    assert status == 429 and error["error"]["limit_type"] == "request"

    # The owner's project limit: 14 tokens a day, shared by the owner and its shared keys.
    assert (await sk.chat(secret))[0] == 200
    assert (await sk.chat(OWNER))[0] == 200
    status, error = await sk.chat(secret)
    assert status == 429 and error["error"]["message"].startswith("Hit token rate limit.")
    assert (await sk.chat(OWNER))[0] == 429
    status, one = await sk.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert one["utilized"] == 7 + 1  # its own use only: the chat and the embedding

    status, limits = await sk.call("GET", "/v1/user/limits", secret)
    assert set(limits["models"]) == {"chat", "embed"}
    [day] = limits["models"]["chat"]["limits"]
    assert (day["scope"], day["window"], day["limit"], day["used"]) == ("project", "day", 14, 14)
    [hour] = limits["models"]["embed"]["limits"]
    assert (hour["scope"], hour["type"], hour["used"]) == ("key", "requests", 1)
    assert limits["sharedKey"]["tokens"] == -1 and limits["sharedKey"]["remaining"] is None


async def test_a_shared_key_cannot_manage_shared_keys(
    sk: Shared,
) -> None:
    created = await sk.create(name="friend", tokens=100)
    secret, path = created["key"], f"/v1/sharedkeys/{created['id']}"
    for method, url, body in (
        ("POST", "/v1/sharedkeys", {"name": "more", "tokens": 1}),
        ("GET", "/v1/sharedkeys", None),
        ("GET", path, None),
        ("PATCH", path, {"tokens": 10**9}),
        ("DELETE", path, None),
    ):
        status, error = await sk.call(method, url, secret, body)
        assert status == 403, (method, url)
        assert error["error"]["message"] == "A shared key cannot create, change or list shared keys"
    status, one = await sk.call("GET", path, OWNER)
    assert status == 200 and one["tokens"] == 100


async def test_refusals_name_their_reason(
    sk: Shared,
    session: aiohttp.ClientSession,
) -> None:
    # A key without canShare: 403.
    status, error = await sk.call("POST", "/v1/sharedkeys", PLAIN, {"name": "x", "tokens": 1})
    assert status == 403 and "canShare" in error["error"]["message"]
    status, _ = await sk.call("GET", "/v1/sharedkeys", PLAIN)
    assert status == 403
    # No key, an unknown key: 401.
    status, _ = await sk.call("GET", "/v1/sharedkeys", "dps_" + "x" * 43)
    assert status == 401

    # Someone else's shared key: 404, as if it did not exist.
    theirs = await sk.create(OTHER_OWNER, name="theirs", tokens=5)
    for method, body in (("GET", None), ("PATCH", {"tokens": 1}), ("DELETE", None)):
        status, error = await sk.call(method, f"/v1/sharedkeys/{theirs['id']}", OWNER, body)
        assert status == 404, method
        assert error["error"]["message"] == f"Unknown shared key: {theirs['id']}"
    status, _ = await sk.call("GET", "/v1/sharedkeys/nope", OWNER)
    assert status == 404

    # Validation: 400 naming the field.
    past = (sk.clock.now - timedelta(minutes=1)).isoformat()
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"tokens": 5}, "name"),
        ({"name": "x"}, "tokens"),
        ({"name": "", "tokens": 5}, "name"),
        ({"name": "x\n", "tokens": 5}, "name"),
        ({"name": "x\ud800", "tokens": 5}, "name"),  # (no UTF-8 text can hold it)
        ({"name": "x" * 201, "tokens": 5}, "name"),
        ({"name": "x", "tokens": True}, "tokens"),
        ({"name": "x", "tokens": -2}, "tokens"),
        ({"name": "x", "tokens": 1.5}, "tokens"),
        ({"name": "x", "tokens": "5"}, "tokens"),
        ({"name": "x", "tokens": 5, "expiresAt": past}, "expiresAt"),
        ({"name": "x", "tokens": 5, "expiresAt": "soon"}, "expiresAt"),
        ({"name": "x", "tokens": 5, "expiresAt": 1}, "expiresAt"),
        ({"name": "x", "tokens": 5, "expiresAt": "9999-12-31T23:59:59-05:00"}, "expiresAt"),
        ({"name": "x", "tokens": 5, "owner": "me"}, "owner"),
    ]
    for body, field in invalid:
        status, error = await sk.call("POST", "/v1/sharedkeys", OWNER, body)
        assert status == 400, body
        assert error["error"]["field"] == field, body
        assert f"'{field}'" in error["error"]["message"]
    mine = await sk.create(name="mine", tokens=5)
    status, error = await sk.call("PATCH", f"/v1/sharedkeys/{mine['id']}", OWNER, {"tokens": -5})
    assert status == 400 and error["error"]["field"] == "tokens"
    status, error = await sk.call("PATCH", f"/v1/sharedkeys/{mine['id']}", OWNER, [1])
    assert status == 400
    resp = await session.post(sk.proxy.url("/v1/sharedkeys"), data=b"{", headers={"Api-Key": OWNER})
    assert resp.status == 415
    resp = await session.post(
        sk.proxy.url("/v1/sharedkeys"),
        data=b"{",
        headers={"Api-Key": OWNER, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    status, listed = await sk.call("GET", "/v1/sharedkeys", OWNER)
    assert [k["name"] for k in listed["data"]] == ["mine"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(None, id="removed"),
        pytest.param({"disabled": True}, id="disabled"),
        pytest.param({"expiresAt": "2000-01-01T00:00:00Z"}, id="expired"),
        pytest.param({"canShare": False}, id="no-longer-sharing"),
    ],
)
async def test_shared_keys_end_with_their_owner_key(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    change: dict[str, Any] | None,
) -> None:
    cfg = config(backend)
    sk = await start(make_proxy, session, cfg, settings_for(tmp_path, "memory://"))
    secret = (await sk.create(name="friend", tokens=-1))["key"]
    assert (await sk.chat(secret))[0] == 200

    changed = json.loads(json.dumps(cfg))
    if change is None:
        del changed["keys"][OWNER]
    else:
        changed["keys"][OWNER] |= change
    sk.proxy.path.write_text(json.dumps(changed))
    assert sk.proxy.store.reload().applied
    status, error = await sk.chat(secret)
    assert (status, error["error"]["message"]) == (401, "Unknown api key")

    sk.proxy.path.write_text(json.dumps(cfg))  # the owner back as it was: so are they
    assert sk.proxy.store.reload().applied
    assert (await sk.chat(secret))[0] == 200


async def test_every_instance_sees_the_same_shared_keys_with_redis(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    settings = settings_for(tmp_path, redis_server.url)
    a = await start(make_proxy, session, config(backend), settings)
    b = await start(make_proxy, session, config(backend), settings)
    created = await a.create(name="both", tokens=10)
    assert (await b.chat(created["key"]))[0] == 200
    status, one = await a.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert one["utilized"] == 7
    assert (await a.chat(created["key"]))[0] == 200
    assert (await b.chat(created["key"]))[0] == 429
    status, _ = await b.call("PATCH", f"/v1/sharedkeys/{created['id']}", OWNER, {"tokens": 100})
    assert (await a.chat(created["key"]))[0] == 200
    # Only its digest is stored.
    names = redis_server.command("KEYS", "dp:sk:*")
    assert isinstance(names, list) and len(names) == 3  # the key, its id, the owner's set
    stored = b"".join(
        dumped
        for k in names
        if isinstance(k, bytes)
        and isinstance(dumped := redis_server.command("DUMP", k.decode()), bytes)
    )
    assert created["key"].encode() not in stored
    status, _ = await a.call("DELETE", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert status == 204
    assert (await b.chat(created["key"]))[0] == 401
    assert redis_server.command("KEYS", "dp:sk:*") == []


async def test_a_redis_outage_fails_only_shared_keys(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    own = RedisServer(tmp_path / "redis")
    own.start()
    try:
        sk = await start(make_proxy, session, config(backend), settings_for(tmp_path, own.url))
        secret = (await sk.create(name="friend", tokens=-1))["key"]
        own.pause()
        status, error = await sk.chat(secret)
        assert (status, error["error"]["message"]) == (
            503,
            "The shared key store is unavailable",
        )
        assert (await sk.chat(OWNER))[0] == 200
        own.resume()
        health = sk.proxy.app[SHARED].health  # back with the probe's first success
        assert health is not None
        for _ in range(500):
            if health.healthy:
                break
            await asyncio.sleep(0.01)
        assert (await sk.chat(secret))[0] == 200
    finally:
        own.stop()


def test_the_sqlite_state_file_is_next_to_the_config_unless_set(tmp_path: Path) -> None:
    default = settings_for(tmp_path, "memory://")
    assert state_path(default, {}) == tmp_path.resolve() / STATE_FILE
    assert state_path(default, {"DIALPROXY_STATE": "/x/env.db"}) == Path("/x/env.db")
    explicit = dataclasses.replace(default, state=str(tmp_path / "set.db"))
    assert state_path(explicit, {"DIALPROXY_STATE": "/x/env.db"}) == tmp_path / "set.db"


async def test_the_sqlite_state_is_written_only_for_shared_keys(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = settings_for(tmp_path, "memory://")
    monkeypatch.setenv("DIALPROXY_STATE", str(tmp_path / "state" / "keys.db"))
    sk = await start(make_proxy, session, config(backend), default)
    store = sk.proxy.app[SHARED].store
    assert isinstance(store, SqliteSharedKeyStore)
    # Nothing is written until there is a shared key; unknown keys read nothing.
    assert (await sk.chat("dps_" + "A" * 43))[0] == 401
    assert not store.path.exists()
    secret = (await sk.create(name="friend", tokens=-1))["key"]
    assert store.path == tmp_path / "state" / "keys.db" and store.path.is_file()
    assert os.stat(store.path).st_mode & 0o077 == 0
    assert not (tmp_path / STATE_FILE).exists()
    await sk.chat(secret)
    await sk.proxy.server.close()
    data = b"".join(p.read_bytes() for p in store.path.parent.iterdir())
    assert secret.encode() not in data


async def test_no_secret_in_any_log_line_or_listing(
    sk: Shared,
) -> None:
    with capture_logs() as logs:
        created = await sk.create(name="friend", tokens=10)
        secret = created["key"]
        await sk.chat(secret)
        await sk.chat(secret)
        await sk.chat(secret)  # 429
        await sk.call("POST", "/v1/sharedkeys", secret, {"name": "x", "tokens": 1})  # 403
        await sk.call("PATCH", f"/v1/sharedkeys/{created['id']}", OWNER, {"tokens": 50})
        _, listed = await sk.call("GET", "/v1/sharedkeys", OWNER)
        _, one = await sk.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
        _, limits = await sk.call("GET", "/v1/user/limits", secret)
        await sk.call("DELETE", f"/v1/sharedkeys/{created['id']}", OWNER)
        await sk.chat(secret)  # 401
    events = [e["event"] for e in logs]
    assert {"shared_key_created", "shared_key_updated", "shared_key_deleted"} <= set(events)
    used = [e for e in logs if e["event"] == "request" and e.get("shared_key") == created["id"]]
    assert [e["status"] for e in used] == [200, 200, 429]
    text = repr(logs) + json.dumps([listed, one, limits])
    for s in (secret, OWNER, PLAIN, OTHER_OWNER):
        assert s not in text


async def test_a_cap_with_one_token_left_admits_at_most_one_of_fifty_at_once(
    sk: Shared, backend: Backend
) -> None:
    """Each request holds its estimate in the key's ``utilized`` from admission (atomic in
    the store), so fifty that arrive together see each other (all 50 passed before)."""
    capped = (await sk.create(name="capped", tokens=8))["key"]
    assert (await sk.chat(capped))[0] == 200  # 7 of 8 used: one token left
    backend.control.first_byte_delay = 0.05  # all fifty in flight together
    answers = await asyncio.gather(
        *(sk.call("POST", "/openai/deployments/chat/completions", capped, CHAT) for _ in range(50))
    )
    await sk.proxy.settle()
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 1 and statuses.count(429) == 49, statuses
    listing, listed = await sk.call("GET", "/v1/sharedkeys", OWNER)
    assert listing == 200
    (entry,) = [k for k in listed["data"] if k["name"] == "capped"]
    assert entry["utilized"] == 14  # the reservations settled to what was used


async def test_a_reservation_whose_client_left_is_given_back(tmp_path: Path) -> None:
    """A request cancelled (its client gone) while its shared key's reservation is being
    taken: the store takes it all the same, so it is given back; ``utilized`` counts every
    token ever used through the key, and would keep it for ever."""
    store = SqliteSharedKeyStore(tmp_path / "state.db")
    await store.start()
    shared: SharedKeys[Any] = SharedKeys(store)
    key = SharedKey(id="k1", digest="d1", owner="o1", name="left", tokens=100)
    await store.create(key)
    try:
        leaving = asyncio.ensure_future(shared.reserve(key, 30))
        await asyncio.sleep(0)  # (the reservation on its way)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        found = None
        for _ in range(200):  # (the store's write, then the give-back's)
            found = await store.find("d1")
            if found is not None and found.utilized == 0:
                break
            await asyncio.sleep(0.01)
        assert found is not None and found.utilized == 0
        assert await shared.reserve(key, 30) == 30  # (and a reservation that stays)
        assert (await store.find("d1")).utilized == 30  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_stream_left_by_its_client_is_charged_to_the_shared_key_across_a_shutdown(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    storage_uri: str,
) -> None:
    """The client of a shared key's stream leaves and the proxy stops while it reads on for
    the usage: the stop waits for the drain and for the charge it starts, and only then
    closes the shared key store, so the next process sees the key's use."""
    settings = settings_for(tmp_path, storage_uri)
    first = await start(make_proxy, session, config(backend), settings)
    created = await first.create(name="left", tokens=1000)
    backend.control.chunk_delay = 0.05
    resp = await session.post(
        first.proxy.url("/openai/deployments/chat/chat/completions"),
        json={**CHAT, "stream": True},
        headers={"Api-Key": created["key"]},
    )
    assert resp.status == 200
    await resp.content.readany()
    resp.close()  # the client leaves; the proxy reads on for the usage
    await asyncio.sleep(0.05)
    assert first.proxy.app[BACKGROUND]  # (draining)
    _, one = await restarted(make_proxy, session, backend, settings, first, created["id"])
    assert one["utilized"] == 7


async def test_a_max_tokens_past_any_model_neither_fails_nor_burns_the_key(sk: Shared) -> None:
    """``max_tokens: 2^63 - 1`` on a shared key holds at most 10^9 tokens of its cap.  Before,
    SQLite could not store the share (a 500), and the key kept it in memory: every later
    request was refused with the cap "reached" at 2^63 until a restart."""
    created = await sk.create(name="big", tokens=2 * 10**9)
    secret = created["key"]
    body = {**CHAT, "max_tokens": 2**63 - 1}
    status, _ = await sk.call("POST", "/openai/deployments/chat/chat/completions", secret, body)
    assert status == 200
    assert (await sk.chat(secret))[0] == 200
    await sk.proxy.settle()
    status, shown = await sk.call("GET", f"/v1/sharedkeys/{created['id']}", OWNER)
    assert (status, shown["utilized"]) == (200, 14)
