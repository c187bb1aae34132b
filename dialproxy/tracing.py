"""OpenTelemetry traces, off unless the standard ``OTEL_*`` variables ask for them.

On (:func:`from_env` returns a :class:`Tracing`) when ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp``, ``console``) or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and ``OTEL_SDK_DISABLED`` is not ``true``.  The
SDK reads the rest itself: the exporter's headers, timeout and protocol settings
(``OTEL_EXPORTER_OTLP_*``, HTTP/protobuf), the sampler (``OTEL_TRACES_SAMPLER``), the batch
processor's (``OTEL_BSP_*``), the resource (``OTEL_SERVICE_NAME``, default ``dialproxy``;
``OTEL_RESOURCE_ATTRIBUTES``).

Decided once when the process starts: off, the SDK is never imported and the request path
tests one attribute for None at each of its three points (the request's start, each
upstream attempt, the request's end).

A request: a server span, child of the client's ``traceparent`` (W3C trace context, as
DIAL accepts it), named by its route; attributes: the deployment, project, key
fingerprint, status and tokens.  Each upstream attempt: a client span under it, whose
context goes to the upstream in ``traceparent`` (as DIAL sends it).  With tracing off, a
client's ``traceparent`` still goes to the upstream as it came (a forwarded header).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

log = structlog.get_logger("dialproxy.tracing")

_EXPORTERS = ("otlp", "console")


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return bool(exporters or endpoint)


def from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    """The process's tracing, or None (off) when the ``OTEL_*`` variables do not ask for it."""
    env = os.environ if env is None else env
    if not wanted(env):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(
        resource=Resource.create({} if named else {"service.name": "dialproxy"})
    )
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    for name in [n for n in names if n] or ["otlp"]:
        exporter: SpanExporter
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("otlp_protocol_unsupported", protocol=protocol, using="http/protobuf")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            log.warning("traces_exporter_unknown", exporter=name, known=list(_EXPORTERS))
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing_on", exporters=names)
    return Tracing(provider)


class Tracing:
    """Spans of the requests, by one tracer provider (the tests': an in-memory exporter)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("dialproxy")
        self._propagator = TraceContextTextMapPropagator()  # traceparent, tracestate
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)

    def request(self, request: web.Request, api: str) -> Span:
        """The server span of a proxied request, child of the client's ``traceparent``."""
        parent = self._propagator.extract(request.headers)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else api
        return self._tracer.start_span(
            f"{request.method} {route}",
            context=parent,
            kind=self._server,
            attributes={
                "http.request.method": request.method,
                "http.route": route,
                "dialproxy.api": api,
            },
        )

    def attempt(
        self, parent: Span, deployment: str, upstream: str, headers: MutableMapping[str, str]
    ) -> Span:
        """A client span for one upstream attempt; its context written into ``headers``."""
        trace = self._trace
        span = self._tracer.start_span(
            f"POST {upstream}",
            context=trace.set_span_in_context(parent),
            kind=self._client,
            attributes={
                "http.request.method": "POST",
                "dialproxy.deployment": deployment,
                "dialproxy.upstream": upstream,
            },
        )
        self._propagator.inject(headers, context=trace.set_span_in_context(span))
        return span

    def attempt_end(self, span: Span, status: int | None, failure: str | None = None) -> None:
        """An attempt's span ended: its status (None: no answer), why it failed if it did."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if failure is not None:
            span.set_attribute("error.type", failure)
            span.set_status(self._error)
        span.end()

    def request_end(self, span: Span, attributes: dict[str, Any], status: int) -> None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        span.set_attribute("http.response.status_code", status)
        if status >= 500 or status == 0:
            span.set_status(self._error)
        span.end()

    def close(self) -> None:
        """Export what is batched and stop (the app's cleanup)."""
        self.provider.shutdown()
