"""Header policy, in one place: what an upstream gets of the client's headers, what the client
gets of the upstream's, and where the upstream's key goes.

- To the upstream: an allow-list of the client's headers (:data:`FORWARDED_REQUEST_HEADERS`,
  and each API's own beside it; a DIAL route's: :func:`route_headers`), the model's
  ``defaultHeaders`` (never a name of :data:`NEVER_DEFAULT_HEADERS`), ``Content-Type`` and
  ``Accept-Encoding: identity`` set; the client's key never (only a JWT-style
  ``Authorization`` of a model that forwards it); a direct upstream's key where its ``auth``
  says (:func:`direct_key_header`); an adapter's upstream in DIAL's ``X-UPSTREAM-*`` headers
  (:func:`adapter_headers`) and its per-request key in :data:`UPSTREAM_KEY`.
- To the client: an allow-list of the upstream's headers (:data:`PASSED_RESPONSE_HEADERS`);
  the provider's rate-limit headers only when no limit of ours applies (ours replace them);
  hop-by-hop headers never, nor what the ``Connection`` header names; ``Content-Encoding``
  only for a coding the client session does not decode (the body relayed as it came); a
  feature endpoint's: :func:`feature_response_headers`.

Below :mod:`dialproxy.config` (which reads :func:`never_default_header` and builds its
routes' headers here): nothing of the config is imported, a model is read through
:class:`AuthForwarding`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol

from aiohttp import compression_utils
from multidict import CIMultiDictProxy

# The client's headers every API passes on to the upstream (Content-Type is always
# application/json: it is set, not copied).  Each API adds its own (`Api.forwarded_headers`).
FORWARDED_REQUEST_HEADERS = (
    "accept",
    "user-agent",
    "x-request-id",
    "traceparent",
    "tracestate",
    "baggage",
    "x-conversation-id",
)

# A DIAL route's body goes as it came (any content type and encoding): its upstream gets the
# body's own description with it (see route_headers).
ROUTE_BODY_HEADERS = ("content-type", "content-encoding")

# Where an upstream behind a DIAL adapter, or a route's upstream, gets its key (a per-request
# key when it has none): never the client's.
UPSTREAM_KEY = "Api-Key"

# Names a `defaultHeaders` entry can never set: hop-by-hop, the body's framing and type,
# the client's key, and what the proxy sets itself (compared lowercased).
NEVER_DEFAULT_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "expect",
        "api-key",
        "x-api-key",
        "authorization",
        "x-dial-deployment-id",  # (an adapter's: the proxy sets it, as DIAL Core does)
    }
)


# For a request with no body: aiohttp would send it as ``application/octet-stream`` (a POST or
# a PUT, with ``data=None``), a type the client never gave.
NO_BODY_TYPE = ("Content-Type",)


def never_default_header(name: str) -> bool:
    """Whether a ``defaultHeaders`` entry may not set ``name`` (nor any ``X-UPSTREAM-*``:
    DIAL's adapter headers are the proxy's, see :func:`adapter_headers`)."""
    lower = name.lower()
    return lower in NEVER_DEFAULT_HEADERS or lower.startswith("x-upstream-")


def direct_key_header(auth: str, key: str) -> tuple[str, str]:
    """Where a direct upstream gets its ``key``: OpenAI style (``auth`` ``bearer``:
    ``Authorization: Bearer``), Azure style (``api-key``) or Anthropic style
    (``x-api-key``)."""
    if auth == "bearer":
        return "Authorization", "Bearer " + key
    return auth, key


def adapter_headers(endpoint: str, key: str | None, extra_data: object = None) -> dict[str, str]:
    """DIAL's adapter shape: the upstream an adapter is to call in ``X-UPSTREAM-ENDPOINT``,
    its key (if any) in ``X-UPSTREAM-KEY`` and its ``extraData`` (if any, as JSON) in
    ``X-UPSTREAM-EXTRA-DATA``."""
    headers = {"X-UPSTREAM-ENDPOINT": endpoint}
    if key is not None:
        headers["X-UPSTREAM-KEY"] = key
    if extra_data is not None:
        headers["X-UPSTREAM-EXTRA-DATA"] = json.dumps(extra_data)
    return headers


# Upstream response headers passed back: an allow-list, everything else stays here (the
# upstream's cookies, its server's name, its hop-by-hop headers, whatever else it sends).
# aiohttp writes Content-Length (and Transfer-Encoding) itself; a body is relayed decoded.
PASSED_RESPONSE_HEADERS = frozenset(
    {
        # the content
        "content-type",
        "content-language",
        "content-disposition",
        "cache-control",
        "x-accel-buffering",  # (an upstream's "no" keeps a stream unbuffered by nginx)
        # request ids, as the SDKs read them (openai: x-request-id; anthropic: request-id)
        "x-request-id",
        "request-id",
        "apim-request-id",  # Azure OpenAI's
        "openai-processing-ms",
        "openai-version",
        # retry advice on an answer passed through (a retried status never reaches the client)
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    }
)
# The provider's rate-limit headers: passed only when no limit of ours applies to the
# request; when one does, ours (x-ratelimit-*, from our counters) replace them all.
PROVIDER_RATELIMIT_HEADERS = frozenset(
    [
        f"x-ratelimit-{kind}-{unit}"
        for kind in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    ]
    + [
        f"anthropic-ratelimit-{unit}-{kind}"
        for unit in ("requests", "tokens", "input-tokens", "output-tokens")
        for kind in ("limit", "remaining", "reset")
    ]
)
# Dropped headers most upstreams send (known by name only to skip lowercasing them).
_COMMON_DROPPED = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "keep-alive",
        "date",
        "server",
        "set-cookie",
        "vary",
        "strict-transport-security",
        "x-content-type-options",
        "alt-svc",
        "cf-ray",
        "cf-cache-status",
        "openai-organization",
        "openai-project",
        "x-envoy-upstream-service-time",
        "x-upstream-attempts",
    }
)

_CONNECTION = 2  # the verdict on the Connection header: the names it lists are dropped too
_ENCODING = 3  # on Content-Encoding: dropped, its value noted (see response_headers)
_CONNECTION_USUAL = frozenset({"keep-alive", "close", "Keep-Alive", "Close"})  # (no name)


def _verdicts(passed: frozenset[str]) -> dict[str, int]:
    """Header name -> 1 (passes), 0 (dropped), 2 (Connection), 3 (Content-Encoding): the
    names we know, as servers write them (lowercase, Capitalized-Words): found without
    lowercasing each header."""
    known = {
        name: 1 if name in passed else 0
        for name in PASSED_RESPONSE_HEADERS | PROVIDER_RATELIMIT_HEADERS | _COMMON_DROPPED
    }
    known["connection"] = _CONNECTION
    known["content-encoding"] = _ENCODING
    verdicts: dict[str, int] = {}
    for name, verdict in known.items():
        verdicts[name] = verdicts["-".join(p.capitalize() for p in name.split("-"))] = verdict
    return verdicts


_VERDICTS_OURS = _verdicts(PASSED_RESPONSE_HEADERS)  # limits of ours apply
_VERDICTS_THEIRS = _verdicts(PASSED_RESPONSE_HEADERS | PROVIDER_RATELIMIT_HEADERS)

# What the client session decodes (auto_decompress, see app.py; the name as aiohttp matches
# it): gzip and deflate, br and zstd with their libraries installed ("identity": no coding).
DECODED = frozenset(
    ["identity", "gzip", "deflate"]
    + (["br"] if compression_utils.HAS_BROTLI else [])
    + (["zstd"] if compression_utils.HAS_ZSTD else [])
)


class AuthForwarding(Protocol):
    """What :func:`forwarded_headers` reads of a model (``config.model.Model``)."""

    @property
    def forward_auth_token(self) -> bool: ...


def forwarded_headers(
    client: Mapping[str, str],
    secret: str,
    model: AuthForwarding,
    defaults: tuple[tuple[str, str], ...],
    names: tuple[str, ...],
) -> dict[str, str]:
    """The ``client``'s headers an upstream gets (``names``: the API's), then the model's
    ``defaultHeaders`` (lowercased names) it did not send (each route adds its own, which
    win, see ``Route``), ``Content-Type`` and ``Accept-Encoding: identity`` (an answer
    encoded anyway is decoded).  ``secret``: the client's key, never passed on."""
    # (looked up by name: no lowercasing of every header the client sent)
    headers = {name: value for name in names if (value := client.get(name)) is not None}
    for name, value in defaults:  # (never a name the proxy sets: see NEVER_DEFAULT_HEADERS)
        if name not in headers:
            headers[name] = value
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    if model.forward_auth_token:
        authorization = client.get("Authorization")
        if authorization and secret not in authorization:
            headers["Authorization"] = authorization
    return headers


def route_headers(client: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The ``client``'s headers a DIAL route's upstream gets: ``names`` (the proxied
    endpoints' allow-list and :data:`ROUTE_BODY_HEADERS`), and ``Accept-Encoding:
    identity``; no ``Content-Type`` of ours (the body goes as it came)."""
    headers = {n: v for n in names if (v := client.get(n)) is not None}
    headers["Accept-Encoding"] = "identity"
    return headers


def feature_response_headers(upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """A feature endpoint's headers its client gets: the proxied endpoints' allow-list
    (content type, request ids...), nothing else (its body is read whole: no framing, no
    encoding)."""
    return [(k, v) for k, v in upstream.items() if k.lower() in PASSED_RESPONSE_HEADERS]


def response_headers(
    upstream: CIMultiDictProxy[str], attempts: int, ours: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The ``upstream``'s headers we pass back (see ``PASSED_RESPONSE_HEADERS``), then ours
    (the response copies them once): ``X-UPSTREAM-ATTEMPTS`` and ``ours``, our rate-limit
    headers (none: no limit of ours applies); last, a ``Content-Encoding`` the client session
    does not decode (the body relayed as it came: the usage in it cannot be read)."""
    verdicts = _VERDICTS_OURS if ours else _VERDICTS_THEIRS
    headers: list[tuple[str, str]] = []
    listed: list[str] | None = None  # what the Connection header names
    encoding: str | None = None  # the first Content-Encoding (found here: no lookup after)
    for k, v in upstream.items():
        verdict = verdicts.get(k)
        if verdict is None:  # a name not written as we know it
            verdict = verdicts.get(k.lower(), 0)
        if verdict == 1:
            headers.append((k, v))
        elif verdict == _CONNECTION and v not in _CONNECTION_USUAL:
            listed = (listed or []) + v.split(",")
        elif verdict == _ENCODING and encoding is None:
            encoding = v
    if listed and headers:
        named = {name.strip().lower() for name in listed}
        headers = [(k, v) for k, v in headers if k.lower() not in named]
    headers.append(("X-UPSTREAM-ATTEMPTS", str(attempts)))
    headers += ours
    if encoding is not None and encoding.lower() not in DECODED:
        headers.append(("Content-Encoding", encoding))
    return headers
