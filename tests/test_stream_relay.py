"""Streams from a hostile upstream, through the real proxy: any SSE framing is relayed as it
comes, and a stream the client abandons (or the upstream breaks off) is still charged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dialproxy.settings import Settings
from dialproxy.web.appkeys import BACKGROUND, CLIENT, LEDGER
from tests.conftest import AiohttpServer, Proxy, ProxyFactory, new_key
from tests.hostile_upstream import EOLS, USAGE, Hostile, create_hostile_app

KEY = new_key()
PROMPT = "one two three four five six seven eight"


async def start_upstream(aiohttp_server: AiohttpServer) -> tuple[Hostile, str]:
    upstream, server = await start_upstream_server(aiohttp_server)
    return upstream, str(server.make_url("/v1/chat/completions"))


async def start_upstream_server(aiohttp_server: AiohttpServer) -> tuple[Hostile, TestServer]:
    """The hostile upstream (tests/hostile_upstream.py): each request shapes its stream with
    its query string (``eol``, ``events``, ``delay``, ``hang``, ``usage``, ``abort_at``)."""
    control = Hostile()
    return control, await aiohttp_server(create_hostile_app(control))


def config(url: str) -> dict[str, Any]:
    return {
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": url, "key": "up-key"}]}},
        "roles": {"default": {"limits": {"chat": {"minute": 10_000_000}}}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }


async def used_tokens(proxy: Proxy) -> int:
    await proxy.settle()
    async with aiohttp.ClientSession() as s:
        r = await s.get(proxy.url("/v1/deployments/chat/limits"), headers={"Api-Key": KEY})
        stats = await r.json()
    return int(stats["minuteTokenStats"]["used"])


async def until(done: Callable[[], object], seconds: float = 10) -> None:
    """Waits (polling) until ``done()`` is true; fails after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("still not done")


def url(proxy: Proxy, **query: Any) -> str:
    path = "/openai/deployments/chat/chat/completions"
    return proxy.url(path) + ("?" + "&".join(f"{k}={v}" for k, v in query.items()))


BODY = {"messages": [{"role": "user", "content": PROMPT}], "stream": True}


async def test_crlf_and_cr_streams_reach_the_client_as_they_come(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    _, upstream_url = await start_upstream(aiohttp_server)
    proxy = await make_proxy(config(upstream_url), settings=Settings(stream_drain=0.2))
    async with aiohttp.ClientSession() as s:
        for eol in ("lf", "crlf", "cr"):
            target = url(proxy, eol=eol, events=5)
            async with s.post(target, json=BODY, headers={"Api-Key": KEY}) as resp:
                data = await resp.read()
            assert data.count(b"data:") == 6  # five content events and [DONE]
            assert b"usage" not in data  # what we asked for on the client's behalf stays here
            assert data.endswith(b"data: [DONE]" + EOLS[eol] * 2)
        total = USAGE["total_tokens"]
        assert await used_tokens(proxy) == 3 * total  # the usage counted, whatever the framing
        for eol in ("crlf", "cr"):
            # an endless stream: its events must come through while it goes on
            async with s.post(
                url(proxy, eol=eol, events=0, delay=0.05), json=BODY, headers={"Api-Key": KEY}
            ) as resp:
                assert resp.status == 200
                got = b""
                async with asyncio.timeout(10):
                    while got.count(b"data:") < 3:
                        got += await resp.content.readany()
                assert got.startswith(b'data: {"id": "s"')
                assert b"usage" not in got


async def _abandon(s: aiohttp.ClientSession, target: str, after_events: int) -> None:
    """Reads ``after_events`` events of a stream, then hangs up."""
    resp = await s.post(target, json=BODY, headers={"Api-Key": KEY})
    assert resp.status == 200
    seen = 0
    while seen < after_events:
        seen += (await resp.content.readany()).count(b"data:")
    resp.close()


async def test_a_client_that_hangs_up_before_the_usage_is_charged_what_the_upstream_reports(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    upstream, upstream_url = await start_upstream(aiohttp_server)
    proxy = await make_proxy(config(upstream_url))
    async with aiohttp.ClientSession() as s:
        # 20 events 20 ms apart: the client leaves after 19, before the usage event
        await _abandon(s, url(proxy, events=20, delay=0.02), after_events=19)
    await until(lambda: not upstream.open_streams)  # the proxy reads on to the stream's end
    # The drain settles the request after the stream's end: on a busy machine that can take
    # longer than a fixed pause (it failed the full suite once with a 50 ms sleep).
    used, deadline = await used_tokens(proxy), time.monotonic() + 10
    while used != USAGE["total_tokens"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        used = await used_tokens(proxy)
    assert used == USAGE["total_tokens"]  # the upstream's, read after it left
    assert upstream.finished == 1


async def test_an_abandoned_stream_without_usage_is_charged_an_estimate_in_bounded_time(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    upstream, upstream_url = await start_upstream(aiohttp_server)
    settings = Settings(stream_drain=0.3)
    proxy = await make_proxy(config(upstream_url), settings=settings)
    async with aiohttp.ClientSession() as s:
        await _abandon(s, url(proxy, events=4, hang=1), after_events=4)
    await until(lambda: not upstream.open_streams)  # the drain gives up after 0.3 s
    await asyncio.sleep(0.05)
    used = await used_tokens(proxy)
    body_bytes = len(json.dumps(BODY | {"stream_options": {"include_usage": True}}))
    assert used >= 4  # never zero: at least a token per event relayed
    assert used <= body_bytes // 4 + 4 + 1


async def test_a_stream_the_upstream_breaks_off_is_charged(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data: {"choices":[{"delta":{"content":"x%d"}}]}\r\n\r\n' % i)
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    server = await aiohttp_server(app)
    proxy = await make_proxy(config(str(server.make_url("/v1/chat/completions"))))
    async with (
        aiohttp.ClientSession() as s,
        s.post(url(proxy), json=BODY, headers={"Api-Key": KEY}) as resp,
    ):
        data = await resp.read()
    assert data.count(b"x") >= 3 and b'"code": "502"' in data
    assert await used_tokens(proxy) > 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_streams_abandoned_at_random_points_are_each_charged(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, session_logs: Any
) -> None:
    upstream, upstream_server = await start_upstream_server(aiohttp_server)
    upstream_url = str(upstream_server.make_url("/v1/chat/completions"))
    proxy = await make_proxy(config(upstream_url), settings=Settings(stream_drain=1.0))
    rng = random.Random(11)
    before = len(session_logs.lines)
    fds = _open_fds()

    async def one(s: aiohttp.ClientSession, n: int) -> None:
        events = rng.randint(2, 12)
        eol = rng.choice(list(EOLS))
        hang = rng.random() < 0.2  # some upstreams never send the usage
        target = url(proxy, eol=eol, events=events, delay=0.005, **({"hang": 1} if hang else {}))
        await _abandon(s, target, after_events=rng.randint(1, events))

    connector = aiohttp.TCPConnector(limit=50, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for start in range(0, 1000, 100):
            await asyncio.gather(*(one(s, n) for n in range(start, start + 100)))
    await until(lambda: not (upstream.open_streams or proxy.app[BACKGROUND]), 30)
    lines = [json.loads(line) for line in session_logs.lines[before:]]
    charged = [line["total_tokens"] for line in lines if line.get("event") == "request"]
    assert len(charged) == 1000
    assert all(isinstance(t, int) and t > 0 for t in charged), charged
    await asyncio.sleep(0.1)
    # Nothing left open: no client connection; and once the proxy's upstream pool is closed
    # (its idle keep-alive connections are all it may still hold: streams still draining
    # when new ones began may have left more than 50 of them), no upstream connection and no
    # socket past the usage ledger's SQLite file with its WAL and shared memory.
    assert proxy.server.runner is not None and upstream_server.runner is not None
    assert proxy.server.runner.server is not None and upstream_server.runner.server is not None
    assert proxy.server.runner.server.connections == []
    await proxy.app[CLIENT].close()
    upstream_http = upstream_server.runner.server
    await until(lambda: upstream_http.connections == [], 10)
    assert _open_fds() <= fds + 3


async def test_only_a_valid_top_level_usage_is_counted(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """A usage nested in the usage, or only inside a choice, or with counts that are not
    counts: never the 10^9 tokens hidden there; without a valid usage, the estimate."""
    upstream, upstream_url = await start_upstream(aiohttp_server)
    proxy = await make_proxy(config(upstream_url))
    charged, estimates = [], []
    async with aiohttp.ClientSession() as s:
        for usage in ("nested", "inner", "invalid", "none"):
            before = await used_tokens(proxy)
            target = url(proxy, events=3, usage=usage)
            async with s.post(target, json=BODY, headers={"Api-Key": KEY}) as resp:
                data = await resp.read()
            assert resp.status == 200 and b"[DONE]" in data
            if usage != "inner":  # (a choice's own "usage" is the upstream's content)
                assert b"usage" not in data  # what we asked for, valid or not, is hidden
            charged.append(await used_tokens(proxy) - before)
            # the prompt at a token per 4 bytes sent, and a token per chunk that came
            # (at least one; at most one per event written: 3, [DONE], the usage event)
            prompt = len(upstream.requests[-1].body) // 4
            estimates.append((prompt + 1, prompt + 4 + (usage == "invalid")))
    assert charged[0] == USAGE["total_tokens"]
    for got, (least, most) in zip(charged[1:], estimates[1:], strict=True):
        assert least <= got <= most


@pytest.mark.parametrize("asks_usage", [False, True])
async def test_a_stream_cut_at_any_point_ends_with_an_error_and_is_charged(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, asks_usage: bool
) -> None:
    """Cut at every 7th byte: the stream ends with an error event the client can read as
    one, and is charged.  A client that asks for usage itself gets every byte as it came,
    so a cut can leave it mid-event: the event is ended before the error's (before, the
    error was glued to the unfinished line, and no SSE client could read it)."""
    _, upstream_url = await start_upstream(aiohttp_server)
    proxy = await make_proxy(config(upstream_url))
    body = BODY | {"stream_options": {"include_usage": True}} if asks_usage else BODY
    async with aiohttp.ClientSession() as s:
        target = url(proxy, events=3, eol="crlf")
        async with s.post(target, json=body, headers={"Api-Key": KEY}) as resp:
            whole = len(await resp.read())  # (as the client gets it: our usage hidden)
        used = await used_tokens(proxy)
        for abort_at in range(0, whole + 60, 7):  # every 7th byte, into the usage event
            target = url(proxy, events=3, eol="crlf", abort_at=abort_at)
            async with s.post(target, json=body, headers={"Api-Key": KEY}) as resp:
                data = await resp.read()
            assert resp.status == 200
            now = await used_tokens(proxy)
            if b"[DONE]" in data:
                assert now - used == USAGE["total_tokens"], abort_at
            else:
                assert data.endswith(b"\n\n") and b'"code": "502"' in data, (abort_at, data)
                last = data.replace(b"\r\n", b"\n").rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
                assert last.startswith(b"data: "), (abort_at, data)
                assert json.loads(last[6:])["error"]["code"] == "502", (abort_at, data)
                if data.count(b"data:") > 1:  # content relayed before the error event
                    assert now - used > 0, abort_at  # the estimate, never zero
            used = now


async def test_a_client_that_hangs_up_before_a_whole_answer_is_charged_an_estimate(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, session_logs: Any
) -> None:
    """A non-streamed request reached the upstream, which works on it (and bills for it);
    its client leaves before the answer: the request is charged the estimate (the prompt
    at a token per 4 bytes sent, one completion token), not nothing; its log line says so.
    (What the shutdown cancels is not charged: tests/test_shutdown.py's ``hang``.)"""
    asked = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        asked.set()
        await asyncio.sleep(2)
        return web.json_response({"choices": [], "usage": USAGE})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow)
    server = await aiohttp_server(app)
    proxy = await make_proxy(config(str(server.make_url("/v1/chat/completions"))))
    before = len(session_logs.lines)
    body = {"messages": [{"role": "user", "content": PROMPT}]}
    async with aiohttp.ClientSession() as s:
        post = asyncio.ensure_future(s.post(url(proxy), json=body, headers={"Api-Key": KEY}))
        await asyncio.wait_for(asked.wait(), 10)
        post.cancel()  # the client hangs up while the upstream works
        with contextlib.suppress(asyncio.CancelledError):
            await post
    await until(lambda: any('"request"' in line for line in session_logs.lines[before:]))
    sent = len(json.dumps({**body, "stream": False}).encode())  # (about: the body sent)
    used = await used_tokens(proxy)
    assert used > 1 and abs(used - (sent // 4 + 2)) <= 10, used  # never the 0 of before
    line = next(json.loads(x) for x in session_logs.lines[before:] if '"request"' in x)
    assert line["usage"] == "estimated" and line["total_tokens"] == used
    assert line["status"] == 499 and "client" in line["error"]


async def test_a_client_that_hangs_up_before_an_upstream_is_asked_is_logged_so(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, session_logs: Any
) -> None:
    """A client that leaves while its body is still coming: nothing is charged (no upstream
    was asked) and the log line says what happened, status 499 as for one that leaves
    later (before: status 0 and no error, a line nobody could read)."""
    asked = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        asked.set()
        return web.json_response({"choices": [], "usage": USAGE})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", never)
    server = await aiohttp_server(app)
    proxy = await make_proxy(config(str(server.make_url("/v1/chat/completions"))))
    before = len(session_logs.lines)
    assert proxy.server.port is not None
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        b"POST /openai/deployments/chat/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Api-Key: {KEY}\r\nContent-Type: application/json\r\n".encode()
        + b'Content-Length: 1000\r\n\r\n{"messages": ['
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # (the handler waits for the rest of the body)
    writer.close()
    await until(lambda: any('"request"' in line for line in session_logs.lines[before:]))
    line = next(json.loads(x) for x in session_logs.lines[before:] if '"request"' in x)
    assert (line["status"], line["error"]) == (499, "the client went away before the answer")
    assert line["total_tokens"] is None and line["attempts"] == 0
    assert not asked.is_set() and await used_tokens(proxy) == 0


async def test_a_stream_that_ends_on_the_upstreams_error_event_counts_as_an_error(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, session_logs: Any
) -> None:
    """An upstream that reports a failure mid-stream as an event (OpenAI's and DIAL's
    ``data: {"error": ...}``, Anthropic's ``event: error``) and ends the stream: relayed as
    it came, and its log line and the ledger count it an error (before: a success).  An
    ``"error": null`` (a Responses answer's) or the word quoted in the content is none."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": []}
    content = {**chunk, "choices": [{"index": 0, "delta": {"content": '{"error": {"x": 1}}'}}]}
    endings = {
        "error": [content, {"error": {"message": "The model is overloaded", "code": "500"}}],
        "fine": [content, {**chunk, "error": None}, "[DONE]"],
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in endings[request.query["end"]]:
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    proxy = await make_proxy(config(str(server.make_url("/v1/chat/completions"))))
    ledger = proxy.app[LEDGER]
    for end in ("error", "fine"):
        seen = len(session_logs.lines)
        async with (
            aiohttp.ClientSession() as s,
            s.post(url(proxy, end=end), json=BODY, headers={"Api-Key": KEY}) as r,
        ):
            assert r.status == 200
            body = await r.read()
        assert body.count(b"data: ") == len(endings[end])  # (relayed as it came)

        def logged(since: int = seen) -> list[str]:
            return [x for x in session_logs.lines[since:] if '"request"' in x]

        await until(logged)
        line = json.loads(logged()[0])
        if end == "error":
            assert line["error"] == "the upstream's stream ended on an error event"
        else:
            assert line["error"] is None
    assert await ledger.flush()
    rows = await ledger.rows(time.time() - 3600, time.time() + 3600, by=["project"])
    assert [(r["requests"], r["errors"]) for r in rows] == [(2, 1)]


async def test_a_stream_labelled_as_something_else_is_still_read_as_one(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """An upstream that streams events as ``text/plain``: the proxy reads the body it
    buffered as the stream it is, so its usage is charged and the usage it asked for on the
    client's behalf stays hidden (before: charged nothing, the usage event shown)."""
    usage_event = {"id": "c1", "choices": [], "usage": USAGE}
    content = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    with_usage = [content, usage_event]

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        events = with_usage if "usage" in request.query else [content]
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        return web.Response(body=body + b"data: [DONE]\n\n", content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    upstream = await aiohttp_server(app)
    proxy = await make_proxy(config(str(upstream.make_url("/v1/chat/completions"))))
    async with aiohttp.ClientSession() as s:
        async with s.post(url(proxy, usage=1), json=BODY, headers={"Api-Key": KEY}) as resp:
            data = await resp.read()
        assert resp.status == 200
        assert b"usage" not in data and b'"hi"' in data and data.endswith(b"data: [DONE]\n\n")
        assert await used_tokens(proxy) == USAGE["total_tokens"]
        # no usage at all from a backend called directly: the estimate, as for a stream
        async with s.post(url(proxy), json=BODY, headers={"Api-Key": KEY}) as resp:
            assert resp.status == 200 and b'"hi"' in await resp.read()
        assert await used_tokens(proxy) > USAGE["total_tokens"]
