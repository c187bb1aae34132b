"""The counter storage, and what the limits mean while it fails.

Every counter lives in one storage: memory (one process, :class:`~dialproxy.counting.counters.
LocalCounters`) or Redis (every instance behind a load balancer shares it, :class:`~dialproxy.
rediscounters.RedisCounters`).  :class:`StorageGuard` stands between the
limiter and that storage.  While the storage answers, every operation goes to it.  When a
call fails (refused, timed out, any error), the guard marks the storage unhealthy, counts
the failure, and from then on answers by the failure policy without calling the storage
at all, so an outage costs at most one call timeout (0.25 s; 0.5 s to connect) to the
requests in flight when it starts.
A background probe tries the storage every :data:`PROBE_INTERVAL` seconds (fresh
connections, Lua scripts loaded); the first success makes it healthy again and shared
counting resumes.  Up or down is a :class:`StorageHealth` of its own, which the shared keys
share when they live in the same Redis (:mod:`dialproxy.sharedkeys`): one outage, logged
once when it starts and once when it ends, one probe, one policy for both.

The policies (``--storage-failure``):

- ``local`` (the default): per-instance memory counters until Redis is back.  Every limit
  still holds on each instance (counted from zero); across N instances a project can get
  up to N times its limit more in a window the outage overlaps.  Serving goes on and
  spend stays bounded.
- ``allow``: no limits until Redis is back (fail open).  Nothing is refused because of
  the outage; the operations answered so are counted (``fallbacks`` on ``/health``).
- ``deny``: every limited request gets 503 with ``Retry-After`` (fail closed).  No limit
  is ever exceeded; nothing limited is served either.

Usage recorded after a response is never refused: under ``local`` it goes to the local
counters, under ``allow``/``deny`` it is dropped and counted.  A call that timed out may
still have reached Redis and be applied when Redis resumes: it errs on counting.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import structlog

from dialproxy.counting.counters import Counts, LocalCounters, Read
from dialproxy.counting.rediscounters import TIMEOUT, RedisCounters
from dialproxy.errors import ProxyError, StorageUnavailable

log = structlog.get_logger("dialproxy.counting.storage")

# A Redis call waits CONNECT_TIMEOUT to connect, TIMEOUT for an answer, at most: an outage
# adds bounded latency to a request.
READ_TIMEOUT = TIMEOUT
# While the storage is down, it is pinged this often; the first answer brings it back.
PROBE_INTERVAL = 0.5

T = TypeVar("T")
# user:password in a URL an error message may quote: never logged.
_CREDENTIALS = re.compile(r"://[^@/\s]*@")


class FailurePolicy(StrEnum):
    """What the limits do while the shared storage is unreachable."""

    ALLOW = "allow"
    DENY = "deny"
    LOCAL = "local"


DEFAULT_FAILURE_POLICY = FailurePolicy.LOCAL


class SlidingStorage(Protocol):
    """What the limiter uses of a counter storage: sliding window counters, one at a time
    (as ``limits`` storages offer them) or a request's all in one step."""

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool: ...

    async def get_sliding_window(self, key: str, expiry: int) -> Counts: ...

    async def check(self) -> bool: ...


Storage = LocalCounters | RedisCounters


async def take_back(storage: Storage, key: str, seconds: int, amount: int = 1) -> None:
    """Undo ``acquire_sliding_window_entry(key, ..., seconds, amount)``."""
    if isinstance(storage, LocalCounters):
        storage.take_back(key, seconds, amount)
    else:
        await storage.settle([(key, seconds)], [-amount])


async def read(storage: Storage, windows: list[Read], now: float | None = None) -> list[Counts]:
    """The counts of ``windows`` at ``now`` (a calendar window's time to its end by that
    clock, not the storage's)."""
    if isinstance(storage, LocalCounters):
        return storage.read_many(windows, now)
    return on_clock(windows, await storage.read(windows), now)


def on_clock(windows: Sequence[Read], counts: list[Counts], now: float | None) -> list[Counts]:
    """``counts`` of ``windows`` from Redis with each calendar window's time to its period's
    end by ``now`` (the instance's clock, that made the period: Redis's may differ)."""
    if now is None:
        now = time.time()
    for index, (_, seconds) in enumerate(windows):
        if seconds < 0 and index < len(counts):
            counts[index] = (0, 0.0, counts[index][2], max(-seconds - now, 0.0))
    return counts


async def prepare(storage: Storage) -> None:
    """Make the storage ready for a burst of calls (Redis: fresh connections, its scripts
    loaded, so that no call finds Redis without them), before the first use and after an
    outage."""
    if isinstance(storage, RedisCounters):
        await storage.prepare()


async def close_storage(storage: Storage) -> None:
    if isinstance(storage, RedisCounters):
        await storage.close()


def backend_name(storage: Storage) -> str:
    return "memory" if isinstance(storage, LocalCounters) else "redis"


class StorageHealth:
    """Whether the shared storage (Redis) answers: one for the counters and the shared keys
    of a process, since they live in the same Redis.

    The first call that fails (:meth:`failed`) marks it down, logs ``storage_unavailable``
    once and starts one background probe; while it is down, callers answer by the policy
    without calling Redis.  Every ``probe_interval`` seconds the probe runs each registered
    check (:meth:`add_probe`: fresh connections, scripts loaded, a PING); the first round in
    which all succeed marks it up again and logs ``storage_available`` once.
    """

    def __init__(
        self,
        backend: str,
        policy: FailurePolicy | str = DEFAULT_FAILURE_POLICY,
        *,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.backend = backend
        self.policy = FailurePolicy(policy)
        self.probe_interval = probe_interval
        self.healthy = True
        self.failures = 0  # calls to the storage that failed
        self.outages = 0  # times the storage went from healthy to unhealthy
        self._probes: list[Callable[[], Awaitable[None]]] = []
        self._down_since = 0.0
        self._probe: asyncio.Task[None] | None = None

    def add_probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        """A check the storage must pass to be up again (it raises if not)."""
        self._probes.append(probe)

    def failed(self, error: BaseException, caller: str) -> None:
        """A call by ``caller`` (``counters``, ``shared_keys``) failed: down, if it was up."""
        self.failures += 1
        if not self.healthy:
            return
        self.healthy = False
        self.outages += 1
        self._down_since = time.monotonic()
        log.warning(
            "storage_unavailable",
            backend=self.backend,
            caller=caller,
            error=type(error).__name__,
            detail=_CREDENTIALS.sub("://***@", str(error))[:200],
            policy=str(self.policy),
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_until_back())

    async def _wait_until_back(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                for probe in self._probes:
                    await probe()
            except Exception:
                continue
            break
        self.healthy = True
        log.info(
            "storage_available",
            backend=self.backend,
            down_seconds=round(time.monotonic() - self._down_since, 3),
        )

    async def close(self) -> None:
        """Stop the probe (if an outage is on)."""
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.cancel()
            await asyncio.wait({probe})


class StorageGuard:
    """The shared counter storage while it answers; the failure policy while it does not."""

    def __init__(
        self,
        storage: Storage,
        policy: FailurePolicy | str = DEFAULT_FAILURE_POLICY,
        *,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.storage: Storage = storage
        self.shared: Storage = storage
        self.local: LocalCounters = LocalCounters()
        self.policy = FailurePolicy(policy)
        self.backend = backend_name(storage)
        # Up or down, shared with the shared keys when they are in the same Redis.
        self.state = StorageHealth(self.backend, self.policy, probe_interval=probe_interval)
        self.state.add_probe(self._prepare_again)
        self.fallbacks = 0  # operations the policy answered instead of the shared storage
        self._ready = isinstance(storage, LocalCounters)  # else: prepared before first use
        self._preparing = asyncio.Lock()

    @property
    def healthy(self) -> bool:
        return self.state.healthy

    async def run(
        self,
        op: Callable[[Storage], Awaitable[T]],
        allowed: T,
        *,
        refuse: bool = True,
    ) -> T:
        """``op`` on the shared storage; if it cannot answer, the policy's answer.

        ``allowed`` is what ``allow`` answers (and ``deny`` when ``refuse`` is false: usage
        recorded after a response, take-backs).  A :class:`ProxyError` from ``op`` (a 429)
        is the storage answering, and passes through.
        """
        state = self.state
        if state.healthy:
            try:
                if not self._ready:
                    await self._prepare()
                if state.healthy:  # (not if preparing failed while this call waited)
                    return await op(self.shared)
            except ProxyError:
                raise
            except Exception as e:  # whatever the storage raised: it did not answer
                self.failed(e)
        return await self.fallback(op, allowed, refuse=refuse)

    def failed(self, error: Exception) -> None:
        """The shared storage failed a call: down until a probe finds it back."""
        self._ready = False
        self.state.failed(error, "counters")  # (counted each time; logged once an outage)

    async def fallback(
        self, op: Callable[[Storage], Awaitable[T]], allowed: T, *, refuse: bool = True
    ) -> T:
        """The policy's answer to ``op`` (see :meth:`run`) while the storage is down."""
        self.fallbacks += 1
        if self.policy is FailurePolicy.LOCAL:
            return await op(self.local)
        if self.policy is FailurePolicy.DENY and refuse:
            raise StorageUnavailable()
        return allowed

    def redis_now(self) -> RedisCounters | None:
        """The shared storage when a call may go to it at once without :meth:`run` (Redis,
        up and prepared): the caller watches the call with :meth:`watch`."""
        shared = self.shared
        if self.state.healthy and self._ready and isinstance(shared, RedisCounters):
            return shared
        return None

    def watch(self, call: asyncio.Future[Any], fallback: Callable[[LocalCounters], None]) -> None:
        """A call made on :meth:`redis_now`'s storage that is never refused (a settlement),
        awaited by nobody: when it fails, what :meth:`run` does for it (the storage marked
        down; under ``local``, ``fallback`` done on the local counters)."""

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():  # (the loop closing: nothing to fall back on)
                return
            e = future.exception()
            if isinstance(e, Exception) and not isinstance(e, ProxyError):
                self.failed(e)
                self.fallbacks += 1
                if self.policy is FailurePolicy.LOCAL:
                    fallback(self.local)

        call.add_done_callback(done)

    async def _prepare(self) -> None:
        async with self._preparing:
            if self.state.healthy and not self._ready:
                await prepare(self.storage)
                self._ready = True

    async def _prepare_again(self) -> None:
        """The probe's check of the counter storage (it leaves it prepared)."""
        await prepare(self.storage)
        self._ready = True

    def health(self) -> dict[str, Any]:
        """What ``/health`` says about the counter storage."""
        state = self.state
        return {
            "backend": self.backend,
            "healthy": state.healthy,
            "policy": str(self.policy),
            "failures": state.failures,
            "fallbacks": self.fallbacks,
            "outages": state.outages,
        }

    async def close(self) -> None:
        """Stop the probe and close the storage's connections."""
        await self.state.close()
        await close_storage(self.storage)
