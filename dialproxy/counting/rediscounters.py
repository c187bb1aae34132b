"""Sliding-window counters in Redis, on redis-py, each operation one script call.

The windows are the ``limits`` library's sliding window counters, kept as ``limits`` keeps
them in Redis (``{prefix}{key}`` the current bucket, ``{prefix}{key}/-1`` the previous one,
the current bucket's TTL telling where the window stands: when it falls under one window
length the current bucket becomes the previous one), with ``limits``' arithmetic (the
weighted count: previous x its TTL share + current).  A calendar period's counter (a
negative length: its end, see ``counters``) is one key that lapses at the period's end.
A differential test holds these scripts to ``limits``' own.  What ``limits`` has no call
for is here too, each in one script call, so that a request costs two Redis round trips
whatever its windows:

- :meth:`RedisCounters.admit`: every window of a request checked, then (all or nothing) its
  request counted and its reservation added;
- :meth:`RedisCounters.settle`: the reservation replaced by the real usage (a signed amount
  per window: a negative one is taken from the current bucket, then the previous).

No call is retried (one that timed out may have been applied: a retry could count twice).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import chain
from typing import Any, TypeVar, cast

import hiredis
import redis.asyncio
import structlog
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, RedisError, ResponseError

from dialproxy.counting.counters import Counts, Read

T = TypeVar("T")
log = structlog.get_logger("dialproxy.counting.rediscounters")

PREFIX = "LIMITS:"  # limits' own prefix: the keys are the ones it would write
# A call waits this long at most (to connect, for an answer): an outage adds bounded
# latency to a request.
CONNECT_TIMEOUT = 0.5
TIMEOUT = 0.25
# Connections per instance: a burst of requests waits its turn for one (each call holds one
# for at most TIMEOUT) rather than opening one each, and never fails for want of one (that
# is no outage of Redis).
MAX_CONNECTIONS = 64
# How long a concurrency slot outlives the last renewal of its lease: what an instance that
# died holds, at most (its live requests renew theirs every LEASE / 3 seconds).
LEASE = 60.0

# Shared by the scripts: the window of KEYS[p] (previous) and KEYS[c] (current), rolled
# over when the current bucket's TTL fell under one window (limits' acquire script), then
# its counts (TTLs in ms, 0 when absent).
_WINDOW = """
-- (the arguments come as two JSON arrays: the windows', the same for every call of a
-- scope and made once, and the call's own; two to encode, not 50, and decoded in C: a
-- split in Lua took about a fifth of an admission's time in Redis)
local W = cjson.decode(ARGV[1])
local A = ARGV[2] and cjson.decode(ARGV[2]) or {}
-- The current bucket of KEYS[c] rolled over into KEYS[p] when its TTL fell under one
-- window; returns its TTL (ms; -2: no such key) and whether it exists.
local function roll(p, c, expiry)
    -- (Redis 7 holds its clock still in a script, so a TTL just set reads back as set)
    local ct = tonumber(redis.call('pttl', KEYS[c]))
    if expiry > 0 and ct > 0 and ct < expiry then
        redis.call('rename', KEYS[c], KEYS[p])
        redis.call('set', KEYS[c], 0, 'PX', ct + expiry)
        return ct + expiry, true, true
    end
    return ct, ct ~= -2, false
end
-- The previous bucket's count and TTL (ms), 0 and 0 when absent (no PTTL then).
local function previous(p)
    local pc = tonumber(redis.call('get', KEYS[p]))
    if pc == nil then return 0, 0 end
    local pt = tonumber(redis.call('pttl', KEYS[p]))
    if pt < 0 then pt = 0 end
    return pc, pt
end
local function window(p, c, expiry)
    -- (a TTL of -2: no such key, so no GET)
    local ct, here, rolled = roll(p, c, expiry)
    local cc = 0
    if here and not rolled then cc = tonumber(redis.call('get', KEYS[c])) or 0 end
    if ct < 0 then ct = 0 end
    if expiry < 0 then  -- a calendar period's counter (expiry: -its end, epoch ms)
        return 0, 0, cc, ct, here
    end
    local pc, pt = previous(p)
    return pc, pt, cc, ct, here
end
-- ``amount`` (> 0) added to KEYS[c]; returns its count after.  A sliding window's current
-- bucket was just rolled over (``here``: it exists; SET NX: the same key twice in one call
-- finds it made by the first).  A calendar period's counter is not looked at first: the
-- INCRBY that makes it (its count is the amount) gives it its end, which an INCRBY never
-- moves (nor this PEXPIREAT, the same end, if a counter brought to 0 is made so again).
local function add(c, expiry, amount, here)
    if expiry < 0 then
        local count = redis.call('incrby', KEYS[c], amount)
        if count == amount then redis.call('pexpireat', KEYS[c], -expiry) end
        return count
    end
    if not here and redis.call('set', KEYS[c], amount, 'PX', expiry * 2, 'NX') then
        return amount
    end
    return redis.call('incrby', KEYS[c], amount)
end
"""

# W (ARGV[1]): n, then per window: seconds, limit, mode; A (ARGV[2]): per window its amount,
# then m, member, lease (ms), and per slot set its limit.  Mode 0: refused when full (a
# token or cost window); 1: refused when adding ``amount`` would pass the limit (a request
# window); 2: never refused (a window counted, not limited: its counts are not read, and
# answer as 0).  A slot set (KEYS after the windows' pairs: members scored by their lease's
# end, Redis's own clock) refuses when it holds its limit of live members.  Nothing is added
# unless nothing refuses.  Returns {refused index (0: none; past n: a slot set), then per
# window read (all of them, at the same instant, refused or not): previous, its ttl,
# current (with what was added), its ttl (a calendar period's counter: 0, 0, current, 0:
# the caller knows its end, see ``on_clock``); for a refusing slot set, its members}.
#
# The commands: per sliding window one PTTL (its roll-over); then one MGET of every read
# window's buckets; then per window one INCRBY.  The previous bucket's TTL is the current
# one's less a window (a roll-over renames the current bucket to the previous, its expiry
# kept, and makes the current one a window longer: Redis's clock stands still in a script),
# and none when the current one has less (the previous one has lapsed).
_ADMIT = (
    _WINDOW
    + """
local n = W[1]
local out = {0}
local found, ttl, at = {}, {}, {}  -- (per window: current bucket exists; its TTL; in MGET)
local reads, r = {}, 0
for i = 1, n do
    local expiry = W[i * 3 - 1] * 1000
    if expiry > 0 then
        local ct, here = roll(i * 2 - 1, i * 2, expiry)
        found[i] = here
        if ct < 0 then ct = 0 end
        ttl[i] = ct
    else
        ttl[i] = 0
    end
    if W[i * 3 + 1] ~= 2 then
        r = r + 1
        at[i] = r
        reads[r] = KEYS[i * 2]
        if expiry > 0 then
            r = r + 1
            reads[r] = KEYS[i * 2 - 1]
        end
    end
end
local got = {}
if r > 0 then got = redis.call('mget', unpack(reads)) end
local floor = math.floor
for i = 1, n do
    local k = i * 4 - 2  -- (out[k .. k + 3]: the window's counts; no table.insert calls)
    local j = at[i]
    if j == nil then  -- counted, not limited
        out[k] = 0; out[k + 1] = 0; out[k + 2] = 0; out[k + 3] = 0
    else
        local expiry = W[i * 3 - 1] * 1000
        local ct = ttl[i]
        local cc = tonumber(got[j]) or 0
        local pc, pt = 0, 0
        if expiry > 0 and got[j + 1] then
            pc = tonumber(got[j + 1])
            if ct > expiry then pt = ct - expiry end
        end
        out[k] = pc; out[k + 1] = pt; out[k + 2] = cc; out[k + 3] = ct
        if out[1] == 0 then
            local limit, mode = W[i * 3], W[i * 3 + 1]
            local weighted = floor(pc * pt / expiry) + cc
            if (mode == 0 and weighted >= limit) or (mode == 1 and weighted + A[i] > limit) then
                out[1] = i
            end
        end
    end
end
if out[1] ~= 0 then
    return out
end
local m = tonumber(A[n + 1] or '0')
local member, lease, now = A[n + 2], tonumber(A[n + 3] or '0'), 0
if m > 0 then
    local t = redis.call('time')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
for j = 1, m do
    local key = KEYS[n * 2 + j]
    redis.call('zremrangebyscore', key, '-inf', now)
    local held = redis.call('zcard', key)
    if held >= tonumber(A[n + 3 + j]) then
        out[1] = n + j
        table.insert(out, held)
        return out
    end
end
for j = 1, m do
    redis.call('zadd', KEYS[n * 2 + j], now + lease, member)
    redis.call('pexpire', KEYS[n * 2 + j], lease * 2)
end
for i = 1, n do
    local amount = A[i]
    if amount > 0 then
        local expiry = W[i * 3 - 1] * 1000
        out[i * 4] = add(i * 2, expiry, amount, found[i])
        if expiry > 0 and not found[i] then out[i * 4 + 1] = expiry * 2 end
    end
end
return out
"""
)

# W: n, then per window: seconds; A: per window its amount (signed), then m and the member
# whose slots (KEYS after the windows' pairs) are freed.  A positive amount is added to the
# current bucket; a negative one taken from it, and what it lacks from the previous one.
# A negative amount is one DECRBY, mostly: no roll-over first (taken from a current bucket
# due to roll over is taken from the previous one it becomes), the DECRBY undone when it
# went below 0 (a bucket that was not there: no TTL on it then, so deleted).
_SETTLE = (
    _WINDOW
    + """
local n = tonumber(W[1])
for i = 1, n do
    local expiry = tonumber(W[i + 1]) * 1000
    local amount = tonumber(A[i])
    if amount > 0 then
        local ct, here = 0, true
        if expiry > 0 then ct, here = roll(i * 2 - 1, i * 2, expiry) end
        add(i * 2, expiry, amount, here)
    elseif amount < 0 then
        local left = -tonumber(redis.call('decrby', KEYS[i * 2], -amount))
        if left > 0 then
            if redis.call('pttl', KEYS[i * 2]) == -1 then
                redis.call('del', KEYS[i * 2])
            else
                redis.call('incrby', KEYS[i * 2], left)
            end
            if expiry > 0 then  -- (a calendar period has no previous bucket)
                local take = math.min(tonumber(redis.call('get', KEYS[i * 2 - 1])) or 0, left)
                if take > 0 then redis.call('decrby', KEYS[i * 2 - 1], take) end
            end
        end
    end
end
local m = tonumber(A[n + 1] or '0')
for j = 1, m do
    redis.call('zrem', KEYS[n * 2 + j], A[n + 2])
end
return n
"""
)

# KEYS: slot sets; ARGV: lease (ms), then the member of each: its lease renewed (if held).
_RENEW = """
local t = redis.call('time')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
    redis.call('zadd', KEYS[i], 'XX', until_, ARGV[i + 1])
    redis.call('pexpire', KEYS[i], tonumber(ARGV[1]) * 2)
end
return #KEYS
"""

# W: n, then per window: seconds.  Returns the counts of each (limits' read script).
_READ = (
    _WINDOW
    + """
local n = tonumber(W[1])
local out = {}
for i = 1, n do
    local pc, pt, cc, ct = window(i * 2 - 1, i * 2, tonumber(W[i + 1]) * 1000)
    table.insert(out, pc); table.insert(out, pt); table.insert(out, cc); table.insert(out, ct)
end
return out
"""
)


def _packed(args: Iterable[Any]) -> str:
    """Script arguments as one JSON array (numbers, and strings already JSON-quoted):
    redis-py would encode each argument on its own, and the script decodes it in C."""
    return "[" + ",".join(map(str, args)) + "]"


# How many windows' keys and arguments are kept made (a scope's few, times the scopes in
# use); past it they are made again from scratch.
PREPARED_MAX = 4096


class _Prepared:
    """What a script call on some windows sends that is the same for every call: the keys
    (encoded) and the windows' packed arguments (encoded); and where the calendar periods'
    counters are, with their ends (epoch seconds)."""

    __slots__ = ("calendars", "heads", "keys", "windows", "wire_keys", "wire_windows")

    def __init__(self, windows: Sequence[Read], per_window: Iterable[Any]) -> None:
        keys: list[bytes] = []
        for key, _ in windows:
            current = f"{PREFIX}{{{key}}}".encode()
            keys += (current + b"/-1", current)
        self.keys = keys
        self.windows = _packed(chain((len(windows),), per_window)).encode()
        # (the same, as they go on the wire: RESP bulk strings)
        self.wire_keys = b"".join(map(_bulk, keys))
        self.wire_windows = _bulk(self.windows)
        self.calendars = [(i, -float(s)) for i, (_, s) in enumerate(windows) if s < 0]
        self.heads: dict[str, bytes] = {}

    def head(self, sha: str) -> bytes:
        """A call of the script ``sha`` on these keys alone, all but its own argument."""
        if (head := self.heads.get(sha)) is None:
            nkeys = len(self.keys)
            head = self.heads[sha] = (
                b"*%d\r\n$7\r\nEVALSHA\r\n" % (nkeys + 5)
                + _bulk(sha.encode())
                + _bulk(b"%d" % nkeys)
                + self.wire_keys
                + self.wire_windows
            )
        return head


def _bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _counts(flat: Sequence[Any], start: int = 0) -> list[Counts]:
    """Counts from a script's flat answer of integers (TTLs from ms to seconds)."""
    it = iter(flat[start:] if start else flat)
    return [(a, b / 1000, c, d / 1000) for a, b, c, d in zip(it, it, it, it, strict=True)]


class RedisCounters:
    """The counters of every instance, in one Redis (``url``: redis://, rediss://,
    unix://); the client is shared with the shared keys (:attr:`client`)."""

    def __init__(
        self, url: str, *, max_connections: int = MAX_CONNECTIONS, lease: float = LEASE
    ) -> None:
        self.url = url
        self.lease = lease  # a slot's lease (see LEASE)
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=TIMEOUT,
            max_connections=max_connections,
            timeout=None,  # (waiting for a free connection: see MAX_CONNECTIONS)
            # Never retried (redis-py retries 3 times by default): a call that failed is an
            # outage, and a retried INCRBY could count twice.
            retry=Retry(NoBackoff(), 0),
        )
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)  # (owns it)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._read = self.client.register_script(_READ)
        self._renew = self.client.register_script(_RENEW)
        self._batch = ScriptBatch(self.client, url)
        self._prepared: dict[Any, _Prepared] = {}
        # The slots this instance holds (slot set -> members): their leases renewed while
        # their requests run, by one task (a dead instance's lapse within LEASE seconds).
        self.held: dict[str, set[str]] = {}
        self._renewing: asyncio.Task[None] | None = None

    async def _run(self, call: Awaitable[T]) -> T:
        return await uncancelled(call)

    async def admit(
        self, windows: Sequence[Read], limits: Sequence[int], modes: Sequence[int],
        amounts: Sequence[int], slots: Sequence[tuple[str, int]] = (), member: str = "",
        now: float | None = None,
    ) -> tuple[int, list[Counts]]:  # fmt: skip
        """One atomic step: the index (from 1) of the first window that refused (past the
        windows: the slot set), or 0 and every amount added and a slot taken in every slot
        set (``slots``: key, limit) for ``member``; the counts of every window (after the
        adding, if nothing refused): a calendar period's counter's time to its end by
        ``now`` (the instance's clock, that made the period; without it, Redis's own TTL
        is not asked either: 0)."""
        future, prepared = self.admit_soon(windows, limits, modes, amounts, slots, member)
        return self.admitted(await future, prepared, len(windows), slots, member, now)

    def admit_soon(
        self, windows: Sequence[Read], limits: Sequence[int], modes: Sequence[int],
        amounts: Sequence[int], slots: Sequence[tuple[str, int]] = (), member: str = "",
    ) -> tuple[asyncio.Future[Any], _Prepared]:  # fmt: skip
        """:meth:`admit`'s call sent with the next batch, without a coroutine: the future
        of its answer, for :meth:`admitted`."""
        prepared = self._prepared_admit(windows, limits, modes)
        extra: list[bytes] = []
        if slots:
            extra = [(PREFIX + key).encode() for key, _ in slots]
            lease = int(self.lease * 1000)
            head = (len(slots), json.dumps(member), lease)
            own = _packed(chain(amounts, head, (limit for _, limit in slots)))
        else:
            own = _packed(amounts)
        return self._batch.send(self._admit, prepared, extra, own), prepared

    def admitted(
        self, flat: list[Any], prepared: _Prepared, n: int,
        slots: Sequence[tuple[str, int]], member: str, now: float | None,
    ) -> tuple[int, list[Counts]]:  # fmt: skip
        """:meth:`admit`'s answer from the script's (``flat``) on ``n`` windows."""
        refused = int(flat[0])
        if refused > n:
            counts = _counts(flat[1 : len(flat) - 1], 0)
        else:
            counts = _counts(flat, 1)
            if slots and not refused:
                for key, _ in slots:
                    self.held.setdefault(key, set()).add(member)
                if self._renewing is None or self._renewing.done():
                    task = self._renew_leases()
                    self._renewing = asyncio.get_running_loop().create_task(task)
        if now is not None:
            for index, end in prepared.calendars:
                counts[index] = (0, 0.0, counts[index][2], max(end - now, 0.0))
        return refused, counts

    def when_left(self, future: asyncio.Future[Any], then: Callable[[Any], None]) -> None:
        """``then`` with the answer of the call of ``future`` (:meth:`admit_soon`'s), whose
        caller was cancelled (its client gone) while waiting for it: the call went to Redis
        all the same, and what it took there is the caller's to give back.  (The future
        refuses a cancel: it stays pending till its answer, and ``close()`` waits for it.)"""

        def done(answered: asyncio.Future[Any]) -> None:
            if not answered.cancelled() and answered.exception() is None:
                then(answered.result())

        future.add_done_callback(done)

    async def settle(
        self,
        windows: Sequence[Read],
        amounts: Sequence[int],
        slots: Sequence[str] = (),
        member: str = "",
    ) -> None:
        """Signed ``amounts`` added to the windows, and ``member``'s ``slots`` freed, in one
        step."""
        await self.settle_soon(windows, amounts, slots, member)

    def settle_soon(
        self,
        windows: Sequence[Read],
        amounts: Sequence[int],
        slots: Sequence[str] = (),
        member: str = "",
    ) -> asyncio.Future[Any]:
        """:meth:`settle` sent with the next batch, without a coroutine: the future of its
        answer (awaited by nobody on a request's path; its failure is the caller's to see)."""
        prepared = self._prepared_windows(windows)
        extra: list[bytes] = []
        if not slots:
            own = _packed(amounts)
        else:
            extra = [(PREFIX + key).encode() for key in slots]
            own = _packed(chain(amounts, (len(slots), json.dumps(member))))
            self.forget(slots, member)
        return self._batch.send(self._settle, prepared, extra, own)

    def forget(self, slots: Sequence[str], member: str) -> None:
        """``member``'s leases on ``slots`` no longer renewed (freed, or to be freed later:
        let lapse at worst)."""
        for key in slots:
            if (members := self.held.get(key)) is not None:
                members.discard(member)
                if not members:
                    del self.held[key]

    def _prepared_admit(
        self, windows: Sequence[Read], limits: Sequence[int], modes: Sequence[int]
    ) -> _Prepared:
        """The keys and packed windows of an admission, made once per windows, limits and
        modes (a scope's: the same for each of its requests)."""
        cache = self._prepared
        index = (tuple(windows), tuple(limits), tuple(modes))
        if (prepared := cache.get(index)) is None:
            if len(cache) >= PREPARED_MAX:
                cache.clear()
            per_window = chain.from_iterable(
                (seconds, limit, mode)
                for (_, seconds), limit, mode in zip(windows, limits, modes, strict=True)
            )
            prepared = cache[index] = _Prepared(windows, per_window)
        return prepared

    def _prepared_windows(self, windows: Sequence[Read]) -> _Prepared:
        """The keys and packed windows of a settlement or a read, made once per windows."""
        cache = self._prepared
        index = tuple(windows)
        if (prepared := cache.get(index)) is None:
            if len(cache) >= PREPARED_MAX:
                cache.clear()
            prepared = cache[index] = _Prepared(windows, (seconds for _, seconds in windows))
        return prepared

    async def _renew_leases(self) -> None:
        """Every lease / 3 seconds while slots are held: their leases renewed, in one call."""
        while self.held:
            await asyncio.sleep(self.lease / 3)
            pairs = [(key, m) for key, members in self.held.items() for m in members]
            if not pairs:
                continue
            args: list[Any] = [int(self.lease * 1000), *(m for _, m in pairs)]
            try:
                await self._renew(keys=[PREFIX + key for key, _ in pairs], args=args)
            except Exception as e:  # (the next round tries again; the outage is the guard's)
                log.debug("slot_leases_not_renewed", error=type(e).__name__)

    async def read(self, windows: Sequence[Read]) -> list[Counts]:
        if not windows:
            return []
        prepared = self._prepared_windows(windows)
        return _counts(await self._run(self._read(keys=prepared.keys, args=[prepared.windows])))

    # What ``limits`` storages offer that the rest of dialproxy uses (one window at a time).

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        refused, _ = await self.admit([(key, expiry)], [limit], [1], [amount])
        return refused == 0

    async def get_sliding_window(self, key: str, expiry: int) -> Counts:
        return (await self.read([(key, expiry)]))[0]

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """A plain counter that lives ``expiry`` seconds, or longer if it had longer."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(PREFIX + key, amount)
        pipe.expire(PREFIX + key, expiry, nx=True)  # (a new key)
        pipe.expire(PREFIX + key, expiry, gt=True)  # (a longer one than it had)
        value, _, _ = await self._run(pipe.execute())
        return int(value)

    async def get(self, key: str) -> int:
        return int(await self._run(self.client.get(PREFIX + key)) or 0)

    async def check(self) -> bool:
        try:
            await self.ping()
        except Exception:
            return False
        return True

    async def ping(self) -> None:
        """A PING answered (else what failed it raised), a client's cancel notwithstanding."""
        await self._run(self.client.ping())

    async def prepare(self) -> None:
        """Fresh connections, the scripts loaded (so a call never finds Redis without
        them), then a PING: before the first use and after an outage."""
        await self.client.connection_pool.disconnect()
        self._batch.reset()
        for script in (self._admit, self._settle, self._read):
            await self.client.script_load(script.script)
        await self.client.ping()

    async def close(self) -> None:
        await self._batch.close()
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        await self.client.aclose()


# A script call: its script (None: a command of the connection's own set-up), keys and
# windows, extra keys, own argument, and the future of its answer.
_Call = tuple["AsyncScript | None", "_Prepared | None", list[bytes], str, "asyncio.Future[Any]"]


class NotSent(ConnectionError):
    """A script call that never left: no connection to Redis could be had for it (or the
    storage was closed), so nothing of it can have been applied (one that was sent and
    got no answer fails with another error: it may have been)."""


class ScriptBatch:
    """Script calls made in one turn of the event loop go to Redis together, written at
    once (not a transaction: each script is atomic on its own), one round trip.  Under load
    many requests reach their admission or settlement in the same turn.

    The batches go on one connection of their own (:class:`_Link`, an asyncio protocol fed
    to hiredis's reader): each is written as soon as it is made (while the answers of those
    before it are still on their way: Redis answers in order), and each answer is handed to
    its call as it is read, in that order.  So a call costs no pool round, no task, no
    reader waking: a request pays for its script and its answer alone.  A request that is
    cancelled (a client gone) cancels its own wait only: its call still goes, and nobody
    else's is cut off.  A failure of the connection (an error, an answer that took longer
    than TIMEOUT) fails every call waiting on it, and the next batch connects again."""

    def __init__(self, client: redis.asyncio.Redis, url: str) -> None:
        self.client = client  # (a script Redis lost is loaded again through it)
        self.url = url
        self.pending: list[_Call] = []
        self.held: list[_Call] = []  # made, waiting for a connection
        self.link: _Link | None = None
        self.closed = False  # (a call made after close() fails: no connection is opened)
        self._connecting: asyncio.Task[None] | None = None

    async def call(
        self, script: AsyncScript, prepared: _Prepared, extra: list[bytes], own: str
    ) -> Any:
        """The script's answer for ``prepared``'s keys and windows, then the keys
        ``extra``, with the call's own arguments ``own``."""
        # (A caller cancelled cancels its future alone: the call still goes, or has gone,
        # with its batch, and its answer is read and dropped.)
        return await self.send(script, prepared, extra, own)

    def send(
        self, script: AsyncScript, prepared: _Prepared, extra: list[bytes], own: str
    ) -> asyncio.Future[Any]:
        """:meth:`call` made, its answer's future returned (to await, or to watch)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = _Answer(loop=loop)
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((script, prepared, extra, own, future))
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if self.closed:
            _fail(batch, NotSent("closed"))
            return
        link = self.link
        if link is not None and link.open and not self.held:
            link.write(batch, _wire(batch))
            return
        self.held += batch
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """A connection for the batches, then the batches held."""
        held: list[_Call] = []
        try:
            link = self.link
            if link is None or not link.open:
                self.link = None
                link = self.link = await _Link.connect(self.url, self.client)
            held, self.held = self.held, []
            link.write(held, _wire(held))  # (written, or raised before any is waited for)
        except BaseException as e:  # (no connection: every call held sees it)
            held, self.held = held + self.held, []
            if isinstance(e, Exception):
                unsent = NotSent(f"{type(e).__name__}: {e}")
                unsent.__cause__ = e
                _fail(held, unsent)
            else:
                _fail(held, e)
                raise
        finally:
            self._connecting = None

    def reset(self) -> None:
        """The connection dropped (the next batch opens a fresh one): a storage prepared
        again after an outage trusts no connection from before it, which may have gone
        silently dead."""
        if (link := self.link) is not None:
            self.link = None
            link.close()

    async def close(self) -> None:
        """Once every call made has its answer: the connection closed."""
        while True:
            # (the callbacks of answers read already run first: they may make calls, as a
            # cancelled admission's give-back does)
            await asyncio.sleep(0)
            calls = [
                c[4]
                for c in (*self.pending, *self.held, *(self.link.waiting if self.link else ()))
                if not c[4].done()
            ]
            if not calls:
                break
            await asyncio.wait(calls)
        self.closed = True
        if self._connecting is not None:  # (a connection being opened: closed too)
            await asyncio.wait({self._connecting})
        self.reset()


def _wire(batch: list[_Call]) -> bytes:
    """The batch's EVALSHA calls, packed from their keys' and windows' bytes made once
    (redis-py would pack every argument of every call again)."""
    wire: list[bytes] = []
    for script, prepared, extra, own, _ in batch:
        assert script is not None and prepared is not None
        if not extra:
            wire += (prepared.head(script.sha), _bulk(own.encode()))
            continue
        nkeys = len(prepared.keys) + len(extra)
        wire.append(b"*%d\r\n$7\r\nEVALSHA\r\n" % (nkeys + 5))
        wire.append(_bulk(script.sha.encode()) + _bulk(b"%d" % nkeys) + prepared.wire_keys)
        wire.extend(map(_bulk, extra))
        wire.append(prepared.wire_windows + _bulk(own.encode()))
    return b"".join(wire)


def _command(*args: str | int | bytes | memoryview) -> bytes:
    """A command as it goes on the wire (RESP)."""
    parts = [bytes(a) if isinstance(a, (bytes, memoryview)) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(map(_bulk, parts))


class _Link(asyncio.Protocol):
    """One connection to Redis for the script calls: batches written whole, each answer
    read by hiredis's reader as its bytes arrive and handed to the oldest call waiting
    (Redis answers in order).  An answer later than TIMEOUT, a broken connection or bytes
    that are not RESP fail every call waiting and close it (:attr:`open` false)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.reader = hiredis.Reader(encoding="utf-8")
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[_Call] = deque()
        # Per batch written: how many of its answers are still to come, and by when.
        self.due: deque[list[float]] = deque()
        self.open = True
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, url: str, client: redis.asyncio.Redis) -> _Link:
        """A link to the Redis of ``url`` (redis://, rediss://, unix://; its user,
        password and database), within CONNECT_TIMEOUT."""
        kwargs: dict[str, Any] = dict(parse_url(url))
        loop = asyncio.get_running_loop()
        link = cls(client)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if (path := kwargs.get("path")) is not None:
                    await loop.create_unix_connection(lambda: link, path)
                else:
                    host = kwargs.get("host", "localhost")
                    port = int(kwargs.get("port", 6379))
                    tls = _tls(kwargs) if kwargs.get("connection_class") is SSLConnection else None
                    await loop.create_connection(
                        lambda: link, host, port, ssl=tls, server_hostname=host if tls else None
                    )
                setup: list[tuple[str, asyncio.Future[Any]]] = []
                if (password := kwargs.get("password")) is not None:
                    user = kwargs.get("username")
                    auth = ("AUTH", user, password) if user else ("AUTH", password)
                    setup.append(("AUTH", link.command(_command(*auth))))
                if db := int(kwargs.get("db", 0) or 0):
                    setup.append(("SELECT", link.command(_command("SELECT", db))))
                for _, future in setup:  # (a refused AUTH fails the SELECT after it too)
                    future.add_done_callback(_consume)
                for name, future in setup:
                    try:
                        await future
                    except ResponseError as e:  # (its text may quote the password: not kept)
                        code = str(e).split(" ", 1)[0]  # (ERR, WRONGPASS, NOPERM...)
                        code = code if code.isalpha() and code.isupper() else "an error"
                        raise ResponseError(f"Redis refused {name} ({code})") from None
        except BaseException:
            link.close()
            raise
        return link

    def command(self, data: bytes) -> asyncio.Future[Any]:
        """A command of the link's own (its set-up): the future of its answer."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self.write([(None, None, [], "", future)], data)
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def write(self, batch: list[_Call], data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.waiting.extend(batch)
        self.due.append([len(batch), self._loop.time() + TIMEOUT])
        if self._timer is None:
            self._timer = self._loop.call_at(self.due[0][1], self._check)

    def data_received(self, data: bytes) -> None:
        reader, waiting, due = self.reader, self.waiting, self.due
        reader.feed(data)
        try:
            while (answer := reader.gets()) is not False:
                call = waiting.popleft()
                head = due[0]
                head[0] -= 1
                if not head[0]:
                    due.popleft()
                future = call[4]
                if isinstance(answer, hiredis.ReplyError):
                    if call[0] is not None and str(answer).startswith("NOSCRIPT"):
                        self._run_again(call)  # (Redis lost its scripts: loaded, run again)
                    elif not future.done():
                        future.set_exception(ResponseError(str(answer)))
                elif not future.done():
                    future.set_result(answer)
        except (hiredis.ProtocolError, IndexError) as e:  # (not RESP, or an answer too many)
            self._lost(ConnectionError(f"Redis answered out of protocol: {type(e).__name__}"))

    def _run_again(self, call: _Call) -> None:
        """A call whose script Redis did not have (a restart, SCRIPT FLUSH): the script
        loaded, then the call written again, on this link, behind what is waiting (the
        calls that lost their script come back in the order they were made)."""
        script = call[0]
        assert script is not None
        self.command(_command("SCRIPT", "LOAD", script.script)).add_done_callback(_consume)
        # (waited for as a call without a script: a second NOSCRIPT is its error, not a
        # third try: a Redis that refuses SCRIPT LOAD would have it sent for ever)
        self.write([(None, *call[1:])], _wire([call]))

    def _check(self) -> None:
        """The oldest batch's answers are due: past it, the link has failed."""
        self._timer = None
        if not self.due:
            return
        if self._loop.time() >= self.due[0][1]:
            self._lost(TimeoutError(f"Redis did not answer within {TIMEOUT} s"))
        else:
            self._timer = self._loop.call_at(self.due[0][1], self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or ConnectionError("Redis closed the connection"))

    def _lost(self, error: BaseException) -> None:
        self.open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = list(self.waiting)
        self.waiting.clear()
        self.due.clear()
        _fail(waiting, error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Closed; the calls still waiting (their callers left) dropped."""
        self._lost(ConnectionError("closed"))


def _tls(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context of a rediss:// URL's ``ssl_*`` options (as redis-py reads them)."""
    context = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
    if (certfile := kwargs.get("ssl_certfile")) is not None:
        context.load_cert_chain(certfile, kwargs.get("ssl_keyfile"))
    reqs = str(kwargs.get("ssl_cert_reqs", "required")).lower()
    check = str(kwargs.get("ssl_check_hostname", reqs == "required")).lower()
    # (no certificate checked: no name to check either; ssl refuses CERT_NONE with it on)
    context.check_hostname = check in ("true", "1", "yes") and reqs != "none"
    if reqs == "none":
        context.verify_mode = ssl.CERT_NONE
    elif reqs == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _Answer(asyncio.Future[Any]):
    """The future of a script call's answer.  A cancel of the request awaiting it does not
    reach it: the call goes to Redis all the same, so its answer is waited for, and the
    request is cancelled once it came (asyncio's own way when a future refuses a cancel),
    with the answer there to give back what the call took (:meth:`RedisCounters.when_left`).
    Cheaper than a shield around every call (no second future, no callbacks)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


def _fail(calls: list[_Call], error: BaseException) -> None:
    """``error`` to every call of ``calls`` still waited for (an outage: the loop closing,
    a cancellation)."""
    for *_, future in calls:
        if future.done():
            continue
        if isinstance(error, Exception):
            future.set_exception(error)
        else:
            asyncio.Future.cancel(future)  # (an _Answer's own cancel() refuses)


async def uncancelled(call: Awaitable[T]) -> T:
    """``call`` (a Redis command) to its end even when the request that made it is
    cancelled (a client that went away): a command cut off mid-way costs its connection,
    and its failure must not pass for Redis failing."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_consume)
        raise


def _consume(task: asyncio.Future[Any]) -> None:
    """A failure retrieved of what nobody awaits (a command cut off from its caller, a
    set-up command whose failure is the calls' behind it)."""
    if not task.cancelled():
        task.exception()  # (retrieved: an outage is seen by the next call)


def unanswered(error: BaseException) -> bool:
    """Whether ``error`` says Redis cannot be used (down, unreachable, too slow, a password
    it refuses: redis-py's ``AuthenticationError`` is a ``ConnectionError``), not that it
    answered one call with an error (a script's, ``OOM``: a ``ResponseError``)."""
    if isinstance(error, ResponseError):
        return False
    return isinstance(error, OSError | TimeoutError | RedisError)
