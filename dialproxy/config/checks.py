"""What the schema cannot express: cross-references (roles, models, keys), URLs, headers,
key entropy, the same key in two files.  The document may not match the schema: every check
is defensive."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlsplit

from dialproxy.config.messages import Locator, render_path, show_name
from dialproxy.config.model import Problem, Severity
from dialproxy.config.parse import Prepared
from dialproxy.config.reuse import Built, Canonical, RawProblem
from dialproxy.config.routes import route_problems
from dialproxy.config.schedule import zone
from dialproxy.text import CONTROL, ENV_REF, parse_datetime, written_digest
from dialproxy.wire.headers import never_default_header

# DIAL's snake_case aliases of model fields, normalised to the camelCase names.
MODEL_ALIASES = {
    "display_name": "displayName",
    "display_version": "displayVersion",
    "icon_url": "iconUrl",
    "user_roles": "userRoles",
    "forward_auth_token": "forwardAuthToken",
    "input_attachment_types": "inputAttachmentTypes",
    "max_input_attachments": "maxInputAttachments",
    "description_keywords": "descriptionKeywords",
    "override_name": "overrideName",
    "max_retry_attempts": "maxRetryAttempts",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
}


# Sections whose entries are deployments a role may limit (DIAL's selectDeployment, plus
# the newer sections).  dialproxy serves `models` and `applications`; the others are accepted.
_DEPLOYMENT_SECTIONS = ("models", "applications", "addons", "toolsets")


def check_duplicate_keys(
    docs: Sequence[Prepared],
    problems: list[Problem],
    known: Mapping[str, str],
    digests: dict[str, str],
) -> None:
    """The same secret twice across files (or as itself and as its ``sha256:`` form).
    The digests of the key names are taken from ``known`` (the last build's) when there,
    and kept in ``digests``."""
    seen: dict[str, str] = {}
    for prepared in docs:
        keys = prepared.doc.get("keys")
        if not isinstance(keys, dict):
            continue
        names = [n for n in keys if n and not ("${" in n and ENV_REF.search(n))]
        found = [known.get(n) or written_digest(n) for n in names]
        digests.update(zip(names, found, strict=True))
        unique = dict.fromkeys(found, prepared.name)
        if len(unique) == len(found) and seen.keys().isdisjoint(unique):
            seen.update(unique)  # (the usual case, at C speed)
            continue
        for name, digest in zip(names, found, strict=True):
            if digest in seen:
                problems.append(
                    Problem(
                        prepared.name,
                        render_path(["keys", name]),
                        f"the same key is already defined in {seen[digest]}",
                    )
                )
            else:
                seen[digest] = prepared.name


# --- checks the schema cannot express -----------------------------------------------------


def _key_bits(secret: str) -> float:
    """A rough estimate of the entropy of a key, from its length and alphabet."""
    if re.fullmatch(r"[0-9a-fA-F-]+", secret) and not re.fullmatch(r"[0-9]+", secret):
        hex_digits = len(secret) - secret.count("-")
        pool, length = 16, hex_digits
    else:
        pool, length = 0, len(secret)
        if re.search(r"[a-z]", secret):
            pool += 26
        if re.search(r"[A-Z]", secret):
            pool += 26
        if re.search(r"[0-9]", secret):
            pool += 10
        if re.search(r"[^A-Za-z0-9]", secret):
            pool += 32
    distinct = len(set(secret))
    if distinct < len(secret) / 4:
        pool = min(pool, distinct)
    return length * math.log2(pool) if pool > 1 else 0.0


def _url_problems(url: Any) -> list[str]:
    if not isinstance(url, str):
        return []
    try:
        split = urlsplit(url)
        _ = split.port
    except ValueError:
        return ["not a valid URL"]
    found: list[str] = []
    if split.scheme not in ("http", "https") or not split.hostname:
        found.append("must be an http:// or https:// URL with a host")
    if split.username is not None or split.password is not None:
        found.append(
            "must not carry credentials (`user:secret@host`): put them in the upstream's key"
        )
    if CONTROL.search(url):
        found.append("contains control characters")
    return found


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _deployment_names(doc: Mapping[str, Any]) -> set[str]:
    """What a role's ``limits`` may name: the deployments, and the routes (a route's entry
    counts its request windows, see ``config.routes``)."""
    names: set[str] = set()
    for section in _DEPLOYMENT_SECTIONS:
        names.update(as_dict(doc.get(section)))
    names.update(as_dict(as_dict(doc.get("assistant")).get("assistants")))
    names.update(as_dict(doc.get("routes")))
    return names


def semantic_checks(
    doc: dict[str, Any],
    at: Locator,
    canonical: Canonical | None = None,
    last: Built | None = None,
    built: Built | None = None,
) -> Iterator[Problem]:
    """Cross-references and safety; the document may not match the schema (be defensive).
    A key's checks are the last good build's when its entry and the names it may refer to
    are the same (``canonical``, ``last``); they are kept in ``built``."""
    models = as_dict(doc.get("models"))
    roles = as_dict(doc.get("roles"))
    keys = as_dict(doc.get("keys"))
    deployments = _deployment_names(doc)
    served = set(models) | set(as_dict(doc.get("applications")))  # what a key may name

    def warn(parts: list[str | int], message: str) -> Problem:
        return at.problem(parts, message, "warning")

    context = (frozenset(roles), frozenset(served))
    before = last.key_checks if last is not None and last.check_context == context else {}
    texts = canonical.entries.get("keys", {}) if canonical is not None else {}
    # the unchanged keys' checks at once (C speed), then the others'
    kept = {
        secret: found
        for secret, text in texts.items()
        if (found := before.get(secret)) is not None and found[0] == text
    }
    for secret in [s for s in keys if s not in kept]:
        found_now = tuple(_key_problems(secret, keys[secret], roles, served))
        kept[secret] = (texts.get(secret), found_now)
    for secret in [s for s in keys if kept[s][1]]:  # in the order of the keys
        for key_parts, key_message, key_severity in kept[secret][1]:
            yield at.problem(list(key_parts), key_message, cast(Severity, key_severity))
    if built is not None:
        built.check_context = context
        built.key_checks = kept

    schedule = doc.get("rateLimitSchedule")
    timezone = schedule.get("timezone") if isinstance(schedule, dict) else None
    if isinstance(timezone, str) and zone(timezone) is None:
        yield at.problem(
            ["rateLimitSchedule", "timezone"],
            f"unknown time zone {show_name(timezone)} (an IANA name such as UTC or Europe/Berlin)",
        )

    for role_name, role in roles.items():
        for name in as_dict(as_dict(role).get("limits")):
            if name not in deployments:
                yield warn(
                    ["roles", role_name, "limits", name],
                    f"no model (or application, addon, assistant, toolset, route) "
                    f"{show_name(name)} is defined",
                )

    for section in ("models", "applications"):
        for name in as_dict(doc.get(section)):
            if CONTROL.search(name):  # (an adapter is told it in X-DIAL-DEPLOYMENT-ID)
                yield at.problem(
                    [section, name],
                    "a deployment name is sent as a header value: no control characters",
                )
    for model_name, raw in models.items():
        if not isinstance(raw, dict):
            continue
        yield from _model_checks(model_name, raw, roles, at)
    for app_name, raw in as_dict(doc.get("applications")).items():
        if not isinstance(raw, dict):
            continue
        if app_name in models:
            yield at.problem(
                ["applications", app_name],
                f"{show_name(app_name)} is also a model ({render_path(['models', app_name])}): "
                "a deployment name must be unique",
            )
        yield from _application_checks(app_name, raw, at)

    for parts, message, severity in route_problems(doc.get("routes")):
        yield at.problem(parts, message, severity)
    for route_name, route in as_dict(doc.get("routes")).items():
        for i, up in enumerate(as_list(as_dict(route).get("upstreams"))):
            where: list[str | int] = ["routes", route_name, "upstreams", i]
            url = as_dict(up).get("endpoint")
            if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
                for message in _url_problems(url):
                    yield at.problem([*where, "endpoint"], message)
            key = as_dict(up).get("key")
            if isinstance(key, str) and CONTROL.search(key):
                message = "contains control characters (it is sent as a header value)"
                yield at.problem([*where, "key"], message)


def _key_problems(
    secret: str, key: Any, roles: Mapping[str, Any], served: set[str]
) -> Iterator[RawProblem]:
    """One key's checks beyond the schema, not yet located in a file."""
    if not isinstance(key, dict):
        return
    base: tuple[str | int, ...] = ("keys", secret)
    named: list[tuple[tuple[str | int, ...], Any]] = []
    if "role" in key:
        named.append(((*base, "role"), key["role"]))
    named += [((*base, "roles", i), r) for i, r in enumerate(as_list(key.get("roles")))]
    for parts, role in named:
        if isinstance(role, str) and role and role not in roles and role != "default":
            yield parts, f"role {show_name(role)} is not defined in roles", "warning"
    if secret and not secret.startswith("sha256:") and not ENV_REF.search(secret):
        if _key_bits(secret) < 128:
            yield (
                base,
                "the key has less than 128 bits of entropy (DIAL asks for a secure random "
                "key of at least 128 bits); make one with `dialproxy keys generate`",
                "warning",
            )
        if CONTROL.search(secret) or secret != secret.strip():
            yield base, "the key has spaces or control characters: no client can send it", "warning"
    for i, m in enumerate(as_list(key.get("models"))):
        if isinstance(m, str) and m not in served:
            yield (*base, "models", i), f"model {show_name(m)} is not defined", "warning"
    for m in as_dict(key.get("limits")):
        if m != "*" and m not in served:
            yield (*base, "limits", m), f"model {show_name(m)} is not defined", "warning"
    for i, cidr in enumerate(as_list(key.get("allowedIpAddressRanges"))):
        if not isinstance(cidr, str):
            continue
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            yield (
                (*base, "allowedIpAddressRanges", i),
                "not a valid IP address range (CIDR)",
                "error",
            )
    instants: dict[str, datetime] = {}
    for name in ("notBefore", "expiresAt"):
        value = key.get(name)
        if isinstance(value, str) and value:
            try:
                instants[name] = parse_datetime(value)
            except ValueError:
                yield (*base, name), "not a valid date-time", "error"
    if len(instants) == 2 and instants["notBefore"] >= instants["expiresAt"]:
        yield (*base, "expiresAt"), "the key expires before it becomes valid", "warning"


def _application_checks(app_name: str, raw: dict[str, Any], at: Locator) -> Iterator[Problem]:
    """What dialproxy serves of an application: its endpoint (or chat interface), roles,
    headers and feature endpoints."""
    base: list[str | int] = ["applications", app_name]
    for snake, camel in MODEL_ALIASES.items():
        if snake in raw and camel in raw:
            yield at.problem(
                [*base, snake], f"`{snake}` is an alias of `{camel}`, which is also set: keep one"
            )
    # (`userRoles` naming a role no key has is not warned: DIAL's sample apps name IDP roles)
    for message in _url_problems(raw.get("endpoint")):
        yield at.problem([*base, "endpoint"], message)
    yield from _header_checks(raw.get("defaultHeaders"), [*base, "defaultHeaders"], at)
    served = isinstance(raw.get("endpoint"), str)
    for kind, entry in as_dict(raw.get("interfaces")).items():
        at_kind: list[str | int] = [*base, "interfaces", kind]
        if kind != "openaiChatCompletions":
            yield at.problem(
                at_kind,
                "an application serves only `openaiChatCompletions` (as DIAL): ignored",
                "warning",
            )
            continue
        if not isinstance(entry, dict):
            continue
        for name in ("base_url", "baseUrl"):
            for message in _url_problems(entry.get(name)):
                yield at.problem([*at_kind, name], message)
        yield from _header_checks(entry.get("defaultHeaders"), [*at_kind, "defaultHeaders"], at)
        served = served or any(isinstance(entry.get(n), str) for n in ("base_url", "baseUrl"))
    for name, value in as_dict(raw.get("features")).items():
        if name.endswith("Endpoint"):
            for message in _url_problems(value):
                yield at.problem([*base, "features", name], message)
    if not served:
        why = (
            "a schema-rich application (`applicationTypeSchemaId`) is served by the endpoint "
            "of its schema, which dialproxy does not read"
            if "applicationTypeSchemaId" in raw
            else "no `endpoint` and no `openaiChatCompletions` interface with a `base_url`"
        )
        yield at.problem(base, f"{why}: listed, and answered 503", "warning")


def _responses_upstreams(raw: dict[str, Any]) -> list[int]:
    """The places of a model's upstreams that serve the Responses API (as written)."""
    ups = as_list(raw.get("upstreams"))
    interfaces = as_dict(raw.get("interfaces"))
    if raw.get("responsesEndpoint") is not None or "openaiResponses" in interfaces:
        return [i for i, up in enumerate(ups) if isinstance(up, dict)]
    if raw.get("endpoint") is None and not interfaces:  # direct: those with their own URL
        return [
            i
            for i, up in enumerate(ups)
            if isinstance(up, dict) and up.get("responsesEndpoint") is not None
        ]
    return []


def _model_checks(
    model_name: str, raw: dict[str, Any], roles: Mapping[str, Any], at: Locator
) -> Iterator[Problem]:
    base: list[str | int] = ["models", model_name]
    for snake, camel in MODEL_ALIASES.items():
        if snake in raw and camel in raw:
            yield at.problem(
                [*base, snake], f"`{snake}` is an alias of `{camel}`, which is also set: keep one"
            )
    field_name = "userRoles" if "userRoles" in raw else "user_roles"
    for i, role in enumerate(as_list(raw.get(field_name))):
        if isinstance(role, str) and role not in roles and role != "default":
            yield at.problem(
                [*base, field_name, i],
                f"role {show_name(role)} is not defined in roles",
                "warning",
            )
    for name in ("endpoint", "responsesEndpoint", "baseUrl"):
        for message in _url_problems(raw.get(name)):
            yield at.problem([*base, name], message)
    yield from _header_checks(raw.get("defaultHeaders"), [*base, "defaultHeaders"], at)
    served = False  # whether an interface entry has a base URL dialproxy forwards to
    for kind, entry in as_dict(raw.get("interfaces")).items():
        if not isinstance(entry, dict):
            continue
        at_kind: list[str | int] = [*base, "interfaces", kind]
        for name in ("base_url", "baseUrl"):
            for message in _url_problems(entry.get(name)):
                yield at.problem([*at_kind, name], message)
        if "base_url" in entry and "baseUrl" in entry:
            yield at.problem(
                [*at_kind, "baseUrl"], "`baseUrl` is an alias of `base_url`, which is also set"
            )
        if "defaultHeaders" in entry and "default_headers" in entry:
            yield at.problem(
                [*at_kind, "default_headers"],
                "`default_headers` is an alias of `defaultHeaders`, which is also set",
            )
        yield from _header_checks(
            entry.get("defaultHeaders", entry.get("default_headers")),
            [*at_kind, "defaultHeaders" if "defaultHeaders" in entry else "default_headers"],
            at,
        )
        has_url = any(isinstance(entry.get(n), str) for n in ("base_url", "baseUrl"))
        has_url = has_url or isinstance(raw.get("baseUrl"), str)
        if entry.get("mode") == "translator":
            yield at.problem(
                [*at_kind, "mode"],
                "dialproxy does not run translators: this interface is not served (503)",
                "warning",
            )
        elif not has_url:
            yield at.problem(
                at_kind,
                "no `base_url` here and no model `baseUrl`: this interface is not served (503)",
                "warning",
            )
        else:
            served = True
        for name in ("overridePaths", "override_paths"):
            if entry.get(name):
                yield at.problem(
                    [*at_kind, name],
                    "dialproxy does not apply overridePaths: requests go to the base URL + "
                    "the path they came in on",
                    "warning",
                )
        if entry.get("defaults"):
            yield at.problem(
                [*at_kind, "defaults"],
                "dialproxy does not apply per-interface defaults: the model's `defaults` apply",
                "warning",
            )
    for name, value in as_dict(raw.get("features")).items():
        if name.endswith("Endpoint"):
            for message in _url_problems(value):
                yield at.problem([*base, "features", name], message)
    ups = raw.get("upstreams")
    served = served or raw.get("responsesEndpoint") is not None
    if raw.get("endpoint") is None and not served and (as_dict(raw.get("interfaces")) or not ups):
        if as_dict(raw.get("interfaces")):  # DIAL loads it; it answers every proxied API with 503
            yield at.problem(
                base,
                "no `endpoint` and no interface with a base URL: dialproxy serves no "
                "request of this model (503)",
                "warning",
            )
        else:
            yield at.problem(base, "a model needs an `endpoint`, `interfaces` or an upstream")
    weights: list[Any] = []
    for i, up in enumerate(as_list(ups)):
        if not isinstance(up, dict):
            continue
        where: list[str | int] = [*base, "upstreams", i]
        for name in ("endpoint", "responsesEndpoint", "baseUrl", "base_url"):
            for message in _url_problems(up.get(name)):
                yield at.problem([*where, name], message)
        if "baseUrl" in up and "base_url" in up:
            yield at.problem(
                [*where, "base_url"], "`base_url` is an alias of `baseUrl`, which is also set"
            )
        if isinstance(up.get("key"), str) and CONTROL.search(up["key"]):
            yield at.problem(
                [*where, "key"], "contains control characters (it is sent as a header value)"
            )
        weights.append(up.get("weight", 1))
    serving = _responses_upstreams(raw)
    if len(serving) > 1:
        for i in serving:
            if as_list(ups)[i].get("id") is None:
                yield at.problem(
                    [*base, "upstreams", i],
                    "no `id`: DIAL requires one where the Responses API is served (it routes "
                    "follow-ups back to the upstream); dialproxy names it by its index, which "
                    "changes when the list does",
                    "warning",
                )
    if weights and all(isinstance(w, int) and w <= 0 for w in weights):
        yield at.problem(
            [*base, "upstreams"],
            "every upstream has a weight of 0 or less: the model can never be called",
            "warning",
        )


def _header_checks(headers: Any, where: list[str | int], at: Locator) -> Iterator[Problem]:
    for name, value in as_dict(headers).items():
        if never_default_header(name):
            yield at.problem(
                [*where, name],
                f"{show_name(name)} is never forwarded (hop-by-hop, the body's framing, a key, "
                "or set by the proxy): ignored",
                "warning",
            )
        elif isinstance(value, str) and CONTROL.search(value):
            yield at.problem([*where, name], "contains control characters (a header value)")
