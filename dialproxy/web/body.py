"""Reading a JSON request body: DIAL's 413, 415 and 400; gzip and deflate decoded within the
limit; a body that stops arriving is a 408.

aiohttp's own decompression is off (``auto_decompress=False``, see
:func:`dialproxy.web.app.create_app`): it would inflate a body whole, before the handler
has checked the caller's key, whatever its size.  A ``Content-Encoding`` body is inflated
here instead, after authentication, step by step: at most :data:`STEP` bytes of output per
step, the event loop given back between steps, and refused (413) as soon as the decoded
bytes pass the limit.

The body timeout is kept as the upstream idle timeout is (``dialproxy/upstream/idle.py``):
one periodic check of the bodies being read, no timer per request; a body that has fully
arrived with its headers (most do) is not watched at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from typing import Any

import orjson
from aiohttp import StreamReader, web

from dialproxy.errors import (
    BadRequest,
    BodyTimeout,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from dialproxy.web.appkeys import BODY_WATCH

STEP = 256 * 1024  # decoded bytes per step (a fraction of a millisecond of zlib's time)
PIECE = 64 * 1024  # decoded bytes per call of zlib (below the allocator's mmap threshold)
# Content-Encoding -> zlib's wbits (deflate: the zlib format, as RFC 9110 defines it)
DECODED = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_json_body(request: web.Request, max_body: int) -> dict[str, Any]:
    """The body, a JSON object (see :func:`read_json`)."""
    return (await read_json(request, max_body))[0]


async def read_json(request: web.Request, max_body: int) -> tuple[dict[str, Any], bytes]:
    """The body, a JSON object, and its bytes (decoded) as they came: the stream they came
    on is consumed (never ``request.read()`` afterwards)."""
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("Request body is too large")
    headers = request.headers
    content_type = headers.get("Content-Type", "")
    if (
        content_type != "application/json"  # (the usual: no parsing)
        and content_type.split(";", 1)[0].strip().lower() != "application/json"
    ):
        raise UnsupportedMediaType("Only application/json is supported")
    encoding = headers.get("Content-Encoding")
    content = request.content
    try:
        if encoding is None and content.is_eof():
            # The usual: all arrived.  Its buffered bytes taken at once (what request.read()
            # gives, without its loop of awaits and its copy into a bytearray).
            raw = content.read_nowait()
            if len(raw) > max_body:
                raise PayloadTooLarge("Request body is too large")
        else:
            watch = request.app.get(BODY_WATCH)
            with watch.watching(request.content) if watch else contextlib.nullcontext():
                raw = await _read(request, encoding, max_body)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is too large") from None
    except BodyTimeout:
        raise RequestTimeout("The request body stopped arriving") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python's json reads (a lone surrogate escape, NaN)
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("Invalid JSON in the request body") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body, raw


async def _read(request: web.Request, encoding: str | None, max_body: int) -> bytes:
    """The body, decoded when it has a ``Content-Encoding`` (what the upstream gets, with no
    Content-Encoding)."""
    name = encoding.strip().lower() if encoding is not None else "identity"
    if name in ("identity", ""):
        return await request.read()
    wbits = DECODED.get(name)
    if wbits is None:
        raise UnsupportedMediaType(
            "Unsupported Content-Encoding: only gzip and deflate are decoded"
        )
    return await _inflate(request.content, wbits, max_body, name)


async def _inflate(stream: StreamReader, wbits: int, max_body: int, name: str) -> bytes:
    """The body's bytes received (up to the limit), decoded twice: first only measured (a
    body that inflates past the limit, a "bomb", is refused after zlib's time alone),
    then kept.  Keeping what is decoded costs as much again as decoding it (fresh memory,
    its pages faulted in), so only a body known to fit pays that."""
    compressed: list[bytes] = []
    received = 0
    while chunk := await stream.readany():
        received += len(chunk)
        if received > max_body:
            raise PayloadTooLarge("Request body is too large")
        compressed.append(chunk)
    await _decode(compressed, wbits, max_body, name, None)
    decoded = bytearray()
    await _decode(compressed, wbits, max_body, name, decoded)
    return bytes(decoded)


async def _decode(
    compressed: list[bytes], wbits: int, max_body: int, name: str, into: bytearray | None
) -> None:
    """Decodes ``compressed`` (into ``into``, if given) in pieces, the event loop getting
    a turn every :data:`STEP` decoded bytes; 413 past ``max_body``, 400 if corrupt."""
    inflater = zlib.decompressobj(wbits)
    size = 0
    turn = STEP  # decoded bytes at which the event loop gets its next turn
    try:
        for chunk in compressed:
            if inflater.eof:
                raise BadRequest(f"Invalid {name} request body: data after its end")
            data = chunk
            while data:
                piece = inflater.decompress(data, PIECE)
                size += len(piece)
                if size > max_body:
                    raise PayloadTooLarge("Request body is too large")
                if into is not None:
                    into += piece
                data = inflater.unconsumed_tail
                if inflater.eof and (data or inflater.unused_data):
                    raise BadRequest(f"Invalid {name} request body: data after its end")
                if data and size >= turn:
                    turn = size + STEP
                    await asyncio.sleep(0)  # (the event loop's turn between steps)
    except zlib.error:
        raise BadRequest(f"Invalid {name} request body") from None
    if not inflater.eof:
        raise BadRequest(f"Invalid {name} request body: truncated")


async def read_raw_body(request: web.Request, max_body: int) -> bytes:
    """The body as it came (any type, still encoded if it is): over ``max_body`` 413, a
    body that stops arriving 408, as for the proxied endpoints."""
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge("Request body is too large")
    try:
        if request.content.is_eof():  # (the usual: all arrived with the headers)
            return await request.read()
        watch = request.app.get(BODY_WATCH)
        with watch.watching(request.content) if watch else contextlib.nullcontext():
            return await request.read()  # (bounded by the app's client_max_size: max_body)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is too large") from None
    except BodyTimeout:
        raise RequestTimeout("The request body stopped arriving") from None
