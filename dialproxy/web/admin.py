"""The admin API: the config's keys listed (paged, filtered, with their usage today), created,
edited, rotated and revoked over HTTP; its roles listed and their limits per model set and
removed; plus DIAL's config reload trigger, a candidate config's validation and the schema.

Who: a key of the config whose roles include ``--admin-role`` (everything) or
``--viewer-role`` (reads only); anyone else gets 403.  Every write goes through
:mod:`dialproxy.keys` and :mod:`dialproxy.configfile` (the same splice, validation and atomic
replace as ``dialproxy keys``), then a reload, and only when the caller's ``If-Match`` is the
ETag of the file's bytes as they are now (428 without it, 412 when stale).  Several config
files: a key write goes to the one file holding ``keys`` (or the one ``--keys-file`` names), a
role write to the one holding ``roles`` (409 naming the files when none or several do), and is
checked as the files load merged.  A write is refused with 409
when the file is YAML or the key (role) is named by a ``${VAR}``, and with 422 when the
result would not validate or would have a new warning (a role or a model the config does not
define: a typo).  State-changing calls also refuse cross-site requests: ``Content-Type:
application/json`` for a body, and no ``Origin`` other than the request's own host.  Each
write logs one ``admin_write`` line: who (fingerprint), what, the entry before and after (no
secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from dialproxy import keys
from dialproxy.auth import Principal, authenticate
from dialproxy.config import schema
from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source, merge, read_file
from dialproxy.config.store import ReloadResult
from dialproxy.configfile import ConfigFile, digest_of, parse_config
from dialproxy.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    FileChanged,
    Forbidden,
    InvalidEdit,
    KeyNotFound,
    KeysError,
    NotEditable,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
    ProxyError,
    RoleNotFound,
    Unprocessable,
    UnsupportedMediaType,
)
from dialproxy.ledger import HOUR
from dialproxy.text import has_control, hashed, iso, key_digest, parse_duration, parse_expiry
from dialproxy.web.appkeys import (
    ADMIN_WRITES,
    BALANCER,
    LEDGER,
    SETTINGS,
    SHARED,
    STORE,
    SUPERVISOR,
)
from dialproxy.web.guard import guarded, json_response

log = structlog.get_logger("dialproxy.admin")

_EDITABLE = ("name", "description", "roles", "models", "limits", "canShare", "expiresAt")
# Key states a listing filters on (``revoked``: ``disabled``, as DELETE makes it).
_STATES = {"active", "expired", "disabled", "revoked", "not yet valid"}
DEFAULT_PAGE, MAX_PAGE = 100, 1000
# What the answer of each section's list tells to read again after a 412.
_LISTING = {"keys": "GET /v1/admin/keys", "roles": "GET /v1/admin/roles"}


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
    try:
        parts = urlsplit(origin)
    except ValueError:  # (not a URL: not this origin)
        raise Forbidden("Cross-origin admin requests are refused") from None
    if not parts.netloc or parts.netloc.lower() != (request.host or "").lower():
        raise Forbidden("Cross-origin admin requests are refused")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:  # (nothing given: a rotation's every field is optional)
        return {}
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):  # (too deep: not a config's)
        raise BadRequest("The body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    _no_variables(body)
    return body


def _no_variables(body: dict[str, Any]) -> None:
    """400 when a name or value of ``body`` holds ``${``: written into the config, it would
    be read as an environment variable's reference, and the variable's value (an upstream
    key...) shown to whoever reads that field back (a key's project in ``/v1/user/info``).
    400 too for a control character (a description's line breaks and tabs aside): a NUL or
    a line break in a project or a name went on into the usage ledger's CSV, the CLI's
    tables and every log reader (the shared keys' API refused them already)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if "${" in value:
                raise BadRequest(
                    f"{where or 'a field name'} holds '${{', which the config reads as an "
                    "environment variable: such a value is written by hand, not through the API"
                )
            if has_control(
                value.replace("\n", "").replace("\t", "") if where == "description" else value
            ):
                raise BadRequest(f"{where or 'a field name'} holds a control character")
        elif isinstance(value, dict):
            for k, v in value.items():
                stack += [(where or "a field name", k), (f"{where}.{k}"[:100].lstrip("."), v)]
        elif isinstance(value, list):
            stack += [(where, v) for v in value]


def _docs(request: web.Request) -> list[tuple[Path, bytes, dict[str, Any] | None]]:
    """Each config file: its path, bytes and document (None: not readable as a config)."""
    return _read_docs(request.app[STORE].paths)


def _read_docs(paths: Sequence[Path]) -> list[tuple[Path, bytes, dict[str, Any] | None]]:
    out: list[tuple[Path, bytes, dict[str, Any] | None]] = []
    for path in paths:
        try:
            data = read_file(path)
        except OSError:
            out.append((path, b"", None))
            continue
        try:
            out.append((path, data, parse_config(path, data)))
        except KeysError:
            out.append((path, data, None))
    return out


def _section_file(request: web.Request, section: str) -> Path:
    """The file a write to ``section`` (``keys``, ``roles``) goes to: the config file, or of
    several the one that holds the section (409 naming them when none or several do); keys:
    the one ``--keys-file`` names, when it does."""
    paths = request.app[STORE].paths
    named = request.app[SETTINGS].keys_file if section == "keys" else None
    if named is not None:  # --keys-file
        chosen = [p for p in paths if p.resolve() == Path(named).resolve()]
        if not chosen:
            raise Conflict(
                f"The keys file {named} (--keys-file) is not one of the config files",
            )
        return chosen[0]
    if len(paths) == 1:
        return paths[0]
    holding = [path for path, _, doc in _docs(request) if doc is not None and section in doc]
    if len(holding) == 1:
        return holding[0]
    names = ", ".join(str(p) for p in (holding or paths))
    where = f"several config files hold {section}" if holding else f"no config file holds {section}"
    setting = " or name one with --keys-file" if section == "keys" else ""
    raise Conflict(
        f"The admin API writes {section} to the one config file that holds it; {where} "
        f"({names}): keep {section} in one file{setting}",
    )


def _open(request: web.Request, section: str = "keys") -> ConfigFile:
    """The file ``section`` is written to, when the caller's ``If-Match`` is its ETag now."""
    _same_origin(request)
    path = _section_file(request, section)
    try:
        config = ConfigFile(path)
    except KeysError as e:  # YAML (NotEditable), or not a config object
        raise Conflict(str(e)) from None
    wanted = request.headers.get("If-Match")
    if wanted is None:
        raise PreconditionRequired(
            f"If-Match is required: the ETag of {_LISTING[section]} (of {path})"
        )
    current = etag(config.original)
    # (no "*": a write must say which version of the file it was made from)
    if current not in [w.strip() for w in wanted.split(",")]:
        raise PreconditionFailed(
            f"The config file {path} changed since it was read: {_LISTING[section]} again",
            headers={"ETag": current},
        )
    return config


def _target(request: web.Request, section: str) -> tuple[str | None, str | None]:
    """The file a write to ``section`` would go to and its ETag, for a listing (None, None
    when there is no one such file: writes are refused with 409)."""
    try:
        path = _section_file(request, section)
        return str(path), etag(read_file(path))
    except (ProxyError, OSError):
        return None, None


def _find(request: web.Request, config: ConfigFile, env: Mapping[str, str]) -> tuple[str, str]:
    """The key the path's fingerprint names in the file written (409 when it is in another
    of the config files: it cannot be edited there)."""
    fingerprint = request.match_info["fingerprint"]
    try:
        name, fp = keys.find_key(config, fingerprint, env)
    except KeyNotFound:
        wanted = fingerprint.strip().lower()
        for path, _, doc in _docs(request):
            found = doc.get("keys") if doc is not None and path != config.path else None
            for other in found if isinstance(found, dict) else {}:
                if (digest_of(other, env) or "-").startswith(wanted):
                    raise Conflict(
                        f"Key {wanted[:8]} is in {path}; the admin API writes keys to "
                        f"{config.path}: edit it by hand",
                    ) from None
        raise NotFound(f"No key with fingerprint {fingerprint[:64]}") from None
    except KeysError as e:
        raise BadRequest(str(e)) from None
    if "${" in name:
        raise Conflict(
            f"Key {fp} is named by an environment variable in the config: edit it by hand",
        )
    return name, fp


def _stored(name: str) -> str:
    return "sha256" if name.startswith("sha256:") else "env" if "${" in name else "plaintext"


def _digest(name: str, env: Mapping[str, str]) -> str | None:
    """The SHA-256 of the key a ``keys`` entry names (None: an unset ``${VAR}``)."""
    if name.startswith("sha256:"):
        return name.removeprefix("sha256:")
    if "${" in name:
        return digest_of(name, env)
    return key_digest(name)


def _describe(
    name: str,
    entry: Mapping[str, Any],
    env: Mapping[str, str],
    now: datetime | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """A key as the admin API shows it: never its secret."""
    digest = digest or _digest(name, env)
    return {
        "fingerprint": digest[:8] if digest else None,
        "name": entry.get("name"),
        "description": entry.get("description"),
        "project": entry.get("project"),
        "roles": keys.key_roles(entry),
        "models": entry.get("models"),
        "limits": entry.get("limits"),
        "canShare": bool(entry.get("canShare", False)),
        "notBefore": entry.get("notBefore"),
        "expiresAt": entry.get("expiresAt"),
        "state": keys.entry_state(entry, now or datetime.now(UTC)),
        "stored": _stored(name),
    }


def _answer(
    name: str, entry: Mapping[str, Any], env: Mapping[str, str], path: Path
) -> dict[str, Any]:
    return _describe(name, entry, env) | {"file": str(path)}


async def _commit(
    request: web.Request,
    config: ConfigFile,
    who: Principal,
    action: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    **subject: Any,
) -> dict[str, Any]:
    """Save the edit (422 invalid, 412 changed meanwhile), reload, log; what every write's
    answer says of it: the ``warnings`` the edit introduced, what the ``reload`` did and the
    file's new ``etag``.  ``subject``: what was edited (``key=<fingerprint>``; ``role=``,
    ``model=``; a rotation's new key: ``new_key=<fingerprint>``, ``new_after=<its entry>``),
    for the audit line."""
    store = request.app[STORE]
    try:
        async with request.app[ADMIN_WRITES]:  # (the checks build the config twice: in a thread)
            warnings = await asyncio.to_thread(config.save, store.env(), True, store.paths)
    except InvalidEdit as e:
        raise Unprocessable(str(e)) from None
    except FileChanged as e:
        raise PreconditionFailed(str(e)) from None
    except KeysError as e:
        raise Conflict(str(e)) from None
    log.info(
        "admin_write",
        who=who.fingerprint,
        action=action,
        **subject,
        file=str(config.path),
        before=dict(before) if before is not None else None,  # (the name holds the secret)
        after=dict(after) if after is not None else None,
    )
    result = await _reload(request)
    reload = {
        "applied": result.applied,
        "generation": result.generation,
        "problems": [p.as_dict() for p in result.problems],
    }
    written = (b"\xef\xbb\xbf" if config.bom else b"") + config.text.text.encode("utf-8")
    return {"warnings": [p.as_dict() for p in warnings], "reload": reload, "etag": etag(written)}


def _saved(answer: dict[str, Any], written: dict[str, Any], status: int = 200) -> web.Response:
    """A write's answer: ``answer`` and what :func:`_commit` said, the new ETag as a header."""
    return json_response(answer | written, status=status, headers={"ETag": written["etag"]})


def _expiry(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("expiresAt must be a string: 30d, 2026-01-01 or 2026-01-01T12:00:00Z")
    try:
        return parse_expiry(value, now)
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


def _models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise BadRequest("models must be a list of deployment names (or null: every model)")
    return value


def _key_limits(value: Any) -> dict[str, Any] | None:
    """A key's ``limits`` as the body gives them: ``{deployment or "*": {field: value}}``
    (the fields are the schema's to check, when the edit is saved: 422)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest('limits must be an object: {"<deployment or *>": {"minute": ...}}')
    for model, limit in value.items():
        if not isinstance(limit, dict):
            raise BadRequest(f"limits.{model[:100]} must be an object of limit fields")
    return value


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"'{name}' must be a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be a whole number from {low} to {high}")
    return value


async def _usage_today(request: web.Request) -> tuple[dict[str, dict[str, Any]], str] | None:
    """Each key's usage in the current day of the config's ``rateLimitSchedule`` (its shared
    keys' included), by fingerprint, from the usage ledger, and when that day began (None:
    the ledger is off)."""
    ledger = request.app.get(LEDGER)
    if ledger is None:
        return None
    now = ledger.clock()
    start, _ = request.app[STORE].snapshot.schedule.calendars["day"].period(now)
    start = start // HOUR * HOUR
    rows = await ledger.rows(start, now + HOUR, ("key",))
    found = {
        r["key"]: {
            "requests": r["requests"],
            "errors": r["errors"],
            "promptTokens": r["prompt_tokens"],
            "completionTokens": r["completion_tokens"],
            "totalTokens": r["total_tokens"],
            "cost": r["cost_nano_usd"] / 1e9,
        }
        for r in rows
    }
    return found, iso(datetime.fromtimestamp(start, UTC))


_NO_USAGE = {
    "requests": 0,
    "errors": 0,
    "promptTokens": 0,
    "completionTokens": 0,
    "totalTokens": 0,
    "cost": 0.0,
}


def _matches(key: Mapping[str, Any], digest: str | None, wanted: Mapping[str, str]) -> bool:
    """Whether a listed key passes the filters (``q``: a case-insensitive substring of its
    name, description, project or fingerprint; the rest: exact)."""
    if (q := wanted.get("q")) is not None:
        # (the fingerprint alone: the rest of the digest, found a digit at a time, would
        # give a viewer the whole SHA-256 of the key to brute-force offline)
        texts = [key["name"], key["description"], key["project"], digest and digest[:8]]
        if not any(isinstance(t, str) and q in t.lower() for t in texts):
            return False
    if (project := wanted.get("project")) is not None and key["project"] != project:
        return False
    if (role := wanted.get("role")) is not None and role not in key["roles"]:
        return False
    if (state := wanted.get("state")) is not None:
        return bool(key["state"] == ("disabled" if state == "revoked" else state))
    return True


def _list(
    paths: Sequence[Path], env: Mapping[str, str], wanted: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The keys of the files, as listed, that pass the filters."""
    now = datetime.now(UTC)
    listed: list[dict[str, Any]] = []
    for path, _, doc in _read_docs(paths):
        if doc is None:
            raise Conflict(f"{path}: not a readable config file")
        found = doc.get("keys")
        for name, entry in (found if isinstance(found, dict) else {}).items():
            if not isinstance(entry, dict):
                continue
            digest = _digest(name, env)
            key = _describe(name, entry, env, now, digest) | {"file": str(path)}
            if _matches(key, digest, wanted):
                listed.append(key)
    return listed


# --- the handlers --------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    """``GET /v1/admin/keys[?q=&project=&role=&state=&limit=&offset=]``: the keys of every
    config file, filtered, a page of them; with the ETag of the file a key write goes to."""
    await _caller(request, write=False)
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = _int_param(request, "offset", 0, 0, 2**31)
    wanted: dict[str, str] = {}
    for name in ("q", "project", "role", "state"):
        value = request.query.get(name)
        if value:
            wanted[name] = value.lower() if name == "q" else value
    if "state" in wanted and wanted["state"] not in _STATES:
        raise BadRequest(f"'state' must be one of {', '.join(sorted(_STATES))}")
    env = request.app[STORE].env()
    paths = request.app[STORE].paths
    # (10,000 keys: ~0.2 s of parsing and describing, off the event loop)
    listed = await asyncio.to_thread(_list, paths, env, wanted)
    page = listed[offset : offset + limit]
    usage = await _usage_today(request)
    for key in page:
        key["usageToday"] = (
            None if usage is None else usage[0].get(key["fingerprint"], dict(_NO_USAGE))
        )
    file, tag = _target(request, "keys")
    body = {
        "keys": page,
        "total": len(listed),
        "offset": offset,
        "limit": limit,
        "usageSince": usage[1] if usage is not None else None,
        "file": file,
        "etag": tag,
    }
    return json_response(body, headers={"ETag": tag} if tag is not None else None)


# What a create and a rotation take (anything else, a typo or a field set by another route
# such as `disabled`, is a 400 naming it: not silently left out of the key written).
_CREATED = ("project", "roles", "name", "description", "models", "limits", "canShare", "expiresAt")
_ROTATED = ("overlap", "name", "expiresAt")


def _only(body: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"{what} takes {', '.join(allowed)}, not {', '.join(unknown)}")


async def create_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    body = await _body(request)
    _only(body, _CREATED, "A new key")
    config = _open(request)
    now = datetime.now(UTC)
    project = _text(body, "project")
    if not project or not project.strip():
        raise BadRequest("project is required")
    can_share = body.get("canShare", False)
    if not isinstance(can_share, bool):
        raise BadRequest("canShare must be true or false")
    try:
        secret, entry = keys.create_key(
            config,
            project=project,
            roles=_roles(body.get("roles")),
            name=_text(body, "name"),
            description=_text(body, "description"),
            expires=_expiry(body.get("expiresAt"), now),
            models=_models(body.get("models")),
            can_share=can_share,
        )
        if (limits := _key_limits(body.get("limits"))) is not None:
            keys.set_key_limits(config, hashed(secret), limits)
    except KeysError as e:
        raise BadRequest(str(e)) from None
    name = hashed(secret)
    entry = dict(config.keys[name])
    fp = key_digest(secret)[:8]
    written = await _commit(request, config, who, "create", None, entry, key=fp)
    answer = _answer(name, entry, {}, config.path) | {
        "key": secret,
    }
    return _saved(answer, written, status=201)


async def edit_key(request: web.Request) -> web.Response:
    """``PATCH /v1/admin/keys/{fingerprint}``: the fields given set (``null``: the member
    taken out, for all but ``roles`` and ``canShare``)."""
    who = await _caller(request, write=True)
    body = await _body(request)
    unknown = sorted(set(body) - set(_EDITABLE))
    if unknown:
        raise BadRequest(f"Only {', '.join(_EDITABLE)} can be edited, not {', '.join(unknown)}")
    if not body:
        raise BadRequest(f"Nothing to edit: give one of {', '.join(_EDITABLE)}")
    # (the body checked before the file is opened: a bad field is a 400 whatever the ETag)
    now = datetime.now(UTC)
    texts = {field: _text(body, field) for field in ("name", "description") if field in body}
    roles = _roles(body["roles"]) if "roles" in body else None
    models = _models(body.get("models"))
    limits = _key_limits(body.get("limits"))
    if "canShare" in body and not isinstance(body["canShare"], bool):
        raise BadRequest("canShare must be true or false")
    expires = _expiry(body.get("expiresAt"), now)
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(request, config, env)
    before = dict(config.keys[name])
    try:
        for field, value in texts.items():
            if value is None:
                config.remove_field(name, field)
            else:
                config.set_field(name, field, value)
        if roles is not None:
            keys.set_roles(config, name, roles)
        if "models" in body:
            keys.set_models(config, name, models)
        if "limits" in body:
            keys.set_key_limits(config, name, limits)
        if "canShare" in body:
            keys.set_can_share(config, name, body["canShare"])
        if "expiresAt" in body:
            keys.set_expiry(config, name, expires)
    except KeysError as e:
        raise BadRequest(str(e)) from None
    after = dict(config.keys[name])
    written = await _commit(request, config, who, "edit", before, after, key=fp)
    answer = _answer(name, after, env, config.path) | {}
    return _saved(answer, written)


async def revoke_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(request, config, env)
    before = dict(config.keys[name])
    if not keys.revoke_key(config, name):
        tag = etag(config.original)
        answer = _answer(name, before, env, config.path) | {"etag": tag}
        return json_response(answer, headers={"ETag": tag})
    after = dict(config.keys[name])
    written = await _commit(request, config, who, "revoke", before, after, key=fp)
    answer = _answer(name, after, env, config.path) | {}
    return _saved(answer, written)


async def rotate_key(request: web.Request) -> web.Response:
    who = await _caller(request, write=True)
    body = await _body(request)
    _only(body, _ROTATED, "A rotation")
    config = _open(request)
    env = request.app[STORE].env()
    name, fp = _find(request, config, env)
    now = datetime.now(UTC)
    overlap_text = _text(body, "overlap") or "7d"
    try:
        overlap = parse_duration(overlap_text)
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
    except KeysError as e:
        raise Conflict(str(e)) from None
    after = dict(config.keys[name])
    new_name = hashed(rotated.secret)
    written = await _commit(
        request,
        config,
        who,
        "rotate",
        before,
        after,
        key=fp,
        new_key=key_digest(rotated.secret)[:8],  # (the key it created: its audit record)
        new_after=dict(rotated.entry),
    )
    answer = _answer(new_name, rotated.entry, env, config.path) | {
        "key": rotated.secret,
        "replaces": rotated.old_fingerprint,
        "oldExpiresAt": iso(rotated.old_expires_at),
    }
    return _saved(answer, written, status=201)


# --- roles ---------------------------------------------------------------------------------


def _roles_view(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Every role of the config files (merged as the proxy merges them), as listed: its
    limits and cost limit as the config writes them, and how many keys name it."""
    roles: dict[str, Any] = {}
    holders: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for path, _, doc in _read_docs(paths):
        if doc is None:
            raise Conflict(f"{path}: not a readable config file")
        found = doc.get("roles")
        if isinstance(found, dict):
            roles = merge(roles, found)
            for name in found:
                holders.setdefault(name, []).append(str(path))
        listed = doc.get("keys")
        for entry in (listed if isinstance(listed, dict) else {}).values():
            if not isinstance(entry, dict):
                continue
            for role in keys.key_roles(entry):
                counts[role] = counts.get(role, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for name, raw in roles.items():
        entry = raw if isinstance(raw, dict) else {}
        out[name] = {
            "name": name,
            "displayName": entry.get("name"),
            "description": entry.get("description"),
            "limits": entry.get("limits") or {},
            "costLimit": entry.get("costLimit"),
            "keys": counts.get(name, 0),
            "files": holders[name],
        }
    return out


async def list_roles(request: web.Request) -> web.Response:
    """``GET /v1/admin/roles``: every role, with the ETag of the file a role write goes to."""
    await _caller(request, write=False)
    roles = list((await asyncio.to_thread(_roles_view, request.app[STORE].paths)).values())
    file, tag = _target(request, "roles")
    body = {"roles": roles, "total": len(roles), "file": file, "etag": tag}
    return json_response(body, headers={"ETag": tag} if tag is not None else None)


async def get_role(request: web.Request) -> web.Response:
    """``GET /v1/admin/roles/{name}``: one role as listed (404 when no file defines it)."""
    await _caller(request, write=False)
    name = request.match_info["name"]
    role = (await asyncio.to_thread(_roles_view, request.app[STORE].paths)).get(name)
    if role is None:
        raise NotFound(f"No role {name[:100]!r} in the config")
    file, tag = _target(request, "roles")
    body = role | {"file": file, "etag": tag}
    return json_response(body, headers={"ETag": tag} if tag is not None else None)


def _role_refusal(e: KeysError) -> ProxyError:
    if isinstance(e, RoleNotFound):
        return NotFound(str(e))
    if isinstance(e, NotEditable):
        return Conflict(str(e))
    return BadRequest(str(e))


async def set_role_limit(request: web.Request) -> web.Response:
    """``PUT /v1/admin/roles/{name}/limits/{model}``: the body (a Limit: ``minute``, ``day``,
    ``week``, ``month``, ``requestMinute``, ``requestHour``, ``requestDay``,
    ``concurrentRequests``) becomes the role's limit for the model."""
    who = await _caller(request, write=True)
    body = await _body(request)
    config = _open(request, "roles")
    role, model = request.match_info["name"], request.match_info["model"]
    _no_variables({"model": model})
    try:
        before = keys.set_role_limit(config, role, model, body)
    except KeysError as e:
        raise _role_refusal(e) from None
    written = await _commit(
        request, config, who, "role_limit", before, body, role=role, model=model
    )
    answer = {
        "role": role,
        "model": model,
        "limit": body,
        "replaced": before,
        "file": str(config.path),
    }
    return _saved(answer, written)


async def remove_role_limit(request: web.Request) -> web.Response:
    """``DELETE /v1/admin/roles/{name}/limits/{model}``: the role's limit for the model taken
    out (404 when it has none)."""
    who = await _caller(request, write=True)
    config = _open(request, "roles")
    role, model = request.match_info["name"], request.match_info["model"]
    try:
        before = keys.remove_role_limit(config, role, model)
    except KeysError as e:
        raise _role_refusal(e) from None
    written = await _commit(
        request, config, who, "role_limit_remove", before, None, role=role, model=model
    )
    answer = {
        "role": role,
        "model": model,
        "removed": before,
        "file": str(config.path),
    }
    return _saved(answer, written)


async def validate(request: web.Request) -> web.Response:
    """``POST /v1/admin/validate``: the body, a candidate config, checked as the proxy would
    load it (alone, with the proxy's environment); nothing is applied."""
    await _caller(request, write=False)
    _same_origin(request)
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
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
            files.append({"file": str(path), "etag": etag(read_file(path))})
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
    result = await _reload(request)
    log.info("admin_write", who=who.fingerprint, action="reload", applied=result.applied)
    body = {
        "applied": result.applied,
        "generation": result.generation,
        "problems": [p.as_dict() for p in result.problems],
    }
    return json_response(body, status=422 if result.refused else 200)


async def _reload(request: web.Request) -> ReloadResult:
    """The files read again and served when they validate; in a worker of ``serve
    --workers N``, every other worker told too (SIGHUP to the supervisor, which forwards it:
    each reloads, with or without its watcher), so that a key revoked here is revoked
    wherever the next request lands."""
    store = request.app[STORE]
    result = await store.reload_async(trigger="admin")
    if result.applied:
        request.app[BALANCER].forget_missing(dict(store.snapshot.models))
    if (supervisor := request.app.get(SUPERVISOR)) is not None:
        with contextlib.suppress(ProcessLookupError):  # (gone: this worker stops too)
            os.kill(supervisor, signal.SIGHUP)
    return result


def routes(app: web.Application) -> None:
    """Register the admin API's routes on ``app``."""
    app[ADMIN_WRITES] = asyncio.Lock()
    table: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/v1/admin/keys", list_keys),
        ("POST", "/v1/admin/keys", create_key),
        ("PATCH", "/v1/admin/keys/{fingerprint}", edit_key),
        ("DELETE", "/v1/admin/keys/{fingerprint}", revoke_key),
        ("POST", "/v1/admin/keys/{fingerprint}/rotate", rotate_key),
        ("GET", "/v1/admin/roles", list_roles),
        ("GET", "/v1/admin/roles/{name:[^/]+}", get_role),
        ("PUT", "/v1/admin/roles/{name:[^/]+}/limits/{model:[^/]+}", set_role_limit),
        ("DELETE", "/v1/admin/roles/{name:[^/]+}/limits/{model:[^/]+}", remove_role_limit),
        ("POST", "/v1/admin/validate", validate),
        ("GET", "/v1/admin/health/config", config_health),
        ("GET", "/v1/admin/schema", get_schema),
        ("POST", "/v1/ops/config/reload", reload_config),
    ]
    for method, path, handler in table:
        app.router.add_route(method, path, guarded(handler))
