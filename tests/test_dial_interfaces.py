"""DIAL's `interfaces`, `defaultHeaders` and `X-UPSTREAM-ID`, against a real backend that
records the path and headers of every request it gets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp

from tests.conftest import Backend, Proxy, ProxyFactory, new_key

KEY = new_key()
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}
EMBED = {"input": "one two three"}


def config(**models: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": models,
        "keys": {KEY: {"project": "p", "role": "default"}},
        "roles": {"default": {"limits": {name: {"requestDay": 2} for name in models}}},
    }


async def post(
    proxy: Proxy, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(proxy.url(path), json=body, headers={"Api-Key": KEY, **headers})
        data = await resp.json(content_type=None)
        return resp.status, data, resp


def received(backend: Backend) -> list[tuple[str, str]]:
    return [(r.path, r.query_string) for r in backend.control.requests]


async def test_interface_forwards_to_base_url_and_the_path_it_came_in_on(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    base = backend.url("/adapter/")  # (a trailing slash is dropped)
    proxy = await make_proxy(
        config(
            gpt={"type": "chat", "interfaces": {"openaiChatCompletions": {"base_url": base}}},
            ada={"type": "embedding", "interfaces": {"openaiEmbeddings": {"base_url": base}}},
        )
    )
    status, _, _ = await post(proxy, "/openai/deployments/gpt/chat/completions?api-version=1", CHAT)
    assert status == 200
    status, _, _ = await post(proxy, "/openai/v1/chat/completions", {**CHAT, "model": "gpt"})
    assert status == 200
    status, _, _ = await post(proxy, "/openai/deployments/ada/embeddings?a=1&b", EMBED)
    assert status == 200
    assert received(backend) == [
        ("/adapter/openai/deployments/gpt/chat/completions", "api-version=1"),
        ("/adapter/openai/v1/chat/completions", ""),
        ("/adapter/openai/deployments/ada/embeddings", "a=1&b"),
    ]


async def test_the_interfaces_map_is_strict_and_a_legacy_endpoint_serves_every_post(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    base = backend.url("/adapter")
    proxy = await make_proxy(
        config(
            chat={"type": "chat", "interfaces": {"openaiChatCompletions": {"base_url": base}}},
            emb={"type": "embedding", "interfaces": {"openaiEmbeddings": {"base_url": base}}},
            legacy={"type": "embedding", "endpoint": backend.url("/legacy/embeddings")},
        )
    )
    refused: list[tuple[str, dict[str, Any]]] = [
        ("/openai/deployments/chat/embeddings", EMBED),
        ("/openai/deployments/emb/chat/completions", CHAT),
        ("/openai/deployments/emb/completions", {"prompt": "x"}),
        ("/openai/deployments/emb/chat/completions", CHAT),  # (not counted: twice is fine)
    ]
    for path, body in refused:
        status, data, _ = await post(proxy, path, body)
        assert status == 503, (path, data)
        assert data["error"]["code"] == "503"
        assert "does not serve" in data["error"]["message"]
    assert backend.control.requests == []  # the proxy answers, not the backend
    # refused before the limits: the request windows (2 a day) counted none of them
    for _ in range(2):
        status, _, _ = await post(proxy, "/openai/deployments/emb/embeddings", EMBED)
        assert status == 200
    # (the backend answers a chat body at an embeddings path 400: it got it, verbatim)
    await post(proxy, "/openai/deployments/legacy/chat/completions", CHAT)
    status, _, _ = await post(proxy, "/openai/deployments/legacy/embeddings", EMBED)
    assert status == 200
    assert [p for p, _ in received(backend)][-2:] == ["/legacy/embeddings"] * 2


async def test_interfaces_win_over_the_legacy_endpoint_for_their_type(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    model = {
        "type": "chat",
        "endpoint": backend.url("/legacy/chat/completions"),
        "interfaces": {"openaiChatCompletions": {"base_url": backend.url("/iface")}},
    }
    proxy = await make_proxy(config(m=model))
    assert (await post(proxy, "/openai/deployments/m/chat/completions", CHAT))[0] == 200
    await post(proxy, "/openai/deployments/m/embeddings", EMBED)  # (the backend's 400: a chat path)
    assert [p for p, _ in received(backend)] == [
        "/iface/openai/deployments/m/chat/completions",
        "/legacy/chat/completions",  # embeddings: no interface of its type, the legacy endpoint
    ]


async def test_listings_report_the_interfaces(backend: Backend, make_proxy: ProxyFactory) -> None:
    base = backend.url("/adapter")
    proxy = await make_proxy(
        config(
            both={
                "type": "chat",
                "interfaces": {
                    "anthropicMessages": {"base_url": base},
                    "openaiChatCompletions": {"base_url": base},
                },
            },
            legacy={"type": "embedding", "endpoint": backend.url("/e/embeddings")},
        )
    )
    async with aiohttp.ClientSession() as s:
        for path in ("/openai/deployments", "/openai/models"):
            resp = await s.get(proxy.url(path), headers={"Api-Key": KEY})
            listed = {m["id"]: m["interfaces"] for m in (await resp.json())["data"]}
            assert listed == {
                "both": ["openaiChatCompletions", "anthropicMessages"],
                "legacy": ["openaiEmbeddings"],
            }


async def test_default_headers_precedence(backend: Backend, make_proxy: ProxyFactory) -> None:
    model = {
        "type": "chat",
        "defaultHeaders": {
            "X-Dial-Custom": "model",
            "X-Two": "model",
            "User-Agent": "default-agent",  # forwarded from a client: the client's wins
            "X-Request-Id": "default-id",  # the client sends none: the default
            "Api-Key": "default-key",  # never forwarded
            "X-UPSTREAM-ENDPOINT": "http://elsewhere",  # the proxy's own
            "Connection": "x-default",  # hop-by-hop
        },
        "upstreams": [{"endpoint": "http://provider/v1", "key": "provider-key"}],
        "interfaces": {
            "openaiChatCompletions": {
                "base_url": backend.url("/adapter"),
                "defaultHeaders": {"x-two": "interface"},  # laid over the model's
            }
        },
    }
    proxy = await make_proxy(config(m=model))
    status, _, _ = await post(
        proxy,
        "/openai/deployments/m/chat/completions",
        CHAT,
        **{"User-Agent": "client-agent", "X-Dial-Custom": "client"},  # (not one we forward)
    )
    assert status == 200
    headers = backend.control.requests[0].headers
    assert headers["User-Agent"] == "client-agent"
    assert headers["X-Request-Id"] == "default-id"
    assert headers.getall("X-Dial-Custom") == ["model"]
    assert headers.getall("X-Two") == ["interface"]
    assert headers.getall("X-UPSTREAM-ENDPOINT") == ["http://provider/v1"]
    assert headers.getall("X-UPSTREAM-KEY") == ["provider-key"]
    assert "default-key" not in headers.getall("Api-Key", [])
    assert KEY not in headers.values()
    assert "x-default" not in headers.getall("Connection", [])


async def test_default_headers_of_a_direct_model_do_not_replace_the_upstream_key(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    model = {
        "type": "chat",
        "defaultHeaders": {"Authorization": "Bearer default", "x-tenant": "t1"},
        "upstreams": [{"endpoint": backend.url(), "key": "provider-key"}],
    }
    proxy = await make_proxy(config(m=model))
    assert (await post(proxy, "/openai/deployments/m/chat/completions", CHAT))[0] == 200
    headers = backend.control.requests[0].headers
    assert headers.getall("Authorization") == ["Bearer provider-key"]
    assert headers["x-tenant"] == "t1"


def pinned_config(backend: Backend, **model: Any) -> dict[str, Any]:
    return config(
        m={
            "type": "chat",
            "upstreams": [
                {"id": "a", "endpoint": backend.url("/a/v1/chat/completions"), "key": "ka"},
                {"id": "b", "endpoint": backend.url("/b/v1/chat/completions"), "key": "kb"},
            ],
        }
        | model
    ) | {"roles": {}}


async def test_x_upstream_id_pins_the_request(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(pinned_config(backend))
    for _ in range(4):
        status, _, _ = await post(
            proxy, "/openai/deployments/m/chat/completions", CHAT, **{"X-UPSTREAM-ID": "b"}
        )
        assert status == 200
    assert [p for p, _ in received(backend)] == ["/b/v1/chat/completions"] * 4
    assert "X-UPSTREAM-ID" not in backend.control.requests[0].headers
    for _ in range(4):  # without it, round-robin over both
        assert (await post(proxy, "/openai/deployments/m/chat/completions", CHAT))[0] == 200
    assert Counter(p.split("/")[1] for p, _ in received(backend)[4:]) == {"a": 2, "b": 2}


async def test_a_pinned_upstream_that_fails_is_not_replaced(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(pinned_config(backend))
    backend.control.fail_next(503)
    status, data, _ = await post(
        proxy, "/openai/deployments/m/chat/completions", CHAT, **{"X-UPSTREAM-ID": "a"}
    )
    assert (status, data["error"]["message"]) == (502, "No route")
    assert [p for p, _ in received(backend)] == ["/a/v1/chat/completions"]


async def test_an_unknown_upstream_id_is_a_400(backend: Backend, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        pinned_config(backend, endpoint=backend.url("/adapter/chat/completions"))
    )
    status, data, _ = await post(
        proxy, "/openai/deployments/m/chat/completions", CHAT, **{"X-UPSTREAM-ID": "c"}
    )
    assert status == 400
    assert data["error"] == {"message": "Deployment m has no upstream with id 'c'", "code": "400"}
    assert backend.control.requests == []
    status, _, _ = await post(  # through the adapter: the pinned upstream in X-UPSTREAM-*
        proxy, "/openai/deployments/m/chat/completions", CHAT, **{"X-UPSTREAM-ID": "b"}
    )
    assert status == 200
    sent = backend.control.requests[0]
    assert sent.path == "/adapter/chat/completions"
    assert sent.headers["X-UPSTREAM-ENDPOINT"] == backend.url("/b/v1/chat/completions")
    assert sent.headers["X-UPSTREAM-KEY"] == "kb"
