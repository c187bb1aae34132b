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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import floor

from limits.aio.storage import MemoryStorage

SWEEP_EVERY = 60.0

# (previous count, its ttl, current count, its ttl): what ``get_sliding_window`` answers.
Counts = tuple[int, float, int, float]
# A window: (key, length in seconds).  A window counted into: (window, limit).
Read = tuple[str, int]
Acquire = tuple[Read, int]


class LocalCounters(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        # (key, seconds) -> [last bucket counted in, its count, the one before, its count]
        # (a bucket is int(time / seconds), as in limits).
        self.windows: dict[Read, list[int]] = {}
        self._next_sweep = time.time() + SWEEP_EVERY

    def _counts(self, window: Read, now: float) -> Counts:
        """limits' ``MemoryStorage._get_sliding_window_info``: the buckets of ``now`` and of
        one window length before, with their time to live."""
        expiry = window[1]
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        record = self.windows.get(window)
        if record is None:
            return 0, 0.0, 0, current_ttl
        bucket, count, other, other_count = record
        now_bucket = int(now / expiry)
        previous_bucket = int((now - expiry) / expiry)
        current = count if bucket == now_bucket else 0
        previous = (
            count if bucket == previous_bucket else other_count if other == previous_bucket else 0
        )
        if previous == 0:
            return 0, 0.0, current, current_ttl
        return previous, (1 - (((now - expiry) / expiry) % 1)) * expiry, current, current_ttl

    def _add(self, window: Read, amount: int, now: float) -> int:
        """``amount`` added to the bucket of ``now``: its new count."""
        now_bucket = int(now / window[1])
        record = self.windows.get(window)
        if record is None:
            self.windows[window] = [now_bucket, amount, -1, 0]
            return amount
        if record[0] == now_bucket:
            record[1] += amount
            return record[1]
        # A new bucket: the last one is kept, as the only one that can still be read (as
        # the previous bucket).  The clock is taken to move forward, as limits' own
        # sliding windows take it.
        record[:] = now_bucket, amount, record[0], record[1]
        return amount

    def _acquire(self, window: Read, limit: int, amount: int, now: float) -> Counts | None:
        """limits' ``acquire_sliding_window_entry``: None when refused, else the counts
        with the entry added."""
        if amount > limit:
            return None
        previous, previous_ttl, current, current_ttl = self._counts(window, now)
        if floor(previous * previous_ttl / window[1] + current) + amount > limit:
            return None
        return previous, previous_ttl, self._add(window, amount, now), current_ttl

    def _take_back(self, window: Read, amount: int, now: float) -> None:
        """limits' ``decr`` of the current bucket (never below zero)."""
        record = self.windows.get(window)
        now_bucket = int(now / window[1])
        if record is not None and record[0] == now_bucket:
            record[1] = max(record[1] - amount, 0)

    def read_many(self, windows: Sequence[Read]) -> list[Counts]:
        """``get_sliding_window`` of each window, at one instant."""
        now = time.time()
        return [self._counts(window, now) for window in windows]

    def acquire_many(self, windows: Sequence[Acquire], amount: int = 1) -> list[Counts] | int:
        """``amount`` acquired in every window, or in none: the counts with it added, or the
        index of the window that refused (the ones before it are taken back)."""
        now = time.time()
        counts: list[Counts] = []
        for index, (window, limit) in enumerate(windows):
            state = self._acquire(window, limit, amount, now)
            if state is None:
                for done, _ in windows[:index]:
                    self._take_back(done, amount, now)
                return index
            counts.append(state)
        if now >= self._next_sweep:
            self._sweep(now)
        return counts

    def add_many(self, windows: Sequence[Read], amount: int) -> None:
        """``amount`` added to every window, whatever its limit (usage after a response)."""
        now = time.time()
        for window in windows:
            self._add(window, amount, now)
        if now >= self._next_sweep:
            self._sweep(now)

    def take_back(self, key: str, seconds: int, amount: int = 1) -> None:
        """Undo ``acquire_sliding_window_entry(key, ..., seconds, amount)``."""
        self._take_back((key, seconds), amount, time.time())

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        stale = [w for w, record in self.windows.items() if record[0] < int(now / w[1]) - 1]
        for window in stale:
            del self.windows[window]

    async def reset(self) -> int | None:
        self.windows.clear()
        return await super().reset()


# Set after the class is made: limits' Storage.__init_subclass__ wraps these methods in a
# coroutine that only re-raises the storage's own exceptions (a second await per call).
async def _get_sliding_window(self: LocalCounters, key: str, expiry: int) -> Counts:
    return self._counts((key, expiry), time.time())


async def _acquire_sliding_window_entry(
    self: LocalCounters, key: str, limit: int, expiry: int, amount: int = 1
) -> bool:
    return self._acquire((key, expiry), limit, amount, time.time()) is not None


LocalCounters.get_sliding_window = _get_sliding_window  # type: ignore[method-assign,assignment]
LocalCounters.acquire_sliding_window_entry = _acquire_sliding_window_entry  # type: ignore[method-assign,assignment]
