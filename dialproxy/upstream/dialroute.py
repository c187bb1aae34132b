"""A DIAL route's outbound request, its retry loop and its relay: one :class:`RouteOutbound`
(what the handler planned) in, one :class:`RouteAnswer` out, or the attempts' refusal raised.

Unlike a deployment's request (:mod:`dialproxy.upstream.outbound`): any method, the body as
it came, the endpoint as written or with the request's path (``rewritePath``), the route
upstream's own ``key`` (else a per-request key), and nothing in the answer read: no usage.
The route's upstreams are tried in the balancer's order (at most ``maxRetryAttempts``),
retried on what a model's are (:class:`~dialproxy.upstream.attempts.Attempts`); the answer
is read whole within ``max_response``, or (an event stream, NDJSON) relayed as it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from dialproxy.apis import openai
from dialproxy.config.model import DialRoute
from dialproxy.upstream.answer import Context, read_answer, without_keys
from dialproxy.upstream.attempts import Attempts
from dialproxy.upstream.idle import IdleWatch
from dialproxy.wire.headers import NO_BODY_TYPE, UPSTREAM_KEY, response_headers

if TYPE_CHECKING:
    from yarl import URL

# Answers relayed chunk by chunk as they come (others are read whole, within max_response).
STREAMED_TYPES = frozenset({"text/event-stream", "application/x-ndjson"})


@dataclass(slots=True)
class Tried:
    """What a route request's attempts did (for its log line), and the per-request key
    made for it (released by the handler when the request ends)."""

    upstream: str | None = None
    attempts: int = 0
    error: str | None = None
    key: str | None = None


@dataclass(slots=True)
class RouteOutbound:
    """One request to a DIAL route's upstreams, as the handler planned it."""

    route: DialRoute
    method: str
    target: URL  # the client's path and query, as written (for ``rewritePath``)
    data: bytes  # the body as it came
    headers: dict[str, str]  # what every attempt sends (each upstream adds its key)
    retriable: Collection[int]  # the statuses another upstream is tried after
    ours: list[tuple[str, str]]  # our rate-limit headers (a limit of ours applies)
    mint: Callable[[], Awaitable[str]] | None  # a per-request key (per-request keys on)


class Passthrough:
    """A route upstream's stream, still to relay to the client untouched (:meth:`relay`)."""

    __slots__ = ("idle", "tail", "upstream")

    def __init__(self, upstream: aiohttp.ClientResponse, idle: IdleWatch) -> None:
        self.upstream = upstream
        self.idle = idle
        self.tail = b"\n\n"  # the last bytes relayed (an event stream's: at an event's end?)

    def ending(self, event: bytes) -> bytes:
        """``event`` (an SSE error event) as it goes after what was relayed: after a blank
        line when that stops inside an event (see :meth:`.answer.Stream.ending`)."""
        if self.tail.endswith((b"\n\n", b"\r\r", b"\n\r\n")):
            return event
        return b"\n\n" + event

    @property
    def content_type(self) -> str:
        return self.upstream.content_type

    async def relay(self, request: web.Request, response: web.StreamResponse, tried: Tried) -> None:
        """The stream relayed chunk by chunk as it comes (nothing in it is read)."""
        upstream, idle = self.upstream, self.idle
        idle.watch(upstream)
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    self.tail = chunk[-3:] if len(chunk) >= 3 else (self.tail + chunk)[-3:]
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as e:
                tried.error = f"upstream stream broke off: {type(e).__name__}"
                upstream.close()
                if upstream.content_type == "text/event-stream":  # as the proxied streams say it
                    message = "The upstream broke off the response"
                    await response.write(self.ending(openai.sse_error(message)))
                elif request.transport is not None:  # the client sees the answer end unfinished
                    request.transport.abort()
                    return
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as e:
            tried.error = tried.error or "client disconnected"
            if isinstance(e, asyncio.CancelledError):
                raise  # (a cancellation goes on: the client went away, or the shutdown's end)
        finally:
            idle.release(upstream)
            if upstream.content.is_eof():
                upstream.release()
            else:
                upstream.close()


@dataclass(slots=True)
class RouteAnswer:
    """What the client is answered: a body, or (``stream`` set) a stream to relay."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: Passthrough | None = None


def upstream_url(endpoint: str, route: DialRoute, target: URL) -> str:
    """DIAL: ``rewritePath`` puts the request's path and query string in place of the
    endpoint's path and query; else the endpoint as written."""
    if not route.rewrite_path:
        return endpoint
    parts = urlsplit(endpoint)
    return urlunsplit((parts.scheme, parts.netloc, target.raw_path, target.raw_query_string, ""))


async def send_route(out: RouteOutbound, tried: Tried, context: Context) -> RouteAnswer:
    """Attempts over the route's upstreams until one answers; its answer, or the attempts'
    refusal raised.  A per-request key made for an upstream without ``key`` is put in
    ``tried.key`` (the caller releases it when the request is over)."""
    balancer, client, model = context.balancer, context.client, out.route.model
    assert client is not None
    attempts = Attempts(balancer, model, out.retriable)
    if balancer.refresh_due(model):
        await balancer.refresh(model)
    for planned in balancer.plan(model):
        if tried.attempts >= model.max_retry_attempts:
            break
        tried.attempts += 1
        upstream = planned.upstream
        tried.upstream = planned.name
        sent = dict(out.headers)
        if upstream.key is not None:
            sent[UPSTREAM_KEY] = upstream.key
        else:
            if tried.key is None and out.mint is not None:
                tried.key = await out.mint()
            if tried.key is not None:
                sent[UPSTREAM_KEY] = tried.key
        try:
            async with context.idle.headers():
                resp = await client.request(
                    out.method,
                    upstream_url(upstream.endpoint, out.route, out.target),
                    data=out.data or None,
                    headers=sent,
                    # (no body: none of the Content-Type aiohttp would make up for it)
                    skip_auto_headers=() if out.data else NO_BODY_TYPE,
                    allow_redirects=False,  # the key goes to the configured URL alone
                )
        except (aiohttp.ClientError, TimeoutError):
            await attempts.broke(upstream)
            continue
        if await attempts.served(resp, upstream):
            return await _answer(resp, tried, out.ours, context, upstream.key)
    raise attempts.refusal()


async def _answer(
    resp: aiohttp.ClientResponse,
    tried: Tried,
    ours: list[tuple[str, str]],
    context: Context,
    key: str | None,
) -> RouteAnswer:
    """The upstream's answer: read whole (within ``max_response``), or a stream to relay.
    An error is read whole, streamed or not, the keys the proxy gave it (``key``, the
    upstream's, or the per-request one) taken out."""
    headers = response_headers(resp.headers, tried.attempts, ours)
    if resp.status < 400 and resp.content_type in STREAMED_TYPES:
        return RouteAnswer(resp.status, headers, b"", Passthrough(resp, context.idle))
    data = await read_answer(resp, context.idle, context.settings.max_response)
    if resp.status >= 400:
        data = without_keys(data, key, tried.key)
    return RouteAnswer(resp.status, headers, data)
