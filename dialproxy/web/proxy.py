"""The proxied endpoints' handler: one straight line for every API (:mod:`dialproxy.apis`).

One request (:func:`handle`), top to bottom, nothing re-entered:

1. the snapshot taken once; :func:`begin` (its start observed);
2. authenticate (401) -> :func:`plan_for`: the deployment (404), the key's right to it
   (403), its counters (memoised per key and deployment) -> the body read (415, 413, 400);
3. :func:`_admit`: the shared key's cap, then the limits (429): the request held;
4. the :class:`~dialproxy.upstream.outbound.Outbound` planned (the API's body rule, the
   headers by :mod:`dialproxy.wire.headers`, an adapter's per-request key) and sent:
   :func:`~dialproxy.upstream.outbound.send` tries the upstreams and returns an
   :class:`~dialproxy.upstream.answer.Answer`;
5. the answer's body written, or its stream relayed as it comes;
6. ``finally``: :func:`_settle`: the usage recorded (shielded from a client disconnect),
   the ledger's row, one log line (:func:`log_line`) with the metrics and spans.

What the proxy says itself is in the API's error shape (:func:`refused`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from dialproxy.apis import Api
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Grant, Model, Serving, Snapshot
from dialproxy.config.store import ConfigStore, Memo
from dialproxy.errors import BadRequest, Forbidden, NotFound, Unavailable
from dialproxy.ledger import Ledger
from dialproxy.limiter import Admission, Limiter, Scope
from dialproxy.logs import RequestLog, cut
from dialproxy.metrics import Metrics
from dialproxy.outcome import Outcome
from dialproxy.perrequest import PerRequestKeys
from dialproxy.settings import Settings
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.tracing import Tracing
from dialproxy.upstream.answer import drain, stop_draining
from dialproxy.upstream.balancer import Balancer
from dialproxy.upstream.idle import IdleWatch
from dialproxy.upstream.outbound import Outbound, send
from dialproxy.web import guard
from dialproxy.web.body import read_json
from dialproxy.web.drain import Drain
from dialproxy.wire.headers import UPSTREAM_KEY, forwarded_headers
from dialproxy.wire.usage import estimate


@dataclass(slots=True)
class Services:
    """What a proxied request uses of its app, gathered once and handed to :func:`handle`
    with the route (an ``app[KEY]`` lookup is a Python call: there were nine a request).
    The upstream calls take it as their :class:`~dialproxy.upstream.answer.Context`."""

    store: ConfigStore
    settings: Settings
    limiter: Limiter
    balancer: Balancer
    shared: SharedKeys[PerRequestKeys]
    background: set[asyncio.Task[None]]
    log: RequestLog
    idle: IdleWatch  # the upstream idle timeout while an answer's body is read
    drain: Drain  # the streams open now: ended with an error event when a shutdown's grace ends
    client: aiohttp.ClientSession | None = None  # set when the app starts
    ledger: Ledger | None = None  # the usage ledger (None: --ledger off)
    metrics: Metrics | None = None  # None: --no-metrics
    tracing: Tracing | None = None  # None: off (no OTEL_* variables ask for traces)


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
        headers["Accept-Encoding"] = "identity"  # (an encoded answer anyway is decoded)
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
        if await services.drain.relay(response, relay, api.shutdown_event):
            outcome.error = "stream ended: the server is shutting down"
            stop_draining(outcome)  # no reading on when the process stops
        return response
    except Exception as e:  # (the route is not guarded: its errors are answered here)
        return refused(request, api, outcome, e)
    except asyncio.CancelledError:  # the client left, or the shutdown's grace ended
        # (what the shutdown cancels after its grace is ours: not charged)
        if outcome.attempts and outcome.usage is None and not services.drain.over:
            abandoned(outcome)
        raise
    finally:
        if outcome.leftover is None:
            _settle(services, request, principal, deployment, outcome, started)
            if outcome.per_request_key is not None:
                end_key(services, outcome.per_request_key)
        else:  # the client left a stream before its usage: read on for it, then settle
            settle = functools.partial(
                _settle, services, request, principal, deployment, outcome, started
            )
            hold(services.background, settle_after_drain(services, outcome, settle))


def abandoned(outcome: Outcome) -> None:
    """A request that reached an upstream, whose client left before the answer (none came,
    or a 200's body was still being read): the upstream worked on it (a provider bills a
    request its client left), so it is charged the estimate of a stream cut before its
    first event (the prompt at a token per 4 bytes sent, one completion token), as status
    499, nginx's "client closed request".  An answer that failed is charged nothing, and a
    stream the client left is drained for its usage instead (``outcome.leftover``)."""
    if outcome.status not in (0, 200) or outcome.leftover is not None:
        return
    outcome.usage = estimate(outcome.request_bytes, 0)
    outcome.estimated = True
    outcome.status = 499
    outcome.error = "the client went away before the answer"


def begin(services: Services, request: web.Request, api: str) -> Outcome:
    """A request's outcome, to be filled; its start observed (in flight, its server span)."""
    outcome = Outcome(api=api)
    if services.metrics is not None:
        services.metrics.begin()
    if services.tracing is not None:
        outcome.span = services.tracing.request(request, api)
    return outcome


class Plan(NamedTuple):
    """What a key's requests to one deployment need, worked out once per snapshot."""

    model: Model
    scopes: tuple[Scope, ...]  # the counters they are charged to
    records: bool  # whether a scope counts usage (tokens or cost)
    capped: bool  # whether a scope caps the requests in flight
    admission: Admission  # what admitting a request to the scopes takes


def plan_for(principal: Principal, snapshot: Snapshot, deployment: str, memo: Memo) -> Plan:
    """The deployment (404), the key's right to it (403), its counters: memoised per key
    and deployment in the snapshot's ``memo`` (a 403 from the key's own quota is not)."""
    memo_key = (principal.key.digest, deployment)
    plan: Plan | None = memo.get(memo_key)
    if plan is None:
        grant = resolve(principal, snapshot, deployment)
        scopes = tuple(_scopes(principal, grant, snapshot))
        plan = Plan(
            grant.model,
            scopes,
            any(scope.records for scope in scopes),
            any(scope.concurrency is not None for scope in scopes),
            Admission(scopes),
        )
        memo.put(memo_key, plan)
    if principal.per_request and plan.model.features.get("accessibleByPerRequestKey") is False:
        raise Forbidden(f"Forbidden deployment: {plan.model.name}")  # (every route's check)
    return plan


def resolve(principal: Principal, snapshot: Snapshot, deployment: str) -> Grant:
    """Deployment (404), role (403), resolved limit <= 0 (403)."""
    if deployment not in snapshot.models:
        raise NotFound(f"Unknown application: {cut(deployment)}")
    grant = principal.access.grants.get(deployment)
    key = principal.key
    if grant is None or (key.models is not None and deployment not in key.models):
        raise Forbidden(f"Forbidden deployment: {cut(deployment)}")
    if grant.denied:
        raise Forbidden("Access denied")
    return grant


def _scopes(principal: Principal, grant: Grant, snapshot: Snapshot) -> list[Scope]:
    model = grant.model
    scopes: list[Scope] = []
    cost = principal.access.cost_windows if model.pricing is not None else ()
    if grant.token_windows or grant.request_windows or cost or grant.concurrency is not None:
        scopes.append(
            Scope(
                owner="p:" + principal.project,
                model=model.name,
                token_windows=grant.token_windows,
                request_windows=grant.request_windows,
                cost_windows=cost,
                concurrency=grant.concurrency,
            )
        )
    key_limit = principal.key.key_limits.get(model.name) or principal.key.key_limits.get("*")
    if key_limit is not None and key_limit.denies:
        raise Forbidden("Access denied")
    if key_limit is not None and key_limit.limits_anything:  # (an empty entry counts nothing)
        scopes.append(
            Scope(
                owner="k:" + principal.key.digest,
                model=model.name,
                token_windows=key_limit.token_windows(snapshot.schedule),
                request_windows=key_limit.request_windows(snapshot.schedule),
                concurrency=key_limit.concurrent,
            )
        )
    return scopes


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
            request_state, token_state = await limiter.admit(plan.admission, *held, slot)
        outcome.scopes, outcome.records, outcome.reserved = plan.scopes, plan.records, held
        outcome.admitted = time.time()
        outcome.slot = slot
        if request_state is not None or token_state is not None:
            ours = api.errors.ratelimit_headers(request_state, token_state)
    if services.metrics is not None and (held != (0, 0) or outcome.shared_reserved):
        outcome.holding = services.metrics.reserved()
    return ours


def refused(request: web.Request, api: Api, outcome: Outcome, error: Exception) -> web.Response:
    """The answer to what a request of ``api`` raised, in the API's shape, noted in the
    request's outcome (its log line)."""
    response, message = guard.refusal(request, error, api.errors.response)
    outcome.status, outcome.refusal = response.status, error
    if message is not None:
        outcome.error = message
    return response


def _settle(
    services: Services,
    request: web.Request,
    principal: Principal | None,
    deployment: str | None,
    outcome: Outcome,
    started: float,
) -> None:
    """The request's usage recorded (its reservation settled), added to the usage ledger,
    its log line written."""
    holds = outcome.reserved != (0, 0) or outcome.slot or outcome.shared_reserved
    if outcome.usage is not None and (outcome.status == 200 or outcome.estimated):
        if holds or outcome.shared is not None or outcome.records or outcome.capacity:
            record(services, outcome)
    elif holds or outcome.capacity is not None:  # nothing to charge: what it held given back
        outcome.usage = None
        record(services, outcome)
    if services.ledger is not None and principal is not None:
        add_to_ledger(services.ledger, services.store.snapshot, principal, deployment, outcome)
    log_line(services, request, principal, deployment, outcome, started)


async def settle_after_drain(
    services: Services, outcome: Outcome, settle: Callable[[], None]
) -> None:
    try:
        await drain(outcome, services.settings.stream_drain)
    finally:  # (settled and its key ended whatever became of the drain)
        settle()
        if outcome.per_request_key is not None:
            end_key(services, outcome.per_request_key)


def record(services: Services, outcome: Outcome) -> None:
    """Settle a request in its counters: a 200's usage (also to the shared key that called)
    less what was reserved at admission, or (no usage) the reservation given back.  At once
    in process memory, else in a task of its own, held by the app, so that a client that
    disconnects cannot cut it off; on Redis, a settlement goes with the next batch of
    calls, watched by the storage guard, and only a shared key's needs a task."""
    usage, model, limiter = outcome.usage, outcome.model, services.limiter
    pricing = model.pricing if model is not None else None
    tokens = cost = 0
    if usage is not None:
        tokens = usage.total_tokens
        if pricing is not None:
            cost = pricing.cost_nano_usd(usage.prompt_tokens, usage.completion_tokens)
    held_tokens, held_cost = outcome.reserved
    if outcome.capacity is not None:  # the upstream's own capacity: what it really served
        capacity, held = outcome.capacity
        outcome.capacity = None
        if (work := limiter.settle_soon(capacity.scopes, tokens - held, 0)) is not None:
            hold(services.background, work)
    if outcome.shared is None:  # no coroutine: in memory at once, on Redis in its batch
        amounts = (outcome.scopes, tokens - held_tokens, cost - held_cost, outcome.slot)
        if limiter.local is not None:
            limiter.record_now(*amounts, outcome.admitted)
        elif (work := limiter.settle_soon(*amounts, outcome.admitted)) is not None:
            hold(services.background, work)
        return

    async def in_storage() -> None:
        if outcome.shared is not None and tokens != outcome.shared_reserved:
            await services.shared.record(outcome.shared, tokens - outcome.shared_reserved)
        if outcome.scopes:
            await limiter.settle(
                outcome.scopes,
                tokens - held_tokens,
                cost - held_cost,
                outcome.slot,
                outcome.admitted,
            )

    hold(services.background, in_storage())


# The ledger's deployment of a request that named none the config has (any name a client
# sends would be a row of its own).
UNKNOWN_DEPLOYMENT = "(unknown)"


def add_to_ledger(
    ledger: Ledger,
    snapshot: Snapshot,
    principal: Principal,
    deployment: str | None,
    outcome: Outcome,
) -> None:
    """A finished request in the usage ledger (in memory: written in batches)."""
    shared, key = principal.shared, principal.key  # (the key's fields: no property calls)
    name = deployment if deployment in snapshot.models else None
    row = (
        key.project,
        key.fingerprint,
        shared.id if shared else "",
        name or UNKNOWN_DEPLOYMENT,
        outcome.api,
    )
    ledger.add(row, outcome)


def end_key(services: Services, key: str) -> None:
    """The request is over: its per-request key stops working here at once, and in Redis
    in the background (the answer does not wait for Redis)."""
    keys = services.shared.per_request
    if keys is not None and (work := keys.end(key)) is not None:
        hold(services.background, work)


def hold(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    """Runs ``work`` in a task of its own, held in ``tasks`` (the app's: awaited when it
    stops)."""
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


_NO_USAGE = (None, None, None, None)  # a log line's counts and details without a usage


def log_line(
    services: Services,
    request: web.Request,
    principal: Principal | None,
    deployment: str | None,
    outcome: Outcome,
    started: float,
) -> None:
    usage, key = outcome.usage, principal.key if principal is not None else None
    prompt, completion, total, details = usage if usage is not None else _NO_USAGE
    fields = {
        "method": request.method,
        "path": request.path,
        "status": outcome.status,
        "project": key.project if key is not None else None,
        "key": key.fingerprint if key is not None else None,
        "deployment": deployment,
        "upstream": outcome.upstream,
        "attempts": outcome.attempts,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "ttfb_ms": outcome.ttfb_ms,
        # (round(ms, 2) as a whole number of hundredths: half the work of round(x, 2); the same
        # value but at an exact tie, which a float of seconds does not hit)
        "duration_ms": round((time.perf_counter() - started) * 100_000) / 100,
        "error": outcome.error,
    }
    if principal is not None and principal.shared is not None:
        fields["shared_key"] = principal.shared.id
    if outcome.estimated:
        fields["usage"] = "estimated"
    elif details:
        fields["usage_details"] = dict(details)  # cached, reasoning tokens...
    services.log.take("request", fields)
    if services.metrics is not None:
        services.metrics.finish(outcome, principal, deployment)
    if services.tracing is not None:
        _trace(services.tracing, outcome, fields)


def _trace(tracing: Tracing, outcome: Outcome, fields: dict[str, Any]) -> None:
    """A request's end in its spans (after its log line: ``fields``)."""
    status, model = outcome.status, outcome.model
    if outcome.attempt_span is not None:
        tracing.attempt_end(outcome.attempt_span, status, outcome.error)
    if outcome.span is not None:
        tracing.request_end(
            outcome.span,
            {
                "dialproxy.deployment": model.name if model is not None else None,
                "dialproxy.project": fields["project"],
                "dialproxy.key": fields["key"],
                "dialproxy.upstream": outcome.upstream,
                "dialproxy.attempts": outcome.attempts,
                "gen_ai.usage.input_tokens": fields["prompt_tokens"],
                "gen_ai.usage.output_tokens": fields["completion_tokens"],
                "error.type": outcome.error,
            },
            status,
        )
