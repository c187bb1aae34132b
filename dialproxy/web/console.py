"""The console: the ``/console`` page (static files in ``dialproxy/console/``, no build step)
and the read-only data endpoints it draws, all routed here (:func:`routes`).

The page is plain HTML, CSS and JavaScript modules served by the proxy itself under a strict
``Content-Security-Policy`` (nothing loads from elsewhere).  Its login is the API key, kept
in the tab's ``sessionStorage`` and sent as ``Api-Key`` (no cookie: nothing a cross-site
request could ride on).  It writes only through the admin API (:mod:`dialproxy.web.admin`)
and the key holder's ``/v1/sharedkeys``; what it reads beyond those comes from here:

- ``GET /v1/console/me``: who the key is and what the page shows it (any key);
- ``GET /v1/console/overview``: config generation and last refusal, storage health, the
  ledger's requests and tokens of this hour and the last 24 h (hourly), top projects and
  models, limit utilisation (admin or viewer);
- ``GET /v1/console/models``: each deployment's upstreams with their state and pricing;
- ``GET /v1/console/usage[?from=&to=&by=project|key|model&format=csv]``: the ledger by day;
- ``GET /v1/console/keys/{fingerprint}``: a key's windows (limit, used, resets), its
  shared keys and its usage today.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from dialproxy import ledger
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Key, Model, Snapshot, Window
from dialproxy.errors import BadRequest, Conflict, NotFound
from dialproxy.ledger import HOUR, MEASURES
from dialproxy.sharedkeys.redisstore import RedisSharedKeyStore
from dialproxy.text import iso
from dialproxy.upstream.outbound import capacity_of
from dialproxy.web import usage
from dialproxy.web.admin import _caller
from dialproxy.web.appkeys import BALANCER, LEDGER, LIMITER, SETTINGS, SHARED, STORE
from dialproxy.web.guard import guarded, json_response
from dialproxy.web.keylimits import limits_of

STATIC = Path(__file__).resolve().parent.parent / "console"
TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# Every answer of the page: nothing but the proxy's own files, never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
TOP = 5  # projects and models the overview ranks
UTILISATION = 10  # the fullest limit windows the overview shows
USAGE_GROUPS = {"project": "project", "key": "key", "model": "deployment"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- the page's files ------------------------------------------------------------------------


def _files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once (only these are ever served)."""
    found: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC.iterdir()):
        kind = TYPES.get(path.suffix)
        if kind is not None and path.is_file():
            found[path.name] = (path.read_bytes(), kind)
    return found


def _page(files: dict[str, tuple[bytes, str]]) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            raise NotFound(f"No console file {name[:64]}")
        body, kind = found
        charset = "utf-8" if kind != "image/svg+xml" else None
        return web.Response(body=body, content_type=kind, charset=charset, headers=PAGE_HEADERS)

    return serve


# --- who calls ---------------------------------------------------------------------------------


async def _principal(request: web.Request) -> Principal:
    app = request.app
    return await authenticate(request.headers, app[STORE].snapshot, request.remote, app[SHARED])


async def me(request: web.Request) -> web.Response:
    """``GET /v1/console/me``: the calling key and what the page shows it: ``admin``
    (everything), ``viewer`` (everything, no write) or ``key`` (its own key only)."""
    principal = await _principal(request)
    settings = request.app[SETTINGS]
    roles = set(principal.key.roles)
    own = principal.shared is None and not principal.per_request
    level = "key"
    if own and settings.admin_role in roles:
        level = "admin"
    elif own and settings.viewer_role in roles:
        level = "viewer"
    key = principal.key
    return json_response(
        {
            "level": level,
            "fingerprint": key.fingerprint,
            "name": principal.shared.name if principal.shared is not None else key.name,
            "project": principal.project,
            "roles": list(key.roles),
            "canShare": own and key.can_share,
            "shared": principal.shared is not None,
            "ledger": request.app.get(LEDGER) is not None,
        }
    )


# --- the overview ------------------------------------------------------------------------------


def _measures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": row["requests"],
        "errors": row["errors"],
        "promptTokens": row["prompt_tokens"],
        "completionTokens": row["completion_tokens"],
        "totalTokens": row["total_tokens"],
        "cost": row["cost_nano_usd"] / 1e9,
    }


def _sum(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """``rows`` summed by one of their columns, the most tokens (then requests) first."""
    sums: dict[str, dict[str, Any]] = {}
    for row in rows:
        into = sums.setdefault(row[by], dict.fromkeys(MEASURES, 0))
        for m in MEASURES:
            into[m] += row[m]
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1]["total_tokens"], -kv[1]["requests"]))
    return [{"name": name} | _measures(totals) for name, totals in ranked]


def _project_key(snapshot: Snapshot, project: str) -> Key | None:
    """A key of ``project`` (the first in the config): whose roles say its limits."""
    for key in snapshot.keys.values():
        if key.project == project:
            return key
    return None


async def _utilisation(request: web.Request, used: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fullest limited windows of the projects and models that ``used`` (the last day's
    rows by project and deployment) names: used / limit, as the limiter counts them now."""
    snapshot = request.app[STORE].snapshot
    limiter = request.app[LIMITER]
    bars: list[dict[str, Any]] = []
    pairs = sorted({(r["project"], r["deployment"]) for r in used})
    for project, deployment in pairs[: TOP * 4]:
        key = _project_key(snapshot, project)
        grant = key.access.grants.get(deployment) if key is not None else None
        if grant is None or grant.denied:
            continue
        for kind, unit, windows in (
            ("t", "tokens", grant.token_windows),
            ("r", "requests", grant.request_windows),
        ):
            limited: tuple[Window, ...] = tuple(w for w in windows if w.limited)
            if not limited:
                continue
            for state in await limiter.usage("p:" + project, deployment, limited, kind):
                bars.append(
                    {
                        "project": project,
                        "model": deployment,
                        "window": state.window.name,
                        "type": unit,
                        "used": state.used,
                        "limit": state.window.limit,
                        "share": round(min(state.used / state.window.limit, 1.0), 4)
                        if state.window.limit
                        else 1.0,
                    }
                )
    bars.sort(key=lambda b: -b["share"])
    return bars[:UTILISATION]


async def overview(request: web.Request) -> web.Response:
    """``GET /v1/console/overview``."""
    await _caller(request, write=False)
    app = request.app
    store = app[STORE]
    snapshot = store.snapshot
    shared = app[SHARED]
    health = shared.health
    body: dict[str, Any] = {
        "config": store.health()
        | {
            "reloadsApplied": store.reloads_applied,
            "reloadsRefused": store.reloads_refused,
            "files": [str(p) for p in store.paths],
            "models": sum(1 for m in snapshot.models.values() if m.kind == "model"),
            "applications": sum(1 for m in snapshot.models.values() if m.kind != "model"),
            "keys": len(snapshot.keys),
            "roles": len(snapshot.roles),
            "warnings": [p.as_dict() for p in snapshot.warnings],
        },
        "storage": app[LIMITER].health(),
        "sharedKeys": {
            "store": "redis" if isinstance(shared.store, RedisSharedKeyStore) else "sqlite",
            "healthy": health.healthy if health is not None else True,
        },
        "ledger": None,
    }
    found = app.get(LEDGER)
    if found is not None:
        now = found.clock()
        hour = int(now) // HOUR * HOUR
        first = hour - 23 * HOUR
        rows = await found.rows(first, now + 1, ("hour", "project", "deployment"))
        by_hour = {h: dict.fromkeys(MEASURES, 0) for h in range(first, hour + 1, HOUR)}
        for row in rows:
            into = by_hour.get(row["hour"])
            if into is not None:
                for m in MEASURES:
                    into[m] += row[m]
        day = {m: sum(r[m] for r in rows) for m in MEASURES}
        body["ledger"] = found.health()
        body["usage"] = {
            "hour": _measures(by_hour[hour]),
            "day": _measures(day),
            "series": [
                {"hour": iso(datetime.fromtimestamp(h, UTC))} | _measures(totals)
                for h, totals in by_hour.items()
            ],
            "topProjects": _sum(rows, "project")[:TOP],
            "topModels": _sum(rows, "deployment")[:TOP],
        }
        body["utilisation"] = await _utilisation(request, rows)
    return json_response(body)


# --- models --------------------------------------------------------------------------------------


def _shown_url(url: str) -> str:
    """An upstream URL without what may hold a credential (user info, query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


async def _model(request: web.Request, model: Model) -> dict[str, Any]:
    app = request.app
    balancer, limiter = app[BALANCER], app[LIMITER]
    memo = app[STORE].memo_for(app[STORE].snapshot)
    upstreams = []
    for route in model.routes:
        upstream = route.upstream
        state, left, failures = balancer.status(model, upstream)
        entry: dict[str, Any] = {
            "id": upstream.id,
            "name": route.name,
            "url": _shown_url(route.url),
            "tier": upstream.tier,
            "weight": upstream.weight,
            "state": state,
            "retryIn": round(left, 1),
            "failures": failures,
            "capacity": None,
        }
        capacity = capacity_of(upstream, memo)
        if capacity is not None:
            scope = capacity.scopes[0]
            windows: list[dict[str, Any]] = []
            for kind, unit, limited in (
                ("t", "tokens", scope.token_windows),
                ("r", "requests", scope.request_windows),
            ):
                if limited:
                    for w in await limiter.usage(scope.owner, scope.model, limited, kind):
                        windows.append(
                            {
                                "type": unit,
                                "window": w.window.name,
                                "limit": w.window.limit,
                                "used": w.used,
                            }
                        )
            entry["capacity"] = windows
            if state == "ok" and any(w["used"] >= w["limit"] for w in windows):
                entry["state"] = "at capacity"
        upstreams.append(entry)
    pricing = model.pricing
    return {
        "name": model.name,
        "kind": model.kind,
        "type": model.type,
        "displayName": model.display_name,
        "description": model.description,
        "pricing": None
        if pricing is None
        else {
            "unit": pricing.unit,
            "prompt": str(pricing.prompt),
            "completion": str(pricing.completion),
        },
        "upstreams": upstreams,
    }


async def models(request: web.Request) -> web.Response:
    """``GET /v1/console/models``: every model and application, its upstreams with their
    state (``ok``, ``paused`` after a 429, ``backed off`` after failures, ``at capacity``:
    its own ``limits`` used up) and its pricing."""
    await _caller(request, write=False)
    snapshot = request.app[STORE].snapshot
    listed = [await _model(request, m) for m in snapshot.models.values()]
    return json_response({"models": listed})


# --- usage -------------------------------------------------------------------------------------


def _ledger(request: web.Request) -> ledger.Ledger:
    found = request.app.get(LEDGER)
    if found is None:
        raise NotFound("The usage ledger is off (dialproxy serve --ledger on)")
    return found


async def usage_rows(request: web.Request) -> web.StreamResponse:
    """``GET /v1/console/usage``: the ledger by day and ``by`` (``project``, ``key`` or
    ``model``) over ``from``..``to`` (default: the trailing 30 days); ``project`` and
    ``key`` (a fingerprint) filter; ``format=csv`` for the export."""
    await _caller(request, write=False)
    found = _ledger(request)
    query = request.query
    by = query.get("by", "project")
    if by not in USAGE_GROUPS:
        raise BadRequest("'by' must be project, key or model")
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("'format' must be json or csv")
    start, end = usage.query_range(request, found.clock())
    group = ("day", USAGE_GROUPS[by])
    rows = await found.rows(
        start, end, group, project=query.get("project") or None,
        key=query.get("key", "").lower() or None,  # (a fingerprint: hex, any case)
    )  # fmt: skip
    rows.sort(key=lambda r: (-r["day"], -r["total_tokens"], str(r[group[1]])))
    span = (
        iso(datetime.fromtimestamp(start, UTC)),
        iso(datetime.fromtimestamp(end, UTC)),
    )
    if fmt == "csv":
        name = f"dialproxy-usage-{by}-{span[0][:10]}-{span[1][:10]}.csv"
        return web.Response(
            text=ledger.render(rows, group, "csv"),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    names = {k.fingerprint: k.name for k in request.app[STORE].snapshot.keys.values()}
    listed = []
    for row in rows:
        entry = {
            "day": time.strftime("%Y-%m-%d", time.gmtime(row["day"])),
            by: row[group[1]],
        } | _measures(row)
        if by == "key":
            entry["keyName"] = names.get(row["key"])
        listed.append(entry)
    totals = {m: sum(r[m] for r in rows) for m in MEASURES}
    return json_response(
        {"from": span[0], "to": span[1], "by": by, "rows": listed, "total": _measures(totals)}
    )


# --- one key -----------------------------------------------------------------------------------


def _key(snapshot: Snapshot, fingerprint: str) -> Key:
    fingerprint = fingerprint.lower()  # (hex: any case, as the admin API takes it)
    found = [k for k in snapshot.keys.values() if k.fingerprint == fingerprint]
    if not found:
        raise NotFound(f"No key with fingerprint {fingerprint[:64]} is served")
    if len(found) > 1:
        raise Conflict(f"Several keys have the fingerprint {fingerprint[:64]}")
    return found[0]


async def key_detail(request: web.Request) -> web.Response:
    """``GET /v1/console/keys/{fingerprint}``: the served key's windows (as
    ``/v1/user/limits`` answers its holder), its shared keys and its usage today."""
    await _caller(request, write=False)
    app = request.app
    key = _key(app[STORE].snapshot, request.match_info["fingerprint"])
    limits = await limits_of(app, Principal(key, ""))
    shared = None
    if key.can_share:
        listed = await app[SHARED].store.list(key.digest)
        listed.sort(key=lambda k: (k.created_at or datetime.min.replace(tzinfo=UTC), k.id))
        shared = [k.public(key.project) for k in listed]
    today = None
    if (found := app.get(LEDGER)) is not None:
        now = found.clock()
        start = app[STORE].snapshot.schedule.calendars["day"].period(now)[0]
        rows = await found.rows(start, now + 1, (), project=key.project, key=key.fingerprint)
        today = _measures(rows[0])
    return json_response(
        {
            "fingerprint": key.fingerprint,
            "name": key.name,
            "project": key.project,
            "state": key.state(datetime.now(UTC)),
            "models": limits["models"],
            "cost": limits.get("cost"),
            "sharedKeys": shared,
            "today": today,
        }
    )


def routes(app: web.Application) -> None:
    """The page and its data endpoints (before the catch-all DIAL routes)."""
    page = _page(_files())
    app.router.add_get("/console", guarded(page))
    app.router.add_get("/console/", guarded(page))
    app.router.add_get("/console/{name}", guarded(page))
    for path, handler in (
        ("/v1/console/me", me),
        ("/v1/console/overview", overview),
        ("/v1/console/models", models),
        ("/v1/console/usage", usage_rows),
        ("/v1/console/keys/{fingerprint}", key_detail),
    ):
        app.router.add_get(path, guarded(handler))
