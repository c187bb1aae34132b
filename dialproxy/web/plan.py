"""What a key's requests to one deployment need (:class:`Plan`): the deployment (404), the
key's right to it (403), the counters it is charged to; worked out once per key and
deployment and snapshot (:func:`plan_for`, memoised), read by every handler that serves a
deployment (the proxied requests, the Responses follow-ups, the feature endpoints) and by
the listings and limits endpoints (:func:`resolve`)."""

from __future__ import annotations

from typing import NamedTuple

from dialproxy.auth import Principal
from dialproxy.config.model import Grant, Model, Snapshot
from dialproxy.config.store import Memo
from dialproxy.counting.limiter import Admission, Scope
from dialproxy.errors import Forbidden, NotFound
from dialproxy.logs import cut


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
