"""The proxied endpoints' handler: one straight line for every API (:mod:`dialproxy.apis`).

One request (:func:`handle`), top to bottom, nothing re-entered:

1. the snapshot taken once; :func:`~dialproxy.web.finish.begin` (its start observed);
2. authenticate (401) -> :func:`~dialproxy.web.plan.plan_for`: the deployment (404), the
   key's right to it (403), its counters (memoised per key and deployment) -> the body read
   (415, 413, 400);
3. :func:`_admit`: the shared key's cap, then the limits (429): the request held;
4. the :class:`~dialproxy.upstream.outbound.Outbound` planned (the API's body rule, the
   headers by :mod:`dialproxy.wire.headers`, an adapter's per-request key) and sent:
   :func:`~dialproxy.upstream.outbound.send` tries the upstreams and returns an
   :class:`~dialproxy.upstream.answer.Answer`;
5. the answer's body written, or its stream relayed as it comes;
6. ``finally``: :func:`~dialproxy.web.finish.settle`: the usage recorded (shielded from a
   client disconnect), the ledger's row, one log line with the metrics and spans.

What the proxy says itself is in the API's error shape
(:func:`~dialproxy.web.finish.refused`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from typing import Any

from aiohttp import web

from dialproxy.apis import Api
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Model, Serving
from dialproxy.counting.limiter import Held
from dialproxy.errors import BadRequest, Unavailable
from dialproxy.outcome import Outcome
from dialproxy.upstream.answer import stop_draining
from dialproxy.upstream.outbound import Outbound, send
from dialproxy.web.body import read_json
from dialproxy.web.finish import (
    CLIENT_GONE,
    abandoned,
    begin,
    end_key,
    hold,
    refused,
    settle,
    settle_after_drain,
)
from dialproxy.web.plan import Plan, plan_for
from dialproxy.web.services import Services
from dialproxy.wire.headers import UPSTREAM_KEY, forwarded_headers


async def expect_continue(request: web.Request, services: Services, api: Api) -> None:
    """``Expect: 100-continue``: the client is told to send its body only when its key is
    good and the size it declares within ``--max-body``; else no ``100 Continue``, and the
    handler's refusal (401, 413: before the body is read) is the answer, with its log line.
    (aiohttp's own handler said 100 at once: the body came, to be refused.)"""
    if request.version != (1, 1):
        return
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect[:64]}")
    length = request.content_length
    if length is not None and length > services.settings.max_body:
        return
    snapshot = services.store.snapshot
    try:
        await authenticate(
            request.headers, snapshot, request.remote, services.shared, api.x_api_key,
            services.store.memo_for(snapshot),
        )  # fmt: skip
    except Exception:  # (the handler says why, as it would without the Expect)
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # (the answer's bytes start after it, as aiohttp's does)


async def handle(request: web.Request, services: Services, api: Api) -> web.StreamResponse:
    """One proxied request to ``api``.  The deployment is the path's ``{id}``, or (a path
    without one) the body's ``model``."""
    snapshot = services.store.snapshot  # taken once: the request lives on it, reloads or not
    memo = services.store.memo_for(snapshot)
    started = time.perf_counter()
    deployment: str | None = request.match_info.get("id")
    outcome = begin(services, request, api.name)
    principal: Principal | None = None
    try:
        principal = await authenticate(
            request.headers, snapshot, request.remote, services.shared, api.x_api_key, memo
        )
        max_body = services.settings.max_body
        if deployment is None:  # /openai/v1/...: the deployment is the body's "model"
            body, raw = await read_json(request, max_body)
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise BadRequest("The request body must name the deployment in 'model'")
            deployment = name
            plan = plan_for(principal, snapshot, deployment, memo)
        else:  # 404 and 403 before the body is read
            plan = plan_for(principal, snapshot, deployment, memo)
            body, raw = await read_json(request, max_body)
        model = outcome.model = plan.model
        serving = model.serving.get(api.name)  # (refused here, 503 or 400, before limits count)
        if serving is None or "X-UPSTREAM-ID" in request.headers:
            serving = _serving(request, model, deployment, api)
        if api.ids is not None:
            ids = outcome.ids = api.ids(body, deployment, principal.project)
            if (route := ids.route(serving)) is not None:  # (the upstream that has the rest)
                serving = dataclasses.replace(serving, routes=(route,))
        ours = await _admit(services, principal, plan, api, body, len(raw), outcome)
        payload, injected = api.body(body, raw, model)
        data = payload if payload is not None else raw
        outcome.request_bytes = len(data)
        headers = forwarded_headers(
            request.headers, principal.secret, model, serving.default_headers, api.forwarded_headers
        )
        if not model.direct and (keys := services.shared.per_request) is not None:
            # an adapter gets a per-request key, never the client's (dialproxy.perrequest)
            outcome.per_request_key = headers[UPSTREAM_KEY] = await keys.mint(principal)
        # (in the order of its fields: a class called with keywords builds a dict of them)
        out = Outbound(
            api, model, serving, data, headers, request.rel_url, injected, ours,
            memo, snapshot.retriable_codes, body, len(raw),
        )  # fmt: skip
        answer = await send(out, outcome, services)
        if answer.stream is None:
            return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        # A stream, relayed as it comes: awaited here, not in a helper (each coroutine between
        # the task and the relay is one more step on every chunk).
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        relay = answer.stream.relay(request, response, outcome)
        farewell = functools.partial(answer.stream.ending, api.shutdown_event)
        if await services.drain.relay(response, relay, farewell):
            outcome.error = "stream ended: the server is shutting down"
            stop_draining(outcome)  # no reading on when the process stops
        return response
    except Exception as e:  # (the route is not guarded: its errors are answered here)
        return refused(request, api, outcome, e)
    except asyncio.CancelledError:  # the client left, or the shutdown's grace ended
        if services.drain.over:  # (what the shutdown cancels after its grace is ours: not
            outcome.error = "the server shut down before the answer"  # charged)
        elif outcome.attempts and outcome.usage is None:
            abandoned(outcome)
        elif outcome.status == 0:  # (no upstream asked yet: nothing to charge)
            outcome.status, outcome.error = 499, CLIENT_GONE
        raise
    finally:
        if outcome.leftover is None:
            settle(services, request, principal, deployment, outcome, started)
            if outcome.per_request_key is not None:
                end_key(services, outcome.per_request_key)
        else:  # the client left a stream before its usage: read on for it, then settle
            then = functools.partial(
                settle, services, request, principal, deployment, outcome, started
            )
            hold(services.background, settle_after_drain(services, outcome, then))


def _serving(request: web.Request, model: Model, deployment: str, api: Api) -> Serving:
    """How ``model`` serves ``api``: none (DIAL's strict ``interfaces`` map): 503; a client's
    ``X-UPSTREAM-ID`` pins it to that upstream alone (an id no upstream has: 400)."""
    serving = model.serving.get(api.name)
    if serving is None:
        if model.kind == "application":
            if model.serving:
                raise Unavailable(f"Application {deployment} serves chat/completions only")
            raise Unavailable(
                f"Application {deployment} has no endpoint dialproxy can call "
                "(a schema-rich application's is its schema's, which dialproxy does not read)"
            )
        raise Unavailable(
            f"Deployment {deployment} does not serve {api.name}: no {api.interface} interface"
        )
    if (pin := request.headers.get("X-UPSTREAM-ID")) is not None:
        route = serving.by_id.get(pin)
        if route is None:
            raise BadRequest(f"Deployment {deployment} has no upstream with id {pin[:64]!r}")
        serving = dataclasses.replace(serving, routes=(route,))
    return serving


async def _admit(
    services: Services,
    principal: Principal,
    plan: Plan,
    api: Api,
    body: dict[str, Any],
    size: int,
    outcome: Outcome,
) -> list[tuple[str, str]]:
    """The request held in its limits: the shared key's own cap first (its share held, 429),
    then the plan's windows (its tokens and cost held, its concurrency slot taken, 429 with
    ``Retry-After``), by the API's reservation of ``body`` (``size`` bytes).  Returned: our
    rate-limit headers (none: no limit of ours applies)."""
    model, shared = plan.model, principal.shared
    held = (0, 0)  # the request's tokens and cost, held in its windows until settled
    if api.counted and (plan.records or (shared is not None and shared.tokens >= 0)):
        held = api.reservation(body, size, model)
    if shared is not None:  # its own cap first (its share held); then the owner's limits
        outcome.shared = shared
        if api.counted:
            outcome.shared_reserved = await services.shared.reserve(shared, held[0])
    ours: list[tuple[str, str]] = []
    if plan.scopes and api.counted:
        if not plan.records:
            held = (0, 0)
        slot = uuid.uuid4().hex if plan.capped else ""  # (its slot, freed when it ends)
        limiter = services.limiter
        if limiter.local is not None:  # (at once in process memory)
            request_state, token_state = limiter.admit_now(plan.admission, *held, slot)
        else:
            request_state, token_state, where = await limiter.admit_held(
                plan.admission, *held, slot
            )
            outcome.held = where
            if where is Held.NOTHING:  # (Redis down, admitted uncounted: its usage all added)
                held, slot = (0, 0), ""
        outcome.scopes, outcome.records, outcome.reserved = plan.scopes, plan.records, held
        outcome.admitted = time.time()
        outcome.slot = slot
        if request_state is not None or token_state is not None:
            ours = api.errors.ratelimit_headers(request_state, token_state)
    if services.metrics is not None and (held != (0, 0) or outcome.shared_reserved):
        outcome.holding = services.metrics.reserved()
    return ours
