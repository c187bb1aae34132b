"""The OpenAI Responses API through the proxy, driven by the real openai SDK against the
demo backend's Responses API: created (sync, async, streamed, background), followed up
(retrieve, cancel, delete) on the proxy's own ids, limited and counted like chat."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dialproxy.apis import responses
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.web.appkeys import LEDGER
from tests.conftest import (
    AiohttpServer,
    Backend,
    BackendFactory,
    Proxy,
    ProxyFactory,
    clear_of_minute_boundary,
    new_key,
)
from tests.conftest import used_tokens as used_tokens_of
from tests.redis_server import RedisServer

KEY = new_key()
OTHER_PROJECT = new_key()
UPSTREAM_KEY = new_key("upstream-secret-")


def config(*backends: Backend, **limits: Any) -> dict[str, Any]:
    """One model served by each backend's Responses API directly (its upstream `id` the
    backend's place: east, west)."""
    names = ["east", "west"]
    return {
        "models": {
            "m": {
                "type": "chat",
                "upstreams": [
                    {
                        "id": names[i],
                        "endpoint": b.url(),
                        "responsesEndpoint": b.url("/v1/responses"),
                        "key": UPSTREAM_KEY,
                    }
                    for i, b in enumerate(backends)
                ],
                "responsesDefaults": {"max_output_tokens": 50},
                "pricing": {"unit": "token", "prompt": "0.001", "completion": "0.002"},
            }
        },
        "roles": {"r": {"limits": {"m": limits or {"minute": 100000}}}},
        "keys": {
            KEY: {"project": "p", "role": "r"},
            OTHER_PROJECT: {"project": "q", "role": "r"},
        },
    }


def client(proxy: Proxy, key: str = KEY, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url("/openai/v1"), api_key=key, **options)


def aclient(proxy: Proxy, key: str = KEY, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url("/openai/v1"), api_key=key, **options)


async def used_tokens(proxy: Proxy) -> int:
    return await used_tokens_of(proxy, KEY, "m")


def upstream_ids(backend: Backend) -> list[tuple[str, str]]:
    """(method, path) of what the backend got on its Responses API."""
    return [(r.method, r.path) for r in backend.control.requests if "/responses" in r.path]


async def test_create_sync_and_async_with_usage_counted_and_ids_made_ours(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    with client(proxy) as sdk:
        made = await asyncio.to_thread(lambda: sdk.responses.create(model="m", input="Hello there"))
    assert made.output_text == "Echo: Hello there"
    assert made.id.startswith("resp_dial_")
    ref = responses.parse(made.id)
    assert ref is not None and (ref.deployment, ref.upstream) == ("m", "east")
    assert made.id not in json.dumps([r.json for r in backend.control.requests])
    sent = backend.control.requests[-1]
    assert sent.json["max_output_tokens"] == 50  # responsesDefaults
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert made.usage is not None
    first = made.usage.total_tokens

    async with aclient(proxy) as ac:
        again = await ac.responses.create(
            model="m", input=[{"role": "user", "content": "one two three"}]
        )
    assert again.output_text == "Echo: one two three" and again.usage is not None
    assert await used_tokens(proxy) == first + again.usage.total_tokens


@pytest.mark.parametrize("line_ending", ["\n", "\r\n", "\r"])
async def test_a_stream_reaches_the_sdk_with_our_ids_and_its_usage_counted(
    backend: Backend, make_proxy: ProxyFactory, line_ending: str
) -> None:
    backend.control.line_ending = line_ending
    proxy = await make_proxy(config(backend))
    async with aclient(proxy) as ac:
        stream = await ac.responses.create(model="m", input="a b c d", stream=True)
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Echo: a b c d"
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.id == completed.response.id
    assert created.response.id.startswith("resp_dial_")
    usage = completed.response.usage
    assert usage is not None and usage.total_tokens > 0
    assert await used_tokens(proxy) == usage.total_tokens
    # and the openai SDK's own stream helper reads it whole
    async with aclient(proxy) as ac, ac.responses.stream(model="m", input="x y") as helper:
        final = await helper.get_final_response()
    assert final.output_text == "Echo: x y" and final.id.startswith("resp_dial_")


async def test_background_retrieve_cancel_delete_on_our_ids_and_usage_charged_once(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.control.background_delay = 0.3
    proxy = await make_proxy(config(backend))
    async with aclient(proxy) as ac:
        queued = await ac.responses.create(model="m", input="in the back", background=True)
        assert queued.status == "queued" and queued.id.startswith("resp_dial_")
        for _ in range(100):
            seen = await ac.responses.retrieve(queued.id)
            if seen.status == "completed":
                break
            await asyncio.sleep(0.05)
        assert seen.id == queued.id and seen.output_text == "Echo: in the back"
        assert seen.usage is not None
        again = await ac.responses.retrieve(queued.id)  # seen twice: charged once
        assert again.usage == seen.usage
        assert await used_tokens(proxy) == seen.usage.total_tokens
        (ledger,) = await proxy.app[LEDGER].rows(0, time.time() + 3600, (), project="p")
        assert ledger["total_tokens"] == seen.usage.total_tokens  # (the follow-up's, once)
        streamed = await ac.responses.retrieve(queued.id, stream=True)
        replay = [e async for e in streamed]
        assert replay[-1].type == "response.completed"
        assert replay[-1].response.id == queued.id
        assert await used_tokens(proxy) == seen.usage.total_tokens

        running = await ac.responses.create(model="m", input="stop me", background=True)
        cancelled = await ac.responses.cancel(running.id)
        assert (cancelled.id, cancelled.status) == (running.id, "cancelled")

        await ac.responses.delete(queued.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await ac.responses.retrieve(queued.id)
    upstream_id = responses.parse(queued.id)
    assert upstream_id is not None
    assert upstream_id.upstream_id not in str(gone.value)  # the error names our id, not theirs
    paths = upstream_ids(backend)
    assert ("DELETE", f"/v1/responses/{upstream_id.upstream_id}") in paths
    assert ("POST", f"/v1/responses/{responses.parse(running.id)[4]}/cancel") in paths  # type: ignore[index]


async def test_a_background_response_whose_stream_brought_its_usage_is_not_charged_again(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """Created with ``stream`` and ``background``: its stream ends with the usage, charged
    then; a retrieve that sees it done charges nothing more (it charged it again before)."""
    proxy = await make_proxy(config(backend))
    async with aclient(proxy) as ac:
        stream = await ac.responses.create(
            model="m", input="both ways", stream=True, background=True
        )
        events = [e async for e in stream]
        completed = events[-1]
        assert completed.type == "response.completed" and completed.response.usage is not None
        total = completed.response.usage.total_tokens
        assert await used_tokens(proxy) == total
        seen = await ac.responses.retrieve(completed.response.id)
        assert seen.status == "completed" and seen.usage is not None
    await proxy.settle()
    assert await used_tokens(proxy) == total
    (ledger,) = await proxy.app[LEDGER].rows(0, time.time() + 3600, (), project="p")
    assert ledger["total_tokens"] == total


async def test_a_background_response_whose_stream_was_cut_is_charged_once_by_its_follow_up(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """Created with ``stream`` and ``background``, its stream cut: the response runs on at
    the upstream, so the create charges no estimate; the retrieve that sees it done charges
    what it used (the estimate and the usage were both charged)."""
    proxy = await make_proxy(config(backend))
    backend.control.break_stream_after(2)
    async with aclient(proxy) as ac:
        stream = await ac.responses.create(
            model="m", input="cut short", stream=True, background=True
        )
        events = []
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            async for event in stream:
                events.append(event)
        created = events[0]
        assert created.type == "response.created"
        ours = created.response.id
        await proxy.settle()
        assert await used_tokens(proxy) == 0
        for _ in range(100):
            seen = await ac.responses.retrieve(ours)
            if seen.status == "completed":
                break
            await asyncio.sleep(0.05)
        assert seen.usage is not None
    assert await used_tokens(proxy) == seen.usage.total_tokens


async def test_a_background_response_a_shared_key_follows_up_is_charged_to_its_cap(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """A shared key's background response: its usage, charged when a retrieve first sees it
    done, counts in the key's ``utilized`` as in its owner's limits (it did not: a key with
    a cap of 100 tokens could spend any number through background responses)."""
    backend.control.background_delay = 0.05
    cfg = config(backend)
    cfg["keys"][KEY]["canShare"] = True
    proxy = await make_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url("/v1/sharedkeys"),
            json={"name": "lent", "tokens": 10**6},
            headers={"Api-Key": KEY},
        ) as r:
            assert r.status == 201
            lent = await r.json()
        async with aclient(proxy, lent["key"]) as ac:
            queued = await ac.responses.create(model="m", input="in the back", background=True)
            for _ in range(100):
                seen = await ac.responses.retrieve(queued.id)
                if seen.status == "completed":
                    break
                await asyncio.sleep(0.05)
            assert seen.usage is not None
        await proxy.settle()
        async with s.get(proxy.url(f"/v1/sharedkeys/{lent['id']}"), headers={"Api-Key": KEY}) as r:
            shown = await r.json()
    assert shown["utilized"] == seen.usage.total_tokens == await used_tokens(proxy)


async def test_a_background_usage_past_any_model_is_not_charged_by_its_follow_up(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """A follow-up charges what the response used, and no more believes a count past 10^9
    tokens than a request does (it charged 10^16 to the counters and the ledger)."""
    upstream_id = "resp_0123456789abcdef"
    usage = {"input_tokens": 10**16, "output_tokens": 1, "total_tokens": 10**16 + 1}

    async def create(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": upstream_id, "object": "response", "status": "queued"})

    async def retrieve(request: web.Request) -> web.Response:
        done = {"id": upstream_id, "object": "response", "status": "completed"}
        return web.json_response(done | {"usage": usage})

    app = web.Application()
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{id}", retrieve)
    server = await aiohttp_server(app)
    up = {"endpoint": str(server.make_url("/v1/chat/completions")), "key": UPSTREAM_KEY}
    up["responsesEndpoint"] = str(server.make_url("/v1/responses"))
    cfg = {
        "models": {"m": {"type": "chat", "upstreams": [up]}},
        "roles": {"r": {"limits": {"m": {"minute": 10**12}}}},
        "keys": {KEY: {"project": "p", "role": "r"}},
    }
    proxy = await make_proxy(cfg)
    async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
        body = {"model": "m", "input": "x", "background": True}
        async with s.post(proxy.url("/openai/v1/responses"), json=body) as r:
            assert r.status == 200
            ours = (await r.json())["id"]
        async with s.get(proxy.url(f"/openai/v1/responses/{ours}")) as r:
            assert r.status == 200 and (await r.json())["status"] == "completed"
    await proxy.settle()
    assert await used_tokens(proxy) == 0
    (row,) = await proxy.app[LEDGER].rows(0, time.time() + 3600, (), project="p")
    assert row["total_tokens"] == 0


async def test_follow_ups_are_their_own_api_in_the_metrics_and_the_charge_a_responses_row(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """A poll is not a response made: ``/metrics`` counts follow-ups as
    ``responses/retrieve`` (they counted as ``responses``, five "responses" for one made and
    four polls); the usage a follow-up charges goes to the ledger's ``responses`` row."""
    backend.control.background_delay = 0.05
    proxy = await make_proxy(config(backend))
    async with aiohttp.ClientSession() as s, aclient(proxy) as ac:
        queued = await ac.responses.create(model="m", input="in the back", background=True)
        polls = 0
        while (seen := await ac.responses.retrieve(queued.id)).status != "completed":
            polls += 1
            assert polls < 100
            await asyncio.sleep(0.05)
        await ac.responses.retrieve(queued.id)
        await proxy.settle()
        async with s.get(proxy.url("/metrics")) as r:
            text = await r.text()
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dialproxy_requests_total":
                api = sample.labels["api"]
                counted[api] = counted.get(api, 0) + sample.value
    assert counted == {"responses": 1, "responses/retrieve": polls + 2}
    assert seen.usage is not None
    rows = await proxy.app[LEDGER].rows(0, time.time() + 3600, ("api",), project="p")
    assert [(r["api"], r["total_tokens"]) for r in rows] == [("responses", seen.usage.total_tokens)]


async def test_follow_ups_go_to_the_upstream_that_made_the_response(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    west = await make_backend()
    proxy = await make_proxy(config(backend, west))
    async with aclient(proxy) as ac:
        made = [await ac.responses.create(model="m", input=f"n{i}") for i in range(6)]
        makers = {r.id: responses.parse(r.id).upstream for r in made}  # type: ignore[union-attr]
        assert set(makers.values()) == {"east", "west"}  # (weighted round-robin: both used)
        for _ in range(2):
            for r in made:
                assert (await ac.responses.retrieve(r.id)).output_text == r.output_text
    for name, b in (("east", backend), ("west", west)):
        gets = [path for method, path in upstream_ids(b) if method == "GET"]
        mine = [responses.parse(i).upstream_id for i, m in makers.items() if m == name]  # type: ignore[union-attr]
        assert sorted(gets) == sorted(f"/v1/responses/{u}" for u in mine * 2)


async def test_an_id_of_another_project_or_not_ours_is_404_and_nothing_is_sent(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    async with aclient(proxy) as ac:
        made = await ac.responses.create(model="m", input="mine")
    before = len(backend.control.requests)
    async with aclient(proxy, OTHER_PROJECT) as other:
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(made.id)
    async with aclient(proxy) as ac:
        for bad in ("resp_123", "resp_dial_%%%", "resp_dial_" + "x" * 5000):
            with pytest.raises((openai.NotFoundError, openai.APIStatusError)) as e:
                await ac.responses.retrieve(bad)
            assert e.value.status_code in (404, 414, 400)
    assert len(backend.control.requests) == before


async def test_limits_429_through_the_sdk(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(backend, requestMinute=2))
    await clear_of_minute_boundary()  # (three requests in one minute bucket)
    with client(proxy, max_retries=0) as sdk:
        raw = await asyncio.to_thread(
            lambda: sdk.responses.with_raw_response.create(model="m", input="hi")
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        await asyncio.to_thread(lambda: sdk.responses.create(model="m", input="hi"))
        with pytest.raises(openai.RateLimitError) as limited:
            await asyncio.to_thread(lambda: sdk.responses.create(model="m", input="hi"))
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
        assert "Hit request rate limit" in limited.value.message
    assert len(upstream_ids(backend)) == 2  # the third never left the proxy


async def test_a_stream_the_client_leaves_is_charged_its_reported_usage(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    backend.control.chunk_delay = 0.02
    proxy = await make_proxy(config(backend))
    words = " ".join(f"w{i}" for i in range(30))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/v1/responses"),
            json={"model": "m", "input": words, "stream": True},
            headers={"Api-Key": KEY},
        )
        assert resp.status == 200
        await resp.content.readany()  # the first events, then the client goes away
        resp.close()
    for _ in range(200):  # drained in the background for the usage at its end
        if await used_tokens(proxy):
            break
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as s:  # what the whole stream reports
        resp = await s.post(
            backend.url("/v1/responses"), json={"model": "m", "input": words, "stream": False}
        )
        expected = (await resp.json())["usage"]["total_tokens"]
    assert await used_tokens(proxy) == expected


async def test_two_instances_on_redis_follow_up_and_charge_a_background_response_once(
    backend: Backend, make_proxy: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    url = redis_server.url
    cfg = config(backend)
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), storage=url)
    one = await make_proxy(cfg, settings=settings, storage=counter_storage(url))
    two = await make_proxy(cfg, settings=settings, storage=counter_storage(url))
    backend.control.background_delay = 0.1
    async with aclient(one) as a, aclient(two) as b:
        queued = await a.responses.create(model="m", input="shared", background=True)
        for _ in range(100):
            if (await b.responses.retrieve(queued.id)).status == "completed":
                break
            await asyncio.sleep(0.05)
        done_one = await a.responses.retrieve(queued.id)
        done_two = await b.responses.retrieve(queued.id)
    assert done_one.usage is not None and done_one.usage == done_two.usage
    await two.settle()  # (charged by the instance that saw it complete first)
    assert await used_tokens(one) == done_one.usage.total_tokens
    assert await used_tokens(two) == done_one.usage.total_tokens
    marks = redis_server.command("KEYS", "dp:resp:charged:*")
    assert isinstance(marks, list) and len(marks) == 1


async def test_previous_response_id_goes_to_the_upstream_that_made_it(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    west = await make_backend()
    proxy = await make_proxy(config(backend, west))
    async with aclient(proxy) as ac:
        first = [await ac.responses.create(model="m", input=f"turn {i}") for i in range(4)]
        for made in first:
            ref = responses.parse(made.id)
            assert ref is not None
            target = backend if ref.upstream == "east" else west
            before = len(target.control.requests)
            follow = await ac.responses.create(
                model="m", input="and then?", previous_response_id=made.id
            )
            assert len(target.control.requests) == before + 1  # pinned: no other upstream
            sent = target.control.requests[-1].json
            assert sent["previous_response_id"] == ref.upstream_id  # the upstream's own id
            assert responses.parse(follow.id).upstream == ref.upstream  # type: ignore[union-attr]
    async with aclient(proxy, OTHER_PROJECT) as other:
        with pytest.raises(openai.NotFoundError):
            await other.responses.create(model="m", input="x", previous_response_id=first[0].id)


async def test_a_failed_attempt_moves_on_and_the_id_names_the_upstream_that_answered(
    backend: Backend, make_backend: BackendFactory, make_proxy: ProxyFactory
) -> None:
    west = await make_backend()
    cfg = config(backend, west)
    cfg["models"]["m"]["upstreams"][1]["tier"] = 1  # east first, west when east fails
    proxy = await make_proxy(cfg)
    backend.control.fail_next(502)
    async with aclient(proxy, max_retries=0) as ac:
        raw = await ac.responses.with_raw_response.create(model="m", input="retry")
        assert raw.headers["X-UPSTREAM-ATTEMPTS"] == "2"
        made = raw.parse()
        ref = responses.parse(made.id)
        assert ref is not None and ref.upstream == "west"
        assert (await ac.responses.retrieve(made.id)).output_text == "Echo: retry"
    assert [r.path for r in west.control.requests] == [
        "/v1/responses",
        f"/v1/responses/{ref.upstream_id}",
    ]


async def test_an_adapter_gets_the_upstream_in_headers_and_a_per_request_key(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    cfg = config(backend)
    cfg["models"]["m"] = {
        "type": "chat",
        "responsesEndpoint": backend.url("/openai/v1/responses"),
        "upstreams": [
            {
                "id": "one",
                "endpoint": "http://provider/chat",
                "responsesEndpoint": "http://provider/v1/responses",
                "key": UPSTREAM_KEY,
            }
        ],
    }
    cfg["models"]["i"] = {
        "type": "chat",
        "interfaces": {"openaiResponses": {"base_url": backend.url("/base/")}},
    }
    cfg["roles"]["r"]["limits"]["i"] = {}
    proxy = await make_proxy(cfg)
    async with aclient(proxy) as ac:
        made = await ac.responses.create(model="m", input="via adapter")
        got = backend.control.requests[-1]
        assert got.path == "/openai/v1/responses"
        assert got.headers["X-UPSTREAM-ENDPOINT"] == "http://provider/v1/responses"
        assert got.headers["X-UPSTREAM-KEY"] == UPSTREAM_KEY
        assert got.headers["Api-Key"].startswith("dprk_")
        await ac.responses.retrieve(made.id)
        ref = responses.parse(made.id)
        assert ref is not None
        follow = backend.control.requests[-1]
        assert follow.path == f"/openai/v1/responses/{ref.upstream_id}"
        assert follow.headers["Api-Key"].startswith("dprk_")
        assert follow.headers["Api-Key"] != got.headers["Api-Key"]

        via_base = await ac.responses.create(model="i", input="via interfaces")
        assert backend.control.requests[-1].path == "/base/openai/v1/responses"
        await ac.responses.retrieve(via_base.id)
        ref = responses.parse(via_base.id)
        assert ref is not None
        assert backend.control.requests[-1].path == f"/base/openai/v1/responses/{ref.upstream_id}"


async def test_the_sdk_waits_the_retry_after_the_proxy_sends(
    backend: Backend, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await make_proxy(config(backend, requestMinute=1))
    await clear_of_minute_boundary()  # (its requests in one minute bucket)
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)  # (the sync SDK's wait, recorded)
    with client(proxy, max_retries=2) as sdk:
        await asyncio.to_thread(lambda: sdk.responses.create(model="m", input="hi"))
        with pytest.raises(openai.RateLimitError) as limited:
            await asyncio.to_thread(lambda: sdk.responses.create(model="m", input="hi"))
        after = float(limited.value.response.headers["retry-after"])
        assert len(waits) == 2 and all(after - 1 <= w <= after for w in waits)
