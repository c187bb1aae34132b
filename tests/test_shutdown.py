"""SIGTERM on a served process: the grace for requests in flight, then the streams still open
end with an SSE error event, and the process exits 0 (issue 11, finding 8)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dialproxy.settings import Settings
from dialproxy.web.drain import Drain
from tests.test_serve import free_port, spawn, wait_healthy

GRACE = 3.0
KEY = "dp-" + "cd34" * 16
CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "x"}}]}
EVENT = b"data: " + json.dumps(CHUNK).encode() + b"\n\n"


class Upstream:
    """A model backend in the test's loop: ``/forever`` streams an event every 0.1 s until
    the connection goes; ``/slow`` answers after 1 s (within the grace); ``/hang`` takes a
    minute (beyond it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.slow_started = asyncio.Event()
        self.hang_started = asyncio.Event()
        app = web.Application()
        app.router.add_post("/forever", self.forever)
        app.router.add_post("/slow", self.slow)
        app.router.add_post("/hang", self.hang)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def forever(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(EVENT)
                await asyncio.sleep(0.1)
        except ConnectionResetError:  # the proxy dropped the upstream connection
            return response

    async def slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        await asyncio.sleep(1.0)
        body = {
            "id": "s",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return web.json_response(body)

    async def hang(self, request: web.Request) -> web.Response:
        self.hang_started.set()
        await asyncio.sleep(60)
        return web.json_response({})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    backend = Upstream()
    await backend.runner.setup()
    await web.TCPSite(backend.runner, "127.0.0.1", backend.port).start()
    yield backend
    await backend.runner.cleanup()


async def refused(port: int, within: float) -> bool:
    """Whether a new connection to ``port`` is refused, at the latest ``within`` seconds on."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # (in the backlog as the socket closed: try again)
            pass
        else:
            writer.close()
        await asyncio.sleep(0.05)
    return False


async def test_sigterm_gives_the_grace_then_ends_open_streams_with_an_error_event(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = {
        "models": {
            name: {"type": "chat", "upstreams": [{"endpoint": upstream.url("/" + name)}]}
            for name in ("forever", "slow", "hang")
        },
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    (tmp_path / "aidial.config.json").write_text(json.dumps(config))
    port = free_port()
    proc = spawn(
        "serve",
        "--config",
        str(tmp_path / "aidial.config.json"),
        "--port",
        str(port),
        "--no-watch",
        "--shutdown-timeout",
        str(GRACE),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, proc)
        async with aiohttp.ClientSession(headers={"Api-Key": KEY}) as s:
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            stream = await s.post(
                base + "/openai/deployments/forever/chat/completions",
                json=chat | {"stream": True},
            )
            assert stream.status == 200
            assert await stream.content.readuntil(b"\n\n") == EVENT
            slow = asyncio.create_task(
                s.post(base + "/openai/deployments/slow/chat/completions", json=chat)
            )
            hang = asyncio.create_task(
                s.post(base + "/openai/deployments/hang/chat/completions", json=chat)
            )
            await asyncio.wait_for(upstream.slow_started.wait(), 10)
            await asyncio.wait_for(upstream.hang_started.wait(), 10)

            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            exited = asyncio.create_task(asyncio.to_thread(proc.wait, 30))

            assert await refused(port, within=GRACE / 2), "a new connection was accepted"
            answer = await slow  # it finishes within the grace: answered in full
            assert answer.status == 200
            assert (await answer.json())["choices"][0]["message"]["content"] == "done"

            rest = await asyncio.wait_for(stream.read(), 30)
            ended = time.monotonic() - signalled
            events = rest.split(b"\n\n")
            assert events[-1] == b"", "the stream did not end with a complete event"
            last = events[-2]
            assert last.startswith(b"data: "), last
            error = json.loads(last.removeprefix(b"data: "))["error"]
            assert error["code"] == "503" and "shutting down" in error["message"]
            assert all(e + b"\n\n" == EVENT for e in events[:-2])  # the stream ran until then
            assert ended >= GRACE, f"the stream was ended {ended:.2f} s after SIGTERM"

            with pytest.raises(aiohttp.ServerDisconnectedError):  # cut after the grace
                await hang
            code = await exited
            took = time.monotonic() - signalled
        _, raw = proc.communicate()
        err = raw.decode()
        assert code == 0, err
        # The grace, then a little: never the grace twice (what aiohttp alone did).
        assert GRACE <= took < GRACE + 0.9 * GRACE, f"exited {took:.2f} s after SIGTERM"
        lines = [json.loads(line) for line in err.splitlines()]  # every line a JSON one
        assert [e["streams_ended"] for e in lines if e["event"] == "grace_over"] == [1]
        requests = {e["deployment"]: e for e in lines if e.get("event") == "request"}
        assert requests["slow"]["status"] == 200 and requests["slow"]["error"] is None
        assert requests["hang"]["status"] == 0  # cancelled: no answer was sent
        assert requests["hang"]["error"] == "the server shut down before the answer"
        assert requests["hang"]["total_tokens"] is None  # the shutdown's cancel: not charged
        assert requests["forever"]["status"] == 200
        assert requests["forever"]["error"] == "stream ended: the server is shutting down"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_with_nothing_in_flight_sigterm_exits_at_once(tmp_path: Path) -> None:
    config = {
        "models": {"m": {"type": "chat", "upstreams": [{"endpoint": "http://127.0.0.1:9/"}]}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    port = free_port()
    proc = spawn("serve", "--config", str(tmp_path / "c.json"), "--port", str(port), "--no-watch")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 30)
        proc.communicate()
        assert code == 0
        assert time.monotonic() - signalled < 5  # not the 30 s grace: nothing was in flight
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_the_grace_is_a_setting() -> None:
    assert Settings().shutdown_timeout == 30.0
    assert Settings.from_env({"DIALPROXY_SHUTDOWN_TIMEOUT": "2.5"}).shutdown_timeout == 2.5
    with pytest.raises(ValueError, match="DIALPROXY_SHUTDOWN_TIMEOUT must be a number"):
        Settings.from_env({"DIALPROXY_SHUTDOWN_TIMEOUT": "soon"})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shutdown timeout must be"):
            Settings(shutdown_timeout=bad).check()


class _Response:
    """What :meth:`Drain.relay` writes to, recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.ended = False

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def write_eof(self) -> None:
        self.ended = True


async def test_the_drain_ends_only_its_own_cancellations() -> None:
    drain = Drain()
    forever = asyncio.Event()

    async def relay(response: _Response) -> bool:
        return await drain.relay(response, forever.wait(), lambda: b"data: bye\n\n")  # type: ignore[arg-type]

    ended, gone = _Response(), _Response()
    by_drain = asyncio.create_task(relay(ended))
    by_client = asyncio.create_task(relay(gone))
    await asyncio.sleep(0)
    assert len(drain) == 2
    by_client.cancel()  # a client that went away: still a cancellation
    with pytest.raises(asyncio.CancelledError):
        await by_client
    assert drain.end_streams() == 1
    assert await by_drain is True
    assert (ended.written, ended.ended) == ([b"data: bye\n\n"], True)
    assert gone.written == [] and len(drain) == 0
    assert drain.end_streams() == 0
