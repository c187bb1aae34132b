"""Every error a route meets becomes DIAL's JSON error body ``{"error": {"message", "code"}}``.

Not a middleware: aiohttp wraps every request of an app with middlewares in two more
coroutine layers (about 1.6% of a proxied request's instructions).  The proxy handler turns
its own errors into responses (:func:`response_for`), the other routes are registered
:func:`guarded`, and :func:`unmatched` answers a path no route has (404) or a method its
routes lack (405), as JSON too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from dialproxy.apis import anthropic
from dialproxy.errorbody import error_response as error_response
from dialproxy.errorbody import json_response as json_response
from dialproxy.errorbody import response_for as response_for
from dialproxy.errors import ProxyError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("dialproxy.web")


def refusal(
    request: web.Request,
    error: Exception,
    shape: Callable[[web.Request, Exception], web.Response] = response_for,
) -> tuple[web.Response, str | None]:
    """The answer to what a handler raised (``shape``: an API's error shape), and what its
    log line says of it (a refusal's message; None: nothing more to say)."""
    return shape(request, error), error.message if isinstance(error, ProxyError) else None


def guarded(handler: Handler) -> Handler:
    """``handler`` with its errors answered by :func:`response_for`."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return response_for(request, e)

    return functools.update_wrapper(run, handler)


async def unmatched(request: web.Request) -> web.StreamResponse:
    """The last route, for any method and path: 405 when another route has the path (with
    the methods it takes in ``Allow``), else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    # (under /anthropic/, Anthropic's error shape: what its SDK reads there)
    shape = anthropic.error_response if request.path.startswith("/anthropic/") else response_for
    if allowed:
        error: web.HTTPException = web.HTTPMethodNotAllowed(request.method, allowed)
        response = shape(request, error)
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return shape(request, web.HTTPNotFound())
