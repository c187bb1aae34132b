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

Usage recorded after a response is never refused.  A request is settled where it was
admitted: one admitted in the local counters during an outage is settled there (Redis never
held its reservation), one admitted in Redis is settled in Redis.  A settlement made while
Redis is down is owed (:meth:`StorageGuard.owe`): kept, at most :data:`OWED_MAX` of them,
and sent when Redis is back, so the reservation Redis holds is replaced by the real usage
after all (a sliding window's part only within one window length of when it was owed:
later, the reservation may have left the window by itself).  One sent when Redis failed
is not owed: a call that timed out may still have reached Redis and be applied when Redis
resumes (it errs on counting; sent again, it would count twice).  Either way, under
``local`` what it adds also goes to the local counters at once, which limit the outage;
what it takes back never does (they never held that reservation).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import structlog

from dialproxy.counting.counters import Counts, LocalCounters, Read
from dialproxy.counting.rediscounters import TIMEOUT, NotSent, RedisCounters
from dialproxy.errors import ProxyError, StorageUnavailable
from dialproxy.text import URL_CREDENTIALS

log = structlog.get_logger("dialproxy.counting.storage")

# A Redis call waits CONNECT_TIMEOUT to connect, TIMEOUT for an answer, at most: an outage
# adds bounded latency to a request.
READ_TIMEOUT = TIMEOUT
# While the storage is down, it is pinged this often; the first answer brings it back.
PROBE_INTERVAL = 0.5

# ``/health`` pings Redis (believed up) at most this often: an idle instance, with no call
# to fail, says so when Redis is gone.
PING_EVERY = 1.0

# Settlements owed to Redis kept during an outage, at most (then dropped, and counted).
OWED_MAX = 100_000
# Owed settlements sent at once when Redis is back (pipelined: one round trip a group).
REPAY_GROUP = 256
# How long a stop waits for the owed settlements to be sent (then the rest are lost, said
# in a warning): within the few seconds an orchestrator gives past the shutdown grace.
REPAY_AT_CLOSE = 3.0

T = TypeVar("T")
# A settlement owed to Redis: when it was made, its windows and signed amounts, the slot
# sets its member frees, the member.
Owed = tuple[float, list[Read], list[int], list[str], str]
# user:password in a URL an error message may quote: never logged.


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
        self._back: list[Callable[[], None]] = []  # told when it is up again
        self._down_since = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._closed = False  # (a failure then starts no probe: nobody would stop it)

    def add_probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        """A check the storage must pass to be up again (it raises if not)."""
        self._probes.append(probe)

    def when_back(self, callback: Callable[[], None]) -> None:
        """``callback`` is called each time the storage is up again after an outage."""
        self._back.append(callback)

    def failed(self, error: BaseException, caller: str) -> None:
        """A call by ``caller`` (``counters``, ``shared_keys``) failed: down, if it was up."""
        self.failures += 1
        if not self.healthy:
            return
        self.healthy = False
        self.outages += 1
        self._down_since = time.monotonic()
        cause = error.__cause__ if isinstance(error, NotSent) else None  # (what refused it)
        log.warning(
            "storage_unavailable",
            backend=self.backend,
            caller=caller,
            error=type(cause or error).__name__,
            detail=URL_CREDENTIALS.sub("://***@", str(error))[:200],
            policy=str(self.policy),
        )
        if not self._closed and (self._probe is None or self._probe.done()):
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
        for callback in self._back:
            callback()

    async def close(self) -> None:
        """Stop the probe (if an outage is on)."""
        self._closed = True
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
        self.owed: list[Owed] = []  # settlements Redis failed, sent when it is back
        self.sending = 0  # owed settlements being sent, not answered yet
        self.owed_dropped = 0  # settlements owed past OWED_MAX, or once closed
        self.closed = False  # (owed from then on: never sent)
        self._ready = isinstance(storage, LocalCounters)  # else: prepared before first use
        self._preparing = asyncio.Lock()
        self._repaying: asyncio.Task[None] | None = None
        self._repaid = False  # (closing: the owed settlements' last chance has come)
        self._pinged = 0.0  # (monotonic) the last ping /health made
        self.state.when_back(self._repay_soon)

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

    async def start(self) -> None:
        """At the app's start: the shared storage prepared now (Redis: connected, its
        scripts loaded), so that ``/health`` says at once when it is not there; it said
        healthy until the first limited request, on an instance started without Redis."""
        if self._ready:
            return
        try:
            await self._prepare()
        except Exception as e:
            self.failed(e)

    async def ping(self) -> None:
        """``/health``'s look at Redis, believed up (at most every :data:`PING_EVERY`
        seconds): a PING, which marks it down if it fails.  Calls fail only when there are
        some: without it, an idle instance said healthy for as long as Redis was gone."""
        storage = self.storage
        now = time.monotonic()
        if not isinstance(storage, RedisCounters) or now - self._pinged < PING_EVERY:
            return
        self._pinged = now
        if self.state.healthy:
            try:
                await storage.ping()
            except Exception as e:
                self.failed(e)

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

    def watch(
        self,
        call: asyncio.Future[Any],
        windows: list[Read],
        amounts: list[int],
        slots: list[str],
        member: str,
    ) -> None:
        """A settlement sent on :meth:`redis_now`'s storage, awaited by nobody: when Redis
        fails it, the storage is marked down, and under ``local`` what it adds counts in the
        local counters.  It is not owed: sent, it may have reached Redis and be applied when
        Redis resumes (a second one would count it twice); lost, the reservation Redis holds
        stays (erring on counting).  One that never left (no connection) is owed."""

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():  # (the loop closing: nothing to fall back on)
                return
            e = future.exception()
            if isinstance(e, Exception) and not isinstance(e, ProxyError):
                self._unsettled(e, windows, amounts, slots, member)

        call.add_done_callback(done)

    async def settle_shared(
        self, windows: list[Read], amounts: list[int], slots: list[str], member: str
    ) -> None:
        """A settlement of what the shared storage holds: sent to it (when it fails, as
        :meth:`watch` says), or owed (:meth:`owe`) when it is down."""
        storage = self.storage
        assert isinstance(storage, RedisCounters)  # (memory: the limiter settles at once)
        if self.state.healthy:
            try:
                if not self._ready:
                    await self._prepare()
            except Exception as e:  # (not prepared: nothing of it sent, owed below)
                self.failed(e)
            if self.state.healthy:
                try:
                    return await storage.settle(windows, amounts, slots, member)
                except Exception as e:  # whatever the storage raised: it did not answer
                    return self._unsettled(e, windows, amounts, slots, member)
        self.owe(windows, amounts, slots, member)

    def _unsettled(
        self,
        error: Exception,
        windows: list[Read],
        amounts: list[int],
        slots: list[str],
        member: str,
    ) -> None:
        """A settlement that Redis failed: the storage down; sent, not owed (see
        :meth:`watch`), what it adds counted locally under ``local``; never sent, owed."""
        self.failed(error)
        if isinstance(error, NotSent):
            self.owe(windows, amounts, slots, member)
            return
        self.fallbacks += 1
        self._add_locally(windows, amounts)
        if slots:  # (freeing a slot twice frees it once: that part is owed all the same,
            # or the slot stays taken till its lease, the project capped on every instance)
            self.owe([], [], slots, member, fallback=False)

    def owe(
        self,
        windows: list[Read],
        amounts: list[int],
        slots: list[str],
        member: str,
        fallback: bool = True,
    ) -> None:
        """A settlement of what Redis holds (a request it admitted), never sent: Redis is
        down.  Kept, and sent when it is back (see the module's notes); under ``local``
        what it adds counts in the local counters at once.  ``fallback``: it counts as one
        (not when the policy's answer to the same request is counted already)."""
        if fallback:
            self.fallbacks += 1
        self._add_locally(windows, amounts)
        if slots and isinstance(self.storage, RedisCounters):  # (a dropped one's let lapse)
            self.storage.forget(slots, member)
        if not windows and not slots:
            return
        if self.closed:  # (a give-back made as the limiter closed: never to be sent)
            self.owed_dropped += 1
            log.warning("owed_settlements_lost", backend=self.backend, count=1)
            return
        if len(self.owed) >= OWED_MAX:
            self.owed_dropped += 1
            return
        self.owed.append((time.time(), windows, amounts, slots, member))
        if self.state.healthy:  # (up again already: the probe's call came before this)
            self._repay_soon()

    def _add_locally(self, windows: list[Read], amounts: list[int]) -> None:
        """Under ``local``, a settlement's additions in the local counters, which limit
        the outage (its take-backs never: they never held that reservation)."""
        if self.policy is FailurePolicy.LOCAL:
            added = [(w, a) for w, a in zip(windows, amounts, strict=True) if a > 0]
            if added:
                self.local.settle([w for w, _ in added], [a for _, a in added])

    def _repay_soon(self) -> None:
        if self._repaid:
            return
        if self.owed and (self._repaying is None or self._repaying.done()):
            self._repaying = asyncio.get_running_loop().create_task(self._repay())

    async def _repay(self) -> None:
        """The settlements owed, sent in groups of :data:`REPAY_GROUP` (one pipelined batch
        each), one group after another, while Redis takes them."""
        storage = self.storage
        while self.owed and self.state.healthy and isinstance(storage, RedisCounters):
            owed, self.owed = self.owed, []
            now = time.time()
            for first in range(0, len(owed), REPAY_GROUP):
                # (taken from the list, not answered yet: still owed on /health)
                self.sending = len(owed) - first
                group = owed[first : first + REPAY_GROUP]
                calls, sent = [], []
                for entry in group:
                    when, windows, amounts, slots, member = entry
                    # (a sliding window's part within one window length: its reservation is
                    # still in it, in the current bucket or the previous; later, it may have
                    # left the window by itself)
                    kept = [
                        (w, a)
                        for w, a in zip(windows, amounts, strict=True)
                        if w[1] < 0 or now - when < w[1]
                    ]
                    if kept or slots:
                        parts, sums = [w for w, _ in kept], [a for _, a in kept]
                        calls.append(storage.settle(parts, sums, slots, member))
                        sent.append(entry)
                try:
                    answers = await asyncio.gather(*calls, return_exceptions=True)
                except BaseException:  # (the stop's wait ended: the group was sent)
                    self.owed[:0] = owed[first + REPAY_GROUP :]
                    raise
                finally:
                    self.sending = 0
                failed = next((a for a in answers if isinstance(a, Exception)), None)
                if failed is not None:  # down again: the groups left wait for the next time
                    self.failed(failed)
                    # (a call sent may yet be applied: not again; one that never left, is)
                    unsent = [
                        e for e, a in zip(sent, answers, strict=True) if isinstance(a, NotSent)
                    ]
                    self.owed[:0] = unsent + owed[first + REPAY_GROUP :]
                    return

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
            "owed": len(self.owed) + self.sending,
            "owedDropped": self.owed_dropped,
        }

    async def close(self) -> None:
        """Stop the probe and close the storage's connections (the settlements owed sent
        first, if Redis takes them within :data:`REPAY_AT_CLOSE`; those it does not are said
        in a warning)."""
        if self._repaying is not None:
            await asyncio.wait({self._repaying}, timeout=REPAY_AT_CLOSE)
        self._repaid = True  # (no replay starts after this one: Redis back as it closes)
        if self._repaying is not None:
            self._repaying.cancel()
            await asyncio.gather(self._repaying, return_exceptions=True)
        self.closed = True
        await self.state.close()
        if self.owed:
            log.warning("owed_settlements_lost", backend=self.backend, count=len(self.owed))
        await close_storage(self.storage)
