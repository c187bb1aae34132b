"""An upstream's own capacity (`limits` on an upstream): at it, the upstream is skipped like
a paused one; every upstream at it, the client gets our 429 with `Retry-After`, never the
provider's."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import (
    Backend,
    BackendFactory,
    Proxy,
    ProxyFactory,
    clear_of_minute_boundary,
    new_key,
)

KEY = new_key()


async def call(s: aiohttp.ClientSession, proxy: Proxy, model: str = "m") -> tuple[int, Any, Any]:
    async with s.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        json={"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10},
        headers={"Api-Key": KEY},
    ) as r:
        return r.status, await r.json(), r.headers


def config(*upstreams: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": {
            "m": {"type": "chat", "upstreams": list(upstreams)},
            "n": {"type": "chat", "upstreams": [upstreams[0]]},  # shares the first's capacity
        },
        "keys": {KEY: {"project": "p", "role": "default"}},
    }


async def test_an_upstream_at_capacity_is_skipped_and_all_at_capacity_is_our_429(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    spare = await make_backend()
    proxy = await make_proxy(
        config(
            {"endpoint": backend.url(), "key": "a", "limits": {"requestMinute": 2}},
            {"endpoint": spare.url(), "key": "b", "limits": {"requestMinute": 2}},
        )
    )
    await clear_of_minute_boundary()  # (the requests in one minute bucket)
    async with aiohttp.ClientSession() as s:
        answers = [await call(s, proxy) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200] * 4
        assert [h["X-UPSTREAM-ATTEMPTS"] for _, _, h in answers] == ["1"] * 4
        status, body, headers = await call(s, proxy)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
        assert body["error"]["message"] == "Every upstream of m is at its capacity"
        assert body["error"]["limit_type"] == "upstream_capacity"
        # another model on the same upstream (URL and key) shares its capacity
        assert (await call(s, proxy, "n"))[0] == 429
    assert len(backend.control.requests) == 2 and len(spare.control.requests) == 2


async def test_token_capacity_counts_what_the_upstream_served(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """`minute: 40` tokens: each request holds its estimate (its body's bytes / 4 + its
    max_tokens 10) while in flight, then what it used (3 + 4 = 7)."""
    proxy = await make_proxy(
        config({"endpoint": backend.url(), "key": "a", "limits": {"minute": 40}})
    )
    async with aiohttp.ClientSession() as s:
        statuses = [(await call(s, proxy))[0] for _ in range(7)]
    assert statuses == [200] * 6 + [429]  # 6 x 7 = 42 >= 40: the seventh waits
    assert len(backend.control.requests) == 6
