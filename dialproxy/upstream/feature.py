"""A deployment feature endpoint's outbound request (rate, tokenize, truncate_prompt,
configuration): one call to the URL the model's ``features`` names, its answer as an
:class:`~dialproxy.upstream.answer.Answer` (a body, never a stream).

No retry and no balancer: the one URL.  A redirect is not followed (502: the credentials go
to the configured URL, nowhere else), the answer is read up to ``max_response`` bytes (over
it: 502), and the whole call is bounded by the idle timeout (502 ``connection error to
origin``, as a connection error is).
"""

from __future__ import annotations

import asyncio

import aiohttp

from dialproxy.errors import BadGateway
from dialproxy.settings import Settings
from dialproxy.upstream.answer import Answer
from dialproxy.wire.headers import feature_response_headers


async def call_feature(
    client: aiohttp.ClientSession,
    settings: Settings,
    method: str,
    url: str,
    data: bytes,
    headers: dict[str, str],
) -> Answer:
    """The request to the feature endpoint; its answer (bounded, no redirect)."""
    try:
        idle = settings.idle_timeout
        async with asyncio.timeout(idle if idle > 0 else None):  # (the whole call)
            async with client.request(
                method,
                url,
                data=data,
                headers=headers,
                allow_redirects=False,  # the credentials go to the configured URL, nowhere else
            ) as resp:
                if resp.status < 200 or 300 <= resp.status < 400:  # (a final 1xx: no answer)
                    raise BadGateway(f"The feature endpoint answered {resp.status}")
                body = await _read_bounded(resp, settings.max_response)
                return Answer(resp.status, feature_response_headers(resp.headers), body)
    except (aiohttp.ClientError, TimeoutError):
        raise BadGateway("connection error to origin") from None


async def _read_bounded(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The answer's body (decoded), read no further than ``cap`` bytes (over it: 502)."""
    length = resp.content_length
    if length is not None and length > cap:
        resp.close()
        raise BadGateway(f"The feature endpoint's response is over the {cap}-byte limit")
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > cap:
            resp.close()
            raise BadGateway(f"The feature endpoint's response is over the {cap}-byte limit")
        parts.append(chunk)
    return b"".join(parts)
