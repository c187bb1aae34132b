"""A hostile upstream: an OpenAI-style chat server that misbehaves on demand.

Each misbehaviour is one switch of a mutable :class:`Hostile` control object; the test
turns it on (and off) between requests.  Off, every switch: a well-behaved chat answer with
its usage (:data:`USAGE`), streamed when the request asks for a stream.

To add a behaviour: a field of :class:`Hostile` (off by default), and a function in
:data:`BEHAVIOURS` that answers when it is on (returns a response) and else returns None;
the first that answers wins, the ordinary answer comes last.  A :class:`Recorder` is a
second server that only records what reaches it (the place a redirect points to).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip as gzip_module
import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
CHUNK = 64 * 1024  # what a huge answer is written in


@dataclass(frozen=True, slots=True)
class Received:
    """One request as a server received it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class Hostile:
    """The switches (all off: a well-behaved upstream) and what the server saw and did."""

    # 3xx status answered, with Location: redirect_to (None: no redirect)
    redirect: int | None = None
    redirect_to: str = ""
    # a 429 with this Retry-After value (None: no 429)
    retry_after: str | None = None
    # a non-streamed 200 of this many bytes, written in CHUNKs (0: off); with its
    # Content-Length when huge_length, else chunked; gzip-encoded with gzip (a "bomb")
    huge: int = 0
    huge_length: bool = False
    # the answer gzip-encoded (Content-Encoding: gzip) whatever the request accepts
    gzip: bool = False
    # Content-Encoding claimed for an answer sent as it is (None: off)
    encoding: str | None = None
    # headers added to the ordinary answer (e.g. a Connection naming one of them)
    headers: dict[str, str] = field(default_factory=dict)
    # Streams (a request with "stream": true).  A request's query string may set any of
    # these for itself (?eol=crlf&events=0&...: the proxy forwards it), so requests running
    # at once can each misbehave their own way.
    eol: str = "lf"  # line ends: lf, crlf or cr (SSE allows all three)
    events: int = 1  # content events (0: endless)
    delay: float = 0.0  # seconds between events
    hang: bool = False  # after the content events: send nothing more, never end
    usage: str = "top"  # the final usage: top (USAGE), none, nested (a huge one inside
    # the usage object), inner (a huge one only inside a choice), invalid (not counts)
    abort_at: int = -1  # bytes of the stream after which the connection is cut (-1: never)
    open_streams: int = 0  # streams being written now
    finished: int = 0  # streams written to their end
    # what the server saw and did
    requests: list[Received] = field(default_factory=list)
    huge_sent: int = 0  # bytes of the huge answer written before the reader stopped


Behaviour = Callable[[Hostile, web.Request, dict[str, Any]], Awaitable[web.StreamResponse | None]]


def chat_answer(text: str = "hello") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "hostile",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }


def sse_answer(text: str = "hello") -> bytes:
    events: list[dict[str, Any]] = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": w}}]}
        for w in text.split()
    ]
    events.append({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


async def _redirect(
    control: Hostile, request: web.Request, body: dict[str, Any]
) -> web.Response | None:
    if control.redirect is None:
        return None
    return web.Response(status=control.redirect, headers={"Location": control.redirect_to})


async def _retry_after(
    control: Hostile, request: web.Request, body: dict[str, Any]
) -> web.Response | None:
    if control.retry_after is None:
        return None
    return web.json_response(
        {"error": {"message": "slow down", "type": "rate_limit"}},
        status=429,
        headers={"Retry-After": control.retry_after},
    )


async def _huge(
    control: Hostile, request: web.Request, body: dict[str, Any]
) -> web.StreamResponse | None:
    if not control.huge:
        return None
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    encoder = zlib.compressobj(wbits=31) if control.gzip else None  # (31: gzip)
    if encoder is not None:
        response.headers["Content-Encoding"] = "gzip"
    elif control.huge_length:
        response.content_length = control.huge
    await response.prepare(request)
    chunk = b" " * CHUNK
    try:
        while control.huge_sent < control.huge:
            part = chunk[: control.huge - control.huge_sent]
            await response.write(encoder.compress(part) if encoder else part)
            control.huge_sent += len(part)
        await response.write(encoder.flush() if encoder else b"")
        await response.write_eof()
    except (ConnectionError, RuntimeError):  # the reader went away: what it wanted
        pass
    return response


async def _encoded(
    control: Hostile, request: web.Request, body: dict[str, Any]
) -> web.Response | None:
    if not control.gzip and control.encoding is None:
        return None
    streamed = body.get("stream") is True
    data = sse_answer() if streamed else json.dumps(chat_answer()).encode()
    headers = {"Content-Type": "text/event-stream" if streamed else "application/json"}
    if control.gzip:
        data = gzip_module.compress(data)
        headers["Content-Encoding"] = "gzip"
    else:
        assert control.encoding is not None
        headers["Content-Encoding"] = control.encoding
    return web.Response(body=data, headers=headers)


EOLS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
HUGE = {"total_tokens": 10**9}
_USAGES: dict[str, Any] = {
    "top": USAGE,
    "nested": USAGE | {"usage": HUGE},
    "invalid": {"prompt_tokens": "3", "completion_tokens": -5},
}


def _stream_switches(control: Hostile, request: web.Request) -> Hostile:
    query = request.query
    if not query:
        return control
    return Hostile(
        eol=query.get("eol", control.eol),
        events=int(query.get("events", control.events)),
        delay=float(query.get("delay", control.delay)),
        hang=query.get("hang", "1" if control.hang else "") == "1",
        usage=query.get("usage", control.usage),
        abort_at=int(query.get("abort_at", control.abort_at)),
    )


async def _stream(
    control: Hostile, request: web.Request, body: dict[str, Any]
) -> web.StreamResponse | None:
    """Every stream: ``events`` content events framed with ``eol`` (the usage asked for,
    ``"usage": null`` in each), then the usage event and ``[DONE]``, shaped by the switches."""
    if body.get("stream") is not True:
        return None
    shape = _stream_switches(control, request)
    eol = EOLS[shape.eol]
    include = (body.get("stream_options") or {}).get("include_usage") is True
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **control.headers})
    await response.prepare(request)
    control.open_streams += 1
    sent = 0

    async def send(data: bytes) -> None:
        nonlocal sent
        if shape.abort_at >= 0 and sent + len(data) > shape.abort_at:
            await response.write(data[: shape.abort_at - sent])
            assert request.transport is not None
            request.transport.close()  # cut: mid-event, wherever abort_at falls
            raise ConnectionResetError
        sent += len(data)
        await response.write(data)

    try:
        i = 0
        while shape.events == 0 or i < shape.events:
            chunk: dict[str, Any] = {"id": "s", "choices": [{"delta": {"content": f"w{i} "}}]}
            if shape.usage == "inner":
                chunk["choices"][0]["usage"] = HUGE
            if include:
                chunk["usage"] = None
            await send(b"data: " + json.dumps(chunk).encode() + eol + eol)
            i += 1
            if shape.delay:
                await asyncio.sleep(shape.delay)
        if shape.hang:
            await asyncio.sleep(3600)
        if include and shape.usage in _USAGES:
            final = {"id": "s", "choices": [], "usage": _USAGES[shape.usage]}
            await send(b"data: " + json.dumps(final).encode() + eol + eol)
        await send(b"data: [DONE]" + eol + eol)
        await response.write_eof()
        control.finished += 1
    except (ConnectionError, RuntimeError, asyncio.CancelledError):
        pass  # the reader went away, or the cut above
    finally:
        control.open_streams -= 1
    return response


# The misbehaviours, tried in order; the first that answers wins.
BEHAVIOURS: list[Behaviour] = [_redirect, _retry_after, _huge, _encoded, _stream]


def create_hostile_app(control: Hostile) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        control.requests.append(Received(request.method, request.path, request.headers.copy(), raw))
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        for behaviour in BEHAVIOURS:
            response = await behaviour(control, request, body)
            if response is not None:
                return response
        return web.json_response(chat_answer(), headers=control.headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@dataclass(slots=True)
class Recorder:
    """Records every request; answers a chat completion with usage (so a followed redirect
    would be served and counted)."""

    requests: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            self.requests.append(
                Received(request.method, request.path, request.headers.copy(), raw)
            )
            return web.json_response(
                chat_answer("from elsewhere") | {"usage": {"total_tokens": 99}}
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


class HostileServer:
    """A running hostile upstream: its control and its URLs."""

    def __init__(self, server: TestServer, control: Hostile) -> None:
        self.server = server
        self.control = control

    def url(self, path: str = "/v1/chat/completions") -> str:
        return str(self.server.make_url(path))


class Switching:
    """A raw upstream that answers every request ``101 Switching Protocols`` (a body after it,
    no Upgrade asked for), as an ``async with``; ``answered``: how many it answered."""

    def __init__(self) -> None:
        self.answered = 0
        self.server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}{path}"

    async def __aenter__(self) -> Switching:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, StopIteration):
            while True:  # (keep-alive: a request after another on one connection)
                head = await reader.readuntil(b"\r\n\r\n")
                lengths = [
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                await reader.readexactly(lengths[0] if lengths else 0)
                body = json.dumps(chat_answer() | {"usage": USAGE}).encode()
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                self.answered += 1
                await writer.drain()
        writer.close()
