"""DIAL's deployment feature endpoints: rate, tokenize, truncate_prompt, configuration.

Each is forwarded to the URL the model's ``features`` names (``rateEndpoint``,
``tokenizeEndpoint``, ``truncatePromptEndpoint``, ``configurationEndpoint``), as DIAL Core's
``DeploymentFeatureController`` does:

- the caller is authenticated and checked as for the deployment itself (404 unknown, 403 a
  deployment its roles or key may not call: :func:`dialproxy.web.plan.plan_for`);
- a model without the endpoint: ``rate`` and ``configuration`` answer 200 with an empty
  body, ``tokenize`` and ``truncate_prompt`` 403 ``Forbidden deployment``;
- the client's body goes as it came; the answer comes back with its status and body;
- these are not model requests: no request or token limit counts them, nothing is charged.

What dialproxy adds: the answer is read up to ``max_response`` bytes (over it: 502), a
redirect is not followed (502: the request goes to the configured URL and nowhere else), and
the whole call is bounded by the idle timeout.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from dialproxy.apis import openai
from dialproxy.auth import Principal, authenticate
from dialproxy.config.model import Model
from dialproxy.errors import Forbidden
from dialproxy.logs import request_log
from dialproxy.upstream.feature import call_feature
from dialproxy.web import guard
from dialproxy.web.appkeys import BACKGROUND, CLIENT, SETTINGS, SHARED, STORE
from dialproxy.web.body import read_raw_body
from dialproxy.web.finish import hold
from dialproxy.web.plan import plan_for
from dialproxy.wire.headers import UPSTREAM_KEY, adapter_headers, forwarded_headers

# The feature (as in the path) -> the model's ``features`` field with its URL, and whether a
# model without one answers 403 (else 200 with an empty body), as DIAL Core does.
FEATURES: dict[str, tuple[str, bool]] = {
    "rate": ("rateEndpoint", False),
    "tokenize": ("tokenizeEndpoint", True),
    "truncate_prompt": ("truncatePromptEndpoint", True),
    "configuration": ("configurationEndpoint", False),
}


def endpoint_headers(request: web.Request, principal: Principal, model: Model) -> dict[str, str]:
    """Every header a call to one of the model's endpoints carries: the client's headers an
    upstream gets (see :func:`dialproxy.wire.headers.forwarded_headers`) and, for a model
    behind a DIAL adapter (``endpoint`` set), its first upstream in ``X-UPSTREAM-ENDPOINT``
    and ``X-UPSTREAM-KEY`` (:func:`~dialproxy.wire.headers.adapter_headers`), as DIAL's
    feature controller sends them (the per-request key,
    which needs an await, is added by :func:`_call`)."""
    headers = forwarded_headers(
        request.headers, principal.secret, model, (), openai.FORWARDED_HEADERS
    )
    if not model.direct and model.upstreams:  # (no X-UPSTREAM-EXTRA-DATA: DIAL sends none)
        upstream = model.upstreams[0]
        headers.update(adapter_headers(upstream.endpoint, upstream.key))
    return headers


async def handle(request: web.Request, feature: str) -> web.StreamResponse:
    """``POST /v1/{id}/rate``, ``POST /v1/deployments/{id}/tokenize`` and
    ``/truncate_prompt``, ``GET /v1/deployments/{id}/configuration``."""
    app = request.app
    snapshot = app[STORE].snapshot
    started = time.perf_counter()
    deployment = request.match_info["id"]
    fields: dict[str, Any] = {"upstream": None, "error": None}
    principal: Principal | None = None
    status = 500
    try:
        principal = await authenticate(request.headers, snapshot, request.remote, app[SHARED])
        memo = app[STORE].memo_for(snapshot)
        model = plan_for(principal, snapshot, deployment, memo).model  # 404, 403
        field, required = FEATURES[feature]
        body = await read_raw_body(request, app[SETTINGS].max_body)  # (413, 408)
        url = model.features.get(field)
        if not isinstance(url, str) or not url:
            if required:
                raise Forbidden("Forbidden deployment")
            status = 200
            return web.Response(status=200)
        fields["upstream"] = "features." + field
        response = await _call(request, principal, model, url, body)
        status = response.status
        return response
    except Exception as e:
        response, message = guard.refusal(request, e)
        status = response.status
        if message is not None:
            fields["error"] = message
        return response
    finally:
        request_log().line(
            "request",
            {
                "method": request.method,
                "path": request.path,
                "status": status,
                "project": principal.key.project if principal else None,
                "key": principal.key.fingerprint if principal else None,
                "deployment": deployment,
                **fields,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


async def _call(
    request: web.Request, principal: Principal, model: Model, url: str, body: bytes
) -> web.Response:
    """The request to the feature endpoint planned (its headers, an adapter's per-request
    key), made (:func:`dialproxy.upstream.feature.call_feature`), its answer written."""
    app = request.app
    settings, client = app[SETTINGS], app[CLIENT]
    headers = endpoint_headers(request, principal, model)
    keys = app[SHARED].per_request
    key = None
    if not model.direct and keys is not None:  # an adapter: a per-request key, as for chat
        key = headers[UPSTREAM_KEY] = await keys.mint(principal)
    try:
        answered = await call_feature(client, settings, request.method, url, body, headers)
        return web.Response(status=answered.status, body=answered.body, headers=answered.headers)
    finally:
        if key is not None and keys is not None and (work := keys.end(key)) is not None:
            hold(app[BACKGROUND], work)
