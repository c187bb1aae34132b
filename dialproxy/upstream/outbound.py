"""The outbound request and its retry loop: one :class:`Outbound` (what the handler planned)
in, one :class:`~dialproxy.upstream.answer.Answer` out, or the attempts' refusal raised.

The routes are tried in the balancer's order until one answers (at most the model's
``maxRetryAttempts``): an upstream at its own capacity is skipped; a connection error, a
redirect or a retriable status moves on (:class:`~dialproxy.upstream.attempts.Attempts`).
Nothing has reached the client yet, so every retry is before its first byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from dialproxy.config.model import Model, Serving, Upstream, Window
from dialproxy.config.store import Memo
from dialproxy.counting.limiter import Admission, Held, Scope
from dialproxy.errors import RateLimited
from dialproxy.outcome import Outcome
from dialproxy.upstream.answer import Answer, Context, answer, without_keys
from dialproxy.upstream.attempts import Attempts
from dialproxy.upstream.idle import HeadersWait

if TYPE_CHECKING:
    from collections.abc import Collection

    from yarl import URL

    from dialproxy.apis import Api


@dataclass(slots=True)
class Outbound:
    """One request to a deployment's upstreams, as the handler planned it."""

    api: Api
    model: Model
    serving: Serving  # the routes to try
    data: bytes  # the body the upstream gets (the API's body rule applied)
    headers: dict[str, str]  # what every attempt sends (each route adds its own)
    target: URL  # the client's path (after an `interfaces` base URL) and query, as written
    injected: bool  # usage asked for on the client's behalf: hidden from it
    ours: list[tuple[str, str]]  # our rate-limit headers (a limit of ours applies)
    memo: Memo  # the snapshot's (the upstreams' capacity counters)
    retriable: Collection[int]  # the statuses another upstream is tried after
    body: dict[str, Any]  # the body as read, and its size: what an upstream's capacity holds
    size: int


async def send(out: Outbound, outcome: Outcome, context: Context) -> Answer:
    """Tries ``out``'s routes until one answers; its answer, or the attempts' refusal
    raised.  What the attempts did goes in ``outcome`` (for the log line and the usage)."""
    balancer, client, model = context.balancer, context.client, out.model
    assert client is not None
    headers, limiter, idle = out.headers, context.limiter, context.idle
    query = out.target.raw_query_string  # as the client wrote it: nothing decoded
    attempts = Attempts(
        balancer, model, out.retriable, context.metrics, context.tracing, outcome.span
    )
    if balancer.refresh_due(model):
        await balancer.refresh(model)
    estimate = 0  # the request's tokens, held in an upstream's capacity while it is served
    for route in balancer.plan(model, out.serving.routes):
        if outcome.attempts >= model.max_retry_attempts:
            break
        capacity = capacity_of(route.upstream, out.memo)
        held, where = 0, Held.SHARED
        if capacity is not None:  # its own capacity first: at it, skipped like a paused one
            if not estimate:  # (worked out once, for the first upstream with a capacity)
                estimate = outcome.reserved[0] or out.api.reservation(out.body, out.size, model)[0]
            held = estimate
            try:
                _, _, where = await limiter.admit_held(capacity, held)
            except RateLimited as full:
                attempts.at_capacity(full.retry_after)
                continue
            if where is Held.NOTHING:  # (Redis down, admitted uncounted: nothing to give back)
                held = 0
        outcome.attempts += 1
        url = route.url
        if route.append_path:  # an `interfaces` base URL + the path the request came in on
            url += out.target.raw_path
        if query:
            url += ("&" if "?" in url else "?") + query
        outcome.upstream = route.name
        sent = attempts.sending(route, headers)
        try:
            # The idle timeout until the headers (``async with idle.headers()`` as two plain
            # calls: no coroutine for its enter and its exit).
            wait = HeadersWait(idle).enter()
            try:
                resp = await client.post(
                    url,
                    data=out.data,
                    headers={**headers, **route.headers} if route.headers else headers,
                    allow_redirects=False,  # the route's credentials go to its URL, nowhere else
                )
            except BaseException as e:
                wait.exit(e)
                raise
            wait.exit(None)
        except (aiohttp.ClientError, TimeoutError):
            await attempts.broke(route.upstream)
            await _give_back(context, capacity, held, where)
            continue
        except asyncio.CancelledError:  # the client left while the upstream was asked
            attempts.cancelled()
            raise
        if not attempts.served_now(resp, route.upstream) and not await attempts.served(
            resp, route.upstream
        ):
            await _give_back(context, capacity, held, where)
            continue
        if capacity is not None:
            outcome.capacity = (capacity, held, where)
        outcome.ttfb_ms = round((time.perf_counter() - sent) * 100_000) / 100  # (round(ms, 2))
        outcome.status, outcome.sent, outcome.attempt_span = resp.status, sent, attempts.span
        if outcome.ids is not None:
            outcome.ids.served_by(route, out.serving)
        answered = await answer(resp, outcome, out.api, out.ours, context, out.injected)
        if answered.status >= 400 and answered.stream is None:  # (errors only: rare)
            answered.body = without_keys(answered.body, route.upstream.key, outcome.per_request_key)
        return answered
    raise attempts.refusal()


def capacity_of(upstream: Upstream, memo: Memo) -> Admission | None:
    """The counters of an upstream's own capacity (its ``limits``), shared by every model
    that calls it (the same URL and key), worked out once per snapshot (its ``memo``)."""
    tokens, requests = upstream.capacity
    if tokens is None and requests is None:
        return None
    memo_key = ("capacity", upstream.endpoint, upstream.key_fingerprint, upstream.capacity)
    found: Admission | None = memo.get(memo_key)
    if found is None:
        name = f"{upstream.endpoint}|{upstream.key_fingerprint}"
        scope = Scope(
            owner="u:" + hashlib.sha256(name.encode()).hexdigest()[:16],
            model="capacity",
            token_windows=(Window("minute", 60, tokens),) if tokens is not None else (),
            request_windows=(Window("minute", 60, requests),) if requests is not None else (),
        )
        found = Admission([scope])
        memo.put(memo_key, found)
    return found


async def _give_back(context: Context, capacity: Admission | None, held: int, where: Held) -> None:
    """An attempt that was not served gives its upstream's capacity the tokens it held
    back, where it held them (its request stays counted: the upstream did get it)."""
    if capacity is not None and held:
        await context.limiter.settle(capacity.scopes, -held, 0, held=where)
