"""GET /metrics after known traffic: exact counts by label, refusals and upstream failures
included; labels only ever from the config; the dashboard's series all scraped."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from dialproxy.settings import Settings
from dialproxy.text import fingerprint
from dialproxy.web.app import metrics_app
from tests.conftest import AiohttpServer, Backend, Proxy, ProxyFactory, new_key

KEY = new_key()
OTHER = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # 3 prompt + 4 completion
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "dialproxy.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(backend: Backend) -> dict[str, Any]:
    upstream = [{"endpoint": backend.url(), "key": "k"}]
    return {
        "models": {
            "chat": {"type": "chat", "upstreams": upstream},
            "priced": {
                "type": "chat",
                "upstreams": upstream,
                "pricing": {"unit": "token", "prompt": "0.001", "completion": "0.002"},
            },
            "limited": {"type": "chat", "upstreams": upstream},
            "flaky": {
                "type": "chat",
                "upstreams": [
                    {"endpoint": backend.url(), "key": "k", "tier": 0},
                    {"endpoint": backend.url(), "key": "k", "tier": 1},
                ],
            },
            "dropped": {"type": "chat", "upstreams": upstream},
            "secret": {"type": "chat", "userRoles": ["admin"], "upstreams": upstream},
        },
        "roles": {
            "user": {
                "limits": {
                    "chat": {},
                    "priced": {},
                    "flaky": {},
                    "dropped": {},
                    "limited": {"requestHour": 1},
                }
            },
            "admin": {},
        },
        "keys": {
            KEY: {"project": "p1", "role": "user"},
            OTHER: {"project": "p2", "role": "user"},
        },
    }


async def chat(proxy: Proxy, model: str, key: str = KEY, **body: Any) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url(f"/openai/deployments/{model}/chat/completions"),
            json={**CHAT, **body},
            headers={"Api-Key": key},
        )
        await resp.read()
        return resp.status


async def scrape(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url, headers=headers)
        return resp.status, await resp.text()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_counts_after_known_traffic(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend))
    assert await chat(proxy, "chat") == 200
    assert await chat(proxy, "chat") == 200
    assert await chat(proxy, "chat", stream=True) == 200
    assert await chat(proxy, "chat", OTHER) == 200
    assert await chat(proxy, "priced") == 200
    assert await chat(proxy, "limited") == 200
    assert await chat(proxy, "limited") == 429  # its request window: one an hour
    assert await chat(proxy, "nope-unknown-xyz") == 404
    assert await chat(proxy, "secret") == 403
    assert await chat(proxy, "chat", "dp-not-a-key") == 401
    backend.control.fail_next(502)  # the first tier fails; the second serves
    assert await chat(proxy, "flaky") == 200
    backend.control.drop_next()  # no answer, and no other upstream
    assert await chat(proxy, "dropped") == 502
    await proxy.settle()

    status, text = await scrape(proxy.url("/metrics"))
    assert status == 200
    assert "nope-unknown-xyz" not in text  # a name the client made up makes no series
    m = parse(text)
    api = "chat/completions"

    def requests(deployment: str, project: str, status: str) -> float:
        return value(
            m,
            "dialproxy_requests_total",
            api=api,
            deployment=deployment,
            project=project,
            status=status,
        )

    assert requests("chat", "p1", "2xx") == 3
    assert requests("chat", "p2", "2xx") == 1
    assert requests("priced", "p1", "2xx") == 1
    assert requests("limited", "p1", "2xx") == 1
    assert requests("limited", "p1", "4xx") == 1
    assert requests("", "p1", "4xx") == 1  # the unknown deployment
    assert requests("secret", "p1", "4xx") == 1
    assert requests("chat", "", "4xx") == 1  # no key of the config (a name it has)
    assert requests("flaky", "p1", "2xx") == 1
    assert requests("dropped", "p1", "5xx") == 1
    total = sum(v for (n, _), v in m.items() if n == "dialproxy_requests_total")
    assert total == 12

    def refusals(deployment: str, project: str, reason: str, window: str = "") -> float:
        return value(
            m,
            "dialproxy_refusals_total",
            api=api,
            deployment=deployment,
            project=project,
            reason=reason,
            window=window,
        )

    assert refusals("limited", "p1", "requests", "hour") == 1
    assert refusals("", "p1", "not_found") == 1
    assert refusals("secret", "p1", "access") == 1
    assert refusals("chat", "", "auth") == 1
    assert sum(v for (n, _), v in m.items() if n == "dialproxy_refusals_total") == 4

    # 3 requests of 3 + 4 tokens (the stream's usage too); p2 once; priced once
    tokens = "dialproxy_tokens_total"
    assert value(m, tokens, deployment="chat", project="p1", type="prompt") == 9
    assert value(m, tokens, deployment="chat", project="p1", type="completion") == 12
    assert value(m, tokens, deployment="chat", project="p2", type="prompt") == 3
    assert value(m, tokens, deployment="priced", project="p1", type="completion") == 4
    cost = value(m, "dialproxy_cost_usd_total", deployment="priced", project="p1")
    assert cost == pytest.approx(3 * 0.001 + 4 * 0.002)
    assert (
        "dialproxy_cost_usd_total",
        frozenset({("deployment", "chat"), ("project", "p1")}),
    ) not in m

    attempts, failures = "dialproxy_upstream_attempts_total", "dialproxy_upstream_failures_total"
    assert value(m, attempts, deployment="chat", upstream="upstreams[0]") == 4
    assert value(m, attempts, deployment="flaky", upstream="upstreams[0]") == 1
    assert value(m, attempts, deployment="flaky", upstream="upstreams[1]") == 1
    assert value(m, failures, deployment="flaky", upstream="upstreams[0]", reason="status") == 1
    assert value(m, attempts, deployment="dropped", upstream="upstreams[0]") == 1
    assert value(m, failures, deployment="dropped", upstream="upstreams[0]", reason="error") == 1
    assert sum(v for (n, _), v in m.items() if n == failures) == 2
    ttfb, duration = "dialproxy_upstream_ttfb_seconds", "dialproxy_upstream_duration_seconds"
    chat0 = {"deployment": "chat", "upstream": "upstreams[0]"}
    assert value(m, ttfb + "_count", **chat0) == 4
    assert value(m, duration + "_count", **chat0) == 4
    flaky0 = {"deployment": "flaky", "upstream": "upstreams[0]"}
    assert value(m, ttfb + "_count", **flaky0) == 1  # (the 502's headers came)
    assert value(m, duration + "_count", **flaky0) == 1
    dropped = {"deployment": "dropped", "upstream": "upstreams[0]"}
    assert (
        value(m, ttfb + "_count", **dropped) == 0
        or (ttfb + "_count", frozenset(dropped.items())) not in m
    )
    assert value(m, duration + "_count", **dropped) == 1

    assert value(m, "dialproxy_requests_in_flight") == 0
    assert value(m, "dialproxy_streams_in_flight") == 0
    assert value(m, "dialproxy_reservations_outstanding") == 0
    assert value(m, "dialproxy_config_generation") == 1
    assert value(m, "dialproxy_config_reloads_total", result="applied") == 0
    assert value(m, "dialproxy_config_reloads_total", result="refused") == 0
    assert value(m, "dialproxy_config_last_reload_refused") == 0
    assert 0 <= value(m, "dialproxy_config_seconds_since_good_load") < 60
    assert value(m, "dialproxy_storage_healthy", backend="memory") == 1
    assert value(m, "dialproxy_storage_failures_total", backend="memory") == 0
    assert value(m, "dialproxy_storage_fallbacks_total", backend="memory") == 0
    assert value(m, "dialproxy_storage_owed", backend="memory") == 0
    assert value(m, "dialproxy_storage_owed_dropped_total", backend="memory") == 0


async def test_reloads_taken_and_refused(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend))
    changed = config(backend)
    changed["models"]["extra"] = {"type": "chat", "upstreams": [{"endpoint": backend.url()}]}
    proxy.path.write_text(json.dumps(changed))
    assert proxy.store.reload().applied
    proxy.path.write_text("{not json")
    assert proxy.store.reload().refused
    m = parse((await scrape(proxy.url("/metrics")))[1])
    assert value(m, "dialproxy_config_generation") == 2
    assert value(m, "dialproxy_config_reloads_total", result="applied") == 1
    assert value(m, "dialproxy_config_reloads_total", result="refused") == 1
    assert value(m, "dialproxy_config_last_reload_refused") == 1


async def test_reservations_outstanding_while_a_stream_runs(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    cfg = config(backend)
    cfg["roles"]["user"]["limits"]["chat"] = {"minute": 100_000}
    proxy = await make_proxy(cfg)
    backend.control.chunk_delay = 0.2
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, "stream": True},
            headers={"Api-Key": KEY},
        )
        await resp.content.readline()  # the stream has begun
        m = parse((await scrape(proxy.url("/metrics")))[1])
        assert value(m, "dialproxy_requests_in_flight") == 1
        assert value(m, "dialproxy_streams_in_flight") == 1
        assert value(m, "dialproxy_reservations_outstanding") == 1
        await resp.read()
    await proxy.settle()
    m = parse((await scrape(proxy.url("/metrics")))[1])
    assert value(m, "dialproxy_requests_in_flight") == 0
    assert value(m, "dialproxy_streams_in_flight") == 0
    assert value(m, "dialproxy_reservations_outstanding") == 0


async def test_key_label_when_asked(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend), settings=Settings(metrics_key_label=True))
    assert await chat(proxy, "chat") == 200
    m = parse((await scrape(proxy.url("/metrics")))[1])
    labels = {"api": "chat/completions", "deployment": "chat", "project": "p1"}
    key = fingerprint(KEY)
    assert value(m, "dialproxy_requests_total", **labels, status="2xx", key=key) == 1
    tokens = "dialproxy_tokens_total"
    assert value(m, tokens, deployment="chat", project="p1", type="prompt", key=key) == 3


async def test_off_by_default_key_label_absent(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend))
    assert await chat(proxy, "chat") == 200
    text = (await scrape(proxy.url("/metrics")))[1]
    assert 'key="' not in text and fingerprint(KEY) not in text


async def test_auth_required_when_asked(backend: Backend, make_proxy: ProxyFactory) -> None:
    cfg = config(backend)
    cfg["keys"][KEY]["canShare"] = True
    proxy = await make_proxy(cfg, settings=Settings(metrics_auth="key"))
    assert (await scrape(proxy.url("/metrics")))[0] == 401
    assert (await scrape(proxy.url("/metrics"), **{"Api-Key": "dp-wrong"}))[0] == 401
    status, text = await scrape(proxy.url("/metrics"), Authorization=f"Bearer {KEY}")
    assert status == 200 and "dialproxy_requests_in_flight" in text
    # a shared key is no key of the config: it is for generation (it read every project's)
    async with aiohttp.ClientSession() as s:
        body = {"name": "friend", "tokens": 100}
        async with s.post(proxy.url("/v1/sharedkeys"), json=body, headers={"Api-Key": KEY}) as r:
            assert r.status == 201
            lent = (await r.json())["key"]
    assert (await scrape(proxy.url("/metrics"), **{"Api-Key": lent}))[0] == 401


async def test_no_metrics(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend), settings=Settings(metrics=False))
    assert await chat(proxy, "chat") == 200
    assert (await scrape(proxy.url("/metrics")))[0] == 404


async def test_metrics_port(
    backend: Backend, make_proxy: ProxyFactory, aiohttp_server: AiohttpServer
) -> None:
    proxy = await make_proxy(config(backend), settings=Settings(metrics_port=9))
    assert (await scrape(proxy.url("/metrics")))[0] == 404  # not on the main port
    assert await chat(proxy, "chat") == 200
    server: TestServer = await aiohttp_server(metrics_app(proxy.app))
    status, text = await scrape(str(server.make_url("/metrics")))
    assert status == 200
    m = parse(text)
    labels = {"api": "chat/completions", "deployment": "chat", "project": "p1", "status": "2xx"}
    assert value(m, "dialproxy_requests_total", **labels) == 1


def _dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _dashboard_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _dashboard_exprs(v)]
    return []


async def test_dashboard_series_exist(backend: Backend, make_proxy: ProxyFactory) -> None:
    """Every series the Grafana dashboard queries is one a scrape has."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    proxy = await make_proxy(config(backend))
    assert await chat(proxy, "priced") == 200
    assert await chat(proxy, "limited") == 200
    assert await chat(proxy, "limited") == 429
    backend.control.fail_next(502)
    assert await chat(proxy, "flaky") == 200
    await proxy.settle()
    names = {name for name, _ in parse((await scrape(proxy.url("/metrics")))[1])}
    used = {n for e in exprs for n in re.findall(r"\bdialproxy_[a-z_]+", e)}
    missing = sorted(used - names)
    assert not missing, f"the dashboard queries series no scrape has: {missing}"


def test_settings_from_flags_and_env() -> None:
    from dialproxy import cli

    env = Settings.from_env(
        {
            "DIALPROXY_METRICS": "off",
            "DIALPROXY_METRICS_PORT": "9100",
            "DIALPROXY_METRICS_KEY_LABEL": "on",
            "DIALPROXY_METRICS_AUTH": "key",
        }
    )
    assert (env.metrics, env.metrics_port, env.metrics_key_label, env.metrics_auth) == (
        False,
        9100,
        True,
        "key",
    )
    with pytest.raises(ValueError, match="DIALPROXY_METRICS must be on or off"):
        Settings.from_env({"DIALPROXY_METRICS": "maybe"})
    with pytest.raises(ValueError, match="metrics port must differ"):
        Settings(metrics_port=8080).check()
    with pytest.raises(ValueError, match="metrics auth"):
        Settings(metrics_auth="admin").check()
    flags = cli.settings_for(
        ["serve", "--metrics-port", "9101", "--metrics-key-label", "--metrics-auth", "key"]
    )
    assert (flags.metrics, flags.metrics_port, flags.metrics_key_label, flags.metrics_auth) == (
        True,
        9101,
        True,
        "key",
    )
    assert not cli.settings_for(["serve", "--no-metrics"]).metrics
