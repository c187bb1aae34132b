"""Per-request keys, end to end with a real ``aidial-sdk`` adapter (tests/dial_adapter.py).

An adapter behind a model ``endpoint`` gets ``Api-Key: <per-request key>`` (never the
client's key); with it, it calls back into the proxy as the caller who started the request,
charged to that caller; the key ends with its request, and with Redis it works on every
instance.  And a request the proxy refuses never uses up a request window.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dialproxy.auth import PER_REQUEST_KEY_PREFIX, Principal
from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source
from dialproxy.errors import ConfigError
from dialproxy.perrequest import PerRequestKeys
from dialproxy.server import counter_storage
from dialproxy.settings import Settings
from dialproxy.web.appkeys import SHARED
from tests.conftest import SECRETS, AiohttpServer, Backend, Proxy, ProxyFactory, chat_model, new_key
from tests.redis_server import ROOT, RedisServer, free_port

KEY = new_key()
NARROW = new_key()  # same project, only "adapter" allowed: 403 on the others
UPSTREAM_KEY = new_key("up-")
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # the backend: 3 + 4
TOKENS = 7  # what the adapter reports per request (3 prompt + 4 completion)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The aidial-sdk adapter, in a process of its own on a free port."""
    port = free_port()
    errors = tmp_path_factory.mktemp("adapter") / "stderr"
    with errors.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.dial_adapter", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the adapter exited: {errors.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the adapter did not start: {errors.read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def endpoint(adapter: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "chat", "endpoint": f"{adapter}/openai/deployments/{name}/chat/completions"} | (
        extra
    )


def config(adapter: str, backend: Backend, **adapter_limit: Any) -> dict[str, Any]:
    return {
        "models": {
            "adapter": endpoint(
                adapter,
                "adapter",
                upstreams=[
                    {
                        "endpoint": "https://provider.example/v1",
                        "key": UPSTREAM_KEY,
                        "extraData": {"region": "eu"},
                    }
                ],
            ),
            "agent": endpoint(adapter, "agent"),
            "inner": endpoint(adapter, "inner"),
            "closed": endpoint(adapter, "closed", features={"accessibleByPerRequestKey": False}),
            "forwarding": endpoint(adapter, "forwarding", forwardAuthToken=True),
            "chat": chat_model(backend),
        },
        "roles": {
            "user": {
                "limits": {
                    "adapter": {"day": 100_000, "requestDay": 100} | adapter_limit,
                    "agent": {"day": 100_000},
                    "inner": {"day": 100_000},
                    "chat": {"day": 100_000, "requestHour": 50, "requestDay": 50},
                }
            }
        },
        "keys": {
            KEY: {"project": "p1", "role": "user", "canShare": True},
            NARROW: {"project": "p1", "role": "user", "models": ["adapter"]},
        },
    }


async def start(
    make_proxy: ProxyFactory, cfg: dict[str, Any], tmp_path: Path, storage: str = "memory://"
) -> Proxy:
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), storage=storage)
    if storage == "memory://":
        return await make_proxy(cfg, settings=settings)
    return await make_proxy(cfg, settings=settings, storage=counter_storage(storage))


async def call(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    path: str,
    key: str,
    body: Any = None,
    **headers: str,
) -> tuple[int, Any]:
    method = "GET" if body is None else "POST"
    resp = await session.request(
        method, proxy.url(path), json=body, headers={"Api-Key": key, **headers}
    )
    raw = await resp.read()
    return resp.status, json.loads(raw) if raw and not raw.startswith(b"data:") else raw


def seen_by_adapter(body: Any) -> dict[str, Any]:
    """What the adapter says it got (the message content), its per-request keys registered
    as secrets: no log line may ever hold one."""
    if isinstance(body, bytes):  # a stream: the content deltas, joined
        content = ""
        for event in body.decode().split("\n\n"):
            data = event.removeprefix("data: ").strip()
            if data and data != "[DONE]":
                for choice in json.loads(data).get("choices", []):
                    content += choice.get("delta", {}).get("content") or ""
    else:
        content = body["choices"][0]["message"]["content"]
    seen: dict[str, Any] = json.loads(content)
    SECRETS.append(seen["api_key"])
    for name in ("inner",):
        inner = seen.get("calls", {}).get(name)
        if inner and inner["status"] == 200:
            seen_by_adapter(inner["body"])
    return seen


async def chat(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    model: str,
    key: str = KEY,
    asks: dict[str, Any] | None = None,
    stream: bool = False,
) -> tuple[int, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": json.dumps(asks) if asks else "hello"}]
    }
    if stream:
        body["stream"] = True
    status, data = await call(
        session, proxy, f"/openai/deployments/{model}/chat/completions", key, body
    )
    await proxy.settle()
    return status, data


async def used(
    session: aiohttp.ClientSession, proxy: Proxy, model: str, key: str = KEY
) -> dict[str, int]:
    status, limits = await call(session, proxy, f"/v1/deployments/{model}/limits", key)
    assert status == 200, limits
    return {name: stats["used"] for name, stats in limits.items()}


@pytest.mark.parametrize("stream", [False, True])
async def test_an_aidial_sdk_adapter_gets_a_per_request_key(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    stream: bool,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    status, body = await chat(session, proxy, "adapter", stream=stream)
    assert status == 200, body
    seen = seen_by_adapter(body)
    # A per-request key, never the client's; the upstream named as DIAL names it.
    assert seen["api_key"].startswith(PER_REQUEST_KEY_PREFIX) and seen["api_key"] != KEY
    assert len(seen["api_key"]) >= len(PER_REQUEST_KEY_PREFIX) + 43  # 256 random bits
    assert seen["authorization"] is None
    assert seen["upstream_endpoint"] == "https://provider.example/v1"
    assert seen["upstream_key"] == UPSTREAM_KEY
    assert json.loads(seen["upstream_extra_data"]) == {"region": "eu"}
    # The usage the adapter reported through the SDK is counted, with the request.
    counts = await used(session, proxy, "adapter")
    assert counts["dayTokenStats"] == TOKENS and counts["dayRequestStats"] == 1
    # The request is over: its key is too.
    status, error = await call(session, proxy, "/v1/user/info", seen["api_key"])
    assert (status, error["error"]["message"]) == (401, "Unknown api key")
    keys = proxy.app[SHARED].per_request
    assert keys is not None and len(keys) == 0  # nothing left in memory


async def test_an_adapter_on_the_v1_path_is_told_the_deployment(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """``/openai/v1/chat/completions`` with ``"model": "agent"`` goes to the adapter's base
    URL + that path, which aidial-sdk serves for all its deployments, picking one by
    ``X-DIAL-DEPLOYMENT-ID`` (as DIAL Core sends it): it answered 500 without it.  A
    client's own value never passes."""
    cfg = config(adapter, backend)
    cfg["models"]["agent"] = {
        "type": "chat",
        "interfaces": {"openaiChatCompletions": {"base_url": adapter}},
    }
    proxy = await start(make_proxy, cfg, tmp_path)
    body = {"model": "agent", "messages": [{"role": "user", "content": "hello"}]}
    status, answer = await call(
        session, proxy, "/openai/v1/chat/completions", KEY, body,
        **{"X-DIAL-DEPLOYMENT-ID": "adapter"},
    )  # fmt: skip
    assert status == 200, answer
    assert seen_by_adapter(answer)["deployment"] == "agent"


async def test_each_request_gets_its_own_key_and_our_limits_hold(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend, requestDay=2), tmp_path)
    keys = set()
    for stream in (False, True):
        status, body = await chat(session, proxy, "adapter", stream=stream)
        assert status == 200
        keys.add(seen_by_adapter(body)["api_key"])
    assert len(keys) == 2
    status, body = await chat(session, proxy, "adapter")
    assert status == 429 and body["error"]["code"] == "429"
    counts = await used(session, proxy, "adapter")
    assert counts["dayRequestStats"] == 2 and counts["dayTokenStats"] == 2 * TOKENS


async def test_calls_back_act_and_are_charged_as_the_originator(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    asks = {"base": proxy.url(""), "info": True, "inner": "inner"}
    status, body = await chat(session, proxy, "agent", asks=asks)
    assert status == 200, body
    seen = seen_by_adapter(body)
    calls = seen["calls"]
    assert calls["info"] == {"status": 200, "body": {"project": "p1", "roles": ["user"]}}
    assert calls["inner"]["status"] == 200
    inner = json.loads(calls["inner"]["body"]["choices"][0]["message"]["content"])
    # The next hop got a key of its own.
    assert inner["api_key"].startswith(PER_REQUEST_KEY_PREFIX)
    assert inner["api_key"] not in (seen["api_key"], KEY)
    # Both requests are charged to the originator's project.
    assert (await used(session, proxy, "agent"))["dayTokenStats"] == TOKENS
    assert (await used(session, proxy, "inner"))["dayTokenStats"] == TOKENS
    for key in (seen["api_key"], inner["api_key"]):
        assert (await call(session, proxy, "/v1/user/info", key))[0] == 401


async def test_a_shared_key_originator_is_carried_down_the_chain(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    status, created = await call(
        session, proxy, "/v1/sharedkeys", KEY, {"name": "friend", "tokens": 1000}
    )
    assert status == 201, created
    SECRETS.append(created["key"])
    asks = {"base": proxy.url(""), "info": True, "inner": "inner"}
    status, body = await chat(session, proxy, "agent", key=created["key"], asks=asks)
    assert status == 200, body
    calls = seen_by_adapter(body)["calls"]
    assert calls["info"]["body"]["project"] == "p1"
    assert calls["inner"]["status"] == 200
    # The shared key's own use counts both hops; so do its owner's counters.
    status, shared = await call(session, proxy, f"/v1/sharedkeys/{created['id']}", KEY)
    assert shared["utilized"] == 2 * TOKENS
    assert (await used(session, proxy, "inner"))["dayTokenStats"] == TOKENS


async def test_a_user_jwt_may_come_with_a_per_request_key_only(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    jwt = "Bearer eyJ.user.jwt"
    asks = {"base": proxy.url(""), "inner": "forwarding", "authorization": jwt}
    status, body = await chat(session, proxy, "agent", asks=asks)
    assert status == 200, body
    inner = seen_by_adapter(body)["calls"]["inner"]
    assert inner["status"] == 200
    # forwardAuthToken: the user's JWT goes on; the adapter's key is a new one.
    forwarded = json.loads(inner["body"]["choices"][0]["message"]["content"])
    assert forwarded["authorization"] == "eyJ.user.jwt"
    # A config key with another Authorization is still refused.
    status, error = await call(
        session,
        proxy,
        "/openai/deployments/chat/chat/completions",
        KEY,
        CHAT,
        Authorization=jwt,
    )
    assert status == 400
    assert error["error"]["message"] == (
        "Either API-KEY or Authorization header must be provided but not both"
    )


async def test_a_model_closed_to_per_request_keys_refuses_them(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    asks = {"base": proxy.url(""), "inner": "closed"}
    status, body = await chat(session, proxy, "agent", asks=asks)
    assert status == 200, body
    inner = seen_by_adapter(body)["calls"]["inner"]
    assert inner == {
        "status": 403,
        "body": {"error": {"message": "Forbidden deployment: closed", "code": "403"}},
    }
    assert (await chat(session, proxy, "closed"))[0] == 200  # the client's own key may
    made = await mint(proxy)  # nor on its feature endpoints (every route to the model)
    for path in ("/v1/closed/rate", "/v1/deployments/closed/tokenize"):
        assert (await call(session, proxy, path, made, {}))[0] == 403, path
    assert (await call(session, proxy, "/v1/closed/rate", KEY, {}))[0] == 200


async def test_a_call_back_works_on_another_instance_sharing_redis(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    cfg = config(adapter, backend)
    a = await start(make_proxy, cfg, tmp_path, redis_server.url)
    b = await start(make_proxy, cfg, tmp_path, redis_server.url)
    asks = {"base": b.url(""), "info": True, "inner": "inner"}
    status, body = await chat(session, a, "agent", asks=asks)
    await b.settle()
    assert status == 200, body
    seen = seen_by_adapter(body)
    calls = seen["calls"]
    assert calls["info"] == {"status": 200, "body": {"project": "p1", "roles": ["user"]}}
    assert calls["inner"]["status"] == 200
    # Charged to the originator, in the counters both instances share.
    assert (await used(session, a, "inner"))["dayTokenStats"] == TOKENS
    assert (await used(session, b, "agent"))["dayTokenStats"] == TOKENS
    # Over: refused on both instances, and nothing is left in Redis.
    for proxy in (a, b):
        assert (await call(session, proxy, "/v1/user/info", seen["api_key"]))[0] == 401
    assert redis_server.command("KEYS", "dp:prk:*") == []


async def test_a_refused_request_uses_up_no_request_window(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    cfg = config(adapter, backend)
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), max_body=1024)
    proxy = await make_proxy(cfg, settings=settings)
    path = "/openai/deployments/chat/chat/completions"
    refused = [
        (401, await call(session, proxy, path, new_key(), CHAT)),
        (401, await call(session, proxy, path, "", CHAT)),
        (404, await call(session, proxy, "/openai/deployments/nope/chat/completions", KEY, CHAT)),
        (404, await call(session, proxy, "/openai/v1/chat/completions", KEY, {"model": "nope"})),
        (403, await call(session, proxy, path, NARROW, CHAT)),
        (400, await call(session, proxy, path, KEY, CHAT, Authorization="Bearer other")),
        (400, await call(session, proxy, "/openai/v1/chat/completions", KEY, CHAT)),  # no model
        (400, await call(session, proxy, path, KEY, [1, 2])),
        (413, await call(session, proxy, path, KEY, {"messages": [{"content": "x" * 2000}]})),
    ]
    resp = await session.post(
        proxy.url(path), data=b"{}", headers={"Api-Key": KEY, "Content-Type": "text/plain"}
    )
    refused.append((415, (resp.status, await resp.read())))
    resp = await session.post(
        proxy.url(path),
        data=b"{not json",
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
    )
    refused.append((400, (resp.status, await resp.read())))
    for expected, (status, body) in refused:
        assert status == expected, body
    await proxy.settle()
    counts = await used(session, proxy, "chat")
    assert counts["hourRequestStats"] == 0 and counts["dayRequestStats"] == 0
    assert (await chat(session, proxy, "chat"))[0] == 200
    counts = await used(session, proxy, "chat")
    assert counts["hourRequestStats"] == 1 and counts["dayRequestStats"] == 1


async def mint(proxy: Proxy, secret: str = KEY) -> str:
    """A per-request key made as the proxy makes one for a request of ``secret``'s."""
    shared = proxy.app[SHARED]
    key = proxy.store.snapshot.key_for_secret(secret)
    found = await shared.find(secret)
    if key is None:
        assert found is not None
        key = proxy.store.snapshot.keys[found.owner]
    assert shared.per_request is not None
    made = await shared.per_request.mint(Principal(key, secret, found))
    SECRETS.append(made)
    return made


async def test_a_per_request_key_works_where_the_originators_key_does_until_it_ends(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    proxy = await start(make_proxy, config(adapter, backend), tmp_path)
    made = await mint(proxy)
    for path in ("/v1/user/info", "/v1/user/limits", "/openai/models", "/openai/deployments"):
        assert (await call(session, proxy, path, made))[0] == 200, path
    assert (await call(session, proxy, "/v1/deployments/chat/limits", made))[0] == 200
    status, _ = await call(session, proxy, "/v1/sharedkeys", made, {"name": "n", "tokens": 1})
    assert status == 403  # a per-request key does not manage shared keys
    # A per-request key of a shared key ends with the shared key.
    status, created = await call(session, proxy, "/v1/sharedkeys", KEY, {"name": "n", "tokens": 9})
    SECRETS.append(created["key"])
    through_shared = await mint(proxy, created["key"])
    assert (await call(session, proxy, "/v1/user/info", through_shared))[0] == 200
    assert (await call(session, proxy, f"/v1/sharedkeys/{created['id']}", KEY, None))[0] == 200
    resp = await session.delete(
        proxy.url(f"/v1/sharedkeys/{created['id']}"), headers={"Api-Key": KEY}
    )
    assert resp.status == 204
    assert (await call(session, proxy, "/v1/user/info", through_shared))[0] == 401
    # And every per-request key ends with its originator's key (here: disabled by a reload).
    cfg = config(adapter, backend)
    cfg["keys"][KEY]["disabled"] = True
    proxy.path.write_text(json.dumps(cfg))
    assert proxy.store.reload().applied
    status, error = await call(session, proxy, "/v1/user/info", made)
    assert (status, error["error"]["message"]) == (401, "Unknown api key")
    # An unknown per-request key, and one with a user's JWT beside it: 401, not 400.
    unknown = PER_REQUEST_KEY_PREFIX + "x" * 43
    status, _ = await call(session, proxy, "/v1/user/info", unknown, Authorization="Bearer jwt")
    assert status == 401


async def test_while_redis_is_down_keys_work_on_the_instance_that_made_them(
    adapter: str,
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        cfg = config(adapter, backend)
        a = await start(make_proxy, cfg, tmp_path, redis.url)
        b = await start(make_proxy, cfg, tmp_path, redis.url)
        before = await mint(a)
        assert (await call(session, b, "/v1/user/info", before))[0] == 200
        redis.kill()
        status, error = await call(session, b, "/v1/user/info", before)
        assert (status, error["error"]["message"]) == (503, "The shared key store is unavailable")
        assert (await call(session, a, "/v1/user/info", before))[0] == 200
        during = await mint(a)  # in memory only
        assert (await call(session, a, "/v1/user/info", during))[0] == 200
        status, body = await chat(session, a, "adapter")  # and an adapter is still served
        assert status == 200
        seen_by_adapter(body)
    finally:
        redis.stop()


async def test_an_abandoned_streams_key_ends_when_its_drain_does(
    aiohttp_server: AiohttpServer, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    got: list[str] = []

    async def slow_adapter(request: web.Request) -> web.StreamResponse:
        got.append(request.headers["Api-Key"])
        SECRETS.append(got[-1])
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"w "}}]}\n\n')
            await asyncio.sleep(0.05)
        usage = b'{"prompt_tokens":1,"completion_tokens":10,"total_tokens":11}'
        await resp.write(b'data: {"choices":[],"usage":' + usage + b"}\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/chat", slow_adapter)
    adapter = await aiohttp_server(app)
    cfg = {
        "models": {"slow": {"type": "chat", "endpoint": str(adapter.make_url("/chat"))}},
        "roles": {"user": {"limits": {"slow": {"day": 1000}}}},
        "keys": {KEY: {"project": "p1", "role": "user"}},
    }
    proxy = await make_proxy(cfg)
    resp = await session.post(
        proxy.url("/openai/deployments/slow/chat/completions"),
        json={"messages": [], "stream": True},
        headers={"Api-Key": KEY},
    )
    assert resp.status == 200
    await resp.content.readany()
    resp.close()  # the client leaves; the proxy reads on for the usage
    assert (await call(session, proxy, "/v1/user/info", got[0]))[0] == 200
    for _ in range(500):  # the drain is over once the usage is charged (10 s at most)
        if (await used(session, proxy, "slow"))["dayTokenStats"] == 11:
            break
        await asyncio.sleep(0.02)
    assert (await call(session, proxy, "/v1/user/info", got[0]))[0] == 401


def test_the_config_takes_accessible_by_per_request_key_as_a_boolean() -> None:
    flag = "accessibleByPerRequestKey"

    def build(value: object) -> Any:
        cfg = {
            "models": {"m": endpoint("http://127.0.0.1:1", "m", features={flag: value})},
            "keys": {KEY: {"project": "p1", "role": "user"}},
            "roles": {"user": {}},
        }
        return build_snapshot([Source("aidial.config.json", json.dumps(cfg).encode())], {})

    assert build(False).models["m"].features[flag] is False
    with pytest.raises(ConfigError) as refused:
        build("no")
    assert [(p.path, p.message) for p in refused.value.problems] == [
        (f"$.models.m.features.{flag}", 'must be true or false (got "no")')
    ]


async def test_a_mint_cancelled_while_redis_answers_leaves_no_key_behind() -> None:
    """The request that mints a key is cancelled (the client left, a shutdown) while Redis
    takes the key: nobody will end that key, so it must not stay live on the instance."""
    cfg = {"keys": {KEY: {"project": "p1", "role": "user"}}, "roles": {"user": {}}}
    snapshot = build_snapshot([Source("aidial.config.json", json.dumps(cfg).encode())], {})
    key = snapshot.key_for_secret(KEY)
    assert key is not None
    answering = asyncio.Event()

    class SlowRedis:
        client = None

        async def call(self, command: Any) -> Any:
            answering.set()
            await asyncio.sleep(10)

    keys = PerRequestKeys(SlowRedis())
    minting = asyncio.ensure_future(keys.mint(Principal(key=key, secret=KEY)))
    await asyncio.wait_for(answering.wait(), 5)
    assert len(keys) == 1  # (live while Redis takes it)
    minting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await minting
    assert len(keys) == 0
