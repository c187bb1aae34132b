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
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from dialproxy.errors import ProxyError
from dialproxy.logs import cut

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("dialproxy.web")


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The one JSON answer of the proxy's own routes (errors and feature endpoints alike)."""
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(body, status, headers)


def response_for(request: web.Request, error: Exception) -> web.Response:
    """The JSON response for what a handler raised: a refusal (ProxyError), an HTTP error
    of aiohttp's, or anything else (a 500, logged by type, never by message).  An HTTP
    exception below 400 (a redirect) is raised again."""
    if isinstance(error, ProxyError):
        return error_response(error.status, error.body(), error.headers)
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        message = error.reason if error.status != 404 else f"Not found: {cut(request.path)}"
        return error_response(
            error.status, {"error": {"message": message, "code": str(error.status)}}
        )
    log.error("internal_error", path=request.path, error=type(error).__name__)
    return error_response(500, {"error": {"message": "Internal error", "code": "500"}})


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
    if allowed:
        error: web.HTTPException = web.HTTPMethodNotAllowed(request.method, allowed)
        response = response_for(request, error)
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return response_for(request, web.HTTPNotFound())
