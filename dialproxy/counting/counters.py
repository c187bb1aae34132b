"""In-process counters: the ``limits`` library's sliding window counter, kept natively.

The limiter reads or counts a handful of sliding windows on every request.  ``limits``'
``MemoryStorage`` keeps a window as two keys, ``{key}/{bucket}`` for the current and the
previous bucket, each with its own expiry, takes an ``asyncio.Lock`` for each increment and
schedules an expiry task on each call: several microseconds per window, most of a
request's limit cost.  :class:`LocalCounters` is a ``MemoryStorage`` whose two
sliding-window calls (``acquire_sliding_window_entry``, ``get_sliding_window``) keep each
window as one small record instead: the two buckets those keys would hold, found by one
dictionary lookup on the limiter's precomputed ``(key, seconds)`` pair.  The arithmetic
is ``limits``' own, and a differential test checks that every answer is the one
``MemoryStorage`` gives.  (A bucket older than the previous one can never be read again,
and a bucket's expiry, two window lengths after its first count, never falls while it is
the current or the previous one: so two buckets per window say all that the keys say.)

On one event loop a call that never awaits cannot interleave with another: no locks.
Beside the ``limits`` calls, the limiter's batch calls, each one synchronous step at one
instant: :meth:`~LocalCounters.read_many` (the token and cost checks),
:meth:`~LocalCounters.acquire_many` (a request counted in all its windows or in none),
:meth:`~LocalCounters.add_many` (usage recorded) and :meth:`~LocalCounters.take_back`.
Windows that have not been counted in for two lengths are swept once a minute.

A calendar window (a day, week or month on DIAL's ``rateLimitSchedule``) is a plain
counter of one period: its ``Read`` is ``(key@start, -end)``, a negative length naming the
period's end (epoch seconds), when it lapses; its counts are ``(0, 0.0, count, seconds to
the end)``, so the sliding arithmetic reads it as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import floor
from typing import TypeVar

from limits.aio.storage import MemoryStorage

from dialproxy.config.model import UNLIMITED

SWEEP_EVERY = 60.0

# (previous count, its ttl, current count, its ttl): what ``get_sliding_window`` answers.
Counts = tuple[int, float, int, float]
# A window: (key, length in seconds), or a calendar period's counter: (key@start, -end).
Read = tuple[str, int]

T = TypeVar("T")
# The tightest window of an admission: its tag, counts, what is left of its limit, and the
# seconds until it is empty.
Tightest = tuple[T, Counts, int, float]
# More left than this: an unlimited window (counted, never the tightest).
FAR = UNLIMITED // 2
# Below this an int is its float exactly: ``int(0.0 + count)``, the sliding arithmetic of a
# window with no previous count, is ``count``.
_EXACT = 2**53


class LocalCounters(MemoryStorage):
    def __init__(self, sweep_every: float = SWEEP_EVERY) -> None:
        """``sweep_every``: the seconds between two sweeps of the stale records (done by
        the call that finds one due; ``math.inf``: only when :meth:`sweep` is called)."""
        super().__init__()
        # (key, seconds) -> [last bucket counted in, its count, the one before, its count]
        # (a bucket is int(time / seconds), as in limits).
        self.windows: dict[Read, list[int]] = {}
        self.slots: dict[str, set[str]] = {}  # slot set -> the members that hold a slot
        self.sweep_every = sweep_every
        self._next_sweep = time.time() + sweep_every
        # Counted up when records are dropped: records kept outside (cell) are stale then.
        self.epoch = 0

    def _add(self, window: Read, amount: int, now: float) -> None:
        """``amount`` added to the bucket of ``now``."""
        record = self.windows.get(window)
        if window[1] < 0:  # a calendar period: [end, count, -1, 0]
            if record is None:
                self.windows[window] = [-window[1], amount, -1, 0]
            else:
                record[1] += amount
            return
        now_bucket = int(now / window[1])
        if record is None:
            self.windows[window] = [now_bucket, amount, -1, 0]
        elif record[0] == now_bucket:
            record[1] += amount
        else:
            # A new bucket: the last one is kept, as the only one that can still be read
            # (as the previous bucket).  The clock is taken to move forward, as limits'
            # own sliding windows take it.
            record[:] = now_bucket, amount, record[0], record[1]

    def _take_back(self, window: Read, amount: int, now: float, previous_too: bool = False) -> None:
        """limits' ``decr`` of the current bucket (never below zero); ``previous_too``: what
        the current bucket lacks is taken from the previous one."""
        record = self.windows.get(window)
        if record is None:
            return
        if window[1] < 0:
            record[1] = max(record[1] - amount, 0)
            return
        now_bucket = int(now / window[1])
        if record[0] == now_bucket:
            here = min(record[1], amount)
            record[1] -= here
            amount -= here
            if previous_too and amount and record[2] == now_bucket - 1:
                record[3] = max(record[3] - amount, 0)
        elif previous_too and record[0] == now_bucket - 1:
            record[1] = max(record[1] - amount, 0)

    def read_many(self, windows: Sequence[Read], now: float | None = None) -> list[Counts]:
        """``get_sliding_window`` of each window, at one instant: limits'
        ``MemoryStorage._get_sliding_window_info``, the buckets of ``now`` and of one window
        length before, with their time to live.  (One loop, no call per window: this runs
        for every limited window of every request.)"""
        if now is None:
            now = time.time()
        records = self.windows
        counts: list[Counts] = []
        for window in windows:
            expiry = window[1]
            record = records.get(window)
            if expiry < 0:  # a calendar period
                left = -expiry - now
                count = record[1] if record is not None and left > 0 else 0
                counts.append((0, 0.0, count, max(left, 0.0)))
                continue
            current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
            if record is None:
                counts.append((0, 0.0, 0, current_ttl))
                continue
            bucket, count, other, other_count = record
            current = count if bucket == int(now / expiry) else 0
            previous_bucket = int((now - expiry) / expiry)
            if bucket == previous_bucket:
                previous = count
            elif other == previous_bucket:
                previous = other_count
            else:
                counts.append((0, 0.0, current, current_ttl))
                continue
            if previous:
                previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
                counts.append((previous, previous_ttl, current, current_ttl))
            else:  # (a bucket taken back to 0)
                counts.append((0, 0.0, current, current_ttl))
        return counts

    def acquire_many(
        self,
        windows: Sequence[Read],
        limits: Sequence[int],
        amount: int = 1,
        now: float | None = None,
    ) -> list[Counts] | int:
        """``amount`` acquired in every window (distinct windows, each with its limit), or in
        none: the counts with it added, or the index of the window that refused (the ones
        before it are taken back).  Each as limits' ``acquire_sliding_window_entry``."""
        if now is None:
            now = time.time()
        # read_many and _add in one pass, each window looked up once: this runs for every
        # request window of every request.  (The differential test holds both to limits.)
        records = self.windows
        counts: list[Counts] = []
        for index, window in enumerate(windows):
            expiry = window[1]
            if expiry < 0:  # a calendar period: a plain counter until its end
                record = records.get(window)
                current = record[1] if record is not None else 0
                if current + amount > limits[index]:
                    for done in windows[:index]:
                        self._take_back(done, amount, now)
                    return index
                if record is None:
                    records[window] = [-expiry, amount, -1, 0]
                else:
                    record[1] += amount
                counts.append((0, 0.0, current + amount, max(-expiry - now, 0.0)))
                continue
            now_bucket = int(now / expiry)
            current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
            record = records.get(window)
            previous, previous_ttl, current = 0, 0.0, 0
            if record is not None:
                bucket, count, other, other_count = record
                if bucket == now_bucket:
                    current = count
                previous_bucket = int((now - expiry) / expiry)
                if bucket == previous_bucket:
                    previous = count
                elif other == previous_bucket:
                    previous = other_count
                if previous:
                    previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
            if floor(previous * previous_ttl / expiry + current) + amount > limits[index]:
                for done in windows[:index]:
                    self._take_back(done, amount, now)
                return index
            if record is None:
                records[window] = [now_bucket, amount, -1, 0]
            elif record[0] == now_bucket:
                record[1] += amount
            else:  # a new bucket (see _add)
                record[:] = now_bucket, amount, record[0], record[1]
            counts.append((previous, previous_ttl, current + amount, current_ttl))
        if now >= self._next_sweep:
            self.sweep(now)
        return counts

    def cell(self, window: Read) -> list[int]:
        """The record of ``window``, made blank if it has none, for a caller to keep while
        :attr:`epoch` stays.  (A blank record reads, counts and takes back as no record: a
        sliding window's names bucket -1, that ``now`` never is; a calendar period's counts
        0.  The sweep drops it as it would drop a record gone stale.)"""
        record = self.windows.get(window)
        if record is None:
            seconds = window[1]
            record = [-seconds if seconds < 0 else -1, 0, -1, 0]
            self.windows[window] = record
        return record

    def admit(
        self,
        checks: Sequence[tuple[list[int], int, int, T | None]],
        requests: Sequence[tuple[list[int], int, int, T]],
        sliding: Sequence[Sequence[tuple[list[int], int]]],
        calendars: Sequence[Sequence[list[int]]],
        amounts: tuple[int, int, int],
        now: float,
    ) -> tuple[Tightest[T] | None, Tightest[T] | None] | None:
        """A whole admission in one call on records kept (:meth:`cell`), or nothing done
        (None) when a window refuses.

        ``checks``: windows read (as :meth:`read_many`) and full when nothing is left of
        their limit, each ``(record, seconds, limit, tag)``; ``requests``: windows that must
        take one more (as :meth:`acquire_many`, all or none); then every window counted (as
        :meth:`add_many`), by kind: the ``sliding`` ones ``(record, seconds)`` and the
        calendar periods' records, each kind's amount ``amounts[kind]`` (0 adds nothing).
        The answer: of the ``requests`` (their counts with the request in them) and of the
        ``checks`` with a tag, the tightest: its tag, counts and what is left (least left,
        then the last to empty; :data:`FAR` or more left is unlimited, never the tightest).
        (Everything is checked before anything is counted, so a refusal changes nothing: the
        caller's slow path then says why.  A window's counts are worked out only when it may
        be the tightest.)"""
        token: Tightest[T] | None = None
        for record, expiry, limit, tag in checks:
            if expiry < 0:  # a calendar period: [end, count, -1, 0]
                left = -expiry - now
                count = record[1] if left > 0 else 0
                free = limit - (count if count < _EXACT else int(0.0 + count))
                if free <= 0:
                    return None
                if tag is not None and free < FAR and (token is None or free <= token[2]):
                    empties = left if count > 0 else 0.0
                    if token is None or free < token[2] or empties > token[3]:
                        token = (tag, (0, 0.0, count, left if left > 0 else 0.0), free, empties)
                continue
            bucket, count, other, other_count = record
            current = count if bucket == int(now / expiry) else 0
            previous_bucket = int((now - expiry) / expiry)
            if bucket == previous_bucket:
                previous = count
            elif other == previous_bucket:
                previous = other_count
            else:
                previous = 0
            if previous:
                previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
                free = limit - int(previous * previous_ttl / expiry + current)
            else:  # (a bucket taken back to 0 too)
                previous_ttl = 0.0
                free = limit - (current if current < _EXACT else int(0.0 + current))
            if free <= 0:
                return None
            if tag is not None and free < FAR and (token is None or free <= token[2]):
                ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
                empties = previous_ttl  # (seconds until it is empty)
                if current > 0:
                    empties = ttl if ttl > expiry else float(expiry)
                if token is None or free < token[2] or empties > token[3]:
                    token = (tag, (previous, previous_ttl, current, ttl), free, empties)
        request: Tightest[T] | None = None
        for record, expiry, limit, tag in requests:
            if expiry < 0:
                current = record[1] + 1
                if current > limit:
                    return None
                free = limit - (current if current < _EXACT else int(0.0 + current))
                if free < FAR and (request is None or free <= request[2]):
                    left = -expiry - now
                    ttl = left if left > 0 else 0.0
                    if request is None or free < request[2] or ttl > request[3]:
                        request = (tag, (0, 0.0, current, ttl), free, ttl)
                continue
            bucket, count, other, other_count = record
            current = count if bucket == int(now / expiry) else 0
            previous_bucket = int((now - expiry) / expiry)
            if bucket == previous_bucket:
                previous = count
            elif other == previous_bucket:
                previous = other_count
            else:
                previous = 0
            if previous:
                previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
                if floor(previous * previous_ttl / expiry + current) + 1 > limit:
                    return None
                free = limit - int(previous * previous_ttl / expiry + (current + 1))
            else:
                previous_ttl = 0.0
                if current < _EXACT:
                    if current + 1 > limit:
                        return None
                    free = limit - (current + 1)
                else:
                    if floor(0.0 + current) + 1 > limit:
                        return None
                    free = limit - int(0.0 + (current + 1))
            if free < FAR and (request is None or free <= request[2]):
                ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
                empties = ttl if ttl > expiry else float(expiry)  # (its current count > 0)
                if request is None or free < request[2] or empties > request[3]:
                    request = (tag, (previous, previous_ttl, current + 1, ttl), free, empties)
        for kind, periods in enumerate(calendars):
            amount = amounts[kind]
            if amount:
                for record in periods:
                    record[1] += amount
                for record, seconds in sliding[kind]:
                    now_bucket = int(now / seconds)
                    if record[0] == now_bucket:
                        record[1] += amount
                    else:  # a new bucket (see _add)
                        record[:] = now_bucket, amount, record[0], record[1]
        if now >= self._next_sweep:
            self.sweep(now)
        return request, token

    def change_cells(
        self,
        cells: Sequence[tuple[Sequence[tuple[list[int], int]], Sequence[list[int]]]],
        amounts: Sequence[int],
        now: float,
    ) -> None:
        """:meth:`change_kinds` on records kept (:meth:`cell`): for each kind, its sliding
        windows ``(record, seconds)`` and its calendar periods' records, changed by
        ``amounts[kind]``."""
        for (sliding, periods), amount in zip(cells, amounts, strict=True):
            if amount > 0:  # (add_many's)
                for record in periods:  # [end, count, -1, 0]
                    record[1] += amount
                for record, seconds in sliding:
                    now_bucket = int(now / seconds)
                    if record[0] == now_bucket:
                        record[1] += amount
                    else:  # a new bucket (see _add)
                        record[:] = now_bucket, amount, record[0], record[1]
            elif amount < 0:  # (take_back_many's)
                amount = -amount
                for record in periods:
                    left = record[1] - amount
                    record[1] = left if left > 0 else 0
                for record, seconds in sliding:
                    now_bucket = int(now / seconds)
                    bucket = record[0]
                    if bucket == now_bucket:
                        count = record[1]
                        if count >= amount:
                            record[1] = count - amount
                        else:
                            record[1] = 0
                            if record[2] == now_bucket - 1:
                                left = record[3] - (amount - count)
                                record[3] = left if left > 0 else 0
                    elif bucket == now_bucket - 1:
                        left = record[1] - amount
                        record[1] = left if left > 0 else 0
        if now >= self._next_sweep and (amounts[0] > 0 or amounts[1] > 0):
            self.sweep(now)

    def add_many(self, windows: Sequence[Read], amount: int, now: float | None = None) -> None:
        """``amount`` added to every window, whatever its limit (usage after a response).
        (:meth:`_add` inline: this runs for every token and cost window of every request.)"""
        if now is None:
            now = time.time()
        records = self.windows
        for window in windows:
            seconds = window[1]
            record = records.get(window)
            if seconds < 0:  # a calendar period: [end, count, -1, 0]
                if record is None:
                    records[window] = [-seconds, amount, -1, 0]
                else:
                    record[1] += amount
                continue
            now_bucket = int(now / seconds)
            if record is None:
                records[window] = [now_bucket, amount, -1, 0]
            elif record[0] == now_bucket:
                record[1] += amount
            else:  # a new bucket (see _add)
                record[:] = now_bucket, amount, record[0], record[1]
        if now >= self._next_sweep:
            self.sweep(now)

    def take_back_many(self, windows: Sequence[Read], amount: int, now: float) -> None:
        """``_take_back(window, amount, now, previous_too=True)`` of every window, inline
        (a settlement that used less than its reservation: most requests)."""
        records = self.windows
        for window in windows:
            record = records.get(window)
            if record is None:
                continue
            seconds = window[1]
            if seconds < 0:
                left = record[1] - amount
                record[1] = left if left > 0 else 0
                continue
            now_bucket = int(now / seconds)
            bucket = record[0]
            if bucket == now_bucket:
                count = record[1]
                if count >= amount:
                    record[1] = count - amount
                else:
                    record[1] = 0
                    if record[2] == now_bucket - 1:
                        left = record[3] - (amount - count)
                        record[3] = left if left > 0 else 0
            elif bucket == now_bucket - 1:
                left = record[1] - amount
                record[1] = left if left > 0 else 0

    def settle(
        self,
        windows: Sequence[Read],
        amounts: Sequence[int],
        slots: Sequence[str] = (),
        member: str = "",
        now: float | None = None,
    ) -> None:
        """Signed amounts added: a negative one taken from the current bucket, and what it
        lacks from the previous one (as Redis does); ``member``'s ``slots`` freed."""
        for key in slots:
            if (members := self.slots.get(key)) is not None:
                members.discard(member)
                if not members:
                    del self.slots[key]
        if now is None:
            now = time.time()
        for window, amount in zip(windows, amounts, strict=True):
            if amount > 0:
                self._add(window, amount, now)
            elif amount < 0:
                self._take_back(window, -amount, now, previous_too=True)

    def change_many(self, windows: Sequence[Read], amount: int, now: float) -> None:
        """:meth:`settle` with one signed amount for every window."""
        if amount > 0:
            self.add_many(windows, amount, now)
        elif amount < 0:
            self.take_back_many(windows, -amount, now)

    def change_kinds(
        self, windows: Sequence[tuple[Read, int]], amounts: tuple[int, int], now: float
    ) -> None:
        """:meth:`change_many` of each window with its amount, ``amounts[kind]`` (a
        settlement's tokens and cost in periods its scope no longer keeps records for: rare,
        the usual one is :meth:`change_cells`)."""
        for window, kind in windows:
            if amount := amounts[kind]:
                self.change_many((window,), amount, now)

    def take_back(self, key: str, seconds: int, amount: int = 1) -> None:
        """Undo ``acquire_sliding_window_entry(key, ..., seconds, amount)``."""
        self._take_back((key, seconds), amount, time.time())

    def sweep(self, now: float) -> None:
        """Drop the records no read counts any more (a sliding window's buckets older than
        the previous one, a calendar period's counter past its end)."""
        self._next_sweep = now + self.sweep_every
        stale = [
            w
            for w, record in self.windows.items()
            if (record[0] <= now if w[1] < 0 else record[0] < int(now / w[1]) - 1)
        ]
        for window in stale:
            del self.windows[window]
        if stale:
            self.epoch += 1

    async def reset(self) -> int | None:
        self.windows.clear()
        self.epoch += 1
        return await super().reset()


# Set after the class is made: limits' Storage.__init_subclass__ wraps these methods in a
# coroutine that only re-raises the storage's own exceptions (a second await per call).
async def _get_sliding_window(self: LocalCounters, key: str, expiry: int) -> Counts:
    return self.read_many([(key, expiry)])[0]


async def _acquire_sliding_window_entry(
    self: LocalCounters, key: str, limit: int, expiry: int, amount: int = 1
) -> bool:
    return not isinstance(self.acquire_many([(key, expiry)], [limit], amount), int)


LocalCounters.get_sliding_window = _get_sliding_window  # type: ignore[method-assign,assignment]
LocalCounters.acquire_sliding_window_entry = _acquire_sliding_window_entry  # type: ignore[method-assign,assignment]
