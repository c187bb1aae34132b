"""The limiter over every storage: each test runs once on memory and once on a real Redis.

As the ``limits`` library tests its own strategies, the storage is a parametrized fixture;
the Redis one is a real ``redis-server`` (started by the session fixture in conftest).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from limits.aio.storage import MemoryStorage

from dialproxy.config.model import REQUEST_WINDOWS, TOKEN_WINDOWS, Window
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Limiter, Scope, WindowState
from dialproxy.counting.storage import SlidingStorage, Storage, close_storage, take_back
from dialproxy.errors import RateLimited
from dialproxy.server import counter_storage
from tests.conftest import admit_request, check_tokens
from tests.redis_server import RedisServer

MINUTE, HOUR, DAY = 60, 3_600, 86_400


@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    if request.param == "memory":
        yield LocalCounters()
        return
    redis: RedisServer = request.getfixturevalue("redis_server")
    redis.flush()
    shared = counter_storage(redis.url)
    yield shared
    await close_storage(shared)


@pytest.fixture
async def limiter(storage: Storage) -> AsyncIterator[Limiter]:
    limiter = Limiter(storage)
    yield limiter
    await limiter.close()


def sliding(storage: Storage) -> SlidingStorage:
    return storage


def requests(owner: str = "p:team", model: str = "chat", **limits: int) -> Scope:
    windows = dict(REQUEST_WINDOWS)
    return Scope(
        owner=owner,
        model=model,
        request_windows=tuple(Window(n, windows[n], v) for n, v in limits.items()),
    )


async def used(limiter: Limiter, scope: Scope, kind: str = "r") -> dict[str, int]:
    windows = {"r": scope.request_windows, "t": scope.token_windows}[kind]
    states = await limiter.usage(scope.owner, scope.model, windows, kind)
    return {s.window.name: s.used for s in states}


async def admitted(limiter: Limiter, scope: Scope) -> bool:
    try:
        await admit_request(limiter, scope)
    except RateLimited:
        return False
    return True


# The arithmetic on its own: weighted = previous * (its ttl / window) + current.
STATS = [
    # (previous, previous ttl, current, current ttl) -> used, retry_after, reset
    ((0, 0.0, 3, 90.0), 3, 0.0, 90.0),
    ((10, 30.0, 0, 120.0), 5, 0.0, 30.0),
    # full: frees up when 10 * ttl / 60 + 4 < 10, i.e. once the previous ttl is below 36 s
    ((10, 45.0, 4, 75.0), 11, 9.0, 75.0),
    # over the limit in the current window alone (usage recorded after admission):
    # 40 s to the roll-over, then 10 s until 12 * ttl / 60 < 10
    ((0, 0.0, 12, 100.0), 12, 50.0, 100.0),
]


@pytest.mark.parametrize(("counts", "used_", "retry", "reset"), STATS)
def test_sliding_window_arithmetic(
    counts: tuple[int, float, int, float], used_: int, retry: float, reset: float
) -> None:
    state = WindowState(Window("minute", MINUTE, 10), counts)
    assert (state.used, state.retry_after, state.reset) == pytest.approx((used_, retry, reset))
    assert state.remaining == max(10 - used_, 0)


class Clock:
    """A clock the test moves (epoch seconds; a 2 s window starts at its start)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_the_previous_window_weighs_by_its_remaining_share(storage: Storage) -> None:
    """A window of limit 4 on the real storage: the arithmetic and the Retry-After hold.  In
    memory a 2 s window on a clock the test moves; Redis's windows follow its own clock (a
    window starts at its first request): an 8 s one, where each step has a quarter of it
    (2 s) to run on a busy machine."""
    clock = Clock() if isinstance(storage, LocalCounters) else None
    length = 8 if clock is None else 2
    limiter = Limiter(storage) if clock is None else Limiter(storage, clock=clock)

    async def wait(seconds: float) -> None:
        if clock is None:
            await asyncio.sleep(seconds)
        else:
            clock.now += seconds

    window = Window("minute", length, 4)
    scope = Scope(owner="p:slide", model="chat", request_windows=(window,))

    async def usage() -> WindowState:
        (state,) = await limiter.usage(scope.owner, scope.model, [window], "r")
        return state

    try:
        assert [await admitted(limiter, scope) for _ in range(5)] == [True] * 4 + [False]
        _, _, current, current_ttl = (await usage()).counts
        assert current == 4

        await wait(current_ttl - length + 0.05)  # rolled over: the 4 are the previous window
        assert (await usage()).used == 3  # floor(4 * (length - 0.05) / length)
        assert await admitted(limiter, scope)
        assert not await admitted(limiter, scope)
        state = await usage()
        # 4 * ttl / length + 1 < 4 once the previous ttl is below 3/4 of the window: a
        # quarter of it (less 0.05 s) from now
        assert 0 < state.retry_after <= length / 4  # (less as the machine is slower)
        await wait(state.retry_after + 0.05)
        assert await admitted(limiter, scope)
        assert not await admitted(limiter, scope)
    finally:
        await limiter.close()


async def test_a_refusal_says_which_window_and_when(limiter: Limiter, storage: Storage) -> None:
    scope = requests(minute=3, hour=100)
    for _ in range(3):
        tightest = await admit_request(limiter, scope)
    assert tightest is not None
    assert (tightest.window.name, tightest.used, tightest.remaining) == ("minute", 3, 0)
    assert await used(limiter, scope) == {"minute": 3, "hour": 3}
    with pytest.raises(RateLimited) as refused:
        await admit_request(limiter, scope)
    e = refused.value
    assert e.status == 429
    assert e.message == (
        "Hit request rate limit. Minute limit: 3 / 3 requests. Hour limit: 3 / 100 requests."
    )
    assert e.extra["limit_type"] == "request" and e.extra["window"] == "minute"
    assert e.headers == {"Retry-After": str(e.retry_after)}
    # Redis windows start at the first hit (a full minute to go); memory's follow the clock.
    assert 1 <= e.retry_after <= 60
    if not isinstance(storage, MemoryStorage):
        assert e.retry_after == 60


async def test_a_request_refused_by_a_later_window_is_taken_back(
    limiter: Limiter, storage: Storage
) -> None:
    scope = requests(minute=10, hour=2)
    assert [await admitted(limiter, scope) for _ in range(7)] == [True, True] + [False] * 5
    # The minute window counted each refused request before the hour refused it: taken back.
    assert await used(limiter, scope) == {"minute": 2, "hour": 2}
    day = await sliding(storage).get_sliding_window("dp:p:team:chat:r:day", DAY)
    assert day[2] == 0  # a window without a limit is not counted
    _, _, current, current_ttl = await sliding(storage).get_sliding_window(
        "dp:p:team:chat:r:minute", MINUTE
    )
    assert current == 2
    assert current_ttl > MINUTE  # the take-back left the window's clock alone


async def test_take_back_after_a_roll_over_never_goes_negative(storage: Storage) -> None:
    key = "dp:p:roll:chat:r:minute"
    s = storage
    _, _, _, current_ttl = await s.get_sliding_window(key, 1)
    if 0 < current_ttl - 1 < 0.3:
        await asyncio.sleep(current_ttl - 1 + 0.01)
    assert await s.acquire_sliding_window_entry(key, 5, 1, 1)
    _, _, _, current_ttl = await s.get_sliding_window(key, 1)
    await asyncio.sleep(current_ttl - 1 + 0.05)  # the hit is now in the previous window
    await take_back(s, key, 1)
    previous, _, current, _ = await s.get_sliding_window(key, 1)
    assert current == 0
    if not isinstance(storage, MemoryStorage):
        assert previous == 0  # Redis takes it back from where it went


async def test_a_request_one_scope_refuses_is_taken_back_from_the_others(
    limiter: Limiter,
) -> None:
    project = requests(minute=5, hour=5, day=5)
    key_quota = Scope(owner="k:abc", model="chat", request_windows=(Window("hour", HOUR, 1),))
    await limiter.admit([project, key_quota])
    with pytest.raises(RateLimited):
        await limiter.admit([project, key_quota])  # the key's quota refuses the second one
    assert await used(limiter, project) == {"minute": 1, "hour": 1, "day": 1}


async def test_usage_is_recorded_whole_and_may_overshoot(
    limiter: Limiter, storage: Storage
) -> None:
    windows = dict(TOKEN_WINDOWS)
    scope = Scope(
        owner="p:tok",
        model="chat",
        token_windows=(Window("minute", windows["minute"], 10), Window("day", DAY, 1000)),
        cost_windows=(Window("day", DAY, 1_000_000),),  # 0.001 USD, in nano-USD
    )
    tightest = await check_tokens(limiter, scope)
    assert tightest is not None
    assert (tightest.window.name, tightest.used, tightest.remaining) == ("minute", 0, 10)
    await check_tokens(limiter, scope)
    await limiter.settle([scope], tokens=25, cost_nano_usd=2_000_000)
    with pytest.raises(RateLimited) as tokens:
        await check_tokens(limiter, scope)
    assert tokens.value.message == (
        "Hit token rate limit. Minute limit: 25 / 10 tokens. Day limit: 25 / 1000 tokens."
    )
    cost_only = Scope(owner="p:tok", model="chat", cost_windows=scope.cost_windows)
    with pytest.raises(RateLimited) as cost:
        await check_tokens(limiter, cost_only)
    assert cost.value.message == "Hit cost rate limit. Day limit: 0.002 / 0.001 USD."
    # Only limited windows count (each is a storage operation on every request).
    week = await sliding(storage).get_sliding_window("dp:p:tok:chat:t:week", 604_800)
    assert week[2] == 0
    # Nothing recorded when there is nothing to record.
    await limiter.settle([scope], tokens=0, cost_nano_usd=0)
    assert await used(limiter, scope, "t") == {"minute": 25, "day": 25}


async def test_one_hundred_concurrent_admissions_limit_five(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    """100 admissions at once, limit 5: exactly 5 pass.  On Redis they race through two
    clients, as two instances would; in memory through two limiters on the same counters."""
    second: Storage
    if isinstance(storage, MemoryStorage):
        second = storage
    else:
        second = counter_storage(request.getfixturevalue("redis_server").url)
    limiters = [Limiter(storage), Limiter(second)]
    scope = requests(hour=5)
    try:
        results = await asyncio.gather(*(admitted(limiters[i % 2], scope) for i in range(100)))
        assert results.count(True) == 5
        assert await used(limiters[0], scope) == {"hour": 5}
    finally:
        if second is not storage:
            await close_storage(second)


async def test_counters_outlive_a_changed_limit(limiter: Limiter) -> None:
    for _ in range(3):
        await admit_request(limiter, requests(hour=5))
    assert not await admitted(limiter, requests(hour=3))  # the 3 already counted
    assert await admitted(limiter, requests(hour=10))
    assert await used(limiter, requests(hour=10)) == {"hour": 4}


async def test_each_owner_and_model_has_its_own_counters(limiter: Limiter) -> None:
    assert await admitted(limiter, requests(hour=1))
    assert not await admitted(limiter, requests(hour=1))
    assert await admitted(limiter, requests(owner="p:other", hour=1))
    assert await admitted(limiter, requests(model="embed", hour=1))


async def test_the_tightest_window_is_the_least_remaining_then_the_last_to_empty() -> None:
    """The window an admission reports (for the rate-limit headers), across scopes too."""

    async def tightest(scopes: list[Scope], times: int = 1) -> str | None:
        limiter = Limiter(LocalCounters())
        for _ in range(times):
            state, _ = await limiter.admit(scopes)
        return state.window.name if state is not None else None

    assert await tightest([requests(day=50, minute=10)]) == "minute"  # 9 left, not 49
    # 6 left in both: the hour window takes longer to empty
    assert await tightest([requests(minute=10, hour=10)], times=4) == "hour"
    by_minute, by_hour = requests("p:a", minute=10), requests("p:b", hour=10)
    assert await tightest([by_minute, by_hour], times=4) == "hour"
    assert await tightest([by_hour, by_minute], times=4) == "hour"
    assert await tightest([requests("p:c")]) is None  # no request limit


def test_window_state_remaining_never_negative() -> None:
    state = WindowState(Window("minute", MINUTE, 5), (0, 0.0, 9, 90.0))
    assert (state.used, state.remaining, state.full) == (9, 0, True)
