"""Hostile clients (issue 11): bad header bytes, encoded bodies and bombs, slow and lying
clients, overlong values.  Bytes on the wire go through raw sockets to a running proxy."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dialproxy import logs
from dialproxy.settings import Settings
from tests.conftest import (
    Backend,
    Proxy,
    ProxyFactory,
    assert_json_lines_without_secrets,
    chat_model,
    new_key,
)
from tests.test_serve import free_port, spawn, stop, wait_healthy

KEY = new_key()
CHAT = "/openai/deployments/chat/chat/completions"
BODY = {"messages": [{"role": "user", "content": "a b"}]}
BOUND = 0.5  # the header and body timeouts of these tests, in seconds
WITHIN = 10.0  # what a test waits at most for what should come within BOUND (a busy box)


def config(backend: Backend | None = None) -> dict[str, Any]:
    endpoint = backend.url() if backend else "http://127.0.0.1:9/v1/chat/completions"
    model = (
        chat_model(backend) if backend else {"type": "chat", "upstreams": [{"endpoint": endpoint}]}
    )
    return {"models": {"chat": model}, "keys": {KEY: {"project": "p", "role": "default"}}}


async def start(make_proxy: ProxyFactory, tmp_path: Path, backend: Backend | None = None) -> Proxy:
    settings = Settings(
        config_paths=(str(tmp_path / "aidial.config.json"),),
        header_timeout=BOUND,
        body_timeout=BOUND,
    )
    return await make_proxy(config(backend), settings=settings)


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = proxy.server
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        int(v)
        for k, _, v in (h.partition(": ") for h in lines[1:])
        if k.lower() == "content-length"
    )
    return status, await asyncio.wait_for(reader.readexactly(length), WITHIN)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the proxy closes the connection within WITHIN (what it sends first is read)."""
    try:
        async with asyncio.timeout(WITHIN):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def request_head(
    path: str, body_length: int | None = None, key: str | None = KEY, **extra: str
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"Api-Key: {key}")
    if body_length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {body_length}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Bad header bytes


class _Lines:
    """The standard library's log records, rendered as the served process renders them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.handler = logs.stdlib_handler(self.lines.append)

    def __enter__(self) -> _Lines:
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger().removeHandler(self.handler)


@pytest.mark.parametrize("bad", [b"\r", b"\n", b"\x00"], ids=["CR", "LF", "NUL"])
async def test_bad_header_bytes_get_a_400_and_no_log_line_quotes_the_key(
    make_proxy: ProxyFactory, tmp_path: Path, bad: bytes
) -> None:
    proxy = await start(make_proxy, tmp_path)
    with _Lines() as captured:
        reader, writer = await connect(proxy)
        head = (
            b"GET /health HTTP/1.1\r\nHost: x\r\nApi-Key: " + KEY.encode() + bad + b"tail\r\n\r\n"
        )
        writer.write(head)
        status_line = await asyncio.wait_for(reader.readline(), WITHIN)
        writer.close()
        await asyncio.sleep(0.05)  # (the error is logged as the answer goes)
    assert status_line.split()[1] == b"400"
    assert captured.lines, "aiohttp logs the bad request"
    assert_json_lines_without_secrets("\n".join(captured.lines))
    assert all(
        json.loads(line)["event"].startswith("bad HTTP request from client: ")
        for line in captured.lines
    )


# Slow and lying clients


async def test_headers_never_completed_close_the_connection(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(make_proxy, tmp_path)
    silent_reader, silent = await connect(proxy)  # sends nothing at all
    reader, writer = await connect(proxy)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:  # a header line every 0.1 s, never the blank line
        for i in range(200):
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await asyncio.sleep(0.1)

    task = asyncio.create_task(trickle())
    try:
        assert await closed(reader)
        assert await closed(silent_reader)
    finally:
        task.cancel()
        writer.close()
        silent.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_header_timeout(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(make_proxy, tmp_path)
    reader, writer = await connect(proxy)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _ = await read_answer(reader)
    assert status == 200
    writer.write(b"GET /health HTTP/1.1\r\n")  # the next request's headers never complete
    assert await closed(reader)
    writer.close()


async def test_a_lying_content_length_gets_a_408_and_the_connection_closed(
    make_proxy: ProxyFactory, tmp_path: Path, backend: Backend
) -> None:
    proxy = await start(make_proxy, tmp_path, backend)
    reader, writer = await connect(proxy)
    writer.write(request_head(CHAT, 1000) + b'{"messages": [')  # 1000 promised, 14 sent
    status, body = await read_answer(reader)
    assert status == 408
    assert json.loads(body) == {
        "error": {"message": "The request body stopped arriving", "code": "408"}
    }
    assert await closed(reader)
    writer.close()
    assert backend.control.requests == []


async def test_a_lying_content_length_without_a_key_gets_its_401_and_the_connection_closed(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await start(make_proxy, tmp_path)
    reader, writer = await connect(proxy)
    writer.write(request_head(CHAT, 1000, key=None) + b'{"messages": [')
    status, _ = await read_answer(reader)
    assert status == 401
    assert await closed(reader)  # (the unread body is waited for no longer than the bound)
    writer.close()


async def test_expect_100_continue_is_said_only_to_a_good_key_and_a_size_within_the_cap(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """``Expect: 100-continue`` (curl's, for a big body): a bad key or a declared size over
    ``--max-body`` gets its 401 or 413 at once, with no ``100 Continue`` first (aiohttp said
    it to every client, which then sent the whole body to have it refused); a good key gets
    the 100, then its answer."""
    proxy = await start(make_proxy, tmp_path, backend)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    for key, length, status in ((None, len(body), 401), (KEY, 1 << 40, 413)):
        reader, writer = await connect(proxy)
        writer.write(request_head(CHAT, length, key=key, Expect="100-continue"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), WITHIN)
        assert head.split()[1] == str(status).encode(), head
        writer.close()
    reader, writer = await connect(proxy)
    writer.write(request_head(CHAT, len(body), Expect="100-continue"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    status, _ = await read_answer(reader)
    assert status == 200
    writer.close()


async def test_a_slow_body_that_stalls_gets_a_408_but_a_slow_one_that_flows_does_not(
    make_proxy: ProxyFactory, tmp_path: Path, backend: Backend
) -> None:
    proxy = await start(make_proxy, tmp_path, backend)
    data = json.dumps(BODY).encode()
    # Flowing: a byte every BOUND / 5 seconds, the whole body taking several times BOUND.
    reader, writer = await connect(proxy)
    writer.write(request_head(CHAT, len(data)))
    for i in range(0, len(data), 4):
        writer.write(data[i : i + 4])
        await asyncio.sleep(BOUND / 5)
    status, _ = await read_answer(reader)
    assert status == 200
    writer.close()
    # Stalling after a part of it.
    reader, writer = await connect(proxy)
    writer.write(request_head(CHAT, len(data)) + data[:10])
    await asyncio.sleep(BOUND / 5)
    writer.write(data[10:20])
    status, body = await read_answer(reader)
    assert status == 408 and json.loads(body)["error"]["code"] == "408"
    assert await closed(reader)
    writer.close()


# Encoded bodies


@functools.cache
def gzip_bomb(size: int = 1 << 30) -> bytes:
    """``size`` zero bytes gzipped: about a thousandth of that."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


def gzipped(data: bytes, wbits: int = 16 + zlib.MAX_WBITS) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


async def _bomb_and_health(
    proxy: Proxy, key: str | None, path: str = CHAT
) -> tuple[int, dict[str, Any], int, float]:
    """The bomb POSTed, /health asked beside it: the bomb's status and body, the health
    check's status, and the CPU time of this process (the proxy's, the client's) meanwhile."""
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    if key is not None:
        headers["Api-Key"] = key
    bomb = gzip_bomb()
    async with aiohttp.ClientSession() as s:

        async def post() -> tuple[int, dict[str, Any]]:
            async with s.post(proxy.url(path), data=bomb, headers=headers) as r:
                return r.status, await r.json()

        async def health() -> int:
            await asyncio.sleep(0.01)
            async with s.get(proxy.url("/health")) as r:
                return r.status

        cpu = time.process_time()
        (status, body), health_status = await asyncio.gather(post(), health())
        return status, body, health_status, time.process_time() - cpu


@pytest.mark.parametrize("path", [CHAT, "/openai/v1/chat/completions"])
async def test_a_gzip_bomb_without_a_key_is_refused_before_a_byte_is_inflated(
    make_proxy: ProxyFactory, tmp_path: Path, path: str
) -> None:
    """On /openai/v1/... too, where the deployment is in the body: the key comes first."""
    proxy = await start(make_proxy, tmp_path)
    status, body, health, cpu = await _bomb_and_health(proxy, None, path)
    assert status == 401 and body["error"]["code"] == "401"
    assert health == 200
    assert cpu < 2.0  # inflating the 1 GiB takes seconds of CPU; sending 1 MiB a few ms


async def test_a_gzip_bomb_with_a_key_is_a_413_and_the_process_keeps_answering(
    make_proxy: ProxyFactory, tmp_path: Path, backend: Backend
) -> None:
    proxy = await start(make_proxy, tmp_path, backend)
    status, body, health, cpu = await _bomb_and_health(proxy, KEY)
    assert status == 413 and body == {
        "error": {"message": "Request body is too large", "code": "413"}
    }
    assert health == 200
    assert cpu < 2.0  # at most the limit's 16 MiB inflated
    assert backend.control.requests == []


async def test_gzip_and_deflate_bodies_are_proxied_decoded(
    make_proxy: ProxyFactory, tmp_path: Path, backend: Backend
) -> None:
    proxy = await start(make_proxy, tmp_path, backend)
    data = json.dumps(BODY).encode()
    async with aiohttp.ClientSession() as s:
        for encoding, wbits in (("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS)):
            r = await s.post(
                proxy.url(CHAT),
                data=gzipped(data, wbits),
                headers={
                    "Content-Encoding": encoding,
                    "Content-Type": "application/json",
                    "Api-Key": KEY,
                },
            )
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == "Echo: a b"
            received = backend.control.last_request
            assert received.body == data
            assert "Content-Encoding" not in received.headers
        # the /openai/v1 route, where the deployment is in the (encoded) body
        r = await s.post(
            proxy.url("/openai/v1/chat/completions"),
            data=gzipped(json.dumps({**BODY, "model": "chat"}).encode()),
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "Api-Key": KEY,
            },
        )
        assert r.status == 200
        assert backend.control.last_request.json["messages"] == BODY["messages"]


async def test_corrupt_or_unknown_encodings_are_a_400_or_a_415(
    make_proxy: ProxyFactory, tmp_path: Path, backend: Backend
) -> None:
    proxy = await start(make_proxy, tmp_path, backend)
    good = gzipped(json.dumps(BODY).encode())
    async with aiohttp.ClientSession() as s:
        for encoding, data, status in (
            ("gzip", b"\x1f\x8b\x08\x00 this is not gzip at all", 400),
            ("gzip", b"not even a header", 400),
            ("gzip", good[: len(good) // 2], 400),  # truncated
            ("gzip", good + b"trailing", 400),
            ("deflate", good, 400),  # gzip sent as deflate
            ("br", good, 415),
            ("gzip, gzip", good, 415),
        ):
            r = await s.post(
                proxy.url(CHAT),
                data=data,
                headers={
                    "Content-Encoding": encoding,
                    "Content-Type": "application/json",
                    "Api-Key": KEY,
                },
            )
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (status, str(status)), (encoding, body)
    assert backend.control.requests == []


# Overlong values and the served process's stderr


async def test_the_served_process_writes_only_short_json_lines_without_secrets(
    tmp_path: Path,
) -> None:
    """Bad header bytes, a 1 MB model name and a long path to `dialproxy serve`: short
    answers, and every line it writes on stderr is short JSON without the key."""
    port = free_port()
    (tmp_path / "c.json").write_text(json.dumps(config()))
    proc = spawn("serve", "--config", str(tmp_path / "c.json"), "--port", str(port), "--no-watch")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        for bad in (b"\r", b"\n", b"\x00"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /health HTTP/1.1\r\nHost: x\r\nApi-Key: " + KEY.encode() + bad + b"t\r\n\r\n"
            )
            assert (await asyncio.wait_for(reader.readline(), WITHIN)).split()[1] == b"400"
            writer.close()
        name = "m" * 1_000_000
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                json={**BODY, "model": name},
                headers={"Api-Key": KEY},
            )
            assert r.status == 404
            body = await r.read()
            assert len(body) < 1000
            assert json.loads(body)["error"]["message"].startswith("Unknown application: mmmm")
            r = await s.get(f"http://127.0.0.1:{port}/" + "p" * 8000, headers={"Api-Key": KEY})
            assert r.status == 404 and len(await r.read()) < 1000
            for path in ("/openai/v1/models/", "/openai/applications/"):  # the lookups too
                r = await s.get(
                    f"http://127.0.0.1:{port}{path}{'n' * 6000}", headers={"Api-Key": KEY}
                )
                assert r.status == 404 and len(await r.read()) < 1000, path
    finally:
        code, err = stop(proc)
    assert code == 0, err[-2000:]
    assert_json_lines_without_secrets(err)
    lines = err.splitlines()
    assert all(len(line) < 5000 for line in lines), max(len(line) for line in lines)
    events = [json.loads(line)["event"] for line in lines]
    assert (
        events.count("bad HTTP request from client: BadHttpMessage")
        + events.count("bad HTTP request from client: InvalidHeader")
        + events.count("bad HTTP request from client: LineTooLong")
        >= 1
    ), events
    request = [json.loads(line) for line in lines if '"event":"request"' in line]
    assert request and request[0]["status"] == 404 and len(request[0]["deployment"]) < 400


# Settings


def test_the_timeouts_come_from_flags_or_the_environment() -> None:
    env = {"DIALPROXY_HEADER_TIMEOUT": "2.5", "DIALPROXY_BODY_TIMEOUT": "7"}
    settings = Settings.from_env(env)
    assert (settings.header_timeout, settings.body_timeout) == (2.5, 7.0)
    assert (Settings().header_timeout, Settings().body_timeout) == (10.0, 30.0)
    with pytest.raises(ValueError, match="DIALPROXY_BODY_TIMEOUT must be a number of seconds"):
        Settings.from_env({"DIALPROXY_BODY_TIMEOUT": "soon"})
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="header timeout must be"):
            Settings(header_timeout=bad).check()
    proc = spawn("serve", "--header-timeout", "0")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"header timeout must be" in err, err
    assert isinstance(proc, subprocess.Popen)
