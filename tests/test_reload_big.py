"""A big config is rebuilt off the event loop: the proxy keeps answering meanwhile."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

import aiohttp

from bench.validate_bench import generate
from dialproxy.config.parse import Source
from dialproxy.config.store import BUILD_SWITCH_INTERVAL, ConfigStore
from dialproxy.server import reload_app
from tests.conftest import Backend, ProxyFactory, new_key

KEY = new_key()


async def test_requests_are_served_while_a_big_config_builds(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    small: dict[str, Any] = {
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": backend.url()}]}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }
    proxy = await make_proxy(small)
    big = generate(10_000, 200)
    big["keys"][KEY] = {"project": "p", "role": "default"}
    big["models"]["chat"] = small["models"]["chat"]
    text = json.dumps(big).replace("${BENCH_UPSTREAM_KEY}", "upstream-key-for-the-test")
    proxy.path.write_text(text)
    reload = asyncio.ensure_future(reload_app(proxy.app, "test"))
    answered_during_build = 0
    async with aiohttp.ClientSession() as s:
        while not reload.done():
            async with s.get(proxy.url("/health")) as r:
                assert r.status == 200
            answered_during_build += not reload.done()
    result = await reload
    assert result.applied and len(proxy.store.snapshot.keys) == 10_001
    assert answered_during_build >= 3


class _Watching(dict[str, str]):
    """An environment that notes the interpreter's switch interval each time the build
    reads a variable, and can hold the build there until released."""

    def __init__(self, values: dict[str, str], hold: threading.Event | None = None) -> None:
        super().__init__(values)
        self.intervals: list[float] = []
        self.inside = threading.Event()
        self.hold = hold

    def get(self, name: str, default: Any = None) -> Any:
        self.intervals.append(sys.getswitchinterval())
        self.inside.set()
        if self.hold is not None:
            assert self.hold.wait(30)
        return super().get(name, default)


def _sources() -> list[Source]:
    doc = {
        "models": {"chat": {"type": "chat", "upstreams": [{"endpoint": "https://up.example.com",
                                                            "key": "${UPSTREAM}"}]}},
        "keys": {KEY: {"project": "p", "role": "default"}},
    }  # fmt: skip
    return [Source("aidial.config.json", json.dumps(doc).encode())]


def test_a_build_hands_the_interpreter_back_sooner_and_restores_the_interval_after() -> None:
    """While a build runs, the serving thread gets the interpreter back within half a
    millisecond rather than 5 ms; after the builds (even overlapping ones), the interval
    is the one before."""
    before = sys.getswitchinterval()
    release = threading.Event()
    held = _Watching({"UPSTREAM": "upstream-key-aaaa"}, hold=release)
    first = ConfigStore(["aidial.config.json"], env=held)
    thread = threading.Thread(target=lambda: first.reload(_sources()))
    thread.start()
    try:
        assert held.inside.wait(30)
        other = _Watching({"UPSTREAM": "upstream-key-bbbb"})
        second = ConfigStore(["aidial.config.json"], env=other)
        assert second.reload(_sources()).applied  # while the first is held mid-build
    finally:
        release.set()
        thread.join(30)
    assert first.generation == 1
    assert held.intervals and other.intervals
    assert set(held.intervals) | set(other.intervals) == {BUILD_SWITCH_INTERVAL}
    assert sys.getswitchinterval() == before
