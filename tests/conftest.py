"""Shared fixtures: a real OpenAI-style upstream and the real proxy app in front of it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from limits.aio.storage import MemoryStorage, Storage

from dialproxy.config.store import ConfigStore
from dialproxy.demo_backend import BackendControl, create_backend_app
from dialproxy.settings import Settings
from dialproxy.web.app import create_app

AiohttpServer = Callable[..., Awaitable[TestServer]]


def new_key() -> str:
    """A key secret of 256 random bits, like `dialproxy keys generate` makes."""
    return "dp-" + secrets.token_hex(32)


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

    @property
    def app(self) -> web.Application:
        app = self.server.app
        assert app is not None
        return app


@pytest.fixture
async def backend(aiohttp_server: AiohttpServer) -> Backend:
    control = BackendControl()
    server = await aiohttp_server(create_backend_app(control))
    return Backend(server, control)


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def make_proxy(aiohttp_server: AiohttpServer, tmp_path: Path) -> ProxyFactory:
    async def factory(
        config: dict[str, Any],
        *,
        storage: Storage | None = None,
        settings: Settings | None = None,
    ) -> Proxy:
        path = tmp_path / "aidial.config.json"
        path.write_text(json.dumps(config))
        store = ConfigStore([path], env={})
        store.load()
        app = create_app(
            store,
            settings=settings or Settings(config_paths=(str(path),)),
            storage=storage if storage is not None else MemoryStorage(),
        )
        server = await aiohttp_server(app)  # TestServer cancels handlers on disconnect
        return Proxy(server, store, path)

    return factory


def chat_model(backend: Backend, **extra: Any) -> dict[str, Any]:
    """A model calling the backend directly (upstreams, no endpoint)."""
    return {
        "type": "chat",
        "upstreams": [{"endpoint": backend.url(), "key": "upstream-secret-1"}],
    } | extra
