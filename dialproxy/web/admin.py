"""The admin API: the config's keys listed, created, edited, rotated and revoked over HTTP,
plus DIAL's config reload trigger, a candidate config's validation and the schema.

Who: a key of the config whose roles include ``--admin-role`` (everything) or
``--viewer-role`` (reads only); anyone else gets 403.  Every write goes through
:mod:`dialproxy.keys` (the same splice, validation and atomic replace as ``dialproxy keys``),
then a reload, and only when the caller's ``If-Match`` is the ETag of the file's bytes as they
are now (428 without it, 412 when stale).  A write is refused with 409 when the file is YAML
or the key is named by a ``${VAR}``, and with 422 when the result would not validate or
would have a new warning (a role or a model the config does not define: a typo).
State-changing calls also refuse cross-site requests: ``Content-Type: application/json`` for a
body, and no ``Origin`` other than the request's own host.  Each write logs one
``admin_write`` line: who (fingerprint), what, the key's entry before and after (no secret).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from dialproxy import keys
from dialproxy.auth import Principal, authenticate
from dialproxy.config import schema
from dialproxy.config.loader import Source, build_snapshot
from dialproxy.config.model import key_digest
from dialproxy.errors import BadRequest, ConfigError, Forbidden, NotFound, ProxyError
from dialproxy.web.appkeys import BALANCER, SETTINGS, SHARED, STORE
from dialproxy.web.guard import guarded, json_response

log = structlog.get_logger("dialproxy.admin")

_EDITABLE = ("name", "description", "roles", "expiresAt")
# One admin write at a time in a process (another process's: its write_atomic's check).
WRITES = web.AppKey("admin_writes", asyncio.Lock)


def etag(data: bytes) -> str:
    """The ETag of a config file: the SHA-256 of its bytes, quoted."""
    return '"' + hashlib.sha256(data).hexdigest() + '"'


async def _caller(request: web.Request, write: bool) -> Principal:
    """The calling key, when its roles allow the call (else 403)."""
    app = request.app
    principal = await authenticate(
        request.headers, app[STORE].snapshot, request.remote, app[SHARED]
    )
    settings = app[SETTINGS]
    roles = set(principal.key.roles)
    if principal.shared is not None or principal.per_request:
        raise Forbidden("Admin access needs a key of the config")
    if settings.admin_role in roles:
        return principal
    if not write and settings.viewer_role in roles:
        return principal
    raise Forbidden("Admin access denied" if not write else "Admin write access denied")


def _same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return
    parts = urlsplit(origin)
    if not parts.netloc or parts.netloc.lower() != (request.host or "").lower():
        raise Forbidden("Cross-origin admin requests are refused")


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ProxyError("Content-Type must be application/json", status=415)
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    return body


def _config_path(request: web.Request) -> Path:
    paths = request.app[STORE].paths
    if len(paths) != 1:
        raise ProxyError(
            "The admin API edits a single config file; this proxy serves "
            f"{len(paths)}: edit them with `dialproxy keys`",
            status=409,
        )
    return paths[0]


def _open(request: web.Request) -> keys.ConfigFile:
    """The config file, when the caller's ``If-Match`` is its ETag now."""
    _same_origin(request)
    path = _config_path(request)
    try:
        config = keys.ConfigFile(path)
    except keys.KeysError as e:  # YAML (NotEditable), or not a config object
        raise ProxyError(str(e), status=409) from None
    wanted = request.headers.get("If-Match")
    if wanted is None:
        raise ProxyError("If-Match is required: the ETag of GET /v1/admin/keys", status=428)
    current = etag(config.original)
    # (no "*": a write must say which version of the file it was made from)
    if current not in [w.strip() for w in wanted.split(",")]:
        raise ProxyError(
            "The config file changed since it was read: GET /v1/admin/keys again",
            status=412,
            headers={"ETag": current},
        )
    return config


def _find(config: keys.ConfigFile, fingerprint: str, env: Mapping[str, str]) -> tuple[str, str]:
    try:
        name, fp = keys.find_key(config, fingerprint, env)
    except keys.KeyNotFound:
        raise NotFound(f"No key with fingerprint {fingerprint[:64]}") from None
    except keys.KeysError as e:
        raise BadRequest(str(e)) from None
    if "${" in name:
        raise ProxyError(
            f"Key {fp} is named by an environment variable in the config: edit it by hand",
            status=409,
        )
    return name, fp


def _stored(name: str) -> str:
    return "sha256" if name.startswith("sha256:") else "env" if "${" in name else "plaintext"


def _describe(name: str, entry: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A key as the admin API shows it: never its secret."""
    if name.startswith("sha256:"):
        digest: str | None = name.removeprefix("sha256:")
    elif "${" in name:
        digest = keys._digest_of(name, env)
    else:
        digest = key_digest(name)
    role = entry.get("role")
    roles = [*([role] if role else []), *(entry.get("roles") or ())]
    return {
        "fingerprint": digest[:8] if digest else None,
        "name": entry.get("name"),
        "description": entry.get("description"),
        "project": entry.get("project"),
        "roles": list(dict.fromkeys(str(r) for r in roles)),
        "models": entry.get("models"),
        "limits": entry.get("limits"),
        "canShare": bool(entry.get("canShare", False)),
        "notBefore": entry.get("notBefore"),
        "expiresAt": entry.get("expiresAt"),
        "state": keys.key_state(entry, datetime.now(UTC)),
        "stored": _stored(name),
    }


async def _commit(
    request: web.Request,
    config: keys.ConfigFile,
    who: Principal,
    action: str,
    fingerprint: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Save the edit (422 invalid, 412 changed meanwhile), reload, log; the new ETag, the
    warnings the edit introduced and what the reload did."""
    store = request.app[STORE]
    try:
        async with request.app[WRITES]:  # (the checks build the config twice: in a thread)
            warnings = await asyncio.to_thread(config.save, store.env(), True)
    except keys.InvalidEdit as e:
        raise ProxyError(str(e), status=422) from None
    except keys.FileChanged as e:
        raise ProxyError(str(e), status=412) from None
    except keys.KeysError as e:
        raise ProxyError(str(e), status=409) from None
    log.info(
        "admin_write",
        who=who.fingerprint,
        action=action,
        key=fingerprint,
        file=str(config.path),
        before=dict(before) if before is not None else None,  # (the name holds the secret)
        after=dict(after) if after is not None else None,
    )
    result = await store.reload_async(trigger="admin")
    if result.applied:
        request.app[BALANCER].forget_missing(dict(store.snapshot.models))
    reload = {
        "applied": result.applied,
        "generation": result.generation,
        "problems": [p.as_dict() for p in result.problems],
    }
    written = (b"\xef\xbb\xbf" if config.bom else b"") + config.text.text.encode("utf-8")
    return etag(written), [p.as_dict() for p in warnings], reload


def _expiry(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("expiresAt must be a string: 30d, 2026-01-01 or 2026-01-01T12:00:00Z")
    try:
        return keys.parse_expiry(value, now)
    except ValueError as e:
        raise BadRequest(f"expiresAt: {e}") from None


def _text(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    return value


def _roles(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(r, str) for r in value):
        raise BadRequest("roles must be a non-empty list of role names")
    return value


# --- the handlers --------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    await _caller(request, write=False)
    path = _config_path(request)
    data = path.read_bytes()
    try:
        doc = keys._parse(path, data)
    except keys.KeysError as e:
        raise ProxyError(str(e), status=409) from None
    env = request.app[STORE].env()
    found = doc.get("keys")
    if not isinstance(found, dict):
        found = {}
    listed = [_describe(n, e, env) for n, e in found.items() if isinstance(e, dict)]
    tag = etag(data)
    return json_response({"keys": listed, "etag": tag}, headers={"ETag": tag})


async def create_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    body = await _body(request)
    config = _open(request)
    now = datetime.now(UTC)
    project = _text(body, "project")
    if not project:
        raise BadRequest("project is required")
    models = body.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) for m in models)
    ):
        raise BadRequest("models must be a list of deployment names")
    try:
        secret, entry = keys.create_key(
            config,
            project=project,
            roles=_roles(body.get("roles")),
            name=_text(body, "name"),
            description=_text(body, "description"),
            expires=_expiry(body.get("expiresAt"), now),
            models=models,
            can_share=body.get("canShare") is True,
        )
    except keys.KeysError as e:
        raise BadRequest(str(e)) from None
    name = keys.hashed(secret)
    fp = key_digest(secret)[:8]
    tag, warnings, reload = await _commit(request, config, who, "create", fp, None, entry)
    answer = _describe(name, entry, {}) | {
        "key": secret,
        "warnings": warnings,
        "reload": reload,
        "etag": tag,
    }
    return json_response(answer, status=201, headers={"ETag": tag})


async def edit_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    body = await _body(request)
    unknown = sorted(set(body) - set(_EDITABLE))
    if unknown:
        raise BadRequest(f"Only {', '.join(_EDITABLE)} can be edited, not {', '.join(unknown)}")
    if not body:
        raise BadRequest(f"Nothing to edit: give one of {', '.join(_EDITABLE)}")
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(config, request.match_info["fingerprint"], env)
    before = dict(config.keys[name])
    for field in ("name", "description"):
        if field in body:
            value = _text(body, field)
            if value is None:
                raise BadRequest(f"{field} must be a string")
            config.set_field(name, field, value)
    if "roles" in body:
        keys.set_roles(config, name, _roles(body["roles"]))
    if "expiresAt" in body:
        when = _expiry(body["expiresAt"], datetime.now(UTC))
        if when is None:
            raise BadRequest("expiresAt must be a string: 30d, 2026-01-01 or ...")
        config.set_field(name, "expiresAt", keys.iso(when))
    after = dict(config.keys[name])
    tag, warnings, reload = await _commit(request, config, who, "edit", fp, before, after)
    answer = _describe(name, after, env) | {"warnings": warnings, "reload": reload, "etag": tag}
    return json_response(answer, headers={"ETag": tag})


async def revoke_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(config, request.match_info["fingerprint"], env)
    before = dict(config.keys[name])
    if not keys.revoke_key(config, name):
        tag = etag(config.original)
        return json_response(_describe(name, before, env) | {"etag": tag}, headers={"ETag": tag})
    after = dict(config.keys[name])
    tag, warnings, reload = await _commit(request, config, who, "revoke", fp, before, after)
    answer = _describe(name, after, env) | {"warnings": warnings, "reload": reload, "etag": tag}
    return json_response(answer, headers={"ETag": tag})


async def rotate_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    body = await _body(request)
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(config, request.match_info["fingerprint"], env)
    now = datetime.now(UTC)
    overlap_text = _text(body, "overlap") or "7d"
    try:
        overlap = keys.parse_duration(overlap_text)
    except ValueError as e:
        raise BadRequest(f"overlap: {e}") from None
    before = dict(config.keys[name])
    try:
        rotated = keys.rotate_key(
            config,
            name,
            now=now,
            overlap=overlap,
            new_name=_text(body, "name"),
            expires=_expiry(body.get("expiresAt"), now),
            env=env,
        )
    except keys.KeysError as e:
        raise ProxyError(str(e), status=409) from None
    after = dict(config.keys[name])
    tag, warnings, reload = await _commit(request, config, who, "rotate", fp, before, after)
    new_name = keys.hashed(rotated.secret)
    answer = _describe(new_name, rotated.entry, env) | {
        "key": rotated.secret,
        "replaces": rotated.old_fingerprint,
        "oldExpiresAt": keys.iso(rotated.old_expires_at),
        "warnings": warnings,
        "reload": reload,
        "etag": tag,
    }
    return json_response(answer, status=201, headers={"ETag": tag})


async def validate(request: web.Request) -> web.Response:
    """``POST /v1/admin/validate``: the body, a candidate config, checked as the proxy would
    load it (alone, with the proxy's environment); nothing is applied."""
    await _caller(request, write=False)
    _same_origin(request)
    if request.content_type != "application/json":
        raise ProxyError("Content-Type must be application/json", status=415)
    data = await request.read()
    env = request.app[STORE].env()
    try:
        snapshot = await asyncio.to_thread(build_snapshot, [Source("candidate.json", data)], env)
    except ConfigError as e:
        problems = [p.as_dict() for p in e.problems]
        return json_response({"valid": False, "problems": problems})
    warnings = [p.as_dict() for p in snapshot.warnings]
    return json_response(
        {
            "valid": True,
            "problems": warnings,
            "models": len(snapshot.models),
            "keys": len(snapshot.keys),
        }
    )


async def config_health(request: web.Request) -> web.Response:
    """``GET /v1/admin/health/config``: the served generation, its last refusal, and the
    files with the ETag of each (what a write's ``If-Match`` must be)."""
    await _caller(request, write=False)
    store = request.app[STORE]
    files = []
    for path in store.paths:
        try:
            files.append({"file": str(path), "etag": etag(path.read_bytes())})
        except OSError as e:
            files.append({"file": str(path), "error": e.strerror or type(e).__name__})
    return json_response(store.health() | {"files": files})


async def get_schema(request: web.Request) -> web.Response:
    """``GET /v1/admin/schema``: the config's JSON Schema."""
    await _caller(request, write=False)
    return json_response(schema.schema())


async def reload_config(request: web.Request) -> web.Response:
    """``POST /v1/ops/config/reload`` (DIAL's reload trigger): read the files now and serve
    them when they validate; 422 with the problems when not (the last good config serves)."""
    who = await _caller(request, write=True)
    _same_origin(request)
    store = request.app[STORE]
    result = await store.reload_async(trigger="admin")
    if result.applied:
        request.app[BALANCER].forget_missing(dict(store.snapshot.models))
    log.info("admin_write", who=who.fingerprint, action="reload", applied=result.applied)
    body = {
        "applied": result.applied,
        "generation": result.generation,
        "problems": [p.as_dict() for p in result.problems],
    }
    return json_response(body, status=422 if result.refused else 200)


def routes(app: web.Application) -> None:
    """Register the admin API's routes on ``app``."""
    app[WRITES] = asyncio.Lock()
    table: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/v1/admin/keys", list_keys),
        ("POST", "/v1/admin/keys", create_key),
        ("PATCH", "/v1/admin/keys/{fingerprint}", edit_key),
        ("DELETE", "/v1/admin/keys/{fingerprint}", revoke_key),
        ("POST", "/v1/admin/keys/{fingerprint}/rotate", rotate_key),
        ("POST", "/v1/admin/validate", validate),
        ("GET", "/v1/admin/health/config", config_health),
        ("GET", "/v1/admin/schema", get_schema),
        ("POST", "/v1/ops/config/reload", reload_config),
    ]
    for method, path, handler in table:
        app.router.add_route(method, path, guarded(handler))
