"""``dialproxy serve --workers N``: N processes on one port (SO_REUSEPORT) sharing Redis
counters, under one parent that forwards signals and stops them all if one dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dialproxy.settings import Settings
from dialproxy.text import fingerprint
from tests.conftest import assert_json_lines_without_secrets, new_key
from tests.redis_server import ROOT, BackendProcess, RedisServer, free_port

KEY = new_key()
CHAT = {"messages": [{"role": "user", "content": "hello workers"}]}


class Served:
    """``python -m dialproxy serve ...`` on a free port, stderr to a file."""

    def __init__(self, directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = directory / f"serve-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dialproxy", "serve", "--port", str(self.port), *args],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("DIALPROXY_")},
                    **(env or {}),
                },
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines()]

    def lines_so_far(self) -> list[dict[str, Any]]:
        """:meth:`lines` while the processes write: a last line may be half written."""
        text = self.log()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    async def pids(self, want: int, timeout: float = 30.0) -> set[int]:
        """The pids answering ``/health`` on new connections, once ``want`` of them have."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as s:
            while len(seen) < want and time.monotonic() < deadline:
                assert self.proc.poll() is None, f"dialproxy exited:\n{self.log()}"
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            seen.add((await r.json())["pid"])
                            continue
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        assert len(seen) >= want, f"answered by {seen} only:\n{self.log()}"
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def two_workers(directory: Path, config: Path, redis: RedisServer, *args: str) -> Served:
    """``serve --workers 2`` on ``redis``'s counters."""
    return Served(
        directory, "--config", str(config), "--workers", "2", "--storage", redis.url, *args
    )


def write_config(directory: Path, backend: BackendProcess | None = None) -> Path:
    endpoint = backend.url() if backend else "http://127.0.0.1:9/"
    config = {
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": endpoint, "key": "k"}]}},
        "roles": {"user": {"limits": {"chat": {"requestHour": "10"}}}},
        "keys": {KEY: {"project": "workers", "role": "user"}},
    }
    path = directory / "aidial.config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for one in started:
        one.stop()


async def test_two_workers_share_the_port_and_the_limit(
    tmp_path: Path, redis_server: RedisServer, served: list[Served]
) -> None:
    backend = BackendProcess()
    try:
        backend.wait_ready()
        redis_server.flush()
        config = write_config(tmp_path, backend)
        proxy = two_workers(tmp_path, config, redis_server, "--no-watch")
        served.append(proxy)
        workers = await proxy.pids(2)
        assert all(parent_of(pid) == proxy.proc.pid for pid in workers)

        connector = aiohttp.TCPConnector(force_close=True, limit=100)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

            async def chat() -> int:
                url = proxy.url + "/openai/deployments/chat/chat/completions"
                async with s.post(url, json=CHAT, headers={"Api-Key": KEY}) as r:
                    await r.read()
                    return r.status

            statuses = Counter(await asyncio.gather(*(chat() for _ in range(30))))
        assert statuses == {200: 10, 429: 20}, statuses

        proxy.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.proc.wait, 30) == 0, proxy.log()
    finally:
        backend.stop()
    lines = proxy.lines()
    assert_json_lines_without_secrets(proxy.log())
    by_pid = Counter(line["pid"] for line in lines if line["event"] == "request")
    assert set(by_pid) == workers and sum(by_pid.values()) == 30, by_pid  # both answered
    assert {line["pid"] for line in lines if line["event"] == "serving"} == workers
    started = next(line for line in lines if line["event"] == "workers_started")
    assert started["pid"] == proxy.proc.pid and set(started["pids"]) == workers


@pytest.mark.parametrize("how", ["flag", "env"])
def test_workers_with_memory_counters_are_refused(tmp_path: Path, how: str) -> None:
    config = write_config(tmp_path)
    args = ["--config", str(config)]
    if how == "flag":
        args += ["--workers", "2"]
    env = {"DIALPROXY_WORKERS": "2"} if how == "env" else {}
    proxy = Served(tmp_path, *args, env=env)
    try:
        assert proxy.proc.wait(30) == 2
    finally:
        proxy.stop()
    (line,) = proxy.log().splitlines()
    assert line.startswith("dialproxy: 2 workers need shared counters")
    assert "memory://" in line and "2 times looser" in line and "--storage redis://" in line


async def test_sighup_reloads_each_worker_and_sigterm_stops_them_all(
    tmp_path: Path, redis_server: RedisServer, served: list[Served]
) -> None:
    grace = 3.0
    config = write_config(tmp_path)
    proxy = two_workers(tmp_path, config, redis_server, "--shutdown-timeout", str(grace))
    served.append(proxy)
    workers = await proxy.pids(2)
    proxy.proc.send_signal(signal.SIGHUP)  # forwarded: each worker reloads itself
    deadline = time.monotonic() + 20
    while {e["pid"] for e in proxy.lines_so_far() if e.get("trigger") == "sighup"} != workers:
        assert time.monotonic() < deadline, f"not reloaded by both workers:\n{proxy.log()}"
        await asyncio.sleep(0.1)
    assert proxy.proc.poll() is None
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proxy.proc.wait, grace + 20) == 0, proxy.log()
    assert all(gone(pid) for pid in workers)
    lines = proxy.lines()
    assert sorted(e["worker"] for e in lines if e["event"] == "worker_exited") == sorted(workers)
    assert Counter(e["pid"] for e in lines if e["event"] == "stopping") == dict.fromkeys(workers, 1)


async def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_1(
    tmp_path: Path, redis_server: RedisServer, served: list[Served]
) -> None:
    config = write_config(tmp_path)
    proxy = two_workers(tmp_path, config, redis_server, "--no-watch")
    served.append(proxy)
    victim, survivor = sorted(await proxy.pids(2))
    os.kill(victim, signal.SIGKILL)
    assert await asyncio.to_thread(proxy.proc.wait, 30) == 1, proxy.log()
    assert gone(survivor)
    lines = proxy.lines()
    (died,) = [e for e in lines if e["event"] == "worker_died"]
    assert died["worker"] == victim and died["code"] == -signal.SIGKILL
    assert died["level"] == "error" and died["pid"] == proxy.proc.pid
    assert [e["pid"] for e in lines if e["event"] == "stopping"] == [survivor]


async def test_one_worker_is_the_process_itself(tmp_path: Path, served: list[Served]) -> None:
    """The default: no parent, no fork; log lines as before (no pid)."""
    proxy = Served(tmp_path, "--config", str(write_config(tmp_path)), "--no-watch")
    served.append(proxy)
    assert await proxy.pids(1) == {proxy.proc.pid}
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proxy.proc.wait, 30) == 0
    assert all("pid" not in line for line in proxy.lines())


def test_the_workers_setting() -> None:
    assert Settings().workers == 1
    assert Settings.from_env({"DIALPROXY_WORKERS": "4"}).workers == 4
    with pytest.raises(ValueError, match="DIALPROXY_WORKERS must be a number of processes"):
        Settings.from_env({"DIALPROXY_WORKERS": "many"})
    for bad in (0, -1, 257):
        with pytest.raises(ValueError, match="workers must be 1-256"):
            Settings(workers=bad, storage="redis://127.0.0.1:6379/0").check()
    Settings(workers=4, storage="redis://127.0.0.1:6379/0").check()
    with pytest.raises(ValueError, match="4 workers need shared counters"):
        Settings(workers=4).check()


@pytest.mark.parametrize(
    "holder", ["one process, a plain listener", "workers, a plain listener", "workers, workers"]
)
def test_a_port_that_is_taken_is_said_and_exits_2(
    tmp_path: Path, redis_server: RedisServer, holder: str
) -> None:
    """The port is held by another program, or by another set of workers (which listen with
    SO_REUSEPORT, as these would): the server says it cannot listen there and exits 2,
    with no traceback and, for workers, none started (they would share the port)."""
    config = write_config(tmp_path)
    with socket.socket() as held:
        if holder.endswith("workers"):
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        args = ["--config", str(config), "--port", str(port), "--storage", redis_server.url]
        if holder.startswith("workers"):
            args += ["--workers", "2"]
        proxy = Served(tmp_path, *args)
        try:
            code = proxy.proc.wait(30)
        finally:
            proxy.stop()
    log = proxy.log()
    assert code == 2, log
    assert f"dialproxy: cannot listen on 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log and "uncaught" not in log and "workers_started" not in log


async def test_stderr_written_into_the_configs_folder_is_not_a_change_logged_for_ever(
    tmp_path: Path, served: list[Served]
) -> None:
    """`cd conf && dialproxy serve 2>serve.log`: the watcher sees the log file change, and
    if that were logged it would change again, for ever.  A quiet proxy writes a few lines
    and then nothing."""
    config = write_config(tmp_path)  # (Served writes its log into tmp_path too)
    proxy = Served(tmp_path, "--config", str(config))
    served.append(proxy)
    await proxy.pids(1)
    await asyncio.sleep(1.0)
    before = len(proxy.lines_so_far())
    await asyncio.sleep(2.0)
    lines = proxy.lines_so_far()
    assert len(lines) == before, lines[before:]
    assert not [line for line in lines if "change" in line["event"]], lines


async def test_a_key_revoked_through_one_worker_is_revoked_on_all_without_the_watcher(
    tmp_path: Path, redis_server: RedisServer, served: list[Served]
) -> None:
    """`--workers 2 --no-watch`: the admin API's write lands on one worker, which reloads;
    the others are told through the supervisor (SIGHUP), so the revoked key is refused
    wherever its next request lands."""
    admin = new_key()
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    doc["roles"]["admin"] = {}
    doc["keys"][admin] = {"project": "ops", "role": "admin"}
    config.write_text(json.dumps(doc, indent=2))
    proxy = two_workers(tmp_path, config, redis_server, "--no-watch")
    served.append(proxy)
    await proxy.pids(2)

    async def sample(key: str) -> tuple[int, int]:
        """Which worker a new connection reaches, and what it answers ``key``."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(proxy.url + "/health") as r:
                pid = (await r.json())["pid"]
            async with s.get(proxy.url + "/v1/user/info", headers={"Api-Key": key}) as r:
                return pid, r.status  # (the same connection: the same worker)

    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/admin/keys", headers={"Api-Key": admin}) as r:
            tag = r.headers["ETag"]
        async with s.delete(
            proxy.url + f"/v1/admin/keys/{fingerprint(KEY)}",
            headers={"Api-Key": admin, "If-Match": tag},
        ) as r:
            assert r.status == 200, await r.text()
    last: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while not (len(last) == 2 and set(last.values()) == {401}) and time.monotonic() < deadline:
        pid, status = await sample(KEY)
        last[pid] = status
    assert len(last) == 2 and set(last.values()) == {401}, last
