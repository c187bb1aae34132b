"""The end of a request, for every handler of the request path (:mod:`dialproxy.web.proxy`,
:mod:`dialproxy.web.responses`; :func:`hold` for the others too): its start observed
(:func:`begin`), what it raised answered (:func:`refused`), the charge of a request its
client left (:func:`abandoned`), then :func:`settle`: its usage recorded in the counters
(:func:`record`), the usage ledger's row (:func:`add_to_ledger`), one log line with its
metrics and spans (:func:`log_line`); a stream the client left is read on for its usage
first (:func:`settle_after_drain`), and a per-request key ends with it (:func:`end_key`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from dialproxy.apis import Api
from dialproxy.auth import Principal
from dialproxy.config.model import Snapshot
from dialproxy.ledger import Ledger
from dialproxy.outcome import Outcome
from dialproxy.tracing import Tracing
from dialproxy.upstream.answer import drain
from dialproxy.web import guard
from dialproxy.web.charged import responses_redis
from dialproxy.web.services import Services
from dialproxy.wire.usage import MAX_TOKENS, estimate


def begin(services: Services, request: web.Request, api: str) -> Outcome:
    """A request's outcome, to be filled; its start observed (in flight, its server span)."""
    outcome = Outcome(api=api)
    if services.metrics is not None:
        services.metrics.begin()
    if services.tracing is not None:
        outcome.span = services.tracing.request(request, api)
    return outcome


# The log line's error of a request whose client left before the answer (status 499).
CLIENT_GONE = "the client went away before the answer"


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
    outcome.error = CLIENT_GONE


def refused(request: web.Request, api: Api, outcome: Outcome, error: Exception) -> web.Response:
    """The answer to what a request of ``api`` raised, in the API's shape, noted in the
    request's outcome (its log line)."""
    response, message = guard.refusal(request, error, api.errors.response)
    outcome.status, outcome.refusal = response.status, error
    if message is not None:
        outcome.error = message
    return response


def settle(
    services: Services,
    request: web.Request,
    principal: Principal | None,
    deployment: str | None,
    outcome: Outcome,
    started: float,
) -> None:
    """The request's usage recorded (its reservation settled), added to the usage ledger,
    its log line written."""
    disbelieve(outcome)
    if outcome.estimated and outcome.ids is not None and outcome.ids.charged_once is not None:
        # a background response whose stream was cut: its follow-up charges what it used
        # (an estimate here too would charge it twice), as for one created without a stream
        outcome.usage, outcome.estimated = None, False
    holds = outcome.reserved != (0, 0) or outcome.slot or outcome.shared_reserved
    if outcome.usage is not None and (outcome.status == 200 or outcome.estimated):
        if holds or outcome.shared is not None or outcome.records or outcome.capacity:
            record(services, outcome)
        if outcome.ids is not None and not outcome.estimated:
            once = outcome.ids.charged_once  # (a background response its stream brought)
            if once is not None:  # charged now: not again when a follow-up sees it
                hold(services.background, _charged(services, once))
    elif holds or outcome.capacity is not None:  # nothing to charge: what it held given back
        outcome.usage = None
        record(services, outcome)
    if services.ledger is not None and principal is not None:
        add_to_ledger(services.ledger, services.store.snapshot, principal, deployment, outcome)
    log_line(services, request, principal, deployment, outcome, started)


def disbelieve(outcome: Outcome) -> None:
    """An upstream's usage with a count past :data:`MAX_TOKENS` is not believed: no usage
    (the log line says why), as a count that is no count."""
    usage = outcome.usage
    if usage is not None and (
        usage.total_tokens > MAX_TOKENS
        or usage.prompt_tokens > MAX_TOKENS
        or usage.completion_tokens > MAX_TOKENS
    ):
        outcome.usage = None
        if outcome.error is None:
            outcome.error = f"the upstream's usage is over {MAX_TOKENS:,} tokens: not counted"


async def _charged(services: Services, response_id: str) -> None:
    await services.charged.first(response_id, responses_redis(services.shared.per_request))


async def settle_after_drain(
    services: Services, outcome: Outcome, then: Callable[[], None]
) -> None:
    """A stream its client left before its usage, read on for it (at most the
    ``stream_drain`` time); ``then``: its settlement."""
    try:
        await drain(outcome, services.settings.stream_drain)
    finally:  # (settled and its key ended whatever became of the drain)
        then()
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
        capacity, held, where = outcome.capacity
        outcome.capacity = None
        if (work := limiter.settle_soon(capacity.scopes, tokens - held, 0, held=where)) is not None:
            hold(services.background, work)
    if outcome.shared is None:  # no coroutine: in memory at once, on Redis in its batch
        amounts = (outcome.scopes, tokens - held_tokens, cost - held_cost, outcome.slot)
        if limiter.local is not None:
            limiter.record_now(*amounts, outcome.admitted)
            return
        if (work := limiter.settle_soon(*amounts, outcome.admitted, outcome.held)) is not None:
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
                outcome.held,
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


async def held_done(tasks: set[asyncio.Task[None]]) -> None:
    """Waits until ``tasks`` is empty: for the tasks held, and for those they hold in turn
    (a stream's drain ends in its settlement's task)."""
    while tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


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
