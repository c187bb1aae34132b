"""bytes -> parsed documents -> ${VAR} resolved -> merged -> schema -> semantic checks -> Snapshot.

Building a snapshot is pure: the sources' bytes and an environment mapping in, a
:class:`Snapshot` (with its warnings) or a :class:`ConfigError` listing every problem out.
Nothing else is ever raised, whatever the bytes.

The stages: :mod:`~dialproxy.config.parse` (the sources read, parsed, ``${VAR}`` resolved,
merged), the schema (:mod:`~dialproxy.config.schema`), :mod:`~dialproxy.config.checks` (what
the schema cannot express), :mod:`~dialproxy.config.messages` (every problem's path and
message, no secret in them); this module runs them in order and builds the frozen objects.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from types import MappingProxyType
from typing import Any

from dialproxy.config.checks import MODEL_ALIASES, as_dict, check_duplicate_keys, semantic_checks
from dialproxy.config.grants import Grants
from dialproxy.config.messages import Locator, Redactor, json_type, render_path, schema_problem
from dialproxy.config.model import (
    Access,
    Interface,
    Key,
    Limit,
    Model,
    Pricing,
    Problem,
    Role,
    Snapshot,
    Upstream,
)
from dialproxy.config.parse import (
    Prepared,
    Preparer,
    Source,
    TooBig,
    lone_surrogates,
    may_hold_surrogates,
    merge,
    parse_source,
)
from dialproxy.config.reuse import Built, Canonical, Walked, changed_only
from dialproxy.config.routes import build_routes
from dialproxy.config.schedule import Schedule
from dialproxy.config.schema import schema_valid, validator
from dialproxy.errors import ConfigError
from dialproxy.text import parse_datetime, written_digest
from dialproxy.wire.headers import never_default_header

_DEFAULT_RETRIABLE = frozenset({429, 502, 503, 504})


# --- the build -----------------------------------------------------------------------------


def _pause() -> None:
    """Between the phases of a build: let the other threads run (a reload builds in a
    worker thread while the event loop serves, and both need the interpreter)."""
    time.sleep(0)


def build_snapshot(sources: Sequence[Source], env: Mapping[str, str]) -> Snapshot:
    """Build a snapshot, or raise :class:`ConfigError` with every problem found."""
    return build_reusing(sources, env, None)[0]


def build_reusing(
    sources: Sequence[Source], env: Mapping[str, str], last: Built | None
) -> tuple[Snapshot, Built]:
    """:func:`build_snapshot`, taking from ``last`` (the last good build) what did not
    change (:mod:`dialproxy.config.reuse`); with what to hand the next build."""
    problems: list[Problem] = []
    redact = Redactor()  # secrets: hidden in paths and messages
    env_values = Redactor()  # other ${VAR} values: hidden in messages
    docs: list[Prepared] = []
    walked: dict[str, dict[str, dict[str, Walked]]] = {}
    unreadable = False
    for source in sources:
        _pause()
        parsed = parse_source(source)
        if parsed.problem is not None:
            problems.append(Problem(source.name, "$", parsed.problem))
            unreadable = True
            continue
        if parsed.doc is None:
            parsed.doc = {}
        if not isinstance(parsed.doc, dict):
            problems.append(
                Problem(
                    source.name,
                    "$",
                    f"the config must be a JSON object, not {json_type(parsed.doc)}",
                )
            )
            unreadable = True
            continue
        # A YAML document may hold one object in several places (aliases), even within
        # itself: only a JSON file's entries are compared with the last ones.
        json_file = not source.name.endswith((".yaml", ".yml"))
        before = last.walked.get(source.name) if last is not None and json_file else None
        preparer = Preparer(
            source.name, env, parsed.duplicates, problems, redact, env_values, before
        )
        _pause()
        try:
            doc = preparer.walk(parsed.doc, [], 0)
        except TooBig:
            unreadable = True
            continue
        if may_hold_surrogates(source, preparer.used):
            for parts, char in lone_surrogates(doc, []):
                problems.append(
                    Problem(
                        source.name,
                        render_path(parts),
                        f"not valid Unicode: a lone surrogate ({char}) cannot be UTF-8 text",
                    )
                )
                preparer.kept = None  # (not to be taken as valid by the next build)
        if json_file and preparer.kept is not None:
            walked[source.name] = preparer.kept
        docs.append(Prepared(source.name, doc, preparer.reported))
    found: list[Problem] = []  # by the checks below, which may follow from the above
    digests: dict[str, str] = {}
    check_duplicate_keys(docs, found, last.digests if last is not None else {}, digests)
    if unreadable:
        raise ConfigError(_finish(problems, found, docs, redact, env_values))

    merged: dict[str, Any] = {}
    for prepared in docs:
        merged = merge(merged, prepared.doc)
    files = tuple(s.name for s in sources)
    locator = Locator(docs, files)

    _pause()
    canonical = Canonical.of(merged, last.canonical if last is not None else None)
    built_now = Built(canonical, walked=walked, digests=digests)
    _pause()
    # The entries the last good build had as they are were valid: the others are checked,
    # and when one is not, the whole document, for errors located as in a full build.
    if not schema_valid(changed_only(merged, canonical, last)):
        for error in validator().iter_errors(merged):
            found.extend(schema_problem(error, locator)[0])
    _pause()
    found.extend(semantic_checks(merged, locator, canonical, last, built_now))
    final = _finish(problems, found, docs, redact, env_values)
    if any(p.severity == "error" for p in final):
        raise ConfigError(final)

    _pause()
    digest = canonical.digest
    built = _snapshot(merged, files, digest, canonical, last, built_now)
    snapshot = Snapshot(
        models=built.models,
        roles=built.roles,
        keys=built.keys,
        retriable_codes=built.retriable_codes,
        digest=digest,
        files=files,
        warnings=tuple(final),
        raw=MappingProxyType(merged),
        schedule=built.schedule,
        dial_routes=build_routes(merged.get("routes")),
    )
    return snapshot, built_now


def _finish(
    early: Sequence[Problem],
    late: Sequence[Problem],
    docs: Sequence[Prepared],
    redact: Redactor,
    env_values: Redactor,
) -> list[Problem]:
    """Drop the ``late`` problems that follow from an ``early`` one, redact every secret."""
    reported = {item for d in docs for item in d.reported}
    out: list[Problem] = []
    seen: set[Problem] = set()
    for i, p in enumerate([*early, *late]):
        if reported and i >= len(early):
            prefixes = [p.path[:i] for i, c in enumerate(p.path) if c in ".["]
            if any((p.file, path) in reported for path in [p.path, *prefixes]):
                continue
        clean = Problem(p.file, redact(p.path), env_values(redact(p.message)), p.severity)
        if clean not in seen:
            seen.add(clean)
            out.append(clean)
    return out


# --- from checked JSON to the snapshot -----------------------------------------------------


def _localized(value: Any) -> str | None:
    """DIAL's localized text: a string, or {language: string}; the `en` text or the first."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value:
        text = value.get("en")
        if not isinstance(text, str):
            text = next((v for v in value.values() if isinstance(v, str)), None)
        return text
    return None


def _model_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {MODEL_ALIASES.get(k, k): v for k, v in raw.items()}


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
        concurrent=_int(raw.get("concurrentRequests")),
    )


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return Decimal(0)


def _deployment_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What a model and an application have alike (``raw`` with its aliases resolved)."""
    user_roles = raw.get("userRoles")
    return {
        "endpoint": raw.get("endpoint"),
        "display_name": _localized(raw.get("displayName")),
        "display_version": raw.get("displayVersion"),
        "icon_url": raw.get("iconUrl"),
        "description": _localized(raw.get("description")),
        "user_roles": None if user_roles is None else frozenset(user_roles),
        "defaults": MappingProxyType(dict(raw.get("defaults") or {})),
        "override_name": raw.get("overrideName"),
        "forward_auth_token": bool(raw.get("forwardAuthToken", False)),
        "features": MappingProxyType(dict(raw.get("features") or {})),
        "max_retry_attempts": int(raw.get("maxRetryAttempts", 5)),
        "input_attachment_types": tuple(raw.get("inputAttachmentTypes") or ()),
        "max_input_attachments": raw.get("maxInputAttachments"),
        "description_keywords": tuple(raw.get("descriptionKeywords") or ()),
        "default_headers": _default_headers(raw.get("defaultHeaders")),
    }


def _model(name: str, raw: Mapping[str, Any]) -> Model:
    raw = _model_fields(raw)
    pricing = raw.get("pricing")
    return Model(
        name=name,
        type=str(raw.get("type", "chat")).lower(),
        upstreams=tuple(Upstream.of(u) for u in raw.get("upstreams") or ()),
        token_limits=MappingProxyType(dict(raw.get("limits") or {})),
        pricing=None
        if not pricing or pricing.get("unit") == "none"  # DIAL: `none` tracks no cost
        else Pricing(
            unit=pricing.get("unit", "token"),
            prompt=_decimal(pricing.get("prompt", "0")),
            completion=_decimal(pricing.get("completion", "0")),
        ),
        tokenizer_model=raw.get("tokenizerModel"),
        interfaces=MappingProxyType(
            {
                kind: _interface(entry, raw.get("baseUrl"))
                for kind, entry in (raw.get("interfaces") or {}).items()
            }
        ),
        responses_endpoint=raw.get("responsesEndpoint"),
        responses_defaults=MappingProxyType(dict(raw.get("responsesDefaults") or {})),
        **_deployment_fields(raw),
    )


def _application(name: str, raw: Mapping[str, Any]) -> Model:
    """An application, served as a chat model with no upstreams: its ``endpoint`` verbatim
    (or its ``openaiChatCompletions`` interface); with neither, listed and answered 503."""
    raw = _model_fields(raw)
    return Model(
        name=name,
        type="chat",
        upstreams=(),
        interfaces=MappingProxyType(
            {
                kind: _interface(entry, None)
                for kind, entry in as_dict(raw.get("interfaces")).items()
                if kind == "openaiChatCompletions"  # DIAL drops the others (validate warns)
            }
        ),
        kind="application",
        reference=raw.get("reference"),
        **_deployment_fields(raw),
    )


def _default_headers(raw: Mapping[str, str] | None) -> Mapping[str, str]:
    """``defaultHeaders`` without the names that are never forwarded (validate warns)."""
    return MappingProxyType(
        {name: value for name, value in (raw or {}).items() if not never_default_header(name)}
    )


def _interface(raw: Mapping[str, Any], model_base_url: str | None) -> Interface:
    """One ``interfaces`` entry: its base URL (its own, else the model's ``baseUrl``; none for
    a translator, which dialproxy does not run), trailing slash dropped, and its headers."""
    base_url = raw.get("base_url", raw.get("baseUrl", model_base_url))
    if raw.get("mode") == "translator":
        base_url = None
    return Interface(
        base_url=base_url.rstrip("/") if isinstance(base_url, str) else None,
        default_headers=_default_headers(raw.get("defaultHeaders", raw.get("default_headers"))),
    )


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return parse_datetime(value)


def _snapshot(
    doc: Mapping[str, Any],
    files: tuple[str, ...],
    digest: str,
    canonical: Canonical | None = None,
    last: Built | None = None,
    built: Built | None = None,
) -> Snapshot:
    """The frozen objects of a checked document.  With ``canonical`` and ``last``, an entry
    unchanged since the last good build is its object there, and an access or a key whose
    inputs are all unchanged is too (:mod:`dialproxy.config.reuse`); ``built`` keeps them."""
    canon = canonical or Canonical({}, {}, digest)
    built = built or Built(canon)
    prev = last or Built(Canonical({}, {}, ""))

    models: dict[str, Model] = {}
    for section, make in (("models", _model), ("applications", _application)):
        for name, raw in (doc.get(section) or {}).items():
            text = canon.entry(section, name)
            found = prev.models.get((section, name))
            model = found[1] if found is not None and found[0] == text else make(name, raw)
            if text is not None:
                built.models[(section, name)] = (text, model)
            models[name] = model  # (a name of both is refused by the checks)
    roles: dict[str, Role] = {}
    for name, raw in (doc.get("roles") or {}).items():
        text = canon.entry("roles", name)
        found_role = prev.roles.get(name)
        if found_role is not None and found_role[0] == text:
            role = found_role[1]
        else:
            role = Role(
                name=name,
                limits=MappingProxyType(
                    {m: _limit(lim) for m, lim in (raw.get("limits") or {}).items()}
                ),
                cost_limit=MappingProxyType(
                    {w: _decimal(v) for w, v in (raw.get("costLimit") or {}).items()}
                ),
            )
        if text is not None:
            built.roles[name] = (text, role)
        roles[name] = role
    schedule_text = canon.rest.get("rateLimitSchedule")
    if prev.schedule is not None and prev.schedule[0] == schedule_text:
        schedule = prev.schedule[1]
    else:
        schedule = Schedule.parse(doc.get("rateLimitSchedule"))
    built.schedule = (schedule_text, schedule)
    model_list = tuple(models.values())
    built.model_list = model_list
    # An access depends on every model, the schedule, and the roles of its set (and
    # `default`, the fallback): when all are the same objects, it is the same.
    same_models = (
        prev.schedule is not None
        and prev.schedule[1] is schedule
        and len(prev.model_list) == len(model_list)
        and all(a is b for a, b in zip(prev.model_list, model_list, strict=True))
    )
    same_schedule = prev.schedule is not None and prev.schedule[1] is schedule
    grants = Grants(models, roles, schedule, prev.grants if same_schedule else None)
    accesses: dict[frozenset[str], Access] = {}

    def access_of(role_set: frozenset[str]) -> Access:
        access = accesses.get(role_set)
        if access is None:
            inputs = tuple(roles.get(r) for r in sorted(role_set | {"default"}))
            before = prev.accesses.get(role_set)
            if (
                before is not None
                and same_models
                and len(inputs) == len(prev.access_roles[role_set])
                and all(a is b for a, b in zip(inputs, prev.access_roles[role_set], strict=True))
            ):
                access = before
            else:
                access = grants.access(role_set)
            accesses[role_set] = access
            built.access_roles[role_set] = inputs
        return access

    raw_keys: dict[str, Any] = doc.get("keys") or {}
    key_texts = canon.entries.get("keys", {})
    # The keys whose entry is the last build's and whose access is too are its objects, all
    # at once (C speed: a reload of a big config changes few of its 10,000 keys).
    moved = {rs for rs, access in prev.accesses.items() if access_of(rs) is not access}
    same = {
        secret: was
        for secret, text in key_texts.items()
        if (was := prev.keys.get(secret)) is not None and was[0] == text and was[2] not in moved
    }
    by_secret: dict[str, Key | None] = dict.fromkeys(raw_keys)
    by_secret.update(zip(same, [was[1] for was in same.values()], strict=True))
    built.keys.update(same)
    for secret in [s for s in raw_keys if s not in same]:
        raw = raw_keys[secret]
        role_names = [*(raw.get("roles") or ()), *([raw["role"]] if raw.get("role") else [])]
        role_set = frozenset(role_names)
        access = access_of(role_set)
        text = key_texts.get(secret)
        found_key = prev.keys.get(secret)
        if found_key is None or found_key[0] != text:
            key = _key(secret, raw, role_names, access, built.digests.get(secret))
        elif found_key[1].access is access:
            key = found_key[1]
        else:  # the same entry, re-resolved (a role of it changed): no digest, no parsing
            key = _rebound(found_key[1], access)
        if text is not None:
            built.keys[secret] = (text, key, role_set)
        by_secret[secret] = key
    keys = {key.digest: key for key in by_secret.values() if key is not None}
    used = set(map(itemgetter(2), built.keys.values()))
    built.accesses = {rs: access for rs, access in accesses.items() if rs in used}
    built.grants = grants.kept
    retriable = _DEFAULT_RETRIABLE | frozenset(doc.get("retriableErrorCodes") or ())
    return Snapshot(
        models=MappingProxyType(models),
        roles=MappingProxyType(roles),
        keys=MappingProxyType(keys),
        retriable_codes=retriable,
        digest=digest,
        files=files,
        schedule=schedule,
    )


_KEY_SLOTS: tuple[str, ...] = Key.__slots__


def _rebound(key: Key, access: Access) -> Key:
    """``key`` with another access, its other fields as they are: ``dataclasses.replace``
    without running ``__init__`` again (which parses the IP ranges again; a role change
    rebinds thousands of keys)."""
    new = object.__new__(Key)
    for name in _KEY_SLOTS:
        object.__setattr__(new, name, getattr(key, name))
    object.__setattr__(new, "access", access)
    return new


def _key(
    secret: str,
    raw: Mapping[str, Any],
    role_names: list[str],
    access: Access,
    digest: str | None = None,
) -> Key:
    digest_hex = digest if digest is not None else written_digest(secret)
    return Key(
        digest=digest_hex,
        fingerprint=digest_hex[:8],
        project=raw["project"],
        roles=tuple(dict.fromkeys(role_names)),
        access=access,
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
