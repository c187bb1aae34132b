"""DIAL ``applications`` served as deployments, end to end.

An application with an ``endpoint`` is called as DIAL calls it: its endpoint verbatim, a
per-request key in ``Api-Key`` (with which it can call the proxy back as the caller), no
``X-UPSTREAM-*`` headers (it has no upstreams).  ``userRoles`` admit callers, roles' limits
naming it are enforced and counted; it is listed by ``/openai/applications`` (and
``/v1/deployment-names``), not by the model listings, as DIAL lists it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dialproxy.auth import PER_REQUEST_KEY_PREFIX
from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source
from dialproxy.errors import ConfigError
from tests.conftest import (
    AiohttpServer,
    Backend,
    BackendFactory,
    ProxyFactory,
    clear_of_minute_boundary,
    new_key,
    utc_day_end,
)
from tests.test_serve import DEMO_KEY

ROOT = Path(__file__).resolve().parent.parent
KEY = new_key()
ADMIN = new_key()
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


class App:
    """A small application: records what it got; with ``"callback": true`` in the body it
    calls the proxy's ``/v1/user/info`` with the ``Api-Key`` it was given and answers it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.proxy_url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.got.append((request.path_qs, dict(request.headers), body))
        content = "hello from the app"
        if body.get("callback"):
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    self.proxy_url + "/v1/user/info",
                    headers={"Api-Key": request.headers["Api-Key"]},
                ) as back,
            ):
                content = json.dumps({"status": back.status, "info": await back.json()})
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    "usage": USAGE,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in (
            {"choices": [{"index": 0, "delta": {"content": content}}]},
            {"choices": [], "usage": USAGE},
        ):
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def app_server(aiohttp_server: AiohttpServer) -> tuple[App, str]:
    application = App()
    server_app = web.Application()
    server_app.router.add_post("/openai/deployments/{id}/chat/completions", application.handle)
    server = await aiohttp_server(server_app)
    return application, str(server.make_url(""))


def config(base: str, backend: Backend) -> dict[str, Any]:
    def endpoint(name: str) -> str:
        return f"{base}/openai/deployments/{name}/chat/completions"

    return {
        "models": {
            "echo": {"type": "chat", "upstreams": [{"endpoint": backend.url(), "key": "up"}]},
        },
        "applications": {
            "my-app": {
                "endpoint": endpoint("my-app") + "?api-version=1",
                "displayName": "My app",
                "description": "An application",
                "features": {"toolsSupported": True},
            },
            "admin-app": {"endpoint": endpoint("admin-app"), "userRoles": ["admin"]},
            "nobody-app": {"endpoint": endpoint("nobody-app"), "userRoles": []},
            "rich-app": {"applicationTypeSchemaId": "https://example.com/schemas/rag"},
        },
        "roles": {
            "user": {"limits": {"my-app": {"requestMinute": "2", "day": "1000"}}},
            "admin": {},
        },
        "keys": {
            KEY: {"project": "team-a", "role": "user"},
            ADMIN: {"project": "ops", "roles": ["admin"]},
        },
    }


@pytest.fixture
async def served(
    app_server: tuple[App, str], make_backend: BackendFactory, make_proxy: ProxyFactory
) -> tuple[App, str, Any]:
    application, base = app_server
    proxy = await make_proxy(config(base, await make_backend()))
    application.proxy_url = proxy.url().rstrip("/")
    return application, proxy.url().rstrip("/"), proxy


def headers(key: str = KEY) -> dict[str, str]:
    return {"Api-Key": key}


async def test_served_end_to_end_with_a_per_request_key(served: tuple[App, str, Any]) -> None:
    application, url, proxy = served
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/openai/deployments/my-app/chat/completions",
            json=CHAT | {"callback": True},
            headers=headers(),
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
        called_back = json.loads(answer["choices"][0]["message"]["content"])
        # the application called the proxy back with its key, as the caller
        assert called_back == {"status": 200, "info": {"project": "team-a", "roles": ["user"]}}
        path, got, body = application.got[0]
        assert path == "/openai/deployments/my-app/chat/completions?api-version=1"  # verbatim
        assert got["Api-Key"].startswith(PER_REQUEST_KEY_PREFIX) and KEY not in got.values()
        assert not [h for h in got if h.lower().startswith("x-upstream-")]
        assert "Authorization" not in got
        assert body["messages"] == CHAT["messages"]

        async with session.post(
            url + "/openai/deployments/my-app/chat/completions",
            json=CHAT | {"stream": True},
            headers=headers(),
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            text = (await resp.read()).decode()
        assert "hello from the app" in text and text.rstrip().endswith("data: [DONE]")
        # the key ended with its request: the application cannot use it afterwards
        async with session.get(
            url + "/v1/user/info", headers={"Api-Key": application.got[0][1]["Api-Key"]}
        ) as resp:
            assert resp.status == 401
        await proxy.settle()
        # the usage the application reported is counted (2 requests x 7 tokens)
        async with session.get(url + "/v1/deployments/my-app/limits", headers=headers()) as resp:
            stats = await resp.json()
        assert stats["dayTokenStats"] == {"total": 1000, "used": 14, "resetsAt": utc_day_end()}
        assert stats["minuteRequestStats"] == {"total": 2, "used": 2}


async def test_role_limit_naming_the_application(served: tuple[App, str, Any]) -> None:
    _, url, proxy = served
    await clear_of_minute_boundary()  # (the three requests in one minute bucket)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                url + "/openai/deployments/my-app/chat/completions", json=CHAT, headers=headers()
            ) as resp:
                assert resp.status == 200
        async with session.post(
            url + "/openai/deployments/my-app/chat/completions", json=CHAT, headers=headers()
        ) as resp:
            assert resp.status == 429
        await proxy.settle()
        async with session.get(url + "/v1/user/limits", headers=headers()) as resp:
            limits = (await resp.json())["models"]
        windows = {(w["type"], w["window"]): w for w in limits["my-app"]["limits"]}
        assert windows[("requests", "minute")]["used"] == 2
        assert windows[("tokens", "day")]["used"] == 14
        assert "admin-app" not in limits and "nobody-app" not in limits


async def test_user_roles_admit_callers(served: tuple[App, str, Any]) -> None:
    application, url, _ = served
    async with aiohttp.ClientSession() as session:
        for app_name, key, status in (
            ("admin-app", KEY, 403),  # no role in common
            ("nobody-app", KEY, 403),  # `[]`: nobody
            ("nobody-app", ADMIN, 403),
            ("admin-app", ADMIN, 200),
            ("my-app", ADMIN, 200),  # no userRoles: everyone
            ("missing", KEY, 404),
        ):
            async with session.post(
                url + f"/openai/deployments/{app_name}/chat/completions",
                json=CHAT,
                headers=headers(key),
            ) as resp:
                assert resp.status == status, (app_name, status)
                if status == 403:
                    assert (await resp.json())["error"]["message"] == (
                        f"Forbidden deployment: {app_name}"
                    )
            async with session.get(
                url + f"/openai/applications/{app_name}", headers=headers(key)
            ) as resp:
                assert resp.status == status
    assert [p for p, _, _ in application.got] == [
        "/openai/deployments/admin-app/chat/completions",
        "/openai/deployments/my-app/chat/completions?api-version=1",
    ]


async def test_listings(served: tuple[App, str, Any]) -> None:
    _, url, _ = served
    async with aiohttp.ClientSession() as session:

        async def get(path: str, key: str = KEY) -> Any:
            async with session.get(url + path, headers=headers(key)) as resp:
                assert resp.status == 200, path
                return await resp.json()

        apps = (await get("/openai/applications"))["data"]
        assert [a["id"] for a in apps] == ["my-app", "rich-app"]
        mine = apps[0]
        assert (mine["object"], mine["display_name"], mine["description"]) == (
            "application",
            "My app",
            "An application",
        )
        assert mine["features"]["tools"] is True and "endpoint" not in json.dumps(mine)
        admin_apps = (await get("/openai/applications", ADMIN))["data"]
        assert [a["id"] for a in admin_apps] == ["my-app", "admin-app", "rich-app"]
        # DIAL lists models only in /openai/models and /openai/deployments
        for path in ("/openai/models", "/openai/deployments", "/openai/v1/models"):
            assert [m["id"] for m in (await get(path, ADMIN))["data"]] == ["echo"], path
        names = await get("/v1/deployment-names", ADMIN)
        assert names == [
            {"id": "echo", "object": "model"},
            {"id": "my-app", "object": "application"},
            {"id": "admin-app", "object": "application"},
            {"id": "rich-app", "object": "application"},
        ]
        async with session.get(url + "/openai/deployments/my-app", headers=headers()) as resp:
            assert resp.status == 404
        async with session.get(url + "/openai/applications/echo", headers=headers()) as resp:
            assert resp.status == 404  # a model, not an application


async def test_an_application_without_endpoint_is_listed_and_answers_503(
    served: tuple[App, str, Any],
) -> None:
    _, url, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/openai/deployments/rich-app/chat/completions", json=CHAT, headers=headers()
        ) as resp:
            assert resp.status == 503
            message = (await resp.json())["error"]["message"]
        assert message.startswith("Application rich-app has no endpoint dialproxy can call")
        # an application serves chat completions only
        async with session.post(
            url + "/openai/deployments/my-app/embeddings", json={"input": "x"}, headers=headers()
        ) as resp:
            assert resp.status == 503


def problems_of(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    try:
        snapshot = build_snapshot([Source("c.json", json.dumps(doc).encode())], {})
    except ConfigError as error:
        return [(p.path, p.severity, p.message) for p in error.problems]
    return [(p.path, p.severity, p.message) for p in snapshot.warnings]


def test_bad_applications_are_located_by_json_path() -> None:
    base: dict[str, Any] = {"keys": {KEY: {"project": "p", "role": "r"}}, "roles": {"r": {}}}
    found = problems_of(
        base
        | {
            "models": {"dup": {"type": "chat", "endpoint": "http://h/x"}},
            "applications": {
                "dup": {"endpoint": "http://h/y"},
                "bad-url": {"endpoint": "not a url"},
                "bad-retry": {"endpoint": "http://h/z", "maxRetryAttempts": 0},
                "bad-roles": {"endpoint": "http://h/z", "userRoles": "admin"},
            },
        }
    )
    paths = {path: (severity, message) for path, severity, message in found}
    assert paths["$.applications.dup"][0] == "error"
    assert "$.models.dup" in paths["$.applications.dup"][1]  # both paths
    assert paths["$.applications.bad-url.endpoint"][0] == "error"
    assert paths["$.applications.bad-retry.maxRetryAttempts"][0] == "error"
    assert paths["$.applications.bad-roles.userRoles"][0] == "error"
    # accepted DIAL fields, and an application dialproxy cannot serve: a warning only
    warnings = problems_of(
        base
        | {
            "applications": {
                "rich": {
                    "applicationTypeSchemaId": "s",
                    "applicationProperties": {"a": 1},
                    "mcp": {"endpoint": "http://h/mcp"},
                },
                "resp": {
                    "interfaces": {
                        "openaiChatCompletions": {"base_url": "http://h"},
                        "openaiResponses": {"base_url": "http://h"},
                    },
                },
            }
        }
    )
    assert [(p, s) for p, s, _ in warnings] == [
        ("$.applications.rich", "warning"),
        ("$.applications.resp.interfaces.openaiResponses", "warning"),
    ]


def test_a_key_may_name_an_application() -> None:
    doc = {
        "applications": {"app": {"endpoint": "http://h/app"}},
        "keys": {
            KEY: {"project": "p", "role": "r", "models": ["app"], "limits": {"app": {"day": 5}}}
        },
        "roles": {"r": {}},
    }
    assert problems_of(doc) == []


async def test_the_demo_config_serves_its_application(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """`make run`'s config: it validates, and its `echo-app` answers through the demo backend."""
    port = backend.url().split(":")[2].split("/")[0]
    text = (ROOT / "aidial.config.json").read_text().replace("8081", port)
    doc = json.loads(text)
    snapshot = build_snapshot([Source("aidial.config.json", text.encode())], {})
    assert snapshot.models["echo-app"].kind == "application" and snapshot.warnings == ()
    proxy = await make_proxy(doc)
    demo_key = next(iter(doc["keys"]))
    assert demo_key.startswith("sha256:")  # the secret is in the README
    secret = DEMO_KEY
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url("/openai/deployments/echo-app/chat/completions"),
            json={"messages": [{"role": "user", "content": "Hello, app"}]},
            headers={"Api-Key": secret},
        ) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    assert answer["choices"][0]["message"]["content"] == "Echo: Hello, app"
    (received,) = backend.control.requests
    assert received.path == "/openai/deployments/echo-app/chat/completions"
    assert received.headers["Api-Key"].startswith(PER_REQUEST_KEY_PREFIX)
