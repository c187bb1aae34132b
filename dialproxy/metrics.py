"""Prometheus series of a served process (``GET /metrics``, :func:`handler`).

Every label's values come from the config or from this code, never from what a client
sends: ``deployment`` is a model or application of the config ("" for a request that named
none the config has), ``project`` a key's project ("" before one is known), ``upstream`` a
route's name (``upstreams[<index>]`` or ``endpoint``), ``api`` one of the proxied APIs,
``status`` a status class (``2xx``), ``reason`` and ``window`` a refusal's kind.  The
per-key label (``key``: the config key's fingerprint) is off unless asked for
(``--metrics-key-label``): one series per key is a cardinality the operator chooses.

The request path pays a dictionary lookup per request and per attempt (a cell of plain
numbers per label tuple) and an addition per series it moves: prometheus-client's own
children take a lock per increment and several per histogram observation, which
``make bench`` could see.  The numbers become families when scraped
(:class:`_CountsCollector`), and what can be read then is read then
(:class:`_StateCollector`): the config's generation and reloads, the storage's health, the
streams open, the requests in flight.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from dialproxy.errors import ProxyError

if TYPE_CHECKING:
    from dialproxy.auth import Principal
    from dialproxy.config.store import ConfigStore
    from dialproxy.outcome import Outcome

# Seconds to an upstream's first byte, and to the end of its answer (streams run long).
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

# What the 429s say in their ``limit_type`` -> the refusal's reason.
_LIMIT_REASONS = {
    "token": "tokens",
    "request": "requests",
    "cost": "cost",
    "concurrency": "concurrency",
    "upstream_capacity": "upstream_capacity",
}
_STATUS_REASONS = {
    400: "invalid",
    401: "auth",
    403: "access",
    404: "not_found",
    408: "invalid",
    413: "invalid",
    415: "invalid",
}
# The refusals' reasons (and the windows a limit's refusal names): the label's only values.
REASONS = frozenset(
    [*_LIMIT_REASONS.values(), *_STATUS_REASONS.values(), "shared_key_cap", "storage"]
)
WINDOWS = frozenset({"minute", "hour", "day", "week", "month", ""})


def refusal_reason(error: BaseException) -> tuple[str, str] | None:
    """The reason and window of a refusal (None: not one, a failure such as a 502)."""
    if not isinstance(error, ProxyError):
        return None
    name = type(error).__name__
    if name in ("StorageUnavailable", "StoreUnavailable"):  # (a failure policy's refusal)
        return "storage", ""
    if name == "SharedKeyCapReached":
        return "shared_key_cap", ""
    limit_type = error.extra.get("limit_type")
    if limit_type is not None and error.status == 429:
        reason = _LIMIT_REASONS.get(limit_type)
        if reason is not None:
            window = error.extra.get("window", "")
            return reason, window if window in WINDOWS else ""
    reason = _STATUS_REASONS.get(error.status)
    return (reason, "") if reason is not None else None


class _Histogram:
    """A histogram's bucket counts (not cumulative: the last one past the largest bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, by ``le`` (as prometheus-client writes it: ``0.5``, ``1.0``, ``+Inf``)."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(total)))
        return out


class _Cell:
    """The counts of one (api, deployment, project[, key])."""

    __slots__ = ("completion", "cost", "labels", "priced", "prompt", "requests", "used")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.requests = [0] * len(STATUS_CLASSES)  # by status class (index: status // 100)
        self.used = self.priced = False  # (a usage counted; a cost: their series exist)
        self.prompt = self.completion = 0
        self.cost = 0.0


class _UpstreamCell:
    """The counts of one upstream of a deployment."""

    __slots__ = ("attempts", "duration", "failures", "labels", "ttfb")

    def __init__(self, labels: tuple[str, str]) -> None:
        self.labels = labels  # (deployment, upstream)
        self.attempts = 0
        self.failures: dict[str, int] = {}
        self.ttfb = _Histogram(TTFB_BUCKETS)
        self.duration = _Histogram(DURATION_BUCKETS)


class Metrics:
    """The series of one app (its own registry: tests run several apps in one process).

    Counted in plain numbers as requests go (one event loop: no lock needed), turned into
    Prometheus families when scraped."""

    def __init__(
        self,
        store: ConfigStore | None = None,
        *,
        key_label: bool = False,
        streams: Callable[[], int] | None = None,
        storage: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.key_label = key_label
        self._store = store
        self.in_flight = 0  # requests begun, not yet finished (read when scraped)
        self.reservations = 0  # requests holding a reservation (tokens, cost, a shared cap)
        self.cells: dict[tuple[str, ...], _Cell] = {}
        self.upstreams: dict[tuple[str, str], _UpstreamCell] = {}
        self.refusals: dict[tuple[str, str, str, str, str], int] = {}
        self.registry.register(_CountsCollector(self))
        self.registry.register(_StateCollector(self, store, streams, storage))

    # -- the request path ---------------------------------------------------------------

    def begin(self) -> None:
        self.in_flight += 1

    def reserved(self) -> bool:
        """A request now holds a reservation (given back or settled when it finishes)."""
        self.reservations += 1
        return True

    def finish(self, outcome: Outcome, principal: Principal | None, deployment: str | None) -> None:
        """One request answered (once, when its log line is written): its status, usage and
        refusal counted; the served attempt's end timed (:meth:`served`, inline: this runs
        on every request)."""
        self.in_flight -= 1
        if outcome.holding:
            self.reservations -= 1
        model = outcome.model
        if model is not None:
            name = model.name
        elif deployment is not None and self._known(deployment):
            name = deployment  # (a config name the request was refused on: 403)
        else:
            name = ""  # never a name the config does not have
        project = principal.key.project if principal is not None else ""
        if self.key_label:
            key = principal.key.fingerprint if principal is not None else ""
            labels: tuple[str, ...] = (outcome.api, name, project, key)
        else:
            labels = (outcome.api, name, project)
        cell = self.cells.get(labels)
        if cell is None:
            cell = self.cells[labels] = _Cell(labels)
        status = outcome.status
        cell.requests[status // 100 if 0 <= status < 600 else 0] += 1
        usage = outcome.usage
        if usage is not None and (status == 200 or outcome.estimated):  # (charged)
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            cell.used = True
            cell.prompt += prompt
            cell.completion += completion
            pricing = model.pricing if model is not None else None
            if pricing is not None:
                cell.priced = True
                cell.cost += pricing.cost_nano_usd(prompt, completion) / 1e9
        refusal = outcome.refusal
        if refusal is not None and (why := refusal_reason(refusal)) is not None:
            refused = (outcome.api, name, project, *why)
            self.refusals[refused] = self.refusals.get(refused, 0) + 1
        route = outcome.upstream
        if outcome.sent and model is not None and route is not None:
            seconds = time.perf_counter() - outcome.sent
            upstream = self.upstreams.get((name, route))
            if upstream is None:
                upstream = self.upstreams[(name, route)] = _UpstreamCell((name, route))
            duration = upstream.duration
            duration.counts[bisect_left(duration.bounds, seconds)] += 1
            duration.sum += seconds

    def _known(self, deployment: str) -> bool:
        return self._store is not None and deployment in self._store.snapshot.models

    def upstream(self, deployment: str, route: str) -> _UpstreamCell:
        """The counts of one upstream of a deployment (both from the config)."""
        cell = self.upstreams.get((deployment, route))
        if cell is None:
            cell = self.upstreams[(deployment, route)] = _UpstreamCell((deployment, route))
        return cell

    def failed(self, cell: _UpstreamCell, reason: str, seconds: float | None) -> None:
        """An attempt failed (``reason``: error, status, rate_limited, redirect), ended
        ``seconds`` after it was sent (None: a 5xx served all the same, timed when relayed)."""
        cell.failures[reason] = cell.failures.get(reason, 0) + 1
        if seconds is not None:
            cell.duration.observe(seconds)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


def _counter(name: str, text: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, labels=labels)


class _CountsCollector(Collector):
    """The counted series, from :class:`Metrics`' numbers."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        key = ("key",) if m.key_label else ()
        requests = _counter(
            "dialproxy_requests",
            "Proxied requests answered, by API, deployment, project and status class.",
            ("api", "deployment", "project", "status", *key),
        )
        tokens = _counter(
            "dialproxy_tokens",
            "Tokens of the answered requests' usage, by deployment, project and type "
            "(prompt, completion).",
            ("deployment", "project", "type", *key),
        )
        cost = _counter(
            "dialproxy_cost_usd",
            "The cost of the answered requests' usage in USD (priced deployments).",
            ("deployment", "project", *key),
        )
        for cell in list(m.cells.values()):
            api, deployment, project, *rest = cell.labels
            for index, count in enumerate(cell.requests):
                if count:
                    status = STATUS_CLASSES[index]
                    requests.add_metric((api, deployment, project, status, *rest), count)
            if cell.used:
                tokens.add_metric((deployment, project, "prompt", *rest), cell.prompt)
                tokens.add_metric((deployment, project, "completion", *rest), cell.completion)
            if cell.priced:
                cost.add_metric((deployment, project, *rest), cell.cost)
        refusals = _counter(
            "dialproxy_refusals",
            "Requests the proxy refused itself, by reason (tokens, requests, cost: a limit, "
            "window its window; concurrency, upstream_capacity, shared_key_cap, auth, access, "
            "not_found, invalid, storage: the storage failure policy's deny).",
            ("api", "deployment", "project", "reason", "window"),
        )
        for labels, count in list(m.refusals.items()):
            refusals.add_metric(labels, count)
        upstream = ("deployment", "upstream")
        attempts = _counter(
            "dialproxy_upstream_attempts",
            "Requests sent to an upstream, by deployment and upstream.",
            upstream,
        )
        failures = _counter(
            "dialproxy_upstream_failures",
            "Upstream attempts that failed, by reason (error: no answer; status: a 5xx or "
            "a retriable status; rate_limited: a 429; redirect).",
            (*upstream, "reason"),
        )
        ttfb = HistogramMetricFamily(
            "dialproxy_upstream_ttfb_seconds",
            "Seconds from an attempt's request to its answer's headers.",
            labels=upstream,
        )
        duration = HistogramMetricFamily(
            "dialproxy_upstream_duration_seconds",
            "Seconds from an attempt's request to its end (the answer relayed, or the failure).",
            labels=upstream,
        )
        for ucell in list(m.upstreams.values()):
            attempts.add_metric(ucell.labels, ucell.attempts)
            for reason, count in list(ucell.failures.items()):
                failures.add_metric((*ucell.labels, reason), count)
            for family, histogram in ((ttfb, ucell.ttfb), (duration, ucell.duration)):
                family.add_metric(ucell.labels, histogram.buckets(), histogram.sum)
        yield from (requests, refusals, tokens, cost, attempts, failures, ttfb, duration)


class _StateCollector(Collector):
    """What is read when scraped, not counted as it happens."""

    def __init__(
        self,
        metrics: Metrics,
        store: ConfigStore | None,
        streams: Callable[[], int] | None,
        storage: Callable[[], dict[str, Any]] | None,
    ) -> None:
        self._metrics, self._store, self._streams, self._storage = (
            metrics,
            store,
            streams,
            storage,
        )

    def describe(self) -> Iterable[Metric]:
        return []  # (not checked against the other collectors' names: they differ)

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        yield GaugeMetricFamily(
            "dialproxy_requests_in_flight",
            "Proxied requests begun and not yet finished (a stream the client left: until "
            "its usage is read).",
            value=metrics.in_flight,
        )
        yield GaugeMetricFamily(
            "dialproxy_reservations_outstanding",
            "Requests holding a reservation in their windows (or a shared key's cap) till settled.",
            value=metrics.reservations,
        )
        if self._streams is not None:
            yield GaugeMetricFamily(
                "dialproxy_streams_in_flight", "Streams being relayed now.", value=self._streams()
            )
        store = self._store
        if store is not None:
            yield GaugeMetricFamily(
                "dialproxy_config_generation",
                "The served config's generation (1: the first load; +1 each reload taken).",
                value=store.generation,
            )
            reloads = CounterMetricFamily(
                "dialproxy_config_reloads",
                "Config reloads taken (applied) and refused (the last good config kept).",
                labels=("result",),
            )
            reloads.add_metric(("applied",), store.reloads_applied)
            reloads.add_metric(("refused",), store.reloads_refused)
            yield reloads
            yield GaugeMetricFamily(
                "dialproxy_config_last_reload_refused",
                "1 while the config files hold a change that was refused, else 0.",
                value=1 if store.last_error is not None else 0,
            )
            if store.loaded_at is not None:
                age = time.time() - store.loaded_at.timestamp()
                yield GaugeMetricFamily(
                    "dialproxy_config_seconds_since_good_load",
                    "Seconds since the served config was loaded.",
                    value=max(age, 0.0),
                )
        if self._storage is not None:
            health = self._storage()
            backend = (health["backend"],)
            up = GaugeMetricFamily(
                "dialproxy_storage_healthy",
                "1 while the counter storage answers, 0 while the failure policy answers.",
                labels=("backend",),
            )
            up.add_metric(backend, 1 if health["healthy"] else 0)
            yield up
            owed = GaugeMetricFamily(
                "dialproxy_storage_owed",
                "Settlements owed to the counter storage: made while it was down, sent when "
                "it is back (counted until it has taken them).",
                labels=("backend",),
            )
            owed.add_metric(backend, health["owed"])
            yield owed
            for name, key, text in (
                ("dialproxy_storage_failures", "failures", "Counter storage calls that failed."),
                (
                    "dialproxy_storage_fallbacks",
                    "fallbacks",
                    "Operations the failure policy answered instead of the storage.",
                ),
                ("dialproxy_storage_outages", "outages", "Times the storage went down."),
                (
                    "dialproxy_storage_owed_dropped",
                    "owedDropped",
                    "Settlements owed to the storage that were dropped (past the cap, or owed "
                    "at shutdown): their reservations stay counted.",
                ),
            ):
                family = CounterMetricFamily(name, text, labels=("backend",))
                family.add_metric(backend, health[key])
                yield family


def handler(
    metrics: Metrics, require: Callable[[web.Request], Awaitable[None]] | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``GET /metrics``: the text format; ``require`` (an awaitable check) refuses first."""

    async def serve(request: web.Request) -> web.StreamResponse:
        if require is not None:
            await require(request)
        return web.Response(body=metrics.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return serve
