"""bytes -> parsed documents -> ${VAR} resolved -> merged -> schema -> semantic checks -> Snapshot.

Building a snapshot is pure: the sources' bytes and an environment mapping in, a
:class:`Snapshot` (with its warnings) or a :class:`ConfigError` listing every problem out.
No secret ever appears in a problem: keys are named by their fingerprint.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

import jsonschema
import yaml

from dialproxy.config.model import (
    COST_WINDOWS,
    Access,
    Grant,
    Key,
    Limit,
    Model,
    Pricing,
    Problem,
    Role,
    Snapshot,
    Upstream,
    Window,
    fingerprint,
    key_digest,
)

SCHEMA_NAME = "aidial.config.schema.json"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")
_DEFAULT_RETRIABLE = frozenset({429, 502, 503, 504})

# DIAL's snake_case aliases, normalised to the camelCase names.
_MODEL_ALIASES = {
    "display_name": "displayName",
    "display_version": "displayVersion",
    "icon_url": "iconUrl",
    "user_roles": "userRoles",
    "forward_auth_token": "forwardAuthToken",
    "input_attachment_types": "inputAttachmentTypes",
    "max_input_attachments": "maxInputAttachments",
    "description_keywords": "descriptionKeywords",
}


class ConfigError(Exception):
    """The config cannot be served; ``problems`` lists every reason (errors and warnings)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        super().__init__(f"invalid config: {len(errors)} error(s)")


@dataclass(frozen=True, slots=True)
class Source:
    """One config file's name (as reported) and bytes."""

    name: str
    data: bytes


def read_sources(paths: Iterable[str | Path]) -> list[Source]:
    """Read config files; an unreadable file raises ``OSError`` (the caller's exit 2)."""
    return [Source(str(p), Path(p).read_bytes()) for p in paths]


@cache
def schema() -> dict[str, Any]:
    """The published schema: the packaged copy, or the repository's when run from source."""
    packaged = resources.files("dialproxy").joinpath("schemas", SCHEMA_NAME)
    if packaged.is_file():
        text = packaged.read_text("utf-8")
    else:
        text = (Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_NAME).read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


# --- paths ---------------------------------------------------------------------------------


def render_path(parts: Sequence[str | int]) -> str:
    """A JSON path like ``$.models.gpt-4.upstreams[0]``, with key secrets replaced."""
    out = ["$"]
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out.append(f"[{part}]")
            continue
        if i == 1 and parts[0] == "keys":
            part = f"<key {fingerprint(part)}>"
        if re.fullmatch(r"[A-Za-z_$][\w$-]*", part) or part.startswith("<key "):
            out.append(f".{part}")
        else:
            out.append("[" + json.dumps(part) + "]")
    return "".join(out)


class _Redactor:
    """Replaces every known secret in a message by its fingerprint."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if len(secret) >= 4:
            self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, f"<secret {fingerprint(secret)}>")
        return text


# --- parsing and environment ---------------------------------------------------------------


def _parse(source: Source) -> tuple[Any, Problem | None]:
    yaml_file = source.name.endswith((".yaml", ".yml"))
    try:
        text = source.data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, Problem(source.name, "$", f"not UTF-8 text (byte {e.start})")
    if yaml_file:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            return None, Problem(source.name, "$", f"invalid YAML{where}: {problem}")
        except (ValueError, TypeError, RecursionError):
            return None, Problem(source.name, "$", "invalid YAML")
        try:  # YAML may hold dates, sets, non-string keys...: only JSON's data model is accepted
            doc = json.loads(json.dumps(doc))
        except (TypeError, ValueError):
            return None, Problem(source.name, "$", "YAML holds values JSON cannot represent")
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            return None, Problem(
                source.name, "$", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            )
        except RecursionError:
            return None, Problem(source.name, "$", "invalid JSON: nested too deeply")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        return None, Problem(source.name, "$", "the config must be a JSON object")
    return doc, None


def _resolve_env(
    value: Any,
    env: Mapping[str, str],
    parts: list[str | int],
    file: str,
    problems: list[Problem],
    redact: _Redactor,
) -> Any:
    """Replace ``${NAME}`` in strings (and in the names of ``keys``) by the environment."""

    def sub(text: str, where: list[str | int]) -> str:
        if "${" not in text:
            return text

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.append(
                    Problem(file, render_path(where), f"environment variable {name} is not set")
                )
                return ""
            redact.add(env[name])
            return env[name]

        return _ENV_REF.sub(one, text)

    if isinstance(value, str):
        return sub(value, parts)
    if isinstance(value, list):
        return [
            _resolve_env(v, env, [*parts, i], file, problems, redact) for i, v in enumerate(value)
        ]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            name = sub(k, [*parts, k]) if parts == ["keys"] else k
            out[name] = _resolve_env(v, env, [*parts, name], file, problems, redact)
        return out
    return value


def merge(base: Any, update: Any) -> Any:
    """DIAL's merge: objects key by key, arrays concatenated, later scalars win."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = merge(out[k], v) if k in out else v
        return out
    if isinstance(base, list) and isinstance(update, list):
        return base + update
    return update


# --- the build -----------------------------------------------------------------------------


def build_snapshot(sources: Sequence[Source], env: Mapping[str, str]) -> Snapshot:
    """Build a snapshot, or raise :class:`ConfigError` with every problem found."""
    problems: list[Problem] = []
    redact = _Redactor()
    docs: list[tuple[str, dict[str, Any]]] = []
    for source in sources:
        doc, problem = _parse(source)
        if problem is not None:
            problems.append(problem)
            continue
        doc = _resolve_env(doc, env, [], source.name, problems, redact)
        docs.append((source.name, doc))
        _collect_secrets(doc, redact)
    _check_duplicate_keys(docs, problems)
    if any(p.severity == "error" for p in problems) and len(docs) < len(sources):
        raise ConfigError(_redacted(problems, redact))

    merged: dict[str, Any] = {}
    for _, doc in docs:
        merged = merge(merged, doc)
    files = tuple(s.name for s in sources)

    def file_of(parts: Sequence[str | int]) -> str:
        for name, doc in reversed(docs):
            if _has_path(doc, parts):
                return str(name)
        return str(files[-1]) if files else "<config>"

    for error in _validator().iter_errors(merged):
        parts = list(error.absolute_path)
        problems.append(Problem(file_of(parts), render_path(parts), _schema_message(error)))

    schema_ok = not any(p.severity == "error" for p in problems)
    problems.extend(_semantic_checks(merged, file_of))
    if any(p.severity == "error" for p in problems) or not schema_ok:
        raise ConfigError(_redacted(problems, redact))

    digest = hashlib.sha256(json.dumps(merged, sort_keys=True).encode()).hexdigest()
    snapshot = _snapshot(merged, files, digest)
    return Snapshot(
        models=snapshot.models,
        roles=snapshot.roles,
        keys=snapshot.keys,
        retriable_codes=snapshot.retriable_codes,
        digest=snapshot.digest,
        files=files,
        warnings=tuple(_redacted(problems, redact)),
        raw=MappingProxyType(merged),
    )


def _redacted(problems: Iterable[Problem], redact: _Redactor) -> list[Problem]:
    return [Problem(p.file, redact(p.path), redact(p.message), p.severity) for p in problems]


def _collect_secrets(doc: dict[str, Any], redact: _Redactor) -> None:
    keys = doc.get("keys")
    if isinstance(keys, dict):
        for secret in keys:
            redact.add(secret)
    models = doc.get("models")
    if isinstance(models, dict):
        for model in models.values():
            ups = model.get("upstreams") if isinstance(model, dict) else None
            for up in ups if isinstance(ups, list) else ():
                if isinstance(up, dict) and isinstance(up.get("key"), str):
                    redact.add(up["key"])


def _has_path(doc: Any, parts: Sequence[str | int]) -> bool:
    for part in parts:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown field")
    return error.message


def _check_duplicate_keys(
    docs: Sequence[tuple[str, dict[str, Any]]], problems: list[Problem]
) -> None:
    seen: dict[str, str] = {}
    for name, doc in docs:
        keys = doc.get("keys")
        if not isinstance(keys, dict):
            continue
        for secret in keys:
            digest = secret[7:] if _SHA256_KEY.match(secret) else key_digest(secret)
            if digest in seen:
                problems.append(
                    Problem(
                        name,
                        render_path(["keys", secret]),
                        f"the same key is already defined in {seen[digest]}",
                    )
                )
            else:
                seen[digest] = name


# --- checks the schema cannot express -----------------------------------------------------


def _key_bits(secret: str) -> float:
    pool = 0
    if re.search(r"[a-z]", secret):
        pool += 26
    if re.search(r"[A-Z]", secret):
        pool += 26
    if re.search(r"[0-9]", secret):
        pool += 10
    if re.search(r"[^A-Za-z0-9]", secret):
        pool += 32
    if re.fullmatch(r"[0-9a-f]+", secret):
        pool = 16
    distinct = len(set(secret))
    pool = min(pool, distinct) if distinct < len(secret) / 4 else pool
    return len(secret) * math.log2(max(pool, 1)) if pool > 1 else 0.0


def _check_url(url: Any, parts: list[str | int], file_of: Any) -> Iterator[Problem]:
    if not isinstance(url, str):
        return
    where = render_path(parts)
    try:
        split = urlsplit(url)
        _ = split.port
    except ValueError:
        yield Problem(file_of(parts), where, "not a valid URL")
        return
    if split.scheme not in ("http", "https") or not split.hostname:
        yield Problem(file_of(parts), where, "must be an http:// or https:// URL with a host")
    if split.username is not None or split.password is not None:
        yield Problem(
            file_of(parts),
            where,
            "must not carry user:password (put credentials in the upstream's key)",
        )
    if _CONTROL.search(url):
        yield Problem(file_of(parts), where, "contains control characters")


def _semantic_checks(doc: dict[str, Any], file_of: Any) -> Iterator[Problem]:
    models = doc.get("models") if isinstance(doc.get("models"), dict) else {}
    roles = doc.get("roles") if isinstance(doc.get("roles"), dict) else {}
    keys = doc.get("keys") if isinstance(doc.get("keys"), dict) else {}
    assert isinstance(models, dict) and isinstance(roles, dict) and isinstance(keys, dict)

    def warn(parts: list[str | int], message: str) -> Problem:
        return Problem(file_of(parts), render_path(parts), message, "warning")

    for secret, key in keys.items():
        if not isinstance(key, dict):
            continue
        named: list[tuple[list[str | int], Any]] = []
        if "role" in key:
            named.append((["keys", secret, "role"], key["role"]))
        if isinstance(key.get("roles"), list):
            named += [(["keys", secret, "roles", i], r) for i, r in enumerate(key["roles"])]
        for parts, role in named:
            if isinstance(role, str) and role not in roles and role != "default":
                yield warn(parts, f"role {role!r} is not defined in roles")
        if not _SHA256_KEY.match(secret) and _key_bits(secret) < 128:
            yield warn(
                ["keys", secret],
                "the key has less than 128 bits of entropy; use `dialproxy keys generate`",
            )
        for i, m in enumerate(key.get("models") or ()):
            if isinstance(m, str) and m not in models:
                yield warn(["keys", secret, "models", i], f"model {m!r} is not defined")
        for m in key.get("limits") or {}:
            if m != "*" and m not in models:
                yield warn(["keys", secret, "limits", m], f"model {m!r} is not defined")
        for i, cidr in enumerate(key.get("allowedIpAddressRanges") or ()):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except (ValueError, TypeError):
                yield Problem(
                    file_of(["keys", secret]),
                    render_path(["keys", secret, "allowedIpAddressRanges", i]),
                    "not a valid IP address range (CIDR)",
                )

    for role_name, role in roles.items():
        limits = role.get("limits") if isinstance(role, dict) else None
        for model_name in limits if isinstance(limits, dict) else ():
            if model_name not in models:
                yield warn(
                    ["roles", role_name, "limits", model_name],
                    f"model {model_name!r} is not defined in models",
                )

    for model_name, model in models.items():
        if not isinstance(model, dict):
            continue
        user_roles = model.get("userRoles", model.get("user_roles"))
        field_name = "userRoles" if "userRoles" in model else "user_roles"
        for i, role in enumerate(user_roles if isinstance(user_roles, list) else ()):
            if isinstance(role, str) and role not in roles and role != "default":
                yield warn(
                    ["models", model_name, field_name, i], f"role {role!r} is not defined in roles"
                )
        if "endpoint" in model:
            yield from _check_url(model["endpoint"], ["models", model_name, "endpoint"], file_of)
        ups = model.get("upstreams")
        if "endpoint" not in model and not ups:
            yield Problem(
                file_of(["models", model_name]),
                render_path(["models", model_name]),
                "a model needs an endpoint or at least one upstream",
            )
        for i, up in enumerate(ups if isinstance(ups, list) else ()):
            if not isinstance(up, dict):
                continue
            base: list[str | int] = ["models", model_name, "upstreams", i]
            yield from _check_url(up.get("endpoint"), [*base, "endpoint"], file_of)
            if isinstance(up.get("key"), str) and _CONTROL.search(up["key"]):
                yield Problem(
                    file_of(base),
                    render_path([*base, "key"]),
                    "contains control characters (it is sent as a header value)",
                )


# --- from checked JSON to the snapshot -----------------------------------------------------


def _int(value: Any) -> int | None:
    if value is None:
        return None
    return int(value)


def _limit(raw: Mapping[str, Any]) -> Limit:
    return Limit(
        minute=_int(raw.get("minute")),
        day=_int(raw.get("day")),
        week=_int(raw.get("week")),
        month=_int(raw.get("month")),
        request_minute=_int(raw.get("requestMinute")),
        request_hour=_int(raw.get("requestHour")),
        request_day=_int(raw.get("requestDay")),
    )


def _max_limit(limits: Sequence[Limit]) -> Limit:
    """DIAL: each field is the maximum over the roles' entries; absent = unlimited."""

    def top(name: str) -> int | None:
        values = [getattr(lim, name) for lim in limits]
        if any(v is None for v in values):
            return None
        return max(cast(list[int], values))

    return Limit(**{name: top(name) for name in Limit.__slots__})


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return Decimal(0)


def _model(name: str, raw: Mapping[str, Any]) -> Model:
    raw = {_MODEL_ALIASES.get(k, k): v for k, v in raw.items()}
    pricing = raw.get("pricing")
    user_roles = raw.get("userRoles")
    return Model(
        name=name,
        type=str(raw.get("type", "chat")).lower(),
        endpoint=raw.get("endpoint"),
        upstreams=tuple(
            Upstream(
                endpoint=u["endpoint"],
                key=u.get("key"),
                extra_data=u.get("extraData"),
                weight=int(u.get("weight", 1)),
                tier=int(u.get("tier", 0)),
                auth=u.get("auth", "bearer"),
            )
            for u in raw.get("upstreams") or ()
        ),
        display_name=raw.get("displayName"),
        display_version=raw.get("displayVersion"),
        icon_url=raw.get("iconUrl"),
        description=raw.get("description"),
        user_roles=None if user_roles is None else frozenset(user_roles),
        defaults=MappingProxyType(dict(raw.get("defaults") or {})),
        override_name=raw.get("overrideName"),
        forward_auth_token=bool(raw.get("forwardAuthToken", False)),
        token_limits=MappingProxyType(dict(raw.get("limits") or {})),
        pricing=None
        if not pricing
        else Pricing(
            unit=pricing.get("unit", "token"),
            prompt=_decimal(pricing.get("prompt", "0")),
            completion=_decimal(pricing.get("completion", "0")),
        ),
        features=MappingProxyType(dict(raw.get("features") or {})),
        tokenizer_model=raw.get("tokenizerModel"),
        max_retry_attempts=int(raw.get("maxRetryAttempts", 5)),
        input_attachment_types=tuple(raw.get("inputAttachmentTypes") or ()),
        max_input_attachments=raw.get("maxInputAttachments"),
        description_keywords=tuple(raw.get("descriptionKeywords") or ()),
    )


def resolve_grant(model: Model, roles: frozenset[str], all_roles: Mapping[str, Role]) -> Grant:
    """DIAL's limit resolution for one model and a caller's roles."""
    counted = roles if model.user_roles is None else roles & model.user_roles
    entries = [
        all_roles[r].limits[model.name]
        for r in sorted(counted)
        if r in all_roles and model.name in all_roles[r].limits
    ]
    if not entries and "default" in all_roles and model.name in all_roles["default"].limits:
        entries = [all_roles["default"].limits[model.name]]
    limit = _max_limit(entries) if entries else None
    return Grant(
        model=model,
        limit=limit,
        denied=limit.denies if limit else False,
        token_windows=limit.token_windows() if limit else (),
        request_windows=limit.request_windows() if limit else (),
    )


def _access(
    roles: frozenset[str], models: Mapping[str, Model], all_roles: Mapping[str, Role]
) -> Access:
    grants = {
        name: resolve_grant(model, roles, all_roles)
        for name, model in models.items()
        if model.admits(roles)
    }
    cost: dict[str, Decimal | None] = {}
    role_list = [all_roles[r] for r in sorted(roles) if r in all_roles]
    for window, _ in COST_WINDOWS:
        values = [r.cost_limit.get(window) for r in role_list if r.cost_limit]
        cost[window] = (
            max(v for v in values if v is not None)
            if any(v is not None for v in values) and all(v is not None for v in values)
            else None
        )
    return Access(
        roles=roles,
        grants=MappingProxyType(grants),
        cost_windows=tuple(
            Window(window, seconds, int(value * 1_000_000_000))
            for window, seconds in COST_WINDOWS
            if (value := cost[window]) is not None
        ),
    )


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _snapshot(doc: Mapping[str, Any], files: tuple[str, ...], digest: str) -> Snapshot:
    models = {name: _model(name, raw) for name, raw in (doc.get("models") or {}).items()}
    roles = {
        name: Role(
            name=name,
            limits=MappingProxyType(
                {m: _limit(lim) for m, lim in (raw.get("limits") or {}).items()}
            ),
            cost_limit=MappingProxyType(
                {w: _decimal(v) for w, v in (raw.get("costLimit") or {}).items()}
            ),
        )
        for name, raw in (doc.get("roles") or {}).items()
    }
    accesses: dict[frozenset[str], Access] = {}
    keys: dict[str, Key] = {}
    for secret, raw in (doc.get("keys") or {}).items():
        role_names = [*(raw.get("roles") or ()), *([raw["role"]] if raw.get("role") else [])]
        role_set = frozenset(role_names)
        if role_set not in accesses:
            accesses[role_set] = _access(role_set, models, roles)
        digest_hex = secret[7:] if _SHA256_KEY.match(secret) else key_digest(secret)
        keys[digest_hex] = Key(
            digest=digest_hex,
            fingerprint=digest_hex[:8],
            project=raw["project"],
            roles=tuple(dict.fromkeys(role_names)),
            access=accesses[role_set],
            secured=bool(raw.get("secured", False)),
            name=raw.get("name"),
            description=raw.get("description"),
            not_before=_datetime(raw.get("notBefore")),
            expires_at=_datetime(raw.get("expiresAt")),
            disabled=bool(raw.get("disabled", False)),
            allowed_ip_ranges=tuple(raw["allowedIpAddressRanges"])
            if raw.get("allowedIpAddressRanges") is not None
            else None,
            key_limits=MappingProxyType(
                {m: _limit(lim) for m, lim in (raw.get("limits") or {}).items()}
            ),
            models=frozenset(raw["models"]) if raw.get("models") is not None else None,
            can_share=bool(raw.get("canShare", False)),
        )
    retriable = _DEFAULT_RETRIABLE | frozenset(doc.get("retriableErrorCodes") or ())
    return Snapshot(
        models=MappingProxyType(models),
        roles=MappingProxyType(roles),
        keys=MappingProxyType(keys),
        retriable_codes=retriable,
        digest=digest,
        files=files,
    )
