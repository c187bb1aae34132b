"""Concurrency caps (`concurrentRequests`): requests in flight at once, exact across
instances, freed when a request ends however it ends, and after an instance dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dialproxy.counting.limiter import Limiter, Scope
from dialproxy.counting.rediscounters import RedisCounters
from dialproxy.errors import ConcurrencyLimited
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from tests.conftest import AiohttpServer, Proxy, ProxyFactory, new_key
from tests.redis_server import RedisServer

KEY = new_key()
CAPPED_KEY = new_key()


class SlowUpstream:
    """A chat upstream that answers after ``delay`` and counts the requests it holds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.now = self.most = self.seen = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen += 1
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.now -= 1
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return web.json_response({"choices": [], "usage": usage})


async def slow_upstream(aiohttp_server: AiohttpServer, delay: float) -> SlowUpstream:
    upstream = SlowUpstream(delay)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    upstream.url = str((await aiohttp_server(app)).make_url("/v1/chat/completions"))
    return upstream


def config(upstream: SlowUpstream, cap: int) -> dict[str, Any]:
    return {
        "models": {"m": {"type": "chat", "upstreams": [{"endpoint": upstream.url}]}},
        "roles": {"r": {"limits": {"m": {"concurrentRequests": cap, "minute": 10**9}}}},
        "keys": {
            KEY: {"project": "p", "role": "r"},
            CAPPED_KEY: {"project": "q", "role": "r", "limits": {"m": {"concurrentRequests": 1}}},
        },
    }


async def call(s: aiohttp.ClientSession, proxy: Proxy, key: str = KEY) -> tuple[int, Any]:
    async with s.post(
        proxy.url("/openai/deployments/m/chat/completions"),
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Api-Key": key},
    ) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_a_cap_of_five_holds_under_a_hundred_at_once(
    aiohttp_server: AiohttpServer,
    make_proxy: ProxyFactory,
    request: pytest.FixtureRequest,
    storage: str,
) -> None:
    upstream = await slow_upstream(aiohttp_server, 1.0)
    cfg = config(upstream, 5)
    if storage == "memory":
        proxies = [await make_proxy(cfg)]
    else:  # two instances on one Redis
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.flush()
        proxies = [await make_proxy(cfg, storage=counter_storage(redis.url)) for _ in range(2)]
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(call(s, proxies[i % len(proxies)]) for i in range(100)))
        statuses = Counter(status for status, _ in answers)
        # never more than 5 at once at the upstream (a slow machine may admit a few more in
        # all, after the first ones end)
        assert upstream.most == 5
        assert set(statuses) == {200, 429} and statuses[200] >= 5 and statuses[429] >= 80
        refused = next(body for status, body in answers if status == 429)
        assert refused["error"]["message"] == "Hit concurrency limit: 5 / 5 requests in flight."
        for proxy in proxies:
            await proxy.settle()
        # every slot freed: the next five go through at once again
        again = await asyncio.gather(*(call(s, proxies[i % len(proxies)]) for i in range(5)))
        assert [status for status, _ in again] == [200] * 5


async def test_a_slot_is_freed_when_the_client_leaves_or_the_upstream_times_out(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    upstream = await slow_upstream(aiohttp_server, 2.0)
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), idle_timeout=0.5)
    proxy = await make_proxy(config(upstream, 10), settings=settings)
    async with aiohttp.ClientSession() as s:
        # the key's own cap of 1: a client that leaves frees its slot at once
        leaving = asyncio.ensure_future(call(s, proxy, CAPPED_KEY))
        await asyncio.sleep(0.2)
        assert (await call(s, proxy, CAPPED_KEY))[0] == 429  # the slot is held
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.sleep(0.1)
        await proxy.settle()
        # the upstream times out (0.5 s idle): the slot is freed with the 502
        status, _ = await call(s, proxy, CAPPED_KEY)
        assert status == 502
        await proxy.settle()
        assert upstream.seen == 2  # the second went on: its slot was free
        status, _ = await asyncio.wait_for(call(s, proxy, CAPPED_KEY), 5)
        assert status == 502  # (admitted again: the timeout freed it)


async def test_an_instance_that_dies_frees_its_slots_within_the_lease(
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    scope = Scope(owner="p:x", model="m", concurrency=1)
    dying = RedisCounters(redis_server.url, lease=1.0)
    other = RedisCounters(redis_server.url, lease=1.0)
    a, b = Limiter(dying), Limiter(other)
    try:
        await a.admit([scope], member="held-by-the-dead")
        with pytest.raises(ConcurrencyLimited):
            await b.admit([scope], member="second")
        await asyncio.sleep(0.7)  # renewed while it lives (every lease / 3)
        with pytest.raises(ConcurrencyLimited):
            await b.admit([scope], member="second")
        await a.close()  # dies: no settlement, no more renewals
        await asyncio.sleep(1.3)
        await b.admit([scope], member="second")  # the lease ran out
    finally:
        await b.close()


async def test_a_killed_instance_frees_its_slot_within_the_lease(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real ``dialproxy serve`` holding the only slot is killed (SIGKILL: no settlement, no
    goodbye); another instance on the same Redis refuses while the slot is held, then admits
    once the dead one's lease (``--slot-lease 3``) has run out."""
    from tests.test_workers import Served  # (real processes, as the workers' tests run them)

    redis_server.flush()
    upstream = await slow_upstream(aiohttp_server, delay=3600)  # the first call never ends
    path = tmp_path / "aidial.config.json"
    path.write_text(json.dumps(config(upstream, cap=1)))
    args = ("--config", str(path), "--storage", redis_server.url, "--slot-lease", "3")
    dying, other = Served(tmp_path, *args), Served(tmp_path, *args)
    try:
        await dying.pids(1)
        await other.pids(1)
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        url = "/openai/deployments/m/chat/completions"
        async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
            held = asyncio.ensure_future(s.post(dying.url + url, json=chat))
            for _ in range(600):  # (until the upstream holds it)
                if upstream.now:
                    break
                await asyncio.sleep(0.05)
            assert upstream.now == 1
            async with s.post(other.url + url, json=chat) as r:
                assert r.status == 429
                assert "concurrency limit: 1 / 1" in (await r.json())["error"]["message"]
            dying.stop()  # SIGKILL
            with contextlib.suppress(aiohttp.ClientError):
                await held
            upstream.delay = 0  # (the next call is answered at once)
            statuses = []
            for _ in range(60):  # the lease (3 s) and a wide margin for a busy machine
                async with s.post(other.url + url, json=chat) as r:
                    statuses.append(r.status)
                if r.status == 200:
                    break
                await asyncio.sleep(0.5)
        assert statuses[-1] == 200 and set(statuses[:-1]) <= {429}, statuses
    finally:
        dying.stop()
        other.stop()
