"""Wires a served process: settings -> counter storage, config store, watcher -> the app."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from dialproxy import tracing
from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore, ReloadResult
from dialproxy.config.watcher import ConfigWatcher
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.rediscounters import LEASE, RedisCounters
from dialproxy.counting.storage import Storage
from dialproxy.settings import Settings
from dialproxy.web.app import create_app
from dialproxy.web.appkeys import BACKGROUND, BALANCER, STORE, WATCHER
from dialproxy.web.finish import hold

REDIS_SCHEMES = ("redis", "rediss", "redis+unix")


def counter_storage(uri: str, slot_lease: float = LEASE) -> Storage:
    """``memory://`` (the default) or Redis
    (:class:`~dialproxy.counting.rediscounters.RedisCounters`).

    ``redis://[:password@]HOST:PORT/DB``, ``rediss://...`` (TLS) and
    ``redis+unix:///path/to/socket?db=0``.  A Redis call gives up after a short timeout and
    is never retried (one that timed out may have been applied: a retry could count it
    twice); a dropped connection is reopened by the next call.  The one Redis client of
    the process: the shared keys and the per-request keys use it too.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "memory":
        return LocalCounters()
    uri = uri.removeprefix("async+")
    if scheme.removeprefix("async+") in REDIS_SCHEMES:
        if uri.startswith("redis+unix"):
            uri = "unix" + uri.removeprefix("redis+unix")
        return RedisCounters(uri, lease=slot_lease)
    raise ValueError(
        f"unsupported storage URI {scheme + '://' if scheme else repr(uri)}: "
        "use memory://, redis://, rediss:// or redis+unix://"
    )


def event_loop_factory(loop: str = "uvloop") -> Callable[[], asyncio.AbstractEventLoop]:
    """The served process's event loop: uvloop's (libuv), else asyncio's own.  uvloop took
    12-14% off the instructions per request of the bench's aiohttp pass-through."""
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def build_app(settings: Settings, store: ConfigStore) -> web.Application:
    """The served app; with ``settings.watch`` it reloads its config when the files change."""
    app = create_app(
        store,
        settings=settings,
        storage=counter_storage(settings.storage, settings.slot_lease),
        tracing=tracing.from_env(),  # (decided here, once: None unless OTEL_* ask for traces)
    )
    if settings.watch:
        app.cleanup_ctx.append(watch_config)
    return app


# The cyclic garbage collector's young-generation threshold while serving (CPython's is
# 700).  A request allocates a few hundred container objects, nearly all freed by reference
# counting; at 700 the collector runs about once a request and, with dozens of requests in
# flight, keeps promoting their live objects into the older generations, whose collections
# then walk them again.  Measured with `make bench`: about 30-40 us of CPU per request.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once the app is set up, before the first request: what was allocated to start (the
    modules, the config) goes to the collector's permanent generation, never walked again,
    and young collections run about a dozen times less often.  Cyclic garbage is still
    collected, just in bigger batches."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def reload_app(
    app: web.Application, trigger: str, sources: Sequence[Source] | None = None
) -> ReloadResult:
    """The one reload path of a running app (file watcher and SIGHUP): rebuild (in a worker
    thread) and swap, then drop the balancer's state for upstreams that are gone."""
    store = app[STORE]
    result = await store.reload_async(sources, trigger=trigger)
    if result.applied:
        app[BALANCER].forget_missing(dict(store.snapshot.models))
    return result


def reload_soon(app: web.Application, trigger: str) -> None:
    """Start :func:`reload_app` from a signal handler; the app holds the task."""

    async def reload() -> None:
        await reload_app(app, trigger)

    hold(app[BACKGROUND], reload())


async def watch_config(app: web.Application) -> AsyncIterator[None]:
    """A ``cleanup_ctx``: the app owns the watcher's task, started and closed with it."""
    watcher = ConfigWatcher(app[STORE], lambda sources: reload_app(app, "watch", sources))
    app[WATCHER] = watcher
    watcher.start()
    try:
        yield
    finally:
        await watcher.close()
