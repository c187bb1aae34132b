"""DIAL's ``routes``: custom paths the proxy serves, checked and compiled once per snapshot.

A route (DIAL Core's ``Route``) answers requests whose path fully matches one of its
``paths`` (regular expressions) with one of its ``methods`` (none: any), in ``order`` (lower
first, ties in config order): with its canned ``response``, or by forwarding the request to
its ``upstreams``.  Its upstreams are held as a :class:`Model` (named as the route) so that
the balancer plans over them as over a model's, and role limits resolve as for a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from dialproxy.config.model import DialRoute, Model, Severity, Upstream

# DIAL's Route.order default (Integer.MAX_VALUE) and maxRetryAttempts default.
DEFAULT_ORDER = 2**31 - 1
DEFAULT_MAX_RETRY_ATTEMPTS = 1


def _roles(raw: Mapping[str, Any]) -> frozenset[str] | None:
    roles = raw.get("userRoles", raw.get("user_roles"))
    return None if roles is None else frozenset(r for r in roles if isinstance(r, str))


def build_routes(section: Any) -> tuple[DialRoute, ...]:
    """The config's ``routes`` (already checked by :func:`route_problems`), sorted by
    ``order`` (stable: ties keep the config's order, as DIAL's sort does)."""
    if not isinstance(section, dict):
        return ()
    built: list[DialRoute] = []
    for name, raw in section.items():
        if not isinstance(raw, dict):
            continue
        upstreams = tuple(
            Upstream.of(u)
            for u in raw.get("upstreams") or ()
            if isinstance(u, dict) and _served_url(u.get("endpoint"))
        )
        response = raw.get("response")
        built.append(
            DialRoute(
                name=name,
                patterns=tuple(re.compile(p) for p in raw.get("paths") or ()),
                methods=frozenset(m.upper() for m in raw.get("methods") or ()),
                user_roles=_roles(raw),
                rewrite_path=bool(raw.get("rewritePath", False)),
                response=(
                    (int(response.get("status", 200)), str(response.get("body", "")).encode())
                    if isinstance(response, dict)
                    else None
                ),
                order=int(raw.get("order", DEFAULT_ORDER)),
                model=Model(
                    name=name,
                    type="chat",
                    endpoint=None,
                    upstreams=upstreams,
                    user_roles=_roles(raw),
                    max_retry_attempts=int(raw.get("maxRetryAttempts", DEFAULT_MAX_RETRY_ATTEMPTS)),
                ),
            )
        )
    built.sort(key=lambda r: r.order)
    return tuple(built)


def _served_url(url: Any) -> bool:
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


def route_problems(section: Any) -> Iterator[tuple[list[str | int], str, Severity]]:
    """What the schema cannot say about ``routes``: ``(JSON path parts, message, severity)``.
    A path that is not a regular expression is an error; a WebSocket upstream (``ws://``,
    ``wss://``), which dialproxy does not proxy, a warning."""
    if not isinstance(section, dict):
        return
    for name, raw in section.items():
        if not isinstance(raw, dict):
            continue
        for i, path in enumerate(_items(raw.get("paths"))):
            if not isinstance(path, str):
                continue
            try:
                re.compile(path)
            except re.error as e:
                message = f"not a valid regular expression: {e}"
                yield (["routes", name, "paths", i], message, "error")
        if "userRoles" in raw and "user_roles" in raw:
            yield (
                ["routes", name, "user_roles"],
                "`user_roles` is an alias of `userRoles`, which is also set: keep one",
                "error",
            )
        for i, upstream in enumerate(_items(raw.get("upstreams"))):
            if not isinstance(upstream, dict):
                continue
            url = upstream.get("endpoint")
            if isinstance(url, str) and not _served_url(url):
                yield (
                    ["routes", name, "upstreams", i, "endpoint"],
                    "not an http(s) URL: dialproxy does not proxy WebSocket routes, this "
                    "upstream is not used",
                    "warning",
                )
        if raw.get("response") is None and not raw.get("upstreams"):
            yield (
                ["routes", name],
                "the route has neither `response` nor `upstreams`: its requests get 502",
                "warning",
            )


def _items(value: Any) -> list[Any]:
    """A list the schema may have refused (its own error says so): else nothing to check."""
    return value if isinstance(value, list) else []
