"""Shared fixtures: a real OpenAI-style upstream and the real proxy app in front of it."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from dialproxy import logs
from dialproxy.config.store import ConfigStore
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Limiter, Scope, WindowState
from dialproxy.counting.storage import Storage
from dialproxy.demo_backend import create_backend_app
from dialproxy.settings import Settings
from dialproxy.text import fingerprint
from dialproxy.web.app import create_app
from dialproxy.web.appkeys import BACKGROUND
from tests.backend_control import BackendControl

AiohttpServer = Callable[..., Awaitable[TestServer]]


# Every secret the tests hand out: the session's logs are searched for each of them.
SECRETS: list[str] = []


def new_key(prefix: str = "dp-") -> str:
    """A key secret of 256 random bits (registered: no log line may ever contain it)."""
    secret = prefix + secrets.token_hex(32)
    SECRETS.append(secret)
    return secret


class _LogSink:
    """Collects every log line of the session, rendered as in production (JSON)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def msg(self, message: str) -> None:
        self.lines.append(message)

    log = info = warning = error = critical = debug = exception = msg


def assert_json_lines_without_secrets(text: str) -> None:
    """Every line of ``text`` is a JSON object and no test secret is in any of them."""
    for line in text.splitlines():
        assert isinstance(json.loads(line), dict), line[:200]
    leaked = [fingerprint(s) for s in SECRETS if s in text]
    assert not leaked, f"secrets in the logs (by fingerprint): {leaked}"


@pytest.fixture(scope="session", autouse=True)
def session_logs() -> Iterator[_LogSink]:
    """All logs of the test suite go here, the standard library's (aiohttp's, asyncio's)
    rendered as the served process renders them: at the end every line must be JSON and
    no secret may appear in them."""
    sink = _LogSink()
    handler = logs.stdlib_handler(sink.msg)
    logging.getLogger().addHandler(handler)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    try:
        yield sink
    finally:
        logging.getLogger().removeHandler(handler)
    assert_json_lines_without_secrets("\n".join(sink.lines))


class Clock:
    """A clock the test moves (the app's, through its clock hooks)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


async def admit_request(limiter: Limiter, scope: Scope) -> WindowState | None:
    """Admit one request charged to one scope: its tightest request window."""
    return (await limiter.admit([scope]))[0]


async def check_tokens(limiter: Limiter, scope: Scope) -> WindowState | None:
    """Admit one request to a scope of token (and cost) windows: its tightest token window."""
    return (await limiter.admit([scope]))[1]


class Backend:
    def __init__(self, server: TestServer, control: BackendControl) -> None:
        self.server = server
        self.control = control

    def url(self, path: str = "/v1/chat/completions") -> str:
        return str(self.server.make_url(path))


class Proxy:
    def __init__(self, server: TestServer, store: ConfigStore, path: Path) -> None:
        self.server = server
        self.store = store
        self.path = path

    def url(self, path: str = "") -> str:
        return str(self.server.make_url(path))

    async def settle(self) -> None:
        """Usage is recorded in a task of its own after the response: let it finish (and
        the tasks it starts)."""
        for _ in range(10):
            if not self.app[BACKGROUND]:
                break
            await asyncio.gather(*self.app[BACKGROUND])

    @property
    def app(self) -> web.Application:
        app = self.server.app
        assert app is not None
        return app


BackendFactory = Callable[[], Awaitable[Backend]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's requests, closed after it."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def make_backend(aiohttp_server: AiohttpServer) -> BackendFactory:
    async def factory() -> Backend:
        control = BackendControl()
        server = await aiohttp_server(create_backend_app(control))
        return Backend(server, control)

    return factory


@pytest.fixture
async def backend(make_backend: BackendFactory) -> Backend:
    return await make_backend()


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def make_proxy(aiohttp_server: AiohttpServer, tmp_path: Path) -> ProxyFactory:
    async def factory(
        config: dict[str, Any],
        *,
        storage: Storage | None = None,
        settings: Settings | None = None,
        upstream_clock: Callable[[], float] = time.monotonic,
        env: dict[str, str] | None = None,
    ) -> Proxy:
        path = tmp_path / "aidial.config.json"
        path.write_text(json.dumps(config))
        store = ConfigStore([path], env=env or {})
        store.load()
        app = create_app(
            store,
            settings=settings or Settings(config_paths=(str(path),)),
            storage=storage if storage is not None else LocalCounters(),
            upstream_clock=upstream_clock,
        )
        server = await aiohttp_server(app)  # TestServer cancels handlers on disconnect
        return Proxy(server, store, path)

    return factory


async def used_tokens(proxy: Proxy, key: str, deployment: str) -> int:
    """The tokens ``key``'s project used of ``deployment`` in the minute window (once the
    usage records are done), as ``/v1/deployments/{id}/limits`` says."""
    await proxy.settle()
    async with aiohttp.ClientSession() as s:
        r = await s.get(proxy.url(f"/v1/deployments/{deployment}/limits"), headers={"Api-Key": key})
        used: int = (await r.json())["minuteTokenStats"]["used"]
        return used


def chat_model(backend: Backend, **extra: Any) -> dict[str, Any]:
    """A model calling the backend directly (upstreams, no endpoint)."""
    return {
        "type": "chat",
        "upstreams": [{"endpoint": backend.url(), "key": "upstream-secret-1"}],
    } | extra


# A real redis-server for the Redis tests (tests/test_limiter.py, tests/test_redis.py).
from tests.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run (tests that stop it start their own)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def utc_day_end() -> str:
    """When today's day window resets on the default schedule (UTC midnight), as the limits
    answers say it (``resetsAt``)."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).isoformat()


async def clear_of_minute_boundary(margin: float = 5.0) -> None:
    """Waits out the last ``margin`` seconds of a clock minute: a sliding minute window
    whose requests straddle two buckets weighs the first bucket's down (limits' arithmetic:
    ``floor(previous x share) + current``), so a test that expects the Nth request refused
    must not start just before a minute turns."""
    left = 60.0 - time.time() % 60.0
    if left < margin:
        await asyncio.sleep(left + 0.05)
