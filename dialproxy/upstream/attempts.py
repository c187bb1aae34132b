"""One request's attempts over a deployment's upstreams: what each answer means.

An answer is served, or it is a failed attempt that moves on to the next upstream: a
connection error, a redirect (never followed: the upstream's credentials go to its URL and
nowhere else), a retriable status (429 pauses the upstream for its ``Retry-After``).  When no
attempt is served, :meth:`Attempts.refusal` is the error: 503 with ``Retry-After`` when every
upstream was rate-limited, else 502 ``No route``.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from bisect import bisect_left
from collections.abc import Collection, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from dialproxy.config.model import Model, Route, Upstream
from dialproxy.errors import BadGateway, NoRoute, ProxyError, Unavailable
from dialproxy.metrics import Metrics
from dialproxy.tracing import Tracing
from dialproxy.upstream.balancer import DEFAULT_RETRY_AFTER, MAX_PAUSE, Balancer

# Retry-After's delta-seconds: digits (a decimal point accepted too); anything else that is
# not an HTTP date (nan, inf, -1, 1e12, words) counts as absent.
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?", re.ASCII)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """An upstream's ``Retry-After`` in seconds, at most ``MAX_PAUSE``; None when absent or
    not a delta-seconds or HTTP date (the balancer then waits its default)."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), MAX_PAUSE)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # (-0000: UTC, says RFC 5322)
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    except Exception:  # whatever the date parser makes of it: no date
        return None
    return min(max(seconds, 0.0), MAX_PAUSE)


class Attempts:
    """The attempts of one request to ``model``'s upstreams, as its balancer sees them (and
    its metrics and traces, when they are on: each attempt counted, timed, and a span)."""

    __slots__ = (
        "_all_limited",
        "_balancer",
        "_cell",
        "_full",
        "_metrics",
        "_model",
        "_parent",
        "_redirected",
        "_retriable",
        "_sent",
        "_tracing",
        "_waits",
        "span",
    )

    def __init__(
        self,
        balancer: Balancer,
        model: Model,
        retriable: Collection[int],
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        parent: Any = None,
    ) -> None:
        self._balancer, self._model, self._retriable = balancer, model, retriable
        self._waits: list[float] = []  # the rate-limited upstreams' Retry-After
        self._all_limited = True
        self._redirected: int | None = None  # a redirect's (or 1xx) status, for the log line
        self._full: list[float] = []  # the upstreams skipped at capacity: when they free up
        self._metrics, self._tracing, self._parent = metrics, tracing, parent
        self._cell: Any = None  # the metrics of the upstream tried now
        self._sent = 0.0
        self.span: Any = None  # the attempt's client span (tracing on)

    def sending(self, route: Route, headers: MutableMapping[str, str]) -> float:
        """An attempt to ``route`` starts now (returned: when); with tracing on, its span's
        context goes into ``headers`` (the upstream's ``traceparent``)."""
        if self._metrics is not None:
            self._cell = self._metrics.upstream(self._model.name, route.name)
            self._cell.attempts += 1
        if self._tracing is not None and self._parent is not None:
            self.span = self._tracing.attempt(self._parent, self._model.name, route.name, headers)
        self._sent = time.perf_counter()
        return self._sent

    def _failed(self, reason: str, status: int | None) -> None:
        if self._cell is not None:
            assert self._metrics is not None
            self._metrics.failed(self._cell, reason, time.perf_counter() - self._sent)
        if self.span is not None:
            assert self._tracing is not None
            self._tracing.attempt_end(self.span, status, reason)
            self.span = None

    async def broke(self, upstream: Upstream) -> None:
        """The attempt failed before an answer (a connection error, a timeout)."""
        self._failed("error", None)
        await self._down(upstream)

    def cancelled(self) -> None:
        """The request was cancelled (the client left) before the attempt's answer: its
        span ends (its upstream is not blamed, nor counted failed)."""
        if self.span is not None:
            assert self._tracing is not None
            self._tracing.attempt_end(self.span, None, "cancelled")
            self.span = None

    async def _down(self, upstream: Upstream) -> None:
        self._all_limited = False
        await self._balancer.failed(self._model, upstream)

    def served_now(self, resp: aiohttp.ClientResponse, upstream: Upstream) -> bool:
        """:meth:`served` without a coroutine for the usual answer (True: served, below 300
        and not retriable); False: :meth:`served` decides (nothing done yet)."""
        status = resp.status
        if not 200 <= status < 300 or status in self._retriable:
            return False
        if self._cell is not None:
            ttfb = self._cell.ttfb  # (the histogram's observe, inline)
            seconds = time.perf_counter() - self._sent
            ttfb.counts[bisect_left(ttfb.bounds, seconds)] += 1
            ttfb.sum += seconds
        self._balancer.succeeded(self._model, upstream)
        return True

    async def served(self, resp: aiohttp.ClientResponse, upstream: Upstream) -> bool:
        """Whether ``resp`` is the answer to serve; if not, it is released and the next
        upstream is tried."""
        status = resp.status
        if self._cell is not None:
            self._cell.ttfb.observe(time.perf_counter() - self._sent)
        redirect = 300 <= status < 400
        # A final 1xx (101 Switching Protocols: aiohttp reads 100, 102 and 103 past): no
        # HTTP answer to relay, and a connection no longer HTTP's.  Not served, as a redirect.
        informational = status < 200
        if informational:
            resp.close()
        if redirect or informational or status in self._retriable:
            resp.release()
            if status == 429:
                self._failed("rate_limited", status)
                after = retry_after(resp.headers)
                await self._balancer.rate_limited(self._model, upstream, after)
                self._waits.append(after if after is not None else DEFAULT_RETRY_AFTER)
            else:
                if redirect or informational:
                    self._redirected = status
                self._failed("redirect" if redirect else "status", status)
                await self._down(upstream)
            return False
        if status < 500:
            self._balancer.succeeded(self._model, upstream)
        else:
            if self._cell is not None:  # (served all the same: its span ends with the request)
                assert self._metrics is not None
                self._metrics.failed(self._cell, "status", None)
            await self._balancer.failed(self._model, upstream)
        return True

    def at_capacity(self, retry_after: float) -> None:
        """An upstream skipped: at its own capacity (free again in ``retry_after`` s)."""
        self._full.append(retry_after)

    def refusal(self) -> ProxyError:
        """The error when no attempt was served (every upstream at its capacity, and none
        tried: 429 with ``Retry-After``)."""
        if self._full and not self._waits and self._all_limited and self._redirected is None:
            wait = max(1, math.ceil(min(self._full)))
            return ProxyError(
                f"Every upstream of {self._model.name} is at its capacity",
                status=429,
                headers={"Retry-After": str(wait)},
                extra={"limit_type": "upstream_capacity", "retry_after": wait},
            )
        if self._waits and self._all_limited:
            wait = max(1, int(min(self._waits) + 0.999))
            return Unavailable(
                "Too many requests to the upstreams", headers={"Retry-After": str(wait)}
            )
        if self._redirected is not None:
            return NoRoute(f"upstream answered {self._redirected}")
        return BadGateway("No route")
