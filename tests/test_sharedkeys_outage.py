"""Shared keys while Redis is down (issue 11, finding 9): they follow the counters'
``--storage-failure`` policy, only the lookups in flight when the outage starts wait for
Redis, and the outage is logged once when it starts and once when it ends, for the counters
and the shared keys together."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from dialproxy.counting.storage import FailurePolicy, StorageHealth
from dialproxy.errors import StoreUnavailable
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.sharedkeys import service as sharedkeys_module
from dialproxy.sharedkeys.model import SharedKey
from dialproxy.sharedkeys.redisstore import REDIS_TIMEOUT
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.text import key_digest
from dialproxy.web.appkeys import LIMITER, SHARED
from tests.conftest import SECRETS, Backend, Clock, Proxy, ProxyFactory
from tests.redis_server import RedisServer
from tests.test_sharedkeys import OWNER, Shared, config

STORE_DOWN = "The shared key store is unavailable"
LIMITS_DOWN = "Rate limit storage is unavailable"
# Five answers, one after another, that did not wait for Redis: waiting costs the store's
# timeout each (1 s: 5 s), far more than a busy machine adds.
QUICK = 2.0
assert QUICK <= 5 * REDIS_TIMEOUT / 2


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def until_healthy(proxy: Proxy, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not proxy.app[LIMITER].guard.healthy:
        assert time.monotonic() < deadline, "Redis never came back"
        await asyncio.sleep(0.02)


async def chat(sk: Shared, key: str) -> tuple[int, str | None, float]:
    """One chat call: its status, its error message, how long it took."""
    started = time.monotonic()
    status, body = await sk.call("POST", "/openai/deployments/chat/chat/completions", key, CHAT)
    took = time.monotonic() - started
    return status, body["error"]["message"] if status != 200 else None, took


CHAT = {"messages": [{"role": "user", "content": "one two three"}]}
# What a shared key seen before the outage, one never seen, and a key of the config get.
EXPECTED = {
    "deny": ((503, STORE_DOWN), (503, STORE_DOWN), (503, LIMITS_DOWN)),
    "local": ((200, None), (503, STORE_DOWN), (200, None)),
    "allow": ((200, None), (503, STORE_DOWN), (200, None)),
}


@pytest.mark.parametrize("policy", [p.value for p in FailurePolicy])
async def test_shared_keys_follow_the_policy_and_wait_once_per_outage(
    policy: str,
    own_redis: RedisServer,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    settings = Settings(
        config_paths=(str(tmp_path / "aidial.config.json"),),
        storage=own_redis.url,
        storage_failure=policy,
    )
    proxy = await make_proxy(
        config(backend), settings=settings, storage=counter_storage(own_redis.url)
    )
    sk = Shared(proxy, session)
    seen = (await sk.create(name="seen", tokens=-1))["key"]
    unseen = (await sk.create(name="unseen", tokens=-1))["key"]
    assert (await chat(sk, seen))[0] == 200  # found once before the outage
    known, unknown, plain = EXPECTED[policy]

    with capture_logs() as logs:
        own_redis.pause()  # SIGSTOP: Redis accepts connections and answers nothing
        status, message, took = await chat(sk, seen)
        assert (status, message) == known
        assert took < REDIS_TIMEOUT + 1.0  # this one waited for Redis: once, no retries

        for key, expected in ((seen, known), (unseen, unknown), (OWNER, plain)):
            took = 0.0
            for _ in range(5):  # every later one answers without waiting for Redis
                status, message, one = await chat(sk, key)
                assert (status, message) == expected
                took += one
            assert took < QUICK, f"{took:.2f} s for five: they waited for Redis"

        started = time.monotonic()
        answers = await asyncio.gather(*(chat(sk, (seen, unseen)[i % 2]) for i in range(50)))
        assert time.monotonic() - started < 10
        assert [(s, m) for s, m, _ in answers] == [known, unknown] * 25
        resp = await session.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            headers={"Api-Key": unseen},
            json=CHAT,
        )
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert await resp.json() == {"error": {"message": STORE_DOWN, "code": "503"}}
        # (managing shared keys needs the store: a 503 at once too)
        started = time.monotonic()
        for _ in range(5):
            assert (await sk.call("GET", "/v1/sharedkeys", OWNER))[0] == 503
        assert time.monotonic() - started < QUICK

        own_redis.resume()
        await until_healthy(proxy)
        for key in (unseen, seen, OWNER):  # shared keys work again, from Redis
            assert (await chat(sk, key))[0] == 200

    events = [entry["event"] for entry in logs]
    assert events.count("storage_unavailable") == 1, events
    assert events.count("storage_available") == 1, events
    assert "shared_key_store_error" not in events
    (down,) = [entry for entry in logs if entry["event"] == "storage_unavailable"]
    assert down["caller"] == "shared_keys" and down["policy"] == policy
    health = proxy.app[LIMITER].health()
    assert health["healthy"] is True and health["outages"] == 1
    if policy != "deny":
        assert proxy.app[SHARED].fallbacks == 1 + 5 + 25


async def test_a_key_seen_before_keeps_its_cap_while_redis_is_down(
    own_redis: RedisServer,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """``local``: a remembered key's own cap goes on counting in the instance."""
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), storage=own_redis.url)
    proxy = await make_proxy(
        config(backend), settings=settings, storage=counter_storage(own_redis.url)
    )
    sk = Shared(proxy, session)
    capped = (await sk.create(name="capped", tokens=14))["key"]  # two calls of 7 tokens
    assert (await sk.chat(capped))[0] == 200  # 7 used, in Redis
    own_redis.kill()
    assert (await sk.chat(capped))[0] == 200  # 14 used: 7 in Redis, 7 here
    status, body = await sk.chat(capped)
    assert status == 429 and body["error"]["limit_type"] == "shared_key_tokens"


async def test_an_error_answer_from_redis_is_not_an_outage(
    own_redis: RedisServer,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Redis answering with an error (here WRONGTYPE) fails that lookup alone."""
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), storage=own_redis.url)
    proxy = await make_proxy(
        config(backend), settings=settings, storage=counter_storage(own_redis.url)
    )
    sk = Shared(proxy, session)
    broken = "dps_" + "B" * 43
    SECRETS.append(broken)
    own_redis.command("SET", f"dp:sk:k:{key_digest(broken)}", "not a hash")
    with capture_logs() as logs:
        status, message, _ = await chat(sk, broken)
    assert (status, message) == (503, STORE_DOWN)
    assert proxy.app[LIMITER].guard.healthy
    assert [entry["event"] for entry in logs].count("shared_key_store_error") == 1
    assert (await chat(sk, OWNER))[0] == 200


class _FlakyStore:
    """A store whose lookups answer from a dict, or fail while ``down``."""

    def __init__(self) -> None:
        self.keys: dict[str, SharedKey] = {}
        self.down = False

    async def find(self, digest: str) -> SharedKey | None:
        if self.down:
            raise StoreUnavailable("The shared key store is unavailable")
        return self.keys.get(digest)

    async def add_utilized(self, key: SharedKey, tokens: int) -> None:
        if self.down:
            return  # (a store drops it while down)


async def test_what_is_remembered_and_for_how_long(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(sharedkeys_module, "REMEMBER_KEYS", 3)
    store = _FlakyStore()
    secrets = [f"dps_{i:043d}" for i in range(5)]
    for i, secret in enumerate(secrets):
        digest = key_digest(secret)
        store.keys[digest] = SharedKey(str(i), digest, "owner", f"k{i}", tokens=10)
    health = StorageHealth("redis", "local")
    shared: SharedKeys[None] = SharedKeys(store, clock, health=health)  # type: ignore[arg-type]
    for secret in secrets:  # only the last 3 are kept
        assert await shared.find(secret) is not None
    assert await shared.find(secrets[2]) is not None  # used again: now the latest
    await shared.record(store.keys[key_digest(secrets[2])], 4)
    store.down = True
    for secret in secrets[:2]:
        with pytest.raises(StoreUnavailable):
            await shared.find(secret)
    remembered = await shared.find(secrets[2])
    assert remembered is not None and remembered.utilized == 4  # (counted here)
    clock.advance(seconds=sharedkeys_module.REMEMBER_SECONDS + 1)  # an hour on: forgotten
    with pytest.raises(StoreUnavailable):
        await shared.find(secrets[2])
    # deny remembers nothing
    assert not SharedKeys(store, health=StorageHealth("redis", "deny")).remembers  # type: ignore[arg-type]
