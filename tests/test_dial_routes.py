"""DIAL's ``routes`` served as DIAL Core serves them (its RouteController, routes.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Problem
from dialproxy.config.parse import read_sources
from dialproxy.errors import ConfigError
from dialproxy.settings import Settings
from dialproxy.web.appkeys import DRAIN, SHARED
from dialproxy.web.routes import select
from tests.conftest import ProxyFactory, new_key

USER = new_key()
ADMIN = new_key()
ROUTE_KEY = new_key("sk-route-")
CONFIGS = Path(__file__).parent / "dial_configs"


@dataclass
class Seen:
    method: str
    path: str  # with its query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A small upstream that records what it got and answers as told."""

    seen: list[Seen] = field(default_factory=list)
    status: int = 201  # a plain answer's status (a 503 makes it a failing upstream)
    server: TestServer | None = None
    callback: str | None = None  # /callback: GET this URL with the Api-Key received

    def url(self, path: str = "") -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if request.path.endswith("/callback") and self.callback is not None:
            headers = {"Api-Key": request.headers.get("Api-Key", "")}
            async with (
                aiohttp.ClientSession() as s,
                s.get(self.callback, headers=headers) as resp,
            ):
                return web.Response(status=resp.status, body=await resp.read())
        if request.path.endswith("/endless"):
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            await stream.write(b"data: first\n\n")
            await asyncio.sleep(3600)
        if request.path.endswith("/broken"):  # two chunks, then the connection dropped
            kind = request.query.get("type", "text/event-stream")
            stream = web.StreamResponse(headers={"Content-Type": kind})
            await stream.prepare(request)
            await stream.write(b"data: 0\n\n" if kind == "text/event-stream" else b'{"n":0}\n')
            if "mid" in request.query:  # cut inside the next event
                await stream.write(b'data: {"par')
            await stream.drain()
            assert request.transport is not None
            request.transport.close()
            return stream
        if request.path.endswith("/stream"):
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            for i in range(3):
                await stream.write(f"data: {i}\n\n".encode())
            await stream.write_eof()
            return stream
        return web.Response(
            status=self.status,
            body=b"echo:" + body,
            content_type="application/octet-stream",
            headers={"X-Request-Id": "rid-1", "Set-Cookie": "s=1", "X-Internal": "no"},
        )


async def recorder(aiohttp_server: AiohttpServer) -> Recorder:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.server = await aiohttp_server(app)
    return rec


def config(routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "routes": routes,
        "models": {"m": {"endpoint": "http://127.0.0.1:9/unused"}},
        "roles": {"user": {}, "admin": {}},
        "keys": {
            USER: {"project": "team-a", "role": "user"},
            ADMIN: {"project": "team-b", "role": "admin"},
        },
    } | extra


async def call(
    url: str, method: str = "GET", key: str | None = USER, **kwargs: Any
) -> tuple[int, bytes, Any]:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Api-Key"] = key
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers, **kwargs) as resp,
    ):
        return resp.status, await resp.read(), resp.headers


async def test_a_route_end_to_end(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Method, body (any type), the path rewritten, a per-request key and never the
    client's, the answer relayed through the header allow-list, a stream relayed."""
    rec = await recorder(aiohttp_server)
    proxy = await make_proxy(
        config(
            {
                "files": {
                    "paths": ["/v1/files(/.*)?"],
                    "methods": ["PUT", "GET"],
                    "rewritePath": True,
                    "upstreams": [{"endpoint": rec.url("/base/ignored?dropped=1")}],
                },
                "fixed": {
                    "paths": ["/v1/fixed"],
                    "upstreams": [{"endpoint": rec.url("/there?a=1"), "key": ROUTE_KEY}],
                },
            }
        ),
        settings=Settings(config_paths=(str(tmp_path / "aidial.config.json"),), max_body=4096),
    )
    data = b"\x00\x01 binary \xff"
    with capture_logs() as logs:
        status, body, headers = await call(
            proxy.url("/v1/files/a/b?x=1&y=%20"),
            "PUT",
            data=data,
            headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {USER}"},
        )
    assert status == 201 and body == b"echo:" + data
    assert headers["X-Request-Id"] == "rid-1" and headers["X-UPSTREAM-ATTEMPTS"] == "1"
    assert "Set-Cookie" not in headers and "X-Internal" not in headers
    seen = rec.seen[-1]
    assert (seen.method, seen.path, seen.body) == ("PUT", "/v1/files/a/b?x=1&y=%20", data)
    assert seen.headers["Content-Type"] == "application/octet-stream"
    assert seen.headers["Api-Key"] not in (USER, ADMIN)  # a per-request key
    assert all(USER not in v for v in seen.headers.values())  # nor in Authorization
    assert len(proxy.app[SHARED].per_request or ()) == 0  # released at the end
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["route"] == "files" and line["status"] == 201 and line["attempts"] == 1
    assert line["upstream"] == "upstreams[0]" and line["project"] == "team-a"

    # rewritePath false: the endpoint as written; the upstream's own key in Api-Key
    status, body, _ = await call(proxy.url("/v1/fixed?lost=1"), "POST", json={"a": 1})
    assert status == 201 and body == b'echo:{"a": 1}'
    assert rec.seen[-1].path == "/there?a=1"
    assert rec.seen[-1].headers["Api-Key"] == ROUTE_KEY

    # the per-request key acts for the caller while the request lasts (DIAL's calls back)
    rec.callback = proxy.url("/v1/user/info")
    status, body, _ = await call(proxy.url("/v1/files/callback"))
    assert status == 200 and json.loads(body)["project"] == "team-a"

    # a body over max_body: 413, as for the proxied endpoints
    status, body, _ = await call(proxy.url("/v1/files/big"), "PUT", data=b"x" * 5000)
    assert status == 413

    # a stream, relayed as it comes
    status, body, headers = await call(proxy.url("/v1/files/stream"))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert rec.seen[-1].method == "GET"
    # no body, no type: none is made up for it (aiohttp's octet-stream for an empty body)
    assert "Content-Type" not in rec.seen[-1].headers
    for method in ("POST", "PUT"):  # (the client sends none either)
        await call(proxy.url("/v1/fixed"), method, skip_auto_headers=["Content-Type"])
        assert rec.seen[-1].method == method
        assert "Content-Type" not in rec.seen[-1].headers, method


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_a_route_upstream_error_that_quotes_its_key_is_passed_without_it(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, content_type: str
) -> None:
    """A route's upstream that answers an error quoting the key it got (the route's own, or
    the per-request key made for it): the client gets the error without the key, as it does
    from a model's upstream.  A success is relayed as it came."""

    async def handle(request: web.Request) -> web.Response:
        got = request.headers.get("Api-Key", "")
        status = 200 if request.path.endswith("/fine") else 403
        return web.Response(
            status=status, text=f"data: bad key {got}!\n\n", content_type=content_type
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    proxy = await make_proxy(
        config(
            {
                "own": {
                    "paths": ["/v1/own"],
                    "upstreams": [{"endpoint": str(server.make_url("/x")), "key": ROUTE_KEY}],
                },
                "minted": {
                    "paths": ["/v1/minted(/.*)?"],
                    "rewritePath": True,
                    "upstreams": [{"endpoint": str(server.make_url("/"))}],
                },
            }
        )
    )
    status, body, _ = await call(proxy.url("/v1/own"))
    assert (status, body) == (403, b"data: bad key ***!\n\n")
    status, body, _ = await call(proxy.url("/v1/minted"))
    assert (status, body) == (403, b"data: bad key ***!\n\n")
    status, body, _ = await call(proxy.url("/v1/minted/fine"))
    assert status == 200 and body.startswith(b"data: bad key ") and b"***" not in body


async def test_a_route_request_its_client_leaves_is_logged_so(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """A client that leaves before the route's upstream answers: status 499 and why in the
    log line (before: 500, as if the proxy had failed)."""
    asked = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        asked.set()
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    server = await aiohttp_server(app)
    proxy = await make_proxy(
        config(
            {
                "slow": {
                    "paths": ["/v1/slow"],
                    "upstreams": [{"endpoint": str(server.make_url("/"))}],
                }
            }
        )
    )
    with capture_logs() as logs:
        call_ = asyncio.ensure_future(call(proxy.url("/v1/slow")))
        await asyncio.wait_for(asked.wait(), 10)
        call_.cancel()  # the client hangs up while the upstream works
        with contextlib.suppress(asyncio.CancelledError):
            await call_
        for _ in range(500):
            if any(e["event"] == "request" for e in logs):
                break
            await asyncio.sleep(0.01)
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["error"]) == (499, "the client went away before the answer")


async def test_a_route_stream_the_upstream_breaks_off(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """An event stream cut by the upstream ends with the proxied streams' error event; any
    other stream (NDJSON) is cut for the client too, so it never looks complete."""
    rec = await recorder(aiohttp_server)
    route = {"paths": ["/s/.*"], "rewritePath": True, "upstreams": [{"endpoint": rec.url()}]}
    proxy = await make_proxy(config({"s": route}))
    with capture_logs() as logs:
        status, body, headers = await call(proxy.url("/s/broken"))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert body.startswith(b"data: 0\n\n")
    (event,) = [json.loads(e[len(b"data: ") :]) for e in body.split(b"\n\n")[1:] if e]
    assert event["error"]["message"] == "The upstream broke off the response"
    assert event["error"]["code"] == "502"
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 200 and line["error"].startswith("upstream stream broke off")
    # cut inside an event: that one is ended first, so the error is an event of its own
    status, body, _ = await call(proxy.url("/s/broken?mid=1"))
    assert status == 200
    first, cut, error, end = body.split(b"\n\n")
    assert (first, cut, end) == (b"data: 0", b'data: {"par', b"")
    assert json.loads(error[len(b"data: ") :])["error"]["code"] == "502"

    with capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                proxy.url("/s/broken?type=application/x-ndjson"), headers={"Api-Key": USER}
            ) as resp,
        ):
            assert resp.status == 200 and resp.content_type == "application/x-ndjson"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["error"].startswith("upstream stream broke off")


async def test_a_shutdown_ends_an_open_route_stream_with_an_event(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    rec = await recorder(aiohttp_server)
    route = {"paths": ["/s/.*"], "rewritePath": True, "upstreams": [{"endpoint": rec.url()}]}
    proxy = await make_proxy(config({"s": route}))
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url("/s/endless"), headers={"Api-Key": USER}) as resp,
    ):
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        assert proxy.app[DRAIN].end_streams() == 1
        rest = await resp.content.read()
    assert b"shutting down" in rest and rest.startswith(b"data: ")


async def test_routes_follow_a_reload(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config({"a": {"paths": ["/a"], "response": {"body": "one"}}}))
    assert (await call(proxy.url("/a")))[:2] == (200, b"one")
    new = config({"a": {"paths": ["/b"], "response": {"body": "two"}}})
    proxy.path.write_text(json.dumps(new))
    proxy.store.load()
    assert (await call(proxy.url("/a")))[0] == 404
    assert (await call(proxy.url("/b")))[:2] == (200, b"two")


async def test_routes_match_in_order_and_by_method(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(
            {
                "late": {"paths": ["/v1/x"], "order": 5, "response": {"body": "late"}},
                "early": {"paths": ["/v1/.*"], "order": 1, "response": {"body": "early"}},
                "tie-first": {"paths": ["/v2/x"], "response": {"body": "first"}},
                "tie-second": {"paths": ["/v2/x"], "response": {"body": "second"}},
                "get": {"paths": ["/v3/x"], "methods": ["GET"], "response": {"body": "get"}},
                "post": {"paths": ["/v3/x"], "methods": ["POST"], "response": {"body": "post"}},
            }
        )
    )
    assert (await call(proxy.url("/v1/x")))[:2] == (200, b"early")
    assert (await call(proxy.url("/v2/x")))[:2] == (200, b"first")
    assert (await call(proxy.url("/v3/x")))[:2] == (200, b"get")
    assert (await call(proxy.url("/v3/x"), "POST"))[:2] == (200, b"post")  # falls through
    status, _, headers = await call(proxy.url("/v3/x"), "DELETE")
    assert status == 405 and headers["Allow"] == "GET,POST"
    assert (await call(proxy.url("/v3/xy")))[0] == 404  # a full match only


async def test_builtin_endpoints_win_over_routes(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config({"all": {"response": {"body": "route"}}}))
    status, body, _ = await call(proxy.url("/v1/user/info"))
    assert status == 200 and json.loads(body)["project"] == "team-a"
    assert (await call(proxy.url("/anything/else")))[:2] == (200, b"route")


async def test_user_roles_and_keys(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(
            {
                "admins": {"paths": ["/admin"], "userRoles": ["admin"], "response": {}},
                "nobody": {"paths": ["/nobody"], "userRoles": [], "response": {}},
            }
        )
    )
    status, body, _ = await call(proxy.url("/admin"))
    assert status == 403 and json.loads(body)["error"]["message"] == "Forbidden route"
    assert (await call(proxy.url("/admin"), key=ADMIN))[0] == 200
    assert (await call(proxy.url("/nobody"), key=ADMIN))[0] == 403
    assert (await call(proxy.url("/admin"), key=None))[0] == 401
    assert (await call(proxy.url("/admin"), key=ADMIN + "x"))[0] == 401


async def test_canned_response(aiohttp_server: AiohttpServer, make_proxy: ProxyFactory) -> None:
    rec = await recorder(aiohttp_server)
    proxy = await make_proxy(
        config(
            {
                "tea": {
                    "paths": ["/tea"],
                    "response": {"status": 418, "body": "teapot"},
                    "upstreams": [{"endpoint": rec.url("/never")}],
                }
            }
        )
    )
    status, body, headers = await call(proxy.url("/tea"), "POST", data=b"x")
    assert (status, body) == (418, b"teapot")
    assert headers["Content-Type"].startswith("text/plain")
    assert rec.seen == []


async def test_load_balancing_and_retry(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    good, bad, other = [await recorder(aiohttp_server) for _ in range(3)]
    bad.status = 503
    proxy = await make_proxy(
        config(
            {
                "retried": {
                    "paths": ["/retried"],
                    "maxRetryAttempts": 2,
                    "upstreams": [{"endpoint": bad.url("/bad")}, {"endpoint": good.url("/good")}],
                },
                "once": {  # DIAL's default maxRetryAttempts: 1, no retry
                    "paths": ["/once"],
                    "upstreams": [{"endpoint": bad.url("/bad")}, {"endpoint": good.url("/good")}],
                },
                "balanced": {
                    "paths": ["/balanced"],
                    "upstreams": [{"endpoint": good.url("/g")}, {"endpoint": other.url("/o")}],
                },
                "tiers": {
                    "paths": ["/tiers"],
                    "upstreams": [
                        {"endpoint": other.url("/backup"), "tier": 1},
                        {"endpoint": good.url("/first"), "tier": 0},
                    ],
                },
            }
        )
    )
    status, body, headers = await call(proxy.url("/retried"))
    assert status == 201 and headers["X-UPSTREAM-ATTEMPTS"] == "2"
    assert [s.path for s in bad.seen] == ["/bad"] and [s.path for s in good.seen] == ["/good"]

    status, body, _ = await call(proxy.url("/once"))
    assert status == 502 and json.loads(body)["error"]["message"] == "No route"

    for _ in range(4):
        assert (await call(proxy.url("/balanced")))[0] == 201
    assert sum(s.path == "/g" for s in good.seen) == 2
    assert sum(s.path == "/o" for s in other.seen) == 2

    for _ in range(2):
        assert (await call(proxy.url("/tiers")))[0] == 201
    assert sum(s.path == "/first" for s in good.seen) == 2
    assert not any(s.path == "/backup" for s in other.seen)


async def test_role_request_limit_on_a_route(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        config(
            {"limited": {"paths": ["/limited"], "response": {"body": "ok"}}},
            roles={
                "user": {"limits": {"limited": {"requestDay": 2}}},
                "admin": {"limits": {"limited": {"requestDay": 0}}},
            },
        )
    )
    assert (await call(proxy.url("/limited")))[0] == 200
    assert (await call(proxy.url("/limited")))[0] == 200
    status, body, _ = await call(proxy.url("/limited"))
    assert status == 429
    status, body, _ = await call(proxy.url("/limited"), key=ADMIN)
    assert status == 403 and json.loads(body)["error"]["message"] == "Access denied"


def test_a_path_that_is_no_regex_is_an_error_with_its_json_path(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config({"bad": {"paths": ["/ok", "/v1/(open"], "response": {}}})))
    with pytest.raises(ConfigError) as raised:
        build_snapshot(read_sources([path]), {})
    problems: list[Problem] = list(raised.value.problems)
    assert [p.path for p in problems if p.severity == "error"] == ["$.routes.bad.paths[1]"]
    assert "not a valid regular expression" in problems[0].message

    upstreams = [
        {"endpoint": "http://user:pw@host/x"},
        {"endpoint": "http://host/x", "key": "a\r\nb"},
        {"endpoint": "wss://host/x"},
    ]
    path.write_text(json.dumps(config({"up": {"upstreams": upstreams}, "x": {"order": -1}})))
    with pytest.raises(ConfigError) as raised:
        build_snapshot(read_sources([path]), {})
    assert sorted((p.path, p.severity) for p in raised.value.problems) == [
        ("$.routes.up.upstreams[0].endpoint", "error"),
        ("$.routes.up.upstreams[1].key", "error"),
        ("$.routes.up.upstreams[2].endpoint", "warning"),
        ("$.routes.x", "warning"),  # neither response nor upstreams
        ("$.routes.x.order", "error"),  # the schema: order >= 0
    ]

    # not lists where lists belong: the schema's errors, no crash of the semantic checks
    path.write_text(json.dumps(config({"odd": {"paths": 500, "upstreams": "http://h/"}})))
    with pytest.raises(ConfigError) as raised:
        build_snapshot(read_sources([path]), {})
    assert {p.path for p in raised.value.problems} >= {
        "$.routes.odd.paths",
        "$.routes.odd.upstreams",
    }


def test_dial_golden_config_routes_compile() -> None:
    snapshot = build_snapshot(read_sources([CONFIGS / "aidial.config.json"]), {})
    names = [r.name for r in snapshot.dial_routes]
    assert names[:3] == ["route-rate", "tasks", "forbidden"]  # equal order: config order
    by_name = {r.name: r for r in snapshot.dial_routes}
    assert by_name["tasks"].rewrite_path and by_name["tasks"].model.upstreams[0].key
    assert by_name["route-rate"].response == (200, b"OK")
    assert by_name["forbidden"].user_roles == frozenset()
    route, _ = select(snapshot, "GET", "/v1/vector_store/1")
    assert route is not None and route.name == "vector_store_query"
    route, _ = select(snapshot, "DELETE", "/v1/vector_store/1/2")
    assert route is not None and route.name == "vector_store_mutation"
    assert select(snapshot, "POST", "//v1/rate")[0] is by_name["route-rate"]
    assert not by_name["websocket-router"].model.upstreams  # ws:// is not proxied


async def test_dial_golden_config_served_as_dial_route_api_test(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory
) -> None:
    """DIAL Core's RouteApiTest on its own aidial.config.json (upstream: the recorder)."""
    rec = await recorder(aiohttp_server)
    text = (CONFIGS / "aidial.config.json").read_text("utf-8")
    proxy = await make_proxy(json.loads(text.replace("http://localhost:9876", rec.url(""))))
    cases = [
        ("GET", "/v1/plain", "vstore_user_key", 201, "/"),
        ("GET", "/v1/plain", "vstore_admin_key", 201, "/"),
        ("GET", "/v1/vector_store/1", "vstore_user_key", 201, "/v1/vector_store/1"),
        ("HEAD", "/v1/vector_store/1", "vstore_user_key", 201, "/v1/vector_store/1"),
        ("POST", "/v1/vector_store/1", "vstore_user_key", 403, None),
        ("POST", "/v1/vector_store/1", "vstore_admin_key", 201, "/v1/vector_store/1"),
        ("GET", "/v1/forbidden", "vstore_admin_key", 403, None),
        ("GET", "/rate_limited_route", "vstore_user_key", 201, "/rate_limited_route"),
        ("GET", "/rate_limited_route", "vstore_user_key", 429, None),  # requestHour: 1
        ("GET", "/rate_limited_route", "vstore_admin_key", 201, "/rate_limited_route"),
    ]
    for method, path, key, status, upstream_path in cases:
        before = len(rec.seen)
        got, _, _ = await call(proxy.url(path), method, key=key)
        assert got == status, (method, path, key)
        if upstream_path is not None:
            assert rec.seen[before].path == upstream_path
        else:
            assert len(rec.seen) == before
