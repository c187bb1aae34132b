"""A Responses API follow-up's outbound request: one :class:`FollowUp` (what the handler
planned) in, one :class:`~dialproxy.upstream.answer.Answer` out.

One attempt, to the upstream that made the response (no other has it): no retry, no
balancer.  A connection error or a redirect is DIAL's 502 ``No route``; any other answer is
the client's, its ids made ours again (``outcome.ids``) and its stream read for the usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from dialproxy.apis.responses import RESPONSES
from dialproxy.config.model import Route
from dialproxy.errors import BadGateway, NoRoute
from dialproxy.outcome import Outcome
from dialproxy.upstream.answer import Answer, Context, answer
from dialproxy.wire.headers import NO_BODY_TYPE


@dataclass(slots=True)
class FollowUp:
    """One follow-up (``action``: retrieve, delete, cancel) on a response an upstream made."""

    route: Route  # the upstream that made the response
    upstream_id: str  # the response's id there
    action: str
    method: str
    query: str  # the client's query string, as written
    data: bytes  # the body as it came (none: none sent)
    headers: dict[str, str]  # the route adds its own


def follow_up_url(route: Route, upstream_id: str, action: str) -> str:
    """Where a follow-up goes: after an ``interfaces`` base URL the Responses path, after a
    verbatim endpoint its ``/{id}`` (``/cancel`` for a cancel)."""
    base = route.url + "/openai/v1/responses" if route.append_path else route.url.rstrip("/")
    return f"{base}/{upstream_id}" + ("/cancel" if action == "cancel" else "")


async def follow_up(out: FollowUp, outcome: Outcome, context: Context) -> Answer:
    """The one attempt, to the upstream that made the response; its answer."""
    client, route = context.client, out.route
    assert client is not None and outcome.ids is not None
    url = follow_up_url(route, out.upstream_id, out.action)
    if out.query:
        url += "?" + out.query
    outcome.attempts, outcome.upstream = 1, route.name
    sent = time.perf_counter()
    try:
        async with context.idle.headers():
            resp = await client.request(
                out.method,
                url,
                data=out.data or None,
                headers={**out.headers, **route.headers},
                allow_redirects=False,
                skip_auto_headers=() if out.data else NO_BODY_TYPE,
            )
    except (aiohttp.ClientError, TimeoutError):
        raise BadGateway("No route") from None
    if resp.status < 200 or 300 <= resp.status < 400:  # (a redirect, a final 1xx: no answer)
        resp.close()
        raise NoRoute(f"upstream answered {resp.status}")
    outcome.ttfb_ms = round((time.perf_counter() - sent) * 1000, 2)
    outcome.status = resp.status
    return await answer(resp, outcome, RESPONSES, [], context)
