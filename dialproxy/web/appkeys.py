"""Every AppKey in one place: what ``create_app`` builds and the handlers reach."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from dialproxy.config.store import ConfigStore
from dialproxy.counting.limiter import Limiter
from dialproxy.ledger import Ledger
from dialproxy.metrics import Metrics
from dialproxy.perrequest import PerRequestKeys
from dialproxy.settings import Settings
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.stalls import BodyWatch
from dialproxy.upstream.balancer import Balancer
from dialproxy.web.drain import Drain

if TYPE_CHECKING:  # (their modules reach the app through these keys)
    from dialproxy.config.watcher import ConfigWatcher

STORE = web.AppKey("store", ConfigStore)
LIMITER = web.AppKey("limiter", Limiter)
BALANCER = web.AppKey("balancer", Balancer)
SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", aiohttp.ClientSession)
BACKGROUND = web.AppKey("background", set[asyncio.Task[None]])
DRAIN = web.AppKey("drain", Drain)
LEDGER = web.AppKey("ledger", Ledger)  # set unless --ledger off
METRICS = web.AppKey("metrics", Metrics)  # (absent with --no-metrics)
SHARED = web.AppKey("shared_keys", SharedKeys[PerRequestKeys])
BODY_WATCH = web.AppKey("body_watch", BodyWatch)  # (absent: no body timeout)
# One admin write at a time in a process (another process's: its write_atomic's check).
ADMIN_WRITES = web.AppKey("admin_writes", asyncio.Lock)
WATCHER: web.AppKey[ConfigWatcher] = web.AppKey("config_watcher")  # (absent with --no-watch)
# The supervisor's pid, in a worker of serve --workers N (absent: one process).
SUPERVISOR = web.AppKey("supervisor", int)
