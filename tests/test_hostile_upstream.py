"""What an upstream that misbehaves can do to a client, its counters and the other upstreams:
redirects, Retry-After values, huge answers, encodings, hop-by-hop and stray headers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dialproxy import cli
from dialproxy.apis import responses
from dialproxy.config.model import Model, Upstream
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.upstream.balancer import Balancer
from dialproxy.web.appkeys import LEDGER
from tests.conftest import AiohttpServer, Proxy, ProxyFactory, new_key
from tests.hostile_upstream import (
    USAGE,
    Hostile,
    HostileServer,
    Recorder,
    Switching,
    chat_answer,
    create_hostile_app,
)
from tests.redis_server import RedisServer

KEY = new_key()
UPSTREAM_KEY = new_key("sk-upstream-")
SPARE_KEY = new_key("sk-spare-")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TOKEN_LIMIT = 1_000_000  # a limit of ours: the project's tokens are counted


HostileFactory = Callable[[], Awaitable[HostileServer]]


@pytest.fixture
def make_hostile(aiohttp_server: AiohttpServer) -> HostileFactory:
    async def factory() -> HostileServer:
        control = Hostile()
        return HostileServer(await aiohttp_server(create_hostile_app(control)), control)

    return factory


@pytest.fixture
async def hostile(make_hostile: HostileFactory) -> HostileServer:
    return await make_hostile()


@pytest.fixture
async def recorder(aiohttp_server: AiohttpServer) -> tuple[Recorder, str]:
    """The other host a redirect points to: (what it received, its URL)."""
    record = Recorder()
    server = await aiohttp_server(record.app())
    return record, str(server.make_url("/stolen"))


def config(
    upstreams: list[dict[str, Any]],
    *,
    endpoint: str | None = None,
    limited: bool = True,
    model: str = "chat",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "chat", "upstreams": upstreams}
    if endpoint is not None:
        spec["endpoint"] = endpoint
    return {
        "models": {model: spec},
        "roles": {"default": {"limits": {model: {"minute": TOKEN_LIMIT}} if limited else {}}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }


async def call(
    proxy: Proxy, model: str = "chat", *, raw: bool = False, **body: Any
) -> tuple[int, bytes, aiohttp.ClientResponse]:
    """POST a chat; ``raw``: the bytes as the proxy sent them (nothing decoded)."""
    async with aiohttp.ClientSession(auto_decompress=not raw) as s:
        resp = await s.post(
            proxy.url(f"/openai/deployments/{model}/chat/completions"),
            json={**CHAT, **body},
            headers={"Api-Key": KEY},
        )
        return resp.status, await resp.read(), resp


async def tokens_used(proxy: Proxy, model: str = "chat") -> int:
    await proxy.settle()
    async with aiohttp.ClientSession() as s:
        r = await s.get(proxy.url(f"/v1/deployments/{model}/limits"), headers={"Api-Key": KEY})
        used: int = (await r.json())["minuteTokenStats"]["used"]
        return used


class UpstreamClock:
    """The clock the upstreams' pauses go by, moved on by the test (a pause ends without
    waiting for it)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


NO_ROUTE = {"error": {"message": "No route", "code": "502"}}


# 1. Redirects: never followed; a failure of that upstream.


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("shape", ["direct", "endpoint"])
async def test_a_redirect_is_not_followed_and_no_credential_leaves(
    status: int,
    shape: str,
    hostile: HostileServer,
    recorder: tuple[Recorder, str],
    make_proxy: ProxyFactory,
) -> None:
    record, elsewhere = recorder
    if shape == "direct":  # the key in api-key (Azure style)
        upstreams = [{"endpoint": hostile.url(), "key": UPSTREAM_KEY, "auth": "api-key"}]
        cfg = config(upstreams)
    else:  # DIAL's adapter shape: the key in X-UPSTREAM-KEY, with X-UPSTREAM-EXTRA-DATA
        upstream = {"endpoint": "https://provider.example/v1", "key": UPSTREAM_KEY}
        cfg = config([upstream | {"extraData": {"a": 1}}], endpoint=hostile.url())
    proxy = await make_proxy(cfg)
    hostile.control.redirect, hostile.control.redirect_to = status, elsewhere
    with capture_logs() as logs:
        code, body, _ = await call(proxy)
    assert (code, json.loads(body)) == (502, NO_ROUTE)
    assert record.requests == []  # nothing reached the other host: no key, no body
    assert len(hostile.control.requests) == 1
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["error"]) == (502, f"upstream answered {status}")
    assert await tokens_used(proxy) == 0


async def test_a_redirecting_upstream_is_retried_on_the_next(
    hostile: HostileServer,
    recorder: tuple[Recorder, str],
    make_hostile: HostileFactory,
    make_proxy: ProxyFactory,
) -> None:
    record, elsewhere = recorder
    spare = await make_hostile()
    proxy = await make_proxy(
        config(
            [
                {"endpoint": hostile.url(), "key": UPSTREAM_KEY},
                {"endpoint": spare.url(), "key": SPARE_KEY, "tier": 1},
            ]
        )
    )
    hostile.control.redirect, hostile.control.redirect_to = 307, elsewhere
    code, body, resp = await call(proxy)
    assert code == 200 and json.loads(body) == chat_answer()
    assert resp.headers["X-UPSTREAM-ATTEMPTS"] == "2"
    assert record.requests == []
    assert spare.control.requests[0].headers["Authorization"] == f"Bearer {SPARE_KEY}"
    assert await tokens_used(proxy) == USAGE["total_tokens"]  # the spare's, not the 99


# 3. Retry-After: delta-seconds or an HTTP date, else absent; every pause at most 300 s.


@pytest.mark.parametrize(
    ("value", "told"),
    [
        ("nan", 30),  # not a number: absent (the default pause, 30 s)
        ("inf", 30),
        ("-5", 30),
        ("1e12", 30),  # not delta-seconds
        ("soon", 30),
        ("99999999999", 300),  # capped
        ("2.5", 3),  # a decimal, accepted
        ("12", 12),
    ],
)
async def test_no_retry_after_takes_an_upstream_out_for_long(
    value: str, told: int, hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    clock = UpstreamClock()
    cfg = config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}])
    proxy = await make_proxy(cfg, upstream_clock=clock)
    hostile.control.retry_after = value
    code, body, resp = await call(proxy)
    assert code == 503  # every upstream rate limited (never a 500)
    assert json.loads(body)["error"]["code"] == "503"
    assert resp.headers["Retry-After"] == str(told)
    hostile.control.retry_after = None
    assert (await call(proxy))[0] == 502  # paused: not asked again yet (no route)
    assert len(hostile.control.requests) == 1
    clock.advance(301)  # the longest pause there is, and a second
    code, body, _ = await call(proxy)
    assert (code, json.loads(body)) == (200, chat_answer())


async def test_retry_after_as_an_http_date(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    clock = UpstreamClock()
    cfg = config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}])
    proxy = await make_proxy(cfg, upstream_clock=clock)
    for when, low, high in (
        (datetime.now(UTC) + timedelta(seconds=20), 19, 21),
        (datetime.now(UTC) - timedelta(days=1), 1, 1),  # past: at once (told 1 s)
        (datetime.now(UTC) + timedelta(days=3650), 300, 300),  # capped
    ):
        hostile.control.retry_after = format_datetime(when, usegmt=True)
        code, _, resp = await call(proxy)
        assert code == 503 and low <= int(resp.headers["Retry-After"]) <= high
        clock.advance(301)


async def test_the_balancer_caps_every_pause() -> None:
    """Whatever reaches it (a caller that did not parse the header): 0..300 s."""
    upstream = Upstream(endpoint="http://u")
    model = Model(name="m", type="chat", endpoint=None, upstreams=(upstream,))
    clock = [1000.0]
    balancer = Balancer(clock=lambda: clock[0])
    for seconds, paused in ((float("nan"), 30), (float("inf"), 300), (1e12, 300), (-3, 0)):
        await balancer.rate_limited(model, upstream, seconds)
        assert [r.url for r in balancer.plan(model)] == ([] if paused else ["http://u"])
        clock[0] += paused + 0.001
        assert [r.url for r in balancer.plan(model)] == ["http://u"]


async def test_a_shared_pause_is_capped_too(
    hostile: HostileServer, make_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    model = f"chat-{uuid.uuid4().hex[:8]}"  # the Redis server lives for the whole run
    storage = counter_storage(redis_server.url)
    cfg = config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}], model=model)
    proxy = await make_proxy(cfg, storage=storage)
    hostile.control.retry_after = "99999999999"
    assert (await call(proxy, model))[0] == 503
    # the pause shared with the other instances (dialproxy's dp:u:<model>:<upstream>, in
    # whatever prefix the counter storage adds) expires within the cap
    written = redis_server.command("KEYS", f"*dp:u:{model}:*")
    assert isinstance(written, list) and written
    for key in written:
        assert isinstance(key, bytes)
        ttl = redis_server.command("TTL", key.decode())
        assert isinstance(ttl, int) and 0 < ttl <= 300


# 6. A non-streamed answer over max_response: a 502, read no further.

CAP = 1024 * 1024


@pytest.mark.parametrize("with_length", [False, True])
async def test_an_answer_over_max_response_is_a_502(
    with_length: bool, hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]),
        settings=Settings(max_response=CAP),
    )
    hostile.control.huge, hostile.control.huge_length = 80 * 1024 * 1024, with_length
    with capture_logs() as logs:
        code, body, _ = await call(proxy)
    assert code == 502
    assert json.loads(body)["error"]["message"] == (
        f"The upstream's response is over the {CAP}-byte limit"
    )
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 502 and "over the" in line["error"]
    # The proxy stopped reading at the cap: the upstream could not write much more.
    assert hostile.control.huge_sent < 24 * 1024 * 1024
    hostile.control.huge = 0
    assert (await call(proxy))[0] == 200  # the next answer is served


async def test_an_answer_of_max_response_is_served(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]),
        settings=Settings(max_response=CAP),
    )
    for with_length in (False, True):
        hostile.control.huge, hostile.control.huge_sent = CAP, 0
        hostile.control.huge_length = with_length
        code, body, _ = await call(proxy)
        assert code == 200 and len(body) == CAP


def test_max_response_from_the_flag_or_the_environment() -> None:
    assert cli.settings_for(["serve", "--max-response", "99"]).max_response == 99
    assert Settings.from_env({}).max_response == 64 * 1024 * 1024
    assert Settings.from_env({"DIALPROXY_MAX_RESPONSE": "1000"}).max_response == 1000
    with pytest.raises(ValueError, match="DIALPROXY_MAX_RESPONSE"):
        Settings.from_env({"DIALPROXY_MAX_RESPONSE": "lots"})
    with pytest.raises(ValueError, match="max response"):
        Settings(max_response=0).check()


# 11a. Encodings: identity asked for; gzip answered anyway is decoded, usage counted.


@pytest.mark.parametrize("client_accepts_gzip", [False, True])
async def test_a_gzip_answer_is_relayed_decoded_and_counted(
    client_accepts_gzip: bool, hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]))
    hostile.control.gzip = True
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json=CHAT,
            headers={"Api-Key": KEY} | ({"Accept-Encoding": "gzip"} if client_accepts_gzip else {}),
            skip_auto_headers=() if client_accepts_gzip else ("Accept-Encoding",),
        )
        raw = await resp.read()
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert json.loads(raw) == chat_answer()  # the bytes as they came: plain JSON
    assert hostile.control.requests[0].headers["Accept-Encoding"] == "identity"
    assert await tokens_used(proxy) == USAGE["total_tokens"]


async def test_a_gzip_answer_is_capped_as_decoded(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    """80 MB of spaces gzip-encoded (about 80 kB): refused at the cap, as decoded."""
    proxy = await make_proxy(
        config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]),
        settings=Settings(max_response=CAP),
    )
    hostile.control.huge, hostile.control.gzip = 80 * 1024 * 1024, True
    code, body, _ = await call(proxy)
    assert code == 502 and b"over the" in body  # (the few kB sent: decoded to the cap only)


async def test_a_gzip_stream_is_relayed_decoded_and_counted(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]))
    hostile.control.gzip = True
    code, raw, resp = await call(proxy, raw=True, stream=True)
    assert code == 200 and "Content-Encoding" not in resp.headers
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in raw  # asked for on the client's behalf: hidden
    assert await tokens_used(proxy) == USAGE["total_tokens"]


async def test_an_encoding_not_decoded_is_relayed_with_its_name(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]))
    hostile.control.encoding = "x-custom"  # (sent as is: the body is plain JSON)
    code, raw, resp = await call(proxy, raw=True)
    assert code == 200
    assert resp.headers["Content-Encoding"] == "x-custom"  # the bytes match the headers
    assert json.loads(raw) == chat_answer()


# 11b. Response headers: an allow-list; nothing the Connection header names.


async def test_headers_named_by_connection_never_pass(
    hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}]))
    hostile.control.headers = {
        "Connection": "X-Hop, x-request-id",
        "X-Hop": "per-hop",
        "X-Request-Id": "req-1",  # allowed, but named as per-hop here
        "request-id": "req-2",
    }
    code, _, resp = await call(proxy)
    assert code == 200
    assert "X-Hop" not in resp.headers and "X-Request-Id" not in resp.headers
    assert resp.headers["request-id"] == "req-2"


SENT = {
    "x-request-id": "req-1",
    "Request-Id": "req-2",
    "openai-processing-ms": "12",
    "openai-version": "2020-10-01",
    "Content-Language": "en",
    "Set-Cookie": "session=1",
    "X-Internal-Debug": "node-7",
    "openai-organization": "org-secret",
    "X-UPSTREAM-ATTEMPTS": "9",
    "x-ratelimit-remaining-tokens": "5",
    "anthropic-ratelimit-requests-remaining": "7",
}


@pytest.mark.parametrize("limited", [False, True])
async def test_only_listed_response_headers_pass(
    limited: bool, hostile: HostileServer, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        config([{"endpoint": hostile.url(), "key": UPSTREAM_KEY}], limited=limited)
    )
    hostile.control.headers = SENT
    code, _, resp = await call(proxy)
    assert code == 200
    got = resp.headers
    for name in ("x-request-id", "Request-Id", "openai-processing-ms", "openai-version"):
        assert got[name] == SENT[name]
    assert got["Content-Language"] == "en"
    assert got["Content-Type"].startswith("application/json")
    for name in ("Set-Cookie", "X-Internal-Debug", "openai-organization"):
        assert name not in got
    assert got.getall("X-UPSTREAM-ATTEMPTS") == ["1"]  # ours only
    if limited:  # ours replace the provider's (less the request's own reservation)
        assert TOKEN_LIMIT - 400 < int(got["x-ratelimit-remaining-tokens"]) < TOKEN_LIMIT
        assert "anthropic-ratelimit-requests-remaining" not in got
    else:  # no limit of ours: the provider's pass
        assert got["x-ratelimit-remaining-tokens"] == "5"
        assert got["anthropic-ratelimit-requests-remaining"] == "7"


async def test_an_upstreams_cookies_are_never_sent_back(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """The proxy keeps no cookies: what one answer sets (a balancer's affinity cookie, or a
    hostile upstream's thousands) is neither stored nor sent with any later request, whoever
    makes it.  (Reached by host name: aiohttp's cookie jar drops cookies of IP addresses.)"""
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response(chat_answer("ok") | {"usage": USAGE})
        for i in range(50):
            resp.set_cookie(f"affinity{i}", "x" * 100, max_age=3600, path="/")
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    upstream = await aiohttp_server(app)
    endpoint = f"http://localhost:{upstream.port}/v1/chat/completions"
    proxy = await make_proxy(config([{"endpoint": endpoint, "key": UPSTREAM_KEY}]))
    for _ in range(3):
        code, _, resp = await call(proxy)
        assert code == 200
        assert "Set-Cookie" not in resp.headers
    assert seen == [None, None, None]


async def test_a_final_1xx_answer_is_a_502_not_relayed(make_proxy: ProxyFactory) -> None:
    """An upstream that answers 101 Switching Protocols (no Upgrade asked): no HTTP answer to
    relay.  Before, the client got the 101 with no body and hung until the proxy gave up on
    the connection; now a 502 at once, nothing charged."""
    async with Switching() as upstream:
        endpoint = upstream.url("/v1/chat/completions")
        proxy = await make_proxy(config([{"endpoint": endpoint, "key": UPSTREAM_KEY}]))
        for _ in range(2):
            code, body, _ = await asyncio.wait_for(call(proxy), 5)
            assert code == 502
            assert json.loads(body) == {"error": {"message": "No route", "code": "502"}}
        assert upstream.answered == 2
        assert await tokens_used(proxy) == 0


async def test_a_final_1xx_to_a_follow_up_or_a_feature_call_is_a_502(
    make_proxy: ProxyFactory,
) -> None:
    """The same 101 from the upstream that made a response (asked for it again) or from a
    feature endpoint (tokenize): a 502, not the 101 relayed."""
    async with Switching() as upstream:
        spec = {"endpoint": upstream.url("/v1/chat/completions"), "key": UPSTREAM_KEY}
        cfg = config([spec | {"id": "u", "responsesEndpoint": upstream.url("/v1/responses")}])
        cfg["models"]["chat"]["features"] = {"tokenizeEndpoint": upstream.url("/tokenize")}
        proxy = await make_proxy(cfg)
        ours = responses.mint(
            responses.ResponseRef("chat", "u", responses.project_tag("p"), True, "resp_0123456789")
        )
        async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
            for method, path in (
                ("GET", f"/openai/v1/responses/{ours}"),
                ("POST", "/v1/deployments/chat/tokenize"),
            ):
                body = {"inputs": ["x"]} if method == "POST" else None
                async with s.request(method, proxy.url(path), json=body) as r:
                    assert r.status == 502, (path, r.status, await r.text())
        assert upstream.answered == 2


async def test_a_usage_past_any_model_is_not_counted_and_the_ledger_goes_on(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """An upstream that says it read 10^16 tokens (a valid 64-bit count, but at the model's
    price 10^19 nano-USD, past one): not believed (the request is served, nothing counted,
    the log line says why).  Before, the usage ledger's batch could not be written, and
    being kept for the next write it stopped every later row, everyone's."""
    huge = {"prompt_tokens": 10**16, "completion_tokens": 1}
    answers = [huge, USAGE]

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(chat_answer() | {"usage": answers.pop(0)})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    upstream = await aiohttp_server(app)
    cfg = config([{"endpoint": str(upstream.make_url("/v1/chat/completions")), "key": "k"}])
    cfg["models"]["chat"]["pricing"] = {"unit": "token", "prompt": "0.001", "completion": "0"}
    proxy = await make_proxy(cfg)
    ledger = proxy.app[LEDGER]
    with capture_logs() as logs:
        code, _, _ = await call(proxy)
        assert code == 200
        assert await tokens_used(proxy) == 0
    (line,) = [e for e in logs if e.get("event") == "request"]
    assert line["error"] == "the upstream's usage is over 1,000,000,000 tokens: not counted"
    assert line["total_tokens"] is None
    assert await ledger.flush()
    code, _, _ = await call(proxy)  # an ordinary one after it: counted, and in the ledger
    assert code == 200
    assert await tokens_used(proxy) == USAGE["total_tokens"]
    assert await ledger.flush()
    rows = await ledger.rows(time.time() - 3600, time.time() + 3600, by=["project"])
    assert [(r["requests"], r["errors"], r["total_tokens"]) for r in rows] == [(2, 1, 8)]


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_an_upstream_error_that_quotes_its_key_is_passed_without_it(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, content_type: str
) -> None:
    """A provider's 401 that quotes the key it got ("Incorrect API key provided: ..."), or a
    400 that echoes the headers: the client gets the error, never the upstream's key; an
    error labelled an event stream too (it was relayed as it came, key and all)."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        got = request.headers.get("Authorization", "")
        error = {"error": {"message": f"Incorrect API key provided: {got}", "code": "invalid_key"}}
        return web.Response(body=json.dumps(error), status=401, content_type=content_type)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    upstream = await aiohttp_server(app)
    endpoint = str(upstream.make_url("/v1/chat/completions"))
    proxy = await make_proxy(config([{"endpoint": endpoint, "key": UPSTREAM_KEY}]))
    code, body, _ = await call(proxy)
    assert code == 401
    assert UPSTREAM_KEY.encode() not in body
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: Bearer ***"
