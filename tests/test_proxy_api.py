"""The DIAL API end to end: the real app in front of a real OpenAI-style backend."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Backend, Proxy, ProxyFactory, new_key

KEY = new_key()
OTHER_KEY = new_key()
ADMIN_KEY = new_key()
UPSTREAM_KEY = new_key("upstream-secret-")


def config(backend: Backend) -> dict[str, Any]:
    return {
        "models": {
            "chat": {
                "type": "chat",
                "displayName": "Chat",
                "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}],
            },
            "legacy": {
                "type": "completion",
                "upstreams": [{"endpoint": backend.url("/v1/completions"), "key": UPSTREAM_KEY}],
            },
            "embed": {
                "type": "embedding",
                "upstreams": [{"endpoint": backend.url("/v1/embeddings"), "key": UPSTREAM_KEY}],
            },
            "adapter": {
                "type": "chat",
                "endpoint": backend.url("/openai/deployments/adapter/chat/completions"),
                "upstreams": [
                    {
                        "endpoint": "https://provider.example/v1",
                        "key": UPSTREAM_KEY,
                        "extraData": {"region": "eu"},
                    }
                ],
            },
            "admins-only": {
                "type": "chat",
                "userRoles": ["admin"],
                "upstreams": [{"endpoint": backend.url()}],
            },
            "denied": {"type": "chat", "upstreams": [{"endpoint": backend.url()}]},
        },
        "roles": {
            "user": {"limits": {"denied": {"minute": 0}}},
            "admin": {"limits": {}},
        },
        "keys": {
            KEY: {"project": "team-a", "role": "user"},
            OTHER_KEY: {"project": "team-b", "roles": ["user"]},
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "user"]},
        },
    }


@pytest.fixture
async def proxy(backend: Backend, make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(config(backend))


async def post(proxy: Proxy, path: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(proxy.url(path), json=body, headers=headers)
        await resp.read()
        return resp


async def post_raw(proxy: Proxy, body: bytes) -> tuple[int, bytes]:
    """``body`` as it is, to the chat deployment: the status and the answer's bytes."""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            data=body,
            headers={"Api-Key": KEY, "Content-Type": "application/json"},
        )
        return resp.status, await resp.read()


MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there proxy"}]
CHAT: dict[str, Any] = {"messages": MESSAGES}


async def test_chat_through_deployment_path(proxy: Proxy, backend: Backend) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url(
                "/openai/deployments/chat/chat/completions?api-version=2024-02-01&n=a%20b%2Bc%26d"
            ),
            json=CHAT,
            headers={
                "Api-Key": KEY,
                "X-Request-Id": "r1",
                "TRACEPARENT": "00-abc-def-01",
                "X-Other": "kept here",
                "X-UPSTREAM-KEY": "evil",
            },
        )
        body = await resp.json()
    assert resp.status == 200
    assert body["choices"][0]["message"]["content"] == "Echo: hello there proxy"
    assert resp.headers["X-UPSTREAM-ATTEMPTS"] == "1"
    seen = backend.control.last_request
    assert seen.path == "/v1/chat/completions"
    assert seen.query_string == "api-version=2024-02-01&n=a%20b%2Bc%26d"  # byte for byte
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["X-Request-Id"] == "r1"
    assert seen.headers["traceparent"] == "00-abc-def-01"  # (names match in any case)
    assert "X-Other" not in seen.headers  # only the listed ones go on
    assert "Api-Key" not in seen.headers
    assert "X-UPSTREAM-KEY" not in seen.headers  # a client can never set it
    assert seen.headers["Accept-Encoding"] == "identity"  # ours, never the client's
    assert seen.body == json.dumps(CHAT).encode()  # untouched: forwarded as sent


async def test_dial_adapter_shape(proxy: Proxy, backend: Backend) -> None:
    resp = await post(
        proxy, "/openai/deployments/adapter/chat/completions", CHAT, **{"Api-Key": KEY}
    )
    assert resp.status == 200
    seen = backend.control.last_request
    assert seen.path == "/openai/deployments/adapter/chat/completions"
    assert seen.headers["X-UPSTREAM-ENDPOINT"] == "https://provider.example/v1"
    assert seen.headers["X-UPSTREAM-KEY"] == UPSTREAM_KEY
    assert json.loads(seen.headers["X-UPSTREAM-EXTRA-DATA"]) == {"region": "eu"}
    assert "Authorization" not in seen.headers


async def test_stream_relayed_and_usage_hidden_when_not_asked(
    proxy: Proxy, backend: Backend
) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        raw = await resp.read()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    # The proxy asked the backend for usage on the client's behalf...
    assert backend.control.last_request.json["stream_options"] == {"include_usage": True}
    # ...and the client sees the stream exactly as if it had not.
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Echo: hello there proxy"


async def test_asking_for_usage_keeps_the_clients_bytes(proxy: Proxy, backend: Backend) -> None:
    """Only the option is added: the rest of the body reaches the backend as the client
    wrote it (spacing, key order, a number no float can hold)."""
    body = (
        b'{ "messages": [{"role": "user", "content": "hi"}],\n'
        b' "seed": 12345678901234567890123,  "stream": true }\n'
    )
    status, answer = await post_raw(proxy, body)
    assert status == 200 and b"[DONE]" in answer
    sent = backend.control.last_request.body
    assert sent == body.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'
    assert json.loads(sent)["seed"] == 12345678901234567890123


async def test_stream_with_usage_when_asked(proxy: Proxy, backend: Backend) -> None:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url("/openai/deployments/chat/chat/completions"),
            json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
            headers={"Api-Key": KEY},
        )
        raw = await resp.read()
    events = [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e and "[DONE]" not in e]
    assert events[-1]["usage"]["total_tokens"] > 0
    assert (
        backend.control.last_request.body
        == json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    )


async def test_openai_sdk_sync_and_async(proxy: Proxy) -> None:
    base = proxy.url("/openai/v1")
    client = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content == "Echo: hello there proxy"
        assert reply.usage is not None and reply.usage.total_tokens == 7
        stream = await client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "Echo: hello there proxy"
        emb = await client.embeddings.create(model="embed", input=["a b", "c"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
        legacy = await client.completions.create(model="legacy", prompt="say this")
        assert legacy.choices[0].text
        models = await client.models.list()
        assert {m.id for m in models.data} == {"chat", "legacy", "embed", "adapter", "denied"}

    def sync_calls() -> tuple[str | None, list[str]]:
        with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0) as c:
            e = c.embeddings.create(model="embed", input="sync embedding")
            assert len(e.data[0].embedding) == 8
            r = c.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x y"}]
            )
            s = c.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x y"}], stream=True
            )
            return r.choices[0].message.content, [
                k.choices[0].delta.content or "" for k in s if k.choices
            ]

    content, parts = await asyncio.to_thread(sync_calls)
    assert content == "Echo: x y" and "".join(parts) == "Echo: x y"


async def test_azure_openai_sdk(proxy: Proxy, backend: Backend) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=proxy.url(), api_key=KEY, api_version="2024-06-01", max_retries=0
    )
    async with client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content == "Echo: hello there proxy"
        stream = await client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "Echo: hello there proxy"
        emb = await client.embeddings.create(model="embed", input="hello")
        assert len(emb.data[0].embedding) == 8
    assert "api-version=2024-06-01" in backend.control.last_request.query_string

    def sync_call() -> str | None:
        with openai.AzureOpenAI(
            azure_endpoint=proxy.url(), api_key=KEY, api_version="2024-06-01", max_retries=0
        ) as c:
            r = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "q"}])
            return r.choices[0].message.content

    assert await asyncio.to_thread(sync_call) == "Echo: q"


async def test_listings_filtered_by_role(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        for path, obj in (("/openai/models", "model"), ("/openai/deployments", "deployment")):
            r = await s.get(proxy.url(path), headers={"Api-Key": KEY})
            data = (await r.json())["data"]
            assert {d["id"] for d in data} == {"chat", "legacy", "embed", "adapter", "denied"}
            assert all(d["object"] == obj for d in data)
            r = await s.get(proxy.url(path), headers={"Api-Key": ADMIN_KEY})
            assert "admins-only" in {d["id"] for d in (await r.json())["data"]}
        r = await s.get(proxy.url("/openai/models/chat"), headers={"Api-Key": KEY})
        entry = await r.json()
        assert entry["id"] == "chat" and entry["capabilities"]["chat_completion"] is True
        assert entry["display_name"] == "Chat"
        r = await s.get(proxy.url("/openai/deployments/admins-only"), headers={"Api-Key": KEY})
        assert r.status == 403
        r = await s.get(proxy.url("/v1/user/info"), headers={"Api-Key": ADMIN_KEY})
        assert await r.json() == {"project": "ops", "roles": ["admin", "user"]}
        r = await s.get(proxy.url("/health"))
        assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_deployment_limits_endpoint(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.get(proxy.url("/v1/deployments/chat/limits"), headers={"Api-Key": KEY})
        body = await r.json()
    assert r.status == 200
    assert body["minuteTokenStats"] == {"total": 9223372036854775807, "used": 0}
    assert set(body) == {
        "minuteTokenStats",
        "dayTokenStats",
        "weekTokenStats",
        "monthTokenStats",
        "minuteRequestStats",
        "hourRequestStats",
        "dayRequestStats",
    }


# One test per row of the spec's error table (the limit rows are in test_limits.py).
ERROR_ROWS = [
    (
        "no credentials",
        {},
        "/openai/deployments/chat/chat/completions",
        CHAT,
        401,
        "At least API-KEY or Authorization header must be provided",
    ),
    (
        "unknown key",
        {"Api-Key": "nope-" + new_key()},
        "/openai/deployments/chat/chat/completions",
        CHAT,
        401,
        "Unknown api key",
    ),
    (
        "keys differ",
        {"Api-Key": KEY, "Authorization": f"Bearer {OTHER_KEY}"},
        "/openai/deployments/chat/chat/completions",
        CHAT,
        400,
        "Either API-KEY or Authorization header must be provided but not both",
    ),
    (
        "unknown deployment",
        {"Api-Key": KEY},
        "/openai/deployments/nope/chat/completions",
        CHAT,
        404,
        "Unknown application: nope",
    ),
    (
        "role not allowed",
        {"Api-Key": KEY},
        "/openai/deployments/admins-only/chat/completions",
        CHAT,
        403,
        "Forbidden deployment: admins-only",
    ),
    (
        "limit <= 0",
        {"Api-Key": KEY},
        "/openai/deployments/denied/chat/completions",
        CHAT,
        403,
        "Access denied",
    ),
    (
        "unknown model in body",
        {"Api-Key": KEY},
        "/openai/v1/chat/completions",
        {**CHAT, "model": "nope"},
        404,
        "Unknown application: nope",
    ),
]


@pytest.mark.parametrize(
    ("name", "headers", "path", "body", "status", "message"),
    ERROR_ROWS,
    ids=[r[0] for r in ERROR_ROWS],
)
async def test_error_table(
    proxy: Proxy,
    backend: Backend,
    name: str,
    headers: dict[str, str],
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    resp = await post(proxy, path, body, **headers)
    assert resp.status == status
    assert await resp.json() == {"error": {"message": message, "code": str(status)}}
    assert backend.control.requests == []


async def test_same_key_in_both_headers_is_fine(proxy: Proxy) -> None:
    resp = await post(
        proxy,
        "/openai/deployments/chat/chat/completions",
        CHAT,
        **{"Api-Key": KEY, "Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 200


async def test_body_errors(proxy: Proxy, backend: Backend) -> None:
    url = proxy.url("/openai/deployments/chat/chat/completions")
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, data=b"hello", headers={"Api-Key": KEY, "Content-Type": "text/plain"})
        assert r.status == 415
        assert (await r.json())["error"]["message"] == "Only application/json is supported"
        r = await s.post(
            url, data=b"{not json", headers={"Api-Key": KEY, "Content-Type": "application/json"}
        )
        assert r.status == 400 and (await r.json())["error"]["code"] == "400"
        big = b'{"messages": "' + b"x" * (16 * 1024 * 1024) + b'"}'
        r = await s.post(
            url, data=io.BytesIO(big), headers={"Api-Key": KEY, "Content-Type": "application/json"}
        )
        assert r.status == 413
        assert (await r.json())["error"]["message"] == "Request body is too large"
        r = await s.get(proxy.url("/no/such/path"), headers={"Api-Key": KEY})
        assert r.status == 404 and (await r.json())["error"]["code"] == "404"
    assert backend.control.requests == []


async def test_wrong_methods_and_internal_errors_answer_json(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    from dialproxy.web.appkeys import BALANCER, STORE

    async with aiohttp.ClientSession() as s:
        r = await s.get(proxy.url("/openai/deployments/chat/chat/completions"))
        assert r.status == 405 and r.headers["Allow"] == "POST"
        assert await r.json() == {"error": {"message": "Method Not Allowed", "code": "405"}}
        r = await s.delete(proxy.url("/health"))
        assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"

        def broken(*_: object) -> object:
            raise RuntimeError("a secret-bearing message that must not be shown")

        monkeypatch.setattr(proxy.app[BALANCER], "plan", broken)
        monkeypatch.setattr(proxy.app[STORE], "health", broken)
        with capture_logs() as logs:
            r = await s.post(
                proxy.url("/openai/deployments/chat/chat/completions"),
                json=CHAT,
                headers={"Api-Key": KEY},
            )
            assert r.status == 500
            assert await r.json() == {"error": {"message": "Internal error", "code": "500"}}
            r = await s.get(proxy.url("/health"))
            assert r.status == 500
            assert await r.json() == {"error": {"message": "Internal error", "code": "500"}}
    errors = [e for e in logs if e["event"] == "internal_error"]
    assert [e["error"] for e in errors] == ["RuntimeError", "RuntimeError"]
    assert [e["status"] for e in logs if e["event"] == "request"] == [500]
    assert "secret-bearing" not in json.dumps(logs)


async def test_any_valid_json_body_passes(proxy: Proxy, backend: Backend) -> None:
    """Valid JSON the fast parser refuses (a lone surrogate escape) or reads inexactly (an
    integer beyond 64 bits, which orjson makes a float) reaches the backend intact, also
    when the proxy rewrites the body."""
    body = (
        b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800",'
        b' "seed": 123456789012345678901234}'
    )
    status, _ = await post_raw(proxy, body)
    assert status == 200
    assert backend.control.last_request.body == body  # forwarded as it came
    status, answer = await post_raw(proxy, body[:-1] + b', "stream": true}')  # usage asked for
    assert status == 200 and b"[DONE]" in answer
    sent = json.loads(backend.control.last_request.body)
    assert sent["seed"] == 123456789012345678901234
    assert sent["user"] == "\ud800"
    assert sent["stream_options"] == {"include_usage": True}


async def test_defaults_and_override_name(backend: Backend, make_proxy: ProxyFactory) -> None:
    cfg = config(backend)
    cfg["models"]["chat"] |= {
        "defaults": {"temperature": 0.2, "max_tokens": 50},
        "overrideName": "gpt-4o-mini",
    }
    proxy = await make_proxy(cfg)
    resp = await post(
        proxy,
        "/openai/deployments/chat/chat/completions",
        {**CHAT, "max_tokens": 2},
        **{"Api-Key": KEY},
    )
    assert resp.status == 200
    sent = backend.control.last_request.json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 2  # the client's value wins


async def test_forward_auth_token(backend: Backend, make_proxy: ProxyFactory) -> None:
    cfg = config(backend)
    cfg["models"]["adapter"]["forwardAuthToken"] = True
    proxy = await make_proxy(cfg)
    resp = await post(
        proxy,
        "/openai/deployments/adapter/chat/completions",
        CHAT,
        **{"Api-Key": KEY, "Authorization": "Token user-jwt"},
    )
    assert resp.status == 200
    assert backend.control.last_request.headers["Authorization"] == "Token user-jwt"
    # Authorization that carries the key itself is never forwarded.
    resp = await post(
        proxy,
        "/openai/deployments/adapter/chat/completions",
        CHAT,
        **{"Api-Key": KEY, "Authorization": f"Bearer {KEY}"},
    )
    assert resp.status == 200
    assert "Authorization" not in backend.control.last_request.headers


async def _chunked(proxy: Proxy, body: bytes) -> tuple[int, bytes]:
    """``body`` sent chunked (no Content-Length), whole with its headers in one write: the
    status line and the answer's body."""
    port = proxy.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /openai/deployments/chat/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nApi-Key: {KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_chunked_body_that_arrived_whole_is_held_to_max_body(
    backend: Backend, make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    from dialproxy.settings import Settings

    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), max_body=1024)
    proxy = await make_proxy(config(backend), settings=settings)
    fits = json.dumps({"messages": [{"role": "user", "content": "x" * 900}]}).encode()
    status, _ = await _chunked(proxy, fits)
    assert status == 200
    assert backend.control.requests[-1].body == fits  # the bytes as they came
    too_big = json.dumps({"messages": [{"role": "user", "content": "x" * 1100}]}).encode()
    status, body = await _chunked(proxy, too_big)
    assert status == 413 and b"Request body is too large" in body
    assert len(backend.control.requests) == 1
