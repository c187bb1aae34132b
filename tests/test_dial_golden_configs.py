"""DIAL Core's own test configs (tests/dial_configs, see its README) load in dialproxy too.

Each is checked the way ``dialproxy validate`` checks a file: the published schema and the
loader, with a dummy value for every ``${VAR}`` it references; warnings are allowed (they say
what dialproxy does not serve), errors are not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dialproxy.cli import validate
from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Snapshot
from dialproxy.config.parse import read_sources
from dialproxy.errors import ConfigError
from tests.conftest import Backend, ProxyFactory

CONFIGS = Path(__file__).parent / "dial_configs"
FILES = sorted(CONFIGS.glob("*.json"))


def load(path: Path) -> Snapshot:
    env = {name: "dummy" for name in re.findall(r"\$\{(\w+)\}", path.read_text("utf-8"))}
    try:
        return build_snapshot(read_sources([path]), env)
    except ConfigError as e:  # pragma: no cover - the failure message
        errors = [str(p) for p in e.problems if p.severity == "error"]
        raise AssertionError("\n".join(errors)) from None


def test_at_least_a_dozen() -> None:
    assert len(FILES) >= 12


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_dial_config_loads(path: Path) -> None:
    load(path)


def test_validate_cli_accepts_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate([str(p) for p in FILES[:1]], strict=False, fmt="json") == 0
    for path in FILES:
        assert validate([str(path)], strict=False, fmt="json") == 0, path.name
    capsys.readouterr()


def test_interfaces_are_served_as_dial_serves_them() -> None:
    snapshot = load(CONFIGS / "openai-embeddings.json")
    models = snapshot.models
    # declared by `interfaces` alone: only the declared interface is served
    assert set(models["embeddings-iface"].serving) == {"embeddings"}
    assert set(models["embeddings-chat-only"].serving) == {"chat/completions", "completions"}
    # a legacy endpoint keeps serving every deployments POST, verbatim
    legacy = models["embeddings-legacy"]
    assert set(legacy.serving) == {"chat/completions", "completions", "embeddings"}
    route = legacy.serving["embeddings"].routes[0]
    assert route.url == "http://localhost:4848/openai/deployments/ada/embeddings"
    assert not route.append_path
    route = models["embeddings-iface"].serving["embeddings"].routes[0]
    assert (route.url, route.append_path) == ("http://localhost:4848", True)
    assert models["embeddings-iface"].listing("deployment")["interfaces"] == ["openaiEmbeddings"]
    assert legacy.listing("deployment")["interfaces"] == ["openaiEmbeddings"]
    assert legacy.listing("deployment")["capabilities"]["chat_completion"] is False


def test_model_base_url_and_upstream_ids() -> None:
    models = load(CONFIGS / "interface-feature-overrides.json").models
    inheriting = models["feature-inheritance"]  # entries without base_url: the model's baseUrl
    assert set(inheriting.serving) == {
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "messages",
        "messages/count_tokens",
    }
    routes = inheriting.serving["chat/completions"].routes
    assert [(r.url, r.append_path) for r in routes] == [("http://localhost:4848", True)]
    assert routes[0].headers["X-UPSTREAM-ENDPOINT"] == "http://provider"  # DIAL's adapter shape
    assert set(inheriting.serving["embeddings"].by_id) == {"upstream"}
    assert inheriting.listing("model")["interfaces"] == [
        "openaiChatCompletions",
        "openaiEmbeddings",
        "openaiResponses",
        "anthropicMessages",
    ]
    translator = models["feature-translator"]  # a translator entry is not served by dialproxy
    assert set(translator.serving) == {"chat/completions", "completions"}


def test_default_headers_are_merged_per_interface() -> None:
    model = load(CONFIGS / "deployment-interface-configs.json").models["gpt-5.4-mini"]
    assert dict(model.serving["chat/completions"].default_headers) == {
        "x-dial-cache-policy": "cache-priority",
        "x-dial-custom-header": "foo-bar",
    }
    assert "embeddings" not in model.serving
    assert model.listing("deployment")["interfaces"] == [
        "openaiChatCompletions",
        "openaiResponses",
        "anthropicMessages",
    ]


def test_role_share_loads() -> None:
    snapshot = load(CONFIGS / "share-limit-config.json")
    assert "share-limited" in snapshot.roles


async def test_dial_embeddings_config_is_served_as_dial_serves_it(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    """DIAL's own openai-embeddings.json, its adapter address pointed at the test backend."""
    text = (CONFIGS / "openai-embeddings.json").read_text("utf-8")
    proxy = await make_proxy(json.loads(text.replace("http://localhost:4848", backend.url(""))))
    headers = {"Api-Key": "proxyKey1"}
    async with aiohttp.ClientSession() as s:

        async def post(deployment: str, api: str, body: dict[str, Any]) -> int:
            path = f"/openai/deployments/{deployment}/{api}"
            async with s.post(proxy.url(path), json=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        assert await post("embeddings-iface", "embeddings", {"input": "a b"}) == 200
        assert await post("embeddings-override", "embeddings", {"input": "a b"}) == 200
        assert await post("embeddings-chat-only", "embeddings", {"input": "a b"}) == 503
        assert await post("embeddings-iface", "chat/completions", {"messages": []}) == 503
        assert await post("embeddings-legacy", "embeddings", {"input": "a b"}) == 200
    sent = backend.control.requests
    assert [r.path for r in sent] == [
        "/openai/deployments/embeddings-iface/embeddings",
        "/openai/deployments/embeddings-override/embeddings",
        "/openai/deployments/ada/embeddings",  # the legacy endpoint, verbatim
    ]
    assert sent[1].json["model"] == "text-embedding-ada-002"  # overrideName
