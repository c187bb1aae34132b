"""Reading a JSON request body: DIAL's 413, 415 and 400."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web

from dialproxy.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


async def read_json_body(request: web.Request, max_body: int) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("Request body is too large")
    content_type = request.headers.get("Content-Type", "")
    if (
        content_type != "application/json"  # (the usual: no parsing)
        and content_type.split(";", 1)[0].strip().lower() != "application/json"
    ):
        raise UnsupportedMediaType("Only application/json is supported")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is too large") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python's json reads (a lone surrogate escape, NaN)
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("Invalid JSON in the request body") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body
