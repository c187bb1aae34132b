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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NoReturn

from limits.aio.storage import Storage

from dialproxy.config.model import Window
from dialproxy.counters import Counts, LocalCounters, Read
from dialproxy.errors import ProxyError
from dialproxy.storage import (
    DEFAULT_FAILURE_POLICY,
    FailurePolicy,
    SlidingStorage,
    StorageGuard,
    take_back,
)

_UNLIMITED = 2**62
_ZERO: Counts = (0, 0.0, 0, 0.0)


class WindowState:
    """One window's use at a moment: ``used`` of ``window.limit``, and (worked out when
    asked: most states only go through a comparison) the seconds until it frees up."""

    __slots__ = ("counts", "used", "window")

    def __init__(self, window: Window, counts: Counts, used: int | None = None) -> None:
        self.window = window
        self.counts = counts  # (previous, its ttl, current, its ttl)
        self.used = _used(window, counts) if used is None else used

    @property
    def remaining(self) -> int:
        return max(self.window.limit - self.used, 0)

    @property
    def full(self) -> bool:
        return self.used >= self.window.limit

    @property
    def retry_after(self) -> float:
        """Seconds until used < limit (0 when it is already below)."""
        previous, previous_ttl, current, current_ttl = self.counts
        e, limit = self.window.seconds, self.window.limit
        # Seconds until the current window rolls over (the current becomes the previous).
        to_roll = max(current_ttl - e, 0.0)
        if self.used < limit:
            return 0.0
        if current < limit and previous > 0:
            return max(previous_ttl - (limit - current) * e / previous, 0.0)
        if current > 0:
            return to_roll + e * (1 - limit / current) if limit > 0 else to_roll + e
        return to_roll

    @property
    def reset(self) -> float:
        """Seconds until the window is empty."""
        return seconds_to_empty(self.window, self.counts)

    def __repr__(self) -> str:
        return f"WindowState({self.window.name}: {self.used}/{self.window.limit})"


@dataclass(frozen=True, slots=True)
class Scope:
    """Which counters a request is charged to: ``dp:{owner}:{model}`` and ``dp:{owner}``.

    ``owner`` is ``p:<project>`` for DIAL's project counters, ``k:<digest>`` for per-key
    quotas.  Only the limited windows are counted (each costs a storage operation on every
    request): a limit added by a reload starts from zero, a changed one keeps its count.
    The counter keys are made once, with the scope.
    """

    owner: str
    model: str
    token_windows: tuple[Window, ...] = ()
    request_windows: tuple[Window, ...] = ()
    cost_windows: tuple[Window, ...] = ()
    token_counters: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    cost_counters: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    # The token then the cost counters: read together before a request; their windows.
    checked: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    checked_windows: tuple[Window, ...] = field(init=False, repr=False, compare=False)
    counted: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    counted_limits: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # Whether a finished request's usage is added here (any token or cost window).
    records: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = f"dp:{self.owner}:{self.model}:"
        tokens = tuple((f"{prefix}t:{w.name}", w.seconds) for w in self.token_windows)
        costs = tuple((f"dp:{self.owner}:c:{w.name}", w.seconds) for w in self.cost_windows)
        counted = tuple((f"{prefix}r:{w.name}", w.seconds) for w in self.request_windows)
        object.__setattr__(self, "token_counters", tokens)
        object.__setattr__(self, "cost_counters", costs)
        object.__setattr__(self, "checked", tokens + costs)
        object.__setattr__(self, "checked_windows", self.token_windows + self.cost_windows)
        object.__setattr__(self, "counted", counted)
        object.__setattr__(self, "counted_limits", tuple(w.limit for w in self.request_windows))
        object.__setattr__(self, "records", bool(self.token_windows or self.cost_windows))


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


class Limiter:
    def __init__(
        self, storage: Storage, failure: FailurePolicy | str = DEFAULT_FAILURE_POLICY
    ) -> None:
        self.guard = StorageGuard(storage, failure)
        self.storage = storage
        # Counters in this process's memory: calls never wait on I/O and never fail, so
        # they need no guard.
        self.local = storage if isinstance(storage, LocalCounters) else None

    @property
    def in_process(self) -> bool:
        """Counters in this process's memory: calls never wait on I/O."""
        return self.local is not None

    def health(self) -> dict[str, Any]:
        return self.guard.health()

    async def close(self) -> None:
        await self.guard.close()

    async def admit(self, scopes: Sequence[Scope]) -> tuple[WindowState | None, WindowState | None]:
        """A request's whole admission in one storage unit: every scope's token and cost
        windows checked, then its request counted in every scope's request windows (or in
        none).  Returns the tightest request and token windows (None: no such limit), for
        the x-ratelimit headers."""
        if self.local is not None:
            return await _admit(self.local, scopes)
        return await self.guard.run(lambda s: _admit(s, scopes), (None, None))

    async def record(self, scopes: Sequence[Scope], tokens: int, cost_nano_usd: int) -> None:
        """Add a finished request's usage to its scopes' limited windows (may overshoot)."""
        if self.local is not None:
            return self.record_now(scopes, tokens, cost_nano_usd)
        batches = _batches(scopes, tokens, cost_nano_usd)
        if not batches:
            return

        async def add(s: SlidingStorage) -> None:
            for counters, amount in batches:
                await _add_many(s, counters, amount)

        await self.guard.run(add, None, refuse=False)

    def record_now(self, scopes: Sequence[Scope], tokens: int, cost_nano_usd: int) -> None:
        """:meth:`record` on in-process counters: done before it returns."""
        local = self.local
        assert local is not None
        now = time.time()
        for scope in scopes:
            if tokens > 0 and scope.token_counters:
                local.add_many(scope.token_counters, tokens, now)
            if cost_nano_usd > 0 and scope.cost_counters:
                local.add_many(scope.cost_counters, cost_nano_usd, now)

    async def usage(
        self, owner: str, model: str, windows: Sequence[Window], kind: str
    ) -> list[WindowState]:
        """Current use of the given windows (for the limits endpoints)."""
        return await self._read(windows, [f"dp:{owner}:{model}:{kind}:{w.name}" for w in windows])

    async def cost_usage(self, owner: str, windows: Sequence[Window]) -> list[WindowState]:
        """Current use of a project's cost windows (nano-USD), across its models."""
        return await self._read(windows, [f"dp:{owner}:c:{w.name}" for w in windows])

    async def _read(self, windows: Sequence[Window], keys: list[str]) -> list[WindowState]:
        counters = [(key, w.seconds) for key, w in zip(keys, windows, strict=True)]

        async def read(s: SlidingStorage) -> list[WindowState]:
            return _states(windows, await _read_many(s, counters))

        return await self.guard.run(read, [WindowState(w, _ZERO) for w in windows])


def _batches(
    scopes: Sequence[Scope], tokens: int, cost_nano_usd: int
) -> list[tuple[tuple[Read, ...], int]]:
    """The counters a usage is added to, with the amount for each."""
    batches: list[tuple[tuple[Read, ...], int]] = []
    for scope in scopes:
        if tokens > 0 and scope.token_counters:
            batches.append((scope.token_counters, tokens))
        if cost_nano_usd > 0 and scope.cost_counters:
            batches.append((scope.cost_counters, cost_nano_usd))
    return batches


async def _add_many(s: SlidingStorage, counters: Sequence[Read], amount: int) -> None:
    if isinstance(s, LocalCounters):
        return s.add_many(counters, amount)
    for key, seconds in counters:
        await s.acquire_sliding_window_entry(key, _UNLIMITED, seconds, amount)


async def _read_many(s: SlidingStorage, counters: Sequence[Read]) -> list[Counts]:
    if isinstance(s, LocalCounters):
        return s.read_many(counters)
    return [await s.get_sliding_window(key, seconds) for key, seconds in counters]


async def _acquire_many(
    s: SlidingStorage, windows: Sequence[Read], limits: Sequence[int]
) -> list[Counts] | int:
    """One request counted in every window or in none: the counts with it, or the index of
    the window that refused (the ones before it taken back)."""
    if isinstance(s, LocalCounters):
        return s.acquire_many(windows, limits)
    counts: list[Counts] = []
    for index, ((key, seconds), limit) in enumerate(zip(windows, limits, strict=True)):
        if not await s.acquire_sliding_window_entry(key, limit, seconds, 1):
            for done, done_seconds in windows[:index]:
                await take_back(s, done, done_seconds)
            return index
        counts.append(await s.get_sliding_window(key, seconds))
    return counts


async def _admit(
    s: SlidingStorage, scopes: Sequence[Scope]
) -> tuple[WindowState | None, WindowState | None]:
    # In-process counters are called directly: this runs on every request.
    local = s if isinstance(s, LocalCounters) else None
    now = time.time()
    token: Tight | None = None
    for scope in scopes:
        if not scope.checked:
            continue
        if local is not None:
            counts = local.read_many(scope.checked, now)
        else:
            counts = await _read_many(s, scope.checked)
        token, full = _scan(scope.checked_windows, counts, len(scope.token_windows), token)
        if full:
            _refuse_checked(scope, counts)
    if len(scopes) == 1:
        scope = scopes[0]
        windows, counted, limits = scope.request_windows, scope.counted, scope.counted_limits
    else:
        windows = tuple(chain.from_iterable(scope.request_windows for scope in scopes))
        counted = tuple(chain.from_iterable(scope.counted for scope in scopes))
        limits = tuple(chain.from_iterable(scope.counted_limits for scope in scopes))
    if not counted:
        return None, _state(token)
    if local is not None:
        acquired = local.acquire_many(counted, limits, 1, now)
    else:
        acquired = await _acquire_many(s, counted, limits)
    if isinstance(acquired, int):  # refused: every request window of the scope that refused
        refused = counted[acquired]
        scope = next(scope for scope in scopes if refused in scope.counted)
        reads = _states(scope.request_windows, await _read_many(s, scope.counted))
        blocking = reads[scope.counted.index(refused)]
        raise RateLimited("request", reads, _blocking(reads) or blocking)
    return _state(_scan(windows, acquired, len(windows), None)[0]), _state(token)


def _refuse_checked(scope: Scope, counts: Sequence[Counts]) -> NoReturn:
    """The 429 of a scope whose token or cost windows (``counts``, in that order) are full."""
    split = len(scope.token_windows)
    tokens = _states(scope.token_windows, counts[:split])
    if blocking := _blocking(tokens):
        raise RateLimited("token", tokens, blocking)
    costs = _states(scope.cost_windows, counts[split:])
    blocking = _blocking(costs)
    assert blocking is not None
    raise RateLimited("cost", costs, blocking)


def _used(window: Window, counts: Counts) -> int:
    """Sliding-window counter arithmetic: weighted = previous * its ttl share + current."""
    previous, previous_ttl, current, _ = counts
    return int(previous * previous_ttl / window.seconds + current)


# The tightest window so far: the window, its counts and what is left of it.
Tight = tuple[Window, Counts, int]


def _scan(
    windows: Sequence[Window], counts: Sequence[Counts], select: int, tight: Tight | None
) -> tuple[Tight | None, bool]:
    """What is left of each window: whether one is full, and of ``tight`` and the first
    ``select`` windows the tightest: the one with the least left, of those the one that
    empties last (what the x-ratelimit-* headers report).  One loop, the sliding-window
    weighting (:func:`_used`) inline: it runs for every limited window of every request."""
    full = False
    for index, window in enumerate(windows):
        c = counts[index]
        left = window.limit - int(c[0] * c[1] / window.seconds + c[2])
        if left <= 0:
            full = True
        if index < select and (
            tight is None
            or left < tight[2]
            or (
                left == tight[2]
                and seconds_to_empty(window, c) > seconds_to_empty(tight[0], tight[1])
            )
        ):
            tight = (window, c, left)
    return tight, full


def _state(tight: Tight | None) -> WindowState | None:
    if tight is None:
        return None
    window, counts, left = tight
    return WindowState(window, counts, window.limit - left)


def seconds_to_empty(window: Window, counts: Counts) -> float:
    """Seconds until the window is empty: the current bucket's ttl, or the previous one's."""
    _, previous_ttl, current, current_ttl = counts
    if current <= 0:
        return previous_ttl
    seconds = window.seconds
    return (
        current_ttl if current_ttl > seconds else float(seconds)
    )  # (the current ttl, >= one window)


def _states(windows: Sequence[Window], counts: Sequence[Counts]) -> list[WindowState]:
    return [WindowState(w, c) for w, c in zip(windows, counts, strict=True)]


def _blocking(states: Sequence[WindowState]) -> WindowState | None:
    """Of the full windows, the one that frees up last."""
    full = [s for s in states if s.full]
    return max(full, key=lambda s: s.retry_after) if full else None
