"""The admin API through the real app: each key operation, each refusal, the config file
byte for byte except the change, and the running proxy serving the change."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from dialproxy import cli
from dialproxy.settings import Settings
from dialproxy.text import key_digest
from tests.conftest import Backend, Proxy, ProxyFactory, chat_model, new_key

CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


class Keys:
    def __init__(self) -> None:
        self.admin, self.viewer, self.user = new_key(), new_key(), new_key()


def config(backend: Backend, k: Keys) -> dict[str, Any]:
    return {
        "models": {"chat": chat_model(backend)},
        "roles": {"user": {}, "admin": {}, "viewer": {}},
        "keys": {
            "sha256:" + key_digest(k.admin): {"project": "ops", "role": "admin", "name": "root"},
            "sha256:" + key_digest(k.viewer): {"project": "ops", "role": "viewer"},
            "sha256:" + key_digest(k.user): {
                "project": "p",
                "role": "user",
                "name": "alice",
                "description": "the first user",
            },
        },
    }


async def start(make_proxy: ProxyFactory, backend: Backend, k: Keys) -> Proxy:
    """The proxy on an indented config file (so a splice shows what it kept)."""
    proxy = await make_proxy(config(backend, k))
    proxy.path.write_text(json.dumps(config(backend, k), indent=2) + "\n")
    assert not (await proxy.store.reload_async()).refused
    return proxy


async def call(s: aiohttp.ClientSession, proxy: Proxy, key: str) -> int:
    resp = await s.post(
        proxy.url("/openai/deployments/chat/chat/completions"),
        json=CHAT,
        headers={"Api-Key": key},
    )
    await resp.read()
    await proxy.settle()
    return resp.status


async def listing(s: aiohttp.ClientSession, proxy: Proxy, key: str) -> tuple[str, Any]:
    resp = await s.get(proxy.url("/v1/admin/keys"), headers={"Api-Key": key})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert resp.headers["ETag"] == body["etag"]
    return resp.headers["ETag"], body["keys"]


def change(before: str, after: str) -> tuple[str, str]:
    """What ``after`` differs from ``before`` by: (the text taken out, the text put in)."""
    i = 0
    while i < min(len(before), len(after)) and before[i] == after[i]:
        i += 1
    j = 0
    while j < min(len(before), len(after)) - i and before[-1 - j] == after[-1 - j]:
        j += 1
    return before[i : len(before) - j], after[i : len(after) - j]


def write_headers(key: str, tag: str | None) -> dict[str, str]:
    headers = {"Api-Key": key}
    if tag is not None:
        headers["If-Match"] = tag
    return headers


async def test_list_create_use_revoke(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    tag, listed = await listing(session, proxy, k.admin)
    alice = next(e for e in listed if e["name"] == "alice")
    assert alice == {
        "fingerprint": key_digest(k.user)[:8],
        "name": "alice",
        "description": "the first user",
        "project": "p",
        "roles": ["user"],
        "models": None,
        "limits": None,
        "canShare": False,
        "notBefore": None,
        "expiresAt": None,
        "state": "active",
        "stored": "sha256",
        "file": str(proxy.path),
        "usageToday": {
            "requests": 0,
            "errors": 0,
            "promptTokens": 0,
            "completionTokens": 0,
            "totalTokens": 0,
            "cost": 0.0,
        },
    }
    before = proxy.path.read_text()
    with capture_logs() as logs:
        resp = await session.post(
            proxy.url("/v1/admin/keys"),
            json={"project": "p", "roles": ["user"], "name": "bob", "expiresAt": "30d"},
            headers=write_headers(k.admin, tag),
        )
        assert resp.status == 201, await resp.text()
        created = await resp.json()
    secret = created["key"]
    assert secret.startswith("dpk_")
    assert created["fingerprint"] == key_digest(secret)[:8]
    assert created["reload"]["applied"] is True
    text = proxy.path.read_text()
    assert secret not in text and "sha256:" + key_digest(secret) in text
    # the file: the old text, the new entry spliced in, nothing else
    removed, added = change(before, text)
    assert removed == ""
    assert added.startswith(',\n    "sha256:' + key_digest(secret) + '": {\n      "project": "p"')
    assert '"name": "bob"' in added and "alice" not in added
    assert json.loads(text)["keys"] == json.loads(before)["keys"] | {
        "sha256:" + key_digest(secret): {
            "project": "p",
            "role": "user",
            "name": "bob",
            "expiresAt": json.loads(text)["keys"]["sha256:" + key_digest(secret)]["expiresAt"],
        }
    }
    audit = [e for e in logs if e.get("event") == "admin_write"]
    assert audit and audit[0]["who"] == key_digest(k.admin)[:8]
    assert audit[0]["action"] == "create" and secret not in json.dumps(audit, default=str)
    assert resp.headers["ETag"] == created["etag"]
    # the running proxy serves the new key
    assert await call(session, proxy, secret) == 200
    # revoke it: 401 from then on, and the entry kept with "disabled": true
    before = proxy.path.read_text()
    entry = json.loads(before)["keys"]["sha256:" + key_digest(secret)]
    with capture_logs() as logs:
        resp = await session.delete(
            proxy.url(f"/v1/admin/keys/{created['fingerprint']}"),
            headers=write_headers(k.admin, created["etag"]),
        )
        assert resp.status == 200, await resp.text()
        revoked = await resp.json()
    assert revoked["state"] == "disabled"
    assert await call(session, proxy, secret) == 401
    after = proxy.path.read_text()
    assert change(before, after) == ("", ',\n      "disabled": true')
    (line,) = [e for e in logs if e.get("event") == "admin_write"]
    assert line["who"] == key_digest(k.admin)[:8] and line["action"] == "revoke"
    assert line["key"] == created["fingerprint"] and line["file"] == str(proxy.path)
    assert line["before"] == entry and line["after"] == entry | {"disabled": True}
    assert secret not in json.dumps(line, default=str)
    # a revoked key is not rotated back to life: 409 saying why, nothing written
    resp = await session.post(
        proxy.url(f"/v1/admin/keys/{created['fingerprint']}/rotate"),
        json={},
        headers=write_headers(k.admin, revoked["etag"]),
    )
    assert resp.status == 409
    message = (await resp.json())["error"]["message"]
    assert message == (f"key {created['fingerprint']} is disabled (revoked): add a new key instead")
    assert proxy.path.read_text() == after


async def test_edit_and_rotate(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    before = proxy.path.read_text()
    for key in (k.viewer, k.user):  # neither may write
        resp = await session.patch(
            proxy.url(f"/v1/admin/keys/{fp}"), json={"name": "x"}, headers=write_headers(key, tag)
        )
        assert resp.status == 403
        resp = await session.delete(
            proxy.url(f"/v1/admin/keys/{fp}"), headers=write_headers(key, tag)
        )
        assert resp.status == 403
    resp = await session.patch(
        proxy.url(f"/v1/admin/keys/{fp}"), json={}, headers=write_headers(k.admin, tag)
    )
    assert resp.status == 400
    assert proxy.path.read_text() == before
    with capture_logs() as logs:
        resp = await session.patch(
            proxy.url(f"/v1/admin/keys/{fp}"),
            json={"name": "alice2", "description": "renamed", "roles": ["user", "viewer"]},
            headers=write_headers(k.admin, tag),
        )
        assert resp.status == 200, await resp.text()
        edited = await resp.json()
    (audit,) = [e for e in logs if e.get("event") == "admin_write"]
    assert audit["action"] == "edit" and audit["key"] == fp
    assert audit["before"]["name"] == "alice" and audit["after"]["name"] == "alice2"
    assert audit["after"]["roles"] == ["viewer"]
    assert edited["etag"] == '"' + hashlib.sha256(proxy.path.read_bytes()).hexdigest() + '"'
    assert edited["name"] == "alice2" and edited["roles"] == ["user", "viewer"]
    after = proxy.path.read_text()
    # byte for byte except the changed values (the second role after the first's "role")
    expected = before.replace('"name": "alice"', '"name": "alice2"').replace(
        '"description": "the first user"',
        '"description": "renamed",\n      "roles": ["viewer"]',
    )
    assert after == expected
    # the proxy serves the edit: the user key is now a viewer of the admin API
    resp = await session.get(proxy.url("/v1/admin/keys"), headers={"Api-Key": k.user})
    assert resp.status == 200
    # rotate: a new key for the same project and roles; the old works during the overlap
    with capture_logs() as logs:
        resp = await session.post(
            proxy.url(f"/v1/admin/keys/{fp}/rotate"),
            json={"overlap": "1h"},
            headers=write_headers(k.admin, edited["etag"]),
        )
        assert resp.status == 201, await resp.text()
        rotated = await resp.json()
    assert rotated["replaces"] == fp and rotated["project"] == "p"
    assert rotated["fingerprint"] == key_digest(rotated["key"])[:8]
    assert await call(session, proxy, rotated["key"]) == 200
    assert await call(session, proxy, k.user) == 200
    # the file: the old entry's expiresAt and the new entry (after it), nothing else
    old_entry = {
        "project": "p",
        "role": "user",
        "name": "alice2",
        "description": "renamed",
        "roles": ["viewer"],
    }
    assert proxy.path.read_text() == after.replace(
        '"roles": ["viewer"]\n    }',
        f'"roles": ["viewer"],\n      "expiresAt": "{rotated["oldExpiresAt"]}"\n    }},\n'
        f'    "sha256:{key_digest(rotated["key"])}": {{\n'
        '      "project": "p",\n      "role": "user",\n      "name": "alice2",\n'
        '      "description": "renamed",\n      "roles": ["viewer"]\n    }',
    )
    assert rotated["etag"] == '"' + hashlib.sha256(proxy.path.read_bytes()).hexdigest() + '"'
    # its audit line: the old key's entry before and after, and the new key's as created
    (audit,) = [e for e in logs if e.get("event") == "admin_write"]
    assert audit["who"] == key_digest(k.admin)[:8] and audit["action"] == "rotate"
    assert audit["key"] == fp and audit["file"] == str(proxy.path)
    assert audit["before"] == old_entry
    assert audit["after"] == old_entry | {"expiresAt": rotated["oldExpiresAt"]}
    assert audit["new_key"] == rotated["fingerprint"] and audit["new_after"] == old_entry
    logged = json.dumps(audit, default=str)
    assert rotated["key"] not in logged and k.user not in logged
    assert key_digest(rotated["key"]) not in logged  # (keys named by fingerprint only)


async def test_refusals(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    url = proxy.url("/v1/admin/keys")
    # a key without an admin role: 403, even to read; no key: 401
    resp = await session.get(url, headers={"Api-Key": k.user})
    assert resp.status == 403
    resp = await session.get(url)
    assert resp.status == 401
    tag, _ = await listing(session, proxy, k.viewer)  # a viewer reads
    original = proxy.path.read_bytes()
    new = {"project": "p", "roles": ["user"]}
    # a viewer may not write, nor may a user
    for key in (k.viewer, k.user):
        resp = await session.post(url, json=new, headers=write_headers(key, tag))
        assert resp.status == 403, key
    # without If-Match: 428; with a stale one: 412
    resp = await session.post(url, json=new, headers=write_headers(k.admin, None))
    assert resp.status == 428
    for stale in ('"0000"', "*"):
        resp = await session.post(url, json=new, headers=write_headers(k.admin, stale))
        assert resp.status == 412
    assert resp.headers["ETag"] == tag
    # cross-site: another Origin, or a body not declared JSON
    resp = await session.post(
        url, json=new, headers=write_headers(k.admin, tag) | {"Origin": "https://evil.example"}
    )
    assert resp.status == 403
    resp = await session.post(
        url,
        data=json.dumps(new),
        headers=write_headers(k.admin, tag) | {"Content-Type": "text/plain"},
    )
    assert resp.status == 415
    # the result would not validate (an unknown role): 422
    resp = await session.post(
        url, json={"project": "p", "roles": ["nope"]}, headers=write_headers(k.admin, tag)
    )
    assert resp.status == 422, await resp.text()
    assert "nope" in (await resp.json())["error"]["message"]
    # an unknown fingerprint: 404
    resp = await session.delete(url + "/abcdef12", headers=write_headers(k.admin, tag))
    assert resp.status == 404
    assert proxy.path.read_bytes() == original  # nothing written
    # the same origin is fine
    resp = await session.post(
        url,
        json=new,
        headers=write_headers(k.admin, tag) | {"Origin": proxy.url("").rstrip("/")},
    )
    assert resp.status == 201, await resp.text()
    # the file changed since: the old ETag is stale now
    resp = await session.post(url, json=new, headers=write_headers(k.admin, tag))
    assert resp.status == 412


async def test_an_env_named_key_is_not_edited(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await make_proxy(config(backend, k), env={"ENV_KEY": "env-secret"})
    doc = config(backend, k)
    doc["keys"]["${ENV_KEY}"] = {"project": "p", "role": "user"}
    proxy.path.write_text(json.dumps(doc, indent=2))
    assert (await proxy.store.reload_async()).applied
    tag, listed = await listing(session, proxy, k.admin)
    assert {e["stored"] for e in listed} == {"sha256", "env"}
    fp = key_digest("env-secret")[:8]
    original = proxy.path.read_bytes()
    resp = await session.delete(
        proxy.url(f"/v1/admin/keys/{fp}"), headers=write_headers(k.admin, tag)
    )
    assert resp.status == 409
    resp = await session.post(
        proxy.url(f"/v1/admin/keys/{fp}/rotate"), json={}, headers=write_headers(k.admin, tag)
    )
    assert resp.status == 409
    message = (await resp.json())["error"]["message"]
    assert message == f"Key {fp} is named by an environment variable in the config: edit it by hand"
    assert proxy.path.read_bytes() == original


async def test_validate_health_schema_and_reload(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    admin, viewer = {"Api-Key": k.admin}, {"Api-Key": k.viewer}
    good = config(backend, k)
    resp = await session.post(proxy.url("/v1/admin/validate"), json=good, headers=viewer)
    assert resp.status == 200
    assert (await resp.json())["valid"] is True
    bad = good | {"models": {"chat": {"type": "chat"}}}  # no endpoint, no upstreams
    resp = await session.post(proxy.url("/v1/admin/validate"), json=bad, headers=admin)
    body = await resp.json()
    assert resp.status == 200 and body["valid"] is False and body["problems"]
    assert proxy.path.read_text() == json.dumps(good, indent=2) + "\n"  # nothing applied
    resp = await session.post(
        proxy.url("/v1/admin/validate"), json=good, headers={"Api-Key": k.user}
    )
    assert resp.status == 403

    resp = await session.get(proxy.url("/v1/admin/health/config"), headers=viewer)
    health = await resp.json()
    tag, _ = await listing(session, proxy, k.admin)
    assert health["files"] == [{"file": str(proxy.path), "etag": tag}]
    assert health["lastError"] is None

    resp = await session.get(proxy.url("/v1/admin/schema"), headers=viewer)
    assert resp.status == 200 and "properties" in await resp.json()

    # reload: viewers may not; a bad file is refused (422) and the last good config serves
    with capture_logs() as logs:
        resp = await session.post(proxy.url("/v1/ops/config/reload"), headers=viewer)
        assert resp.status == 403
        proxy.path.write_text(json.dumps(bad))
        resp = await session.post(proxy.url("/v1/ops/config/reload"), headers=admin)
        assert resp.status == 422 and (await resp.json())["problems"]
    assert await call(session, proxy, k.user) == 200
    other = new_key()
    good["keys"]["sha256:" + key_digest(other)] = {"project": "q", "role": "user"}
    proxy.path.write_text(json.dumps(good))
    with capture_logs() as applied_logs:
        resp = await session.post(proxy.url("/v1/ops/config/reload"), headers=admin)
        assert resp.status == 200 and (await resp.json())["applied"] is True
    assert await call(session, proxy, other) == 200
    # one audit line per admin's reload, applied or not (the viewer's 403 wrote none)
    audit = [e for e in logs + applied_logs if e.get("event") == "admin_write"]
    line = {"event": "admin_write", "log_level": "info", "who": key_digest(k.admin)[:8]}
    assert audit == [
        line | {"action": "reload", "applied": False},
        line | {"action": "reload", "applied": True},
    ]  # (the whole config: no entry before or after, nor a secret)


async def test_role_names_from_settings_and_yaml_is_not_written(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession, tmp_path: Any
) -> None:
    k = Keys()
    doc = config(backend, k)
    doc["roles"]["root"] = {}
    doc["keys"]["sha256:" + key_digest(k.user)]["role"] = "root"
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(doc))  # (JSON is YAML)
    settings = Settings(config_paths=(str(path),), admin_role="root")
    proxy = await make_proxy(doc, settings=settings)
    proxy.store.paths = (path,)
    # "admin" is no admin role here; "root" is
    resp = await session.get(proxy.url("/v1/admin/keys"), headers={"Api-Key": k.admin})
    assert resp.status == 403
    tag, listed = await listing(session, proxy, k.user)
    assert len(listed) == 3
    resp = await session.post(
        proxy.url("/v1/admin/keys"),
        json={"project": "p", "roles": ["user"]},
        headers=write_headers(k.user, tag),
    )
    assert resp.status == 409 and "YAML" in (await resp.json())["error"]["message"]
    assert path.read_text() == json.dumps(doc)


async def test_edit_refusals_and_expiry(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    url = proxy.url(f"/v1/admin/keys/{fp}")
    headers = write_headers(k.admin, tag)
    original = proxy.path.read_bytes()
    for body, status in (
        ({"roles": ["nope"]}, 422),  # a role the config does not define
        ({"roles": []}, 400),
        ({"project": "q"}, 400),  # not editable
        ({"expiresAt": "2001-01-01"}, 400),  # not in the future
        ({"name": 5}, 400),
    ):
        resp = await session.patch(url, json=body, headers=headers)
        assert resp.status == status, (body, await resp.text())
    for bad in ("xyz", "12"):  # not 4 to 64 hex digits
        resp = await session.delete(proxy.url(f"/v1/admin/keys/{bad}"), headers=headers)
        assert resp.status == 400
    assert proxy.path.read_bytes() == original
    resp = await session.patch(url, json={"expiresAt": "1h"}, headers=headers)
    assert resp.status == 200
    edited = await resp.json()
    assert edited["state"] == "active" and edited["expiresAt"].endswith("Z")
    assert proxy.store.snapshot.keys[key_digest(k.user)].expires_at is not None
    # a description's lines and tabs are its own (other control characters: 400)
    headers = write_headers(k.admin, edited["etag"])
    resp = await session.patch(url, json={"description": "one\n\ttwo"}, headers=headers)
    assert resp.status == 200 and (await resp.json())["description"] == "one\n\ttwo"
    # a rotation takes every field as optional: no body at all is one
    resp = await session.post(
        url + "/rotate", headers=write_headers(k.admin, (await resp.json())["etag"])
    )
    assert resp.status == 201, await resp.text()


async def test_hostile_values_get_a_4xx_never_a_500(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """Values past what a date-time can hold, a body nested past the parser's depth, a
    variable's reference, a lone surrogate, an Origin that is no URL: each a 4xx that says
    what is wrong, the file untouched."""
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    headers = write_headers(k.admin, tag)
    original = proxy.path.read_bytes()
    create = {"project": "x", "roles": ["user"]}
    cases: list[tuple[str, str, dict[str, Any], Any, int]] = [
        ("POST", "/v1/admin/keys", headers, {**create, "expiresAt": "99999999999d"}, 400),
        (
            "POST",
            "/v1/admin/keys",
            headers,
            {**create, "expiresAt": "9999-12-31T23:59:59-14:00"},
            400,
        ),
        ("PATCH", f"/v1/admin/keys/{fp}", headers, {"expiresAt": "99999999999d"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"overlap": "99999999999d"}, 400),
        # a duration a date-time holds, but not added to now (past year 9999): was a 500
        ("POST", "/v1/admin/keys", headers, {**create, "expiresAt": "2932000d"}, 400),
        ("PATCH", f"/v1/admin/keys/{fp}", headers, {"expiresAt": "2932000d"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"overlap": "2932000d"}, 400),
        # a control character in a name (a description's line break aside), a blank project
        ("POST", "/v1/admin/keys", headers, {**create, "project": "a\u0000b"}, 400),
        ("POST", "/v1/admin/keys", headers, {**create, "project": "\t"}, 400),
        ("POST", "/v1/admin/keys", headers, {**create, "name": "one\ntwo"}, 400),
        ("PATCH", f"/v1/admin/keys/{fp}", headers, {"description": "a\u0007"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"name": "a\rb"}, 400),
        # digits other than ASCII's (int() reads them: "٣d" was 3 days)
        ("POST", "/v1/admin/keys", headers, {**create, "expiresAt": "\u0663d"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"overlap": "\uff11d"}, 400),
        ("POST", "/v1/admin/keys", headers, b"[" * 100_000, 400),
        # a field a create or a rotation does not take: named, not silently dropped
        ("POST", "/v1/admin/keys", headers, {**create, "disabled": True}, 400),
        ("POST", "/v1/admin/keys", headers, {**create, "notBefore": "2030-01-01"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"overlpa": "0"}, 400),
        # "${": the config would read an environment variable there, and show its value
        ("POST", "/v1/admin/keys", headers, {**create, "project": "${HOME}"}, 400),
        ("POST", "/v1/admin/keys", headers, {**create, "roles": ["${HOME}"]}, 400),
        ("PATCH", f"/v1/admin/keys/{fp}", headers, {"description": "see ${HOME}"}, 400),
        ("POST", f"/v1/admin/keys/{fp}/rotate", headers, {"name": "${HOME}"}, 400),
        ("PUT", "/v1/admin/roles/user/limits/chat", headers, {"minute": "${HOME}"}, 400),
        # half a surrogate pair, which no UTF-8 file, log line or ledger row can hold
        ("POST", "/v1/admin/keys", headers, b'{"project": "x\\ud800", "roles": ["user"]}', 422),
        ("PATCH", f"/v1/admin/keys/{fp}", headers, b'{"name": "\\udc00"}', 422),
        ("POST", "/v1/ops/config/reload", {**headers, "Origin": "http://["}, None, 403),
        ("GET", "/v1/console/usage?to=9999-12-31", headers, None, 400),
        ("GET", "/v1/console/usage?from=0001-01-01T00:00:00%2B14:00", headers, None, 400),
        ("GET", "/v1/user/usage?to=9999-12-31", {"Api-Key": k.user}, None, 400),
        ("GET", "/v1/user/usage?from=0001-01-01T00:00:00%2B14:00", {"Api-Key": k.user}, None, 400),
    ]
    for method, path, sent, body, status in cases:
        extra: dict[str, Any] = {}
        if isinstance(body, bytes):
            extra = {"data": body, "headers": {**sent, "Content-Type": "application/json"}}
        else:
            extra = {"json": body, "headers": sent}
        resp = await session.request(method, proxy.url(path), **extra)
        text = await resp.text()
        assert resp.status == status, (method, path, resp.status, text)
        assert json.loads(text)["error"]["message"] != "Internal error"
    assert proxy.path.read_bytes() == original


async def test_a_variables_reference_is_never_written_so_its_value_never_shows(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """A key created with ``"project": "${UPSTREAM_SECRET}"`` was written as typed, then read
    by the config as the variable: its holder saw the proxy's upstream key in
    ``/v1/user/info``, every log line and the usage ledger.  Now a 400, nothing written."""
    k = Keys()
    secret = "sk-upstream-topsecret-0123"
    doc = config(backend, k)
    proxy = await make_proxy(doc, env={"UPSTREAM_SECRET": secret})
    proxy.path.write_text(json.dumps(doc, indent=2) + "\n")
    assert not (await proxy.store.reload_async()).refused
    tag, _ = await listing(session, proxy, k.admin)
    original = proxy.path.read_bytes()
    for field in ("project", "name", "description"):
        body = {"project": "x", "roles": ["user"], field: "${UPSTREAM_SECRET}"}
        resp = await session.post(
            proxy.url("/v1/admin/keys"), json=body, headers=write_headers(k.admin, tag)
        )
        text = await resp.text()
        assert resp.status == 400, text
        assert "environment variable" in text and secret not in text
    assert proxy.path.read_bytes() == original


async def test_a_file_the_config_refuses_is_a_409_or_listed_never_a_500(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """Hand edits the reload refuses, on disk under a running proxy: a key whose ``roles``
    is no list (the listings and a PATCH answered 500, the PATCH after writing the file),
    a file nested past Python's recursion (500s): listed, or a 409 (``/health`` says why);
    a write is a 422 that says the config must be fixed first."""
    k = Keys()
    proxy = await start(make_proxy, backend, k)
    doc = config(backend, k)
    user = "sha256:" + key_digest(k.user)
    doc["keys"][user]["roles"] = 5
    proxy.path.write_text(json.dumps(doc, indent=2) + "\n")
    tag, listed = await listing(session, proxy, k.admin)
    roles = {key["fingerprint"]: key["roles"] for key in listed}
    assert roles[key_digest(k.user)[:8]] == ["user"]
    for path in ("/v1/admin/roles", "/v1/admin/roles/user"):
        async with session.get(proxy.url(path), headers={"Api-Key": k.admin}) as resp:
            assert resp.status == 200, await resp.text()
    # and no write: the config would not load, so no edit would take effect (a revoke
    # answered 200, the key still served)
    on_disk = proxy.path.read_bytes()
    resp = await session.delete(
        proxy.url(f"/v1/admin/keys/{key_digest(k.user)[:8]}"), headers=write_headers(k.admin, tag)
    )
    assert resp.status == 422, await resp.text()
    assert "fix it first" in (await resp.json())["error"]["message"]
    assert proxy.path.read_bytes() == on_disk
    proxy.path.write_text('{"keys": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for method, path in (("GET", "/v1/admin/keys"), ("GET", "/v1/admin/roles")):
        async with session.request(method, proxy.url(path), headers={"Api-Key": k.admin}) as r:
            assert r.status == 409, await r.text()
            assert "not a readable config file" in (await r.json())["error"]["message"]


def two_models(backend: Backend, k: Keys) -> dict[str, Any]:
    doc = config(backend, k)
    doc["models"]["other"] = chat_model(backend)
    return doc


async def start_with(make_proxy: ProxyFactory, doc: dict[str, Any]) -> Proxy:
    proxy = await make_proxy(doc)
    proxy.path.write_text(json.dumps(doc, indent=2) + "\n")
    assert not (await proxy.store.reload_async()).refused
    return proxy


async def patch(
    s: aiohttp.ClientSession, proxy: Proxy, key: str, fp: str, body: Any, tag: str
) -> tuple[int, Any]:
    resp = await s.patch(
        proxy.url(f"/v1/admin/keys/{fp}"), json=body, headers=write_headers(key, tag)
    )
    return resp.status, await resp.json()


async def call_model(s: aiohttp.ClientSession, proxy: Proxy, key: str, model: str) -> int:
    resp = await s.post(
        proxy.url(f"/openai/deployments/{model}/chat/completions"),
        json=CHAT,
        headers={"Api-Key": key},
    )
    await resp.read()
    await proxy.settle()
    return resp.status


async def test_edit_models_limits_can_share_and_expiry(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start_with(make_proxy, two_models(backend, k))
    original = proxy.path.read_text()
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    user_entry = '"description": "the first user"'

    # per-key quotas: one request a day on chat, counted for this key alone
    status, edited = await patch(
        session, proxy, k.admin, fp, {"limits": {"chat": {"requestDay": 1}}}, tag
    )
    assert status == 200, edited
    assert edited["limits"] == {"chat": {"requestDay": 1}}
    assert proxy.path.read_text() == original.replace(
        user_entry,
        user_entry + ',\n      "limits": {\n        "chat": {"requestDay": 1}\n      }',
    )
    assert await call_model(session, proxy, k.user, "chat") == 200
    assert await call_model(session, proxy, k.user, "chat") == 429
    assert await call_model(session, proxy, k.user, "other") == 200  # not limited
    # null takes the member out: the file is the original again, byte for byte
    status, edited = await patch(session, proxy, k.admin, fp, {"limits": None}, edited["etag"])
    assert status == 200 and edited["limits"] is None
    assert proxy.path.read_text() == original
    assert await call_model(session, proxy, k.user, "chat") == 200

    # models: the key may call only those
    status, edited = await patch(session, proxy, k.admin, fp, {"models": ["other"]}, edited["etag"])
    assert status == 200 and edited["models"] == ["other"]
    assert proxy.path.read_text() == original.replace(
        user_entry, user_entry + ',\n      "models": ["other"]'
    )
    assert await call_model(session, proxy, k.user, "chat") == 403
    assert await call_model(session, proxy, k.user, "other") == 200
    status, edited = await patch(session, proxy, k.admin, fp, {"models": None}, edited["etag"])
    assert status == 200 and proxy.path.read_text() == original
    assert await call_model(session, proxy, k.user, "chat") == 200

    # canShare: the key may create shared keys once it is set
    share = {"name": "for a friend", "tokens": 100}
    resp = await session.post(proxy.url("/v1/sharedkeys"), json=share, headers={"Api-Key": k.user})
    assert resp.status == 403
    status, edited = await patch(session, proxy, k.admin, fp, {"canShare": True}, edited["etag"])
    assert status == 200 and edited["canShare"] is True
    assert proxy.path.read_text() == original.replace(
        user_entry, user_entry + ',\n      "canShare": true'
    )
    resp = await session.post(proxy.url("/v1/sharedkeys"), json=share, headers={"Api-Key": k.user})
    assert resp.status == 201, await resp.text()
    status, edited = await patch(session, proxy, k.admin, fp, {"canShare": False}, edited["etag"])
    assert status == 200 and edited["canShare"] is False
    assert proxy.path.read_text() == original.replace(
        user_entry, user_entry + ',\n      "canShare": false'
    )

    # the expiry set, then removed (null): the key never expires again
    tag = edited["etag"]
    with capture_logs() as logs:
        status, edited = await patch(session, proxy, k.admin, fp, {"expiresAt": "2h"}, tag)
    assert status == 200 and edited["expiresAt"].endswith("Z")
    (audit,) = [e for e in logs if e.get("event") == "admin_write"]
    assert audit["before"].get("expiresAt") is None
    assert audit["after"]["expiresAt"] == edited["expiresAt"]
    assert proxy.store.snapshot.keys[key_digest(k.user)].expires_at is not None
    status, edited = await patch(session, proxy, k.admin, fp, {"expiresAt": None}, edited["etag"])
    assert status == 200 and edited["expiresAt"] is None
    assert proxy.store.snapshot.keys[key_digest(k.user)].expires_at is None
    assert proxy.path.read_text() == original.replace(
        user_entry, user_entry + ',\n      "canShare": false'
    )
    # removing what is not there changes nothing
    before = proxy.path.read_bytes()
    status, edited = await patch(session, proxy, k.admin, fp, {"models": None}, edited["etag"])
    assert status == 200 and proxy.path.read_bytes() == before


async def test_edit_refusals_of_the_new_fields(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start_with(make_proxy, two_models(backend, k))
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    original = proxy.path.read_bytes()
    for body, status, said in (
        ({"models": "chat"}, 400, "models"),
        ({"models": [""]}, 400, "models"),
        ({"models": ["nope"]}, 422, "nope"),  # a model the config does not define
        ({"limits": 5}, 400, "limits"),
        ({"limits": {"chat": 5}}, 400, "limits.chat"),
        ({"limits": {"chat": {"minutes": 5}}}, 422, "minutes"),  # the schema refuses it
        ({"limits": {"chat": {"day": -1.5}}}, 422, "day"),
        ({"limits": {"nope": {"day": 5}}}, 422, "nope"),
        ({"canShare": "yes"}, 400, "canShare"),
        ({"canShare": None}, 400, "canShare"),
        ({"roles": None}, 400, "roles"),
        ({"expiresAt": 5}, 400, "expiresAt"),
    ):
        got, answer = await patch(session, proxy, k.admin, fp, body, tag)
        assert got == status, (body, answer)
        assert said in answer["error"]["message"], (body, answer)
    for key in (k.viewer, k.user):
        got, _ = await patch(session, proxy, key, fp, {"models": ["other"]}, tag)
        assert got == 403
    assert proxy.path.read_bytes() == original


async def test_list_pages_filters_and_usage_today(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    doc = config(backend, k)
    team = [new_key() for _ in range(12)]
    for i, secret in enumerate(team):
        doc["keys"]["sha256:" + key_digest(secret)] = {
            "project": "team" if i < 8 else "lab",
            "role": "user",
            "name": f"worker {i}",
            **({"disabled": True} if i == 3 else {}),
            **({"expiresAt": "2001-01-01T00:00:00Z"} if i == 4 else {}),
            **({"description": "Nightly BATCH"} if i == 5 else {}),
        }
    proxy = await start_with(make_proxy, doc)
    url = proxy.url("/v1/admin/keys")
    viewer = {"Api-Key": k.viewer}

    async def page(**query: str) -> Any:
        resp = await session.get(url, params=query, headers=viewer)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    everything = await page()
    assert everything["total"] == 15 and len(everything["keys"]) == 15
    assert (everything["offset"], everything["limit"]) == (0, 100)
    assert everything["file"] == str(proxy.path)
    assert everything["etag"] == '"' + hashlib.sha256(proxy.path.read_bytes()).hexdigest() + '"'
    # pages: in the file's order, the total of all that match
    first = await page(limit="5")
    second = await page(limit="5", offset="5")
    last = await page(limit="5", offset="13")
    assert [e["fingerprint"] for e in first["keys"] + second["keys"]] == [
        e["fingerprint"] for e in everything["keys"][:10]
    ]
    assert len(last["keys"]) == 2 and last["total"] == 15 and last["offset"] == 13
    assert (await page(offset="99"))["keys"] == []
    # filters
    team_keys = await page(project="team")
    assert team_keys["total"] == 8
    assert {e["project"] for e in team_keys["keys"]} == {"team"}
    assert (await page(role="viewer"))["total"] == 1
    assert [e["name"] for e in (await page(state="revoked"))["keys"]] == ["worker 3"]
    assert [e["name"] for e in (await page(state="disabled"))["keys"]] == ["worker 3"]
    assert [e["name"] for e in (await page(state="expired"))["keys"]] == ["worker 4"]
    assert (await page(state="active"))["total"] == 13
    assert [e["name"] for e in (await page(q="batch"))["keys"]] == ["worker 5"]  # description
    assert [e["name"] for e in (await page(q="WORKER 1"))["keys"]] == [
        "worker 1",
        "worker 10",
        "worker 11",
    ]
    fp = key_digest(team[7])[:8]
    assert [e["name"] for e in (await page(q=fp))["keys"]] == ["worker 7"]
    # the rest of the digest is never searched: a viewer could read it back a digit at a time
    assert (await page(q=key_digest(team[7])[8:18]))["total"] == 0
    assert (await page(q="lab", project="team"))["total"] == 0
    assert (await page(q="lab"))["total"] == 4  # the project's name
    assert (await page(project="team", state="active", limit="2"))["total"] == 6
    # a bad value: 400 naming the parameter
    for query, name in (
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"state": "gone"}, "state"),
    ):
        resp = await session.get(url, params=query, headers=viewer)
        assert resp.status == 400, query
        assert f"'{name}'" in (await resp.json())["error"]["message"]
    # usage today: from the ledger, per key
    for _ in range(2):
        assert await call(session, proxy, team[0]) == 200
    assert await call(session, proxy, team[1]) == 200
    listed = {e["fingerprint"]: e for e in (await page())["keys"]}
    used = listed[key_digest(team[0])[:8]]["usageToday"]
    assert used["requests"] == 2 and used["errors"] == 0
    assert used["totalTokens"] > 0
    assert used["totalTokens"] == used["promptTokens"] + used["completionTokens"]
    once = listed[key_digest(team[1])[:8]]["usageToday"]
    assert once["requests"] == 1 and once["totalTokens"] * 2 == used["totalTokens"]
    assert listed[key_digest(team[2])[:8]]["usageToday"]["requests"] == 0
    assert (await page())["usageSince"].endswith("T00:00:00Z")  # the UTC day (the default)


async def role_write(
    s: aiohttp.ClientSession,
    proxy: Proxy,
    key: str,
    method: str,
    path: str,
    tag: str | None,
    body: Any = None,
) -> tuple[int, Any]:
    resp = await s.request(method, proxy.url(path), json=body, headers=write_headers(key, tag))
    return resp.status, await resp.json()


async def test_roles_read_and_their_limits_edited(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    doc = two_models(backend, k)
    doc["roles"]["team"] = {
        "name": "The team",
        "limits": {"other": {"minute": "1000", "day": 20000}},
        "costLimit": {"month": "5"},
    }
    doc["keys"]["sha256:" + key_digest(new_key())] = {"project": "p", "roles": ["team", "user"]}
    proxy = await start_with(make_proxy, doc)
    original = proxy.path.read_text()
    # read: viewers and admins; anyone else 403
    resp = await session.get(proxy.url("/v1/admin/roles"), headers={"Api-Key": k.user})
    assert resp.status == 403
    resp = await session.get(proxy.url("/v1/admin/roles"), headers={"Api-Key": k.viewer})
    assert resp.status == 200
    listed = await resp.json()
    tag = listed["etag"]
    assert resp.headers["ETag"] == tag == '"' + hashlib.sha256(original.encode()).hexdigest() + '"'
    assert listed["file"] == str(proxy.path) and listed["total"] == 4
    roles = {r["name"]: r for r in listed["roles"]}
    assert roles["team"] == {
        "name": "team",
        "displayName": "The team",
        "description": None,
        "limits": {"other": {"minute": "1000", "day": 20000}},
        "costLimit": {"month": "5"},
        "keys": 1,
        "files": [str(proxy.path)],
    }
    assert roles["user"]["keys"] == 2 and roles["user"]["limits"] == {}
    resp = await session.get(proxy.url("/v1/admin/roles/team"), headers={"Api-Key": k.admin})
    assert resp.status == 200
    assert await resp.json() == roles["team"] | {"file": str(proxy.path), "etag": tag}
    resp = await session.get(proxy.url("/v1/admin/roles/nope"), headers={"Api-Key": k.admin})
    assert resp.status == 404

    # a limit for a role that has none: one request a day on chat, for the project
    limit_url = "/v1/admin/roles/user/limits/chat"
    with capture_logs() as logs:
        status, answer = await role_write(
            session, proxy, k.admin, "PUT", limit_url, tag, {"requestDay": 1}
        )
    assert status == 200, answer
    assert answer["limit"] == {"requestDay": 1} and answer["replaced"] is None
    (audit,) = [e for e in logs if e.get("event") == "admin_write"]
    assert audit["action"] == "role_limit" and audit["who"] == key_digest(k.admin)[:8]
    assert (audit["role"], audit["model"]) == ("user", "chat")
    assert audit["before"] is None and audit["after"] == {"requestDay": 1}
    assert proxy.path.read_text() == original.replace(
        '"user": {}',
        '"user": {\n      "limits": {\n        "chat": {"requestDay": 1}\n      }\n    }',
    )
    assert await call(session, proxy, k.user) == 200
    assert await call(session, proxy, k.user) == 429
    # replaced in a role that has limits; then a second model added beside
    status, answer = await role_write(
        session,
        proxy,
        k.admin,
        "PUT",
        "/v1/admin/roles/team/limits/other",
        answer["etag"],
        {"minute": "500"},
    )
    assert status == 200 and answer["replaced"] == {"minute": "1000", "day": 20000}
    status, answer = await role_write(
        session,
        proxy,
        k.admin,
        "PUT",
        "/v1/admin/roles/team/limits/chat",
        answer["etag"],
        {"concurrentRequests": 2},
    )
    assert status == 200, answer
    team = (
        '"limits": {\n        "other": {\n          "minute": "1000",\n'
        '          "day": 20000\n        }\n      }'
    )
    assert team in original
    assert proxy.path.read_text() == original.replace(
        '"user": {}',
        '"user": {\n      "limits": {\n        "chat": {"requestDay": 1}\n      }\n    }',
    ).replace(
        team,
        '"limits": {\n        "other": {"minute": "500"},\n'
        '        "chat": {"concurrentRequests": 2}\n      }',
    )
    assert proxy.store.snapshot.roles["team"].limits["other"].minute == 500
    # removed: the role's limits are the original again, and the user calls again
    with capture_logs() as logs:
        status, answer = await role_write(
            session, proxy, k.admin, "DELETE", limit_url, answer["etag"]
        )
    assert status == 200 and answer["removed"] == {"requestDay": 1}
    (audit,) = [e for e in logs if e.get("event") == "admin_write"]
    assert audit["action"] == "role_limit_remove" and audit["who"] == key_digest(k.admin)[:8]
    assert (audit["role"], audit["model"]) == ("user", "chat")
    assert audit["file"] == str(proxy.path)
    assert audit["before"] == {"requestDay": 1} and audit["after"] is None
    assert k.admin not in json.dumps(audit, default=str)
    assert '"user": {\n      "limits": {}\n    }' in proxy.path.read_text()
    assert await call(session, proxy, k.user) == 200
    status, answer = await role_write(session, proxy, k.admin, "DELETE", limit_url, answer["etag"])
    assert status == 404, answer  # it has none now

    # refusals; nothing written
    tag = answer_tag = (
        await (await session.get(proxy.url("/v1/admin/roles"), headers={"Api-Key": k.admin})).json()
    )["etag"]
    before = proxy.path.read_bytes()
    for key, method, path, etag_, body, expected, said in (
        (k.viewer, "PUT", limit_url, tag, {"day": 1}, 403, "denied"),
        (k.user, "DELETE", "/v1/admin/roles/team/limits/chat", tag, None, 403, "denied"),
        (k.admin, "PUT", limit_url, None, {"day": 1}, 428, "If-Match"),
        (k.admin, "PUT", limit_url, '"00"', {"day": 1}, 412, "changed"),
        (k.admin, "PUT", limit_url, tag, {"days": 1}, 422, "days"),
        (k.admin, "PUT", limit_url, tag, {"day": "lots"}, 422, "day"),
        (k.admin, "PUT", "/v1/admin/roles/user/limits/nope", tag, {"day": 1}, 422, "nope"),
        (k.admin, "PUT", "/v1/admin/roles/nope/limits/chat", tag, {"day": 1}, 404, "nope"),
        (k.admin, "PUT", limit_url, tag, [1], 400, "object"),
        (k.admin, "PUT", "/v1/admin/roles/a%2Fb/limits/chat", tag, {}, 404, "'a/b'"),
        (k.admin, "DELETE", "/v1/admin/roles/team/limits/nope", tag, None, 404, "nope"),
    ):
        status, answer = await role_write(session, proxy, key, method, path, etag_, body)
        assert status == expected, (path, body, answer)
        assert said in answer["error"]["message"], answer
    assert proxy.path.read_bytes() == before
    assert answer_tag == tag


async def test_a_role_named_by_a_variable_is_not_edited(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    doc = config(backend, k)
    doc["roles"]["${TEAM_ROLE}"] = {}
    proxy = await start_with(make_proxy, doc)
    tag, _ = await listing(session, proxy, k.admin)
    status, answer = await role_write(
        session, proxy, k.admin, "PUT", "/v1/admin/roles/${TEAM_ROLE}/limits/chat", tag, {"day": 5}
    )
    assert status == 409 and "environment variable" in answer["error"]["message"], answer


async def test_several_config_files(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    """Key writes go to the file holding keys, role writes to the one holding roles, each
    checked with the files merged; the ETag is that file's; 409 when several hold one."""
    k = Keys()
    doc = config(backend, k)
    doc["roles"]["team"] = {"limits": {"chat": {"day": 100000}}}
    proxy = await make_proxy(doc)
    models = tmp_path / "models.yaml"  # (a YAML file beside: read, never written)
    models.write_text(json.dumps({"models": doc["models"], "roles": doc["roles"]}, indent=2))
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": doc["keys"]}, indent=4) + "\n")
    proxy.store.paths = (models, keys_file)
    assert not (await proxy.store.reload_async()).refused

    def tag_of(path: Any) -> str:
        return '"' + hashlib.sha256(path.read_bytes()).hexdigest() + '"'

    admin = {"Api-Key": k.admin}
    resp = await session.get(proxy.url("/v1/admin/health/config"), headers=admin)
    files = (await resp.json())["files"]
    assert files == [
        {"file": str(models), "etag": tag_of(models)},
        {"file": str(keys_file), "etag": tag_of(keys_file)},
    ]
    resp = await session.get(proxy.url("/v1/admin/keys"), headers=admin)
    listed = await resp.json()
    assert listed["file"] == str(keys_file) and listed["etag"] == tag_of(keys_file)
    assert {e["file"] for e in listed["keys"]} == {str(keys_file)}
    resp = await session.get(proxy.url("/v1/admin/roles"), headers=admin)
    roles = await resp.json()
    assert roles["file"] == str(models) and roles["etag"] == tag_of(models)

    # a key with a role of the other file: checked merged, written to keys.json only
    models_bytes, keys_text = models.read_bytes(), keys_file.read_text()
    resp = await session.post(
        proxy.url("/v1/admin/keys"),
        json={"project": "p", "roles": ["team"], "name": "merged"},
        headers=write_headers(k.admin, listed["etag"]),
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["file"] == str(keys_file) and created["etag"] == tag_of(keys_file)
    assert models.read_bytes() == models_bytes
    removed, added = change(keys_text, keys_file.read_text())
    assert removed == "" and added.startswith(',\n        "sha256:' + key_digest(created["key"]))
    assert await call(session, proxy, created["key"]) == 200
    resp = await session.post(
        proxy.url("/v1/admin/keys"),
        json={"project": "p", "roles": ["teem"]},
        headers=write_headers(k.admin, created["etag"]),
    )
    assert resp.status == 422 and "teem" in (await resp.json())["error"]["message"]
    # the roles file is YAML: not written
    limit = proxy.url("/v1/admin/roles/team/limits/chat")
    resp = await session.put(
        limit, json={"requestDay": 1}, headers=write_headers(k.admin, roles["etag"])
    )
    assert resp.status == 409 and "YAML" in (await resp.json())["error"]["message"]

    # the roles in a JSON file: written there, checked merged, served
    models_json = tmp_path / "models.json"
    models_json.write_bytes(models_bytes)
    proxy.store.paths = (models_json, keys_file)
    assert not (await proxy.store.reload_async()).refused
    keys_bytes = keys_file.read_bytes()
    # the keys file's ETag is no role write's: 412, with the roles file's
    resp = await session.put(
        limit, json={"requestDay": 1}, headers=write_headers(k.admin, tag_of(keys_file))
    )
    assert resp.status == 412 and resp.headers["ETag"] == tag_of(models_json)
    resp = await session.put(
        limit, json={"requestDay": 1}, headers=write_headers(k.admin, tag_of(models_json))
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["file"] == str(models_json)
    assert keys_file.read_bytes() == keys_bytes
    old_limit = '"chat": {\n          "day": 100000\n        }'
    assert old_limit in models_bytes.decode()
    assert models_json.read_text() == models_bytes.decode().replace(
        old_limit, '"chat": {"requestDay": 1}'
    )
    assert await call(session, proxy, created["key"]) == 429  # its one request of the day

    # a third file with keys (and roles): key and role writes refused, naming the files
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {"keys": {"sha256:" + "ab" * 32: {"project": "x", "role": "user"}}, "roles": {"x": {}}}
        )
    )
    proxy.store.paths = (models_json, keys_file, extra)
    assert not (await proxy.store.reload_async()).refused
    resp = await session.get(proxy.url("/v1/admin/keys"), headers=admin)
    listed = await resp.json()
    assert "ETag" not in resp.headers and listed["etag"] is None and listed["file"] is None
    assert listed["total"] == 5
    assert [e["file"] for e in listed["keys"]][-1] == str(extra)
    for method, path, body in (
        ("POST", "/v1/admin/keys", {"project": "p", "roles": ["user"]}),
        ("PUT", "/v1/admin/roles/team/limits/chat", {"day": 1}),
    ):
        resp = await session.request(
            method, proxy.url(path), json=body, headers=write_headers(k.admin, tag_of(extra))
        )
        assert resp.status == 409
        message = (await resp.json())["error"]["message"]
        assert str(extra) in message and "several config files" in message
        assert str(keys_file) in message or str(models_json) in message


async def test_usage_today_is_null_without_the_ledger(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession, tmp_path: Any
) -> None:
    k = Keys()
    settings = Settings(config_paths=(str(tmp_path / "aidial.config.json"),), ledger="off")
    proxy = await make_proxy(config(backend, k), settings=settings)
    assert await call(session, proxy, k.user) == 200
    resp = await session.get(proxy.url("/v1/admin/keys"), headers={"Api-Key": k.viewer})
    listed = await resp.json()
    assert listed["usageSince"] is None
    assert [e["usageToday"] for e in listed["keys"]] == [None, None, None]


async def test_create_with_limits_and_a_description_taken_out(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    k = Keys()
    proxy = await start_with(make_proxy, two_models(backend, k))
    tag, _ = await listing(session, proxy, k.admin)
    resp = await session.post(
        proxy.url("/v1/admin/keys"),
        json={"project": "p", "roles": ["user"], "limits": {"*": {"requestDay": 1}}},
        headers=write_headers(k.admin, tag),
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["limits"] == {"*": {"requestDay": 1}}
    entry = json.loads(proxy.path.read_text())["keys"]["sha256:" + key_digest(created["key"])]
    assert entry == {"project": "p", "role": "user", "limits": {"*": {"requestDay": 1}}}
    assert await call_model(session, proxy, created["key"], "other") == 200
    assert await call_model(session, proxy, created["key"], "other") == 429
    # null takes the description out, and the comma that went before it
    before = proxy.path.read_text()
    fp = key_digest(k.user)[:8]
    status, edited = await patch(
        session, proxy, k.admin, fp, {"description": None}, created["etag"]
    )
    assert status == 200 and edited["description"] is None and edited["name"] == "alice"
    assert proxy.path.read_text() == before.replace(
        '"name": "alice",\n      "description": "the first user"', '"name": "alice"'
    )
    assert proxy.store.snapshot.keys[key_digest(k.user)].description is None
    # "models": [] is no model, as an edit's is (a create read it as every model)
    resp = await session.post(
        proxy.url("/v1/admin/keys"),
        json={"project": "p", "roles": ["user"], "models": []},
        headers=write_headers(k.admin, edited["etag"]),
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["models"] == []
    assert await call_model(session, proxy, created["key"], "chat") == 403


async def test_two_writes_from_the_same_etag_one_wins(
    backend: Backend, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """Two admins edit from the same read at once: one is written, the other is told the
    file changed (412), and its edit is not written over the first."""
    k = Keys()
    proxy = await start_with(make_proxy, two_models(backend, k))
    tag, _ = await listing(session, proxy, k.admin)
    fp = key_digest(k.user)[:8]
    answers = await asyncio.gather(
        patch(session, proxy, k.admin, fp, {"models": ["chat"]}, tag),
        session.put(
            proxy.url("/v1/admin/roles/user/limits/other"),
            json={"day": 5},
            headers=write_headers(k.admin, tag),
        ),
    )
    statuses = sorted([answers[0][0], answers[1].status])
    assert statuses == [200, 412], answers
    doc = json.loads(proxy.path.read_text())
    written = [
        doc["keys"]["sha256:" + key_digest(k.user)].get("models") == ["chat"],
        doc["roles"]["user"].get("limits") == {"other": {"day": 5}},
    ]
    assert sorted(written) == [False, True]


async def test_keys_file_names_where_keys_are_written(
    backend: Backend,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    """Keys in two files: writes are refused (409) until --keys-file names one of them."""
    k = Keys()
    doc = config(backend, k)
    base = tmp_path / "base.json"
    base.write_text(
        json.dumps({"models": doc["models"], "roles": doc["roles"], "keys": doc["keys"]})
    )
    team = tmp_path / "team.json"
    team.write_text('{\n  "keys": {}\n}\n')
    paths = (str(base), str(team))
    new = {"project": "team", "roles": ["user"], "name": "t1"}
    for keys_file, written in ((None, None), (str(team), team)):
        settings = Settings(config_paths=paths, keys_file=keys_file)
        proxy = await make_proxy(doc, settings=settings)
        proxy.store.paths = (base, team)
        assert not (await proxy.store.reload_async()).refused
        resp = await session.get(proxy.url("/v1/admin/keys"), headers={"Api-Key": k.admin})
        listed = await resp.json()
        tag = '"' + hashlib.sha256(team.read_bytes()).hexdigest() + '"'
        resp = await session.post(
            proxy.url("/v1/admin/keys"), json=new, headers=write_headers(k.admin, tag)
        )
        if written is None:
            assert listed["file"] is None and listed["etag"] is None
            assert resp.status == 409
            message = (await resp.json())["error"]["message"]
            assert str(base) in message and str(team) in message and "--keys-file" in message
            continue
        assert listed["file"] == str(team) and listed["etag"] == tag
        assert resp.status == 201, await resp.text()
        secret = (await resp.json())["key"]
        assert json.loads(team.read_text())["keys"] == {
            "sha256:" + key_digest(secret): {"project": "team", "role": "user", "name": "t1"}
        }
        assert team.read_text().startswith('{\n  "keys": {\n    "sha256:')
        assert await call(session, proxy, secret) == 200
        # a key of the other file: not edited here (409 naming it)
        resp = await session.patch(
            proxy.url(f"/v1/admin/keys/{key_digest(k.user)[:8]}"),
            json={"name": "x"},
            headers=write_headers(k.admin, (await resp.json())["etag"]),
        )
        assert resp.status == 409 and str(base) in (await resp.json())["error"]["message"]


def test_keys_file_must_be_a_config_file(tmp_path: Any) -> None:
    config_file = str(tmp_path / "a.json")
    Settings(config_paths=(config_file,), keys_file=config_file).check()
    with pytest.raises(ValueError, match="keys file must be one of the config files"):
        Settings(config_paths=(config_file,), keys_file=str(tmp_path / "b.json")).check()
    settings = Settings.from_env({"DIALPROXY_KEYS_FILE": config_file})
    assert settings.keys_file == config_file
    argv = ["serve", "--config", config_file, "--keys-file", config_file]
    assert cli.settings_for(argv).keys_file == config_file
