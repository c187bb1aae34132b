"""Wires a served process: settings -> counter storage, config store, watcher -> the app."""

from __future__ import annotations

from aiohttp import web
from limits.aio.storage import MemoryStorage, Storage

from dialproxy.config.store import ConfigStore
from dialproxy.settings import Settings
from dialproxy.web.app import create_app


def counter_storage(uri: str) -> Storage:
    """``memory://`` (default) or ``redis://HOST:PORT/DB`` through the limits library."""
    if uri.startswith("memory://"):
        return MemoryStorage()
    raise ValueError(f"unsupported storage URI scheme: {uri.split(':', 1)[0]}")


def build_app(settings: Settings, store: ConfigStore) -> web.Application:
    return create_app(store, settings=settings, storage=counter_storage(settings.storage))
