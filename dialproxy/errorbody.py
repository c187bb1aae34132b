"""DIAL's JSON answers: the one JSON response helper, and the error body
``{"error": {"message", "code"}}`` for whatever a handler raised.

Below both :mod:`dialproxy.apis` (whose error shapes start from DIAL's) and
:mod:`dialproxy.web` (whose routes answer with it), so neither imports the other for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from dialproxy.errors import ProxyError
from dialproxy.logs import cut

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
