"""Upstreams of the Responses and Messages APIs that misbehave: a follow-up that is
redirected (its upstream key goes nowhere else), answers too big or too slow, events over
the cap, ids that are not ids, usage that is not usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dialproxy.apis import responses
from dialproxy.settings import Settings
from tests.conftest import AiohttpServer, Proxy, ProxyFactory, new_key
from tests.conftest import used_tokens as used_tokens_of

KEY = new_key()
UPSTREAM_KEY = new_key("sk-upstream-")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """An upstream with one handler per path, recording what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.handlers: dict[str, Handler] = {}
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, dict(request.headers)))
        for prefix, handler in self.handlers.items():
            if request.path.startswith(prefix):
                return await handler(request)
        return web.json_response({"error": {"message": "no"}}, status=404)


async def start(aiohttp_server: AiohttpServer) -> Upstream:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    upstream.url = str((await aiohttp_server(app)).make_url(""))
    return upstream


def config(upstream: Upstream) -> dict[str, Any]:
    return {
        "models": {
            "m": {
                "type": "chat",
                "upstreams": [
                    {
                        "id": "u",
                        "endpoint": upstream.url + "/chat",
                        "responsesEndpoint": upstream.url + "/v1/responses",
                        "key": UPSTREAM_KEY,
                    },
                    {"endpoint": upstream.url + "/v1/messages", "key": UPSTREAM_KEY,
                     "auth": "x-api-key"},
                ],
            }
        },
        "roles": {"r": {"limits": {"m": {"minute": 1000000}}}},
        "keys": {KEY: {"project": "p", "role": "r"}},
    }  # fmt: skip


def a_response(response_id: str, status: str = "completed") -> dict[str, Any]:
    return {"id": response_id, "object": "response", "status": status, "output": []}


async def used(proxy: Proxy) -> int:
    return await used_tokens_of(proxy, KEY, "m")


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    return await start(aiohttp_server)


async def test_a_redirected_follow_up_sends_the_key_nowhere_else(
    upstream: Upstream, aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    elsewhere = await start(aiohttp_server)

    async def create(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/v1/responses":
            return web.json_response(a_response("resp_0123456789"))
        raise web.HTTPTemporaryRedirect(elsewhere.url + "/steal")

    upstream.handlers["/v1/responses"] = create
    proxy = await make_proxy(config(upstream))
    sdk = openai.AsyncOpenAI(base_url=proxy.url("/openai/v1"), api_key=KEY, max_retries=0)
    async with sdk:
        made = await sdk.responses.create(model="m", input="x")
        for follow in (sdk.responses.retrieve, sdk.responses.cancel, sdk.responses.delete):
            with pytest.raises(openai.APIStatusError) as refused:
                await follow(made.id)
            assert refused.value.status_code == 502
    assert elsewhere.seen == []
    assert [p for _, p, _ in upstream.seen] == [
        "/v1/responses",
        "/v1/responses/resp_0123456789",
        "/v1/responses/resp_0123456789/cancel",
        "/v1/responses/resp_0123456789",
    ]


async def test_a_follow_up_whose_upstream_drops_the_connection_is_a_502_no_route(
    upstream: Upstream, make_proxy: ProxyFactory
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.json_response(a_response("resp_0123456789"))
        assert request.transport is not None
        request.transport.close()  # no answer at all
        return web.Response()

    upstream.handlers["/v1/responses"] = handler
    proxy = await make_proxy(config(upstream))
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        made = await (
            await s.post(proxy.url("/openai/v1/responses"), json={"model": "m", "input": "x"})
        ).json()
        with capture_logs() as logs:
            gone = await s.get(proxy.url(f"/openai/v1/responses/{made['id']}"))
            assert gone.status == 502
            assert (await gone.json())["error"]["message"] == "No route"
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 502 and line["attempts"] == 1


async def test_a_follow_up_answer_over_the_cap_or_too_slow_is_a_502(
    upstream: Upstream, make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    slow = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.json_response(a_response("resp_0123456789"))
        if request.query.get("slow"):
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"id": ')
            await slow.wait()  # never: the idle timeout ends it
            return response
        return web.Response(
            body=b'{"id": "' + b"x" * 200_000 + b'"}', content_type="application/json"
        )

    upstream.handlers["/v1/responses"] = handler
    settings = Settings(
        config_paths=(str(tmp_path / "aidial.config.json"),),
        max_response=100_000,
        idle_timeout=0.5,
    )
    proxy = await make_proxy(config(upstream), settings=settings)
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        made = await (
            await s.post(proxy.url("/openai/v1/responses"), json={"model": "m", "input": "x"})
        ).json()
        big = await s.get(proxy.url(f"/openai/v1/responses/{made['id']}"))
        assert (
            big.status == 502
            and "over the 100000-byte limit" in (await big.json())["error"]["message"]
        )
        hung = await s.get(proxy.url(f"/openai/v1/responses/{made['id']}?slow=1"))
        assert hung.status == 502
    slow.set()


async def test_an_event_over_the_cap_ends_a_responses_stream_with_an_error_the_sdk_raises(
    upstream: Upstream, make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        created = {
            "type": "response.created",
            "response": a_response("resp_0123456789", "in_progress"),
        }
        await response.write(
            b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
        )
        await response.write(b"event: response.output_text.delta\ndata: " + b"y" * 300_000)
        await response.write(b"\n\n")
        return response

    upstream.handlers["/v1/responses"] = handler
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), max_event=100_000)
    proxy = await make_proxy(config(upstream), settings=settings)
    sdk = openai.AsyncOpenAI(base_url=proxy.url("/openai/v1"), api_key=KEY, max_retries=0)
    seen = []
    async with sdk:
        with pytest.raises(openai.APIError) as broken:
            async for event in await sdk.responses.create(model="m", input="x", stream=True):
                seen.append(event)
    assert "too large" in broken.value.message
    assert seen[0].type == "response.created"
    assert responses.parse(seen[0].response.id) is not None  # ours, even in a broken stream
    assert await used(proxy) > 0  # cut before its usage: an estimate


async def test_anthropic_usage_that_is_not_counts_is_not_taken(
    upstream: Upstream, make_proxy: ProxyFactory
) -> None:
    def event(kind: str, body: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(body | {'type': kind})}\n\n".encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {"message": {"id": "msg_1", "usage": {"input_tokens": "1e12", "output_tokens": 1}}}
        await response.write(event("message_start", start))
        await response.write(event("message_delta", {"usage": {"output_tokens": -5}}))
        await response.write(event("message_stop", {}))
        return response

    upstream.handlers["/v1/messages"] = handler
    proxy = await make_proxy(config(upstream))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/anthropic/v1/messages"),
            json={"model": "m", "max_tokens": 5, "messages": [], "stream": True},
            headers={"x-api-key": KEY},
        )
        assert resp.status == 200
        await resp.read()
    # no usage it reported is a count: charged the estimate of a direct stream, small
    assert 0 < await used(proxy) < 100
