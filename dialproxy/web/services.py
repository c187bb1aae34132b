"""What a proxied request uses of its app (:class:`Services`): gathered once when the app is
made, handed to every handler of the request path (:mod:`dialproxy.web.proxy`,
:mod:`dialproxy.web.responses`, :mod:`dialproxy.web.routes`) and to the end of a request
(:mod:`dialproxy.web.finish`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from dialproxy.config.store import ConfigStore
from dialproxy.counting.limiter import Limiter
from dialproxy.ledger import Ledger
from dialproxy.logs import RequestLog
from dialproxy.metrics import Metrics
from dialproxy.perrequest import PerRequestKeys
from dialproxy.settings import Settings
from dialproxy.sharedkeys.service import SharedKeys
from dialproxy.tracing import Tracing
from dialproxy.upstream.balancer import Balancer
from dialproxy.upstream.idle import IdleWatch
from dialproxy.web.charged import Charged
from dialproxy.web.drain import Drain


@dataclass(slots=True)
class Services:
    """What a proxied request uses of its app, gathered once and handed to
    :func:`dialproxy.web.proxy.handle` with the route (an ``app[KEY]`` lookup is a Python
    call: there were nine a request).  The upstream calls take it as their
    :class:`~dialproxy.upstream.answer.Context`."""

    store: ConfigStore
    settings: Settings
    limiter: Limiter
    balancer: Balancer
    shared: SharedKeys[PerRequestKeys]
    background: set[asyncio.Task[None]]
    log: RequestLog
    idle: IdleWatch  # the upstream idle timeout while an answer's body is read
    drain: Drain  # the streams open now: ended with an error event when a shutdown's grace ends
    client: aiohttp.ClientSession | None = None  # set when the app starts
    ledger: Ledger | None = None  # the usage ledger (None: --ledger off)
    metrics: Metrics | None = None  # None: --no-metrics
    tracing: Tracing | None = None  # None: off (no OTEL_* variables ask for traces)
    # the background responses charged (by the stream that made one, or a follow-up)
    charged: Charged = field(default_factory=Charged)
