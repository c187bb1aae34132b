"""Which upstream serves the next attempt: tiers, smooth weighted round-robin, and skipping.

State (round-robin weights, health) is keyed by model name and upstream, not by snapshot,
so it carries across reloads; an upstream that disappears from the config is forgotten.

With a shared counter storage (Redis), an upstream one instance takes out (a 429 with its
``Retry-After``, or a failure backoff) is taken out on every instance: the pause is written
to the storage as a key that expires with it, and each instance looks at a model's keys at
most once every :data:`SHARED_CHECK_EVERY` seconds (not on every request).  Sharing is
best-effort: while the storage does not answer, each instance keeps its own view.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from dialproxy.config.model import Model, Route, Upstream
from dialproxy.counting.rediscounters import RedisCounters

DEFAULT_RETRY_AFTER = 30.0  # the pause of a 429 without a Retry-After we can read
SHARED_CHECK_EVERY = 1.0
FAILURES_BEFORE_BACKOFF = 3
MAX_BACKOFF = 300.0
# No pause is longer (DIAL's backoff ceiling): an upstream's Retry-After of a year, or one
# that is not a number, cannot take it out for longer, here or on other instances.
MAX_PAUSE = 300.0


def _pause(seconds: float) -> float:
    """``seconds`` as a pause: within 0..MAX_PAUSE (not a number: the default)."""
    if seconds >= 0.0:
        return seconds if seconds <= MAX_PAUSE else MAX_PAUSE
    return 0.0 if seconds < 0.0 else DEFAULT_RETRY_AFTER  # (nan is neither)


@dataclass(slots=True)
class _Health:
    current_weight: int = 0
    unavailable_until: float = 0.0
    failures: int = 0
    backoff: float = 0.0


log = structlog.get_logger("dialproxy.upstream")


class Balancer:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        shared: RedisCounters | None = None,
        shared_up: Callable[[], bool] = lambda: True,
    ) -> None:
        self._clock = clock
        self._health: dict[tuple[str, str, str | None], _Health] = {}
        self._shared = shared
        self._shared_up = shared_up  # False during an outage: no call waits on a timeout
        self._shared_checked: dict[str, float] = {}  # model -> when its keys were read

    def _state(self, model: Model, upstream: Upstream) -> _Health:
        key = (model.name, upstream.endpoint, upstream.key_fingerprint)
        state = self._health.get(key)
        if state is None:
            state = self._health[key] = _Health()
        return state

    def status(self, model: Model, upstream: Upstream) -> tuple[str, float, int]:
        """What the console shows of an upstream: ``ok``, ``paused`` (a 429's Retry-After)
        or ``backed off`` (failures in a row), the seconds until it is tried again, and its
        failures in a row.  Reads only (no state is made for an upstream never called)."""
        state = self._health.get((model.name, upstream.endpoint, upstream.key_fingerprint))
        if state is None:
            return "ok", 0.0, 0
        left = max(state.unavailable_until - self._clock(), 0.0)
        if not left:
            return "ok", 0.0, state.failures
        return ("backed off" if state.backoff else "paused"), left, state.failures

    def plan(self, model: Model, routes: tuple[Route, ...] | None = None) -> Iterator[Route]:
        """Yield distinct routes for successive attempts, best first, until none is left.
        ``routes``: the model's routes for the request's API (default: ``model.routes``), or
        the one a client's ``X-UPSTREAM-ID`` pins it to."""
        if routes is None:
            routes = model.routes
        if len(routes) == 1:  # the usual model: one upstream, or an endpoint
            if self._state(model, routes[0].upstream).unavailable_until <= self._clock():
                yield routes[0]
            return
        candidates = [route.upstream for route in routes]
        tried: set[int] = set()
        while True:
            now = self._clock()
            available = [
                (i, u)
                for i, u in enumerate(candidates)
                if i not in tried and self._state(model, u).unavailable_until <= now
            ]
            if not available:
                return
            tier = min(u.tier for _, u in available)
            group = [(i, u) for i, u in available if u.tier == tier]
            index, _ = self._pick(model, group)
            tried.add(index)
            yield routes[index]

    def _pick(self, model: Model, group: list[tuple[int, Upstream]]) -> tuple[int, Upstream]:
        if len(group) == 1:
            return group[0]
        total = 0
        best: tuple[int, Upstream] | None = None
        best_weight = 0
        for i, u in group:
            state = self._state(model, u)
            state.current_weight += u.weight
            total += u.weight
            if best is None or state.current_weight > best_weight:
                best, best_weight = (i, u), state.current_weight
        assert best is not None
        self._state(model, best[1]).current_weight -= total
        return best

    @staticmethod
    def _shared_key(model: Model, upstream: Upstream) -> str:
        name = f"{upstream.endpoint}|{upstream.key_fingerprint}"
        return f"dp:u:{model.name}:{hashlib.sha256(name.encode()).hexdigest()[:16]}"

    @property
    def sharing(self) -> bool:
        """Whether pauses are shared with other instances (through Redis)."""
        return self._shared is not None

    def refresh_due(self, model: Model) -> bool:
        """Whether to read now the pauses other instances wrote for this model's upstreams
        (shared, Redis up, not read for SHARED_CHECK_EVERY): asked first, so that a request
        makes no coroutine when it is not (most requests)."""
        if self._shared is None or not self._shared_up():
            return False
        now = self._clock()
        if now - self._shared_checked.get(model.name, -math.inf) < SHARED_CHECK_EVERY:
            return False
        self._shared_checked[model.name] = now
        return True

    async def refresh(self, model: Model) -> None:
        """Take in the pauses other instances wrote for this model's upstreams (when
        :meth:`refresh_due`)."""
        assert self._shared is not None
        now = self._clock()
        try:
            for upstream in (route.upstream for route in model.routes):
                if await self._shared.get(self._shared_key(model, upstream)) > 0:
                    state = self._state(model, upstream)
                    until = now + SHARED_CHECK_EVERY
                    state.unavailable_until = max(state.unavailable_until, until)
        except Exception as e:  # best-effort: the storage's own failures are the guard's
            log.debug("shared_upstream_state_unavailable", error=type(e).__name__)

    async def _share(self, model: Model, upstream: Upstream, seconds: float) -> None:
        seconds = _pause(seconds)
        if self._shared is None or seconds <= 0 or not self._shared_up():
            return
        try:
            await self._shared.incr(self._shared_key(model, upstream), math.ceil(seconds))
        except Exception as e:
            log.debug("shared_upstream_state_unavailable", error=type(e).__name__)

    def succeeded(self, model: Model, upstream: Upstream) -> None:
        state = self._state(model, upstream)
        if state.failures or state.unavailable_until:
            state.failures = 0
            state.backoff = 0.0
            state.unavailable_until = 0.0

    async def rate_limited(
        self, model: Model, upstream: Upstream, retry_after: float | None
    ) -> None:
        state = self._state(model, upstream)
        wait = DEFAULT_RETRY_AFTER if retry_after is None else _pause(retry_after)
        state.unavailable_until = self._clock() + wait
        await self._share(model, upstream, wait)

    async def failed(self, model: Model, upstream: Upstream) -> None:
        state = self._state(model, upstream)
        state.failures += 1
        if state.failures >= FAILURES_BEFORE_BACKOFF:
            state.backoff = min(state.backoff * 2 if state.backoff else 1.0, MAX_BACKOFF)
            state.unavailable_until = self._clock() + state.backoff
            await self._share(model, upstream, state.backoff)

    def forget_missing(self, models: dict[str, Model]) -> None:
        """Drop state of upstreams no longer configured (called after a reload)."""
        live = {
            (m.name, u.endpoint, u.key_fingerprint)
            for m in models.values()
            for u in (r.upstream for r in m.routes)
        }
        for key in [k for k in self._health if k not in live]:
            del self._health[key]
