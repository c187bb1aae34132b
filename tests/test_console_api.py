"""The console's data endpoints (dialproxy/web/console.py) through the real app: upstream
states from the balancer and the capacity counters, the last refused reload, the ledger's
usage by day and its CSV, a key's windows and shared keys, who may read them."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from dialproxy.text import key_digest
from tests.conftest import SECRETS, Backend, Proxy, ProxyFactory, new_key
from tests.test_serve import free_port

CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


class Keys:
    def __init__(self) -> None:
        self.admin, self.viewer, self.user = new_key(), new_key(), new_key()


def config(backend: Backend, k: Keys) -> dict[str, Any]:
    limits = {"minute": "1000", "requestDay": "100"}
    return {
        "models": {
            "chat": {
                "type": "chat",
                "upstreams": [{"endpoint": backend.url(), "key": "upstream-secret-1"}],
                "pricing": {"unit": "token", "prompt": "0.000001", "completion": "0.000002"},
            },
            "small": {  # its upstream's own capacity: one request a minute
                "type": "chat",
                "upstreams": [
                    {"id": "one", "endpoint": backend.url(), "limits": {"requestMinute": 1}}
                ],
            },
            "gone": {  # nothing listens there
                "type": "chat",
                "upstreams": [{"endpoint": f"http://127.0.0.1:{free_port()}/v1/chat"}],
            },
        },
        "roles": {
            "user": {"limits": {"chat": limits, "small": {}, "gone": {}}},
            "admin": {},
            "viewer": {},
        },
        "keys": {
            "sha256:" + key_digest(k.admin): {"project": "ops", "role": "admin", "name": "root"},
            "sha256:" + key_digest(k.viewer): {"project": "ops", "role": "viewer"},
            "sha256:" + key_digest(k.user): {
                "project": "p",
                "role": "user",
                "name": "alice",
                "canShare": True,
            },
        },
    }


async def get(s: aiohttp.ClientSession, proxy: Proxy, path: str, key: str) -> Any:
    async with s.get(proxy.url(path), headers={"Api-Key": key}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def chat(s: aiohttp.ClientSession, proxy: Proxy, key: str, model: str = "chat") -> int:
    async with s.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        headers={"Api-Key": key},
        json=CHAT,
    ) as r:
        await r.read()
        return r.status


def upstreams(models: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = next(m for m in models["models"] if m["name"] == name)[
        "upstreams"
    ]
    return found


async def test_models_show_each_upstream_state_and_pricing(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k))
    listed = await get(session, proxy, "/v1/console/models", k.viewer)
    chat_model = next(m for m in listed["models"] if m["name"] == "chat")
    assert chat_model["pricing"] == {
        "unit": "token",
        "prompt": "0.000001",
        "completion": "0.000002",
    }
    assert [u["state"] for m in listed["models"] for u in m["upstreams"]] == ["ok"] * 3
    assert "upstream-secret-1" not in json.dumps(listed)

    backend.control.fail_next(429, headers={"Retry-After": "120"})
    assert await chat(session, proxy, k.user) == 503  # (its one upstream answered 429)
    assert await chat(session, proxy, k.user, "small") == 200
    for _ in range(3):  # (three failures in a row: backed off)
        assert await chat(session, proxy, k.user, "gone") == 502
    await proxy.settle()
    listed = await get(session, proxy, "/v1/console/models", k.admin)
    paused = upstreams(listed, "chat")[0]
    assert paused["state"] == "paused" and 100 < paused["retryIn"] <= 120
    small = upstreams(listed, "small")[0]
    assert small["state"] == "at capacity" and small["id"] == "one"
    assert small["capacity"] == [{"type": "requests", "window": "minute", "limit": 1, "used": 1}]
    gone = upstreams(listed, "gone")[0]
    assert gone["state"] == "backed off" and gone["failures"] == 3


async def test_overview_shows_usage_and_the_last_refused_reload(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k))
    for _ in range(2):
        assert await chat(session, proxy, k.user) == 200
    await proxy.settle()
    overview = await get(session, proxy, "/v1/console/overview", k.viewer)
    assert overview["config"]["generation"] == 1 and overview["config"]["lastError"] is None
    assert overview["config"]["keys"] == 3 and overview["config"]["models"] == 3
    assert overview["storage"]["backend"] == "memory" and overview["storage"]["healthy"]
    assert overview["sharedKeys"] == {"store": "sqlite", "healthy": True}
    usage = overview["usage"]
    assert usage["hour"]["requests"] == 2 and usage["day"]["requests"] == 2
    assert usage["hour"]["totalTokens"] > 0
    assert len(usage["series"]) == 24 and usage["series"][-1]["requests"] == 2
    assert [p["name"] for p in usage["topProjects"]] == ["p"]
    assert [p["name"] for p in usage["topModels"]] == ["chat"]
    bars = {(b["type"], b["window"]): b for b in overview["utilisation"]}
    assert bars["requests", "day"]["used"] == 2 and bars["requests", "day"]["limit"] == 100
    assert bars["tokens", "minute"]["limit"] == 1000

    proxy.path.write_text('{"models": ')  # a broken edit: refused, the last good one serves
    async with session.post(proxy.url("/v1/ops/config/reload"), headers={"Api-Key": k.admin}) as r:
        assert r.status == 422
    overview = await get(session, proxy, "/v1/console/overview", k.admin)
    refused = overview["config"]["lastError"]
    assert refused and refused[0]["file"] == str(proxy.path)
    assert overview["config"]["reloadsRefused"] == 1 and overview["config"]["generation"] == 1


async def test_usage_by_day_and_its_csv(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k))
    assert await chat(session, proxy, k.user) == 200
    assert await chat(session, proxy, k.user, "small") == 200
    await proxy.settle()
    by_model = await get(session, proxy, "/v1/console/usage?by=model", k.viewer)
    assert sorted((r["model"], r["requests"]) for r in by_model["rows"]) == [
        ("chat", 1),
        ("small", 1),
    ]
    assert by_model["total"]["requests"] == 2
    fingerprint = key_digest(k.user)[:8]
    by_key = await get(session, proxy, "/v1/console/usage?by=key", k.viewer)
    assert [(r["key"], r["keyName"], r["requests"]) for r in by_key["rows"]] == [
        (fingerprint, "alice", 2)
    ]
    for written in (fingerprint, fingerprint.upper()):  # (hex in any case)
        one = await get(session, proxy, f"/v1/console/usage?by=key&key={written}", k.viewer)
        assert [(r["key"], r["requests"]) for r in one["rows"]] == [(fingerprint, 2)]
    nobody = await get(session, proxy, "/v1/console/usage?project=nobody", k.viewer)
    assert nobody["rows"] == [] and nobody["total"]["requests"] == 0
    async with session.get(
        proxy.url("/v1/console/usage?by=project&format=csv"), headers={"Api-Key": k.admin}
    ) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        lines = (await r.text()).splitlines()
    assert lines[0] == (
        "day,project,requests,errors,prompt_tokens,completion_tokens,total_tokens,"
        "cost_usd,cost_nano_usd"
    )
    assert len(lines) == 2 and lines[1].split(",")[1:3] == ["p", "2"]
    for query, message in (
        ("by=week", "'by' must be project, key or model"),
        ("format=xml", "'format' must be json or csv"),
        ("from=2026-02-01&to=2026-01-01", "'from' must be before 'to'"),
    ):
        async with session.get(
            proxy.url("/v1/console/usage?" + query), headers={"Api-Key": k.admin}
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == message


async def test_a_keys_windows_and_shared_keys(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k))
    assert await chat(session, proxy, k.user) == 200
    async with session.post(
        proxy.url("/v1/sharedkeys"),
        headers={"Api-Key": k.user},
        json={"name": "for bob", "tokens": 500},
    ) as r:
        assert r.status == 201
        made = await r.json()
    SECRETS.append(made["key"])
    await proxy.settle()
    fingerprint = key_digest(k.user)[:8]
    detail = await get(session, proxy, f"/v1/console/keys/{fingerprint}", k.viewer)
    # the same windows its holder reads from /v1/user/limits
    own = await get(session, proxy, "/v1/user/limits", k.user)

    def steady(models: dict[str, Any]) -> dict[str, Any]:  # (without the seconds to reset)
        return {
            name: [{f: v for f, v in w.items() if f != "resetSeconds"} for w in m["limits"]]
            for name, m in models.items()
        }

    assert steady(detail["models"]) == steady(own["models"])
    windows = {(w["type"], w["window"]): w for w in detail["models"]["chat"]["limits"]}
    assert windows["requests", "day"]["used"] == 1 and windows["requests", "day"]["limit"] == 100
    assert [s["name"] for s in detail["sharedKeys"]] == ["for bob"]
    assert made["key"] not in json.dumps(detail)
    assert detail["today"]["requests"] == 1
    assert detail["name"] == "alice" and detail["state"] == "active"
    upper = await get(session, proxy, f"/v1/console/keys/{fingerprint.upper()}", k.viewer)
    assert upper["fingerprint"] == fingerprint  # (hex in any case, as the admin API takes it)
    admin = await get(session, proxy, f"/v1/console/keys/{key_digest(k.admin)[:8]}", k.admin)
    assert admin["sharedKeys"] is None  # (no canShare)
    assert all(m["limits"] == [] for m in admin["models"].values())  # (no limited window)
    async with session.get(
        proxy.url("/v1/console/keys/ffffffff"), headers={"Api-Key": k.admin}
    ) as r:
        assert r.status == 404


async def test_who_may_read_what(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k))
    levels = [
        (await get(session, proxy, "/v1/console/me", key))["level"]
        for key in (k.admin, k.viewer, k.user)
    ]
    assert levels == ["admin", "viewer", "key"]
    fingerprint = key_digest(k.user)[:8]
    for path in (
        "/v1/console/overview",
        "/v1/console/models",
        "/v1/console/usage",
        f"/v1/console/keys/{fingerprint}",
    ):
        async with session.get(proxy.url(path), headers={"Api-Key": k.user}) as r:
            assert r.status == 403, path
        async with session.get(proxy.url(path)) as r:
            assert r.status == 401, path
    async with session.get(proxy.url("/console")) as r:
        assert r.status == 200 and r.content_type == "text/html"
        csp = r.headers["Content-Security-Policy"]
        page = await r.text()
    assert csp.startswith("default-src 'self'") and "frame-ancestors 'none'" in csp
    # everything the page loads is the proxy's own
    assert 'src="/console/app.js"' in page and "http" not in page.replace("http-equiv", "")
