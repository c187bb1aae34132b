"""Several instances, one Redis: exact shared limits, and every failure policy under an outage.

Everything runs against real ``redis-server`` processes.  The session's server (conftest)
serves the tests that leave it alone; a test that stops, kills or restarts Redis starts its
own.  The multi-instance tests run ``python -m dialproxy serve`` processes, as ops would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import trustme
from structlog.testing import capture_logs

from dialproxy.config.model import Window
from dialproxy.counting import rediscounters, storage
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Held, Limiter, Scope
from dialproxy.counting.rediscounters import (
    CONNECT_TIMEOUT,
    MAX_CONNECTIONS,
    TIMEOUT,
    RedisCounters,
)
from dialproxy.counting.storage import FailurePolicy, close_storage
from dialproxy.errors import ProxyError, RateLimited, StorageUnavailable
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.web.appkeys import LEDGER
from tests.conftest import (
    Backend,
    ProxyFactory,
    admit_request,
    assert_json_lines_without_secrets,
    chat_model,
    clear_of_minute_boundary,
    new_key,
    used_tokens,
)
from tests.redis_server import BackendProcess, ProxyProcess, RedisServer, free_port

KEY = new_key()
CHAT = {"messages": [{"role": "user", "content": "hello there proxy"}]}
POLICIES = [p.value for p in FailurePolicy]
# No timed assertion is tight: the machine may be busy.  What these bound is a wait that
# would be a bug (a call hanging on Redis past its timeout, a probe that never comes back).
MARGIN = 2.0


async def counted(url: str, owner: str = "p:fleet") -> int | None:
    """A project's requests in its hour window of model ``chat`` as Redis holds them, read
    as another instance reads them (a limiter of its own on that Redis); None while Redis
    does not answer."""
    limiter = Limiter(counter_storage(url), "deny")
    try:
        (state,) = await limiter.usage(owner, "chat", [Window("hour", 3_600, 1)], "r")
        return state.used
    except ProxyError:
        return None
    finally:
        await limiter.close()


# --- the storage URI ------------------------------------------------------------------------


def test_storage_uris(tmp_path: Path) -> None:
    assert isinstance(counter_storage("memory://"), LocalCounters)
    for uri in (
        "redis://127.0.0.1:6390/2",
        "rediss://user:pw@redis.example:6380/0",
        f"redis+unix://{tmp_path}/redis.sock?db=0",
        "async+redis://127.0.0.1:6390",
    ):
        storage = counter_storage(uri)
        assert isinstance(storage, RedisCounters), uri
        pool = storage.client.connection_pool
        assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
        assert pool.max_connections == MAX_CONNECTIONS
        assert pool.connection_kwargs["socket_connect_timeout"] == CONNECT_TIMEOUT
        assert pool.connection_kwargs["socket_timeout"] == TIMEOUT
        assert pool.connection_kwargs["retry"].get_retries() == 0  # never retried
    unix = counter_storage(f"redis+unix://{tmp_path}/redis.sock?db=3")
    assert isinstance(unix, RedisCounters)
    kwargs = unix.client.connection_pool.connection_kwargs
    assert (kwargs["path"], kwargs["db"]) == (f"{tmp_path}/redis.sock", 3)
    tls = counter_storage("rediss://user:pw@redis.example:6380/1")
    assert isinstance(tls, RedisCounters)
    pool = tls.client.connection_pool
    assert pool.connection_class is redis.asyncio.SSLConnection
    assert pool.connection_kwargs["password"] == "pw"
    for bad in ("memcached://127.0.0.1:11211", "127.0.0.1:6379", "redis"):
        with pytest.raises(ValueError, match="unsupported storage URI"):
            counter_storage(bad)


async def test_redis_over_a_unix_socket(redis_server: RedisServer) -> None:
    storage = counter_storage(redis_server.unix_url)
    try:
        assert await storage.check()
        limiter = Limiter(storage)
        scope = Scope("p:unix", "chat", request_windows=(Window("hour", 3_600, 1),))
        await admit_request(limiter, scope)
        with pytest.raises(RateLimited):
            await admit_request(limiter, scope)
        assert await counted(redis_server.unix_url, "p:unix") == 1
    finally:
        await close_storage(storage)


# --- the failure policies, one limiter against a Redis that stops, dies, comes back ----------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it gets stopped and killed."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def attempt(limiter: Limiter, scope: Scope) -> tuple[str, float]:
    """One admission: its outcome (``200``, ``429``, ``503``) and how long it took."""
    started = time.monotonic()
    try:
        await admit_request(limiter, scope)
        outcome = "200"
    except ProxyError as e:
        outcome = str(e.status)
    return outcome, time.monotonic() - started


async def served(limiter: Limiter, scope: Scope) -> bool:
    outcome, _ = await attempt(limiter, scope)
    return outcome == "200"


async def until_healthy(limiter: Limiter, timeout: float = 10.0) -> None:
    """Until a probe finds the storage back (a probe every 0.5 s: the timeout is generous)."""
    deadline = time.monotonic() + timeout
    while not limiter.guard.healthy:
        assert time.monotonic() < deadline, "the storage never came back"
        await asyncio.sleep(0.01)


async def until_repaid(limiter: Limiter) -> None:
    """Until the storage is back and what it was owed is sent and answered."""
    await until_healthy(limiter)
    for _ in range(int(max(MARGIN, 10 * TIMEOUT) / 0.01)):
        if not limiter.health()["owed"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("what was owed was never repaid")


async def health_says(s: aiohttp.ClientSession, url: str, *, healthy: bool) -> None:
    """Until the app's ``/health`` (``url``) says its storage is ``healthy`` (or not)."""
    deadline = time.monotonic() + 10.0
    while True:
        async with s.get(url) as r:
            if (await r.json())["storage"]["healthy"] is healthy:
                return
        assert time.monotonic() < deadline, "the storage never changed"
        await asyncio.sleep(0.05)


EXPECTED_IN_OUTAGE = {
    "allow": ["200"] * 6,  # no limits
    "deny": ["503"] * 6,  # nothing limited is served
    "local": ["200"] * 3 + ["429"] * 3,  # this instance's own counters, limit 3
}


@pytest.mark.parametrize("policy", POLICIES)
async def test_policy_while_redis_is_paused_or_dead(own_redis: RedisServer, policy: str) -> None:
    limiter = Limiter(counter_storage(own_redis.url), policy)
    # A generous minute window first: an admission cut off by the outage reaches only it.
    roomy_minute = Window("minute", 60, 1_000_000)
    scope = Scope("p:fleet", "chat", request_windows=(roomy_minute, Window("hour", 3_600, 3)))
    try:
        assert await served(limiter, scope)
        assert limiter.health() == {
            "backend": "redis",
            "healthy": True,
            "policy": policy,
            "failures": 0,
            "fallbacks": 0,
            "outages": 0,
            "owed": 0,
            "owedDropped": 0,
        }

        # SIGSTOP: the call in flight waits out the read timeout; later ones skip Redis.
        own_redis.pause()
        outcomes = [await attempt(limiter, scope) for _ in range(6)]
        assert [o for o, _ in outcomes] == EXPECTED_IN_OUTAGE[policy]
        assert outcomes[0][1] < TIMEOUT + MARGIN  # (bounded by the read timeout)
        # the later ones skip Redis: one call failed, the rest answered by the policy
        assert limiter.health()["failures"] == 1
        if policy == "deny":
            with pytest.raises(StorageUnavailable) as refused:
                await admit_request(limiter, scope)
            assert refused.value.headers == {"Retry-After": "1"}
            assert refused.value.body() == {
                "error": {"message": "Rate limit storage is unavailable", "code": "503"}
            }
        await limiter.settle([scope], tokens=10, cost_nano_usd=0)  # never raises
        health = limiter.health()
        assert health["healthy"] is False and health["failures"] == 1
        assert health["outages"] == 1 and health["fallbacks"] >= 6

        # SIGCONT: back within a probe.  The admission that timed out is one script call,
        # applied whole when Redis resumed: it counts (erring on counting, never half).
        own_redis.resume()
        await until_healthy(limiter)
        assert await counted(own_redis.url) == 2
        assert await served(limiter, scope)
        assert (await attempt(limiter, scope))[0] == "429"  # shared: 3 / 3 in Redis

        # SIGKILL: connections are refused at once; then a fresh Redis on the same port.
        own_redis.kill()
        outcomes = [await attempt(limiter, scope) for _ in range(6)]
        expected = EXPECTED_IN_OUTAGE[policy]
        if policy == "local":  # the local counters still hold the first outage's 3
            expected = ["429"] * 6
        assert [o for o, _ in outcomes] == expected
        assert limiter.health()["failures"] == 2  # the first call; the rest skipped Redis
        own_redis.start()
        await until_healthy(limiter)
        assert await served(limiter, scope)
        assert await counted(own_redis.url) == 1  # counted in the new Redis
        assert limiter.health()["outages"] == 2
    finally:
        await limiter.close()


async def redis_tokens(url: str, scope: Scope, window: Window) -> int:
    """What Redis holds of ``scope``'s token ``window``, read as another instance reads it."""
    other = Limiter(counter_storage(url), "deny")
    try:
        (state,) = await other.usage(scope.owner, scope.model, [window], "t")
        return state.used
    finally:
        await other.close()


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_settlement_made_while_redis_is_down_is_owed_to_it_until_it_is_back(
    own_redis: RedisServer, policy: str
) -> None:
    """A request's settlement goes to Redis with the next batch, awaited by nobody (no task
    of its own).  When Redis fails it, the storage is marked down as for any call; one made
    while Redis is down is owed, and sent when Redis is back, so Redis ends with the real
    usage (the reservations replaced).  Under ``local`` what they add counts in the
    instance's own counters meanwhile; what they take back never does (they never held it)."""
    limiter = Limiter(counter_storage(own_redis.url), policy)
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    try:
        _, _, where = await limiter.admit_held([scope], 100)  # 100 tokens reserved in Redis
        assert where is Held.SHARED
        for _ in range(2):
            await limiter.admit_held([scope], 50)
        # SIGSTOP: the first two settlements are sent, time out, and wait in Redis's socket
        own_redis.pause()
        assert limiter.settle_soon([scope], tokens=-70, cost_nano_usd=0) is None  # 30 used
        assert limiter.settle_soon([scope], tokens=40, cost_nano_usd=0) is None  # 90 used
        deadline = time.monotonic() + 10 * TIMEOUT
        while limiter.health()["fallbacks"] < 2:  # (the read timeout, then the callbacks)
            assert time.monotonic() < deadline, "the failed settlements were never seen"
            await asyncio.sleep(0.01)
        health = limiter.health()
        assert health["healthy"] is False and health["outages"] == 1
        assert health["owed"] == 0  # (sent: they may yet be applied, not to be sent twice)
        if policy != "deny":  # (deny refuses reads while Redis is down)
            (state,) = await limiter.usage("p:fleet", "chat", [tokens], "t")
            assert state.used == (40 if policy == "local" else 0)  # (the -70 not here)
        # Down, nothing is sent, nothing to run: owed at once.
        assert limiter.settle_soon([scope], tokens=-48, cost_nano_usd=0) is None  # 2 used
        assert limiter.health()["owed"] == 1
        if policy == "local":
            (state,) = await limiter.usage("p:fleet", "chat", [tokens], "t")
            assert state.used == 40
        own_redis.resume()
        await until_repaid(limiter)
        # reserved 100 + 50 + 50, then -70 +40 (applied on resume) and -48 (owed): the real
        # usage, 30 + 90 + 2
        assert await redis_tokens(own_redis.url, scope, tokens) == 122
        assert limiter.health()["owedDropped"] == 0
    finally:
        own_redis.resume()
        await limiter.close()


async def test_settlements_owed_past_the_cap_are_dropped_and_counted(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most OWED_MAX settlements are kept for Redis; past it one is dropped (counted in
    ``owedDropped``), its slot's lease no longer renewed (it lapses), and the rest are sent
    when Redis is back."""
    monkeypatch.setattr(storage, "OWED_MAX", 2)
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,), concurrency=5)
    redis_counters = limiter.guard.storage
    assert isinstance(redis_counters, RedisCounters)
    try:
        for member in ("a", "b", "c"):
            await limiter.admit_held([scope], 100, member=member)
        assert sum(map(len, redis_counters.held.values())) == 3  # (leases renewed)
        own_redis.pause()
        assert (await limiter.admit_held([scope]))[2] is Held.NOTHING  # (Redis seen down)
        for member in ("a", "b", "c"):  # each used 10 of its 100
            assert limiter.settle_soon([scope], -90, 0, member) is None
        health = limiter.health()
        assert (health["owed"], health["owedDropped"]) == (2, 1)
        assert redis_counters.held == {}  # (owed or dropped: none renewed)
        own_redis.resume()
        await until_repaid(limiter)
        # 300 reserved, two of the three given back their 90: the third's stays
        assert await redis_tokens(own_redis.url, scope, tokens) == 120
    finally:
        own_redis.resume()
        await limiter.close()


async def test_a_replay_that_redis_fails_resends_none_it_sent_and_keeps_the_rest(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Owed settlements are sent once Redis is back.  When one of them fails (Redis down
    again as it was sent), it is not sent again (it may still be applied: a second one would
    count twice)."""
    limiter = Limiter(counter_storage(own_redis.url), "local")
    tokens = Window("hour", 3_600, 10_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    redis_counters = limiter.guard.storage
    assert isinstance(redis_counters, RedisCounters)
    sent: list[tuple[int, bool]] = []  # each settlement sent: its amount, Redis up then
    real_settle = redis_counters.settle

    async def settle(windows: Any, amounts: list[int], *args: Any) -> None:
        sent.append((amounts[0], limiter.guard.healthy))
        if len(sent) == 2:  # the second one sent: Redis fails it
            raise ConnectionError("Redis went away again")
        await real_settle(windows, amounts, *args)

    try:
        for _ in range(3):
            await limiter.admit_held([scope], 100)  # 300 reserved in Redis
        own_redis.pause()
        assert (await limiter.admit_held([scope]))[2] is Held.LOCAL  # (Redis seen down)
        for used in (10, 20, 30):
            assert limiter.settle_soon([scope], used - 100, 0) is None
        assert limiter.health()["owed"] == 3
        monkeypatch.setattr(redis_counters, "settle", settle)
        own_redis.resume()
        await until_healthy(limiter)  # the replay: the first sent, the second fails
        # (``owed`` reads 0 as soon as the group is sent: the replay is over when its
        # answers are, the failure seen, a second outage)
        deadline = time.monotonic() + 10 * TIMEOUT + MARGIN
        while len(sent) < 3 or limiter.health()["outages"] < 2:
            assert time.monotonic() < deadline, f"the owed settlements were not all sent: {sent}"
            await asyncio.sleep(0.01)
        # the failed one never twice, nor owed again
        assert sent == [(-90, True), (-80, True), (-70, True)]
        assert (limiter.health()["outages"], limiter.health()["owed"]) == (2, 0)
        # 300 reserved; the first and the third replaced by their usage, the second's
        # reservation left (lost as it was sent: erring on counting)
        assert await redis_tokens(own_redis.url, scope, tokens) == 10 + 100 + 30
    finally:
        own_redis.resume()
        await limiter.close()


async def test_owed_settlements_go_in_groups_and_a_stop_waits_for_them_a_bounded_time(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back from an outage, the owed settlements go a group at a time (one pipelined batch
    each, not one round trip each); a stop waits for them at most REPAY_AT_CLOSE (a slow
    Redis with many owed does not hold the process past its orchestrator's grace), and what
    was not sent is said in the warning.  A group on its way counts as owed on ``/health``
    until Redis answers it (``owed`` at 0 means Redis has them all)."""
    monkeypatch.setattr(storage, "REPAY_GROUP", 10)
    monkeypatch.setattr(storage, "REPAY_AT_CLOSE", 0.5)
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    tokens = Window("hour", 3_600, 1_000_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    redis_counters = limiter.guard.storage
    assert isinstance(redis_counters, RedisCounters)
    real_settle = redis_counters.settle
    in_flight, most, sent = 0, 0, 0
    first_sent = asyncio.Event()
    owed_seen: list[int] = []  # what /health says as each settlement is on its way

    async def slow_settle(*args: Any) -> None:  # (a slow Redis: 0.1 s a batch)
        nonlocal in_flight, most, sent
        owed_seen.append(limiter.health()["owed"])
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.1)
            await real_settle(*args)
            sent += 1
            first_sent.set()
        finally:
            in_flight -= 1

    owed = 400  # 40 groups: 4 s at 0.1 s a group
    try:
        for _ in range(owed):
            await limiter.admit_held([scope], 100)
        own_redis.pause()
        assert (await limiter.admit_held([scope]))[2] is Held.NOTHING  # (Redis seen down)
        for _ in range(owed):
            assert limiter.settle_soon([scope], -90, 0) is None
        assert limiter.health()["owed"] == owed
        monkeypatch.setattr(redis_counters, "settle", slow_settle)
        own_redis.resume()
        await until_healthy(limiter)
        await asyncio.wait_for(first_sent.wait(), 10)
        assert most == 10  # a group at once
        assert owed_seen[:10] == [owed] * 10  # (the first group: 390 waiting, 10 on the way)
        with capture_logs() as logs:
            started = time.monotonic()
            await limiter.close()
            took = time.monotonic() - started
        assert took < 2.5  # (the rest of the 4 s was not waited for)
        (lost,) = [e for e in logs if e["event"] == "owed_settlements_lost"]
        # (the group cut off by the stop: sent, maybe applied, so neither owed nor lost)
        assert lost["count"] > 0 and owed - 10 <= sent + lost["count"] <= owed
        assert most == 10
        # each settlement applied took back 90 of its 100
        given_back = owed * 100 - await redis_tokens(own_redis.url, scope, tokens)
        assert given_back % 90 == 0 and sent <= given_back // 90 <= sent + 10
    finally:
        own_redis.resume()


def refuse_the_next_connection(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The counters' next connection to Redis refused (nothing written on it), the later
    ones made; the event: it was refused."""
    real_connect = rediscounters._Link.connect
    refused = asyncio.Event()

    async def connect(url: str, client: Any) -> Any:
        if not refused.is_set():
            refused.set()
            raise ConnectionRefusedError("Connection refused")
        return await real_connect(url, client)

    monkeypatch.setattr(rediscounters._Link, "connect", connect)
    return refused


async def test_owed_settlements_that_never_left_stay_owed(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis back, then gone again just as the owed settlements go (their connection is
    refused: nothing was written): they stay owed and go once Redis is back for good, so
    every reservation is replaced by its usage.  (Only a call that was sent may have been
    applied, and is not sent again.)"""
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    tokens = Window("hour", 3_600, 10_000_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    owed = 300
    try:
        for _ in range(owed):
            await limiter.admit_held([scope], 100)  # 30,000 reserved
        own_redis.pause()
        assert (await limiter.admit_held([scope]))[2] is Held.NOTHING  # (Redis seen down)
        for _ in range(owed):
            assert limiter.settle_soon([scope], -90, 0) is None  # each used 10
        assert limiter.health()["owed"] == owed
        refused = refuse_the_next_connection(monkeypatch)  # (as the replay connects)
        own_redis.resume()
        await asyncio.wait_for(refused.wait(), 10 * TIMEOUT + MARGIN)
        deadline = time.monotonic() + 10 * TIMEOUT + MARGIN
        while limiter.health()["owed"] or limiter.health()["outages"] < 2:
            assert time.monotonic() < deadline, limiter.health()
            await asyncio.sleep(0.01)
        await until_healthy(limiter)
        assert limiter.health()["owedDropped"] == 0
        assert await redis_tokens(own_redis.url, scope, tokens) == owed * 10
    finally:
        own_redis.resume()
        await limiter.close()


async def test_a_settlement_whose_connection_is_refused_is_owed(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis up, the counters' connection gone, and the new one refused as a settlement
    goes: it never left, so it is owed (not dropped as one Redis may have applied), and
    sent once Redis answers again."""
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    redis_counters = limiter.guard.storage
    assert isinstance(redis_counters, RedisCounters)
    try:
        await limiter.admit_held([scope], 100)
        redis_counters._batch.reset()  # (the connection dropped)
        refused = refuse_the_next_connection(monkeypatch)
        assert limiter.settle_soon([scope], -90, 0) is None  # sent: a watched call
        deadline = time.monotonic() + 10 * TIMEOUT + MARGIN
        # (the refusal seen: an outage, the settlement owed; then Redis back, and it sent)
        while not limiter.health()["outages"] or limiter.health()["owed"]:
            assert time.monotonic() < deadline, limiter.health()
            await asyncio.sleep(0.01)
        assert refused.is_set() and limiter.health()["outages"] == 1 and limiter.guard.healthy
        assert await redis_tokens(own_redis.url, scope, tokens) == 10
    finally:
        await limiter.close()


async def test_a_settlement_whose_storage_cannot_be_prepared_is_owed() -> None:
    """The first call to a Redis that cannot be reached is a settlement (a reservation
    another instance made): preparing the storage fails, nothing of it was sent, so it is
    owed, not lost."""
    limiter = Limiter(counter_storage(f"redis://127.0.0.1:{free_port()}/0"), "allow")
    scope = Scope("p:fleet", "chat", token_windows=(Window("hour", 3_600, 1_000),))
    try:
        await limiter.settle([scope], tokens=-90, cost_nano_usd=0)
        health = limiter.health()
        assert (health["healthy"], health["outages"], health["owed"]) == (False, 1, 1)
    finally:
        await limiter.close()


async def test_a_failure_after_the_health_closed_starts_no_probe() -> None:
    """A call that fails as the process stops (a settlement refused because the storage
    closed) marks the storage down, but starts no probe: nothing would ever stop it."""
    health = storage.StorageHealth("redis")
    await health.close()
    health.failed(ConnectionError("closed"), "counters")
    assert not health.healthy and health.outages == 1
    assert not [t for t in asyncio.all_tasks() if "_wait_until_back" in repr(t.get_coro())]


async def test_a_settlement_owed_after_shutdown_is_dropped_with_a_warning(
    own_redis: RedisServer,
) -> None:
    """A settlement owed once the limiter has closed (a give-back made while it closes:
    an admission whose client left, answered by Redis during the close) can never be sent:
    it is counted in ``owedDropped`` and said in a warning, never kept in silence."""
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    try:
        await limiter.admit_held([scope], 100)
        own_redis.pause()
        assert (await limiter.admit_held([scope]))[2] is Held.NOTHING  # (Redis seen down)
        await limiter.close()
        with capture_logs() as logs:
            assert limiter.settle_soon([scope], -90, 0) is None
        health = limiter.health()
        assert (health["owed"], health["owedDropped"]) == (0, 1)
        assert [e["event"] for e in logs] == ["owed_settlements_lost"]
        assert logs[0]["count"] == 1 and logs[0]["log_level"] == "warning"
    finally:
        own_redis.resume()


async def test_a_request_admitted_in_memory_during_an_outage_is_settled_there(
    own_redis: RedisServer,
) -> None:
    """Admitted in the local counters while Redis was down, a request's reservation is
    there: its settlement goes there too, even when Redis is back by then (Redis never held
    that reservation: taking it back there would erase other requests' usage)."""
    limiter = Limiter(counter_storage(own_redis.url), "local")
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope("p:fleet", "chat", token_windows=(tokens,))
    try:
        await limiter.admit_held([scope], 50)
        await limiter.settle([scope], tokens=-10, cost_nano_usd=0)  # 40 used, in Redis
        own_redis.kill()
        _, _, where = await limiter.admit_held([scope], 100)  # held in memory
        assert where is Held.LOCAL
        (state,) = await limiter.usage("p:fleet", "chat", [tokens], "t")
        assert state.used == 100
        own_redis.start()
        await limiter.admit([scope])  # (an admission on the new Redis... once it is found)
        await until_healthy(limiter)
        await limiter.settle([scope], tokens=-80, cost_nano_usd=0, held=Held.LOCAL)
        assert limiter.settle_soon([scope], -5, 0, held=Held.LOCAL) is None  # (at once)
        assert limiter.guard.local.read_many([scope.token_counters[0]])[0][2] == 15
        assert await redis_tokens(own_redis.url, scope, tokens) == 0  # (a new Redis: empty)
        assert limiter.health()["owed"] == 0
    finally:
        await limiter.close()


async def test_close_cancels_the_probe_during_an_outage(own_redis: RedisServer) -> None:
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    scope = Scope("p:fleet", "chat", request_windows=(Window("hour", 3_600, 3),))
    own_redis.kill()
    before = asyncio.all_tasks()
    assert (await attempt(limiter, scope))[0] == "200"
    started = asyncio.all_tasks() - before  # the outage's probe, waiting to try again
    assert started and not any(t.done() for t in started)
    await limiter.close()
    assert all(t.cancelled() for t in started)  # none left behind


async def test_health_says_redis_is_gone_on_an_idle_instance(
    own_redis: RedisServer, backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With no request to fail a Redis call, ``/health`` itself looks (a PING, at most once
    a second): it said healthy for as long as Redis was gone, until a limited request came
    (or the ledger had something to write).  Back, the probe finds it as after any
    outage."""
    config = {
        "models": {"chat": chat_model(backend)},
        "roles": {"user": {"limits": {"chat": {"minute": "10000000"}}}},
        "keys": {KEY: {"project": "fleet", "role": "user"}},
    }
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), ledger="off")
    proxy = await make_proxy(config, storage=counter_storage(own_redis.url), settings=settings)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url("/health")) as r:
            assert (await r.json())["storage"]["healthy"] is True
        own_redis.kill()
        await health_says(s, proxy.url("/health"), healthy=False)
        async with s.get(proxy.url("/health")) as r:
            storage_ = (await r.json())["storage"]
        assert (storage_["outages"], storage_["fallbacks"]) == (1, 0)  # (no request answered)
        own_redis.start()
        await health_says(s, proxy.url("/health"), healthy=True)


async def test_a_request_the_app_admitted_in_memory_is_settled_there_after_redis_is_back(
    own_redis: RedisServer, backend: Backend, make_proxy: ProxyFactory
) -> None:
    """Through the app: a request admitted in the local counters while Redis was down,
    answered after Redis is back, gives back its reservation there, not in Redis (where it
    would erase the usage Redis holds of the requests since)."""
    config = {
        "models": {"chat": chat_model(backend)},
        "roles": {"user": {"limits": {"chat": {"minute": "10000000"}}}},
        "keys": {KEY: {"project": "fleet", "role": "user"}},
    }
    proxy = await make_proxy(config, storage=counter_storage(own_redis.url))
    url = proxy.url("/openai/deployments/chat/chat/completions")
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        async with s.post(url, json=CHAT) as r:  # (Redis prepared)
            assert r.status == 200
        own_redis.kill()  # (refused at once: the admission below never reaches Redis)
        backend.control.first_byte_delay = 3.0  # (answered after Redis is back)
        late = asyncio.create_task(s.post(url, json=CHAT))
        # (its admission failed: held in the local counters)
        await health_says(s, proxy.url("/health"), healthy=False)
        own_redis.start()
        await health_says(s, proxy.url("/health"), healthy=True)
        backend.control.first_byte_delay = 0.0
        async with s.post(url, json=CHAT) as r:  # counted in the new Redis
            assert r.status == 200
            since = (await r.json())["usage"]["total_tokens"]
        assert await used_tokens(proxy, KEY, "chat") == since
        async with await late as r:
            assert r.status == 200
            await r.read()
    # the late request's reservation was given back where it was held, not in Redis
    assert await used_tokens(proxy, KEY, "chat") == since


async def test_an_upstream_capacity_hold_taken_in_memory_is_settled_there(
    own_redis: RedisServer, backend: Backend, make_proxy: ProxyFactory
) -> None:
    """Through the app: an upstream's capacity (`limits`, `minute: 40` tokens) held in the
    local counters while Redis was down, answered after Redis is back, is settled there;
    Redis keeps what it counted since, so the upstream is at capacity when Redis says so.
    Each request holds its estimate (the body's bytes / 4 + max_tokens 10) while in flight,
    then counts what it used (7)."""
    config = {
        "models": {
            "m": {
                "type": "chat",
                "upstreams": [{"endpoint": backend.url(), "key": "a", "limits": {"minute": 40}}],
            }
        },
        "keys": {KEY: {"project": "fleet", "role": "default"}},
    }
    proxy = await make_proxy(config, storage=counter_storage(own_redis.url))
    url = proxy.url("/openai/deployments/m/chat/completions")
    body = {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10}
    await clear_of_minute_boundary(15.0)  # (the Redis counts below in one minute bucket)
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:

        async def status() -> int:
            async with s.post(url, json=body) as r:
                await r.read()
                return r.status

        assert await status() == 200  # (Redis prepared)
        own_redis.kill()  # (refused at once: the hold below never reaches Redis)
        backend.control.first_byte_delay = 3.0  # (answered after Redis is back)
        late = asyncio.create_task(status())
        await health_says(s, proxy.url("/health"), healthy=False)
        own_redis.start()  # (a new Redis: nothing counted)
        await health_says(s, proxy.url("/health"), healthy=True)
        backend.control.first_byte_delay = 0.0
        assert await status() == 200  # 7 in Redis
        assert await late == 200  # its hold settled in memory, nothing taken from Redis
        # 7 + 5 x 7 = 42 >= 40: the sixth is refused (a hold taken back from Redis would
        # have let a seventh through)
        assert [await status() for _ in range(6)] == [200] * 5 + [429]


async def test_the_app_under_deny_answers_503_and_health_says_why(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """In process: no Redis at all, ``deny``: a limited request is a DIAL-style 503."""
    config = {
        "models": {"chat": chat_model(backend), "free": chat_model(backend)},
        "roles": {"user": {"limits": {"chat": {"requestHour": "5"}, "free": {}}}},
        "keys": {KEY: {"project": "fleet", "role": "user"}},
    }
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),))
    proxy = await make_proxy(
        config,
        storage=counter_storage(f"redis://127.0.0.1:{free_port()}/0"),
        settings=replace(settings, storage_failure="deny"),
    )
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        # from the start, before any limited request (it said healthy till the first)
        async with s.get(proxy.url("/health")) as r:
            assert (await r.json())["storage"]["healthy"] is False
        for model, status in (("chat", 503), ("chat", 503), ("free", 200)):
            url = proxy.url(f"/openai/deployments/{model}/chat/completions")
            async with s.post(url, json=CHAT) as r:
                assert r.status == status
                if status == 503:
                    assert r.headers["Retry-After"] == "1"
                    assert await r.json() == {
                        "error": {"message": "Rate limit storage is unavailable", "code": "503"}
                    }
        async with s.get(proxy.url("/health")) as r:
            assert r.status == 200
            body = await r.json()
    assert body["storage"] == {
        "backend": "redis",
        "healthy": False,
        "policy": "deny",
        "failures": 1,
        "fallbacks": 2,
        "outages": 1,
        "owed": 0,
        "owedDropped": 0,
    }


async def test_redis_lost_while_only_unlimited_requests_come_shows_in_health(
    backend: Backend, make_proxy: ProxyFactory, own_redis: RedisServer, tmp_path: Path
) -> None:
    """No limited request to notice it: the usage ledger's write, in the same Redis, fails,
    and ``/health`` says the storage is down (it said healthy), then up once it is back."""
    config = {
        "models": {"free": chat_model(backend)},
        "roles": {"user": {"limits": {"free": {}}}},
        "keys": {KEY: {"project": "fleet", "role": "user"}},
    }
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),))
    proxy = await make_proxy(config, storage=counter_storage(own_redis.url), settings=settings)
    url = proxy.url("/openai/deployments/free/chat/completions")
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        async with s.post(url, json=CHAT) as r:
            assert r.status == 200
        await health_says(s, proxy.url("/health"), healthy=True)
        own_redis.kill()
        async with s.post(url, json=CHAT) as r:
            assert r.status == 200  # (nothing limited: served)
        assert not await proxy.app[LEDGER].flush()
        await health_says(s, proxy.url("/health"), healthy=False)
        own_redis.start()
        await health_says(s, proxy.url("/health"), healthy=True)


# --- two instances on one Redis ---------------------------------------------------------------


def fleet_config(backend: BackendProcess, request_hour: int = 100) -> dict[str, Any]:
    upstream = [{"endpoint": backend.url(), "key": "demo"}]
    return {
        "models": {
            "chat": {"type": "chat", "upstreams": upstream},
            "tokens": {"type": "chat", "upstreams": upstream},
            "busy": {"type": "chat", "upstreams": upstream},
        },
        "roles": {
            "user": {
                "limits": {
                    "chat": {"requestHour": str(request_hour)},
                    "tokens": {"minute": "5"},
                    "busy": {"minute": "1000000000", "requestDay": "1000000000"},
                }
            }
        },
        "keys": {KEY: {"project": "fleet", "role": "user"}},
    }


@pytest.fixture(scope="module")
def demo_backend() -> Iterator[BackendProcess]:
    backend = BackendProcess()
    try:
        backend.wait_ready()
        yield backend
    finally:
        backend.stop()


def start_fleet(
    config: dict[str, Any], directory: Path, storage: str, *args: str
) -> list[ProxyProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "aidial.config.json"
    path.write_text(json.dumps(config))
    proxies: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            proxies.append(
                ProxyProcess(path, "--storage", storage, *args, log=directory / f"{name}.log")
            )
        for proxy in proxies:
            proxy.wait_ready()
    except BaseException:
        for proxy in proxies:
            proxy.stop()
        raise
    return proxies


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer,
    demo_backend: BackendProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ProxyProcess]]:
    """Two `dialproxy serve` processes on the session's Redis."""
    proxies = start_fleet(
        fleet_config(demo_backend), tmp_path_factory.mktemp("fleet"), redis_server.url
    )
    yield proxies
    for proxy in proxies:
        proxy.stop()
    for proxy in proxies:  # everything the processes wrote on stderr
        assert_json_lines_without_secrets(proxy.log())


@dataclass
class Answer:
    instance: int
    sent: float
    received: float
    status: int | None  # None: no HTTP answer at all
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: str | None = None


async def chat(
    session: aiohttp.ClientSession, proxies: list[ProxyProcess], i: int, model: str = "chat"
) -> Answer:
    sent = time.monotonic()
    url = proxies[i].url + f"/openai/deployments/{model}/chat/completions"
    try:
        async with session.post(url, json=CHAT, headers={"Api-Key": KEY}) as r:
            raw = await r.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            return Answer(i, sent, time.monotonic(), r.status, dict(r.headers), body)
    except (aiohttp.ClientError, TimeoutError) as e:
        return Answer(i, sent, time.monotonic(), None, error=type(e).__name__)


def client(limit: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=20),
    )


async def test_two_instances_admit_exactly_the_limit(
    fleet: list[ProxyProcess], redis_server: RedisServer
) -> None:
    """1,000 requests at once, spread over two processes, ``requestHour: 100``."""
    redis_server.flush()
    async with client(limit=1000) as s:
        started = time.monotonic()
        answers = await asyncio.gather(*(chat(s, fleet, i % 2) for i in range(1000)))
        took = time.monotonic() - started
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 100, 429: 900}, statuses
    per_instance = [Counter(a.status for a in answers if a.instance == i) for i in (0, 1)]
    assert all(sum(c.values()) == 500 for c in per_instance)
    refused = next(a for a in answers if a.status == 429)
    assert refused.body["error"]["message"] == (
        "Hit request rate limit. Hour limit: 100 / 100 requests."
    )
    assert refused.headers["Retry-After"].isdigit()
    assert await counted(redis_server.url) == 100
    print(
        f"\n1,000 requests over 2 instances in {took:.2f} s: admitted "
        f"{per_instance[0][200]} + {per_instance[1][200]} = 100, refused 900"
    )


async def test_token_usage_through_one_instance_blocks_the_other(
    fleet: list[ProxyProcess], redis_server: RedisServer
) -> None:
    redis_server.flush()
    a, b = 0, 1
    async with client() as s:
        first = await chat(s, fleet, a, model="tokens")
        assert first.status == 200
        tokens = first.body["usage"]["total_tokens"]
        assert tokens > 5  # over the minute limit of 5: the next request must wait
        # Usage is added after the response: B's view of the project shows it shortly.
        deadline = time.monotonic() + 2
        while True:
            async with s.get(
                fleet[b].url + "/v1/deployments/tokens/limits", headers={"Api-Key": KEY}
            ) as r:
                stats = (await r.json())["minuteTokenStats"]
            if stats["used"] == tokens or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert stats == {"total": 5, "used": tokens}
        second = await chat(s, fleet, b, model="tokens")
    assert second.status == 429
    assert second.body["error"]["message"] == (
        f"Hit token rate limit. Minute limit: {tokens} / 5 tokens."
    )


async def storage_health(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Any:
    async with session.get(proxy.url + "/health") as r:
        return (await r.json())["storage"]


async def test_clients_that_go_away_never_knock_an_instance_off_redis(
    fleet: list[ProxyProcess],
) -> None:
    """Half the clients leave after 0-5 ms, mid-request (their handlers are cancelled while
    they wait on Redis): every other request's Redis call goes on; no outage, no
    fallback, and both instances see the same counters."""
    url = "/openai/deployments/busy/chat/completions"
    rng = random.Random(7)

    async def leaving(session: aiohttp.ClientSession, i: int) -> Answer | None:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(rng.uniform(0.001, 0.02)):
                async with session.post(
                    fleet[i % 2].url + url, json=CHAT, headers={"Api-Key": KEY}
                ) as r:
                    await r.read()
        return None  # (gone: no answer to count)

    async with client(limit=500) as s:
        before = [await storage_health(s, p) for p in fleet]
        work: list[Coroutine[Any, Any, Answer | None]] = [leaving(s, i) for i in range(1000)]
        work += [chat(s, fleet, i % 2, "busy") for i in range(1000)]
        rng.shuffle(work)
        answers = [a for a in await asyncio.gather(*work) if a is not None]
        after = [await storage_health(s, p) for p in fleet]
        limits = []
        for p in fleet:
            async with s.get(p.url + "/v1/deployments/busy/limits", headers={"Api-Key": KEY}) as r:
                limits.append((await r.json())["dayRequestStats"]["used"])
    assert Counter(a.status for a in answers) == {200: 1000}
    for b, a in zip(before, after, strict=True):
        assert (a["outages"], a["fallbacks"], a["failures"]) == (
            b["outages"],
            b["fallbacks"],
            b["failures"],
        ), (b, a)
    assert limits[0] == limits[1] >= 1000


# --- an outage under load, two processes, each policy -----------------------------------------

LIMIT = 20  # requestHour in the outage tests


class Load:
    """Workers sending chat requests to both instances until the block ends."""

    def __init__(
        self, session: aiohttp.ClientSession, proxies: list[ProxyProcess], workers: int = 4
    ) -> None:
        self.session = session
        self.proxies = proxies
        self.workers = workers
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _work(self, i: int) -> None:
        while not self._stop.is_set():
            self.answers.append(await chat(self.session, self.proxies, i))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Load:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._work(i))
            for i in range(len(self.proxies))
            for _ in range(self.workers)
        ]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, seen: Callable[[Answer], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(seen(a) for a in self.answers):
            assert time.monotonic() < deadline, "the load never saw what it waited for"
            await asyncio.sleep(0.01)


async def until_shared(
    session: aiohttp.ClientSession,
    proxies: list[ProxyProcess],
    redis: RedisServer,
    timeout: float = 10.0,
) -> float:
    """Seconds until a request through each instance is counted in Redis (reported, not
    asserted; the timeout is generous: the instances' probes run every 0.5 s)."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        before = await counted(redis.url)
        answers = [await chat(session, proxies, 0), await chat(session, proxies, 1)]
        after = await counted(redis.url)
        ok = before is not None and after is not None and after - before == 2
        if ok and all(a.status == 200 for a in answers):
            return time.monotonic() - started
        assert time.monotonic() < deadline, "shared counting never resumed"
        await asyncio.sleep(0.02)


def in_outage(answers: list[Answer], start: float, end: float) -> list[Answer]:
    """Answers to requests sent after Redis stopped and answered before it came back."""
    return [a for a in answers if a.sent > start and a.received < end]


async def health(session: aiohttp.ClientSession, proxy: ProxyProcess) -> dict[str, Any]:
    async with session.get(proxy.url + "/health") as r:
        body: dict[str, Any] = await r.json()
        return body


@pytest.fixture
def stopped_at_end() -> Iterator[list[ProxyProcess]]:
    """Proxy processes a test starts itself: stopped when it ends."""
    proxies: list[ProxyProcess] = []
    yield proxies
    for proxy in proxies:
        proxy.stop()


def check_outage(policy: str, outage: list[Answer]) -> None:
    assert len(outage) >= 20, "too little load during the outage"
    statuses = Counter(a.status for a in outage)
    if policy == "allow":
        assert statuses == {200: len(outage)}, statuses
    elif policy == "deny":
        assert statuses == {503: len(outage)}, statuses
        for a in outage:
            assert a.headers["Retry-After"] == "1"
            assert a.body == {
                "error": {"message": "Rate limit storage is unavailable", "code": "503"}
            }
    else:
        assert set(statuses) <= {200, 429}, statuses


@pytest.mark.parametrize("policy", POLICIES)
async def test_outage_under_load(
    policy: str,
    own_redis: RedisServer,
    demo_backend: BackendProcess,
    tmp_path: Path,
    stopped_at_end: list[ProxyProcess],
) -> None:
    """SIGSTOP then SIGKILL under load, a restart; then SIGSTOP and SIGCONT."""
    proxies = start_fleet(
        fleet_config(demo_backend, request_hour=LIMIT),
        tmp_path / "fleet",
        own_redis.url,
        "--storage-failure",
        policy,
    )
    stopped_at_end.extend(proxies)
    async with client() as s:
        async with Load(s, proxies) as load:
            await load.until(lambda a: a.status == 429)  # the shared limit is reached...
            await asyncio.sleep(0.2)  # ...and every request it admitted is answered
            own_redis.pause()
            stopped = time.monotonic()  # (after: a request sent before may reach Redis)
            await asyncio.sleep(1.0)
            own_redis.kill()
            await asyncio.sleep(0.5)
            back = time.monotonic()
        first = load.answers
        own_redis.start()
        resume_after_restart = await until_shared(s, proxies, own_redis)

        async with Load(s, proxies) as load:
            await asyncio.sleep(0.3)
            own_redis.pause()
            stopped_again = time.monotonic()
            await asyncio.sleep(0.8)
            continued = time.monotonic()
            own_redis.resume()
        second = load.answers
        await asyncio.sleep(0.05)  # what timed out during the pause is applied now...
        own_redis.flush()  # ...and forgotten, so that the next count is ours alone
        resume_after_cont = await until_shared(s, proxies, own_redis)
        healths = [await health(s, p) for p in proxies]

    # Every request got an HTTP answer, never a 500 or a 401.
    everything = first + second
    assert all(a.error is None for a in everything), Counter(a.error for a in everything)
    allowed = {200, 429, 503} if policy == "deny" else {200, 429}
    assert {a.status for a in everything} <= allowed, Counter(a.status for a in everything)
    # Before the outage the limit was shared and exact.
    before = [a for a in first if a.received < stopped]
    assert sum(a.status == 200 for a in before) == LIMIT
    outages = [in_outage(first, stopped, back), in_outage(second, stopped_again, continued)]
    for outage in outages:
        check_outage(policy, outage)
    if policy == "local":  # each instance kept the limit on its own
        for i in (0, 1):
            served = [a for o in outages for a in o if a.instance == i]
            admitted = sum(a.status == 200 for a in served)
            assert 1 <= admitted <= LIMIT
            assert any(a.status == 429 for a in served)
    for h in healths:
        storage = h["storage"]
        assert storage["backend"] == "redis" and storage["policy"] == policy
        assert storage["healthy"] is True and storage["outages"] == 2
        assert storage["failures"] >= 2 and storage["fallbacks"] > 0
    for proxy in proxies:
        assert "Traceback" not in proxy.log()
    print(
        f"\n{policy}: {len(everything)} requests, outage answers "
        f"{[dict(Counter(a.status for a in o)) for o in outages]}, shared counting back "
        f"{resume_after_restart:.2f} s after the restart, {resume_after_cont:.2f} s after SIGCONT"
    )


# --- the script calls' own connection: its set-up, a Redis that lost its scripts, TLS -------


async def test_script_calls_authenticate_and_use_the_urls_database(own_redis: RedisServer) -> None:
    """The counters' script calls go on a connection of their own (not redis-py's): it
    sends the URL's password and selects its database like every other call."""
    own_redis.command("CONFIG", "SET", "requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{own_redis.port}/3"
    limiter = Limiter(counter_storage(url), "deny")
    scope = Scope("p:auth", "chat", request_windows=(Window("hour", 3_600, 5),))
    check = redis.asyncio.Redis.from_url(url)
    other = redis.asyncio.Redis.from_url(url.removesuffix("/3") + "/0")
    try:
        await admit_request(limiter, scope)
        await admit_request(limiter, scope)
        assert limiter.health()["failures"] == 0
        assert await check.keys("LIMITS:*") != []  # in database 3 ...
        assert await other.dbsize() == 0  # ... not in 0
    finally:
        await check.aclose()
        await other.aclose()
        await limiter.close()
    wrong = Limiter(counter_storage(f"redis://:nope@127.0.0.1:{own_redis.port}/3"), "deny")
    try:  # a refused password is an outage (deny: 503), not a hang
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(admit_request(wrong, scope), MARGIN)
    finally:
        await wrong.close()


async def test_a_refused_auth_that_echoes_the_password_never_logs_it(tmp_path: Path) -> None:
    """A Redis that does not know AUTH (renamed, or a proxy in front) answers it with an
    error quoting its arguments: the password.  The outage is logged without it."""
    server = RedisServer(tmp_path / "redis", extra=("--rename-command", "AUTH", ""))
    server.start()
    secret = "sekrit-" + new_key()
    limiter = Limiter(counter_storage(f"redis://:{secret}@127.0.0.1:{server.port}/0"), "deny")
    scope = Scope("p:auth", "chat", request_windows=(Window("hour", 3_600, 5),))
    try:
        with capture_logs() as logs:
            with pytest.raises(StorageUnavailable) as refused:
                await asyncio.wait_for(admit_request(limiter, scope), MARGIN)
            await asyncio.sleep(2 * storage.PROBE_INTERVAL)  # (the probe tries it too)
        assert [e for e in logs if e["event"] == "storage_unavailable"]
        assert secret not in repr(logs) and secret not in str(refused.value)
    finally:
        await limiter.close()
        server.stop()


async def test_a_redis_that_lost_its_scripts_runs_the_call_anyway(own_redis: RedisServer) -> None:
    """SCRIPT FLUSH (or a restart without persistence) between two admissions: the call
    that finds its script gone is loaded and run again, counted once, and no outage."""
    limiter = Limiter(counter_storage(own_redis.url), "deny")
    scope = Scope("p:fleet", "chat", request_windows=(Window("hour", 3_600, 5),))
    try:
        await admit_request(limiter, scope)
        own_redis.command("SCRIPT", "FLUSH")
        await admit_request(limiter, scope)
        await admit_request(limiter, scope)
        assert await counted(own_redis.url) == 3
        assert limiter.health()["failures"] == 0
    finally:
        await limiter.close()


class _HostileRedis:
    """A TCP server on a free port that answers ``reply`` to whatever it is sent (None:
    never answers)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> _HostileRedis:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    if self.reply is not None:
                        writer.write(self.reply)
                        await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize(
    "reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None], ids=["not RESP", "silent"]
)
async def test_a_hostile_redis_is_an_outage_not_a_hang(reply: bytes | None) -> None:
    """Bytes that are not Redis's protocol, or no answer at all: the call fails within the
    read timeout and the storage is marked down (deny: 503), nothing waits for ever."""
    async with _HostileRedis(reply) as hostile:
        storage = RedisCounters(f"redis://127.0.0.1:{hostile.port}/0")
        try:
            started = time.monotonic()
            with pytest.raises((ConnectionError, TimeoutError, redis.exceptions.RedisError)):
                await asyncio.wait_for(
                    storage.admit([("p:h:chat:r:hour", 3_600)], [5], [1], [1]), MARGIN + 5
                )
            assert time.monotonic() - started < TIMEOUT + MARGIN
        finally:
            await close_storage(storage)


async def test_rediss_counts_over_tls(tmp_path: Path) -> None:
    """rediss://: the script calls' own connection speaks TLS with the URL's CA, like
    redis-py's; a server certificate the client cannot trust is an outage, not a call."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        extra=(
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert_file),
            "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
            "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    server.start()
    scope = Scope("p:fleet", "chat", request_windows=(Window("hour", 3_600, 5),))
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}"
        limiter = Limiter(counter_storage(url), "deny")
        try:
            await admit_request(limiter, scope)
            await admit_request(limiter, scope)
            assert limiter.health()["failures"] == 0
        finally:
            await limiter.close()
        assert await counted(server.url) == 2  # (read back over the plain port)
        # ssl_cert_reqs=none: encrypted, the certificate not checked (nor its name)
        unchecked = Limiter(
            counter_storage(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none"), "deny"
        )
        try:
            await admit_request(unchecked, scope)
            assert unchecked.health()["failures"] == 0
        finally:
            await unchecked.close()
        assert await counted(server.url) == 3
        untrusted = Limiter(counter_storage(f"rediss://127.0.0.1:{tls_port}/0"), "deny")
        try:
            with pytest.raises(StorageUnavailable):
                await asyncio.wait_for(admit_request(untrusted, scope), MARGIN)
        finally:
            await untrusted.close()
    finally:
        server.stop()


async def test_a_redis_that_lost_its_scripts_and_may_not_load_them_is_an_outage(
    own_redis: RedisServer,
) -> None:
    """Scripts lost (a restart, SCRIPT FLUSH) and SCRIPT LOAD refused (an ACL tightened
    since the start): the call is re-sent once, then fails; the storage goes down (deny:
    503) at once, the call is not sent for ever nor left waiting."""
    own_redis.command("ACL", "SETUSER", "lim", "on", ">pw", "~*", "&*", "+@all")
    limiter = Limiter(counter_storage(f"redis://lim:pw@127.0.0.1:{own_redis.port}/0"), "deny")
    scope = Scope("p:fleet", "chat", request_windows=(Window("hour", 3_600, 5),))
    try:
        await admit_request(limiter, scope)
        own_redis.command("ACL", "SETUSER", "lim", "-script|load")
        own_redis.command("SCRIPT", "FLUSH")
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(admit_request(limiter, scope), MARGIN)
        stats = own_redis.command("INFO", "commandstats")
        assert isinstance(stats, bytes)
        lines = stats.decode().splitlines()
        evalsha = next(line for line in lines if "cmdstat_evalsha" in line)
        assert "calls=3," in evalsha  # the first admission, the call, its one re-sending
    finally:
        await limiter.close()


async def test_every_call_redis_fails_is_counted(own_redis: RedisServer) -> None:
    """Redis killed under calls in flight: each failed call is counted in ``failures``
    (/health, the metrics), the outage once."""
    limiter = Limiter(counter_storage(own_redis.url), "allow")
    scope = Scope("p:fleet", "chat", request_windows=(Window("hour", 3_600, 50),))
    try:
        await admit_request(limiter, scope)
        own_redis.kill()
        await asyncio.gather(*(admit_request(limiter, scope) for _ in range(5)))
        health = limiter.health()
        assert (health["failures"], health["outages"], health["fallbacks"]) == (5, 1, 5)
    finally:
        await limiter.close()


class _Relay:
    """A TCP relay to a Redis whose connections can be made silently dead: their bytes
    dropped, the sockets left open (a failover, a NAT or load balancer losing the flow)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.flows: list[object] = []
        self.dead: set[object] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, flow: object) -> None:
            try:
                while data := await r.read(65536):
                    if flow not in self.dead:
                        w.write(data)
            finally:
                w.close()

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
            flow = object()
            self.flows.append(flow)
            await asyncio.gather(pipe(r, uw, flow), pipe(ur, w, flow), return_exceptions=True)

        self.server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def kill_flows(self) -> None:
        self.dead.update(self.flows)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_storage_prepared_again_trusts_no_connection_from_before(
    own_redis: RedisServer,
) -> None:
    """Every connection gone silently dead, then the storage prepared again (what the
    outage probe does when Redis answers again): the next admission goes on a fresh
    connection, not on the dead one (which would time out and knock it down again)."""
    relay = _Relay(own_redis.port)
    port = await relay.start()
    storage = RedisCounters(f"redis://127.0.0.1:{port}/0")
    window = ("dp:p:fleet:chat:r:hour", 3_600)  # (the hour window counted() reads)
    try:
        await storage.prepare()
        assert (await storage.admit([window], [10], [1], [1]))[0] == 0
        relay.kill_flows()
        await storage.prepare()  # (fresh pool connections: it answers)
        refused, _ = await asyncio.wait_for(storage.admit([window], [10], [1], [1]), MARGIN)
        assert refused == 0
        assert await counted(own_redis.url) == 2
    finally:
        await close_storage(storage)
        await relay.stop()


async def test_closed_counters_leave_no_connection_open(own_redis: RedisServer) -> None:
    """A call whose caller left in the turn it was made, then close(): no connection is
    opened after it (nor left open)."""

    def clients() -> int:
        info = own_redis.command("INFO", "clients")
        assert isinstance(info, bytes)
        lines = info.decode().splitlines()
        line = next(x for x in lines if x.startswith("connected_clients:"))
        return int(line.split(":")[1]) - 1  # (less the INFO's own connection)

    storage = RedisCounters(own_redis.url)
    await storage.prepare()
    future, _ = storage.admit_soon([("p:fleet:chat:r:hour", 3_600)], [10], [1], [1])
    future.cancel()
    await close_storage(storage)
    await asyncio.sleep(0.3)  # (what a flush or a connection scheduled before would do)
    assert clients() == 0


async def test_an_admission_whose_client_left_before_redis_answered_is_given_back(
    own_redis: RedisServer,
) -> None:
    """A request cancelled (its client gone) after its admission went to Redis and before
    the answer came: Redis admitted it all the same, so its reservation is taken back and
    its concurrency slot freed as soon as the answer comes, not held for the slot's lease
    (a minute) or the window; the request stays counted (as in memory)."""
    limiter = Limiter(counter_storage(own_redis.url), "deny")
    tokens = Window("hour", 3_600, 1_000)
    scope = Scope(
        "p:fleet", "chat", token_windows=(tokens,),
        request_windows=(Window("hour", 3_600, 100),), concurrency=1,
    )  # fmt: skip
    try:
        await limiter.admit([scope])  # (connected, prepared)
        leaving = asyncio.ensure_future(limiter.admit([scope], 300, member="leaves"))
        await asyncio.sleep(0)  # (its call made)
        await asyncio.sleep(0)  # (its batch written)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        deadline = time.monotonic() + MARGIN
        while True:  # (its answer, then the give-back, a round trip each)
            (state,) = await limiter.usage("p:fleet", "chat", [tokens], "t")
            if state.used == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert state.used == 0  # the 300 tokens reserved, taken back
        await limiter.admit([scope], 300, member="next")  # the one slot is free
        (requests,) = await limiter.usage("p:fleet", "chat", [Window("hour", 3_600, 100)], "r")
        assert requests.used == 3
    finally:
        await limiter.close()


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_slot_taken_by_an_admission_that_timed_out_is_freed_when_redis_is_back(
    own_redis: RedisServer, policy: str
) -> None:
    """An admission that timed out (Redis paused) is one script call, applied whole when
    Redis resumes: its slot then sits in Redis though the request, served meanwhile by the
    policy, has long ended.  It is freed when Redis is back (owed), not a lease (a minute)
    later: before, a one-second stall locked a project with a cap out of every instance."""
    limiter = Limiter(counter_storage(own_redis.url), policy)
    scope = Scope(
        "p:fleet", "chat", request_windows=(Window("hour", 3_600, 100),), concurrency=1
    )  # fmt: skip
    try:
        await limiter.admit([scope], member="first")  # (connected, prepared)
        await limiter.settle([scope], 0, 0, member="first")
        own_redis.pause()
        with contextlib.suppress(ProxyError):  # (deny: a 503)
            request = await limiter.admit_held([scope], member="stalled")
            await limiter.settle([scope], 0, 0, "stalled", held=request[2])
        # the admission answered by the policy, once (and under allow, its settlement)
        assert limiter.health()["fallbacks"] == {"deny": 1, "allow": 2, "local": 1}[policy]
        own_redis.resume()
        await until_repaid(limiter)
        await limiter.admit([scope], member="next")  # the one slot is free in Redis
    finally:
        await limiter.close()


async def test_a_slot_whose_settlement_was_lost_is_freed_when_redis_is_back(
    own_redis: RedisServer,
) -> None:
    """A settlement sent to Redis and failed (a timeout, the connection dropped): not owed,
    since it may yet be applied (its amounts would count twice), but its slot release is
    (freeing a slot twice frees it once); before, the slot stayed taken for the lease, the
    project capped on every instance."""
    limiter = Limiter(counter_storage(own_redis.url), "local")
    scope = Scope(
        "p:fleet", "chat", request_windows=(Window("hour", 3_600, 100),), concurrency=1
    )  # fmt: skip
    try:
        await limiter.admit([scope], member="lost")
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        limiter.guard.watch(lost, [], [], [scope.slot_set], "lost")  # (its call, as sent)
        lost.set_exception(TimeoutError())  # (what Redis never answered)
        await asyncio.sleep(0)
        assert limiter.health()["owed"] == 1
        await until_repaid(limiter)
        await limiter.admit([scope], member="next")  # the one slot is free in Redis
    finally:
        await limiter.close()


def _capped(owner: str) -> Scope:
    """A scope of one token window and one slot (what a cancelled admission must give back)."""
    return Scope(
        owner, "chat", token_windows=(Window("hour", 3_600, 1_000),),
        request_windows=(Window("hour", 3_600, 100),), concurrency=1,
    )  # fmt: skip


async def _tokens_held(url: str, owner: str) -> int:
    reader = Limiter(counter_storage(url), "deny")
    try:
        (state,) = await reader.usage(owner, "chat", [Window("hour", 3_600, 1_000)], "t")
        return state.used
    finally:
        await reader.close()


@pytest.mark.parametrize("warm", [True, False], ids=["prepared", "first call"])
async def test_admissions_cancelled_at_every_moment_are_given_back(
    own_redis: RedisServer, warm: bool
) -> None:
    """A request cancelled after 0 to 200 turns of the loop (before its call is made,
    before it is written, with its answer on its way, in the same turn as the answer,
    after it; on its first call, while the storage is being prepared too): whatever Redis
    took is given back (or the request holds it, admitted, and settles it), and the
    scope's one slot is free again."""
    for k in (*range(12), *range(12, 200, 7)):
        owner = f"p:k{k}{'w' if warm else 'f'}"
        scope = _capped(owner)
        limiter = Limiter(counter_storage(own_redis.url), "deny")
        try:
            if warm:
                await limiter.admit([_capped("p:warm")])
            leaving = asyncio.ensure_future(limiter.admit([scope], 300, member="leaves"))
            for _ in range(k):
                await asyncio.sleep(0)
            leaving.cancel()
            try:
                await leaving
            except asyncio.CancelledError:
                pass
            else:  # (admitted before the cancel: the request holds it and settles it)
                await limiter.settle([scope], -300, 0, member="leaves")
            for _ in range(int(MARGIN / 0.01)):  # (the answer, then the give-back's)
                if not (held := await _tokens_held(own_redis.url, owner)):
                    break
                await asyncio.sleep(0.01)
            assert held == 0, f"after {k} turns"
            await limiter.admit([scope], 10, member="next")  # the slot is free
        finally:
            await limiter.close()


async def test_an_admission_cancelled_just_before_shutdown_is_given_back(
    own_redis: RedisServer,
) -> None:
    """The client leaves, and the process stops before Redis answered: close() waits for
    the answer and gives back what it took (not held for the window, nor the slot for its
    lease)."""
    scope = _capped("p:closing")
    limiter = Limiter(counter_storage(own_redis.url), "deny")
    await limiter.admit([_capped("p:warm")])
    leaving = asyncio.ensure_future(limiter.admit([scope], 300, member="leaves"))
    await asyncio.sleep(0)  # (its call made)
    await asyncio.sleep(0)  # (written)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await limiter.close()
    assert await _tokens_held(own_redis.url, "p:closing") == 0
    other = Limiter(counter_storage(own_redis.url), "deny")
    try:
        await other.admit([scope], 10, member="next")  # the slot is free
    finally:
        await other.close()
