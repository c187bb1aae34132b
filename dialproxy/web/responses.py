"""The Responses API's follow-ups: ``GET``/``DELETE /openai/v1/responses/{id}`` and
``POST /openai/v1/responses/{id}/cancel``, on one of the proxy's response ids.

One request: the caller (401) -> the id, one of ours and of the caller's project (404) ->
its deployment (404, 403) -> the upstream that made the response (404 when the config has
it no more) -> one attempt, to that upstream alone (no other has the response) -> the
answer relayed with the ids made ours again -> one log line.  A follow-up is not counted
as a request.  A background response's usage is charged when a follow-up first sees it
(it was not known when it was created): once, however many follow-ups see it, on any
instance when the storage is Redis.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import structlog
from aiohttp import web

from dialproxy.apis import responses
from dialproxy.apis.responses import RESPONSES, ResponseIds, ResponseRef
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Route, Serving
from dialproxy.errors import NotFound, Unavailable
from dialproxy.logs import cut
from dialproxy.outcome import Outcome
from dialproxy.upstream.answer import stop_draining
from dialproxy.upstream.followup import FollowUp, follow_up
from dialproxy.web.body import read_raw_body
from dialproxy.web.charged import responses_redis
from dialproxy.web.finish import (
    add_to_ledger,
    begin,
    disbelieve,
    end_key,
    hold,
    log_line,
    record,
    refused,
    settle_after_drain,
)
from dialproxy.web.plan import plan_for
from dialproxy.web.services import Services
from dialproxy.wire.headers import UPSTREAM_KEY, forwarded_headers

log = structlog.get_logger("dialproxy.responses")


@dataclass(slots=True)
class _Call:
    """One follow-up as it goes: what :func:`handle` learns of it (the caller, then the
    reference its id holds), read by :func:`_forward` and :func:`_settle`."""

    request: web.Request
    services: Services
    our_id: str  # the response id in the path
    outcome: Outcome
    started: float
    principal: Principal | None = None  # None: not authenticated (yet)
    ref: ResponseRef | None = None  # None: not one of ours (or not read yet)


async def handle(request: web.Request, services: Services, action: str) -> web.StreamResponse:
    """One follow-up (``action``: retrieve, delete, cancel) on a response id of ours."""
    snapshot = services.store.snapshot
    started = time.perf_counter()
    # (its own API label, as the metrics list it: a poll is not a response made)
    outcome = begin(services, request, f"{RESPONSES.name}/{action}")
    our_id = request.match_info["response_id"]
    call = _Call(request, services, our_id, outcome, started)
    try:
        principal = call.principal = await authenticate(
            request.headers, snapshot, request.remote, services.shared
        )
        ref = call.ref = responses.parse(our_id)
        if ref is None or ref.project != responses.project_tag(principal.project):
            raise NotFound(f"Response {cut(our_id)} not found")
        plan = plan_for(principal, snapshot, ref.deployment, services.store.memo_for(snapshot))
        model = plan.model
        serving = model.serving.get(RESPONSES.name)
        if serving is None:
            raise Unavailable(f"Deployment {ref.deployment} no longer serves responses")
        route = responses.find_route(serving, ref.upstream)
        if route is None:
            raise NotFound(f"Response {cut(our_id)} not found: its upstream is gone")
        if ref.background:  # its usage is counted when first seen (a shared key's too)
            outcome.model, outcome.scopes, outcome.records = model, plan.scopes, plan.records
            outcome.shared = principal.shared
        outcome.ids = ResponseIds.of(ref, our_id)
        body = await read_raw_body(request, services.settings.max_body)
        return await _forward(call, route, serving, body)
    except Exception as e:
        return refused(request, RESPONSES, outcome, e)
    finally:
        settle = functools.partial(_settle, call)
        if outcome.leftover is None:
            settle()
        else:
            hold(services.background, settle_after_drain(services, outcome, settle))
        if outcome.per_request_key is not None and outcome.leftover is None:
            end_key(services, outcome.per_request_key)


async def _forward(call: _Call, route: Route, serving: Serving, body: bytes) -> web.StreamResponse:
    """The follow-up planned (the headers, an adapter's per-request key), sent to
    ``route``, the upstream that made the response; its answer written, or its stream
    relayed."""
    request, services, outcome = call.request, call.services, call.outcome
    principal, ref = call.principal, call.ref
    assert principal is not None and ref is not None  # (found before the call is forwarded)
    headers = forwarded_headers(
        request.headers,
        principal.secret,
        services.store.snapshot.models[ref.deployment],
        serving.default_headers,
        RESPONSES.forwarded_headers,
    )
    if body:
        headers["Content-Type"] = request.headers.get("Content-Type", "application/json")
    else:
        headers.pop("Content-Type", None)
    if route.name == "endpoint" or "X-UPSTREAM-ENDPOINT" in route.headers:
        keys = services.shared.per_request  # an adapter: a per-request key (as for a create)
        if keys is not None:
            outcome.per_request_key = headers[UPSTREAM_KEY] = await keys.mint(principal)
    out = FollowUp(
        route,
        ref.upstream_id,
        _action(request),
        request.method,
        request.rel_url.raw_query_string,
        body,
        headers,
    )
    answered = await follow_up(out, outcome, services)
    if answered.stream is None:
        return web.Response(status=answered.status, body=answered.body, headers=answered.headers)
    response = web.StreamResponse(status=answered.status, headers=answered.headers)
    relay = answered.stream.relay(request, response, outcome)
    farewell = functools.partial(answered.stream.ending, RESPONSES.shutdown_event)
    if await services.drain.relay(response, relay, farewell):
        outcome.error = "stream ended: the server is shutting down"
        stop_draining(outcome)
    return response


def _action(request: web.Request) -> str:
    if request.method == "POST":
        return "cancel"
    return "delete" if request.method == "DELETE" else "retrieve"


def _settle(call: _Call) -> None:
    """The log line; a background response's usage charged the first time it is seen (an
    estimate is never charged: the response runs on whatever became of this request)."""
    services, outcome, principal, ref = call.services, call.outcome, call.principal, call.ref
    if outcome.estimated:
        outcome.usage, outcome.estimated = None, False
    disbelieve(outcome)  # (as any request's)
    usage = outcome.usage
    if usage is not None and outcome.status == 200 and outcome.records and ref is not None:
        redis = responses_redis(services.shared.per_request)

        async def charge() -> None:
            if await services.charged.first(call.our_id, redis):
                record(services, outcome)
                if services.ledger is not None and principal is not None:  # (once too)
                    outcome.api = RESPONSES.name  # (the ledger's row: a response's usage)
                    snapshot = services.store.snapshot
                    add_to_ledger(services.ledger, snapshot, principal, ref.deployment, outcome)

        hold(services.background, charge())
    deployment = ref.deployment if ref is not None else None
    log_line(services, call.request, principal, deployment, outcome, call.started)


def routes(app: web.Application, services: Services) -> None:
    """The follow-up routes."""
    path = "/openai/v1/responses/{response_id}"
    for method, route_path, action in (
        ("GET", path, "retrieve"),
        ("DELETE", path, "delete"),
        ("POST", path + "/cancel", "cancel"),
    ):
        handler = functools.partial(handle, services=services, action=action)
        app.router.add_route(method, route_path, handler)
