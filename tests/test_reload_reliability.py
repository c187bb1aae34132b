"""The figures of hot reload: a change served within a second, reloads under load without a
dropped or wrong request, and partial writes, rename-over saves and symlink swaps that never
get a truncated config applied."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore, ReloadResult
from dialproxy.web.appkeys import WATCHER
from tests.conftest import AiohttpServer, Backend, BackendFactory, new_key
from tests.test_reload import (
    HELLO,
    KEY,
    UPSTREAM_KEY,
    chat,
    digest_of,
    encode,
    health,
    processed,
    save,
    start_watched,
    until,
)

STABLE_A, STABLE_B = new_key(), new_key()
GONE_KEY, ADDED_KEY, LATE_KEY = new_key(), new_key(), new_key()


async def test_a_change_is_served_within_a_second_of_the_write(
    backend: Backend, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    path = tmp_path / "aidial.config.json"

    def cfg(*keys: str) -> bytes:
        return encode(
            {
                "models": {
                    "chat": {
                        "type": "chat",
                        "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}],
                    }
                },
                "keys": {k: {"project": "team", "role": "default"} for k in keys},
            }
        )

    save(path, cfg(KEY))
    proxy = await start_watched(aiohttp_server, ConfigStore([path], env={}))
    latencies: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            added = i % 2 == 0  # the new key is added, then removed again
            data = cfg(KEY, ADDED_KEY) if added else cfg(KEY)
            want = 200 if added else 401
            assert await chat(s, proxy, ADDED_KEY) != want
            written = time.perf_counter()
            if i % 3 == 2:
                path.write_bytes(data)  # in place
            else:
                save(path, data)  # rename over
            while await chat(s, proxy, ADDED_KEY) != want:
                assert time.perf_counter() - written < 5, "the change was never served"
                await asyncio.sleep(0.02)
            latencies.append(time.perf_counter() - written)
    print(f"change-to-served latency (s): {[round(x, 3) for x in latencies]}")
    assert max(latencies) < 1.0, latencies


# --- reload under load ---------------------------------------------------------------------


class Versions:
    """The configs written, by the generation each one became (or makes refused)."""

    def __init__(self, first: dict[str, Any]) -> None:
        self.by_generation: dict[int, dict[str, Any]] = {1: first}

    def expected(self, first: int, last: int, key: str, model: str) -> set[int]:
        """The statuses a request may get when it ran between these generations."""
        out = set()
        for g in range(first, last + 1):
            cfg = self.by_generation[g]
            if key not in cfg["keys"]:
                out.add(401)
            elif model not in cfg["models"]:
                out.add(404)
            else:
                out.add(200)
        return out


def _load_changes(
    first: Backend, second: Backend
) -> list[tuple[str, Callable[[dict[str, Any]], dict[str, Any] | bytes], str]]:
    """20 rewrites: (kind, change of the current config -> new config or raw bytes, the JSON
    path a refusal must report)."""

    def model(backend: Backend) -> dict[str, Any]:
        return {"type": "chat", "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}]}

    def limit(n: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def change(cfg: dict[str, Any]) -> dict[str, Any]:
            cfg["roles"]["user"]["limits"]["chat"] = {
                "minute": n * 10**9,
                "requestMinute": n * 10**6,
            }
            return cfg

        return change

    def add_model(name: str, backend: Backend) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda cfg: cfg | {"models": cfg["models"] | {name: model(backend)}}

    def add_key(secret: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda cfg: (
            cfg | {"keys": cfg["keys"] | {secret: {"project": "new", "role": "user"}}}
        )

    def remove_key(secret: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda cfg: cfg | {"keys": {k: v for k, v in cfg["keys"].items() if k != secret}}

    def upstream(name: str, backend: Backend) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda cfg: cfg | {"models": cfg["models"] | {name: model(backend)}}

    def schema_error(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["models"]["chat"]["upstreams"][0]["weight"] = "heavy"
        return cfg

    def unset_variable(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["models"]["chat"]["upstreams"][0]["key"] = "${DIALPROXY_TEST_UNSET}"
        return cfg

    def half_written(cfg: dict[str, Any]) -> bytes:
        data = encode(limit(99)(cfg))
        return data[: len(data) // 2]

    return [
        ("valid", limit(2), ""),
        ("valid", add_model("chat2", first), ""),
        ("broken", lambda cfg: b'{"models": {"chat": {,}}}', "$"),
        ("valid", limit(3), ""),
        ("valid", add_key(ADDED_KEY), ""),
        ("broken", schema_error, "$.models.chat.upstreams[0].weight"),
        ("valid", remove_key(GONE_KEY), ""),
        ("valid", upstream("chat", second), ""),
        ("broken", unset_variable, "$.models.chat.upstreams[0].key"),
        ("valid", limit(4), ""),
        ("valid", add_model("chat3", second), ""),
        ("broken", half_written, "$"),
        ("valid", upstream("chat2", second), ""),
        ("valid", limit(5), ""),
        ("broken", lambda cfg: cfg | {"keys": {}}, "$.keys"),
        ("valid", add_key(LATE_KEY), ""),
        ("valid", limit(6), ""),
        ("valid", upstream("chat", first), ""),
        ("valid", limit(7), ""),
        ("valid", limit(8), ""),
    ]


async def test_reload_under_load(
    make_backend: BackendFactory, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    first, second = await make_backend(), await make_backend()
    current: dict[str, Any] = {
        "models": {
            "chat": {"type": "chat", "upstreams": [{"endpoint": first.url(), "key": UPSTREAM_KEY}]}
        },
        "roles": {"user": {"limits": {"chat": {"minute": 10**9, "requestMinute": 10**6}}}},
        "keys": {
            STABLE_A: {"project": "a", "role": "user"},
            STABLE_B: {"project": "b", "role": "user"},
            GONE_KEY: {"project": "gone", "role": "user"},
        },
    }
    path = tmp_path / "aidial.config.json"
    save(path, encode(current))
    proxy = await start_watched(aiohttp_server, ConfigStore([path], env={}))
    store = proxy.store
    versions = Versions(json.loads(json.dumps(current)))
    changes = _load_changes(first, second)
    total, concurrency, pace = 5000, 50, 230
    done = 0
    errors: list[str] = []  # transport errors and unexpected statuses
    statuses: dict[int, int] = {}
    writer_done = asyncio.Event()
    # Most requests use what stays valid; the rest what a change adds or removes.
    targets = [(STABLE_A, "chat"), (STABLE_B, "chat")] * 3 + [
        (GONE_KEY, "chat"),
        (ADDED_KEY, "chat"),
        (STABLE_A, "chat2"),
        (STABLE_B, "chat3"),
        (LATE_KEY, "chat2"),
    ]
    counter = itertools.count()

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        key, model = targets[i % len(targets)]
        stream = i % 4 == 0
        before = store.generation
        try:
            async with s.post(
                proxy.url(f"/openai/deployments/{model}/chat/completions"),
                json={**HELLO, "stream": stream},
                headers={"Api-Key": key},
            ) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ClientError as e:
            errors.append(f"request {i}: {type(e).__name__}")
            return
        statuses[status] = statuses.get(status, 0) + 1
        allowed = versions.expected(before, store.generation, key, model)
        if status not in allowed:
            errors.append(f"request {i} ({model}): {status}, expected one of {allowed}")
        elif status == 200 and stream and not body.endswith(b"data: [DONE]\n\n"):
            errors.append(f"request {i}: stream cut short")
        elif status == 200 and not stream and b'"choices"' not in body:
            errors.append(f"request {i}: no choices")

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal done
        while done < total or not writer_done.is_set():
            await one(s, next(counter))
            done += 1

    async def writer(s: aiohttp.ClientSession) -> list[list[dict[str, str]]]:
        reported: list[list[dict[str, str]]] = []
        generation = 1
        for k, (kind, change, where) in enumerate(changes):

            def due(at: int = 150 + k * pace) -> bool:  # the changes spread over the load
                return done >= at

            await until(due, timeout=60, what="load progress")
            new = change(json.loads(json.dumps(current)))
            if kind == "valid":
                assert isinstance(new, dict)
                generation += 1
                versions.by_generation[generation] = new  # known before it can be served
                current.clear()
                current.update(new)
                save(path, encode(new))
            elif isinstance(new, bytes):
                path.write_bytes(new)  # left half-written, in place
            else:
                save(path, encode(new))
            deadline = time.monotonic() + 5
            while True:
                state = (await health(s, proxy))["config"]
                if kind == "valid" and state["generation"] == generation:
                    assert state["lastError"] is None
                    break
                if kind == "broken" and state["lastError"] is not None:
                    assert state["generation"] == generation
                    assert any(p["path"] == where for p in state["lastError"]), state
                    reported.append(state["lastError"])
                    break
                assert time.monotonic() < deadline, f"change {k} ({kind}) not seen: {state}"
                await asyncio.sleep(0.005)
        writer_done.set()
        return reported

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency + 10)
    with capture_logs() as logs:
        async with aiohttp.ClientSession(connector=connector) as s:
            writing = asyncio.create_task(writer(s))
            await asyncio.gather(*(worker(s) for _ in range(concurrency)))
            reported = await writing
    elapsed = time.perf_counter() - started
    print(
        f"reload under load: {done} requests at concurrency {concurrency} in {elapsed:.1f} s, "
        f"statuses {statuses}, {len(changes)} rewrites"
    )
    assert not errors, errors[:20]
    assert done >= total
    assert store.generation == 1 + 15
    assert len(reported) == 5
    refused = [e for e in logs if e["event"] == "config_reload_refused"]
    assert [[p["path"] for p in e["problems"]] for e in refused] == [
        [p["path"] for p in r] for r in reported
    ]
    assert len([e for e in logs if e["event"] == "config_reloaded"]) == 15
    # The swaps of upstream were followed: both backends served.
    assert first.control.requests and second.control.requests
    # The changed keys were all exercised on both sides of their change.
    assert statuses.get(401, 0) > 0 and statuses.get(404, 0) > 0


# --- partial writes, rename-over saves and symlink swaps ----------------------------------


class RecordingStore(ConfigStore):
    """A store that keeps every snapshot it applies (to check each was complete)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__(paths, env={})
        self.applied: list[tuple[str, str, str]] = []  # (A marker, B marker, digest)
        self.refused = 0

    async def reload_async(
        self, sources: Sequence[Source] | None = None, *, trigger: str = "reload"
    ) -> ReloadResult:
        result = await super().reload_async(sources, trigger=trigger)
        if result.applied:
            raw = self.snapshot.raw
            self.applied.append(
                (
                    raw["models"]["chat"]["displayName"],
                    raw["keys"][KEY]["name"],
                    self.snapshot.digest,
                )
            )
        self.refused += result.refused
        return result


def models_file(backend: Backend, version: int) -> bytes:
    """File A: the models (a few kilobytes, so that a cut can fall anywhere)."""
    models = {
        f"model-{n:02}": {
            "type": "chat",
            "description": f"filler model {n} of version {version} " + "x" * 60,
            "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}],
        }
        for n in range(25)
    }
    models["chat"] = {
        "type": "chat",
        "displayName": f"a-{version}",
        "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}],
    }
    return json.dumps({"models": models}, indent=1).encode()


def keys_file(version: int) -> bytes:
    """File B: the keys, served from a ConfigMap-style folder."""
    keys = {KEY: {"project": "team", "role": "default", "name": f"b-{version}"}}
    keys[STABLE_A] = {"project": "filler", "role": "default", "description": "y" * 400}
    return json.dumps({"keys": keys}, indent=1).encode()


async def write_in_two(path: Path, data: bytes, cut: int, pause: float) -> None:
    with path.open("wb") as f:
        f.write(data[:cut])
        f.flush()
        if pause:
            await asyncio.sleep(pause)
        f.write(data[cut:])


async def test_partial_writes_renames_and_symlink_swaps_never_apply_a_truncated_config(
    backend: Backend, tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    rng = random.Random(4)
    plain = tmp_path / "plain"
    plain.mkdir()
    a_path = plain / "aidial.config.json"
    # Kubernetes ConfigMap layout: keys.json -> ..data/keys.json, ..data -> ..<version>
    cm = tmp_path / "configmap"
    cm.mkdir()
    (cm / "..v0").mkdir()
    (cm / "..v0" / "keys.json").write_bytes(keys_file(0))
    os.symlink("..v0", cm / "..data")
    os.symlink("..data/keys.json", cm / "keys.json")
    b_path = cm / "keys.json"
    a_versions = {0: models_file(backend, 0)}
    b_versions = {0: keys_file(0)}
    save(a_path, a_versions[0])
    store = RecordingStore([a_path, b_path])
    proxy = await start_watched(aiohttp_server, store)
    watcher = proxy.app[WATCHER]
    a, b = 0, 0
    counts = {"partial": 0, "rename": 0, "swap": 0}

    for round_ in range(1, 101):
        mode = ("partial", "rename", "swap")[round_ % 3]
        counts[mode] += 1
        pause = rng.choice((0.0, 0.002, 0.01, 0.05))
        if mode == "partial":  # in place: truncate, write a part, pause, write the rest
            a = round_
            a_versions[a] = data = models_file(backend, a)
            await write_in_two(a_path, data, rng.randrange(1, len(data)), pause)
        elif mode == "rename":  # an editor's save: a temporary file renamed over the path
            a = round_
            a_versions[a] = data = models_file(backend, a)
            tmp = plain / ".aidial.config.json.swp"
            await write_in_two(tmp, data, rng.randrange(1, len(data)), pause)
            os.replace(tmp, a_path)
        else:  # kubelet: a new folder, a new ..data link renamed over the old one
            old = (cm / "..data").readlink()
            b = round_
            b_versions[b] = data = keys_file(b)
            folder = cm / f"..v{b}"
            folder.mkdir()
            complete_first = round_ % 2 == 0
            cut = len(data) if complete_first else rng.randrange(1, len(data))
            (folder / "keys.json").write_bytes(data[:cut])
            os.symlink(folder.name, cm / "..data_tmp")
            os.replace(cm / "..data_tmp", cm / "..data")
            if not complete_first:  # even a partial file behind the swap is waited for
                await asyncio.sleep(pause)
                with (folder / "keys.json").open("ab") as f:
                    f.write(data[cut:])
            shutil.rmtree(cm / old)
        await processed(proxy, a_versions[a], b_versions[b])
        assert store.applied[-1][:2] == (f"a-{a}", f"b-{b}"), round_
        assert store.last_error is None, (round_, store.last_error)

    # Every snapshot ever applied was built from complete versions of both files.
    for a_marker, b_marker, digest in store.applied:
        sources = [
            Source(str(a_path), a_versions[int(a_marker[2:])]),
            Source(str(b_path), b_versions[int(b_marker[2:])]),
        ]
        assert build_snapshot(sources, {}).digest == digest
    print(
        f"100 rounds {counts}: {len(store.applied)} applied, {store.refused} partial states "
        f"refused, {watcher.checks} checks, {watcher.failures} watch failures"
    )
    assert watcher.failures == 0
    # The watcher survives: one more change, seen at once.
    generation = store.generation
    save(a_path, models_file(backend, 1000))
    await until(lambda: store.generation == generation + 1, timeout=1.0, what="still watching")
    assert digest_of(store, models_file(backend, 1000), b_versions[b]) == store.source_digest
