"""The Anthropic Messages API through the proxy, driven by the real anthropic SDK against
the demo backend's Messages API: keys as the SDK sends them, errors in Anthropic's shape
(so the SDK raises its own types), limits and usage as for chat."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam

from tests.conftest import Backend, Proxy, ProxyFactory, clear_of_minute_boundary, new_key
from tests.conftest import used_tokens as used_tokens_of

KEY = new_key()
NO_ACCESS = new_key()
UPSTREAM_KEY = new_key("upstream-secret-")
MESSAGES: list[MessageParam] = [{"role": "user", "content": "one two three"}]


def config(backend: Backend, **limits: Any) -> dict[str, Any]:
    return {
        "models": {
            "claude": {  # our direct extension: an upstream with auth x-api-key
                "type": "chat",
                "userRoles": ["r"],
                "upstreams": [
                    {
                        "endpoint": backend.url("/v1/messages"),
                        "key": UPSTREAM_KEY,
                        "auth": "x-api-key",
                    }
                ],
                "pricing": {"unit": "token", "prompt": "0.001", "completion": "0.002"},
            },
            "adapted": {  # DIAL's shape: an adapter's base URL + the path the request came on
                "type": "chat",
                "interfaces": {"anthropicMessages": {"base_url": backend.url("/adapter")}},
            },
        },
        "roles": {
            "r": {"limits": {"claude": limits or {"minute": 100000}, "adapted": {}}},
            "none": {"limits": {"adapted": {}}},
        },
        "keys": {KEY: {"project": "p", "role": "r"}, NO_ACCESS: {"project": "q", "role": "none"}},
    }


def client(proxy: Proxy, **options: Any) -> anthropic.AsyncAnthropic:
    options.setdefault("api_key", KEY)
    return anthropic.AsyncAnthropic(base_url=proxy.url("/anthropic"), **options)


async def used_tokens(proxy: Proxy) -> int:
    return await used_tokens_of(proxy, KEY, "claude")


async def test_create_with_the_sdks_key_header_reaches_the_upstream_with_its_own_key(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    beta = {"anthropic-beta": "prompt-caching-2024-07-31"}
    with anthropic.Anthropic(
        base_url=proxy.url("/anthropic"), api_key=KEY, default_headers=beta
    ) as sdk:
        message = await asyncio.to_thread(
            lambda: sdk.messages.create(model="claude", max_tokens=50, messages=MESSAGES)
        )
        assert message.content[0].type == "text"
        assert message.content[0].text == "Echo: one two three"
        got = backend.control.last_request
        assert got.path == "/v1/messages"
        assert got.headers["x-api-key"] == UPSTREAM_KEY  # never the client's
        assert got.headers["anthropic-version"] == sdk.default_headers["anthropic-version"]
        assert got.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
        assert KEY not in str(dict(got.headers))
    usage = message.usage
    assert await used_tokens(proxy) == usage.input_tokens + usage.output_tokens


@pytest.mark.parametrize("auth", ["api_key", "auth_token"])
async def test_the_sdks_key_and_bearer_token_are_taken(
    backend: Backend, make_proxy: ProxyFactory, auth: str
) -> None:
    proxy = await make_proxy(config(backend))
    options: dict[str, Any] = {auth: KEY, "api_key": KEY if auth == "api_key" else None}
    async with client(proxy, **options) as sdk:
        message = await sdk.messages.create(model="claude", max_tokens=5, messages=MESSAGES)
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("Echo:")


async def test_an_api_key_header_is_taken_too(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend))
    body = {"model": "claude", "max_tokens": 5, "messages": MESSAGES}
    async with aiohttp.ClientSession() as s:
        ok = await s.post(proxy.url("/anthropic/v1/messages"), json=body, headers={"Api-Key": KEY})
        assert ok.status == 200
        both = {"x-api-key": KEY, "Authorization": "Bearer dp-another"}
        differ = await s.post(proxy.url("/anthropic/v1/messages"), json=body, headers=both)
        assert differ.status == 400
        assert (await differ.json())["type"] == "error"
        for bad in (b"{not json", b'{"model": 7}', b"\xff\xfe"):  # said in Anthropic's shape
            refused = await s.post(
                proxy.url("/anthropic/v1/messages"),
                data=bad,
                headers={"x-api-key": KEY, "Content-Type": "application/json"},
            )
            error = await refused.json()
            assert refused.status == 400, bad
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"
        # x-api-key is Anthropic's: the OpenAI routes do not read it
        chat = await s.post(
            proxy.url("/openai/deployments/claude/chat/completions"),
            json={"messages": MESSAGES},
            headers={"x-api-key": KEY},
        )
        assert chat.status == 401


@pytest.mark.parametrize("line_ending", ["\n", "\r\n", "\r"])
async def test_streams_reach_the_sdk_and_their_usage_is_counted(
    backend: Backend, make_proxy: ProxyFactory, line_ending: str
) -> None:
    backend.control.line_ending = line_ending
    proxy = await make_proxy(config(backend))
    async with client(proxy) as sdk:
        async with sdk.messages.stream(model="claude", max_tokens=50, messages=MESSAGES) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        raw = await sdk.messages.create(
            model="claude", max_tokens=50, messages=MESSAGES, stream=True
        )
        kinds = [event.type async for event in raw]
    assert text == "Echo: one two three"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    per_message = final.usage.input_tokens + final.usage.output_tokens
    assert await used_tokens(proxy) == 2 * per_message


async def test_count_tokens_is_answered_and_not_counted(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, requestMinute=1))
    await clear_of_minute_boundary()  # (its requests in one minute bucket)
    async with client(proxy) as sdk:
        for _ in range(3):  # over the request limit: a token count is not a request
            counted = await sdk.messages.count_tokens(model="claude", messages=MESSAGES)
            assert counted.input_tokens == 3
    assert backend.control.last_request.path == "/v1/messages/count_tokens"
    assert await used_tokens(proxy) == 0


async def test_an_adapter_gets_the_path_the_request_came_on(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    async with client(proxy) as sdk:
        await sdk.messages.create(model="adapted", max_tokens=5, messages=MESSAGES)
        await sdk.messages.count_tokens(model="adapted", messages=MESSAGES)
    paths = [r.path for r in backend.control.requests]
    assert paths == [
        "/adapter/anthropic/v1/messages",
        "/adapter/anthropic/v1/messages/count_tokens",
    ]
    assert backend.control.requests[0].headers["Api-Key"].startswith("dprk_")  # per-request


async def test_refusals_are_anthropics_errors_the_sdk_raises_as_its_own(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend, requestMinute=1))
    await clear_of_minute_boundary()  # (its requests in one minute bucket)
    async with client(proxy, max_retries=0) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model="claude", max_tokens=5, messages=MESSAGES
        )
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "1"
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        with pytest.raises(anthropic.RateLimitError) as limited:
            await sdk.messages.create(model="claude", max_tokens=5, messages=MESSAGES)
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await sdk.messages.create(model="nope", max_tokens=5, messages=MESSAGES)
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
    assert limited.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": limited.value.body["error"]["message"]},  # type: ignore[index]
    }
    assert "Hit request rate limit" in limited.value.message
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    async with client(proxy, api_key=NO_ACCESS, max_retries=0) as other:
        with pytest.raises(anthropic.PermissionDeniedError):
            await other.messages.create(model="claude", max_tokens=5, messages=MESSAGES)
    async with client(proxy, api_key="dp-not-a-key", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            await stranger.messages.create(model="claude", max_tokens=5, messages=MESSAGES)


async def test_a_path_or_method_not_served_under_anthropic_answers_in_anthropics_shape(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """What the SDK may call that the proxy does not serve (``models.list``), or a method
    it does not take: a 404 or 405 in Anthropic's error shape, as its refusals are (they were
    DIAL's ``{"error": {"message", "code"}}`` there)."""
    proxy = await make_proxy(config(backend))
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as s:
        for method, path, status, kind in (
            ("GET", "/anthropic/v1/models", 404, "not_found_error"),
            ("GET", "/anthropic/v1/messages", 405, "invalid_request_error"),
        ):
            async with s.request(method, proxy.url(path)) as r:
                body = await r.json()
            assert r.status == status, path
            assert body["type"] == "error" and body["error"]["type"] == kind, body
    async with client(proxy, max_retries=0) as sdk:
        with pytest.raises(anthropic.NotFoundError) as listed:
            await sdk.models.list()
    assert listed.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


async def test_a_broken_stream_ends_with_an_error_event_the_sdk_raises(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    backend.control.break_stream_after(3)
    async with client(proxy, max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with sdk.messages.stream(
                model="claude", max_tokens=50, messages=MESSAGES
            ) as stream:
                async for _ in stream.text_stream:
                    pass
    assert "broke off" in broken.value.message
    assert await used_tokens(proxy) > 0  # an estimate: the stream was cut before its usage


async def test_a_stream_the_client_leaves_is_charged_its_reported_usage(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.control.chunk_delay = 0.02
    proxy = await make_proxy(config(backend))
    words = " ".join(f"w{i}" for i in range(30))
    body = {"model": "claude", "max_tokens": 100, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/anthropic/v1/messages"),
            json=body | {"messages": [{"role": "user", "content": words}]},
            headers={"x-api-key": KEY},
        )
        assert resp.status == 200
        await resp.content.readany()
        resp.close()
    for _ in range(200):
        if await used_tokens(proxy):
            break
        await asyncio.sleep(0.05)
    assert await used_tokens(proxy) == 30 + len(("Echo: " + words).split())


async def test_the_sdk_waits_the_retry_after_the_proxy_sends(
    backend: Backend, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await make_proxy(config(backend, requestMinute=1))
    await clear_of_minute_boundary()  # (its requests in one minute bucket)
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)  # (the sync SDK's wait, recorded)
    with anthropic.Anthropic(base_url=proxy.url("/anthropic"), api_key=KEY, max_retries=2) as sdk:
        create = functools.partial(
            sdk.messages.create, model="claude", max_tokens=5, messages=MESSAGES
        )
        await asyncio.to_thread(create)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await asyncio.to_thread(create)
        after = float(limited.value.response.headers["retry-after"])
        # (the earlier answers' Retry-After: the same, or a second more when a second boundary
        # fell between them and the last)
        assert len(waits) == 2 and all(after <= w <= after + 1 for w in waits)
