"""In-process counters: the ``limits`` library's memory storage, made cheap for the hot path.

The limiter makes a handful of sliding-window calls on every request.  ``limits``'
``MemoryStorage`` takes an ``asyncio.Lock`` for each increment and schedules its expiry task
on each call: about 3-5 us a call, most of a request's limit cost.  On one event loop a call
that never awaits cannot interleave with another, so :class:`LocalCounters` answers the
sliding-window calls in plain synchronous code, on the parent's own dictionaries with the
parent's keys and arithmetic: every other ``MemoryStorage`` method (``decr``, ``clear``,
``reset``) still works on the same data.

Beside the two ``limits`` calls it answers (``acquire_sliding_window_entry``,
``get_sliding_window``), it has the batch calls the limiter makes on every request, each
one synchronous step at one instant: :meth:`~LocalCounters.read_many` (the token and cost
checks), :meth:`~LocalCounters.acquire_many` (a request counted in all its windows or in
none) and :meth:`~LocalCounters.add_many` (usage recorded).  Expired counters are swept
once a minute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import floor

from limits.aio.storage import MemoryStorage

SWEEP_EVERY = 60.0

# (previous count, its ttl, current count, its ttl): what ``get_sliding_window`` answers.
Counts = tuple[int, float, int, float]
# A counter read: (key, window seconds).  A counter acquired: (key, limit, window seconds).
Read = tuple[str, int]
Acquire = tuple[str, int, int]


class LocalCounters(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self._next_sweep = time.time() + SWEEP_EVERY

    def _count(self, key: str, now: float) -> int:
        expires = self.expirations.get(key)
        if expires is None:
            return 0
        if expires <= now:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            return 0
        return self.storage.get(key, 0)

    def _window(self, key: str, expiry: int, now: float) -> Counts:
        """The counts as limits' ``MemoryStorage._get_sliding_window_info`` computes them
        (its ``TimestampedSlidingWindow.sliding_window_keys`` and ``get`` inlined: this
        runs for every limited window of every request)."""
        expirations, storage = self.expirations, self.storage
        previous_key = f"{key}/{int((now - expiry) / expiry)}"
        expires = expirations.get(previous_key)
        if expires is None:
            previous = 0
        elif expires <= now:
            previous = 0
            storage.pop(previous_key, None)
            del expirations[previous_key]
        else:
            previous = storage.get(previous_key, 0)
        current_key = f"{key}/{int(now / expiry)}"
        expires = expirations.get(current_key)
        if expires is None:
            current = 0
        elif expires <= now:
            current = 0
            storage.pop(current_key, None)
            del expirations[current_key]
        else:
            current = storage.get(current_key, 0)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def _acquire(self, key: str, limit: int, expiry: int, amount: int, now: float) -> Counts | None:
        """``acquire_sliding_window_entry`` and, when admitted, the counts with the entry."""
        if amount > limit:
            return None
        previous, previous_ttl, current, current_ttl = self._window(key, expiry, now)
        if floor(previous * previous_ttl / expiry + current) + amount > limit:
            return None
        current_key = f"{key}/{int(now / expiry)}"
        self.storage[current_key] = current + amount
        if current == 0:
            self.expirations[current_key] = now + 2 * expiry
        if now >= self._next_sweep:
            self._sweep(now)
        return previous, previous_ttl, current + amount, current_ttl

    def _take_back(self, key: str, expiry: int, amount: int, now: float) -> None:
        """limits' ``decr`` on the current window (never below zero)."""
        current_key = f"{key}/{int(now / expiry)}"
        if current_key in self.storage:
            self.storage[current_key] = max(self.storage[current_key] - amount, 0)

    def read_many(self, counters: Sequence[Read]) -> list[Counts]:
        """``get_sliding_window`` of each counter, at one instant."""
        now = time.time()
        return [self._window(key, expiry, now) for key, expiry in counters]

    def acquire_many(self, counters: Sequence[Acquire], amount: int = 1) -> list[Counts] | int:
        """``amount`` acquired in every counter, or in none: the counts with it added, or the
        index of the counter that refused (the ones before it are taken back)."""
        now = time.time()
        counts: list[Counts] = []
        for index, (key, limit, expiry) in enumerate(counters):
            state = self._acquire(key, limit, expiry, amount, now)
            if state is None:
                for done, _, done_expiry in counters[:index]:
                    self._take_back(done, done_expiry, amount, now)
                return index
            counts.append(state)
        return counts

    def add_many(self, counters: Sequence[Read], amount: int) -> None:
        """``amount`` added to every counter, whatever its limit (usage after a response)."""
        now = time.time()
        for key, expiry in counters:
            current_key = f"{key}/{int(now / expiry)}"
            current = self._count(current_key, now)
            self.storage[current_key] = current + amount
            if current == 0:
                self.expirations[current_key] = now + 2 * expiry
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        for key in [k for k, expires in self.expirations.items() if expires <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            self.locks.pop(key, None)


# Set after the class is made: limits' Storage.__init_subclass__ wraps these methods in a
# coroutine that only re-raises the storage's own exceptions (a second await per call).
async def _get_sliding_window(self: LocalCounters, key: str, expiry: int) -> Counts:
    return self._window(key, expiry, time.time())


async def _acquire_sliding_window_entry(
    self: LocalCounters, key: str, limit: int, expiry: int, amount: int = 1
) -> bool:
    return self._acquire(key, limit, expiry, amount, time.time()) is not None


LocalCounters.get_sliding_window = _get_sliding_window  # type: ignore[method-assign,assignment]
LocalCounters.acquire_sliding_window_entry = _acquire_sliding_window_entry  # type: ignore[method-assign,assignment]
