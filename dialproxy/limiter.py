"""DIAL's limit rules on top of the ``limits`` library's sliding-window storage.

Counters are keyed by what they count (project or key, model, window), never by the limit's
value or the config snapshot, so they survive a reload and a changed limit applies to the
usage already counted.  Any ``limits`` async storage with sliding-window support works:
memory (the default) or Redis.

- tokens and cost: checked before a request (read only), added after it unconditionally;
- requests: checked and counted in one atomic storage operation per window (a Lua script
  on Redis, so admission is exact across instances); a request that one window refuses is
  taken back from the windows that had already counted it.

Each operation runs as one unit through a :class:`~dialproxy.storage.StorageGuard`: on the
shared storage while it answers, else by the ``--storage-failure`` policy (local counters,
no limits, or 503).  A storage failure is never a 500.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from limits.aio.storage import Storage

from dialproxy.config.model import Window
from dialproxy.counters import LocalCounters
from dialproxy.errors import ProxyError
from dialproxy.storage import (
    DEFAULT_FAILURE_POLICY,
    FailurePolicy,
    SlidingStorage,
    StorageGuard,
    take_back,
)

_UNLIMITED = 2**62


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window's use at a moment, with the seconds until it frees up."""

    window: Window
    used: int
    retry_after: float  # seconds until used < limit (0 when it is already below)
    reset: float  # seconds until the window is empty

    @property
    def remaining(self) -> int:
        return max(self.window.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which counters a request is charged to: ``dp:{owner}:{model}`` and ``dp:{owner}``.

    ``owner`` is ``p:<project>`` for DIAL's project counters, ``k:<digest>`` for per-key
    quotas.  Only the limited windows are counted (each costs a storage operation on every
    request): a limit added by a reload starts from zero, a changed one keeps its count.
    """

    owner: str
    model: str
    token_windows: tuple[Window, ...] = ()
    request_windows: tuple[Window, ...] = ()
    cost_windows: tuple[Window, ...] = ()


class RateLimited(ProxyError):
    status = 429

    def __init__(self, kind: str, states: Sequence[WindowState], blocking: WindowState) -> None:
        unit = {"token": "tokens", "request": "requests", "cost": "USD"}[kind]
        parts = [f"Hit {kind} rate limit."]
        for s in states:
            if kind == "cost":
                parts.append(
                    f"{s.window.name.capitalize()} limit: {s.used / 1e9:.6g} / "
                    f"{s.window.limit / 1e9:.6g} {unit}."
                )
            else:
                parts.append(
                    f"{s.window.name.capitalize()} limit: {s.used} / {s.window.limit} {unit}."
                )
        self.retry_after = max(1, math.ceil(blocking.retry_after))
        super().__init__(" ".join(parts))
        self.extra = {
            "limit_type": kind,
            "window": blocking.window.name,
            "retry_after": self.retry_after,
        }
        self.headers = {"Retry-After": str(self.retry_after)}


def _stats(window: Window, counts: tuple[int, float, int, float], extra: int = 0) -> WindowState:
    """Sliding-window counter arithmetic: weighted = previous * its ttl share + current."""
    prev, prev_ttl, cur, cur_ttl = counts
    e = window.seconds
    cur += extra
    used = math.floor(prev * prev_ttl / e + cur)
    limit = window.limit
    # Seconds until the current window rolls over (the current becomes the previous).
    to_roll = max(cur_ttl - e, 0.0)
    if used < limit:
        retry = 0.0
    elif cur < limit and prev > 0:
        retry = max(prev_ttl - (limit - cur) * e / prev, 0.0)
    elif cur > 0:
        retry = to_roll + e * (1 - limit / cur) if limit > 0 else to_roll + e
    else:
        retry = to_roll
    reset = to_roll + e if cur > 0 else prev_ttl
    return WindowState(window, used, retry, reset)


class Limiter:
    def __init__(
        self, storage: Storage, failure: FailurePolicy | str = DEFAULT_FAILURE_POLICY
    ) -> None:
        self.guard = StorageGuard(storage, failure)
        self.storage = storage

    @property
    def in_process(self) -> bool:
        """Counters in this process's memory: calls never wait on I/O."""
        return isinstance(self.storage, LocalCounters)

    def health(self) -> dict[str, Any]:
        return self.guard.health()

    async def close(self) -> None:
        await self.guard.close()

    async def admit(self, scopes: Sequence[Scope]) -> tuple[list[WindowState], list[WindowState]]:
        """A request's whole admission in one storage unit: every scope's token and cost
        windows checked, then its request counted in every scope's request windows (or in
        none).  Returns the request and token window states, for the x-ratelimit headers."""

        async def admit(s: SlidingStorage) -> tuple[list[WindowState], list[WindowState]]:
            tokens: list[WindowState] = []
            for scope in scopes:
                tokens += await _check_tokens(s, scope)
                await _check_cost(s, scope)
            requests: list[WindowState] = []
            admitted: list[Scope] = []
            try:
                for scope in scopes:
                    requests += await _admit(s, scope)
                    admitted.append(scope)
            except RateLimited:
                for scope in admitted:
                    await _release(s, scope)
                raise
            return requests, tokens

        return await self.guard.run(admit, ([], []))

    async def record(self, scopes: Sequence[Scope], tokens: int, cost_nano_usd: int) -> None:
        """Add a finished request's usage to its scopes' limited windows (may overshoot)."""

        async def add(s: SlidingStorage) -> None:
            for scope in scopes:
                if tokens > 0:
                    for w in scope.token_windows:
                        key = f"dp:{scope.owner}:{scope.model}:t:{w.name}"
                        await s.acquire_sliding_window_entry(key, _UNLIMITED, w.seconds, tokens)
                if cost_nano_usd > 0:
                    for w in scope.cost_windows:
                        key = f"dp:{scope.owner}:c:{w.name}"
                        await s.acquire_sliding_window_entry(
                            key, _UNLIMITED, w.seconds, cost_nano_usd
                        )

        await self.guard.run(add, None, refuse=False)

    async def usage(
        self, owner: str, model: str, windows: Sequence[Window], kind: str
    ) -> list[WindowState]:
        """Current use of the given windows (for the limits endpoints)."""

        async def read(s: SlidingStorage) -> list[WindowState]:
            return [await _read(s, f"dp:{owner}:{model}:{kind}:{w.name}", w) for w in windows]

        return await self.guard.run(read, [WindowState(w, 0, 0.0, 0.0) for w in windows])

    async def cost_usage(self, owner: str, windows: Sequence[Window]) -> list[WindowState]:
        """Current use of a project's cost windows (nano-USD), across its models."""

        async def read(s: SlidingStorage) -> list[WindowState]:
            return [await _read(s, f"dp:{owner}:c:{w.name}", w) for w in windows]

        return await self.guard.run(read, [WindowState(w, 0, 0.0, 0.0) for w in windows])


async def _read(s: SlidingStorage, key: str, window: Window) -> WindowState:
    return _stats(window, await s.get_sliding_window(key, window.seconds))


async def _check_tokens(s: SlidingStorage, scope: Scope) -> list[WindowState]:
    prefix = f"dp:{scope.owner}:{scope.model}:t:"
    states = [await _read(s, prefix + w.name, w) for w in scope.token_windows]
    if blocking := _blocking(states):
        raise RateLimited("token", states, blocking)
    return states


async def _check_cost(s: SlidingStorage, scope: Scope) -> None:
    states = [await _read(s, f"dp:{scope.owner}:c:{w.name}", w) for w in scope.cost_windows]
    if blocking := _blocking(states):
        raise RateLimited("cost", states, blocking)


async def _admit(s: SlidingStorage, scope: Scope) -> list[WindowState]:
    prefix = f"dp:{scope.owner}:{scope.model}:r:"
    counted: list[Window] = []
    states: list[WindowState] = []
    local = s if isinstance(s, LocalCounters) else None
    for window in scope.request_windows:
        key = prefix + window.name
        if local is not None:  # counted and read back in one call
            counts = await local.acquire_sliding_window_state(key, window.limit, window.seconds)
        elif await s.acquire_sliding_window_entry(key, window.limit, window.seconds, 1):
            counts = await s.get_sliding_window(key, window.seconds)
        else:
            counts = None
        if counts is None:
            for done in counted:
                await take_back(s, prefix + done.name, done.seconds)
            reads = [await _read(s, prefix + w.name, w) for w in scope.request_windows]
            blocking = next(r for r in reads if r.window.name == window.name)
            raise RateLimited("request", reads, _blocking(reads) or blocking)
        counted.append(window)
        states.append(_stats(window, counts))
    return states


async def _release(s: SlidingStorage, scope: Scope) -> None:
    prefix = f"dp:{scope.owner}:{scope.model}:r:"
    for w in scope.request_windows:
        await take_back(s, prefix + w.name, w.seconds)


def _blocking(states: Sequence[WindowState]) -> WindowState | None:
    full = [s for s in states if s.used >= s.window.limit]
    return max(full, key=lambda s: s.retry_after) if full else None


def tightest(states: Sequence[WindowState]) -> WindowState | None:
    """The window with the least remaining (what the x-ratelimit-* headers report)."""
    return min(states, key=lambda s: (s.remaining, -s.reset)) if states else None
