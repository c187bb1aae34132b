"""Hot reload: the running proxy follows its config files, refuses a broken change visibly,
keeps its counters, and lets requests in flight finish on the config they started with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore, source_digest
from dialproxy.config.watcher import ConfigWatcher
from dialproxy.server import build_app, reload_app
from dialproxy.settings import Settings
from dialproxy.text import fingerprint
from dialproxy.web.appkeys import WATCHER
from tests.conftest import (
    AiohttpServer,
    Backend,
    BackendFactory,
    Proxy,
    assert_json_lines_without_secrets,
    new_key,
)

KEY = new_key()
OTHER_KEY = new_key()
NEW_KEY = new_key()
UPSTREAM_KEY = new_key("sk-upstream-")
CHAT_PATH = "/openai/deployments/chat/chat/completions"
HELLO: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}]}
ROOT = Path(__file__).resolve().parents[1]


# --- helpers shared with test_reload_reliability ------------------------------------------


def config(
    backend: Backend,
    *,
    keys: Sequence[str] = (KEY, OTHER_KEY),
    models: Sequence[str] = ("chat",),
    limit: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Chat models on ``backend``, a "user" role (limited on "chat" when ``limit``), keys."""
    return {
        "models": {
            name: {"type": "chat", "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}]}
            for name in models
        },
        "roles": {"user": {"limits": {"chat": limit} if limit else {}}},
        "keys": {
            secret: {"project": f"team-{fingerprint(secret)}", "role": "user"} for secret in keys
        },
    }


def encode(cfg: dict[str, Any]) -> bytes:
    return json.dumps(cfg).encode()


def save(path: Path, data: bytes) -> None:
    """An editor's atomic save: a temporary file in the same folder, renamed over the path."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def digest_of(store: ConfigStore, *contents: bytes) -> str:
    """The digest the store records once the watcher has built these files' bytes."""
    return source_digest([Source(str(p), c) for p, c in zip(store.paths, contents, strict=True)])


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)


async def processed(proxy: Proxy, *contents: bytes) -> None:
    """Wait until the watcher has built exactly these bytes (served or refused them)."""
    want = digest_of(proxy.store, *contents)
    await until(lambda: proxy.store.source_digest == want, what="the watcher saw the change")


async def start_watched(aiohttp_server: AiohttpServer, store: ConfigStore) -> Proxy:
    """The served app (``build_app``, watching its files), its watcher ready."""
    store.load()
    settings = Settings(
        config_paths=tuple(str(p) for p in store.paths),
        allow_empty_config=store.allow_empty,
        watch=True,
    )
    app = build_app(settings, store)
    server = await aiohttp_server(app)
    await asyncio.wait_for(app[WATCHER].ready.wait(), 5)
    return Proxy(server, store, store.paths[0])


WatchedFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def watched(aiohttp_server: AiohttpServer, tmp_path: Path) -> WatchedFactory:
    async def factory(
        cfg: dict[str, Any], *, allow_empty: bool = False, env: dict[str, str] | None = None
    ) -> Proxy:
        path = tmp_path / "aidial.config.json"
        save(path, encode(cfg))
        store = ConfigStore([path], env=env or {}, allow_empty=allow_empty)
        return await start_watched(aiohttp_server, store)

    return factory


async def chat(session: aiohttp.ClientSession, proxy: Proxy, key: str, model: str = "chat") -> int:
    async with session.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        json=HELLO,
        headers={"Api-Key": key},
    ) as resp:
        await resp.read()
        return resp.status


async def health(session: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    async with session.get(proxy.url("/health")) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


# --- /health and refusals ------------------------------------------------------------------


async def test_health_shows_generation_and_a_refusal_until_the_next_good_reload(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend))
    async with aiohttp.ClientSession() as s:
        first = await health(s, proxy)
        assert first["status"] == "ok"
        state = first["config"]
        assert state["generation"] == 1 and state["lastError"] is None
        assert datetime.fromisoformat(state["loadedAt"]).tzinfo is not None
        assert state["digest"] == proxy.store.snapshot.digest

        broken = b'{"models": {"chat": '
        save(proxy.path, broken)
        await processed(proxy, broken)
        refused = await health(s, proxy)
        assert refused["status"] == "ok"  # still serving the last good config: stay in the pool
        assert refused["config"]["generation"] == 1
        assert refused["config"]["digest"] == state["digest"]
        (problem,) = refused["config"]["lastError"]
        assert problem["file"] == str(proxy.path) and problem["path"] == "$"
        assert problem["message"].startswith("invalid JSON at line 1")
        assert await chat(s, proxy, KEY) == 200  # the last good config serves on

        good = encode(config(backend, keys=(KEY,)))
        save(proxy.path, good)
        await processed(proxy, good)
        taken = (await health(s, proxy))["config"]
        assert taken["generation"] == 2 and taken["lastError"] is None
        assert taken["digest"] != state["digest"]
        assert taken["loadedAt"] > state["loadedAt"]
        assert await chat(s, proxy, OTHER_KEY) == 401


def _broken_changes(backend: Backend) -> list[tuple[str, dict[str, Any] | bytes, str, str]]:
    """(name, content, the JSON path reported, a piece of the message)."""
    good = config(backend)
    schema_error = config(backend)
    schema_error["models"]["chat"]["upstreams"][0]["weight"] = "heavy"
    bad_key = config(backend)
    bad_key["keys"][KEY] = "not an object"
    unset = config(backend)
    unset["models"]["chat"]["upstreams"][0]["key"] = "${DIALPROXY_TEST_UNSET}"
    return [
        ("bad JSON", b'{"models": {}, "keys": {,}}', "$", "invalid JSON at line 1"),
        (
            "half-written",
            encode(good)[: len(encode(good)) // 2],
            "$",
            "invalid JSON",
        ),
        ("schema error", schema_error, "$.models.chat.upstreams[0].weight", "heavy"),
        ("key secret in the path", bad_key, f"$.keys.<key {fingerprint(KEY)}>", "object"),
        (
            "unset variable",
            unset,
            "$.models.chat.upstreams[0].key",
            "environment variable DIALPROXY_TEST_UNSET is not set",
        ),
        ("no keys", config(backend, keys=()), "$.keys", "--allow-empty-config"),
        ("no models", config(backend, models=()) | {"roles": {}}, "$.models", "no models"),
    ]


async def test_every_kind_of_broken_change_is_refused_logged_and_shown(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend))
    digest = proxy.store.snapshot.digest
    async with aiohttp.ClientSession() as s:
        for name, content, path, message in _broken_changes(backend):
            data = content if isinstance(content, bytes) else encode(content)
            with capture_logs() as logs:
                save(proxy.path, data)
                await processed(proxy, data)
            state = (await health(s, proxy))["config"]
            assert state["generation"] == 1, name
            assert state["digest"] == digest, name
            reported = state["lastError"]
            assert any(p["path"] == path and message in p["message"] for p in reported), (
                name,
                reported,
            )
            (line,) = [e for e in logs if e["event"] == "config_reload_refused"]
            assert line["log_level"] == "error" and line["trigger"] == "watch"
            assert [
                {k: p[k] for k in ("file", "path", "message")} for p in line["problems"]
            ] == reported
            text = json.dumps(logs)
            assert KEY not in text and UPSTREAM_KEY not in text, name
            assert await chat(s, proxy, KEY) == 200, name
            # The next good change clears the refusal (and back to the original content is
            # no change at all: the same digest is not a reload).
            good = encode(config(backend))
            save(proxy.path, good)
            await processed(proxy, good)
            assert proxy.store.last_error is None and proxy.store.generation == 1


async def test_an_empty_config_is_taken_with_allow_empty_config(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend), allow_empty=True)
    empty = encode(config(backend, keys=()))
    save(proxy.path, empty)
    await processed(proxy, empty)
    assert proxy.store.generation == 2 and proxy.store.last_error is None
    async with aiohttp.ClientSession() as s:
        assert await chat(s, proxy, KEY) == 401


async def test_identical_content_is_not_a_reload(backend: Backend, watched: WatchedFactory) -> None:
    cfg = config(backend)
    proxy = await watched(cfg)
    watcher = proxy.app[WATCHER]
    checks = watcher.checks
    save(proxy.path, encode(cfg))  # the same bytes, saved again
    await until(lambda: watcher.checks > checks, what="the save was seen")
    reformatted = json.dumps(cfg, indent=2).encode()  # the same content, other bytes
    with capture_logs() as logs:
        save(proxy.path, reformatted)
        await processed(proxy, reformatted)
    assert [e["event"] for e in logs] == ["config_unchanged"]
    assert proxy.store.generation == 1
    # SIGHUP's path (a forced rebuild) agrees.
    assert not (await reload_app(proxy.app, "sighup")).applied
    assert proxy.store.generation == 1 and proxy.store.last_error is None


# --- what a reload keeps and what it changes -----------------------------------------------


async def test_counters_survive_and_a_changed_limit_applies_to_the_next_request(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend, limit={"requestDay": 3}))
    async with aiohttp.ClientSession() as s:
        assert [await chat(s, proxy, KEY) for _ in range(2)] == [200, 200]
        lower = encode(config(backend, limit={"requestDay": 2}))
        save(proxy.path, lower)
        await processed(proxy, lower)
        assert proxy.store.generation == 2
        assert await chat(s, proxy, KEY) == 429  # the 2 already counted meet the new limit
        assert await chat(s, proxy, OTHER_KEY) == 200  # another project has its own
        higher = encode(config(backend, limit={"requestDay": 4}))
        save(proxy.path, higher)
        await processed(proxy, higher)
        assert [await chat(s, proxy, KEY) for _ in range(3)] == [200, 200, 429]


async def test_a_removed_key_is_refused_and_a_new_key_works_from_the_first_request(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend))
    async with aiohttp.ClientSession() as s:
        assert await chat(s, proxy, NEW_KEY) == 401
        assert await chat(s, proxy, OTHER_KEY) == 200
        swapped = encode(config(backend, keys=(KEY, NEW_KEY)))
        save(proxy.path, swapped)
        await until(lambda: proxy.store.generation == 2)
        assert await chat(s, proxy, OTHER_KEY) == 401
        assert await chat(s, proxy, NEW_KEY) == 200
        assert await chat(s, proxy, KEY) == 200


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend, models=("chat", "other")))
    backend.control.chunk_delay = 0.15  # ~1.5 s of stream: a reload takes well under 0.2 s
    words = " ".join(f"w{i}" for i in range(8))
    body = {"messages": [{"role": "user", "content": words}], "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url(CHAT_PATH), json=body, headers={"Api-Key": KEY}) as resp,
    ):
        assert resp.status == 200
        raw = await resp.content.readany()
        # The key and the model are both removed while the stream is relayed.
        gone = encode(config(backend, keys=(OTHER_KEY,), models=("other",)))
        save(proxy.path, gone)
        await processed(proxy, gone)
        assert proxy.store.generation == 2
        assert not resp.content.at_eof()  # still streaming across the swap
        assert await chat(s, proxy, KEY, "other") == 401
        async with s.post(proxy.url(CHAT_PATH), json=HELLO, headers={"Api-Key": OTHER_KEY}) as r:
            assert r.status == 404
        raw += await resp.read()
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    text = "".join(
        json.loads(e[len("data: ") :])["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
    )
    assert text == "Echo: " + words


async def test_state_of_a_removed_upstream_is_forgotten(
    make_backend: BackendFactory, watched: WatchedFactory
) -> None:
    """An upstream paused, removed, then back: it starts afresh (asked at once)."""
    first, second = await make_backend(), await make_backend()
    original = encode(config(first))
    proxy = await watched(config(first))
    first.control.fail_next(429, headers={"Retry-After": "300"})
    async with aiohttp.ClientSession() as s:
        assert await chat(s, proxy, KEY) == 503  # rate limited: paused for 300 s
        assert await chat(s, proxy, KEY) == 502  # paused: not asked (no route)
    assert len(first.control.requests) == 1
    moved = encode(config(second))
    save(proxy.path, moved)
    await processed(proxy, moved)
    async with aiohttp.ClientSession() as s:
        assert await chat(s, proxy, KEY) == 200
    assert len(second.control.requests) == 1
    save(proxy.path, original)
    await processed(proxy, original)
    async with aiohttp.ClientSession() as s:
        assert await chat(s, proxy, KEY) == 200  # its pause went with it
    assert len(first.control.requests) == 2


# --- the watcher itself ---------------------------------------------------------------------


async def test_the_watcher_survives_its_folder_going_away(
    backend: Backend, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "aidial.config.json"
    save(path, encode(config(backend)))
    proxy = await start_watched(aiohttp_server, ConfigStore([path], env={}))
    watcher = proxy.app[WATCHER]
    with capture_logs() as logs:
        path.unlink()
        folder.rmdir()
        await until(lambda: watcher.failures >= 2, what="retried")  # every second
        assert [p.message for p in proxy.store.last_error or ()] == ["No such file or directory"]
        async with aiohttp.ClientSession() as s:
            assert await chat(s, proxy, KEY) == 200
        folder.mkdir()
        good = encode(config(backend, keys=(KEY,)))
        save(path, good)
        await until(lambda: proxy.store.generation == 2, what="the file back")
        await until(
            lambda: any(e["event"] == "config_watch_started" for e in logs), what="watching"
        )
    assert proxy.store.last_error is None
    events = [e["event"] for e in logs if e["event"].startswith("config_")]
    # Reported once each, not at every retry.
    assert sorted(events) == [
        "config_reload_refused",
        "config_reloaded",
        "config_watch_failed",
        "config_watch_started",
    ], events
    # Watching again, not just polling: a change is seen at once.
    failures = watcher.failures
    again = encode(config(backend, keys=(OTHER_KEY,)))
    save(path, again)
    await until(lambda: proxy.store.generation == 3, timeout=1.0, what="watching again")
    assert watcher.failures == failures


async def test_a_write_in_two_steps_is_applied_complete(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend))
    for pause, keys in ((0.0, {NEW_KEY}), (0.005, {NEW_KEY, KEY}), (0.1, {KEY})):
        data = encode(config(backend, keys=sorted(keys)))
        with proxy.path.open("wb") as f:  # truncated, then written in two steps
            f.write(data[:40])
            f.flush()
            await asyncio.sleep(pause)  # longer than the settle time: the half is refused
            f.write(data[40:])
        await processed(proxy, data)
        assert proxy.store.snapshot.raw["keys"].keys() == keys
        assert proxy.store.last_error is None


async def test_the_watcher_closes_promptly_with_the_app(
    backend: Backend, watched: WatchedFactory
) -> None:
    proxy = await watched(config(backend))
    watcher = proxy.app[WATCHER]
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "dialproxy-config-watcher"]
    await watcher.close()
    # it ended on its own, within a watch step (not cancelled after the close's 2 s wait)
    assert task.done() and not task.cancelled()
    save(proxy.path, encode(config(backend, keys=(KEY,))))
    await asyncio.sleep(0.2)
    assert proxy.store.generation == 1  # closed: no more reloads


async def test_no_watcher_without_settings_watch(
    backend: Backend, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    path = tmp_path / "aidial.config.json"
    save(path, encode(config(backend)))
    store = ConfigStore([path], env={})
    store.load()
    server = await aiohttp_server(
        build_app(Settings(config_paths=(str(path),), watch=False), store)
    )
    assert server.app is not None and WATCHER not in server.app


async def test_check_reloads_only_on_new_bytes(backend: Backend, tmp_path: Path) -> None:
    path = tmp_path / "aidial.config.json"
    save(path, encode(config(backend)))
    store = ConfigStore([path], env={})
    store.load()
    watcher = ConfigWatcher(store, settle=0.001)
    assert await watcher.check() is None  # never started: a check is still usable alone
    save(path, b"{")
    result = await watcher.check()
    assert result is not None and result.refused and not result.applied
    assert await watcher.check() is None  # the same broken bytes are not rebuilt again
    save(path, encode(config(backend, keys=(KEY,))))
    result = await watcher.check()
    assert result is not None and result.applied and result.generation == 2
    path.unlink()
    result = await watcher.check()
    assert result is not None and result.refused
    assert store.last_error is not None and store.last_error[0].path == "$"
    assert await watcher.check() is None  # still missing: reported once, not at every check
    assert store.generation == 2


async def test_a_config_path_swapped_for_a_fifo_is_refused_at_once(
    backend: Backend, tmp_path: Path
) -> None:
    """A config path that becomes a FIFO: reading it waited, on the event loop, for a writer
    that never came (every request and /health hung).  Now it is not a regular file: refused
    at once, the last good config kept.  (Writers come after 3 s, so the old code's test
    fails instead of hanging.)"""
    path = tmp_path / "aidial.config.json"
    save(path, encode(config(backend)))
    store = ConfigStore([path], env={})
    store.load()
    watcher = ConfigWatcher(store, settle=0.001)
    path.unlink()
    os.mkfifo(path)

    def writer() -> None:  # (each read waits for one: a check reads more than once)
        time.sleep(3)
        for _ in range(100):
            with contextlib.suppress(OSError), open(path, "wb", opener=nonblocking):
                pass
            time.sleep(0.1)

    threading.Thread(target=writer, daemon=True).start()
    started = time.monotonic()
    result = await watcher.check()
    assert time.monotonic() - started < 2
    assert result is not None and result.refused and store.generation == 1
    assert store.last_error is not None
    assert "not a regular file" in store.last_error[0].message


def nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


# --- SIGHUP, in the real process -----------------------------------------------------------


async def test_sighup_reloads_dialproxy_serve(
    backend: Backend, tmp_path: Path, unused_tcp_port: int
) -> None:
    path = tmp_path / "aidial.config.json"
    save(path, encode(config(backend)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dialproxy",
            "serve",
            "--config",
            str(path),
            "--port",
            str(unused_tcp_port),
            "--no-watch",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{unused_tcp_port}/health"
    try:
        async with aiohttp.ClientSession() as s:

            async def state() -> dict[str, Any]:
                async with s.get(url) as resp:
                    assert resp.status == 200
                    body: dict[str, Any] = await resp.json()
                    assert body["status"] == "ok"
                    return dict(body["config"])

            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, "dialproxy serve exited"
                try:
                    first = await state()
                    break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            assert first["generation"] == 1

            save(path, encode(config(backend, keys=(KEY,))))
            await asyncio.sleep(0.3)
            assert (await state())["generation"] == 1  # --no-watch: only SIGHUP reloads
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (current := await state())["generation"] == 1:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                await asyncio.sleep(0.02)
            assert current["generation"] == 2 and current["lastError"] is None

            save(path, b'{"keys": ')
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (current := await state())["lastError"] is None:
                assert time.monotonic() < deadline, "SIGHUP did not report the refusal"
                await asyncio.sleep(0.02)
            assert current["generation"] == 2
            assert current["lastError"][0]["path"] == "$"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert_json_lines_without_secrets(err.decode())  # everything the process wrote
    lines = [json.loads(line) for line in err.decode().splitlines()]
    reloads = [e for e in lines if e["event"] in ("config_reloaded", "config_reload_refused")]
    assert [(e["event"], e["trigger"]) for e in reloads] == [
        ("config_reloaded", "sighup"),
        ("config_reload_refused", "sighup"),
    ]
    assert reloads[1]["problems"][0]["path"] == "$"
