"""DIAL's limit rules as a caller sees them: statuses, messages, headers, counters."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dialproxy.apis.openai import go_duration
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from tests.conftest import Backend, Proxy, ProxyFactory, new_key, used_tokens, utc_day_end
from tests.redis_server import RedisServer

KEY = new_key()
SAME_PROJECT = new_key()
OTHER_PROJECT = new_key()
MULTI_ROLE = new_key()
NO_ROLE_ENTRY = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # 3 prompt + 4 completion


def config(backend: Backend, **limits: Any) -> dict[str, Any]:
    upstream = [{"endpoint": backend.url(), "key": "k"}]
    return {
        "models": {
            "chat": {"type": "chat", "upstreams": upstream},
            "priced": {
                "type": "chat",
                "upstreams": upstream,
                "pricing": {"unit": "token", "prompt": "0.001", "completion": "0.002"},
            },
        },
        "roles": {
            "basic": {
                "limits": {"chat": limits or {"minute": 10}, "priced": {}},
                "costLimit": {"minute": "0.02"},
            },
            "more": {"limits": {"chat": {"minute": 20, "requestHour": 1}}},
            "default": {"limits": {"chat": {"requestHour": 2}}},
            "other": {},
        },
        "keys": {
            KEY: {"project": "p1", "role": "basic"},
            SAME_PROJECT: {"project": "p1", "role": "basic"},
            OTHER_PROJECT: {"project": "p2", "role": "basic"},
            MULTI_ROLE: {"project": "p3", "roles": ["basic", "more"]},
            NO_ROLE_ENTRY: {"project": "p4", "role": "other"},
        },
    }


async def chat(
    s: aiohttp.ClientSession, proxy: Proxy, key: str, model: str = "chat", **body: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    resp = await s.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        json={**CHAT, **body},
        headers={"Api-Key": key},
    )
    raw = await resp.read()
    data = json.loads(raw) if not body.get("stream") or resp.status != 200 else {"raw": raw}
    return resp.status, data, resp


async def test_token_limit_refuses_after_usage_and_says_why(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, minute=10, day=1000))
    async with aiohttp.ClientSession() as s:
        status, _, resp = await chat(s, proxy, KEY)
        assert status == 200
        assert resp.headers["x-ratelimit-limit-tokens"] == "10"
        # its reservation (the body's bytes / 4 + 256 completion tokens) holds the window
        assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
        await proxy.settle()  # settled to the 7 it used
        status, _, resp = await chat(s, proxy, KEY)  # 7 used < 10: admitted, overshoots to 14
        assert status == 200
        assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
        await proxy.settle()
        status, body, resp = await chat(s, proxy, KEY)
    assert status == 429
    assert body["error"]["message"] == (
        "Hit token rate limit. Minute limit: 14 / 10 tokens. Day limit: 14 / 1000 tokens."
    )
    assert body["error"]["code"] == "429"
    assert body["error"]["window"] == "minute"
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 120
    assert body["error"]["retry_after"] == retry_after
    assert len(backend.control.requests) == 2  # the refused one never reached the upstream


async def test_request_limit_is_exact_and_counts_per_project(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, requestHour=3, requestDay=10))
    async with aiohttp.ClientSession() as s:
        statuses = [(await chat(s, proxy, k))[0] for k in (KEY, SAME_PROJECT, KEY)]
        assert statuses == [200, 200, 200]
        status, body, resp = await chat(s, proxy, SAME_PROJECT)
        assert status == 429
        assert body["error"]["message"] == (
            "Hit request rate limit. Hour limit: 3 / 3 requests. Day limit: 3 / 10 requests."
        )
        assert "Retry-After" in resp.headers
        # Another project has counters of its own.
        status, _, resp = await chat(s, proxy, OTHER_PROJECT)
        assert status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
        # The refused request was not counted.
        r = await s.get(proxy.url("/v1/deployments/chat/limits"), headers={"Api-Key": KEY})
        stats = await r.json()
    assert stats["hourRequestStats"] == {"total": 3, "used": 3}
    assert stats["dayRequestStats"] == {"total": 10, "used": 3, "resetsAt": utc_day_end()}


async def test_max_over_roles_and_default_fallback(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, minute=10, requestHour=5))
    async with aiohttp.ClientSession() as s:
        # basic (minute 10, requestHour 5) and more (minute 20, requestHour 1): max of each.
        _, _, resp = await chat(s, proxy, MULTI_ROLE)
        assert resp.headers["x-ratelimit-limit-tokens"] == "20"
        assert resp.headers["x-ratelimit-limit-requests"] == "5"
        # A role with no entry for the model falls back to the default role's entry.
        statuses = [(await chat(s, proxy, NO_ROLE_ENTRY))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_one_thousand_concurrent_requests_admit_exactly_the_limit(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, requestHour=100))
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as s:
        results = await asyncio.gather(*(chat(s, proxy, KEY) for _ in range(1000)))
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 900
    assert len(backend.control.requests) == 100


PROMPT = " ".join(f"w{i}" for i in range(50))  # 50 prompt tokens, 51 completion: 101


@pytest.mark.parametrize("storage", ["memory", "redis"])
@pytest.mark.parametrize("max_tokens", [None, 60])
async def test_concurrent_requests_end_within_one_estimate_of_the_token_limit(
    backend: Backend,
    make_proxy: ProxyFactory,
    request: pytest.FixtureRequest,
    storage: str,
    max_tokens: int | None,
) -> None:
    """``minute: 1000``, 50 requests of 101 tokens at once (over two instances on Redis):
    each reserves its estimate at admission, so those in flight see each other and the
    window ends within one request's estimate of the limit (it was 5,100 before)."""
    cfg = config(backend, minute=1000)
    if storage == "memory":
        proxies = [await make_proxy(cfg)]
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.flush()
        proxies = [await make_proxy(cfg, storage=counter_storage(redis.url)) for _ in range(2)]
    backend.control.first_byte_delay = 0.05  # all 50 in flight together
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(
            *(chat(s, proxies[i % len(proxies)], KEY, **body) for i in range(50))
        )
        for proxy in proxies:
            await proxy.settle()
        r = await s.get(proxies[0].url("/v1/deployments/chat/limits"), headers={"Api-Key": KEY})
        used = (await r.json())["minuteTokenStats"]["used"]

    served = [a for a in answers if a[0] == 200]
    charged = sum(a[1]["usage"]["total_tokens"] for a in served)
    assert served and all(a[0] in (200, 429) for a in answers)
    assert used == charged <= 1100, (len(served), used)
    assert any("Hit token rate limit" in a[1]["error"]["message"] for a in answers if a[0] == 429)


async def test_streamed_usage_is_counted(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend, minute=10))
    async with aiohttp.ClientSession() as s:
        status, _, resp = await chat(s, proxy, KEY, stream=True)
        assert status == 200
        assert resp.headers["x-ratelimit-limit-tokens"] == "10"
        await proxy.settle()
        await chat(s, proxy, KEY, stream=True)
        await proxy.settle()
        status, body, _ = await chat(s, proxy, KEY, stream=True)
    assert status == 429
    assert "Minute limit: 14 / 10 tokens." in body["error"]["message"]


async def test_failed_upstream_answer_adds_no_tokens(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, minute=10))
    backend.control.fail_next(400, times=3)
    async with aiohttp.ClientSession() as s:
        statuses = [(await chat(s, proxy, KEY))[0] for _ in range(3)]
        await proxy.settle()
        r = await s.get(proxy.url("/v1/deployments/chat/limits"), headers={"Api-Key": KEY})
        stats = await r.json()
    assert statuses == [400, 400, 400]
    assert stats["minuteTokenStats"] == {"total": 10, "used": 0}


async def test_cost_limit(backend: Backend, make_proxy: ProxyFactory) -> None:
    # Each call costs 3 * 0.001 + 4 * 0.002 = 0.011 USD; the role allows 0.02 a minute.
    proxy = await make_proxy(config(backend))
    async with aiohttp.ClientSession() as s:
        results = []
        for _ in range(3):
            results.append(await chat(s, proxy, KEY, model="priced"))
            await proxy.settle()
    assert [r[0] for r in results] == [200, 200, 429]
    message = results[2][1]["error"]["message"]
    assert message == "Hit cost rate limit. Minute limit: 0.022 / 0.02 USD."
    assert "Retry-After" in results[2][2].headers


@pytest.mark.parametrize("field", ["minute", "requestHour", "requestDay", "month"])
async def test_zero_limit_is_access_denied(
    backend: Backend, make_proxy: ProxyFactory, field: str
) -> None:
    proxy = await make_proxy(config(backend, **{field: "0"}))
    async with aiohttp.ClientSession() as s:
        status, body, _ = await chat(s, proxy, KEY)
    assert (status, body["error"]["message"]) == (403, "Access denied")


async def test_user_limits_shows_token_request_and_cost_windows(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, minute=100, requestHour=10))
    async with aiohttp.ClientSession() as s:
        await chat(s, proxy, KEY, model="priced")
        await chat(s, proxy, KEY)
        await proxy.settle()
        r = await s.get(proxy.url("/v1/user/limits"), headers={"Api-Key": KEY})
        body = await r.json()
    assert r.status == 200 and body["project"] == "p1"
    chat_limits = {(w["type"], w["window"]): w for w in body["models"]["chat"]["limits"]}
    assert chat_limits["tokens", "minute"]["used"] == 7
    assert chat_limits["tokens", "minute"]["remaining"] == 93
    assert chat_limits["requests", "hour"] == chat_limits["requests", "hour"] | {
        "limit": 10,
        "used": 1,
        "remaining": 9,
        "scope": "project",
    }
    (cost,) = body["cost"]
    assert cost["window"] == "minute" and cost["type"] == "USD"
    assert cost["limit"] == pytest.approx(0.02) and cost["used"] == pytest.approx(0.011)


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (0.02, "20ms"),
        (0.9994, "999ms"),
        (1.0, "1s"),
        (59.6, "1m0s"),
        (360, "6m0s"),
        (3_723.2, "1h2m3s"),
        (86_400, "24h0m0s"),
    ],
)
def test_resets_are_written_as_openai_writes_them(seconds: float, written: str) -> None:
    assert go_duration(seconds) == written
    assert go_duration(seconds) == written  # the second time from the cache: the same


@pytest.mark.parametrize("storage", ["memory", "redis"])
@pytest.mark.parametrize("given_by", ["request", "model"])
async def test_a_max_tokens_past_any_model_reserves_at_most_a_billion(
    backend: Backend,
    make_proxy: ProxyFactory,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    storage: str,
    given_by: str,
) -> None:
    """``max_tokens: 2^63 - 1`` (or a model's ``maxCompletionTokens`` as large) reserves
    10^9 tokens, not 2^63: on Redis that amount was counted as a double and written back in
    float notation, after which every count on the window failed (503 under ``deny`` for
    every project, the attacker's next request included, until the window expired)."""
    cfg = config(backend, minute=10**12)
    huge: dict[str, Any] = {"max_tokens": 2**63 - 1}
    if given_by == "model":
        cfg["models"]["chat"]["limits"] = {"maxCompletionTokens": 2**63 - 1}
        huge = {}
    if storage == "memory":
        proxy = await make_proxy(cfg)
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.flush()
        settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),))
        proxy = await make_proxy(
            cfg,
            storage=counter_storage(redis.url),
            settings=dataclasses.replace(settings, storage_failure="deny"),
        )
    async with aiohttp.ClientSession() as s:
        status, _, resp = await chat(s, proxy, OTHER_PROJECT, **huge)
        assert status == 200
        left = int(resp.headers["x-ratelimit-remaining-tokens"])
        # (less the prompt's estimate too: the body's bytes / 4)
        assert 10**12 - 10**9 - 100 < left < 10**12 - 10**9
        for key in (OTHER_PROJECT, KEY):
            status, _, _ = await chat(s, proxy, key)
            assert status == 200
    await proxy.settle()
    assert [await used_tokens(proxy, k, "chat") for k in (OTHER_PROJECT, KEY)] == [14, 7]


@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_the_first_request_in_a_window_says_when_its_reservation_leaves_it(
    backend: Backend, make_proxy: ProxyFactory, request: pytest.FixtureRequest, storage: str
) -> None:
    """``x-ratelimit-remaining-tokens`` counts the request's own reservation; so does its
    reset: the window empties when that leaves it (a minute on), as the request window's
    does, not "0ms" (what an empty window said before the reservation was in it)."""
    cfg = config(backend, minute=1000, requestMinute=1000)
    if storage == "memory":
        proxy = await make_proxy(cfg)
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.flush()
        proxy = await make_proxy(cfg, storage=counter_storage(redis.url))
    async with aiohttp.ClientSession() as s:
        status, _, resp = await chat(s, proxy, KEY)
    assert status == 200
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 1000
    reset = resp.headers["x-ratelimit-reset-tokens"]
    assert reset == resp.headers["x-ratelimit-reset-requests"] and reset.startswith(("1m", "2m"))
