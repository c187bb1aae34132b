"""Traces captured with the SDK's in-memory exporter: a server span per request (the
client's traceparent its parent), a client span per upstream attempt, whose context the
upstream gets in traceparent; and off unless the OTEL_* variables ask."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from dialproxy import tracing
from dialproxy.config.store import ConfigStore
from dialproxy.counting.counters import LocalCounters
from dialproxy.settings import Settings
from dialproxy.text import fingerprint
from dialproxy.web.app import create_app
from tests.conftest import AiohttpServer, Backend, Proxy, new_key

KEY = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # 3 prompt + 4 completion
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def config(backend: Backend) -> dict[str, Any]:
    return {
        "models": {
            "chat": {"type": "chat", "upstreams": [{"endpoint": backend.url(), "key": "k"}]},
            "flaky": {
                "type": "chat",
                "upstreams": [
                    {"endpoint": backend.url(), "key": "k", "tier": 0},
                    {"endpoint": backend.url(), "key": "k", "tier": 1},
                ],
            },
        },
        "roles": {"user": {"limits": {"chat": {}, "flaky": {}}}},
        "keys": {KEY: {"project": "p1", "role": "user"}},
    }


async def traced_proxy(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> tuple[Proxy, InMemorySpanExporter]:
    path = tmp_path / "aidial.config.json"
    path.write_text(json.dumps(config(backend)))
    store = ConfigStore([path], env={})
    store.load()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(
        store,
        settings=Settings(config_paths=(str(path),)),
        storage=LocalCounters(),
        tracing=tracing.Tracing(provider),
    )
    return Proxy(await aiohttp_server(app), store, path), exporter


async def chat(proxy: Proxy, model: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url(f"/openai/deployments/{model}/chat/completions"),
            json=CHAT,
            headers={"Api-Key": KEY, **headers},
        )
        await resp.read()
        return resp.status


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


async def test_spans_and_traceparent_to_the_upstream(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    proxy, exporter = await traced_proxy(backend, aiohttp_server, tmp_path)
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    assert await chat(proxy, "chat", traceparent=traceparent) == 200
    await proxy.settle()
    spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    [client] = by_kind(spans, SpanKind.CLIENT)
    assert server.context is not None and client.context is not None
    # the server span continues the client's trace, under the client's span
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert server.name == "POST /openai/deployments/{id}/chat/completions"
    attributes = dict(server.attributes or {})
    assert attributes["dialproxy.deployment"] == "chat"
    assert attributes["dialproxy.project"] == "p1"
    assert attributes["dialproxy.key"] == fingerprint(KEY)
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.usage.input_tokens"] == 3
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert KEY not in json.dumps({k: str(v) for k, v in attributes.items()})
    # the client span: the attempt, under the server span; its context went upstream
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert dict(client.attributes or {})["dialproxy.upstream"] == "upstreams[0]"
    assert dict(client.attributes or {})["http.response.status_code"] == 200
    sent = backend.control.requests[-1].headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{format(client.context.span_id, '016x')}-01"


async def test_a_span_per_attempt(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    proxy, exporter = await traced_proxy(backend, aiohttp_server, tmp_path)
    backend.control.fail_next(502)
    assert await chat(proxy, "flaky") == 200  # no traceparent: a trace of its own
    await proxy.settle()
    spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    assert server.parent is None
    clients = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert [dict(c.attributes or {})["dialproxy.upstream"] for c in clients] == [
        "upstreams[0]",
        "upstreams[1]",
    ]
    assert [dict(c.attributes or {}).get("http.response.status_code") for c in clients] == [
        502,
        200,
    ]
    assert dict(clients[0].attributes or {})["error.type"] == "status"
    sent = [r.headers["traceparent"] for r in backend.control.requests[-2:]]
    assert [s.split("-")[2] for s in sent] == [
        format(c.context.span_id, "016x") for c in clients if c.context is not None
    ]
    assert dict(server.attributes or {})["dialproxy.attempts"] == 2


async def test_refused_request_has_a_span(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    proxy, exporter = await traced_proxy(backend, aiohttp_server, tmp_path)
    assert await chat(proxy, "nope") == 404
    [server] = exporter.get_finished_spans()
    attributes = dict(server.attributes or {})
    assert attributes["http.response.status_code"] == 404
    assert "dialproxy.deployment" not in attributes  # (a name the config does not have)


async def test_off_without_otel_variables(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    assert tracing.from_env({}) is None
    assert tracing.from_env({"OTEL_SERVICE_NAME": "x"}) is None
    assert tracing.from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}
    assert tracing.from_env(env) is None
    on = tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert on is not None
    resource = on.provider.resource.attributes
    assert resource["service.name"] == "dialproxy"
    on.close()
    # off, a client's traceparent still reaches the upstream as it came
    path = tmp_path / "aidial.config.json"
    path.write_text(json.dumps(config(backend)))
    store = ConfigStore([path], env={})
    store.load()
    app = create_app(store, settings=Settings(config_paths=(str(path),)))
    proxy = Proxy(await aiohttp_server(app), store, path)
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    assert await chat(proxy, "chat", traceparent=traceparent) == 200
    assert backend.control.requests[-1].headers["traceparent"] == traceparent


async def test_client_leaving_ends_the_attempt_span(
    backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    proxy, exporter = await traced_proxy(backend, aiohttp_server, tmp_path)
    backend.control.first_byte_delay = 2.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with contextlib.suppress(TimeoutError):
            await s.post(
                proxy.url("/openai/deployments/chat/chat/completions"),
                json=CHAT,
                headers={"Api-Key": KEY},
            )
    for _ in range(50):  # the handler is cancelled when the connection closes
        if by_kind(exporter.get_finished_spans(), SpanKind.SERVER):
            break
        await asyncio.sleep(0.05)
    spans = exporter.get_finished_spans()
    assert by_kind(spans, SpanKind.SERVER)
    [client] = by_kind(spans, SpanKind.CLIENT)
    assert dict(client.attributes or {})["error.type"] == "cancelled"
