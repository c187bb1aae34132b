"""A big config is rebuilt off the event loop: the proxy keeps answering meanwhile."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from bench.validate_bench import generate
from dialproxy.server import reload_app
from tests.conftest import Backend, ProxyFactory, new_key

KEY = new_key()


async def test_requests_are_served_while_a_big_config_builds(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    small: dict[str, Any] = {
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": backend.url()}]}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    proxy = await make_proxy(small)
    big = generate(10_000, 200)
    big["keys"][KEY] = {"project": "p", "role": "default"}
    big["models"]["chat"] = small["models"]["chat"]
    text = json.dumps(big).replace("${BENCH_UPSTREAM_KEY}", "upstream-key-for-the-test")
    proxy.path.write_text(text)
    reload = asyncio.ensure_future(reload_app(proxy.app, "test"))
    answered_during_build = 0
    async with aiohttp.ClientSession() as s:
        while not reload.done():
            async with s.get(proxy.url("/health")) as r:
                assert r.status == 200
            answered_during_build += not reload.done()
    result = await reload
    assert result.applied and len(proxy.store.snapshot.keys) == 10_001
    assert answered_during_build >= 3
