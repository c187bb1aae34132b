"""DIAL's ``rateLimitSchedule``: day, week and month windows reset on calendar boundaries
(time zone, week start day, reset time), minute and hour windows slide; every window of a
limited scope is counted; the limits answers, 429s and headers say when a window resets.

The engine's tests run once per storage (memory, a real Redis) on an injected clock set
ahead of the real one (Redis lets a period's counter lapse at the period's end, by its own
clock)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Limit
from dialproxy.config.parse import Source
from dialproxy.config.schedule import Schedule
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Limiter, Scope
from dialproxy.counting.storage import Storage, close_storage
from dialproxy.errors import ConfigError, RateLimited
from dialproxy.server import counter_storage
from tests.conftest import Backend, ProxyFactory, new_key
from tests.redis_server import RedisServer

BERLIN = ZoneInfo("Europe/Berlin")


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def local(zone: ZoneInfo, epoch: int) -> str:
    return datetime.fromtimestamp(epoch, zone).isoformat()


def test_default_schedule_is_utc_midnight_monday_and_the_first() -> None:
    schedule = Schedule()
    now = at(ZoneInfo("UTC"), 2026, 12, 4, 15, 30)  # a Friday
    assert [local(ZoneInfo("UTC"), t) for t in schedule.period("day", now)] == [
        "2026-12-04T00:00:00+00:00",
        "2026-12-05T00:00:00+00:00",
    ]
    assert [local(ZoneInfo("UTC"), t) for t in schedule.period("week", now)] == [
        "2026-11-30T00:00:00+00:00",
        "2026-12-07T00:00:00+00:00",
    ]
    assert [local(ZoneInfo("UTC"), t) for t in schedule.period("month", now)] == [
        "2026-12-01T00:00:00+00:00",
        "2027-01-01T00:00:00+00:00",
    ]


def test_reset_time_week_start_and_daylight_saving_in_a_zone() -> None:
    schedule = Schedule("Europe/Berlin", week_start=6, reset=(3, 30))  # Sundays, 03:30
    # 02:00 local on Dec 1st is before the reset: still Nov 30th's day, November's month
    early = at(BERLIN, 2026, 12, 1, 2, 0)
    assert [local(BERLIN, t) for t in schedule.period("day", early)] == [
        "2026-11-30T03:30:00+01:00",
        "2026-12-01T03:30:00+01:00",
    ]
    assert [local(BERLIN, t) for t in schedule.period("month", early)] == [
        "2026-11-01T03:30:00+01:00",
        "2026-12-01T03:30:00+01:00",
    ]
    assert [local(BERLIN, t) for t in schedule.period("week", early)] == [
        "2026-11-29T03:30:00+01:00",  # the Sunday before
        "2026-12-06T03:30:00+01:00",
    ]
    # the day the clocks go back (2026-10-25) is 25 hours long; the spring one 23
    start, end = Schedule("Europe/Berlin").period("day", at(BERLIN, 2026, 10, 25, 12, 0))
    assert end - start == 25 * 3600
    start, end = Schedule("Europe/Berlin").period("day", at(BERLIN, 2027, 3, 28, 12, 0))
    assert end - start == 23 * 3600
    # a month is its own length (February of a leap year: 29 days)
    start, end = Schedule().period("month", at(ZoneInfo("UTC"), 2028, 2, 10, 0, 0))
    assert end - start == 29 * 86_400
    assert schedule.resets_at(end) == "2028-03-01T01:00:00+01:00"  # (as Berlin says it)


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


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_day_window_resets_at_the_boundary_not_a_day_later(storage: Storage) -> None:
    """100 tokens a day (on a schedule resetting at 06:00 UTC) and 5 requests an hour: full
    ten seconds before the reset, the day window refuses with a Retry-After of those ten
    seconds; past the reset it is empty, while the sliding hour still counts."""
    # a day ahead of the real clock (Redis's) whose 06:00 starts a day but neither a week
    # (Monday) nor a month, at 05:59:50 UTC: 10 s before the reset
    date = datetime.now(UTC).date() + timedelta(days=1)
    while date.weekday() == 0 or date.day == 1:
        date += timedelta(days=1)
    clock = Clock(datetime(date.year, date.month, date.day, 5, 59, 50, tzinfo=UTC).timestamp())
    schedule = Schedule("UTC", reset=(6, 0))
    limit = Limit(day=100, request_hour=5)
    scope = Scope(
        owner="p:team",
        model="chat",
        token_windows=limit.token_windows(schedule),
        request_windows=limit.request_windows(schedule),
    )
    limiter = Limiter(storage, clock=clock)
    try:
        await limiter.admit([scope], 100)  # its reservation fills the day
        await limiter.settle([scope], 0, 0)  # (used what it reserved)
        with pytest.raises(RateLimited) as refused:
            await limiter.admit([scope], 1)
        assert refused.value.extra["window"] == "day"
        assert refused.value.retry_after == 10
        assert "Day limit: 100 / 100 tokens." in str(refused.value)
        assert "Week limit" not in str(refused.value)  # (counted, not limited: not named)
        clock.now += 11  # 06:00:01: a new day
        await limiter.admit([scope], 30)
        day = {
            s.window.name: s
            for s in await limiter.usage("p:team", "chat", scope.token_windows, "t")
        }
        assert day["day"].used == 30 and day["week"].used == 130 and day["month"].used == 130
        requests = await limiter.usage("p:team", "chat", scope.request_windows, "r")
        # the request day is new (the sliding minute and hour go by the storage's clock:
        # Redis's own; their tests are in test_limiter)
        assert requests[2].used == 1
        # a request admitted before the reset is settled in the day it was admitted in
        await limiter.settle([scope], -20, 0, admitted=clock.now - 30)
        day = {
            s.window.name: s
            for s in await limiter.usage("p:team", "chat", scope.token_windows, "t")
        }
        assert day["day"].used == 30
    finally:
        await limiter.close()


def source(doc: dict[str, Any]) -> list[Source]:
    return [Source("aidial.config.json", json.dumps(doc).encode())]


def test_an_unknown_time_zone_is_refused_at_its_path() -> None:
    doc = {"rateLimitSchedule": {"timezone": "Mars/Olympus_Mons"}}
    with pytest.raises(ConfigError) as error:
        build_snapshot(source(doc), {})
    problems = [(p.path, p.message) for p in error.value.problems]
    assert any(
        path == "$.rateLimitSchedule.timezone" and "unknown time zone" in message
        for path, message in problems
    ), problems
    with pytest.raises(ConfigError):
        build_snapshot(source({"rateLimitSchedule": {"resetTime": "24:00"}}), {})


KEY = new_key()
KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30, no daylight saving


def kolkata_day_end(reset: tuple[int, int] = (4, 15)) -> datetime:
    now = datetime.now(KOLKATA)
    end = now.replace(hour=reset[0], minute=reset[1], second=0, microsecond=0)
    return end if end > now else end + timedelta(days=1)


async def test_the_limits_answers_and_the_429_say_when_the_day_resets(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    config = {
        "rateLimitSchedule": {
            "timezone": "Asia/Kolkata",
            "weekStartDay": "Wed",
            "resetTime": "04:15",
        },
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": backend.url()}]}},
        "roles": {"r": {"limits": {"chat": {"minute": 100000, "requestDay": 2}}}},
        "keys": {KEY: {"project": "p", "role": "r"}},
    }
    proxy = await make_proxy(config)
    headers = {"Api-Key": KEY}
    chat = {"messages": [{"role": "user", "content": "one two three"}]}  # 7 tokens
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(
                proxy.url("/openai/deployments/chat/chat/completions"), json=chat, headers=headers
            ) as r:
                assert r.status == 200
        async with s.post(
            proxy.url("/openai/deployments/chat/chat/completions"), json=chat, headers=headers
        ) as r:
            refused, body = r, await r.json()
        await proxy.settle()
        async with s.get(proxy.url("/v1/deployments/chat/limits"), headers=headers) as r:
            stats = await r.json()
        async with s.get(proxy.url("/v1/user/limits"), headers=headers) as r:
            mine = await r.json()
    end = kolkata_day_end()
    assert refused.status == 429
    assert body["error"]["window"] == "day"
    assert abs(int(refused.headers["Retry-After"]) - (end.timestamp() - time.time())) <= 5
    assert stats["dayRequestStats"] == {"total": 2, "used": 2, "resetsAt": end.isoformat()}
    # every window is counted, limited or not (its use is known: DIAL)
    long_max = 9223372036854775807
    assert stats["minuteTokenStats"] == {"total": 100000, "used": 14}
    assert stats["dayTokenStats"]["used"] == 14 and stats["dayTokenStats"]["total"] == long_max
    assert stats["dayTokenStats"]["resetsAt"] == end.isoformat()
    assert stats["weekTokenStats"]["used"] == 14 and stats["monthTokenStats"]["used"] == 14
    week_end = datetime.fromisoformat(stats["weekTokenStats"]["resetsAt"])
    assert week_end.weekday() == 2 and (week_end.hour, week_end.minute) == (4, 15)  # Wednesday
    assert stats["monthTokenStats"]["resetsAt"].endswith("-01T04:15:00+05:30")
    assert stats["hourRequestStats"] == {"total": long_max, "used": 2}
    # the key holder's view: the limited windows, each with its reset
    day = next(w for w in mine["models"]["chat"]["limits"] if w["window"] == "day")
    assert day["resetAt"] == end.isoformat() and day["used"] == 2
    assert [w["window"] for w in mine["models"]["chat"]["limits"]] == ["minute", "day"]
