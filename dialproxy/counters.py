"""In-process counters: the ``limits`` library's memory storage, made cheap for the hot path.

The limiter makes a handful of sliding-window calls on every request.  ``limits``'
``MemoryStorage`` takes an ``asyncio.Lock`` for each increment and schedules its expiry task
on each call: about 3-5 us a call, most of a request's limit cost.  On one event loop a call
that never awaits cannot interleave with another, so :class:`LocalCounters` answers the two
calls the limiter makes (``acquire_sliding_window_entry``, ``get_sliding_window``) in plain
synchronous code, on the parent's own dictionaries with the parent's keys and arithmetic:
every other ``MemoryStorage`` method (``decr`` for a take-back, ``clear``, ``reset``) still
works on the same data.  ``acquire_sliding_window_state`` does both calls in one (an
admitted request's window read back for the headers).  Expired counters are swept once a
minute.
"""

from __future__ import annotations

import time
from math import floor

from limits.aio.storage import MemoryStorage

SWEEP_EVERY = 60.0


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

    def _window(self, key: str, expiry: int, now: float) -> tuple[int, float, int, float, str]:
        """(previous count, its ttl, current count, its ttl, the current key), as limits'
        ``MemoryStorage._get_sliding_window_info`` computes them."""
        # limits' TimestampedSlidingWindow.sliding_window_keys, inlined (a call per read).
        previous_key = f"{key}/{int((now - expiry) / expiry)}"
        current_key = f"{key}/{int(now / expiry)}"
        previous = self._count(previous_key, now)
        current = self._count(current_key, now)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl, current_key

    async def acquire_sliding_window_state(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> tuple[int, float, int, float] | None:
        """``acquire_sliding_window_entry`` and ``get_sliding_window`` in one call: None
        when refused, else the window's counts with the entry added."""
        return self._acquire(key, limit, expiry, amount)

    def _acquire(
        self, key: str, limit: int, expiry: int, amount: int
    ) -> tuple[int, float, int, float] | None:
        if amount > limit:
            return None
        now = time.time()
        previous, previous_ttl, current, current_ttl, current_key = self._window(key, expiry, now)
        if floor(previous * previous_ttl / expiry + current) + amount > limit:
            return None
        self.storage[current_key] = current + amount
        if current == 0:
            self.expirations[current_key] = now + 2 * expiry
        if now >= self._next_sweep:
            self._sweep(now)
        return previous, previous_ttl, current + amount, current_ttl

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        for key in [k for k, expires in self.expirations.items() if expires <= now]:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
            self.locks.pop(key, None)


# Set after the class is made: limits' Storage.__init_subclass__ wraps these methods in a
# coroutine that only re-raises the storage's own exceptions (a second await per call).
async def _get_sliding_window(
    self: LocalCounters, key: str, expiry: int
) -> tuple[int, float, int, float]:
    previous, previous_ttl, current, current_ttl, _ = self._window(key, expiry, time.time())
    return previous, previous_ttl, current, current_ttl


async def _acquire_sliding_window_entry(
    self: LocalCounters, key: str, limit: int, expiry: int, amount: int = 1
) -> bool:
    return self._acquire(key, limit, expiry, amount) is not None


LocalCounters.get_sliding_window = _get_sliding_window  # type: ignore[method-assign,assignment]
LocalCounters.acquire_sliding_window_entry = _acquire_sliding_window_entry  # type: ignore[method-assign,assignment]
