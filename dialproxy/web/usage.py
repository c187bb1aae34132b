"""DIAL's usage endpoints on the usage ledger (:mod:`dialproxy.ledger`).

``GET /v1/user/usage`` and ``GET /v1/deployments/{id}/usage`` answer in DIAL's shape (DIAL
Core issue 1799, PR 1808: ``deployments`` keyed by id, each with its ``*TokenStats``,
``*RequestStats`` and ``*CostStats`` of ``{"total", "used"}``, ``total`` the limit or
Java's Long.MAX_VALUE; all-zero deployments dropped), their ``used`` read from the ledger
for the current period of each window (the hour; the day, week and month of the config's
``rateLimitSchedule``).  Ours beside DIAL's: ``from``/``to`` query parameters (ISO dates or
date-times; by default the trailing 30 days) and ``usage``: requests, errors, tokens and
cost (USD) in that range; ``scope=key`` for the calling key's own usage (default: its
project's, as the limits count it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import LONG_MAX, Window
from dialproxy.errors import BadRequest, NotFound
from dialproxy.ledger import DAY, HOUR, MEASURES, Ledger
from dialproxy.logs import cut
from dialproxy.text import iso, parse_datetime, timestamp
from dialproxy.web.appkeys import LEDGER, SHARED, STORE
from dialproxy.web.guard import guarded, json_response
from dialproxy.web.plan import resolve

DEFAULT_DAYS = 30  # DIAL's /v1/user/usage: what was used in the trailing 30 days
# DIAL's stats the ledger can tell (it has hours: no minute), window name -> period length.
TOKEN_WINDOWS = ("day", "week", "month")
REQUEST_WINDOWS = ("hour", "day")
COST_WINDOWS = ("day", "week", "month")


def _ledger(request: web.Request) -> Ledger:
    ledger = request.app.get(LEDGER)
    if ledger is None:
        raise NotFound("The usage ledger is off (dialproxy serve --ledger on)")
    return ledger


def _once(request: web.Request, name: str) -> str | None:
    """The query parameter ``name``; a 400 when it is given twice (which one was meant?)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"'{name}' is given {len(values)} times: give it once")
    return values[0] if values else None


def _when(request: web.Request, name: str, end_of_day: bool) -> float | None:
    value = _once(request, name)
    if value is None or not value.strip():
        return None
    try:
        parse_datetime(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 date or date-time") from None
    try:
        return timestamp(value, end_of_day)  # (a date: to its end)
    except ValueError:  # (a date-time, out of the range a bound may name)
        raise BadRequest(
            f"'{name}' must be from 1970-01-01 to 9998-12-31 (got {cut(value, 40)})"
        ) from None


def query_range(request: web.Request, now: float) -> tuple[float, float]:
    """``from`` (its hour) to before ``to`` (a date: its whole day); by default the
    trailing 30 days up to now."""
    end = _when(request, "to", end_of_day=True)
    end = now if end is None else end
    start = _when(request, "from", end_of_day=False)
    start = end - DEFAULT_DAYS * DAY if start is None else start
    if start >= end:
        raise BadRequest("'from' must be before 'to'")
    return start, end


def _filters(request: web.Request, principal: Principal) -> dict[str, str | None]:
    """Whose usage: the caller's project (``scope=project``, the default), or its own key
    (``scope=key``: a shared key's own id, for a shared key)."""
    scope = _once(request, "scope") or "project"
    if scope == "project":
        return {"project": principal.project, "key": None, "shared_key": None}
    if scope == "key":
        shared = principal.shared
        if shared is not None:
            return {"project": principal.project, "key": None, "shared_key": shared.id}
        return {"project": principal.project, "key": principal.fingerprint, "shared_key": None}
    raise BadRequest("'scope' must be project or key")


def _periods(request: web.Request, now: float) -> dict[str, tuple[int, int]]:
    """The current period of each window DIAL reports (hour-aligned: the ledger's rows)."""
    schedule = request.app[STORE].snapshot.schedule
    hour = int(now) // HOUR * HOUR
    periods = {"hour": (hour, hour + HOUR)}
    for name in ("day", "week", "month"):
        start, end = schedule.calendars[name].period(now)
        periods[name] = (start // HOUR * HOUR, end)
    return periods


def _total(windows: tuple[Window, ...], name: str, scale: float = 1) -> int | float:
    for window in windows:
        if window.name == name and window.limited:
            return window.limit / scale if scale != 1 else window.limit
    return LONG_MAX


def _usage(totals: dict[str, int]) -> dict[str, Any]:
    return {
        "requests": totals["requests"],
        "errors": totals["errors"],
        "promptTokens": totals["prompt_tokens"],
        "completionTokens": totals["completion_tokens"],
        "totalTokens": totals["total_tokens"],
        "cost": totals["cost_nano_usd"] / 1e9,
    }


def _sum(rows: list[dict[str, Any]], start: int, end: int, measure: str) -> int:
    return sum(r[measure] for r in rows if start <= r["hour"] < end)


def _stats(
    hours: list[dict[str, Any]],
    periods: dict[str, tuple[int, int]],
    token_windows: tuple[Window, ...],
    request_windows: tuple[Window, ...],
) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for name in TOKEN_WINDOWS:
        used = _sum(hours, *periods[name], "total_tokens")
        stats[f"{name}TokenStats"] = {"total": _total(token_windows, name), "used": used}
    for name in REQUEST_WINDOWS:
        used = _sum(hours, *periods[name], "requests")
        stats[f"{name}RequestStats"] = {"total": _total(request_windows, name), "used": used}
    return stats


def _cost_stats(
    hours: list[dict[str, Any]], periods: dict[str, tuple[int, int]], windows: tuple[Window, ...]
) -> dict[str, Any]:
    return {
        f"{name}CostStats": {
            "total": _total(windows, name, 1e9),
            "used": _sum(hours, *periods[name], "cost_nano_usd") / 1e9,
        }
        for name in COST_WINDOWS
    }


async def _read(
    request: web.Request, principal: Principal, deployment: str | None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The range's rows by deployment, the current periods' rows by deployment and hour,
    the periods, and the answer's head."""
    ledger = _ledger(request)
    now = ledger.clock()
    start, end = query_range(request, now)
    filters = _filters(request, principal)
    periods = _periods(request, now)
    earliest = min(start for start, _ in periods.values())
    found = await ledger.rows(start, end, ("deployment",), deployment=deployment, **filters)
    hours = await ledger.rows(
        earliest, now + HOUR, ("deployment", "hour"), deployment=deployment, **filters
    )
    head: dict[str, Any] = {
        "project": principal.project,
        "scope": request.query.get("scope", "project"),
        "from": iso(datetime.fromtimestamp(start, UTC)),
        "to": iso(datetime.fromtimestamp(end, UTC)),
    }
    return head, found, hours, periods


async def user_usage(request: web.Request) -> web.Response:
    """``GET /v1/user/usage[?from=&to=&scope=project|key]``."""
    principal = await _principal(request)
    head, found, hours, periods = await _read(request, principal, None)
    grants = principal.access.grants
    in_range = {r["deployment"]: r for r in found}
    names = sorted(set(in_range) | {r["deployment"] for r in hours})
    deployments: dict[str, Any] = {}
    for name in names:
        own = [r for r in hours if r["deployment"] == name]
        grant = grants.get(name)
        entry = _stats(
            own,
            periods,
            grant.token_windows if grant is not None else (),
            grant.request_windows if grant is not None else (),
        )
        entry |= _cost_stats(own, periods, principal.access.cost_windows)
        if (totals := in_range.get(name)) is not None:
            entry["usage"] = _usage(totals)
        used = any(s["used"] for s in entry.values() if "used" in s)
        if not used and (totals is None or not totals["requests"]):  # (DIAL drops them)
            continue
        deployments[name] = entry
    body = head | {"deployments": deployments}
    body |= _cost_stats(hours, periods, principal.access.cost_windows)
    totals = {m: sum(r[m] for r in found) for m in MEASURES}
    body["usage"] = _usage(totals)
    return json_response(body)


async def deployment_usage(request: web.Request) -> web.Response:
    """``GET /v1/deployments/{id}/usage[?from=&to=&scope=project|key]``: one deployment the
    caller may call (404, 403 as its limits)."""
    principal = await _principal(request)
    deployment = request.match_info["id"]
    grant = resolve(principal, request.app[STORE].snapshot, deployment)
    head, found, hours, periods = await _read(request, principal, deployment)
    body = head | _stats(hours, periods, grant.token_windows, grant.request_windows)
    body |= _cost_stats(hours, periods, principal.access.cost_windows)
    totals = {m: sum(r[m] for r in found) for m in MEASURES}
    body["usage"] = _usage(totals)
    return json_response(body)


async def _principal(request: web.Request) -> Principal:
    app = request.app
    return await authenticate(request.headers, app[STORE].snapshot, request.remote, app[SHARED])


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/user/usage", guarded(user_usage))
    app.router.add_get("/v1/deployments/{id}/usage", guarded(deployment_usage))
