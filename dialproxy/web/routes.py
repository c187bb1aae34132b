"""DIAL's ``routes``, served as DIAL Core's route controller serves them.

Reached only from the app's last, catch-all route (a path no built-in endpoint has, or a
method it lacks): a model request never gets here.  The snapshot's routes (compiled by
:mod:`dialproxy.config.routes`, in ``order``) are matched in turn: the first whose
``methods`` (none: any) has the request's method and one of whose ``paths`` fully matches
the request's path answers it.  None: the app's 404 (or 405 with ``Allow``, when a route or
a built-in endpoint has the path with other methods).

One request: the caller authenticated (401) -> the route's ``userRoles`` (403 ``Forbidden
route``) -> the roles' limits keyed by the route's name (403 ``Access denied``, 429) -> the
body read as it came (any content type, at most ``max_body``) -> the canned ``response``, or
attempts over the route's upstreams (the model balancer's tiers, weights, pauses;
``maxRetryAttempts`` attempts, retried on what a model's are) -> the answer relayed with the
proxied endpoints' header allow-list, bounded by ``max_response`` (an event stream relayed
as it comes) -> one ``request`` log line.

The client's key never leaves: the upstream gets the route upstream's ``key`` in ``Api-Key``
when it has one, else a per-request key (as DIAL does), released when the request ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from dialproxy.apis import openai
from dialproxy.auth import Principal, authenticate
from dialproxy.config.grants import resolve_grant
from dialproxy.config.model import DialRoute, Snapshot
from dialproxy.config.store import Memo
from dialproxy.errors import (
    Forbidden,
)
from dialproxy.limiter import Scope
from dialproxy.upstream.answer import read_answer
from dialproxy.upstream.attempts import Attempts
from dialproxy.upstream.headers import UPSTREAM_KEY, response_headers
from dialproxy.web import guard, proxy
from dialproxy.web.body import read_raw_body

# The client's headers a route's upstream gets: the proxied endpoints' allow-list, and the
# body's own description (a route's body goes as it came, in any type and encoding).
FORWARDED_HEADERS = (*openai.FORWARDED_HEADERS, "content-type", "content-encoding")
# Answers relayed chunk by chunk as they come (others are read whole, within max_response).
STREAMED_TYPES = frozenset({"text/event-stream", "application/x-ndjson"})


def select(snapshot: Snapshot, method: str, path: str) -> tuple[DialRoute | None, set[str]]:
    """The first route (in ``order``) serving ``method`` on ``path``; else None and the
    methods the routes that have the path serve (for a 405's ``Allow``)."""
    allowed: set[str] = set()
    for route in snapshot.dial_routes:
        if route.methods and method not in route.methods:
            if route.matches_path(path):
                allowed |= route.methods
            continue
        if route.matches_path(path):
            return route, allowed
    return None, allowed


async def handle(request: web.Request, services: proxy.Services) -> web.StreamResponse:
    """The app's last route: a DIAL route, or the app's 404/405 (:func:`guard.unmatched`)."""
    snapshot = services.store.snapshot
    if snapshot.dial_routes:
        route, allowed = select(snapshot, request.method, request.rel_url.raw_path)
        if route is not None:
            return await serve(request, services, snapshot, route)
        response = await guard.unmatched(request)
        if response.status == 404 and allowed:
            error = web.HTTPMethodNotAllowed(request.method, allowed)
            response = guard.response_for(request, error)
            response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return await guard.unmatched(request)


def _scopes(
    principal: Principal, snapshot: Snapshot, route: DialRoute, memo: Memo
) -> tuple[Scope, ...]:
    """The project counters a route request counts in: the request windows of the roles'
    ``limits`` entry for the route's name, resolved as for a model (memoised per snapshot)."""
    memo_key = ("dial-route", route.name, principal.access.roles, principal.project)
    found: tuple[Scope, ...] | None = memo.get(memo_key)
    if found is None:
        counted = principal.access.roles & snapshot.roles.keys()
        grant = resolve_grant(route.model, frozenset(counted), snapshot.roles, snapshot.schedule)
        if grant.denied:
            raise Forbidden("Access denied")
        found = ()
        if any(w.limited for w in grant.request_windows):  # (tokens: none on a route)
            found = (
                Scope(
                    owner="p:" + principal.project,
                    model="route:" + route.name,
                    request_windows=grant.request_windows,
                ),
            )
        memo.put(memo_key, found)
    return found


async def serve(
    request: web.Request, services: proxy.Services, snapshot: Snapshot, route: DialRoute
) -> web.StreamResponse:
    """One request to ``route``, answered, and its log line."""
    started = time.perf_counter()
    fields: dict[str, Any] = {"upstream": None, "attempts": 0, "error": None}
    principal: Principal | None = None
    status = 500
    minted: list[str] = []  # the per-request key, once made
    try:
        principal = await authenticate(request.headers, snapshot, request.remote, services.shared)
        if not route.admits(principal.access.roles):
            raise Forbidden("Forbidden route")
        extra: list[tuple[str, str]] = []
        scopes = _scopes(principal, snapshot, route, services.store.memo_for(snapshot))
        if scopes:
            request_state, _ = await services.limiter.admit(scopes)
            if request_state is not None:
                extra = openai.ratelimit_headers(request_state, None)
        body = await read_raw_body(request, services.settings.max_body)
        if route.response is not None:
            status = route.response[0]
            return web.Response(
                status=status, body=route.response[1], content_type="text/plain", headers=extra
            )
        resp = await _forward(request, services, snapshot, principal, route, body, fields, minted)
        response, streamed = await _answer(resp, services, fields, extra)
        status = response.status
        if streamed is not None:
            sse = streamed.content_type == "text/event-stream"
            farewell = openai.CHAT.shutdown_event if sse else b""  # (else the stream just ends)
            relay = _relay(request, response, streamed, services, fields)
            if await services.drain.relay(response, relay, farewell):
                fields["error"] = "stream ended: the server is shutting down"
        return response
    except Exception as e:
        response, message = guard.refusal(request, e)
        status = response.status
        if message is not None:
            fields["error"] = message
        return response
    finally:
        keys = services.shared.per_request
        if minted and keys is not None and (work := keys.end(minted[0])) is not None:
            proxy.hold(services.background, work)
        services.log.line(
            "request",
            {
                "method": request.method,
                "path": request.path,
                "status": status,
                "project": principal.key.project if principal else None,
                "key": principal.key.fingerprint if principal else None,
                "route": route.name,
                **fields,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


def upstream_url(endpoint: str, route: DialRoute, request: web.Request) -> str:
    """DIAL: ``rewritePath`` puts the request's path and query string in place of the
    endpoint's path and query; else the endpoint as written."""
    if not route.rewrite_path:
        return endpoint
    parts = urlsplit(endpoint)
    query = request.rel_url.raw_query_string
    return urlunsplit((parts.scheme, parts.netloc, request.rel_url.raw_path, query, ""))


async def _forward(
    request: web.Request,
    services: proxy.Services,
    snapshot: Snapshot,
    principal: Principal,
    route: DialRoute,
    body: bytes,
    fields: dict[str, Any],
    minted: list[str],
) -> aiohttp.ClientResponse:
    """Attempts over the route's upstreams until one answers (its response, unread).  A
    per-request key made for an upstream without ``key`` is put in ``minted`` (the caller
    releases it when the request is over)."""
    balancer, client, model = services.balancer, services.client, route.model
    assert client is not None
    client_headers = request.headers
    headers = {n: v for n in FORWARDED_HEADERS if (v := client_headers.get(n)) is not None}
    headers["Accept-Encoding"] = "identity"
    attempts = Attempts(balancer, model, snapshot.retriable_codes)
    if balancer.sharing:
        await balancer.refresh(model)
    for planned in balancer.plan(model):
        if fields["attempts"] >= model.max_retry_attempts:
            break
        fields["attempts"] += 1
        upstream = planned.upstream
        fields["upstream"] = planned.name
        sent = dict(headers)
        if upstream.key is not None:
            sent[UPSTREAM_KEY] = upstream.key
        else:
            keys = services.shared.per_request
            if not minted and keys is not None:
                minted.append(await keys.mint(principal))
            if minted:
                sent[UPSTREAM_KEY] = minted[0]
        try:
            async with services.idle.headers():
                resp = await client.request(
                    request.method,
                    upstream_url(upstream.endpoint, route, request),
                    data=body,
                    headers=sent,
                    allow_redirects=False,  # the key goes to the configured URL alone
                )
        except (aiohttp.ClientError, TimeoutError):
            await attempts.broke(upstream)
            continue
        if await attempts.served(resp, upstream):
            return resp
    raise attempts.refusal()


async def _answer(
    resp: aiohttp.ClientResponse,
    services: proxy.Services,
    fields: dict[str, Any],
    extra: list[tuple[str, str]],
) -> tuple[web.StreamResponse, aiohttp.ClientResponse | None]:
    """The upstream's answer: read whole (within ``max_response``) into a response, or a
    stream response still to relay (with the upstream response it relays)."""
    headers = response_headers(resp.headers, fields["attempts"], extra)
    if resp.content_type in STREAMED_TYPES:
        return web.StreamResponse(status=resp.status, headers=headers), resp
    data = await read_answer(resp, services.idle, services.settings.max_response)
    return web.Response(status=resp.status, body=data, headers=headers), None


async def _relay(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    services: proxy.Services,
    fields: dict[str, Any],
) -> None:
    """An event stream relayed chunk by chunk as it comes (nothing in it is read)."""
    idle = services.idle
    idle.watch(upstream)
    try:
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            fields["error"] = f"upstream stream broke off: {type(e).__name__}"
            upstream.close()
            if upstream.content_type == "text/event-stream":  # said as the proxied streams say it
                await response.write(openai.sse_error("The upstream broke off the response"))
            elif request.transport is not None:  # the client sees the answer end unfinished
                request.transport.abort()
                return
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError) as e:
        fields["error"] = fields["error"] or "client disconnected"
        if isinstance(e, asyncio.CancelledError):
            raise  # (a cancellation goes on: the client went away, or the shutdown's end)
    finally:
        idle.release(upstream)
        if upstream.content.is_eof():
            upstream.release()
        else:
            upstream.close()
