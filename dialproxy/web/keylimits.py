"""A key's limit windows as ``GET /v1/user/limits`` answers them: each model and
application it may call, with each limited window's limit, use and reset (the console
shows any key's the same way)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dialproxy.auth import Principal
from dialproxy.counting.limiter import WindowState
from dialproxy.text import iso
from dialproxy.web.appkeys import LIMITER, STORE


def callable_names(principal: Principal) -> list[str]:
    """Every deployment (model or application) the key may call."""
    key_models = principal.key.models
    return [name for name in principal.access.grants if key_models is None or name in key_models]


async def limits_of(app: web.Application, principal: Principal) -> dict[str, Any]:
    """What ``GET /v1/user/limits`` answers for ``principal`` (the console asks it for any
    key of the config)."""
    limiter = app[LIMITER]
    key = principal.key
    now = time.time()
    models: dict[str, Any] = {}
    for name in callable_names(principal):
        grant = principal.access.grants[name]
        own = key.key_limits.get(name) or key.key_limits.get("*")
        if grant.denied or (own is not None and own.denies):
            continue
        counted = [
            ("project", "p:" + principal.project, grant.token_windows, grant.request_windows)
        ]
        if own is not None:
            schedule = app[STORE].snapshot.schedule
            counted.append(
                (
                    "key",
                    "k:" + key.digest,
                    own.token_windows(schedule),
                    own.request_windows(schedule),
                )
            )
        windows: list[dict[str, Any]] = []
        for scope, owner, token_windows, request_windows in counted:
            for kind, unit, limited in (
                ("t", "tokens", token_windows),
                ("r", "requests", request_windows),
            ):
                limited = tuple(w for w in limited if w.limited)  # (the others: counted only)
                if limited:
                    states = await limiter.usage(owner, name, limited, kind)
                    windows += [window_stats(scope, unit, state, now) for state in states]
        models[name] = {"limits": windows}
    body: dict[str, Any] = {"project": principal.project, "key": key.fingerprint, "models": models}
    cost_windows = tuple(w for w in principal.access.cost_windows if w.limited)
    if cost_windows:  # USD across the project's priced models
        body["cost"] = [
            window_stats("project", "USD", state, now)
            | {
                "limit": state.window.limit / 1e9,
                "used": state.used / 1e9,
                "remaining": state.remaining / 1e9,
            }
            for state in await limiter.cost_usage("p:" + principal.project, cost_windows)
        ]
    if principal.shared is not None:
        shared = principal.shared
        body["sharedKey"] = shared.public(principal.project) | {
            "remaining": None if shared.tokens < 0 else max(shared.tokens - shared.utilized, 0),
            "capReached": shared.capped,
        }
    return body


def window_stats(scope: str, unit: str, state: WindowState, now: float) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "scope": scope,
        "type": unit,
        "window": state.window.name,
        "limit": state.window.limit,
        "used": state.used,
        "remaining": state.remaining,
    }
    calendar = state.window.calendar
    if calendar is not None:  # (a calendar window resets at its period's end, used or not)
        end = calendar.period(now)[1]
        stats["resetSeconds"] = round(end - now, 3)
        stats["resetAt"] = calendar.schedule.resets_at(end)
    elif state.used > 0:
        stats["resetSeconds"] = round(state.reset, 3)
        stats["resetAt"] = iso(datetime.fromtimestamp(now + state.reset, UTC))
    else:
        stats["resetSeconds"], stats["resetAt"] = 0, None
    return stats
