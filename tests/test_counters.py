"""LocalCounters answers exactly as the limits library's MemoryStorage it stands in for:
every call of a random sequence on both, with a clock that jumps by fractions of a window,
whole windows and more, must give the same answer."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
import redis.asyncio
from limits.aio.storage import MemoryStorage, RedisStorage

from dialproxy.counting.counters import SWEEP_EVERY, Counts, LocalCounters
from dialproxy.counting.rediscounters import PREFIX, RedisCounters
from tests.redis_server import RedisServer


async def take_back(
    storage: LocalCounters | MemoryStorage, key: str, expiry: int, n: int = 1
) -> None:
    """Undo an acquire: ours, and limits' own (a ``decr`` of the current bucket)."""
    if isinstance(storage, LocalCounters):
        storage.take_back(key, expiry, n)
    else:
        _, current = storage.sliding_window_keys(key, expiry, time.time())
        await storage.decr(current, n)


# Two TTLs (seconds) read a moment apart, by two calls or from windows made by two calls:
# as far apart as a busy machine may make those calls.  (A TTL gone wrong is off by a
# window, 1 s or more, or by a unit.)
APART = 0.25


def same(a: Counts, b: Counts) -> bool:
    """The same counts, their TTLs at most ``APART`` apart."""
    return (a[0], a[2]) == (b[0], b[2]) and all(
        abs(x - y) < APART for x, y in ((a[1], b[1]), (a[3], b[3]))
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seed", range(5))
async def test_same_answers_as_memory_storage(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    rnd = random.Random(seed)
    ours, theirs = LocalCounters(), MemoryStorage()
    keys = [f"dp:p:{i}:chat:r:minute" for i in range(3)]
    for _ in range(5_000):
        key, expiry = rnd.choice(keys), rnd.choice([1, 2, 60])
        op = rnd.random()
        if op < 0.15:  # acquire in several counters or in none, as one call after another
            batch = [((k, rnd.choice([1, 2, 60])), rnd.randint(0, 20)) for k in rnd.sample(keys, 2)]
            amount = rnd.randint(1, 5)
            got = ours.acquire_many([w for w, _ in batch], [limit for _, limit in batch], amount)
            want: list[tuple[int, float, int, float]] = []
            for (k, e), limit in batch:
                if not await theirs.acquire_sliding_window_entry(k, limit, e, amount):
                    for (done, done_e), _ in batch[: len(want)]:
                        await take_back(theirs, done, done_e, amount)
                    assert got == len(want)
                    break
                want.append(await theirs.get_sliding_window(k, e))
            else:
                assert got == want
        elif op < 0.25:  # read several counters in one call
            batch2 = [(k, rnd.choice([1, 2, 60])) for k in keys]
            assert ours.read_many(batch2) == [await theirs.get_sliding_window(*c) for c in batch2]
        elif op < 0.3:  # add usage whatever the limit
            batch2 = [(k, rnd.choice([1, 2, 60])) for k in rnd.sample(keys, 2)]
            amount = rnd.randint(1, 5)
            ours.add_many(batch2, amount)
            for k, e in batch2:
                assert await theirs.acquire_sliding_window_entry(k, 10**9, e, amount)
        elif op < 0.6:
            limit, amount = rnd.randint(0, 20), rnd.randint(1, 5)
            assert await ours.acquire_sliding_window_entry(
                key, limit, expiry, amount
            ) == await theirs.acquire_sliding_window_entry(key, limit, expiry, amount)
        elif op < 0.9:
            assert await ours.get_sliding_window(key, expiry) == await theirs.get_sliding_window(
                key, expiry
            )
        else:
            await take_back(ours, key, expiry)
            await take_back(theirs, key, expiry)
        clock.now += rnd.choice([0.0, 0.01, 0.3, 1.1, 7.0, 7.0, 61.0, 125.0])


@pytest.mark.parametrize("seed", range(3))
async def test_change_many_is_settle_window_by_window(seed: int) -> None:
    """``change_many`` (a settlement's one signed amount for many windows, the loop inline)
    leaves every counter as ``settle`` of each window on its own does: a negative amount
    taken from the current bucket, then the previous; sliding and calendar windows."""
    rnd = random.Random(seed)
    # (a sweep is not what is compared)
    batched, alone = LocalCounters(sweep_every=math.inf), LocalCounters(sweep_every=math.inf)
    now = 1_800_000_000.0
    windows = [("a", 1), ("b", 2), ("c", 60), ("d@1", -(1_800_000_000 + 90))]
    for _ in range(3_000):
        chosen = rnd.sample(windows, rnd.randint(1, len(windows)))
        amount = rnd.randint(-8, 8)
        batched.change_many(chosen, amount, now)
        for window in chosen:
            alone.settle([window], [amount], now=now)
        assert batched.windows == alone.windows
        now += rnd.choice([0.0, 0.01, 0.3, 1.1, 2.5, 61.0])


async def test_expired_counters_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    counters = LocalCounters()
    for i in range(100):
        assert counters.acquire_many([(f"k{i}", 1)], [10]) != 0
    counters.add_many([("tokens", 60)], 5)
    assert len(counters.windows) == 101
    clock.now += SWEEP_EVERY + 1
    assert counters.acquire_many([("fresh", 1)], [10]) != 0
    assert list(counters.windows) == [("tokens", 60), ("fresh", 1)]  # 61 s: still readable
    clock.now += SWEEP_EVERY + 1
    counters.add_many([("tokens", 60)], 5)
    assert list(counters.windows) == [("tokens", 60)]
    assert (await counters.get_sliding_window("tokens", 60))[::2] == (0, 5)


@pytest.mark.parametrize("seed", range(2))
async def test_redis_counters_answer_as_limits_own_redis_storage(
    redis_server: RedisServer, seed: int
) -> None:
    """The same calls, at the same moments, on our scripts and on limits' RedisStorage
    (other keys of the same Redis): the same counts (TTLs within ``APART``, the calls being
    a moment apart), windows of 1 and 2 s crossed by the sleeps."""
    redis_server.flush()
    ours = RedisCounters(redis_server.url)
    pool = redis.asyncio.ConnectionPool.from_url(redis_server.url)  # (closed by the test)
    theirs = RedisStorage(
        "async+" + redis_server.url,
        implementation="redispy",
        key_prefix="THEIRS",
        connection_pool=pool,  # type: ignore[arg-type]
    )
    rnd = random.Random(seed)
    keys = [(f"dp:p:{i}:chat:r:x", i + 1) for i in range(2)]  # (a key has one length)

    try:
        for storage in (ours, theirs):  # (connected, scripts loaded, modules imported: the
            await storage.acquire_sliding_window_entry("warm", 1, 1)  # first calls made a
            await storage.get_sliding_window("warm", 1)  # moment apart, as later ones)
        for _ in range(60):
            key, expiry = rnd.choice(keys)
            op = rnd.random()
            for storage in (ours, theirs):  # not across a roll-over: the two calls are
                _, _, _, ttl = await storage.get_sliding_window(key, expiry)  # a moment apart
                if 0 < ttl - expiry < APART:
                    await asyncio.sleep(ttl - expiry + 0.02)
            if op < 0.5:
                limit, amount = rnd.randint(0, 12), rnd.randint(1, 4)
                assert await ours.acquire_sliding_window_entry(
                    key, limit, expiry, amount
                ) == await theirs.acquire_sliding_window_entry(key, limit, expiry, amount)
            else:
                got = await ours.get_sliding_window(key, expiry)
                want = await theirs.get_sliding_window(key, expiry)
                assert same(got, want), (got, want)
            await asyncio.sleep(rnd.choice([0.0, 0.0, 0.01, 0.05, 0.3]))
    finally:
        await ours.close()
        await pool.disconnect()


async def test_redis_admit_counts_a_window_named_twice_twice(redis_server: RedisServer) -> None:
    """Two scopes may name the same counter in one admission: both amounts count (the
    second add finds the bucket the first made), a sliding and a calendar window alike."""
    redis_server.flush()
    counters = RedisCounters(redis_server.url)
    end = int(time.time()) + 3600  # (a calendar period's end, epoch seconds)
    try:
        for window in (("dp:p:m:tok:minute", 60), ("dp:p:m:tok:day@1", -end)):
            refused, counts = await counters.admit([window, window], [100, 100], [0, 0], [3, 4])
            assert refused == 0
            assert [c[2] for c in counts] == [3, 7]  # (each as it stood after its own add)
            (after,) = await counters.read([window])
            assert after[2] == 7
            assert 0 < after[3] <= (120 if window[1] > 0 else 3600)
    finally:
        await counters.close()


async def test_redis_calls_made_together_are_answered_each_as_alone(
    redis_server: RedisServer,
) -> None:
    """Admissions made in the same turn of the loop travel together (one pipeline): each
    still gets its own answer, the limit holds exactly, a caller that is cancelled changes
    nobody else's answer, and scripts that Redis lost (SCRIPT FLUSH, as after a restart)
    are loaded again for the whole batch."""
    redis_server.flush()
    counters = RedisCounters(redis_server.url)
    window = ("dp:p:m:req:minute", 60)
    try:
        await counters.prepare()

        async def one() -> int:
            refused, _ = await counters.admit([window], [10], [1], [1])
            return refused

        calls = [asyncio.ensure_future(one()) for _ in range(30)]
        cancelled = calls.pop(7)
        await asyncio.sleep(0)  # (all of them queued, none sent yet)
        cancelled.cancel()
        answers = await asyncio.gather(*calls)
        # the cancelled caller's admission still ran (a command is never cut off mid-way)
        assert sorted(answers) == [0] * 9 + [1] * 20 or sorted(answers) == [0] * 10 + [1] * 19
        (counts,) = await counters.read([window])
        assert counts[2] == 10
        redis_server.command("SCRIPT", "FLUSH")
        again = await asyncio.gather(*(counters.admit([window], [20], [1], [1]) for _ in range(5)))
        assert [refused for refused, _ in again] == [0] * 5
        assert [counts[0][2] for _, counts in again] == [11, 12, 13, 14, 15]
    finally:
        await counters.close()


@pytest.mark.parametrize("seed", range(2))
async def test_redis_windows_counted_unread_and_settled_match_the_read_path(
    redis_server: RedisServer, seed: int
) -> None:
    """A window counted but not limited (mode 2: its counts not read at admission) ends
    with the same counters as one given the same calls with every count read (mode 0, a
    limit never reached), across roll-overs of 1 and 2 s windows; an admission that a
    limited window refuses adds nothing to either; a settlement adds a positive amount to
    the current bucket and takes a negative one from it, then what it lacks from the
    previous one."""
    redis_server.flush()
    counters = RedisCounters(redis_server.url)
    rnd = random.Random(seed)
    huge = 2**62
    pairs = [((f"dp:p:{i}:chat:t:x", i + 1), (f"dp:p:{i}:chat:t:y", i + 1)) for i in range(2)]

    try:
        for _ in range(60):
            unread, read = rnd.choice(pairs)
            op, amount = rnd.random(), rnd.randint(-6, 6)
            if op < 0.5 and amount > 0:
                started = time.monotonic()
                refused, counts = await counters.admit(
                    [unread, read], [huge, huge], [2, 0], [amount, amount]
                )
                assert refused == 0
                assert counts[0][:2] == (0, 0.0)  # (its previous bucket not read)
                assert counts[1][2] >= amount
                # (the admission's counts, its previous bucket's TTL worked out, are the
                # read path's, which asks Redis for it)
                _, now = await counters.read([unread, read])
                if counts[1][3] - read[1] > time.monotonic() - started:  # (no roll-over)
                    assert same(counts[1], now), (counts[1], now)
            elif op < 0.6:  # refused by a limited window: nothing added anywhere
                refused, _ = await counters.admit(
                    [unread, read, ("dp:p:full:chat:r:x", 60)],
                    [huge, huge, 0],
                    [2, 0, 1],
                    [1, 1, 1],
                )
                assert refused == 3
            else:
                # (both read: a read rolls a window over, and the two must roll alike)
                started = time.monotonic()
                _, before = await counters.read([unread, read])
                await counters.settle([unread, read], [amount, amount])
                _, after = await counters.read([unread, read])
                if before[3] - read[1] > time.monotonic() - started:  # (no roll-over between)
                    previous, current = before[0], before[2]
                    if amount > 0:
                        current += amount
                    else:
                        taken = min(current, -amount)
                        current -= taken
                        previous -= min(previous, -amount - taken)
                    assert (after[0], after[2]) == (previous, current), (before, amount, after)
            a, b = await counters.read([unread, read])
            assert same(a, b), (a, b)
            await asyncio.sleep(rnd.choice([0.0, 0.0, 0.01, 0.05, 0.3, 0.6]))
    finally:
        await counters.close()


async def test_redis_settlement_leaves_every_bucket_with_its_ttl(
    redis_server: RedisServer,
) -> None:
    """A settlement takes back at most what a sliding or a calendar window holds (a bucket
    that was not there stays away: never a key without a TTL, nor below 0), and a positive
    one makes a calendar period's counter that lapses at the period's end."""
    redis_server.flush()
    counters = RedisCounters(redis_server.url)
    end = int(time.time()) + 3600
    sliding, calendar = ("dp:p:m:t:minute", 60), ("dp:p:m:t:day@1", -end)
    # (the current buckets' keys: as limits names them, under its prefix)
    keys = [f"{PREFIX}{{{key}}}" for key, _ in (sliding, calendar)]

    def ttls() -> list[int]:
        return [int(redis_server.command("PTTL", key)) for key in keys]  # type: ignore[arg-type]

    try:
        await counters.settle([sliding, calendar], [-5, -5])
        assert redis_server.command("EXISTS", *keys) == 0
        refused, _ = await counters.admit([sliding, calendar], [100, 100], [0, 2], [3, 3])
        assert refused == 0
        await counters.settle([sliding, calendar], [-5, -5])
        counts = await counters.read([sliding, calendar])
        assert [c[2] for c in counts] == [0, 0]
        assert all(t > 0 for t in ttls()), ttls()
        redis_server.flush()
        await counters.settle([sliding, calendar], [4, 4])
        counts = await counters.read([sliding, calendar])
        assert [c[2] for c in counts] == [4, 4]
        sliding_ttl, calendar_ttl = ttls()
        assert 119_000 < sliding_ttl <= 120_000
        assert abs(calendar_ttl - (end - time.time()) * 1000) < 2000
        await counters.settle([calendar], [2])  # (its end kept)
        assert abs(int(redis_server.command("PTTL", keys[1])) - calendar_ttl) < 2000  # type: ignore[arg-type]
    finally:
        await counters.close()
