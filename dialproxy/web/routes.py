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
import functools
import time
from collections.abc import Callable

from aiohttp import web

from dialproxy.apis import openai
from dialproxy.auth import Principal, authenticate
from dialproxy.config.grants import resolve_grant
from dialproxy.config.model import DialRoute, Snapshot
from dialproxy.config.store import Memo
from dialproxy.counting.limiter import Scope
from dialproxy.errors import (
    Forbidden,
)
from dialproxy.upstream.dialroute import RouteOutbound, Tried, send_route
from dialproxy.web import guard
from dialproxy.web.body import read_raw_body
from dialproxy.web.finish import CLIENT_GONE, hold
from dialproxy.web.services import Services
from dialproxy.wire.headers import ROUTE_BODY_HEADERS, route_headers

# The client's headers a route's upstream gets: the proxied endpoints' allow-list, and the
# body's own description (see dialproxy.wire.headers.route_headers).
FORWARDED_HEADERS = (*openai.FORWARDED_HEADERS, *ROUTE_BODY_HEADERS)


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


async def handle(request: web.Request, services: Services) -> web.StreamResponse:
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
    request: web.Request, services: Services, snapshot: Snapshot, route: DialRoute
) -> web.StreamResponse:
    """One request to ``route``, answered, and its log line."""
    started = time.perf_counter()
    tried = Tried()
    principal: Principal | None = None
    status = 0  # (no answer yet)
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
        out = _plan(request, services, snapshot, principal, route, body, extra)
        answered = await send_route(out, tried, services)
        if answered.stream is None:
            status = answered.status
            return web.Response(status=status, body=answered.body, headers=answered.headers)
        response = web.StreamResponse(status=answered.status, headers=answered.headers)
        status = response.status
        farewell: Callable[[], bytes] = bytes  # (b"": not an event stream, it just ends)
        if answered.stream.content_type == "text/event-stream":
            farewell = functools.partial(answered.stream.ending, openai.CHAT.shutdown_event)
        relay = answered.stream.relay(request, response, tried)
        if await services.drain.relay(response, relay, farewell):
            tried.error = "stream ended: the server is shutting down"
        return response
    except Exception as e:
        response, message = guard.refusal(request, e)
        status = response.status
        if message is not None:
            tried.error = message
        return response
    except asyncio.CancelledError:  # the client left, or the shutdown's grace ended
        if services.drain.over:
            tried.error = "the server shut down before the answer"
        elif status == 0:
            status, tried.error = 499, CLIENT_GONE
        raise
    finally:
        keys = services.shared.per_request
        if tried.key is not None and keys is not None and (work := keys.end(tried.key)) is not None:
            hold(services.background, work)
        services.log.line(
            "request",
            {
                "method": request.method,
                "path": request.path,
                "status": status,
                "project": principal.key.project if principal else None,
                "key": principal.key.fingerprint if principal else None,
                "route": route.name,
                "upstream": tried.upstream,
                "attempts": tried.attempts,
                "error": tried.error,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


def _plan(
    request: web.Request,
    services: Services,
    snapshot: Snapshot,
    principal: Principal,
    route: DialRoute,
    body: bytes,
    extra: list[tuple[str, str]],
) -> RouteOutbound:
    """The request the route's upstreams get: the client's allow-listed headers, the body
    as it came, a per-request key for an upstream without ``key`` (per-request keys on)."""
    headers = route_headers(request.headers, FORWARDED_HEADERS)
    keys = services.shared.per_request
    mint = functools.partial(keys.mint, principal) if keys is not None else None
    return RouteOutbound(
        route, request.method, request.rel_url, body, headers, snapshot.retriable_codes, extra, mint
    )
