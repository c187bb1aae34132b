"""Upstream choice, retries and relaying, against a real backend with injected failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from dialproxy.settings import Settings
from dialproxy.web.appkeys import CLIENT
from tests.conftest import Backend, BackendFactory, Proxy, ProxyFactory, new_key

KEY = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three four five six"}]}


def upstream(backend: Backend, name: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint": backend.url(f"/{name}/v1/chat/completions"), "key": f"key-{name}"} | extra


def config(backend: Backend, upstreams: list[dict[str, Any]], **model: Any) -> dict[str, Any]:
    return {
        "models": {"chat": {"type": "chat", "upstreams": upstreams, **model}},
        "keys": {KEY: {"project": "p", "role": "default"}},
        **model.pop("_top", {}),
    }


async def call(proxy: Proxy, **body: Any) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, **body},
            headers={"Api-Key": KEY},
        )
        return resp.status, await resp.read(), resp


def served_by(backend: Backend) -> list[str]:
    return [r.path.split("/")[1] for r in backend.control.requests]


async def test_weighted_round_robin(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(
            backend,
            [
                upstream(backend, "a", weight=1),
                upstream(backend, "b", weight=9),
                upstream(backend, "off", weight=0),
            ],
        )
    )
    for _ in range(20):
        assert (await call(proxy))[0] == 200
    assert Counter(served_by(backend)) == {"a": 2, "b": 18}


async def test_lower_tier_first_and_retry_on_next(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        config(backend, [upstream(backend, "backup", tier=1), upstream(backend, "main", tier=0)])
    )
    status, _, resp = await call(proxy)
    assert status == 200 and served_by(backend) == ["main"]
    backend.control.fail_next(503)
    status, _, resp = await call(proxy)
    assert status == 200
    assert resp.headers["X-UPSTREAM-ATTEMPTS"] == "2"
    assert served_by(backend)[1:] == ["main", "backup"]
    assert backend.control.requests[2].headers["Authorization"] == "Bearer key-backup"


async def test_rate_limited_upstream_is_skipped_for_retry_after(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        config(backend, [upstream(backend, "main"), upstream(backend, "backup", tier=1)])
    )
    backend.control.fail_next(429, headers={"Retry-After": "60"})
    for _ in range(3):
        assert (await call(proxy))[0] == 200
    assert served_by(backend) == ["main", "backup", "backup", "backup"]


async def test_three_failures_in_a_row_take_an_upstream_out(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    spare = await make_backend()
    proxy = await make_proxy(
        config(backend, [upstream(backend, "main"), upstream(spare, "backup", tier=1)])
    )
    backend.control.drop_next()  # a connection failure
    backend.control.fail_next(502)
    backend.control.fail_next(504)
    for _ in range(4):
        assert (await call(proxy))[0] == 200
    # main failed three times in a row (each retried on backup), then is skipped.
    assert len(backend.control.requests) == 3
    assert len(spare.control.requests) == 4


async def test_all_upstreams_rate_limited_is_503(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, [upstream(backend, "a"), upstream(backend, "b")]))
    backend.control.fail_next(429, times=2, headers={"Retry-After": "7"})
    status, body, resp = await call(proxy)
    assert status == 503
    assert resp.headers["Retry-After"] == "7"
    assert json.loads(body)["error"]["code"] == "503"


async def test_retries_used_up_is_502_no_route(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(backend, [upstream(backend, n) for n in "abc"], maxRetryAttempts=2)
    )
    backend.control.fail_next(502, times=3)
    status, body, _ = await call(proxy)
    assert status == 502
    assert json.loads(body) == {"error": {"message": "No route", "code": "502"}}
    assert len(backend.control.requests) == 2


async def test_other_statuses_pass_through_with_body(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, [upstream(backend, "a"), upstream(backend, "b")]))
    backend.control.fail_next(400, body={"error": {"message": "bad tool schema"}})
    status, body, resp = await call(proxy)
    assert status == 400
    assert json.loads(body) == {"error": {"message": "bad tool schema"}}
    assert resp.headers["X-UPSTREAM-ATTEMPTS"] == "1"
    backend.control.fail_next(500)
    assert (await call(proxy))[0] == 500  # not retriable unless configured


async def test_retriable_error_codes_extend_the_retried_set(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    cfg = config(backend, [upstream(backend, "a"), upstream(backend, "b")])
    cfg["retriableErrorCodes"] = [500]
    proxy = await make_proxy(cfg)
    backend.control.fail_next(500)
    status, _, resp = await call(proxy)
    assert status == 200 and resp.headers["X-UPSTREAM-ATTEMPTS"] == "2"


async def test_unreachable_upstream_is_502(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(backend, [{"endpoint": "http://127.0.0.1:9/v1/chat/completions"}])
    )
    status, body, _ = await call(proxy)
    assert status == 502 and json.loads(body)["error"]["message"] == "No route"


async def test_stream_reaches_client_while_backend_still_writes(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, [upstream(backend, "a")]))
    backend.control.chunk_delay = 0.3
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, "stream": True},
            headers={"Api-Key": KEY},
        )
        first = await resp.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        rest = await resp.read()
        total = time.monotonic() - started
    assert first.startswith(b"data: {")
    # Seven content chunks 0.3 s apart: the first arrives long before the last is written.
    assert total > 1.8 and first_at < total / 2
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_stream_broken_by_backend_ends_with_sse_error(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, [upstream(backend, "a")]))
    backend.control.break_stream_after(3)
    status, body, _ = await call(proxy, stream=True)
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert len(events) == 4
    assert json.loads(events[-1][6:])["error"]["code"] == "502"
    assert b"[DONE]" not in body


async def test_client_disconnect_releases_the_backend_request(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """Within the drain bound: the stream is read on for its usage for at most 0.2 s."""
    settings = Settings(stream_drain=0.2)
    proxy = await make_proxy(config(backend, [upstream(backend, "a")]), settings=settings)
    backend.control.chunk_delay = 0.2
    backend_server = backend.server.runner.server if backend.server.runner else None
    assert backend_server is not None
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, "stream": True},
            headers={"Api-Key": KEY},
        )
        await resp.content.readuntil(b"\n\n")
        assert len(backend_server.connections) == 1
        resp.close()  # the client goes away mid-stream
    for _ in range(100):
        if not backend_server.connections:
            break
        await asyncio.sleep(0.01)
    assert backend_server.connections == []  # well before the 1.6 s the stream would take
    await proxy.settle()
    connector = proxy.app[CLIENT].connector
    assert connector is not None


@pytest.mark.parametrize("auth", ["bearer", "api-key"])
async def test_upstream_auth_styles(backend: Backend, make_proxy: ProxyFactory, auth: str) -> None:
    proxy = await make_proxy(config(backend, [upstream(backend, "a", auth=auth)]))
    assert (await call(proxy))[0] == 200
    headers = backend.control.last_request.headers
    if auth == "api-key":
        assert headers["api-key"] == "key-a" and "Authorization" not in headers
    else:
        assert headers["Authorization"] == "Bearer key-a" and "api-key" not in headers


async def test_idle_timeout_between_bytes_and_no_total_timeout(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """The idle timeout (300 s in production, 0.5 s here) bounds the wait for each byte,
    never the whole answer: a slow stream that keeps talking is relayed to its end."""
    settings = Settings(idle_timeout=0.5)
    proxy = await make_proxy(config(backend, [upstream(backend, "a")]), settings=settings)
    backend.control.chunk_delay = 0.3  # 7 content chunks: about 2 s in all
    status, body, _ = await call(proxy, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    backend.control.chunk_delay = 0.0
    backend.control.first_byte_delay = 1.0  # silent for longer than the idle timeout
    status, body, _ = await call(proxy)
    assert status == 502 and json.loads(body)["error"]["message"] == "No route"


async def test_idle_timeout_while_the_body_is_read(
    aiohttp_server: Any, make_proxy: ProxyFactory
) -> None:
    """An upstream that goes silent after its headers and some of its body: the
    non-streamed answer is a 502, the stream ends with an SSE error event after what had
    come; both within about the idle timeout (0.5 s here), not the 5 s it stays silent."""

    async def stalls(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        stream = (await request.json()).get("stream") is True
        if stream:
            headers = {"Content-Type": "text/event-stream"}
        else:
            headers = {"Content-Type": "application/json", "Content-Length": "100"}
        resp = aiohttp.web.StreamResponse(headers=headers)
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n' if stream else b'{"id": "x",')
        await asyncio.sleep(5)
        return resp

    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", stalls)
    server = await aiohttp_server(app)
    upstreams = [{"endpoint": str(server.make_url("/v1/chat/completions")), "key": "k"}]
    cfg = {
        "models": {"chat": {"type": "chat", "upstreams": upstreams}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    proxy = await make_proxy(cfg, settings=Settings(idle_timeout=0.5))
    started = time.monotonic()
    status, body, _ = await call(proxy)
    assert status == 502
    assert json.loads(body)["error"]["message"] == "The upstream broke off its response"
    status, body, _ = await call(proxy, stream=True, stream_options={"include_usage": True})
    assert status == 200
    assert body.startswith(b'data: {"choices": []}\n\n')
    assert body.endswith(b"\n\n") and b"The upstream broke off the response" in body
    assert time.monotonic() - started < 3.5


async def test_a_client_gone_while_waiting_for_headers_is_no_upstream_timeout(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """The idle watch cancels a request that waits too long for its headers; a client that
    goes away in that wait cancels it too, and that must stay a cancellation: the backend
    request is dropped at once and nothing is retried elsewhere."""
    proxy = await make_proxy(
        config(backend, [upstream(backend, "a"), upstream(backend, "b")]),
        settings=Settings(idle_timeout=0.4),
    )
    backend_server = backend.server.runner.server if backend.server.runner else None
    assert backend_server is not None
    backend.control.first_byte_delay = 3.0
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            await s.post(
                proxy.url("/openai/deployments/chat/chat/completions"),
                json=CHAT,
                headers={"Api-Key": KEY},
                timeout=aiohttp.ClientTimeout(total=0.2),  # gone before the idle timeout
            )
    await asyncio.sleep(1.0)  # past the idle timeout: a timed-out wait would try "b"
    assert len(backend.control.requests) == 1
    assert backend_server.connections == []
