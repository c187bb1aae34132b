"""The proxied endpoints: one straight line for every API (:mod:`dialproxy.apis`).

One request: snapshot taken once -> principal -> deployment (404) -> roles (403) -> limits
(429) -> the API's body rule -> attempts over upstreams until one answers -> bytes relayed
as they come (the API's usage rule reading them) -> usage recorded (shielded from a client
disconnect) -> one log line.  What the proxy says itself is in the API's error shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from dialproxy import sharedkeys
from dialproxy.apis import AnswerIds, Api
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Grant, Model, Serving, Snapshot, Upstream, Window
from dialproxy.config.store import ConfigStore, Memo
from dialproxy.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    NotFound,
    Unavailable,
)
from dialproxy.ledger import Ledger
from dialproxy.limiter import Admission, Limiter, RateLimited, Scope
from dialproxy.logs import RequestLog, cut
from dialproxy.metrics import Metrics
from dialproxy.settings import Settings
from dialproxy.tracing import Tracing
from dialproxy.upstream.attempts import Attempts
from dialproxy.upstream.balancer import Balancer
from dialproxy.upstream.headers import UPSTREAM_KEY, forwarded_headers, response_headers
from dialproxy.upstream.idle import IdleWatch
from dialproxy.upstream.relay import EventRewriter, UsageHider, UsageScanner
from dialproxy.upstream.sse import EventTooLarge
from dialproxy.upstream.usage import Usage, estimate, find_usage
from dialproxy.web import guard
from dialproxy.web.body import read_json_body
from dialproxy.web.drain import Drain

Relay = UsageScanner | UsageHider | EventRewriter


@dataclass(slots=True)
class Outcome:
    """What one request did, for the log line and the usage record."""

    status: int = 0
    attempts: int = 0
    upstream: str | None = None
    usage: Usage | None = None
    ttfb_ms: float | None = None
    error: str | None = None
    model: Model | None = None
    scopes: tuple[Scope, ...] = ()
    records: bool = False  # whether a scope counts usage
    shared: sharedkeys.SharedKey | None = None  # the shared key that called, if one did
    request_bytes: int = 0  # the body sent upstream (what a usage estimate goes by)
    estimated: bool = False  # the usage is an estimate (a stream cut before its usage)
    # An abandoned stream's upstream and reader, still to be drained for the usage.
    leftover: tuple[aiohttp.ClientResponse, Relay] | None = None
    per_request_key: str | None = None  # the key sent to an adapter: ended with the request
    ids: AnswerIds | None = None  # the API's ids rewritten in the answer (Responses)
    reserved: tuple[int, int] = (0, 0)  # tokens and nano-USD held at admission, till settled
    admitted: float | None = None  # when (its calendar periods: the ones it is settled in)
    slot: str = ""  # the request's concurrency slots' member (freed when it is settled)
    shared_reserved: int = 0  # tokens held in the shared key's utilized, till settled
    capacity: tuple[Admission, int] | None = None  # the serving upstream's, and its hold
    # The API's name (the usage ledger's rows and the metrics are per API); observed
    # (dialproxy.metrics, dialproxy.tracing): what refused the request, when the served
    # attempt was sent, whether it holds a reservation, its spans.
    api: str = ""
    refusal: Exception | None = None
    sent: float = 0.0
    holding: bool = False
    span: Any = None
    attempt_span: Any = None


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


@dataclass(slots=True)
class Services:
    """What a proxied request uses of its app, gathered once and handed to :func:`handle`
    with the route (an ``app[KEY]`` lookup is a Python call: there were nine a request)."""

    store: ConfigStore
    settings: Settings
    limiter: Limiter
    balancer: Balancer
    shared: sharedkeys.SharedKeys
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
            request.headers, snapshot, request.remote, services.shared, api.x_api_key
        )
        max_body = services.settings.max_body
        if deployment is None:  # /openai/v1/...: the deployment is the body's "model"
            body = await read_json_body(request, max_body)
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise BadRequest("The request body must name the deployment in 'model'")
            deployment = name
            plan = plan_for(principal, snapshot, deployment, memo)
        else:  # 404 and 403 before the body is read
            plan = plan_for(principal, snapshot, deployment, memo)
            body = await read_json_body(request, max_body)
        model = outcome.model = plan.model
        serving = model.serving.get(api.name)  # (refused here, 503 or 400, before limits count)
        if serving is None or "X-UPSTREAM-ID" in request.headers:
            serving = _serving(request, model, deployment, api)
        if api.ids is not None:
            ids = outcome.ids = api.ids(body, deployment, principal.project)
            if (route := ids.route(serving)) is not None:  # (the upstream that has the rest)
                serving = dataclasses.replace(serving, routes=(route,))
        shared = principal.shared
        held = (0, 0)  # the request's tokens and cost, held in its windows until settled
        if api.counted and (plan.records or (shared is not None and shared.tokens >= 0)):
            held = reservation(api, body, len(await request.read()), model)
        if shared is not None:  # its own cap first (its share held); then the owner's limits
            outcome.shared = shared
            if api.counted:
                outcome.shared_reserved = await services.shared.reserve(shared, held[0])
        extra_headers: list[tuple[str, str]] = []
        if plan.scopes and api.counted:
            if not plan.records:
                held = (0, 0)
            slot = uuid.uuid4().hex if plan.capped else ""  # (its slot, freed when it ends)
            request_state, token_state = await services.limiter.admit(plan.admission, *held, slot)
            outcome.scopes, outcome.records, outcome.reserved = plan.scopes, plan.records, held
            outcome.admitted = time.time()
            outcome.slot = slot
            if request_state is not None or token_state is not None:
                extra_headers = api.errors.ratelimit_headers(request_state, token_state)
        if services.metrics is not None and (held != (0, 0) or outcome.shared_reserved):
            outcome.holding = services.metrics.reserved()
        response = await _forward(
            request,
            services,
            snapshot,
            principal,
            model,
            api,
            body,
            outcome,
            extra_headers,
            serving,
        )
        if isinstance(response, _UpstreamStream):
            relay = _relay_stream(request, response, outcome, services)
            if await services.drain.relay(response, relay, api.shutdown_event):
                outcome.error = "stream ended: the server is shutting down"
                _stop_draining(outcome)  # no reading on when the process stops
        return response
    except Exception as e:  # (the route is not guarded: its errors are answered here)
        return refused(request, api, outcome, e)
    finally:
        if outcome.leftover is None:
            _settle(services, request, principal, deployment, outcome, started)
            if outcome.per_request_key is not None:
                _end_key(services, outcome.per_request_key)
        else:  # the client left a stream before its usage: read on for it, then settle
            settle = functools.partial(
                _settle, services, request, principal, deployment, outcome, started
            )
            _hold(services, _settle_after_drain(services, outcome, settle))


def refused(request: web.Request, api: Api, outcome: Outcome, error: Exception) -> web.Response:
    """The answer to what a request of ``api`` raised, in the API's shape, noted in the
    request's outcome (its log line)."""
    response, message = guard.refusal(request, error, api.errors.response)
    outcome.status, outcome.refusal = response.status, error
    if message is not None:
        outcome.error = message
    return response


def reservation(api: Api, body: dict[str, Any], size: int, model: Model) -> tuple[int, int]:
    """What a request holds in its token and cost windows from admission until it is
    settled: the prompt at one token per four bytes of its body, the completion at the most
    it asks for (the API's ``max_tokens`` field), else the model's ``maxCompletionTokens``,
    else :data:`DEFAULT_COMPLETION_RESERVE`; an embedding, none."""
    prompt = max(size // 4, 1)
    completion = 0
    if api.completion_fields:
        for name in api.completion_fields:
            value = body.get(name)
            if type(value) is int and value > 0:
                completion = value
                break
        else:
            most = model.token_limits.get("maxCompletionTokens")
            completion = most if type(most) is int and most > 0 else DEFAULT_COMPLETION_RESERVE
    pricing = model.pricing
    cost = pricing.cost_nano_usd(prompt, completion) if pricing is not None else 0
    return prompt + completion, cost


# The ledger's deployment of a request that named none the config has (any name a client
# sends would be a row of its own).
UNKNOWN_DEPLOYMENT = "(unknown)"

# The completion tokens a request reserves when it says no maximum and its model has no
# `limits.maxCompletionTokens`.
DEFAULT_COMPLETION_RESERVE = 256


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
    if outcome.usage is not None and outcome.status == 200:
        if holds or outcome.shared is not None or outcome.records or outcome.capacity:
            _record(services, outcome)
    elif holds or outcome.capacity is not None:  # nothing to charge: what it held given back
        outcome.usage = None
        _record(services, outcome)
    if services.ledger is not None and principal is not None:
        add_to_ledger(services.ledger, services.store.snapshot, principal, deployment, outcome)
    _log(services, request, principal, deployment, outcome, started)


def add_to_ledger(
    ledger: Ledger,
    snapshot: Snapshot,
    principal: Principal,
    deployment: str | None,
    outcome: Outcome,
) -> None:
    """A finished request in the usage ledger (in memory: written in batches)."""
    shared = principal.shared
    row = (principal.project, principal.fingerprint, shared.id if shared else "")
    name = deployment if deployment in snapshot.models else None
    ledger.add((*row, name or UNKNOWN_DEPLOYMENT, outcome.api), outcome)


async def _settle_after_drain(
    services: Services, outcome: Outcome, settle: Callable[[], None]
) -> None:
    try:
        await _drain(outcome, services.settings.stream_drain)
    finally:  # (settled and its key ended whatever became of the drain)
        settle()
        if outcome.per_request_key is not None:
            _end_key(services, outcome.per_request_key)


def _end_key(services: Services, key: str) -> None:
    """The request is over: its per-request key stops working here at once, and in Redis
    in the background (the answer does not wait for Redis)."""
    keys = services.shared.per_request
    if keys is not None and (work := keys.end(key)) is not None:
        hold(services.background, work)


def _hold(services: Services, work: Coroutine[Any, Any, None]) -> None:
    hold(services.background, work)


def hold(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    """Runs ``work`` in a task of its own, held in ``tasks`` (the app's: awaited when it
    stops)."""
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _record(services: Services, outcome: Outcome) -> None:
    """Settle a request in its counters: a 200's usage (also to the shared key that called)
    less what was reserved at admission, or (no usage) the reservation given back.  At once
    in process memory, else in a task of its own, held by the app, so that a client that
    disconnects cannot cut it off."""
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
        if limiter.local is not None:
            limiter.record_now(capacity.scopes, tokens - held, 0)
        else:
            _hold(services, limiter.settle(capacity.scopes, tokens - held, 0))
    if outcome.shared is None and limiter.local is not None:
        limiter.record_now(
            outcome.scopes, tokens - held_tokens, cost - held_cost, outcome.slot, outcome.admitted
        )
        return

    async def record() -> None:
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

    _hold(services, record())


def _log(
    services: Services,
    request: web.Request,
    principal: Principal | None,
    deployment: str | None,
    outcome: Outcome,
    started: float,
) -> None:
    usage = outcome.usage
    fields = {
        "method": request.method,
        "path": request.path,
        "status": outcome.status,
        "project": principal.key.project if principal else None,
        "key": principal.key.fingerprint if principal else None,
        "deployment": deployment,
        "upstream": outcome.upstream,
        "attempts": outcome.attempts,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        "ttfb_ms": outcome.ttfb_ms,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "error": outcome.error,
    }
    if principal is not None and principal.shared is not None:
        fields["shared_key"] = principal.shared.id
    if outcome.estimated:
        fields["usage"] = "estimated"
    elif usage is not None and usage.details:
        fields["usage_details"] = dict(usage.details)  # cached, reasoning tokens...
    services.log.line("request", fields)
    if services.metrics is not None or services.tracing is not None:
        _observe(services, principal, deployment, outcome, fields)


def begin(services: Services, request: web.Request, api: str) -> Outcome:
    """A request's outcome, to be filled; its start observed (in flight, its server span)."""
    outcome = Outcome(api=api)
    if services.metrics is not None:
        services.metrics.begin()
    if services.tracing is not None:
        outcome.span = services.tracing.request(request, api)
    return outcome


def _observe(
    services: Services,
    principal: Principal | None,
    deployment: str | None,
    outcome: Outcome,
    fields: dict[str, Any],
) -> None:
    """A request's end in the metrics and its spans (after its log line: ``fields``)."""
    usage, model, status = outcome.usage, outcome.model, outcome.status
    metrics, tracing = services.metrics, services.tracing
    if metrics is not None:
        counted = None
        if usage is not None and status == 200:
            counted = (usage.prompt_tokens, usage.completion_tokens)
        metrics.finish(
            outcome.api,
            principal,
            deployment,
            model,
            status,
            counted,
            outcome.refusal,
            outcome.holding,
        )
        if outcome.sent and model is not None and outcome.upstream is not None:
            metrics.served(model.name, outcome.upstream, time.perf_counter() - outcome.sent)
    if tracing is not None:
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


async def _forward(
    request: web.Request,
    services: Services,
    snapshot: Snapshot,
    principal: Principal,
    model: Model,
    api: Api,
    body: dict[str, Any],
    outcome: Outcome,
    extra_headers: list[tuple[str, str]],
    serving: Serving,
) -> web.StreamResponse:
    """Try the ``serving`` routes until one answers; return a complete response or a prepared
    stream.  ``extra_headers`` (the x-ratelimit ones) are added to the upstream's."""
    balancer, client = services.balancer, services.client
    assert client is not None
    raw = await request.read()  # (read already: the bytes as they came)
    payload, injected = api.body(body, raw, model)
    data = payload if payload is not None else raw
    outcome.request_bytes = len(data)
    query = request.rel_url.raw_query_string  # as the client wrote it: nothing decoded
    headers = forwarded_headers(
        request.headers, principal.secret, model, serving.default_headers, api.forwarded_headers
    )
    if not model.direct and (keys := services.shared.per_request) is not None:
        # an adapter gets a per-request key, never the client's (dialproxy.perrequest)
        outcome.per_request_key = headers[UPSTREAM_KEY] = await keys.mint(principal)
    headers["Accept-Encoding"] = "identity"  # (an encoded answer anyway is decoded: _respond)
    attempts = Attempts(
        balancer, model, snapshot.retriable_codes, services.metrics, services.tracing, outcome.span
    )
    if balancer.sharing:
        await balancer.refresh(model)
    estimate = 0  # the request's tokens, held in an upstream's capacity while it is served
    for route in balancer.plan(model, serving.routes):
        if outcome.attempts >= model.max_retry_attempts:
            break
        capacity = capacity_of(route.upstream, services.store.memo_for(snapshot))
        held = 0
        if capacity is not None:  # its own capacity first: at it, skipped like a paused one
            if not estimate:  # (worked out once, for the first upstream with a capacity)
                estimate = outcome.reserved[0] or reservation(api, body, len(raw), model)[0]
            held = estimate
            try:
                await services.limiter.admit(capacity, held)
            except RateLimited as full:
                attempts.at_capacity(full.retry_after)
                continue
        outcome.attempts += 1
        url = route.url
        if route.append_path:  # an `interfaces` base URL + the path the request came in on
            url += request.rel_url.raw_path
        if query:
            url += ("&" if "?" in url else "?") + query
        outcome.upstream = route.name
        sent = attempts.sending(route, headers)
        try:
            async with services.idle.headers():  # (the idle timeout until the headers)
                resp = await client.post(
                    url,
                    data=data,
                    headers={**headers, **route.headers} if route.headers else headers,
                    allow_redirects=False,  # the route's credentials go to its URL, nowhere else
                )
        except (aiohttp.ClientError, TimeoutError):
            await attempts.broke(route.upstream)
            await _give_back(services, capacity, held)
            continue
        except asyncio.CancelledError:  # the client left while the upstream was asked
            attempts.cancelled()
            raise
        if not await attempts.served(resp, route.upstream):
            await _give_back(services, capacity, held)
            continue
        if capacity is not None:
            outcome.capacity = (capacity, held)
        outcome.ttfb_ms = round((time.perf_counter() - sent) * 1000, 2)
        outcome.status, outcome.sent, outcome.attempt_span = resp.status, sent, attempts.span
        if outcome.ids is not None:
            outcome.ids.served_by(route, serving)
        return await _respond(resp, outcome, api, injected, extra_headers, services)
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


async def _give_back(services: Services, capacity: Admission | None, held: int) -> None:
    """An attempt that was not served gives its upstream's capacity the tokens it held
    back (its request stays counted: the upstream did get it)."""
    if capacity is not None and held:
        await services.limiter.settle(capacity.scopes, -held, 0)


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


async def _respond(
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    api: Api,
    injected: bool,
    extra_headers: list[tuple[str, str]],
    services: Services,
) -> web.StreamResponse:
    headers = response_headers(resp.headers, outcome.attempts, extra_headers)
    settings, ids = services.settings, outcome.ids
    if resp.content_type != "text/event-stream":
        data = await read_answer(resp, services.idle, settings.max_response)
        if resp.status == 200:
            outcome.usage = find_usage(data, api.usage)
        if ids is not None:  # (an error names a response by the id the client knows too)
            data = ids.body(data, None, resp.status < 300)
        return web.Response(status=resp.status, body=data, headers=headers)
    stream = _UpstreamStream(status=resp.status, headers=headers)
    stream.upstream = resp
    stream.stream_error = api.errors.stream_error
    max_event = settings.max_event
    stream.relay = (
        EventRewriter(ids.events, max_event, api.usage)
        if ids is not None
        else UsageHider(max_event)
        if injected
        else UsageScanner(max_event, api.usage)
    )
    return stream


async def read_answer(resp: aiohttp.ClientResponse, idle: IdleWatch, cap: int) -> bytes:
    """A non-streamed answer's body, decoded, read within the idle timeout and no further
    than ``cap`` bytes; the upstream response released.  502 past the cap or when the
    upstream breaks off (the connection closed)."""
    idle.watch(resp)
    try:
        # (encoded, its Content-Length is not the size read: the decoded bytes count)
        length = resp.content_length if "Content-Encoding" not in resp.headers else None
        if length is not None and length <= cap:
            return await resp.read()  # the usual answer: its length known, within the cap
        return await _read_bounded(resp, cap, length)
    except (aiohttp.ClientError, TimeoutError):
        resp.close()
        raise BadGateway("The upstream broke off its response") from None
    finally:
        idle.release(resp)
        resp.release()


async def _read_bounded(resp: aiohttp.ClientResponse, cap: int, length: int | None) -> bytes:
    """A non-streamed answer's body (decoded) of no known ``length`` (None), read chunk by
    chunk no further than ``cap`` bytes; over it (or a ``length`` over it): a 502 and the
    connection closed."""
    if length is None:
        parts: list[bytes] = []
        size = 0
        content = resp.content
        while chunk := await content.readany():
            size += len(chunk)
            if size > cap:
                break
            parts.append(chunk)
        else:
            return b"".join(parts)
    resp.close()
    raise BadGateway(f"The upstream's response is over the {cap}-byte limit")


class _UpstreamStream(web.StreamResponse):
    """A stream response still tied to the upstream response it relays."""

    upstream: aiohttp.ClientResponse
    relay: Relay  # what reads the stream (its usage) and gives what goes on to the client
    stream_error: Callable[[str, int], bytes]  # the API's error event


async def _relay_stream(
    request: web.Request, response: web.StreamResponse, outcome: Outcome, services: Services
) -> None:
    """Relays the upstream's stream as it comes.  A stream that is cut (the upstream breaks
    off, sends an event over the cap, or the client goes away) is still charged: what the
    upstream reports, else an estimate; a client gone before the usage came leaves the
    upstream in ``outcome.leftover`` to be drained for it."""
    assert isinstance(response, _UpstreamStream)
    upstream, idle, relay = response.upstream, services.idle, response.relay
    cut = client_gone = False
    idle.watch(upstream)
    try:
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if out := relay.feed(chunk):
                    await response.write(out)
            if rest := relay.flush():
                await response.write(rest)
        except (aiohttp.ClientError, TimeoutError) as e:
            cut = True
            outcome.error = f"upstream stream broke off: {type(e).__name__}"
            await response.write(response.stream_error("The upstream broke off the response", 502))
        except EventTooLarge as e:
            cut = True
            outcome.error = str(e)
            if e.relayed:  # the events that came before it
                await response.write(e.relayed)
            message = "The upstream sent an event too large to relay"
            await response.write(response.stream_error(message, 502))
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError) as e:
        outcome.error = "client disconnected"
        cut = client_gone = True
        if isinstance(e, asyncio.CancelledError):
            raise
    finally:
        idle.release(upstream)
        if upstream.status != 200:
            _let_go(upstream)
        elif client_gone and not relay.has_all_usage and not upstream.content.is_eof():
            outcome.leftover = (upstream, relay)  # drained for its usage after the answer
        else:
            _let_go(upstream)
            _charge(outcome, relay, cut)


def _let_go(upstream: aiohttp.ClientResponse) -> None:
    if upstream.content.is_eof():
        upstream.release()
    else:  # broken off, or the client went away: drop the upstream connection at once
        upstream.close()


def _charge(outcome: Outcome, relay: Relay, cut: bool) -> None:
    """The usage of a relayed 200 stream: what it reported; if it reported none, an
    estimate when it was cut, or when usage was asked for (a direct backend), and it
    relayed something.  A stream cut with part of its usage (Anthropic's prompt, from its
    first event) is charged that part and, for the rest, the estimate."""
    usage = outcome.usage = relay.usage
    if relay.events and (usage is None or (cut and not relay.has_all_usage)):
        model = outcome.model
        if cut or (model is not None and model.direct):
            guess = estimate(outcome.request_bytes, relay.events)
            if usage is not None:  # the prompt as reported; the completion as it came
                completion = max(usage.completion_tokens, guess.completion_tokens)
                total = usage.prompt_tokens + completion
                guess = Usage(usage.prompt_tokens, completion, total, usage.details)
            outcome.usage = guess
            outcome.estimated = True


def _stop_draining(outcome: Outcome) -> None:
    """A stream ended by the shutdown is charged what it reported, else the estimate, now."""
    if outcome.leftover is not None:
        upstream, relay = outcome.leftover
        outcome.leftover = None
        _let_go(upstream)
        _charge(outcome, relay, cut=True)


async def _drain(outcome: Outcome, seconds: float) -> None:
    """Reads what is left of an abandoned stream, for at most ``seconds``, to charge the
    usage the upstream reports at its end (else an estimate)."""
    assert outcome.leftover is not None
    upstream, relay = outcome.leftover
    try:
        async with asyncio.timeout(seconds):
            async for chunk in upstream.content.iter_any():
                relay.feed(chunk)
            relay.flush()
    except (aiohttp.ClientError, TimeoutError, EventTooLarge):
        pass
    finally:
        _let_go(upstream)
        outcome.leftover = None
    _charge(outcome, relay, cut=True)
