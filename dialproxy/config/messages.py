"""What a config problem says and where: JSON paths, messages from the schema's errors, the
file a merged value came from, and no secret in any of them.

Messages are written here, from the schema and the field names, and quote a config value
only when it is short and not in a secret-bearing field; keys are named by their fingerprint
in paths; and every path and message finally goes through a :class:`Redactor` that knows
every key secret, upstream key, URL password and substituted ``${VAR}`` value of the sources.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

import jsonschema

from dialproxy.config.model import Problem, Severity
from dialproxy.config.schema import def_names
from dialproxy.text import ENV_REF, SHA256_KEY, fingerprint, key_digest

_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$-]*")
SECRET_FIELDS = frozenset({"key", "apiKey", "api_key", "secretExtraData", "extraData"})
_SHOW_MAX = 60  # longest config string quoted in a message


# --- paths ---------------------------------------------------------------------------------


def render_path(parts: Sequence[str | int]) -> str:
    """A JSON path like ``$.models.gpt-4.upstreams[0]``, with key secrets replaced.

    The name of an entry of ``keys`` is its secret: it is shown as ``<key 1a2b3c4d>`` (its
    fingerprint), or as written when it is a bare ``${VAR}`` reference that could not be
    resolved (the reference is not the secret).
    """
    out = ["$"]
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out.append(f"[{part}]")
            continue
        if i == 1 and parts[0] == "keys":
            if ENV_REF.fullmatch(part):
                out.append("[" + json.dumps(part) + "]")
            elif part.startswith("sha256:") and SHA256_KEY.match(part):
                out.append(f".<key {fingerprint(part)}>")  # the digest's first hex digits
            else:  # a secret, or a malformed digest that could be one
                out.append(f".<key {key_digest(part)[:8]}>")
            continue
        if _IDENTIFIER.fullmatch(part):
            out.append(f".{part}")
        else:
            out.append("[" + json.dumps(part) + "]")
    return "".join(out)


class Redactor:
    """Replaces every known secret in a text by ``<secret fingerprint>``.

    Secrets are indexed by their first :data:`MIN` characters, so a text is scanned once
    whatever the number of secrets (10,000 keys cost nothing per message).
    """

    MIN = 4  # shorter strings are not treated as secrets (they would garble every message)

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._index: dict[str, list[str]] | None = None

    def add(self, secret: str) -> None:
        if len(secret) >= self.MIN and secret not in self._secrets:
            self._secrets.add(secret)
            self._index = None

    def add_all(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if len(s) >= self.MIN}
        if not new <= self._secrets:
            self._secrets |= new
            self._index = None

    def __contains__(self, text: object) -> bool:
        return text in self._secrets

    def _built(self) -> dict[str, list[str]]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for secret in self._secrets:
                index.setdefault(secret[: self.MIN], []).append(secret)
            for candidates in index.values():
                candidates.sort(key=len, reverse=True)
            self._index = index
        return self._index

    def __call__(self, text: str) -> str:
        if not self._secrets or len(text) < self.MIN:
            return text
        index = self._built()
        out: list[str] = []
        start = i = 0
        end = len(text) - self.MIN
        while i <= end:
            for secret in index.get(text[i : i + self.MIN], ()):
                if text.startswith(secret, i):
                    out.append(text[start:i])
                    out.append(f"<secret {fingerprint(secret)}>")
                    i = start = i + len(secret)
                    break
            else:
                i += 1
        if not out:
            return text
        out.append(text[start:])
        return "".join(out)


class Located(Protocol):
    """One file's document as the locator reads it (:class:`dialproxy.config.parse.Prepared`)."""

    @property
    def name(self) -> str: ...
    @property
    def doc(self) -> Any: ...


class Locator:
    """Maps a path in the merged document to the file, and the path in it, it came from."""

    def __init__(self, docs: Sequence[Located], files: Sequence[str]) -> None:
        self.docs = docs
        self.fallback = files[-1] if files else "<config>"

    def locate(self, parts: Sequence[str | int]) -> tuple[str, list[str | int]]:
        chain: list[tuple[str, Any, list[str | int]]] = [(d.name, d.doc, []) for d in self.docs]
        for part in parts:
            if isinstance(part, str):
                found = [
                    (name, node[part], [*local, part])
                    for name, node, local in chain
                    if isinstance(node, dict) and part in node
                ]
                chain = _merged_chain(found)
            else:
                index, picked = part, []
                for name, node, local in chain:
                    if not isinstance(node, list):
                        continue
                    if index < len(node):
                        picked = [(name, node[index], [*local, index])]
                        break
                    index -= len(node)
                chain = picked
            if not chain:
                return self.fallback, list(parts)
        name, _, local = chain[-1]
        return name, local

    def problem(
        self, parts: Sequence[str | int], message: str, severity: Severity = "error"
    ) -> Problem:
        file, local = self.locate(parts)
        return Problem(file, render_path(local), message, severity)


def _merged_chain(
    found: list[tuple[str, Any, list[str | int]]],
) -> list[tuple[str, Any, list[str | int]]]:
    """The values that make up a merged value: the last run of objects (or of arrays)."""
    if not found:
        return found
    kind = type(found[-1][1])
    if kind not in (dict, list):
        return found[-1:]
    start = len(found) - 1
    while start > 0 and type(found[start - 1][1]) is kind:
        start -= 1
    return found[start:]


# --- messages ------------------------------------------------------------------------------


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _sensitive(parts: Sequence[str | int]) -> bool:
    """Values here may be secrets: an upstream key, extra data, a key entry itself."""
    if parts and parts[0] == "keys" and len(parts) <= 2:
        return True
    return any(isinstance(p, str) and p in SECRET_FIELDS for p in parts)


def _show(value: Any, parts: Sequence[str | int]) -> str:
    """A config value for a message: quoted when short and not secret-bearing, else its type."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float) and not _sensitive(parts):
        return json.dumps(value)
    if isinstance(value, str) and not _sensitive(parts) and len(value) <= _SHOW_MAX:
        return json.dumps(value)
    return json_type(value)


def show_name(name: str) -> str:
    if len(name) > _SHOW_MAX:
        return json.dumps(name[:_SHOW_MAX] + "…")
    return json.dumps(name)


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


# What a value of each definition must look like, for messages.
_FORMS = {
    "LimitValue": 'an integer or an integer written as a string, such as "100000"',
    "CostValue": 'a non-negative amount in USD: a decimal string such as "10.5", or a number',
    "DecimalString": 'a non-negative decimal number written as a string, such as "0.00003"',
    "Url": "an absolute URL such as https://host/path",
    "DateTime": "an RFC 3339 date-time with an offset, such as 2026-01-01T00:00:00Z",
    "Timestamp": "epoch milliseconds (an integer) or a date string",
    "LocalizedString": 'a string, or an object of strings by language such as {"en": "..."}',
}


_KINDS = {
    "Model": "a model",
    "Upstream": "an upstream",
    "Key": "a key",
    "Role": "a role",
    "Limit": "a limit",
    "TokenLimits": "a model's limits",
    "Pricing": "pricing",
    "CostLimit": "a cost limit",
    "RateLimitSchedule": "rateLimitSchedule",
}


def schema_problem(
    error: jsonschema.ValidationError, locator: Locator
) -> tuple[list[Problem], bool]:
    """The problem(s) for one schema error; the flag says the path is a key name's."""
    parts: list[str | int] = list(error.absolute_path)
    node = cast(dict[str, Any], error.schema) if isinstance(error.schema, dict) else {}
    where = def_names().get(id(error.schema))
    kind = _KINDS.get(where or "", "")
    validator = str(error.validator)
    value = error.instance
    if "propertyNames" in error.schema_path:
        name = str(value)
        if name.startswith("sha256:"):
            message = (
                "a key written as `sha256:` must be followed by the 64 lowercase hex digits "
                "of the secret's SHA-256"
            )
        else:
            message = "a key must not be empty"
        return [locator.problem([*parts, name], message)], True
    if validator == "additionalProperties" and isinstance(value, dict):
        known = list(node.get("properties") or {})
        out: list[Problem] = []
        for extra in [k for k in value if k not in known]:
            message = f"unknown field {show_name(extra)}" + (f" in {kind}" if kind else "")
            close = difflib.get_close_matches(extra, known, n=1, cutoff=0.75)
            if close:
                message += f"; did you mean {json.dumps(close[0])}?"
            file, local = locator.locate([*parts, extra])
            out.append(Problem(file, render_path(local[:-1]), message))
        return out, False
    if validator == "required" and isinstance(value, dict):
        missing = [f for f in cast(list[str], error.validator_value) if f not in value]
        names = ", ".join(json.dumps(f) for f in missing)
        message = f"{kind or 'the object'} needs {names}" if kind else f"missing {names}"
        if where == "Upstream" and ("baseUrl" in value or "base_url" in value):
            message += " (dialproxy does not build URLs from `baseUrl`; give the full endpoint)"
        elif where == "Upstream" and "interfaces" in value:
            message += " (dialproxy does not use `interfaces`; give the full endpoint)"
        return [locator.problem(parts, message)], False
    if validator == "anyOf" and where == "Key":
        message = "a key needs at least one role: set `role` or a non-empty `roles`"
        return [locator.problem(parts, message)], False
    if where in _FORMS and validator in ("anyOf", "type", "pattern"):
        message = f"must be {_FORMS[where]} (got {_show(value, parts)})"
        return [locator.problem(parts, message)], False
    return [locator.problem(parts, _generic_message(error, parts))], False


def _generic_message(error: jsonschema.ValidationError, parts: Sequence[str | int]) -> str:
    validator, value = str(error.validator), error.instance
    expected: Any = error.validator_value
    got = _show(value, parts)
    if validator == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
        return f"must be {wanted} (got {got})"
    if validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in expected)
        return f"must be one of {allowed} (got {got})"
    if validator == "pattern":
        if parts and parts[-1] == "type":
            return f"must be chat, completion or embedding (got {got})"
        if parts and parts[-1] == "resetTime":
            return f"must be a time of day HH:MM, from 00:00 to 23:59 (got {got})"
        return f"does not have the expected form (pattern {expected}; got {got})"
    if validator == "minLength":
        return "must not be empty" if expected == 1 else f"must have at least {expected} characters"
    if validator == "minItems":
        return "must not be empty" if expected == 1 else f"must have at least {expected} items"
    if validator == "minProperties":
        return "must not be empty"
    if validator == "minimum":
        return f"must be at least {expected} (got {got})"
    if validator == "maximum":
        return f"must be at most {expected} (got {got})"
    if validator == "anyOf":
        return f"is not one of the accepted forms (got {got})"
    return f"is not valid ({validator})"
