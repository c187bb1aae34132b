"""Config keys end to end through the real app: digests, validity, per-key quotas and models,
``/v1/user/limits``, and the whole life of a key through ``dialproxy keys`` and a running
proxy, on a controlled clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from dialproxy import cli
from dialproxy.text import key_digest
from dialproxy.web.appkeys import SHARED
from tests.conftest import (
    SECRETS,
    Backend,
    Clock,
    Proxy,
    ProxyFactory,
    chat_model,
    clear_of_minute_boundary,
    new_key,
)

CHAT = {"messages": [{"role": "user", "content": "one two three"}]}  # 3 + 4 = 7 tokens
NOW = datetime.now(UTC).replace(microsecond=0)


def stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def models(backend: Backend) -> dict[str, Any]:
    return {"chat": chat_model(backend), "other": chat_model(backend), "third": chat_model(backend)}


async def call(
    s: aiohttp.ClientSession, proxy: Proxy, key: str, model: str = "chat"
) -> tuple[int, Any]:
    resp = await s.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        json=CHAT,
        headers={"Api-Key": key},
    )
    data = await resp.json()
    await proxy.settle()
    return resp.status, data


async def get(s: aiohttp.ClientSession, proxy: Proxy, key: str, path: str) -> tuple[int, Any]:
    resp = await s.get(proxy.url(path), headers={"Authorization": f"Bearer {key}"})
    return resp.status, await resp.json()


def with_clock(proxy: Proxy) -> Clock:
    clock = Clock()
    proxy.app[SHARED].clock = clock
    return clock


async def test_digests_names_and_the_validity_window(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    hashed, plain, later, expiring, disabled = (new_key() for _ in range(5))
    proxy = await make_proxy(
        {
            "models": models(backend),
            "roles": {"user": {}},
            "keys": {
                "sha256:" + key_digest(hashed): {
                    "project": "p",
                    "role": "user",
                    "name": "hashed",
                    "description": "written as its digest",
                },
                plain: {"project": "p", "role": "user"},
                "sha256:" + key_digest(later): {
                    "project": "p",
                    "role": "user",
                    "notBefore": stamp(NOW + timedelta(hours=1)),
                },
                "sha256:" + key_digest(expiring): {
                    "project": "p",
                    "role": "user",
                    "expiresAt": stamp(NOW + timedelta(hours=1)),
                },
                "sha256:" + key_digest(disabled): {
                    "project": "p",
                    "role": "user",
                    "disabled": True,
                },
            },
        }
    )
    clock = with_clock(proxy)
    clock.now = NOW
    assert (await call(session, proxy, hashed))[0] == 200
    assert (await call(session, proxy, plain))[0] == 200
    assert await get(session, proxy, hashed, "/v1/user/info") == (
        200,
        {"project": "p", "roles": ["user"]},
    )
    refused = (401, {"error": {"message": "Unknown api key", "code": "401"}})
    assert await call(session, proxy, later) == refused
    assert await call(session, proxy, disabled) == refused
    assert await get(session, proxy, disabled, "/openai/models") == refused
    assert (await call(session, proxy, expiring))[0] == 200
    assert await call(session, proxy, "sha256:" + key_digest(hashed)) == refused  # not a secret

    clock.advance(hours=1)  # notBefore and expiresAt are both that instant
    assert (await call(session, proxy, later))[0] == 200
    assert await call(session, proxy, expiring) == refused
    assert await get(session, proxy, expiring, "/v1/user/info") == refused


async def test_the_keys_quota_and_the_roles_limit_must_both_pass(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    quota, teammate, star, tokens, denied = (new_key() for _ in range(5))
    proxy = await make_proxy(
        {
            "models": models(backend),
            "roles": {"user": {"limits": {"chat": {"requestHour": 3}}}},
            "keys": {
                quota: {"project": "team", "role": "user", "limits": {"chat": {"requestHour": 2}}},
                teammate: {"project": "team", "role": "user"},
                star: {
                    "project": "star",
                    "role": "user",
                    "limits": {"*": {"requestHour": 1}, "other": {"requestMinute": "2"}},
                },
                tokens: {"project": "tokens", "role": "user", "limits": {"*": {"minute": 7}}},
                denied: {"project": "denied", "role": "user", "limits": {"other": {"day": 0}}},
            },
        }
    )
    # The key's own quota (2), counted for it alone; the project's (3), for the team.
    await clear_of_minute_boundary()  # (the minute windows' requests in one bucket)
    assert [(await call(session, proxy, quota))[0] for _ in range(3)] == [200, 200, 429]
    assert [(await call(session, proxy, teammate))[0] for _ in range(2)] == [200, 429]
    _, error = await call(session, proxy, teammate)
    assert error["error"]["message"] == "Hit request rate limit. Hour limit: 3 / 3 requests."

    # "*" applies to every model without an entry of its own, each counted apart.
    assert [(await call(session, proxy, star, "chat"))[0] for _ in range(2)] == [200, 429]
    assert [(await call(session, proxy, star, "third"))[0] for _ in range(2)] == [200, 429]
    assert [(await call(session, proxy, star, "other"))[0] for _ in range(3)] == [200, 200, 429]

    # Token quotas on the key; a key limit of 0 denies the model.
    assert [(await call(session, proxy, tokens, "chat"))[0] for _ in range(2)] == [200, 429]
    assert (await call(session, proxy, tokens, "other"))[0] == 200
    status, error = await call(session, proxy, denied, "other")
    assert (status, error["error"]["message"]) == (403, "Access denied")
    assert (await call(session, proxy, denied, "chat"))[0] == 200


async def test_a_key_restricted_to_some_models_sees_only_those(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    narrow = new_key()
    proxy = await make_proxy(
        {
            "models": models(backend) | {"admins": chat_model(backend, userRoles=["admin"])},
            "roles": {"user": {}, "admin": {}},
            "keys": {narrow: {"project": "p", "role": "user", "models": ["chat", "admins"]}},
        }
    )
    for path in ("/openai/models", "/openai/deployments", "/openai/v1/models"):
        status, listing = await get(session, proxy, narrow, path)
        assert status == 200 and [m["id"] for m in listing["data"]] == ["chat"], path
    assert (await get(session, proxy, narrow, "/openai/models/chat"))[0] == 200
    status, error = await get(session, proxy, narrow, "/openai/deployments/other")
    assert (status, error["error"]["message"]) == (403, "Forbidden deployment: other")
    assert (await call(session, proxy, narrow, "chat"))[0] == 200
    assert (await call(session, proxy, narrow, "other"))[0] == 403
    assert (await call(session, proxy, narrow, "admins"))[0] == 403  # its roles still apply
    status, limits = await get(session, proxy, narrow, "/v1/user/limits")
    assert status == 200 and list(limits["models"]) == ["chat"]


async def test_user_limits_shows_every_window_labelled(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    key = new_key()
    proxy = await make_proxy(
        {
            "models": models(backend),
            "roles": {
                "user": {
                    "limits": {
                        "chat": {"minute": 100, "requestDay": 50},
                        "third": {"minute": 0},
                    }
                }
            },
            "keys": {key: {"project": "p", "role": "user", "limits": {"chat": {"day": 20}}}},
        }
    )
    assert (await call(session, proxy, key))[0] == 200
    status, body = await get(session, proxy, key, "/v1/user/limits")
    assert status == 200
    assert body["project"] == "p" and body["key"] == key_digest(key)[:8]
    assert "sharedKey" not in body
    assert set(body["models"]) == {"chat", "other"}  # "third" is denied: not callable
    assert body["models"]["other"] == {"limits": []}  # unlimited
    windows = {(w["scope"], w["type"], w["window"]): w for w in body["models"]["chat"]["limits"]}
    assert set(windows) == {
        ("project", "tokens", "minute"),
        ("project", "requests", "day"),
        ("key", "tokens", "day"),
    }
    minute = windows["project", "tokens", "minute"]
    assert (minute["limit"], minute["used"], minute["remaining"]) == (100, 7, 93)
    assert 0 < minute["resetSeconds"] <= 120 and minute["resetAt"].endswith("Z")
    assert (
        windows["project", "requests", "day"]["used"],
        windows["key", "tokens", "day"]["used"],
    ) == (
        1,
        7,
    )
    status, _ = await get(session, proxy, new_key(), "/v1/user/limits")
    assert status == 401


def keys_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_whole_life_of_a_key_through_the_cli_and_a_running_proxy(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = new_key()
    config = {
        "models": models(backend),
        "roles": {"user": {"limits": {"chat": {"day": 1000}}}},
        "keys": {admin: {"project": "ops", "role": "user"}},
    }
    proxy = await make_proxy(config)
    path = str(proxy.path)
    proxy.path.write_text(json.dumps(config, indent=2) + "\n")
    clock = with_clock(proxy)
    seen: list[str] = []  # what the CLI printed besides the new secrets: searched at the end

    def cli_ok(*args: str) -> str:
        code, out, err = keys_cli(capsys, *args)
        assert code == 0, err
        seen.append(err)
        assert cli.main(["validate", path]) == 0
        capsys.readouterr()
        return out

    with capture_logs() as logs:
        # add: the file gets the digest, the secret is printed once.
        out = cli_ok("add", "--config", path, "--project", "team", "--role", "user", "--name", "ci")
        first = out.strip()
        SECRETS.append(first)
        assert first.startswith("dpk_") and first not in proxy.path.read_text()
        assert "sha256:" + key_digest(first) in proxy.path.read_text()
        assert (await call(session, proxy, first))[0] == 401  # not until the proxy reloads
        assert proxy.store.reload().applied
        assert (await call(session, proxy, first))[0] == 200

        # list: fingerprint, name, project, roles, state; never a secret.
        seen.append(cli_ok("list", "--config", path, "--format", "json"))
        listed = json.loads(seen[-1])
        mine = next(k for k in listed if k["name"] == "ci")
        assert mine == {
            "fingerprint": key_digest(first)[:8],
            "name": "ci",
            "project": "team",
            "roles": ["user"],
            "notBefore": None,
            "expiresAt": None,
            "state": "active",
            "stored": "sha256",
            "file": path,
        }
        seen.append(cli_ok("list", "--config", path))

        # rotate with a week's overlap: both work until the old one expires.
        rotated = json.loads(
            cli_ok(
                "rotate", "--config", path, key_digest(first)[:8], "--overlap", "7d",
                "--format", "json",
            )
        )  # fmt: skip
        second = rotated["key"]
        SECRETS.append(second)
        assert rotated["replaces"] == key_digest(first)[:8]
        assert (rotated["project"], rotated["role"], rotated["name"]) == ("team", "user", "ci")
        assert proxy.store.reload().applied
        assert (await call(session, proxy, first))[0] == 200
        assert (await call(session, proxy, second))[0] == 200
        clock.advance(days=6, hours=23)
        assert (await call(session, proxy, first))[0] == 200
        clock.advance(hours=2)
        assert (await call(session, proxy, first))[0] == 401
        assert (await call(session, proxy, second))[0] == 200
        states = {
            k["fingerprint"]: k["state"]
            for k in json.loads(cli_ok("list", "--config", path, "--format", "json"))
        }
        assert states[key_digest(first)[:8]] == "active"  # the CLI's clock is the real one
        assert states[key_digest(second)[:8]] == "active"

        # revoke: refused at the next reload.
        cli_ok("revoke", "--config", path, key_digest(second)[:10])
        assert proxy.store.reload().applied
        assert (await call(session, proxy, second))[0] == 401
        states = {
            k["fingerprint"]: k["state"]
            for k in json.loads(cli_ok("list", "--config", path, "--format", "json"))
        }
        assert states[key_digest(second)[:8]] == "disabled"

        # expire: a key added for 30 days stops on the 30th.
        third = cli_ok(
            "add", "--config", path, "--project", "team", "--role", "user", "--expires", "30d"
        ).strip()
        SECRETS.append(third)
        assert proxy.store.reload().applied
        clock.now = datetime.now(UTC)
        assert (await call(session, proxy, third))[0] == 200
        clock.advance(days=29, hours=23)
        assert (await call(session, proxy, third))[0] == 200
        clock.advance(hours=2)
        assert (await call(session, proxy, third))[0] == 401
        assert (await call(session, proxy, admin))[0] == 200

    file_text = proxy.path.read_text()
    logged = repr(logs)
    assert any(e["event"] == "request" and e["status"] == 401 for e in logs)
    for secret in (first, second, third):
        assert secret not in file_text
        assert secret not in logged
        assert not any(secret in text for text in seen)
    assert admin not in logged
