"""With Redis, an upstream one instance takes out is taken out on every instance."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from dialproxy.server import counter_storage
from tests.conftest import Backend, BackendFactory, Proxy, ProxyFactory, new_key
from tests.redis_server import RedisServer

KEY = new_key()


async def call(proxy: Proxy, model: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url(f"/openai/deployments/{model}/chat/completions"),
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Api-Key": KEY},
        )
        await resp.read()
        return resp


async def test_a_rate_limited_upstream_is_skipped_by_every_instance(
    backend: Backend,
    make_backend: BackendFactory,
    make_proxy: ProxyFactory,
    redis_server: RedisServer,
) -> None:
    spare = await make_backend()
    model = f"chat-{uuid.uuid4().hex[:8]}"  # the Redis server lives for the whole run
    config: dict[str, Any] = {
        "models": {
            model: {
                "type": "chat",
                "upstreams": [
                    {"endpoint": backend.url(), "key": "main"},
                    {"endpoint": spare.url(), "key": "spare", "tier": 1},
                ],
            }
        },
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    one = await make_proxy(config, storage=counter_storage(redis_server.url))
    two = await make_proxy(config, storage=counter_storage(redis_server.url))

    backend.control.fail_next(429, headers={"Retry-After": "60"})
    first = await call(one, model)
    assert (first.status, first.headers["X-UPSTREAM-ATTEMPTS"]) == (200, "2")
    # The other instance never saw the 429, yet goes straight to the spare.
    second = await call(two, model)
    assert (second.status, second.headers["X-UPSTREAM-ATTEMPTS"]) == (200, "1")
    assert len(backend.control.requests) == 1
    assert len(spare.control.requests) == 2


async def test_without_shared_storage_each_instance_has_its_own_view(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    spare = await make_backend()
    config: dict[str, Any] = {
        "models": {
            "chat": {
                "type": "chat",
                "upstreams": [
                    {"endpoint": backend.url(), "key": "main"},
                    {"endpoint": spare.url(), "key": "spare", "tier": 1},
                ],
            }
        },
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    one = await make_proxy(config)
    two = await make_proxy(config)
    backend.control.fail_next(429, headers={"Retry-After": "60"})
    assert (await call(one, "chat")).headers["X-UPSTREAM-ATTEMPTS"] == "2"
    assert (await call(two, "chat")).headers["X-UPSTREAM-ATTEMPTS"] == "1"
    assert len(backend.control.requests) == 2  # the second instance still tried main first
