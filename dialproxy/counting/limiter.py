"""DIAL's limit rules on sliding-window counters (the ``limits`` library's arithmetic) in
memory or in Redis.

Counters are keyed by what they count (project or key, model, window), never by the limit's
value or the config snapshot, so they survive a reload and a changed limit applies to the
usage already counted.

A request costs two storage operations, whatever its windows (each one atomic step: a Lua
script on Redis, so it holds across instances):

- **admission**: every token and cost window of every scope checked (refused when full),
  every request window checked with the request in it; then, all or nothing, the request
  counted and the request's **reservation** (an estimate of its tokens and cost) added to
  every token and cost window, as if used: requests that arrive together see each other's;
- **settlement**: the reservation replaced by the real usage (the difference added; a
  negative one taken back), or given back when the request fails.

Each operation runs as one unit through a :class:`~dialproxy.counting.storage.StorageGuard`: on the
shared storage while it answers, else by the ``--storage-failure`` policy (local counters,
no limits, or 503).  A storage failure is never a 500.  A request is settled where it was
admitted (:class:`Held`): in Redis, or in the local counters that admitted it during an
outage; a settlement Redis fails is owed to it until it is back.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain
from typing import Any, NoReturn

from dialproxy.config.model import UNLIMITED, Window
from dialproxy.counting.counters import FAR, Counts, LocalCounters, Read
from dialproxy.counting.storage import (
    DEFAULT_FAILURE_POLICY,
    FailurePolicy,
    Storage,
    StorageGuard,
    read,
)
from dialproxy.errors import ConcurrencyLimited, ProxyError
from dialproxy.errors import RateLimited as RateLimited  # (imported from here too)

_ZERO: Counts = (0, 0.0, 0, 0.0)
# An admission's answer under ``allow`` while Redis is down: no window known.
_UNCOUNTED: tuple[WindowState | None, WindowState | None] = (None, None)


class Held(Enum):
    """Where an admission holds what it took (the request, its reservation, its slots):
    where it is to be settled."""

    SHARED = "shared"  # in the limiter's storage (Redis, or memory without Redis)
    LOCAL = "local"  # in the local counters, Redis down (the ``local`` policy)
    NOTHING = "nothing"  # nowhere: admitted uncounted, Redis down (the ``allow`` policy)


class WindowState:
    """One window's use at a moment: ``used`` of ``window.limit``, the seconds until it is
    empty (``reset``), and (worked out when asked) the seconds until it frees up."""

    __slots__ = ("counts", "reset", "used", "window")

    def __init__(
        self,
        window: Window,
        counts: Counts,
        used: int | None = None,
        reset: float | None = None,
    ) -> None:
        self.window = window
        self.counts = counts  # (previous, its ttl, current, its ttl)
        self.used = _used(window, counts) if used is None else used
        # (an admission has worked it out already: the x-ratelimit-reset-* headers)
        self.reset = seconds_to_empty(window, counts) if reset is None else reset

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
        if self.window.calendar is not None:  # (it empties at the period's end)
            return current_ttl if self.used >= limit else 0.0
        # Seconds until the current window rolls over (the current becomes the previous).
        to_roll = max(current_ttl - e, 0.0)
        if self.used < limit:
            return 0.0
        if current < limit and previous > 0:
            return max(previous_ttl - (limit - current) * e / previous, 0.0)
        if current > 0:
            return to_roll + e * (1 - limit / current) if limit > 0 else to_roll + e
        return to_roll

    def __repr__(self) -> str:
        return f"WindowState({self.window.name}: {self.used}/{self.window.limit})"


def counter(key: str, window: Window, now: float) -> Read:
    """The counter of ``window`` at ``now``: ``(key, seconds)`` for a sliding window; for a
    calendar window, the period's own counter, ``(key@start, -end)`` (epoch seconds: the
    storage lets it lapse at the end)."""
    calendar = window.calendar
    if calendar is None:
        return key, window.seconds
    start, end = calendar.period(now)
    return f"{key}@{start}", -end


@dataclass(frozen=True, slots=True)
class Scope:
    """Which counters a request is charged to: ``dp:{owner}:{model}`` and ``dp:{owner}``.

    ``owner`` is ``p:<project>`` for DIAL's project counters, ``k:<digest>`` for per-key
    quotas.  The windows given are counted (a limited scope counts every window, limited
    or not: the limits answers say its use): a limit added by a reload starts from zero, a
    changed one keeps its count.  The counter keys are made with the scope, and again when
    a calendar window's period ends (:meth:`current`).
    """

    owner: str
    model: str
    token_windows: tuple[Window, ...] = ()
    request_windows: tuple[Window, ...] = ()
    cost_windows: tuple[Window, ...] = ()
    concurrency: int | None = None  # requests in flight at once (None: no cap)
    token_counters: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    cost_counters: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    # The token then the cost counters: read together before a request; their windows.
    checked: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    checked_windows: tuple[Window, ...] = field(init=False, repr=False, compare=False)
    counted: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    counted_limits: tuple[int, ...] = field(init=False, repr=False, compare=False)
    checked_limits: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # The token (0) and cost (1) counters, each with its kind: what a settlement changes.
    usage: tuple[tuple[Read, int], ...] = field(init=False, repr=False, compare=False)
    # Of the checked ones, the limited (the others are counted, never full nor tightest:
    # an admission in memory reads these alone), and how many of them are token windows.
    limited: tuple[Read, ...] = field(init=False, repr=False, compare=False)
    limited_windows: tuple[Window, ...] = field(init=False, repr=False, compare=False)
    limited_tokens: int = field(init=False, repr=False, compare=False)
    # Whether a finished request's usage is added here (any token or cost window).
    records: bool = field(init=False, repr=False, compare=False)
    slot_set: str = field(init=False, repr=False, compare=False)  # its requests in flight
    # [start, end) of the counters' periods (the calendar windows'; else all time).
    period: list[float] = field(init=False, repr=False, compare=False)
    # [counters, their epoch, usage on their records]: see cells_on.
    cells: list[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "period", [-math.inf, math.inf])
        object.__setattr__(self, "cells", [None, -1, ()])
        self._count_at(time.time())
        object.__setattr__(self, "checked_windows", self.token_windows + self.cost_windows)
        limited_windows = tuple(w for w in self.checked_windows if w.limited)
        object.__setattr__(self, "limited_windows", limited_windows)
        object.__setattr__(self, "limited_tokens", sum(w.limited for w in self.token_windows))
        object.__setattr__(self, "counted_limits", tuple(w.limit for w in self.request_windows))
        object.__setattr__(self, "checked_limits", tuple(w.limit for w in self.checked_windows))
        object.__setattr__(self, "records", bool(self.token_windows or self.cost_windows))
        object.__setattr__(self, "slot_set", f"dp:{self.owner}:{self.model}:f")

    def counters(self, now: float) -> tuple[tuple[Read, ...], tuple[Read, ...], tuple[Read, ...]]:
        """The token, cost and request counters at ``now``."""
        prefix = f"dp:{self.owner}:{self.model}:"
        return (
            tuple(counter(f"{prefix}t:{w.name}", w, now) for w in self.token_windows),
            tuple(counter(f"dp:{self.owner}:c:{w.name}", w, now) for w in self.cost_windows),
            tuple(counter(f"{prefix}r:{w.name}", w, now) for w in self.request_windows),
        )

    def _count_at(self, now: float) -> None:
        tokens, costs, counted = self.counters(now)
        object.__setattr__(self, "token_counters", tokens)
        object.__setattr__(self, "cost_counters", costs)
        object.__setattr__(self, "checked", tokens + costs)
        object.__setattr__(self, "counted", counted)
        object.__setattr__(self, "usage", _kinds(tokens, costs))
        self.cells[:] = None, -1, ()
        windows = self.token_windows + self.cost_windows
        limited = tuple(c for c, w in zip(tokens + costs, windows, strict=True) if w.limited)
        object.__setattr__(self, "limited", limited)
        calendars = [
            w.calendar.period(now)
            for w in chain(self.token_windows, self.cost_windows, self.request_windows)
            if w.calendar is not None
        ]
        if calendars:
            self.period[:] = max(p[0] for p in calendars), min(p[1] for p in calendars)

    def current(self, now: float) -> bool:
        """Its counters made for ``now``'s periods if a calendar period ended (True then)."""
        period = self.period
        if period[0] <= now < period[1]:
            return False
        self._count_at(now)
        return True

    def cells_on(self, local: LocalCounters) -> list[Any]:
        """:attr:`usage` on ``local``'s records (:meth:`LocalCounters.cell`), by kind, its
        sliding windows ``(record, seconds)`` and its calendar periods' records: kept in
        :attr:`cells` while no record is dropped."""
        cell, usage = local.cell, self.usage
        self.cells[:] = (
            local,
            local.epoch,
            tuple(
                (
                    tuple((cell(c), c[1]) for c, k in usage if c[1] >= 0 and k == kind),
                    tuple(cell(c) for c, k in usage if c[1] < 0 and k == kind),
                )
                for kind in (0, 1)
            ),
        )
        return self.cells

    def usage_at(self, when: float) -> tuple[tuple[Read, int], ...]:
        """:attr:`usage` in the periods of ``when`` (see :meth:`counters_at`)."""
        period = self.period
        if period[0] <= when < period[1]:
            return self.usage
        return _kinds(*self.counters(when)[:2])

    def counters_at(self, when: float) -> tuple[tuple[Read, ...], tuple[Read, ...]]:
        """The token and cost counters of the periods of ``when`` (a request is settled in
        the periods it was admitted in)."""
        period = self.period
        if period[0] <= when < period[1]:
            return self.token_counters, self.cost_counters
        tokens, costs, _ = self.counters(when)
        return tokens, costs


def _kinds(tokens: tuple[Read, ...], costs: tuple[Read, ...]) -> tuple[tuple[Read, int], ...]:
    return tuple((c, 0) for c in tokens) + tuple((c, 1) for c in costs)


class Limiter:
    def __init__(
        self,
        storage: Storage,
        failure: FailurePolicy | str = DEFAULT_FAILURE_POLICY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # (the tests' calendar windows cross their boundaries on their own)
        self.guard = StorageGuard(storage, failure)
        self.storage = storage
        # Counters in this process's memory: calls never wait on I/O and never fail, so
        # they need no guard.
        self.local = storage if isinstance(storage, LocalCounters) else None
        self._giving_back: set[asyncio.Task[None]] = set()  # (see _left)

    def health(self) -> dict[str, Any]:
        return self.guard.health()

    async def close(self) -> None:
        await asyncio.gather(*self._giving_back, return_exceptions=True)
        await self.guard.close()
        # (one made while the guard closed: the storage marked down at that moment)
        await asyncio.gather(*self._giving_back, return_exceptions=True)

    async def admit(
        self,
        scopes: Sequence[Scope] | Admission,
        reserve_tokens: int = 0,
        reserve_cost: int = 0,
        member: str = "",
    ) -> tuple[WindowState | None, WindowState | None]:
        """A request's whole admission in one storage step: every scope's token and cost
        windows checked, its request windows too (with the request in them); then, all or
        nothing, the request counted and ``reserve_tokens``/``reserve_cost`` (nano-USD)
        added to the token and cost windows (settled by :meth:`settle`).  Returns the
        tightest request and token windows (None: no such limit), for the rate-limit
        headers.  A scope with a concurrency cap gives ``member`` (the request) a slot, or
        refuses (freed by :meth:`settle`).  (Where it holds them: :meth:`admit_held`.)"""
        request, token, _ = await self.admit_held(scopes, reserve_tokens, reserve_cost, member)
        return request, token

    async def admit_held(
        self,
        scopes: Sequence[Scope] | Admission,
        reserve_tokens: int = 0,
        reserve_cost: int = 0,
        member: str = "",
    ) -> tuple[WindowState | None, WindowState | None, Held]:
        """:meth:`admit`, and where what it took is held: its settlement's ``held``."""
        now = self.clock()
        admission = scopes if isinstance(scopes, Admission) else Admission(scopes)
        if now >= admission.period[1] or now < admission.period[0]:
            admission.current(now)  # (a calendar period ended: its new counters)
        if self.local is not None:
            request, token = _admit_now(
                self.local, admission, reserve_tokens, reserve_cost, member, now
            )
            return request, token, Held.SHARED
        batch = _Batch(admission, reserve_tokens, reserve_cost, member, now)
        guard = self.guard
        if (redis := guard.redis_now()) is not None:  # the usual: no guard.run around it
            try:
                request, token = await _admit(redis, batch, self._left)
                return request, token, Held.SHARED
            except ProxyError:  # (a 429: Redis answered)
                raise
            except Exception as e:  # (Redis failed it: as guard.run would)
                guard.failed(e)
                if batch.slots:  # (a call that timed out may yet be applied when Redis is
                    # back: its slots, taken there, are freed then, not a lease later)
                    slots = [key for key, _ in batch.slots]
                    guard.owe([], [], slots, batch.member, fallback=False)
                request, token = await guard.fallback(lambda s: _admit(s, batch), _UNCOUNTED)
        else:
            request, token = await guard.run(lambda s: _admit(s, batch, self._left), _UNCOUNTED)
        on = batch.on
        held = Held.NOTHING if on is None else Held.LOCAL if on is guard.local else Held.SHARED
        return request, token, held

    def _left(self, batch: _Batch, answer: Any) -> None:
        """An admission whose request was cancelled (its client gone) before Redis
        answered: when Redis admitted it, its reservation is taken back and its slots
        freed at once (not a lease later); its request stays counted, as in memory."""
        if type(answer) is not list or not answer or answer[0] != 0:
            return  # (refused: nothing was taken)
        tokens, cost = batch.reserved
        work = self.settle_soon(batch.admission.scopes, -tokens, -cost, batch.member, batch.now)
        if work is not None:  # (Redis down meanwhile: the guard's way, in a task)
            task = asyncio.get_running_loop().create_task(work)
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

    def admit_now(
        self, admission: Admission, reserve_tokens: int, reserve_cost: int, member: str
    ) -> tuple[WindowState | None, WindowState | None]:
        """:meth:`admit` on in-process counters, done before it returns (a request's: no
        coroutine to make and await)."""
        local = self.local
        assert local is not None
        now = self.clock()
        period = admission.period
        if now >= period[1] or now < period[0]:
            admission.current(now)  # (a calendar period ended: its new counters)
        return _admit_now(local, admission, reserve_tokens, reserve_cost, member, now)

    async def settle(
        self,
        scopes: Sequence[Scope],
        tokens: int,
        cost_nano_usd: int,
        member: str = "",
        admitted: float | None = None,
        held: Held = Held.SHARED,
    ) -> None:
        """Add signed amounts to the scopes' token and cost windows, and free ``member``'s
        slots, in one storage step: the real usage less the reservation (negative: taken
        back), in the calendar periods of ``admitted`` (when the request was admitted: where
        its reservation is), where the admission ``held`` it: in the local counters that
        admitted it during an outage, else in the shared storage (owed to it while it is
        down: :meth:`StorageGuard.owe`)."""
        now, windows, amounts, slots = self._settling(
            scopes, tokens, cost_nano_usd, member, admitted
        )
        if not windows and not slots:
            return
        if self.local is not None:
            return self.local.settle(windows, amounts, slots, member, now)
        if held is Held.LOCAL:
            return self.guard.local.settle(windows, amounts, slots, member, now)
        await self.guard.settle_shared(windows, amounts, slots, member)

    def _settling(
        self,
        scopes: Sequence[Scope],
        tokens: int,
        cost_nano_usd: int,
        member: str,
        admitted: float | None,
    ) -> tuple[float, list[Read], list[int], list[str]]:
        """A settlement's time, windows and amounts (in the periods of ``admitted``), and
        the slot sets ``member`` frees."""
        now = self.clock()
        windows, amounts = _settlement(
            scopes, tokens, cost_nano_usd, now if admitted is None else admitted
        )
        slots = [s.slot_set for s in scopes if s.concurrency is not None] if member else []
        return now, windows, amounts, slots

    def settle_soon(
        self,
        scopes: Sequence[Scope],
        tokens: int,
        cost_nano_usd: int,
        member: str = "",
        admitted: float | None = None,
        held: Held = Held.SHARED,
    ) -> Coroutine[Any, Any, None] | None:
        """:meth:`settle` without a coroutine of its own where it can: in memory at once; on
        Redis (up and prepared) sent with its next batch, a failure handled by the guard
        when the answer comes (owed); down, owed at once.  Otherwise (Redis not prepared
        yet) the coroutine of :meth:`settle`, for the caller to run."""
        if self.local is not None:
            self.record_now(scopes, tokens, cost_nano_usd, member, admitted)
            return None
        guard = self.guard
        redis = guard.redis_now()
        if redis is None and held is not Held.LOCAL and guard.healthy:
            return self.settle(scopes, tokens, cost_nano_usd, member, admitted, held)
        now, windows, amounts, slots = self._settling(
            scopes, tokens, cost_nano_usd, member, admitted
        )
        if held is Held.LOCAL:  # (admitted in memory while Redis was down: settled there)
            guard.local.settle(windows, amounts, slots, member, now)
        elif redis is None:  # (down)
            guard.owe(windows, amounts, slots, member)
        elif windows or slots:
            settling = redis.settle_soon(windows, amounts, slots, member)
            guard.watch(settling, windows, amounts, slots, member)
        return None

    def record_now(
        self,
        scopes: Sequence[Scope],
        tokens: int,
        cost_nano_usd: int,
        member: str = "",
        admitted: float | None = None,
    ) -> None:
        """:meth:`settle` on in-process counters: done before it returns."""
        local = self.local
        assert local is not None
        now = self.clock()
        when = now if admitted is None else admitted
        amounts = (tokens, cost_nano_usd)
        for scope in scopes:  # (this runs on every request: no lists built)
            if scope.records and (tokens or cost_nano_usd):
                period = scope.period
                if period[0] <= when < period[1]:
                    cells = scope.cells
                    if cells[0] is not local or cells[1] != local.epoch:
                        cells = scope.cells_on(local)
                    local.change_cells(cells[2], amounts, now)
                else:  # (admitted in a period that has ended)
                    local.change_kinds(scope.usage_at(when), amounts, now)
            if member and scope.concurrency is not None:
                local.settle((), (), (scope.slot_set,), member, now)

    async def usage(
        self, owner: str, model: str, windows: Sequence[Window], kind: str
    ) -> list[WindowState]:
        """Current use of the given windows (for the limits endpoints)."""
        return await self._read(windows, [f"dp:{owner}:{model}:{kind}:{w.name}" for w in windows])

    async def cost_usage(self, owner: str, windows: Sequence[Window]) -> list[WindowState]:
        """Current use of a project's cost windows (nano-USD), across its models."""
        return await self._read(windows, [f"dp:{owner}:c:{w.name}" for w in windows])

    async def _read(self, windows: Sequence[Window], keys: list[str]) -> list[WindowState]:
        now = self.clock()
        counters = [counter(key, w, now) for key, w in zip(keys, windows, strict=True)]

        async def states(s: Storage) -> list[WindowState]:
            return _states(windows, await read(s, counters, now))

        return await self.guard.run(states, [WindowState(w, _ZERO) for w in windows])


def _settlement(
    scopes: Sequence[Scope], tokens: int, cost_nano_usd: int, when: float
) -> tuple[list[Read], list[int]]:
    """The windows a settlement changes (in the calendar periods of ``when`` the request was
    admitted), with the amount for each."""
    windows: list[Read] = []
    amounts: list[int] = []
    for scope in scopes:
        token_counters, cost_counters = scope.counters_at(when)
        if tokens and token_counters:
            windows += token_counters
            amounts += [tokens] * len(token_counters)
        if cost_nano_usd and cost_counters:
            windows += cost_counters
            amounts += [cost_nano_usd] * len(cost_counters)
    return windows, amounts


class Admission:
    """What admitting a request to some scopes takes, worked out once per scopes (a plan
    keeps it): every scope's token and cost windows (refused when full), then every scope's
    request windows (refused when the request would pass the limit), in the order the
    storage checks them, with the amount each gets (``kinds``: 0 the token reservation, 1
    the cost reservation, 2 the request), and the slot sets of the scopes with a
    concurrency cap."""

    __slots__ = (
        "acquired",
        "acquired_at",
        "acquired_limits",
        "acquired_owners",
        "acquired_windows",
        "calendars",
        "cells",
        "checks",
        "cost_counters",
        "counted",
        "counted_limits",
        "fast",
        "kinds",
        "limits",
        "modes",
        "owners",
        "period",
        "request_windows",
        "scopes",
        "slots",
        "token_at",
        "token_counters",
        "token_windows",
        "unacquired",
        "windows",
    )

    def __init__(self, scopes: Sequence[Scope]) -> None:
        self.scopes = tuple(scopes)
        self.period = [-math.inf, math.inf]
        self._build()

    def current(self, now: float) -> None:
        """Its counters made for ``now`` (a calendar period of a scope ended)."""
        for scope in self.scopes:
            scope.current(now)
        self._build()

    def _build(self) -> None:
        scopes = self.scopes
        self.period[:] = (
            max((s.period[0] for s in scopes), default=-math.inf),
            min((s.period[1] for s in scopes), default=math.inf),
        )
        windows: list[Read] = []
        limits: list[int] = []
        kinds: list[int] = []
        owners: list[Scope] = []
        spans: list[tuple[int, int, Scope]] = []
        for scope in scopes:
            start = len(windows)
            windows += scope.checked
            limits += scope.checked_limits
            kinds += [0] * len(scope.token_counters) + [1] * len(scope.cost_counters)
            owners += [scope] * len(scope.checked)
            if scope.token_windows:
                spans.append((start, len(windows), scope))
        self.checks = len(windows)
        for scope in scopes:
            windows += scope.counted
            limits += scope.counted_limits
            owners += [scope] * len(scope.counted)
        kinds += [2] * (len(windows) - self.checks)
        self.windows, self.limits, self.kinds, self.owners = windows, limits, kinds, owners
        # (2: counted, not limited: the storage need not read it, only count in it)
        self.modes = [
            2 if limit >= UNLIMITED else int(index >= self.checks)
            for index, limit in enumerate(limits)
        ]
        # Where the limited token windows' counts are in a storage's answer, and those
        # windows (the headers' tightest token window is one of them).
        self.token_at = [
            start + i
            for start, _, scope in spans
            for i, w in enumerate(scope.token_windows)
            if w.limited
        ]
        self.token_windows = tuple(w for _, _, s in spans for w in s.token_windows if w.limited)
        self.request_windows = tuple(chain.from_iterable(s.request_windows for s in scopes))
        self.slots = [(s.slot_set, s.concurrency) for s in scopes if s.concurrency is not None]
        self.counted = windows[self.checks :]
        self.counted_limits = limits[self.checks :]
        # In memory, the limited request windows are acquired (read, checked, counted) and
        # the others only counted once they passed (nothing reads them: never full, never
        # the tightest).
        limited = [i for i in range(self.checks, len(windows)) if limits[i] < UNLIMITED]
        self.acquired = [windows[i] for i in limited]
        self.acquired_at = limited
        self.acquired_limits = [limits[i] for i in limited]
        self.acquired_owners = [owners[i] for i in limited]
        self.acquired_windows = tuple(w for w in self.request_windows if w.limited)
        self.unacquired = [windows[i] for i in range(self.checks, len(windows)) if i not in limited]
        self.token_counters = list(chain.from_iterable(s.token_counters for s in scopes))
        self.cost_counters = list(chain.from_iterable(s.cost_counters for s in scopes))
        # In memory, all of it in one call (LocalCounters.admit): the limited token and cost
        # windows (the token ones tagged: one may be the tightest), the limited request
        # windows, then every window counted with its amount's kind (a window named twice
        # would be counted twice between its checks: never fast).
        checks = tuple(
            (counter, window.limit, window if i < scope.limited_tokens else None)
            for scope in scopes
            for i, (counter, window) in enumerate(
                zip(scope.limited, scope.limited_windows, strict=True)
            )
        )
        requests = tuple(
            zip(self.acquired, self.acquired_limits, self.acquired_windows, strict=True)
        )
        adds = (
            tuple((c, 2) for c in self.acquired + self.unacquired)
            + tuple((c, 0) for c in self.token_counters)
            + tuple((c, 1) for c in self.cost_counters)
        )
        distinct = len({c for c, _ in adds}) == len(adds)
        self.fast = (checks, requests, adds) if distinct else None
        self.cells: Cells | None = None

    def cells_on(self, local: LocalCounters) -> Cells:
        """:attr:`fast` on ``local``'s records (:meth:`LocalCounters.cell`), kept while no
        record is dropped (its ``epoch``): the one call's arguments, but the amounts."""
        fast = None
        if self.fast is not None:
            cell = local.cell
            checks, requests, adds = self.fast
            fast = (
                tuple((cell(c), c[1], limit, tag) for c, limit, tag in checks),
                tuple((cell(c), c[1], limit, tag) for c, limit, tag in requests),
                tuple(
                    tuple((cell(c), c[1]) for c, k in adds if c[1] >= 0 and k == kind)
                    for kind in range(3)
                ),
                tuple(
                    tuple(cell(c) for c, k in adds if c[1] < 0 and k == kind) for kind in range(3)
                ),
            )
        cells: Cells = (local, local.epoch, fast)
        self.cells = cells
        return cells


# Admission.cells: the counters, their epoch, LocalCounters.admit's arguments on their
# records (None: not to be used).
Cells = tuple[
    LocalCounters,
    int,
    tuple[
        tuple[tuple[list[int], int, int, Window | None], ...],
        tuple[tuple[list[int], int, int, Window], ...],
        tuple[tuple[tuple[list[int], int], ...], ...],
        tuple[tuple[list[int], ...], ...],
    ]
    | None,
]


class _Batch:
    """One request's admission: the scopes' :class:`Admission` with its amounts."""

    __slots__ = ("admission", "member", "now", "on", "reserved", "slots")

    def __init__(
        self, admission: Admission, tokens: int, cost: int, member: str, now: float
    ) -> None:
        self.admission = admission
        self.on: Storage | None = None  # where it was admitted (None: not yet, or nowhere)
        self.now = now
        self.reserved = (tokens, cost)
        self.member = member
        self.slots = admission.slots if member else []

    @property
    def amounts(self) -> list[int]:
        by_kind = (self.reserved[0], self.reserved[1], 1)
        return [by_kind[kind] for kind in self.admission.kinds]

    @property
    def windows(self) -> list[Read]:
        return self.admission.windows

    @property
    def checks(self) -> int:
        return self.admission.checks

    def args(
        self,
    ) -> tuple[list[Read], list[int], list[int], list[int], list[tuple[str, int]], str]:
        a = self.admission
        return a.windows, a.limits, a.modes, self.amounts, self.slots, self.member


async def _admit(
    s: Storage, batch: _Batch, left: Callable[[_Batch, Any], None] | None = None
) -> tuple[WindowState | None, WindowState | None]:
    """``batch`` admitted on ``s``; on Redis, when the request is cancelled before the
    answer, ``left`` gives back what Redis took (see :meth:`Limiter._left`)."""
    if isinstance(s, LocalCounters):
        states = _admit_now(s, batch.admission, *batch.reserved, batch.member, batch.now)
        batch.on = s
        return states
    a = batch.admission
    future, prepared = s.admit_soon(
        a.windows, a.limits, a.modes, batch.amounts, batch.slots, batch.member
    )
    try:
        flat = await future
    except asyncio.CancelledError:
        if left is not None:
            s.when_left(future, functools.partial(left, batch))
        raise
    refused, counts = s.admitted(
        flat, prepared, len(a.windows), batch.slots, batch.member, batch.now
    )
    if refused:
        _refuse(batch, refused, counts)
    batch.on = s
    return _admitted(batch, counts)


def _admit_now(
    local: LocalCounters, admission: Admission, tokens: int, cost: int, member: str, now: float
) -> tuple[WindowState | None, WindowState | None]:
    """:func:`_admit` on in-process counters: done before it returns, so one step (nothing
    else runs on the loop meanwhile).  Every window checked and the slots, then everything
    counted, in one call (this runs on every request); a refusal, rare, is said by
    :func:`admit_in_steps`."""
    cells = admission.cells
    if cells is None or cells[0] is not local or cells[1] != local.epoch:
        cells = admission.cells_on(local)
    fast = cells[2]
    if fast is not None:
        slots = local.slots
        taken = admission.slots if member else ()
        for key, limit in taken:
            if len(slots.get(key, ())) >= limit:
                break
        else:
            admitted = local.admit(*fast, (tokens, cost, 1), now)
            if admitted is not None:
                for key, _ in taken:
                    slots.setdefault(key, set()).add(member)
                # The tightest windows' states (the token one's counts read before the
                # request's reservation was added: the headers count it).
                request, token = admitted
                request_state = token_state = None
                if request is not None:
                    window = request[0]
                    request_state = WindowState(
                        window, request[1], window.limit - request[2], request[3]
                    )
                if token is not None:
                    window, counts = token[0], token[1]
                    # (its current bucket empty, the reservation goes in it: it empties
                    # when that bucket does, not when the previous one does)
                    reset = _held(window, counts) if tokens and counts[2] <= 0 else token[3]
                    token_state = WindowState(
                        window, counts, window.limit - token[2] + tokens, reset
                    )
                return request_state, token_state
    return admit_in_steps(local, admission, tokens, cost, member, now)


def admit_in_steps(
    local: LocalCounters, admission: Admission, tokens: int, cost: int, member: str, now: float
) -> tuple[WindowState | None, WindowState | None]:
    """An admission on in-process counters (:meth:`Limiter.admit_now`'s one call) window by
    window, each step as the storage takes it: the scopes' token and cost windows read and
    checked, the request counted in every request window or in none, then the reservation
    added.  It raises the 429 of what refuses (or admits: what the one call would have, as
    when it is not to be used)."""
    token: Tight | None = None
    for scope in admission.scopes:
        if scope.limited:  # (the others are never full nor the tightest)
            counts = local.read_many(scope.limited, now)
            token, full = _scan(scope.limited_windows, counts, scope.limited_tokens, token)
            if full:
                _refuse_checked(scope, local.read_many(scope.checked, now))
    slots = local.slots
    taken = admission.slots if member else ()
    for key, limit in taken:
        if len(slots.get(key, ())) >= limit:
            raise ConcurrencyLimited(limit)
    request: Tight | None = None
    if admission.acquired:
        acquired = local.acquire_many(admission.acquired, admission.acquired_limits, 1, now)
        if isinstance(acquired, int):  # (the windows before it taken back)
            scope = admission.acquired_owners[acquired]
            reads = local.read_many(scope.counted, now)
            _refuse_counted(scope, reads, admission.acquired[acquired])
        request = _scan(admission.acquired_windows, acquired, len(acquired), None)[0]
    if admission.unacquired:
        local.add_many(admission.unacquired, 1, now)
    if tokens and admission.token_counters:
        local.add_many(admission.token_counters, tokens, now)
        if token is not None:  # (the headers count the request's own reservation)
            token = (token[0], token[1], token[2] - tokens)
    if cost and admission.cost_counters:
        local.add_many(admission.cost_counters, cost, now)
    for key, _ in taken:
        slots.setdefault(key, set()).add(member)
    token_state = _state(token)
    if token_state is not None and tokens and token_state.counts[2] <= 0:
        token_state.reset = _held(token_state.window, token_state.counts)
    return _state(request), token_state


def _held(window: Window, counts: Counts) -> float:
    """When a token window whose current bucket was empty (counts read before the request's
    reservation went in) empties, now that it holds the reservation: when that bucket does,
    or its period ends (the ``x-ratelimit-reset-tokens`` that goes with a remaining count
    that holds it)."""
    previous, previous_ttl, _, current_ttl = counts
    return seconds_to_empty(window, (previous, previous_ttl, 1, current_ttl))


def _refuse(batch: _Batch, refused: int, counts: list[Counts]) -> NoReturn:
    """The 429 of a refused admission, from the counts of that instant: the refusing
    scope's windows (all of them: the message names each) or its slots."""
    if refused > len(batch.windows):
        raise _over_concurrency(batch, refused)
    owners = batch.admission.owners
    scope = owners[refused - 1]
    checked = refused <= batch.checks
    part = range(batch.checks) if checked else range(batch.checks, len(owners))
    mine = [counts[i] for i in part if owners[i] is scope]
    if checked:
        _refuse_checked(scope, mine)
    _refuse_counted(scope, mine, batch.windows[refused - 1])


def _admitted(batch: _Batch, counts: list[Counts]) -> tuple[WindowState | None, WindowState | None]:
    """The tightest request and token windows of an admission (the rate-limit headers):
    of the limited ones (the others are never the tightest), in the scopes' order."""
    admission = batch.admission
    token: Tight | None = None
    if at := admission.token_at:
        windows = admission.token_windows
        token = _scan(windows, [counts[i] for i in at], len(windows), None)[0]
    request: Tight | None = None
    if at := admission.acquired_at:
        windows = admission.acquired_windows
        request = _scan(windows, [counts[i] for i in at], len(windows), None)[0]
    return _state(request), _state(token)


def _over_concurrency(batch: _Batch, refused: int) -> ConcurrencyLimited:
    """The 429 of a scope whose slots are all taken."""
    return ConcurrencyLimited(batch.slots[refused - len(batch.windows) - 1][1])


def _refuse_counted(scope: Scope, counts: Sequence[Counts], refused: Read) -> NoReturn:
    """The 429 of a scope whose request window ``refused`` would pass its limit."""
    reads = _states(scope.request_windows, counts)
    blocking = reads[scope.counted.index(refused)]
    raise RateLimited("request", reads, _blocking(reads) or blocking)


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
        if (
            index < select
            and left < FAR
            and (
                tight is None
                or left < tight[2]
                or (
                    left == tight[2]
                    and seconds_to_empty(window, c) > seconds_to_empty(tight[0], tight[1])
                )
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
    """Seconds until the window is empty: the current bucket's ttl, or the previous one's
    (a calendar window: its period's end)."""
    _, previous_ttl, current, current_ttl = counts
    if window.calendar is not None:
        return current_ttl if current > 0 else 0.0
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
