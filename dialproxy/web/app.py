"""The app factory, the thin informational handlers and the one error -> response mapping."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from dialproxy import ledger, logs, metrics
from dialproxy.apis.all import APIS
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import LONG_MAX, Limit
from dialproxy.config.store import ConfigStore
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Limiter
from dialproxy.counting.rediscounters import RedisCounters, unanswered
from dialproxy.counting.storage import Storage, StorageGuard
from dialproxy.errors import Forbidden, NotFound
from dialproxy.logs import cut
from dialproxy.settings import Settings
from dialproxy.stalls import BodyWatch
from dialproxy.statefile import state_path
from dialproxy.tracing import Tracing
from dialproxy.upstream.balancer import Balancer
from dialproxy.upstream.idle import IdleWatch
from dialproxy.web import (
    admin,
    console,
    features,
    guard,
    plan,
    proxy,
    responses,
    routes,
    sharedkeys,
    usage,
)
from dialproxy.web.appkeys import (
    BACKGROUND,
    BALANCER,
    BODY_WATCH,
    CLIENT,
    DRAIN,
    LEDGER,
    LIMITER,
    METRICS,
    SETTINGS,
    SHARED,
    STORE,
)
from dialproxy.web.drain import Drain
from dialproxy.web.finish import held_done
from dialproxy.web.guard import guarded, json_response
from dialproxy.web.keylimits import callable_names as _callable
from dialproxy.web.keylimits import limits_of
from dialproxy.web.services import Services


async def _principal(request: web.Request) -> Principal:
    """The caller: a key of the config, or a shared key acting as its owner."""
    app = request.app
    return await authenticate(request.headers, app[STORE].snapshot, request.remote, app[SHARED])


def _visible(principal: Principal, kind: str = "model") -> list[str]:
    """The models (or the applications) the key may call: DIAL lists them apart."""
    grants = principal.access.grants
    return [name for name in _callable(principal) if grants[name].model.kind == kind]


async def _listing_entry(request: web.Request, deployment: str, object_name: str) -> dict[str, Any]:
    principal = await _principal(request)
    snapshot = request.app[STORE].snapshot
    model = snapshot.models.get(deployment)
    if model is None or model.kind != "model":  # DIAL lists models only here
        raise NotFound(f"Unknown application: {logs.cut(deployment)}")
    plan.resolve(principal, snapshot, deployment)
    return model.listing(object_name)


async def list_models(request: web.Request) -> web.Response:
    principal = await _principal(request)
    models = request.app[STORE].snapshot.models
    data = [models[name].listing("model") for name in _visible(principal)]
    return json_response({"object": "list", "data": data})


async def list_deployments(request: web.Request) -> web.Response:
    principal = await _principal(request)
    models = request.app[STORE].snapshot.models
    data = [models[name].listing("deployment") for name in _visible(principal)]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    return json_response(await _listing_entry(request, request.match_info["id"], "model"))


async def get_deployment(request: web.Request) -> web.Response:
    return json_response(await _listing_entry(request, request.match_info["id"], "deployment"))


async def openai_models(request: web.Request) -> web.Response:
    """``GET /openai/v1/models``: the OpenAI SDK's ``client.models.list()``."""
    principal = await _principal(request)
    data = [
        {"id": name, "object": "model", "created": 1672534800, "owned_by": "dialproxy"}
        for name in _visible(principal)
    ]
    return json_response({"object": "list", "data": data})


async def openai_model(request: web.Request) -> web.Response:
    """``GET /openai/v1/models/{id}``: the OpenAI SDK's ``client.models.retrieve(id)``.  A
    model the key does not see in ``/openai/v1/models`` is 404 here too, as OpenAI answers."""
    principal = await _principal(request)
    name = request.match_info["id"]
    if name not in _visible(principal):
        raise NotFound(f"The model '{cut(name)}' does not exist or you do not have access to it")
    return json_response(
        {"id": name, "object": "model", "created": 1672534800, "owned_by": "dialproxy"}
    )


async def list_applications(request: web.Request) -> web.Response:
    """``GET /openai/applications``: the config's applications the key's roles admit."""
    principal = await _principal(request)
    grants = principal.access.grants
    data = [grants[n].model.application_listing() for n in _visible(principal, "application")]
    return json_response({"object": "list", "data": data})


async def get_application(request: web.Request) -> web.Response:
    """``GET /openai/applications/{id}``: as DIAL answers, 403 for a deployment the key may
    not see, 404 for a model (not an application) or an unknown name."""
    principal = await _principal(request)
    snapshot = request.app[STORE].snapshot
    name = request.match_info["id"]
    model = snapshot.models.get(name)
    if model is not None:
        if name not in _callable(principal):
            raise Forbidden(f"Forbidden deployment: {cut(name)}")
        if model.kind == "application":
            return json_response(model.application_listing())
        raise NotFound(f"Application is not found: {cut(name)}")
    raise NotFound(f"Unknown application: {cut(name)}")


_NAME_TYPES = ("model", "application", "toolset")


async def deployment_names(request: web.Request) -> web.Response:
    """``GET /v1/deployment-names[?type=model,application]``: aidial-client's
    ``deployments.list_names()``: ``[{"id", "object"}]`` of what the key may see (models,
    then applications; dialproxy has no toolsets to list)."""
    principal = await _principal(request)
    wanted = {t.strip() for t in request.query.get("type", "").split(",") if t.strip()}
    wanted = wanted or set(_NAME_TYPES)
    names: list[dict[str, str]] = []
    if "model" in wanted:
        names += [{"id": name, "object": "model"} for name in _visible(principal)]
    if "application" in wanted:
        names += [{"id": n, "object": "application"} for n in _visible(principal, "application")]
    return json_response(names)


async def user_info(request: web.Request) -> web.Response:
    principal = await _principal(request)
    return json_response({"project": principal.project, "roles": list(principal.key.roles)})


async def deployment_limits(request: web.Request) -> web.Response:
    """DIAL's ``/v1/deployments/{id}/limits``: the caller's project limits and use."""
    principal = await _principal(request)
    snapshot = request.app[STORE].snapshot
    deployment = request.match_info["id"]
    grant = plan.resolve(principal, snapshot, deployment)
    limiter = request.app[LIMITER]
    owner = "p:" + principal.project
    limit = grant.limit or Limit()
    schedule = snapshot.schedule
    now = time.time()
    body: dict[str, Any] = {}
    for kind, stats, windowed in (
        ("t", "TokenStats", limit.token_windows(schedule)),
        ("r", "RequestStats", limit.request_windows(schedule)),
    ):
        for state in await limiter.usage(owner, deployment, windowed, kind):
            window = state.window
            entry: dict[str, Any] = {
                "total": window.limit if window.limited else LONG_MAX,
                "used": state.used,
            }
            if window.calendar is not None:  # (DIAL: a calendar window says when it resets)
                entry["resetsAt"] = schedule.resets_at(window.calendar.period(now)[1])
            body[f"{window.name}{stats}"] = entry
    return json_response(body)


async def user_limits(request: web.Request) -> web.Response:
    """``GET /v1/user/limits``: every model and application the caller may call, with each
    limited window's limit, use and reset.  ``scope`` says whose limit it is: ``project``
    (the roles' limits, counted per project) or ``key`` (the key's own quota; for a shared
    key, its owner's).
    A shared key also gets its cap and ``utilized`` in ``sharedKey``; a project with a
    ``costLimit`` gets its cost windows (USD) in ``cost``."""
    return json_response(await limits_of(request.app, await _principal(request)))


async def health(request: web.Request) -> web.Response:
    """Always 200 and ``"ok"`` while a config is served: a refused reload leaves the last good
    config serving, so a load balancer must not pull the proxy; ``config.lastError`` says why
    the change was refused (until the next good reload clears it).  Redis is pinged (at
    most once a second) so that ``storage`` is true on an idle instance too."""
    await request.app[LIMITER].guard.ping()
    body = {
        "status": "ok",
        "pid": os.getpid(),  # which process answered (serve --workers N: one of N)
        "config": request.app[STORE].health(),
        "storage": request.app[LIMITER].health(),
    }
    if (ledger_ := request.app.get(LEDGER)) is not None:
        body["ledger"] = ledger_.health()
    return json_response(body)


async def _close_limiter(app: web.Application) -> None:
    await app[LIMITER].close()


def usage_ledger(settings: Settings, counters: Storage) -> ledger.Ledger:
    """The usage ledger: in Redis when the counters are (on their client), else in an
    SQLite file beside the state file."""
    store: ledger.LedgerStore
    if isinstance(counters, RedisCounters):
        store = ledger.RedisLedgerStore(counters.client, settings.ledger_retention)
    else:
        store = ledger.SqliteLedgerStore(ledger.usage_path(state_path(settings)))
    return ledger.Ledger(
        store, flush_every=settings.ledger_flush, retention_days=settings.ledger_retention
    )


def _ledger_tells(guard: StorageGuard) -> Callable[[BaseException], None]:
    """What a failed ledger write in the counters' Redis tells their health: Redis did not
    answer (not a write it refused), so ``/health`` says so though no request was limited."""

    def failed(cause: BaseException) -> None:
        if unanswered(cause):
            guard.state.failed(cause, "ledger")

    return failed


async def _run_ledger(app: web.Application) -> AsyncIterator[None]:
    """Writes every ``--ledger-flush`` seconds while the app runs; the rest when it stops
    (after the requests in flight and their usage records: see create_app)."""
    app[LEDGER].start()
    yield
    await held_done(app[BACKGROUND])  # (the streams still drained for their usage)
    await app[LEDGER].close()


def create_app(
    store: ConfigStore,
    *,
    settings: Settings | None = None,
    storage: Storage | None = None,
    client: aiohttp.ClientSession | None = None,
    tracing: Tracing | None = None,
    upstream_clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """Build the app.  Tests inject their own store, counter storage and client session,
    and the clock the upstreams' pauses go by (``upstream_clock``); ``tracing``: the
    process's (None: off; see :func:`dialproxy.tracing.from_env`)."""
    settings = settings or Settings()
    app = web.Application(
        client_max_size=settings.max_body,
        # Passed to each connection's aiohttp RequestHandler (they override the runner's).
        handler_args={
            # Bodies are decoded by read_json_body, after authentication, within the limit.
            "auto_decompress": False,
            # aiohttp closes a connection that has not sent complete request headers this
            # long after it opened or after its previous answer: the header timeout.
            "keepalive_timeout": settings.header_timeout,
            # What is read (and dropped) of a body left unread after the answer.
            "lingering_time": min(10.0, settings.body_timeout),
        },
    )
    app[STORE] = store
    app[SETTINGS] = settings
    app[LIMITER] = Limiter(
        storage if storage is not None else LocalCounters(), settings.storage_failure
    )
    # Upstream pauses are shared through the counter storage when it is shared (Redis).
    limiter = app[LIMITER]
    app[BALANCER] = Balancer(
        upstream_clock,
        shared=limiter.storage if isinstance(limiter.storage, RedisCounters) else None,
        shared_up=lambda: limiter.guard.healthy,
    )
    app[BACKGROUND] = set()
    app[DRAIN] = Drain()  # the open streams a shutdown ends (see dialproxy.web.drain)
    if settings.ledger == "on":  # (first: its last write follows the usage records' end)
        app[LEDGER] = usage_ledger(settings, limiter.storage)
        if isinstance(limiter.storage, RedisCounters):  # (one Redis, one health)
            app[LEDGER].on_failure = _ledger_tells(limiter.guard)
        app.cleanup_ctx.append(_run_ledger)

    idle = IdleWatch(settings.idle_timeout)  # (not aiohttp's sock_read: see its module)
    bodies = app[BODY_WATCH] = BodyWatch(settings.body_timeout)

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        own = client is None
        app[CLIENT] = client or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            auto_decompress=True,  # (bounded: decoded as read, see upstream.answer.read_answer)
            # no cookies kept: what one upstream answer sets must not go with another
            # client's request (nor grow without bound); and no jar to look in per request
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        async with idle.running(), bodies.running():
            yield
        await held_done(app[BACKGROUND])
        if own:
            await app[CLIENT].close()

    app.cleanup_ctx.append(client_ctx)
    app.on_cleanup.append(_close_limiter)  # after client_ctx has awaited the usage records

    async def start_limiter(_: web.Application) -> None:
        await limiter.guard.start()  # (Redis there or not: /health says so from the start)

    app.on_startup.append(start_limiter)
    sharedkeys.setup(app)  # the shared key store (opened and closed with the app), its routes
    measured = None
    if settings.metrics:
        drain = app[DRAIN]
        measured = app[METRICS] = metrics.Metrics(
            store,
            key_label=settings.metrics_key_label,
            streams=lambda: len(drain),
            storage=limiter.health,
        )
    if tracing is not None:

        async def close_tracing(app: web.Application) -> None:
            tracing.close()

        app.on_cleanup.append(close_tracing)
    services = Services(
        store=store,
        settings=settings,
        limiter=limiter,
        balancer=app[BALANCER],
        shared=app[SHARED],
        background=app[BACKGROUND],
        log=logs.request_log(),  # bound once, not a lazy proxy per call
        idle=idle,
        drain=app[DRAIN],
        ledger=app.get(LEDGER),
        metrics=measured,
        tracing=tracing,
    )

    async def bind_client(app: web.Application) -> None:
        services.client = app[CLIENT]

    app.on_startup.append(bind_client)  # (after the cleanup contexts have run their start)
    for api in APIS:  # (a path without {id}: the deployment is the body's "model")
        handler = functools.partial(proxy.handle, services=services, api=api)
        expect = functools.partial(proxy.expect_continue, services=services, api=api)
        for path in api.paths:
            app.router.add_post(path, handler, expect_handler=expect)
    responses.routes(app, services)  # the Responses API's follow-ups on its ids
    usage.routes(app)  # DIAL's usage endpoints, on the ledger
    admin.routes(app)  # the admin API (keys, reload, validate, schema)
    console.routes(app)  # the /console page and its read-only data endpoints
    for path, route in (
        ("/openai/models", list_models),
        ("/openai/models/{id}", get_model),
        ("/openai/deployments", list_deployments),
        ("/openai/deployments/{id}", get_deployment),
        ("/openai/v1/models", openai_models),
        ("/openai/v1/models/{id}", openai_model),
        ("/openai/applications", list_applications),
        ("/openai/applications/{id}", get_application),
        ("/v1/deployment-names", deployment_names),
        ("/v1/deployments/{id}/limits", deployment_limits),
        ("/v1/user/info", user_info),
        ("/v1/user/limits", user_limits),
        ("/health", health),
    ):
        app.router.add_get(path, guarded(route))
    if measured is not None and settings.metrics_port is None:
        app.router.add_get("/metrics", scrape_handler(app, measured))
    # DIAL's feature endpoints: forwarded to the model's features.*Endpoint (features.py)
    app.router.add_post("/v1/{id}/rate", functools.partial(features.handle, feature="rate"))
    for feature in ("tokenize", "truncate_prompt"):
        handler = functools.partial(features.handle, feature=feature)
        app.router.add_post(f"/v1/deployments/{{id}}/{feature}", handler)
    app.router.add_get(
        "/v1/deployments/{id}/configuration",
        functools.partial(features.handle, feature="configuration"),
    )
    # last: the config's DIAL routes (a path no route above has), else JSON 404s and 405s
    app.router.add_route("*", "/{tail:.*}", functools.partial(routes.handle, services=services))
    return app


def scrape_handler(app: web.Application, measured: metrics.Metrics) -> guard.Handler:
    """``GET /metrics`` of ``app``: open, or (``--metrics-auth key``) for a key of the
    config only (401 without one)."""
    require = None
    if app[SETTINGS].metrics_auth == "key":
        store = app[STORE]

        async def require(request: web.Request) -> None:
            # (no shared-key store: a shared or per-request key is no key of the config, and
            # a friend's shared key must not show every project's traffic)
            await authenticate(request.headers, store.snapshot, request.remote, None)

    return guarded(metrics.handler(measured, require))


def metrics_app(app: web.Application) -> web.Application:
    """The app of ``--metrics-port``: ``GET /metrics`` of ``app`` alone."""
    scrape = web.Application()
    scrape.router.add_get("/metrics", scrape_handler(app, app[METRICS]))
    return scrape
