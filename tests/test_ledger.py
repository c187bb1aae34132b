"""The usage ledger: its totals are what the limits counted, across a restart (SQLite) and
across two instances (Redis); ``dialproxy usage`` in each format; DIAL's usage endpoints;
retention."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis.exceptions
from structlog.testing import capture_logs

from dialproxy import cli
from dialproxy.counting.rediscounters import RedisCounters
from dialproxy.ledger import (
    DAY,
    HOUR,
    ROWS_PER_CALL,
    Ledger,
    RedisLedgerStore,
    RowKey,
    SqliteLedgerStore,
    usage_path,
)
from dialproxy.outcome import Outcome
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.web.appkeys import LEDGER
from dialproxy.wire.usage import Usage
from tests.conftest import Backend, Proxy, ProxyFactory, chat_model, new_key
from tests.redis_server import RedisServer

KEY = new_key()
SAME_PROJECT = new_key()
OTHER_PROJECT = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}
PRICING = {"unit": "token", "prompt": "0.001", "completion": "0.002"}


def config(backend: Backend, project: str = "p1") -> dict[str, Any]:
    return {
        "models": {
            "chat": chat_model(backend, pricing=PRICING),
            "other": chat_model(backend),
            "closed": chat_model(backend, userRoles=["admin"]),
        },
        "roles": {
            "basic": {
                "limits": {
                    "chat": {"day": 10_000_000, "requestDay": 100_000},
                    "other": {"day": 10_000_000, "requestDay": 100_000},
                },
                "costLimit": {"day": "1000"},
            },
        },
        "keys": {
            KEY: {"project": project, "role": "basic"},
            SAME_PROJECT: {"project": project, "role": "basic"},
            OTHER_PROJECT: {"project": project + "-other", "role": "basic"},
        },
    }


async def traffic(s: aiohttp.ClientSession, proxy: Proxy, keys: list[str]) -> list[int]:
    """Known traffic: plain and streamed chats to two models, and requests that fail (an
    unknown deployment, a forbidden one, a bad body)."""
    statuses = []
    for i, key in enumerate(keys):
        for model, body in (
            ("chat", CHAT),
            ("chat", CHAT | {"stream": True}),
            ("other", CHAT | {"max_tokens": 5}),
            ("nope", CHAT),
            ("closed", CHAT),
        ):
            headers = {"Api-Key": key}
            url = proxy.url(f"/openai/deployments/{model}/chat/completions")
            async with s.post(url, json=body, headers=headers) as r:
                await r.read()
                statuses.append(r.status)
        async with s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            data=b"{not json",
            headers={"Api-Key": key, "Content-Type": "application/json"},
        ) as r:
            statuses.append(r.status)
        if i % 2:
            async with s.post(
                proxy.url("/openai/v1/chat/completions"),
                json=CHAT | {"model": "chat"},
                headers={"Api-Key": key},
            ) as r:
                await r.read()
                statuses.append(r.status)
    return statuses


async def limits(s: aiohttp.ClientSession, proxy: Proxy, key: str, model: str) -> dict[str, Any]:
    await proxy.settle()
    async with s.get(proxy.url(f"/v1/deployments/{model}/limits"), headers={"Api-Key": key}) as r:
        assert r.status == 200
        stats: dict[str, Any] = await r.json()
    return stats


async def cost_used(s: aiohttp.ClientSession, proxy: Proxy, key: str) -> float:
    async with s.get(proxy.url("/v1/user/limits"), headers={"Api-Key": key}) as r:
        body = await r.json()
    (day,) = [c for c in body["cost"] if c["window"] == "day"]
    return float(day["used"])


def ledger_of(proxy: Proxy) -> Ledger:
    return proxy.app[LEDGER]


def settings_for(proxy_dir: Path, **extra: Any) -> Settings:
    return Settings(config_paths=(str(proxy_dir / "aidial.config.json"),), **extra)


def today() -> tuple[float, float]:
    now = time.time()
    return now // DAY * DAY, now + HOUR


async def by_deployment(ledger: Ledger, project: str) -> dict[str, dict[str, Any]]:
    rows = await ledger.rows(*today(), ("deployment",), project=project)
    return {r["deployment"]: r for r in rows}


async def test_totals_equal_the_limit_counters_across_a_restart(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    # a flush interval longer than the test: what reaches the file is the shutdown's write
    settings = settings_for(tmp_path, ledger_flush=3600)
    proxy = await make_proxy(config(backend), settings=settings)
    async with aiohttp.ClientSession() as s:
        statuses = await traffic(s, proxy, [KEY, SAME_PROJECT, KEY, OTHER_PROJECT])
        assert statuses.count(200) == 4 * 3 + 2 and {404, 403, 400} <= set(statuses)
        chat, other = await limits(s, proxy, KEY, "chat"), await limits(s, proxy, KEY, "other")
        cost = await cost_used(s, proxy, KEY)
    found = await by_deployment(ledger_of(proxy), "p1")
    assert found["chat"]["total_tokens"] == chat["dayTokenStats"]["used"] > 0
    assert found["chat"]["requests"] - found["chat"]["errors"] == chat["dayRequestStats"]["used"]
    assert found["other"]["total_tokens"] == other["dayTokenStats"]["used"] > 0
    assert found["other"]["requests"] == other["dayRequestStats"]["used"] == 3
    assert found["chat"]["cost_nano_usd"] / 1e9 == pytest.approx(cost)
    assert cost > 0
    assert found["(unknown)"] == found["(unknown)"] | {
        "requests": 3,
        "errors": 3,
        "total_tokens": 0,
    }
    assert found["closed"]["errors"] == 3
    assert (found["chat"]["errors"], found["chat"]["requests"]) == (3, 3 * 2 + 1 + 3)
    assert ledger_of(proxy).writes == 0  # nothing written yet: all of it pending
    async with aiohttp.ClientSession() as s, s.get(proxy.url("/health")) as r:
        health = (await r.json())["ledger"]
    assert health == {"pendingRows": health["pendingRows"], "writes": 0, "failedWrites": 0,
                      "failing": False}  # fmt: skip
    assert health["pendingRows"] >= 4  # (chat, other, (unknown), closed: one hour, project)

    await proxy.server.close()  # a clean stop writes the rest
    assert usage_path(tmp_path / "dialproxy-state.sqlite").is_file()
    again = await make_proxy(config(backend), settings=settings)
    assert not ledger_of(again).pending
    assert await by_deployment(ledger_of(again), "p1") == found
    async with aiohttp.ClientSession() as s:  # DIAL's endpoint, on the new instance
        url = again.url("/v1/deployments/chat/usage")
        async with s.get(url, headers={"Api-Key": SAME_PROJECT}) as r:
            assert r.status == 200
            body = await r.json()
    assert body["dayTokenStats"] == {"total": 10_000_000, "used": chat["dayTokenStats"]["used"]}
    assert body["usage"]["totalTokens"] == chat["dayTokenStats"]["used"]
    assert body["usage"]["requests"] == found["chat"]["requests"]
    assert body["dayCostStats"]["used"] == pytest.approx(cost)


async def test_two_instances_on_one_redis_add_to_one_ledger(
    backend: Backend, make_proxy: ProxyFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    project = "ledger-" + uuid.uuid4().hex[:8]  # (the session's Redis: counters of its own)
    proxies = [
        await make_proxy(
            config(backend, project),
            storage=counter_storage(redis_server.url),
            settings=settings_for(tmp_path, storage=redis_server.url, ledger_flush=0.1),
        )
        for _ in range(2)
    ]
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(
            traffic(s, proxies[0], [KEY, SAME_PROJECT]), traffic(s, proxies[1], [KEY, KEY])
        )
        chat = await limits(s, proxies[0], KEY, "chat")
        await proxies[1].settle()
        other = await limits(s, proxies[1], KEY, "other")
        await asyncio.sleep(0.4)  # both instances' writes (every 0.1 s)
        for proxy in proxies:
            assert not ledger_of(proxy).pending
        for proxy in proxies:  # either instance reads the whole ledger
            found = await by_deployment(ledger_of(proxy), project)
            assert found["chat"]["total_tokens"] == chat["dayTokenStats"]["used"] > 0
            assert (
                found["chat"]["requests"] - found["chat"]["errors"]
                == chat["dayRequestStats"]["used"]
            )
            assert found["other"]["total_tokens"] == other["dayTokenStats"]["used"] > 0
            assert found["other"]["requests"] == 4
        async with s.get(proxies[1].url("/v1/user/usage"), headers={"Api-Key": KEY}) as r:
            body = await r.json()
    assert body["deployments"]["chat"]["usage"]["totalTokens"] == chat["dayTokenStats"]["used"]
    assert body["deployments"]["chat"]["dayTokenStats"]["used"] == chat["dayTokenStats"]["used"]
    assert body["usage"]["requests"] == sum(r["requests"] for r in found.values())
    hour = int(time.time()) // HOUR * HOUR
    ttl = redis_server.command("TTL", f"dp:usage:h:{hour}")
    assert isinstance(ttl, int) and 399 * DAY < ttl <= 400 * DAY + HOUR  # the retention


async def test_dialproxy_usage_prints_each_format(
    backend: Backend,
    make_proxy: ProxyFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await make_proxy(config(backend), settings=settings_for(tmp_path))
    async with aiohttp.ClientSession() as s:
        await traffic(s, proxy, [KEY, OTHER_PROJECT])
        chat = await limits(s, proxy, KEY, "chat")
    await proxy.server.close()
    state = str(tmp_path / "dialproxy-state.sqlite")
    day = time.strftime("%Y-%m-%d", time.gmtime())

    async def run(*args: str) -> str:  # (in a thread: the command runs an event loop of its own)
        code = await asyncio.to_thread(cli.main, ["usage", "--state", state, *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    rows = json.loads(await run("--format", "json", "--by", "project", "--by", "deployment"))
    mine = {r["deployment"]: r for r in rows if r["project"] == "p1"}
    assert mine["chat"]["total_tokens"] == chat["dayTokenStats"]["used"]
    assert set(rows[0]) == {
        "project",
        "deployment",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
        "cost_nano_usd",
    }
    assert {r["project"] for r in rows} == {"p1", "p1-other"}

    found = list(
        csv.DictReader(io.StringIO(await run("--format", "csv", "--by", "day", "--by", "api")))
    )
    assert {(r["day"], r["api"]) for r in found} == {(day, "chat/completions")}
    assert sum(int(r["requests"]) for r in found) == sum(r["requests"] for r in rows)
    cost = sum(int(r["cost_nano_usd"]) for r in found)
    assert found[0]["cost_usd"] == f"0.{cost:09d}" and cost > 0

    table = (
        await run("--project", "p1", "--by", "deployment", "--from", day, "--to", day)
    ).splitlines()
    assert table[0].split() == [
        "deployment",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
    ]
    cells = {line.split()[0]: line.split() for line in table[2:] if not line.startswith("-")}
    assert int(cells["chat"][5]) == chat["dayTokenStats"]["used"]
    assert int(cells["total"][1]) == sum(r["requests"] for r in mine.values())
    # another day: nothing; a key's fingerprint: that key's rows
    assert (
        json.loads(await run("--format", "json", "--from", "2020-01-01", "--to", "2020-01-02"))
        == []
    )
    assert json.loads(await run("--format", "json", "--by", "hour", "--key", "nope")) == []

    # Redis: the same command, --storage
    project = "cli-" + uuid.uuid4().hex[:8]
    store = RedisLedgerStore(RedisCounters(redis_server.url).client)
    row: RowKey = (int(time.time()) // HOUR * HOUR, project, "fp", "", "chat", "responses")
    await store.write({row: [2, 1, 10, 20, 30, 1234]}, None)
    await store.client.aclose()
    argv = ["usage", "--storage", redis_server.url, "--project", project, "--format", "json"]
    code = await asyncio.to_thread(cli.main, argv)
    out, _ = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == [
        {
            "project": project,
            "deployment": "chat",
            "requests": 2,
            "errors": 1,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 30,
            "cost_usd": "0.000001234",
            "cost_nano_usd": 1234,
        }
    ]
    assert cli.main(["usage", "--state", str(tmp_path / "none.sqlite")]) == 1  # (no file)
    # a range that ends before it starts: a usage error, as the HTTP API's 400 (it printed
    # no rows, as if nothing had been used)
    backwards = ["usage", "--state", state, "--from", "2026-12-07", "--to", "2026-12-01"]
    assert cli.main(backwards) == 2
    assert "--from must be before --to" in capsys.readouterr().err


async def test_usage_endpoints_show_the_callers_own(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(config(backend), settings=settings_for(tmp_path))
    async with aiohttp.ClientSession() as s:
        await traffic(s, proxy, [KEY, KEY, SAME_PROJECT])
        await proxy.settle()

        async def get(path: str, key: str) -> tuple[int, dict[str, Any]]:
            async with s.get(proxy.url(path), headers={"Api-Key": key}) as r:
                return r.status, await r.json()

        _, project = await get("/v1/user/usage", KEY)
        _, own = await get("/v1/user/usage?scope=key", SAME_PROJECT)
        _, other = await get("/v1/user/usage", OTHER_PROJECT)
        _, old = await get("/v1/user/usage?from=2020-01-01&to=2020-01-31", KEY)
        status, forbidden = await get("/v1/deployments/closed/usage", KEY)
        bad, _ = await get("/v1/user/usage?from=yesterday", KEY)
        unknown, _ = await get("/v1/deployments/nope/usage", KEY)
        # given twice (which one?), past the range: a 400 that says so
        twice = await get("/v1/user/usage?from=2020-01-01&from=2026-01-01", KEY)
        both_scopes = await get("/v1/user/usage?scope=key&scope=project", KEY)
        late = await get("/v1/user/usage?to=9998-12-31T23:00Z", KEY)
    assert set(project["deployments"]) == {"chat", "other", "(unknown)", "closed"}
    assert project["deployments"]["other"]["usage"]["requests"] == 3
    assert own["deployments"]["other"]["usage"]["requests"] == 1
    entry = project["deployments"]["chat"]
    assert set(entry) >= {
        "dayTokenStats",
        "weekTokenStats",
        "monthTokenStats",
        "hourRequestStats",
        "dayRequestStats",
        "dayCostStats",
        "weekCostStats",
        "monthCostStats",
        "usage",
    }
    assert entry["weekTokenStats"]["total"] == 9223372036854775807  # (no week limit)
    assert entry["dayTokenStats"]["used"] == entry["usage"]["totalTokens"] > 0
    assert project["dayCostStats"]["total"] == 1000
    assert other["deployments"] == {} and other["usage"]["requests"] == 0
    assert old["deployments"] == {} or all("usage" not in d for d in old["deployments"].values())
    assert old["from"] == "2020-01-01T00:00:00Z" and old["to"] == "2020-02-01T00:00:00Z"
    assert (status, forbidden["error"]["message"]) == (403, "Forbidden deployment: closed")
    assert (bad, unknown) == (400, 404)
    assert twice == (
        400,
        {"error": {"message": "'from' is given 2 times: give it once", "code": "400"}},
    )
    assert (
        both_scopes[0] == 400 and "'scope' is given 2 times" in both_scopes[1]["error"]["message"]
    )
    assert late[0] == 400
    assert late[1]["error"]["message"].startswith("'to' must be from 1970-01-01 to 9998-12-31")


async def test_each_request_lands_in_the_hour_it_ended_in(tmp_path: Path) -> None:
    """The hour is worked out once an hour: requests at its last second, at the next
    hour's first and with the clock set back each land in their own hour."""
    now = [1_800_000_000.0]
    ledger = Ledger(SqliteLedgerStore(tmp_path / "usage.sqlite"), clock=lambda: now[0])
    row = ("p", "fp", "", "chat", "chat/completions")
    start = int(now[0]) // HOUR * HOUR
    for at in (start + 5, start + HOUR - 0.5, start + HOUR, start + 5.5, start + 3 * HOUR):
        now[0] = at
        ledger.add(row, Outcome(status=200, usage=Usage(1, 2, 3)))
    rows = await ledger.rows(start - HOUR, start + 4 * HOUR, ("hour",))
    assert {r["hour"]: r["requests"] for r in rows} == {
        start: 3,
        start + HOUR: 1,
        start + 3 * HOUR: 1,
    }
    await ledger.close()


async def test_retention_drops_old_hours(tmp_path: Path, redis_server: RedisServer) -> None:
    now = [1_800_000_000.0]
    store = SqliteLedgerStore(tmp_path / "usage.sqlite")
    ledger = Ledger(store, retention_days=10, clock=lambda: now[0])
    row = ("p", "fp", "", "chat", "chat/completions")
    ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
    assert await ledger.flush()
    first = int(now[0]) // HOUR * HOUR
    now[0] += 9 * DAY
    ledger.add(row, Outcome(status=500))
    assert await ledger.flush()
    everything = (0, now[0] + HOUR)
    assert [r["requests"] for r in await ledger.rows(*everything, ("hour",))] == [1, 1]
    now[0] += 2 * DAY  # the first hour is now 11 days old
    assert await ledger.flush()  # (a write with nothing to add still drops old hours)
    (left,) = await ledger.rows(*everything, ("hour",))
    assert left["hour"] == first + 9 * DAY and left["errors"] == 1
    await ledger.close()

    client = RedisCounters(redis_server.url).client
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    redis_ledger = Ledger(
        RedisLedgerStore(client, 10, prefix), retention_days=10, clock=lambda: now[0]
    )
    redis_ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
    assert await redis_ledger.flush()
    now[0] += 11 * DAY
    redis_ledger.add(row, Outcome(status=200, usage=Usage(1, 1, 2)))
    assert await redis_ledger.flush()
    rows = await redis_ledger.rows(0, now[0] + HOUR, ("hour",))
    assert [r["total_tokens"] for r in rows] == [2]  # the old hour is out of the index
    await client.aclose()


async def requests_and_tokens(ledger: Ledger) -> tuple[int, int]:
    """The ledger's requests and tokens of all time (to an hour from now)."""
    (total,) = await ledger.rows(0, time.time() + HOUR)
    return total["requests"], total["total_tokens"]


class GatedWrites(SqliteLedgerStore):
    """A real store whose writes wait for :attr:`gate` (a write under way, held there)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()  # (a write began)

    async def write(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None:
        self.started.set()
        await self.gate.wait()
        await super().write(rows, keep_from)


async def test_a_read_while_a_batch_is_being_written_counts_it_once(tmp_path: Path) -> None:
    """A usage read that comes while the flush task writes a batch (taken out of the
    pending rows, not yet in the store) waits for the write: the batch's rows are counted,
    neither lost to the read nor counted twice."""

    store = GatedWrites(tmp_path / "usage.sqlite")
    ledger = Ledger(store)
    row = ("p", "fp", "", "chat", "chat/completions")
    ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
    flushing = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0.01)  # the batch taken, its write waiting
    assert not ledger.pending
    reading = asyncio.ensure_future(ledger.rows(0, time.time() + HOUR))
    await asyncio.sleep(0.05)
    store.gate.set()
    assert await flushing
    (total,) = await reading
    assert (total["requests"], total["total_tokens"]) == (1, 7)
    ledger.add(row, Outcome(status=200, usage=Usage(1, 1, 2)))  # one written, one pending
    assert await requests_and_tokens(ledger) == (2, 9)
    await ledger.close()


async def test_a_write_that_begins_during_a_read_is_read_again_and_reads_run_side_by_side(
    tmp_path: Path,
) -> None:
    """Reads do not wait for each other (a slow store: both read at once), and one during
    which a batch left the pending rows reads again: that batch is counted once."""

    class SlowReads(SqliteLedgerStore):
        gate = asyncio.Event()
        reading = 0
        most = 0

        async def read(
            self, start: int, end: int, project: str | None = None
        ) -> list[tuple[RowKey, list[int]]]:
            self.reading += 1
            self.most = max(self.most, self.reading)
            try:
                found = await super().read(start, end, project)  # (before the write)
                await self.gate.wait()
                return found
            finally:
                self.reading -= 1

    store = SlowReads(tmp_path / "usage.sqlite")
    ledger = Ledger(store)
    row = ("p", "fp", "", "chat", "chat/completions")
    ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
    reads = [asyncio.ensure_future(ledger.rows(0, time.time() + HOUR)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert store.most == 2  # side by side
    assert await ledger.flush()  # the batch leaves the pending rows while they read
    store.gate.set()
    for read in reads:
        (total,) = await read
        assert (total["requests"], total["total_tokens"]) == (1, 7)
    await ledger.close()


async def test_a_shutdown_during_a_write_waits_for_it(tmp_path: Path) -> None:
    """close() while the flush task writes a batch: the write ends, then the task is
    stopped (cancelled mid-write, the batch was in neither the pending rows nor the store)."""

    path = tmp_path / "usage.sqlite"
    store = GatedWrites(path)
    ledger = Ledger(store, flush_every=0.01)
    ledger.start()
    ledger.add(
        ("p", "fp", "", "chat", "chat/completions"), Outcome(status=200, usage=Usage(1, 2, 3))
    )
    await asyncio.wait_for(store.started.wait(), 5)
    closing = asyncio.ensure_future(ledger.close())
    await asyncio.sleep(0.05)
    store.gate.set()
    with capture_logs() as logs:
        await closing
    assert not [e for e in logs if e["event"] == "ledger_rows_lost"]
    again = Ledger(SqliteLedgerStore(path))
    assert await requests_and_tokens(again) == (1, 3)
    await again.close()


async def test_a_redis_write_that_fails_part_way_keeps_only_the_rows_it_did_not_write(
    redis_server: RedisServer,
) -> None:
    """More rows than one script call takes, and Redis fails the second call: the first
    call's rows are in Redis, the rest are kept by the store and sent with the next write
    (none counted twice; a read in between counts each once)."""
    client = RedisCounters(redis_server.url).client

    class SecondCallFails:
        """The real client; its second script call fails as Redis going away would."""

        def __init__(self) -> None:
            self.calls = 0

        async def evalsha(self, *args: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            return await client.evalsha(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    store = RedisLedgerStore(cast(Any, SecondCallFails()), 10, prefix)
    ledger = Ledger(store)
    rows = ROWS_PER_CALL + 100
    for i in range(rows):
        ledger.add(("p", f"fp{i}", "", "chat", "chat/completions"), Outcome(status=200))
    with capture_logs() as logs:
        assert not await ledger.flush()
    assert [(e["event"], e["error"]) for e in logs] == [("ledger_write_failed", "ConnectionError")]
    assert not ledger.pending and store.held == 100  # the second call's rows
    assert ledger.health()["pendingRows"] == 100
    assert await requests_and_tokens(ledger) == (rows, 0)
    assert await ledger.flush()  # (nothing new: the kept call is sent)
    assert store.held == 0
    assert await requests_and_tokens(ledger) == (rows, 0)
    await client.aclose()


async def test_a_redis_outage_holds_one_call_however_many_writes_fail(
    redis_server: RedisServer,
) -> None:
    """Redis down for several flushes: the store keeps the one call it could not confirm;
    the rows that came since stay merged in the ledger's pending rows (memory bounded by
    the rows, not by the flushes), and all are counted once when Redis is back."""
    client = RedisCounters(redis_server.url).client

    class Down:
        def __init__(self) -> None:
            self.down = True

        async def evalsha(self, *args: Any) -> Any:
            if self.down:
                raise redis.exceptions.ConnectionError("Connection refused")
            return await client.evalsha(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

    failing = Down()
    store = RedisLedgerStore(cast(Any, failing), 10, f"test:{uuid.uuid4().hex[:8]}:")
    ledger = Ledger(store)
    for _ in range(4):
        for i in range(3):
            ledger.add(("p", f"fp{i}", "", "chat", "chat/completions"), Outcome(status=200))
        assert not await ledger.flush()
        assert store.held <= 3 and len(ledger.pending) <= 3
    assert await requests_and_tokens(ledger) == (12, 0)
    failing.down = False
    assert await ledger.flush()
    assert store.held == 0 and not ledger.pending
    assert await requests_and_tokens(ledger) == (12, 0)
    await client.aclose()


async def test_a_value_in_redis_that_is_not_the_ledgers_costs_that_addition_only(
    redis_server: RedisServer,
) -> None:
    """Something else left a field that is not an integer in an hour's hash (a restored
    dump, another tool): the write adds every other row once and says what it could not
    add (a script is not undone by an error half-way: sent again, it would add the rows
    before the error twice); a read skips the field."""
    client = RedisCounters(redis_server.url).client
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    ledger = Ledger(RedisLedgerStore(client, 10, prefix))
    hour = int(time.time()) // HOUR * HOUR
    good = ("p", "fp-good", "", "chat", "chat/completions")
    bad = ("p", "fp-bad", "", "chat", "chat/completions")
    await client.hset(f"{prefix}h:{hour}", "\x1f".join((*bad, "0")), "oops")
    await client.hset(f"{prefix}h:{hour}", "not a ledger field", "7")
    with capture_logs() as logs:
        for _ in range(3):
            ledger.add(good, Outcome(status=200))
            ledger.add(bad, Outcome(status=200))
            assert await ledger.flush()
    refused = [e for e in logs if e["event"] == "ledger_writes_refused"]
    assert [e["writes"] for e in refused] == [1, 1, 1]
    assert await client.hget(f"{prefix}h:{hour}", "\x1f".join((*good, "0"))) == "3"
    (row,) = await ledger.rows(0, time.time() + HOUR, ("key",))
    assert (row["key"], row["requests"]) == ("fp-good", 3)
    await client.aclose()


async def test_a_write_redis_refuses_for_memory_goes_again(tmp_path: Path) -> None:
    """Redis out of memory for a moment (``maxmemory``, noeviction): the write is refused
    whole, kept, and applied once memory is back (none of its rows lost to a script whose
    first writes were refused and its later ones allowed)."""
    server = RedisServer(tmp_path / "redis")  # (its own: its maxmemory is changed)
    server.start()
    client = RedisCounters(server.url).client
    try:
        ledger = Ledger(RedisLedgerStore(client))
        row = ("p", "fp", "", "chat", "chat/completions")
        ledger.add(row, Outcome(status=200))
        assert await ledger.flush()  # (the hour's hash and the index exist)
        await client.config_set("maxmemory", "1")
        try:
            ledger.add(row, Outcome(status=200))
            assert not await ledger.flush()
        finally:
            await client.config_set("maxmemory", "0")
        ledger.add(row, Outcome(status=200))
        assert await ledger.flush()
        assert await requests_and_tokens(ledger) == (3, 0)
    finally:
        await client.aclose()
        server.stop()


async def test_what_is_not_the_ledgers_in_redis_is_skipped_by_a_read(
    redis_server: RedisServer,
) -> None:
    """An hour in the index that is no hour, an hour's key of another type: a read skips
    them and counts the rest (not a 503 until someone cleans Redis)."""
    client = RedisCounters(redis_server.url).client
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    ledger = Ledger(RedisLedgerStore(client, 10, prefix))
    hour = int(time.time()) // HOUR * HOUR
    ledger.add(("p", "fp", "", "chat", "chat/completions"), Outcome(status=200))
    assert await ledger.flush()
    await client.zadd(prefix + "hours", {"not-an-hour": hour, str(hour - HOUR): hour - HOUR})
    await client.set(f"{prefix}h:{hour - HOUR}", "a string, not a hash")
    assert await requests_and_tokens(ledger) == (1, 0)
    await client.aclose()


async def test_a_redis_write_that_timed_out_after_redis_applied_it_is_counted_once(
    tmp_path: Path,
) -> None:
    """Redis stalls (SIGSTOP) while a write is sent: the client gives up after its timeout,
    and Redis applies the call when it resumes.  Sent again with the next write, the call
    is not applied twice; a read before that counts it once too."""
    server = RedisServer(tmp_path / "redis")  # (its own: it is stopped)
    server.start()
    client = RedisCounters(server.url).client
    try:
        store = RedisLedgerStore(client)
        ledger = Ledger(store)
        row = ("p", "fp", "", "chat", "chat/completions")
        await ledger.flush()  # (connected, the script loaded)
        ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
        server.pause()
        try:
            assert not await ledger.flush()  # no answer within the client's timeout
        finally:
            server.resume()
        hour = int(time.time()) // HOUR * HOUR
        field = "\x1f".join((*row, "0"))
        for _ in range(100):  # Redis applies what it was sent
            if server.command("HGET", f"dp:usage:h:{hour}", field) == b"1":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("Redis never applied the call")
        assert store.held == 1
        assert await requests_and_tokens(ledger) == (1, 7)
        ledger.add(row, Outcome(status=200, usage=Usage(1, 1, 2)))
        assert await ledger.flush()  # the kept call again (skipped), then the new one
        assert store.held == 0
        assert await requests_and_tokens(ledger) == (2, 9)
        assert server.command("HGET", f"dp:usage:h:{hour}", field) == b"2"
    finally:
        await client.aclose()
        server.stop()


async def test_a_failed_write_keeps_its_rows() -> None:
    class Broken:
        held = 0

        def __init__(self) -> None:
            self.fail = True
            self.written: list[dict[RowKey, list[int]]] = []

        async def write(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None:
            if self.fail:
                raise OSError("disk full")
            self.written.append({k: list(v) for k, v in rows.items()})

        async def read(
            self, start: int, end: int, project: str | None = None
        ) -> list[tuple[RowKey, list[int]]]:
            return []

        async def close(self) -> None:
            pass

    store = Broken()
    ledger = Ledger(store)
    row = ("p", "fp", "", "chat", "chat/completions")
    with capture_logs() as logs:
        ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
        assert not await ledger.flush()
        ledger.add(row, Outcome(status=200, usage=Usage(3, 4, 7)))
        assert not await ledger.flush()  # (an outage of several flushes: one warning)
        assert ledger.failures == 2
        store.fail = False
        assert await ledger.flush()
    assert [(e["event"], e.get("failed_writes")) for e in logs] == [
        ("ledger_write_failed", None),
        ("ledger_write_recovered", 2),
    ]
    (written,) = store.written
    assert list(written.values()) == [[2, 0, 6, 8, 14, 0]]


async def test_a_usage_read_while_redis_is_down_answers_503(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The ledger in Redis and Redis gone: the usage endpoints say the ledger is
    unavailable (503, Retry-After), never an internal error; back, they answer again."""
    server = RedisServer(tmp_path / "redis")  # (its own: it is stopped)
    server.start()
    try:
        proxy = await make_proxy(
            config(backend),
            storage=counter_storage(server.url),
            settings=settings_for(tmp_path, storage=server.url),
        )
        async with aiohttp.ClientSession() as s:
            await traffic(s, proxy, [KEY])
            server.pause()
            try:
                async with s.get(proxy.url("/v1/user/usage"), headers={"Api-Key": KEY}) as r:
                    status, retry, body = r.status, r.headers.get("Retry-After"), await r.json()
            finally:
                server.resume()
            async with s.get(proxy.url("/v1/user/usage"), headers={"Api-Key": KEY}) as r:
                back = r.status
        assert (status, body["error"]["message"]) == (503, "The usage ledger is unavailable")
        assert retry is not None and int(retry) > 0
        assert back == 200
    finally:
        server.stop()
