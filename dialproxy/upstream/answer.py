"""The upstream's answer as a value the handler writes: its status, the headers the client
gets, and either the body (read whole, decoded, bounded) or a :class:`Stream` to relay.

A stream is relayed as it comes through the API's reader (:mod:`dialproxy.wire.relay`),
which finds its usage.  A stream that is cut (the upstream breaks off, sends an event over
the cap, or the client goes away) is still charged: what the upstream reports, else an
estimate; a client gone before the usage came leaves the upstream in ``outcome.leftover``,
drained for it (:func:`drain`) after the answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import web

from dialproxy.errors import BadGateway, EventTooLarge
from dialproxy.outcome import Outcome
from dialproxy.settings import Settings
from dialproxy.upstream.idle import IdleWatch
from dialproxy.wire.headers import response_headers
from dialproxy.wire.relay import EventRewriter, Relay, UsageHider, UsageScanner
from dialproxy.wire.usage import Usage, estimate, find_usage

if TYPE_CHECKING:
    from dialproxy.apis import Api
    from dialproxy.counting.limiter import Limiter
    from dialproxy.metrics import Metrics
    from dialproxy.tracing import Tracing
    from dialproxy.upstream.balancer import Balancer


class Context(Protocol):
    """What the calls to upstreams use of the app (its ``Services`` has each)."""

    @property
    def client(self) -> aiohttp.ClientSession | None: ...
    @property
    def balancer(self) -> Balancer: ...
    @property
    def idle(self) -> IdleWatch: ...  # the upstream idle timeout
    @property
    def limiter(self) -> Limiter: ...  # (the upstreams' own capacities)
    @property
    def settings(self) -> Settings: ...  # (the answer's caps)
    @property
    def metrics(self) -> Metrics | None: ...
    @property
    def tracing(self) -> Tracing | None: ...


class Stream:
    """An upstream's event stream, still to relay to the client (:meth:`relay`)."""

    __slots__ = ("idle", "reader", "stream_error", "upstream")

    def ending(self, event: bytes) -> bytes:
        """``event`` (an SSE error event the proxy ends the stream with) as it goes after
        what was relayed: when that stops inside an event, after a blank line that ends it
        (a client reads the cut event as one, then the error as its own, not glued to it)."""
        return b"\n\n" + event if self.reader.mid_event else event

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        reader: Relay,
        stream_error: Callable[[str, int], bytes],
        idle: IdleWatch,
    ) -> None:
        self.upstream = upstream
        self.reader = reader  # what reads the stream (its usage), gives what the client gets
        self.stream_error = stream_error  # the API's error event
        self.idle = idle

    async def relay(
        self, request: web.Request, response: web.StreamResponse, outcome: Outcome
    ) -> None:
        """Relays the upstream's stream to ``response`` as it comes; the usage (or what is
        left to drain for it) in ``outcome``."""
        upstream, idle, relay = self.upstream, self.idle, self.reader
        cut = client_gone = False
        before = last = b""  # the last two chunks: where an error event that ends it is
        idle.watch(upstream)
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    before, last = last, chunk
                    if out := relay.feed(chunk):
                        await response.write(out)
                if rest := relay.flush():
                    await response.write(rest)
                if _ERROR_EVENT.search(before[-_TAIL:] + last[-_TAIL:]):
                    outcome.error = "the upstream's stream ended on an error event"
            except (aiohttp.ClientError, TimeoutError) as e:
                cut = True
                outcome.error = f"upstream stream broke off: {type(e).__name__}"
                message = "The upstream broke off the response"
                await response.write(self.ending(self.stream_error(message, 502)))
            except EventTooLarge as e:
                cut = True
                outcome.error = str(e)
                if e.relayed:  # the events that came before it
                    await response.write(e.relayed)
                message = "The upstream sent an event too large to relay"
                await response.write(self.ending(self.stream_error(message, 502)))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as e:
            outcome.error = "client disconnected"
            cut = client_gone = True
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            idle.release(upstream)
            if upstream.status != 200:
                _let_go(upstream)
            elif client_gone and not relay.has_all_usage and not upstream.content.is_eof():
                outcome.leftover = (upstream, relay)  # drained for its usage after the answer
            else:
                _let_go(upstream)
                _charge(outcome, relay, cut)


@dataclass(slots=True)
class Answer:
    """What the client is answered: a body, or (``stream`` set) a stream to relay."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: Stream | None = None


async def answer(
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    api: Api,
    ours: list[tuple[str, str]],
    context: Context,
    injected: bool = False,
) -> Answer:
    """The answer of ``resp`` (the upstream that served): the client's headers (``ours``,
    our rate-limit headers, among them); a body read whole with its usage, or a stream to
    relay through the API's reader (``injected``: usage asked for on the client's behalf,
    hidden from it)."""
    headers = response_headers(resp.headers, outcome.attempts, ours)
    settings, ids = context.settings, outcome.ids
    if resp.content_type != "text/event-stream" or resp.status >= 400:  # (an error is read
        # whole, event stream or not: the keys it may quote are taken out of it)
        data = await read_answer(resp, context.idle, settings.max_response)
        if resp.status == 200:
            outcome.usage = find_usage(data, api.usage)
            if outcome.usage is None and data.startswith(_EVENTS):  # an event stream all the
                # same (labelled otherwise): read as one, its usage charged, ours hidden
                reader, cut = _reader(outcome, api, settings.max_event, injected), False
                try:
                    data = reader.feed(data) + reader.flush()
                except EventTooLarge as e:  # (as in a stream: the events before it, an error)
                    message = "The upstream sent an event too large to relay"
                    data, cut = e.relayed + api.errors.stream_error(message, 502), True
                _charge(outcome, reader, cut)
                return Answer(resp.status, headers, data)
        if ids is not None:  # (an error names a response by the id the client knows too)
            data = ids.body(data, None, resp.status < 300)
        return Answer(resp.status, headers, data)
    reader = _reader(outcome, api, settings.max_event, injected)
    stream = Stream(resp, reader, api.errors.stream_error, context.idle)
    return Answer(resp.status, headers, b"", stream)  # (no keywords: they cost a dict)


# An error event (OpenAI's and DIAL's ``{"error": {...}}``, Anthropic's ``"type": "error"``
# one, a failed Responses answer's): an ``"error"`` key with an object or a text, unescaped
# (quoted in a content string it is ``\"error\"``); looked for in the last _TAIL bytes
# of the stream's last two chunks.
_ERROR_EVENT = re.compile(rb'"error"\s*:\s*[{"]')
_TAIL = 4096

# How an event stream starts (an event's field, or a comment): a body that starts so is
# one, whatever its Content-Type says.
_EVENTS = (b"data:", b"event:", b"id:", b":")


def _reader(outcome: Outcome, api: Api, max_event: int, injected: bool) -> Relay:
    """What a stream is relayed through: its ids made ours, else the usage asked for on the
    client's behalf hidden, else every byte as it came with its usage read."""
    ids = outcome.ids
    if ids is not None:
        return EventRewriter(ids.events, max_event, api.usage)
    return UsageHider(max_event) if injected else UsageScanner(max_event, api.usage)


def without_keys(body: bytes, *keys: str | None) -> bytes:
    """An upstream's error body without the ``keys`` the proxy gave it: the upstream's own
    (a provider's "Incorrect API key provided: sk-..."), a per-request key (an adapter's
    echo of the headers it got).  A client never sees a key that is not its own."""
    for key in keys:
        if key and len(key) >= 8 and (raw := key.encode()) in body:
            body = body.replace(raw, b"***")
    return body


async def read_answer(resp: aiohttp.ClientResponse, idle: IdleWatch, cap: int) -> bytes:
    """A non-streamed answer's body, decoded, read within the idle timeout and no further
    than ``cap`` bytes; the upstream response released.  502 past the cap or when the
    upstream breaks off (the connection closed)."""
    idle.watch(resp)
    try:
        # (encoded, its Content-Length is not the size read: the decoded bytes count)
        length = resp.content_length if "Content-Encoding" not in resp.headers else None
        if length is not None and length <= cap:
            return await resp.read()  # the usual answer: its length known, within the cap
        return await _read_bounded(resp, cap, length)
    except (aiohttp.ClientError, TimeoutError):
        resp.close()
        raise BadGateway("The upstream broke off its response") from None
    finally:
        idle.release(resp)
        resp.release()


async def _read_bounded(resp: aiohttp.ClientResponse, cap: int, length: int | None) -> bytes:
    """A non-streamed answer's body (decoded) of no known ``length`` (None), read chunk by
    chunk no further than ``cap`` bytes; over it (or a ``length`` over it): a 502 and the
    connection closed."""
    if length is None:
        parts: list[bytes] = []
        size = 0
        content = resp.content
        while chunk := await content.readany():
            size += len(chunk)
            if size > cap:
                break
            parts.append(chunk)
        else:
            return b"".join(parts)
    resp.close()
    raise BadGateway(f"The upstream's response is over the {cap}-byte limit")


def _let_go(upstream: aiohttp.ClientResponse) -> None:
    if upstream.content.is_eof():
        upstream.release()
    else:  # broken off, or the client went away: drop the upstream connection at once
        upstream.close()


def _charge(outcome: Outcome, relay: Relay, cut: bool) -> None:
    """The usage of a relayed 200 stream: what it reported; if it reported none, an
    estimate when it was cut, or when usage was asked for (a direct backend), and it
    relayed something.  A stream cut with part of its usage (Anthropic's prompt, from its
    first event) is charged that part and, for the rest, the estimate."""
    usage = outcome.usage = relay.usage
    if (usage is None or (cut and not relay.has_all_usage)) and relay.events:
        model = outcome.model
        if cut or (model is not None and model.direct):
            guess = estimate(outcome.request_bytes, relay.events)
            if usage is not None:  # the prompt as reported; the completion as it came
                completion = max(usage.completion_tokens, guess.completion_tokens)
                total = usage.prompt_tokens + completion
                guess = Usage(usage.prompt_tokens, completion, total, usage.details)
            outcome.usage = guess
            outcome.estimated = True


def stop_draining(outcome: Outcome) -> None:
    """A stream ended by the shutdown is charged what it reported, else the estimate, now."""
    if outcome.leftover is not None:
        upstream, relay = outcome.leftover
        outcome.leftover = None
        _let_go(upstream)
        _charge(outcome, relay, cut=True)


async def drain(outcome: Outcome, seconds: float) -> None:
    """Reads what is left of an abandoned stream, for at most ``seconds``, to charge the
    usage the upstream reports at its end (else an estimate)."""
    assert outcome.leftover is not None
    upstream, relay = outcome.leftover
    try:
        async with asyncio.timeout(seconds):
            async for chunk in upstream.content.iter_any():
                relay.feed(chunk)
            relay.flush()
    except (aiohttp.ClientError, TimeoutError, EventTooLarge):
        pass
    finally:
        _let_go(upstream)
        outcome.leftover = None
    _charge(outcome, relay, cut=True)
