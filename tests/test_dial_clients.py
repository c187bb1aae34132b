"""What DIAL's own clients call: EPAM's ``aidial-client`` and the OpenAI SDK's
``models.retrieve``, against the real app, and DIAL's feature endpoints (rate, tokenize,
truncate_prompt, configuration) forwarded to a real backend that records what it got."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from aidial_client import AsyncDial, Dial, DialException
from aiohttp import web
from multidict import CIMultiDict

from dialproxy.settings import Settings
from tests.conftest import (
    AiohttpServer,
    Backend,
    Proxy,
    ProxyFactory,
    chat_model,
    clear_of_minute_boundary,
    new_key,
)

KEY = new_key()
ADMIN_KEY = new_key()
UPSTREAM_KEY = new_key("upstream-secret-")
FEATURE_SECRET = new_key("feature-secret-")  # in a feature URL's query: never listed

SCHEMA = {"type": "object", "properties": {"temperature": {"type": "number"}}}


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FeatureBackend:
    """A DIAL adapter's feature endpoints: each records its request and answers."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)

    def at(self, path: str) -> str:
        return self.url + path


async def start_feature_backend(aiohttp_server: AiohttpServer) -> FeatureBackend:
    backend = FeatureBackend()

    async def record(request: web.Request) -> web.Response:
        backend.seen.append(
            Seen(
                request.method,
                request.path,
                request.query_string,
                CIMultiDict(request.headers),
                await request.read(),
            )
        )
        name = request.match_info["name"]
        if name == "tokenize":
            return web.json_response({"outputs": [{"status": "success", "token_count": 3}]})
        if name == "truncate_prompt":
            return web.json_response({"outputs": [{"status": "error", "error": "too long"}]})
        if name == "configuration":
            return web.json_response(SCHEMA, headers={"X-Request-Id": "cfg-1"})
        if name == "rate":
            return web.Response(status=200)
        if name == "redirect":
            raise web.HTTPFound(backend.at("/target/tokenize"))
        if name == "big":
            return web.Response(body=b"x" * 5000, content_type="application/json")
        return web.json_response({"error": {"message": "teapot"}}, status=418)

    app = web.Application()
    app.router.add_route("*", "/{prefix}/{name}", record)
    server = await aiohttp_server(app)
    backend.url = str(server.make_url(""))
    return backend


def feature_urls(features: FeatureBackend, prefix: str) -> dict[str, str]:
    return {
        "rateEndpoint": features.at(f"/{prefix}/rate"),
        "tokenizeEndpoint": features.at(f"/{prefix}/tokenize"),
        "truncatePromptEndpoint": features.at(f"/{prefix}/truncate_prompt"),
        "configurationEndpoint": features.at(f"/{prefix}/configuration?t={FEATURE_SECRET}"),
    }


def config(backend: Backend, features: FeatureBackend) -> dict[str, Any]:
    return {
        "models": {
            "echo": chat_model(
                backend,
                displayName="Echo",
                features=feature_urls(features, "echo") | {"toolsSupported": True},
            ),
            "adapter": {
                "type": "chat",
                "endpoint": features.at("/adapter/chat"),
                "upstreams": [
                    {"endpoint": "https://provider.example/v1", "key": UPSTREAM_KEY},
                    {"endpoint": "https://provider.example/v2", "key": "second"},
                ],
                "features": feature_urls(features, "adapter"),
            },
            "plain": chat_model(backend),
            "admins-only": chat_model(
                backend, userRoles=["admin"], features=feature_urls(features, "admins")
            ),
            "odd": chat_model(
                backend,
                features={
                    "tokenizeEndpoint": features.at("/odd/redirect"),
                    "truncatePromptEndpoint": features.at("/odd/big"),
                    "rateEndpoint": features.at("/odd/teapot"),
                    "configurationEndpoint": "http://127.0.0.1:9/configuration",
                },
            ),
        },
        "applications": {
            "app-all": {
                "endpoint": features.at("/app/chat"),
                "displayName": "App for all",
                "features": {"rateEndpoint": features.at("/app/rate")},
            },
            "app-admin": {"endpoint": features.at("/app/chat"), "userRoles": ["admin"]},
            "app-nobody": {"endpoint": features.at("/app/chat"), "userRoles": []},
        },
        "roles": {
            "user": {"limits": {"echo": {"requestMinute": 1}}},
            "admin": {"limits": {}},
        },
        "keys": {
            KEY: {"project": "team-a", "role": "user"},
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "user"]},
        },
    }


@pytest.fixture
async def features(aiohttp_server: AiohttpServer) -> FeatureBackend:
    return await start_feature_backend(aiohttp_server)


@pytest.fixture
async def proxy(backend: Backend, features: FeatureBackend, make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(
        config(backend, features),
        settings=Settings(max_response=1000),
    )


USER_MODELS = {"echo", "adapter", "plain", "odd"}


async def test_aidial_client_async(proxy: Proxy) -> None:
    """Every call of aidial-client's that concerns deployments, models and applications."""
    async with AsyncDial(base_url=proxy.url(), api_key=KEY, max_retries=0) as dial:
        reply = await dial.chat.completions.create(
            deployment_name="echo", messages=[{"role": "user", "content": "hi there"}], stream=False
        )
        assert reply.choices[0].message.content == "Echo: hi there"
        assert {d.id for d in await dial.deployments.list()} == USER_MODELS
        echo = await dial.deployments.get("echo")
        assert echo.model == "echo" and echo.features is not None
        assert echo.features.rate is True and echo.features.tools is True
        names = await dial.deployments.list_names()
        assert {(n.id, n.object) for n in names} == {(m, "model") for m in USER_MODELS} | {
            ("app-all", "application")
        }
        apps_only = await dial.deployments.list_names(types=["application"])
        assert [(n.id, n.object) for n in apps_only] == [("app-all", "application")]
        assert {n.id for n in await dial.deployments.list_names(types=["model"])} == USER_MODELS
        assert await dial.deployments.get_configuration_schema("echo") == SCHEMA
        apps = await dial.application.list()
        assert [(a.id, a.application, a.display_name) for a in apps] == [
            ("app-all", "app-all", "App for all")
        ]
        app = await dial.application.get("app-all")
        assert app.object == "application" and app.features is not None
        assert app.features.rate is True and app.features.tokenize is False
        info = await dial.model.get("echo")
        assert info.id == "echo" and info.display_name == "Echo"
        assert info.capabilities is not None and info.capabilities.chat_completion is True
        assert (await dial.user.info()).roles == ["user"]
        # what the key's roles may not call: 403 as DIAL answers, and absent from the lists
        for call in (
            dial.deployments.get("admins-only"),
            dial.model.get("admins-only"),
            dial.application.get("app-admin"),
            dial.deployments.get_configuration_schema("admins-only"),
        ):
            with pytest.raises(DialException) as refused:
                await call
            assert refused.value.status_code == 403
        with pytest.raises(DialException) as unknown:
            await dial.application.get("echo")  # a model, not an application
        assert unknown.value.status_code == 404

    async with AsyncDial(base_url=proxy.url(), api_key=ADMIN_KEY, max_retries=0) as dial:
        assert "admins-only" in {d.id for d in await dial.deployments.list()}
        assert {a.id for a in await dial.application.list()} == {"app-all", "app-admin"}
        assert (await dial.application.get("app-admin")).id == "app-admin"
        with pytest.raises(DialException) as nobody:
            await dial.application.get("app-nobody")  # userRoles [] admits no one
        assert nobody.value.status_code == 403


async def test_aidial_client_sync(proxy: Proxy) -> None:
    def calls() -> tuple[list[str], dict[str, Any], list[str]]:
        with Dial(base_url=proxy.url(), api_key=KEY, max_retries=0) as dial:
            return (
                [n.id for n in dial.deployments.list_names(types=["application"])],
                dial.deployments.get_configuration_schema("adapter"),
                [a.id for a in dial.application.list()],
            )

    names, schema, apps = await asyncio.to_thread(calls)
    assert names == ["app-all"] and schema == SCHEMA and apps == ["app-all"]


async def test_openai_sdk_models_retrieve(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/openai/v1"), api_key=KEY, max_retries=0
    ) as client:
        model = await client.models.retrieve("echo")
        assert model.id == "echo" and model.object == "model"
        for hidden in ("admins-only", "nope"):  # not callable by this key, or unknown
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve(hidden)
    async with openai.AsyncOpenAI(
        base_url=proxy.url("/openai/v1"), api_key=ADMIN_KEY, max_retries=0
    ) as client:
        assert (await client.models.retrieve("admins-only")).id == "admins-only"


async def call(
    proxy: Proxy, method: str, path: str, body: bytes = b"", key: str | None = KEY
) -> tuple[int, bytes, aiohttp.ClientResponse]:
    headers = {"X-Request-Id": "req-7", "Content-Type": "application/json"}
    if key is not None:
        headers["Api-Key"] = key
    async with aiohttp.ClientSession() as s:
        resp = await s.request(method, proxy.url(path), data=body, headers=headers)
        return resp.status, await resp.read(), resp


FEATURE_CALLS = (
    ("POST", "/v1/{}/rate", "rate", b'{"responseId":"r1","rate":true}'),
    ("POST", "/v1/deployments/{}/tokenize", "tokenize", b'{"inputs":[{"type":"string"}]}'),
    ("POST", "/v1/deployments/{}/truncate_prompt", "truncate_prompt", b'{"inputs":[]}'),
    ("GET", "/v1/deployments/{}/configuration", "configuration", b""),
)


async def test_feature_endpoints_forwarded(proxy: Proxy, features: FeatureBackend) -> None:
    """Each is forwarded to the model's endpoint: the client's body, method and request id,
    never its key; an adapter model's first upstream in X-UPSTREAM-*; the answer relayed."""
    answers = {
        "rate": b"",
        "tokenize": b'{"outputs": [{"status": "success", "token_count": 3}]}',
        "truncate_prompt": b'{"outputs": [{"status": "error", "error": "too long"}]}',
        "configuration": json.dumps(SCHEMA).encode(),
    }
    for model in ("echo", "adapter"):
        for method, path, name, body in FEATURE_CALLS:
            features.seen.clear()
            status, answer, resp = await call(proxy, method, path.format(model), body)
            assert status == 200, answer
            assert answer == answers[name]
            (seen,) = features.seen
            assert (seen.method, seen.path, seen.body) == (method, f"/{model}/{name}", body)
            assert seen.headers["X-Request-Id"] == "req-7"
            assert KEY not in str(list(seen.headers.items()))  # the caller's key stays here
            if model == "adapter":
                assert seen.headers["X-UPSTREAM-ENDPOINT"] == "https://provider.example/v1"
                assert seen.headers["X-UPSTREAM-KEY"] == UPSTREAM_KEY
                assert seen.headers["Api-Key"].startswith("dprk_")  # a per-request key
            else:  # a direct model's upstream key goes to its upstream only
                assert "X-UPSTREAM-KEY" not in seen.headers
                assert "Api-Key" not in seen.headers
                assert UPSTREAM_KEY not in str(list(seen.headers.items()))
            if name == "configuration":
                assert seen.query == f"t={FEATURE_SECRET}"
                assert resp.headers["X-Request-Id"] == "cfg-1"
                assert resp.content_type == "application/json"


async def test_no_feature_endpoint_answers_as_dial(proxy: Proxy, features: FeatureBackend) -> None:
    """A model without the endpoint: rate and configuration 200 with no body, tokenize and
    truncate_prompt 403 ``Forbidden deployment`` (DIAL's DeploymentFeatureController)."""
    for method, path, name, body in FEATURE_CALLS:
        status, answer, _ = await call(proxy, method, path.format("plain"), body)
        if name in ("rate", "configuration"):
            assert (status, answer) == (200, b"")
        else:
            assert status == 403
            assert json.loads(answer)["error"]["message"] == "Forbidden deployment"
    assert features.seen == []


async def test_feature_endpoints_follow_the_deployment_rules(
    proxy: Proxy, features: FeatureBackend
) -> None:
    for method, path, _, body in FEATURE_CALLS:
        status, answer, _ = await call(proxy, method, path.format("admins-only"), body)
        assert status == 403
        assert json.loads(answer)["error"]["message"] == "Forbidden deployment: admins-only"
        status, answer, _ = await call(proxy, method, path.format("missing"), body)
        assert status == 404
        assert json.loads(answer)["error"]["message"] == "Unknown application: missing"
        status, _, _ = await call(proxy, method, path.format("echo"), body, key=None)
        assert status == 401
        status, _, _ = await call(proxy, method, path.format("echo"), body, key="wrong")
        assert status == 401
    assert features.seen == []
    status, _, _ = await call(proxy, "POST", "/v1/admins-only/rate", b"{}", key=ADMIN_KEY)
    assert status == 200 and features.seen[0].path == "/admins/rate"


async def test_feature_calls_are_not_model_requests(proxy: Proxy) -> None:
    """``echo`` allows the user's role one request a minute: feature calls do not count."""
    for _ in range(3):
        for method, path, _, body in FEATURE_CALLS:
            status, _, _ = await call(proxy, method, path.format("echo"), body)
            assert status == 200
    chat = json.dumps({"messages": [{"role": "user", "content": "a"}]}).encode()
    path = "/openai/deployments/echo/chat/completions"
    await clear_of_minute_boundary()  # (both requests in one minute bucket)
    assert (await call(proxy, "POST", path, chat))[0] == 200
    assert (await call(proxy, "POST", path, chat))[0] == 429


async def test_feature_endpoint_redirect_cap_and_errors(
    proxy: Proxy, features: FeatureBackend
) -> None:
    # a redirect is not followed: 502, and its target is never asked
    status, answer, _ = await call(proxy, "POST", "/v1/deployments/odd/tokenize", b"{}")
    assert status == 502
    assert [s.path for s in features.seen] == ["/odd/redirect"]
    # an answer over max_response (1000 bytes here): 502
    status, answer, _ = await call(proxy, "POST", "/v1/deployments/odd/truncate_prompt", b"{}")
    assert status == 502 and b"limit" in answer
    # the endpoint's own error status comes back as it is
    status, answer, _ = await call(proxy, "POST", "/v1/odd/rate", b"{}")
    assert status == 418 and json.loads(answer) == {"error": {"message": "teapot"}}
    # nothing listens there: 502
    status, answer, _ = await call(proxy, "GET", "/v1/deployments/odd/configuration")
    assert status == 502


async def test_listings_show_features_not_their_urls(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/openai/models", "/openai/deployments", "/openai/applications"):
            r = await s.get(proxy.url(path), headers={"Api-Key": ADMIN_KEY})
            text = await r.text()
            assert r.status == 200
            assert "Endpoint" not in text and FEATURE_SECRET not in text
            assert "/echo/" not in text and "/app/" not in text
        r = await s.get(proxy.url("/openai/models/plain"), headers={"Api-Key": KEY})
        assert (await r.json())["features"] == {
            "rate": False,
            "tokenize": False,
            "truncate_prompt": False,
            "configuration": False,
            "system_prompt": True,
            "tools": False,
            "seed": False,
            "url_attachments": False,
            "folder_attachments": False,
            "allow_resume": True,
            "accessible_by_per_request_key": True,
        }
