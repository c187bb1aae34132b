"""bytes -> parsed documents -> ${VAR} resolved -> merged -> schema -> semantic checks -> Snapshot.

Building a snapshot is pure: the sources' bytes and an environment mapping in, a
:class:`Snapshot` (with its warnings) or a :class:`ConfigError` listing every problem out.
Nothing else is ever raised, whatever the bytes.

No secret ever appears in a problem.  Messages are written here, from the schema and the
field names, and quote a config value only when it is short and not in a secret-bearing
field; keys are named by their fingerprint in paths; and every path and message finally goes
through a :class:`_Redactor` that knows every key secret, upstream key, URL password and
substituted ``${VAR}`` value of the sources.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

import jsonschema
import yaml

from dialproxy.config.grants import Grants
from dialproxy.config.model import (
    Access,
    Interface,
    Key,
    Limit,
    Model,
    Pricing,
    Problem,
    Role,
    Severity,
    Snapshot,
    Upstream,
    fingerprint,
    key_digest,
)
from dialproxy.config.reuse import SECTIONS, Built, Canonical, RawProblem, Walked, changed_only
from dialproxy.config.routes import build_routes, route_problems
from dialproxy.config.schedule import Schedule, zone
from dialproxy.config.schema import def_names, schema_valid, validator
from dialproxy.errors import ConfigError as ConfigError  # (imported from here too)
from dialproxy.text import CONTROL, ENV_REF, SHA256_KEY, parse_datetime, written_digest
from dialproxy.wire.headers import never_default_header

_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$-]*")
_DEFAULT_RETRIABLE = frozenset({429, 502, 503, 504})
_MAX_DEPTH = 64  # nesting levels a document may have
_MAX_VALUES = 1_000_000  # values a document may expand to (YAML aliases)
_SECRET_FIELDS = frozenset({"key", "apiKey", "api_key", "secretExtraData", "extraData"})
_SHOW_MAX = 60  # longest config string quoted in a message

# DIAL's snake_case aliases of model fields, normalised to the camelCase names.
_MODEL_ALIASES = {
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


@dataclass(frozen=True, slots=True)
class Source:
    """One config file's name (as reported) and bytes."""

    name: str
    data: bytes


def read_sources(paths: Iterable[str | Path]) -> list[Source]:
    """Read config files; an unreadable file raises ``OSError`` (the caller's exit 2)."""
    return [Source(str(p), Path(p).read_bytes()) for p in paths]


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


class _Redactor:
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


# --- parsing -------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """YAML with JSON's data model: timestamps stay strings, repeated keys are recorded."""

    duplicates: dict[int, tuple[object, list[str]]]


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_map(loader: _YamlLoader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
    data: dict[Any, Any] = {}
    yield data
    seen: set[str] = set()
    repeated: list[str] = []
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                repeated.append(key_node.value)
            seen.add(key_node.value)
    data.update(loader.construct_mapping(node))
    if repeated:
        loader.duplicates[id(data)] = (data, repeated)  # holding `data` keeps its id unique


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _yaml_map)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = str(getattr(error, "problem", None) or "not valid YAML")
    # PyYAML quotes what it found (an alias, a tag...): keep one-character and token quotes
    # (`'\t'`, `'<scalar>'`), drop the rest, which could be a piece of a secret.
    problem = re.sub(r"'[^']*'", _keep_short_quote, problem)
    return f"invalid YAML{where}: {problem}"


def _keep_short_quote(m: re.Match[str]) -> str:
    inner = m.group(0)[1:-1]
    return m.group(0) if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class _Parsed:
    doc: Any
    duplicates: dict[int, tuple[object, list[str]]]
    problem: str | None = None


def _parse(source: Source) -> _Parsed:
    """The document of one source (any JSON value), or why it cannot be read."""
    duplicates: dict[int, tuple[object, list[str]]] = {}
    try:
        text = source.data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = source.data[: e.start].count(b"\n") + 1
        return _Parsed(None, duplicates, f"not UTF-8 text (line {line}, byte {e.start})")
    if source.name.endswith((".yaml", ".yml")):
        try:
            loader = _YamlLoader(text)  # checks the characters: may raise ReaderError
            loader.duplicates = duplicates
            try:
                return _Parsed(loader.get_single_data(), duplicates)
            finally:
                loader.dispose()
        except yaml.reader.ReaderError as e:
            problem = f"invalid YAML: character #x{e.character:04x} is not allowed"
            line = text[: e.position].count("\n") + 1
            return _Parsed(None, duplicates, f"{problem} (line {line})")
        except yaml.YAMLError as e:
            return _Parsed(None, duplicates, _yaml_problem(e))
        except RecursionError:
            return _Parsed(None, duplicates, "invalid YAML: nested too deeply")
        except (ValueError, TypeError, AttributeError, OverflowError):
            return _Parsed(None, duplicates, "invalid YAML: a value cannot be constructed")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            repeated: list[str] = []
            for k, _ in items:
                if k in seen:
                    repeated.append(k)
                seen.add(k)
            duplicates[id(obj)] = (obj, repeated)  # holding `obj` keeps its id unique
        return obj

    try:
        doc = json.loads(text, object_pairs_hook=pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return _Parsed(
            None, duplicates, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        )
    except RecursionError:
        return _Parsed(None, duplicates, "invalid JSON: nested too deeply")
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        reason = str(e) if "JSON number" in str(e) else "a number is too long"
        return _Parsed(None, duplicates, f"invalid JSON: {reason}")
    return _Parsed(doc, duplicates)


# --- one document: JSON data model, ${VAR}, secrets ---------------------------------------


class _TooBig(Exception):
    """A document expands to too many values (YAML aliases): stop walking it."""


@dataclass
class _Prepared:
    """One source after parsing and ``${VAR}`` substitution, with what was learnt on the way."""

    name: str
    doc: dict[str, Any]
    # (file, rendered path) of values already reported (an unset ${VAR}, a YAML value JSON
    # cannot hold...): what the later checks find there follows from it and is not reported.
    reported: list[tuple[str, str]] = field(default_factory=list)


class _Preparer:
    """Walks a parsed document once: checks it is JSON, substitutes ``${VAR}``, finds secrets."""

    def __init__(
        self,
        file: str,
        env: Mapping[str, str],
        duplicates: Mapping[int, tuple[object, list[str]]],
        problems: list[Problem],
        redact: _Redactor,
        env_values: _Redactor,
        last: Mapping[str, Mapping[str, Walked]] | None = None,
    ) -> None:
        self.file = file
        self.env = env
        self.duplicates = duplicates
        self.problems = problems
        self.redact = redact
        self.env_values = env_values
        self.values = 0
        self.reported: list[tuple[str, str]] = []
        self.stack: set[int] = set()
        # The entries of the sections as they were last time (a JSON file's, in a good
        # build): an equal one is taken as it was (:class:`Walked`).  ``kept``: this walk's,
        # None when they cannot be kept (a field given twice: equal objects, not one input).
        self.last = last if not duplicates else None
        self.kept: dict[str, dict[str, Walked]] | None = {} if not duplicates else None
        # What the walk read and added, in order, and the numbers and booleans it met: an
        # entry's part is what it adds to these while it is walked.
        self.used: list[tuple[str, str]] = []
        self.secrets: list[str] = []
        self.shown: list[str] = []
        self.numbers = 0

    def error(self, parts: Sequence[str | int], message: str, severity: Severity = "error") -> None:
        self.problems.append(Problem(self.file, render_path(parts), message, severity))

    def replaced(self, parts: Sequence[str | int], message: str) -> None:
        """Report a value that is dropped (it becomes null) and what follows from it."""
        self.error(parts, message)
        self.reported.append((self.file, render_path(parts)))

    def substitute(self, text: str, parts: Sequence[str | int], secret: bool) -> tuple[str, bool]:
        """``text`` with its ``${VAR}``s replaced; ``False`` (and the text as written) when one
        is not set, which is reported at ``parts``."""
        if "${" not in text:
            return text, True
        missing: list[str] = []

        def one(m: re.Match[str]) -> str:
            value = self.env.get(m.group(1))
            if value is None:
                missing.append(m.group(1))
                return m.group(0)
            self.used.append((m.group(1), value))
            if secret:
                self.secret(value)
            else:
                self.shown.append(value)
                self.env_values.add(value)
            return value

        result = ENV_REF.sub(one, text)
        for name in dict.fromkeys(missing):
            self.error(parts, f"environment variable {name} is not set")
        if missing:
            self.reported.append((self.file, render_path(parts)))
            return text, False
        return result, True

    def secret(self, text: str) -> None:
        self.secrets.append(text)
        self.redact.add(text)

    def walk(self, value: Any, parts: list[str | int], depth: int) -> Any:
        self.values += 1
        if self.values > _MAX_VALUES:
            self.error(parts, f"the document expands to more than {_MAX_VALUES:,} values")
            raise _TooBig
        if isinstance(value, str):
            secret = bool(parts) and (
                parts[-1] in _SECRET_FIELDS
                or (len(parts) > 1 and isinstance(parts[-1], int) and parts[-2] in _SECRET_FIELDS)
            )
            text, resolved = self.substitute(value, parts, secret)
            if secret and resolved:
                self.secret(text)
            if "@" in text and "://" in text:
                self._url_password(text)
            return text
        if value is None:
            return value
        if isinstance(value, bool | int):
            self.numbers += 1
            return value
        if isinstance(value, float):
            self.numbers += 1
            if math.isfinite(value):
                return value
            self.replaced(parts, "not a finite number")
            return None
        if not isinstance(value, dict | list):
            self.replaced(parts, f"a YAML {type(value).__name__} value has no JSON equivalent")
            return None
        if depth >= _MAX_DEPTH:
            self.replaced(parts, f"nested more than {_MAX_DEPTH} levels deep")
            return None
        if id(value) in self.stack:
            self.replaced(parts, "a YAML alias refers to the value that contains it")
            return None
        self.stack.add(id(value))
        secret_list = bool(parts) and parts[-1] in _SECRET_FIELDS
        try:
            if isinstance(value, list):
                self.values += len(value)
                return [
                    v
                    if type(v) is str and "${" not in v and "@" not in v and not secret_list
                    else self.walk(v, [*parts, i], depth + 1)
                    for i, v in enumerate(value)
                ]
            return self._object(value, parts, depth)
        finally:
            self.stack.discard(id(value))

    def _object(
        self, value: dict[Any, Any], parts: list[str | int], depth: int, whole: bool = True
    ) -> dict[str, Any]:
        in_keys = parts == ["keys"]
        entries = len(parts) == 1 and parts[0] in SECTIONS and self.kept is not None
        if entries and whole:
            taken = self._unchanged(str(parts[0]), value)
            if taken:  # the others are walked one by one; all in the order of the file
                rest = {n: v for n, v in value.items() if n not in taken}
                section: dict[str, Any] = dict.fromkeys(value)
                section.update(zip(taken, [w.out for w in taken.values()], strict=True))
                section.update(self._object(rest, parts, depth, whole=False))
                return section
        repeated = self.duplicates.get(id(value), (None, []))[1]
        out: dict[str, Any] = {}
        for k, v in value.items():
            if (
                type(v) is str
                and k not in _SECRET_FIELDS
                and "${" not in v
                and "@" not in v
                and isinstance(k, str)
                and not in_keys
            ):  # the usual plain string: nothing to do (the hot path of a big config)
                self.values += 1
                out[k] = v
                continue
            if not isinstance(k, str):
                shown = repr(k) if k is None or isinstance(k, bool | int | float) else "it"
                self.error(parts, f"a field name must be a string (quote the YAML key {shown})")
                continue
            name = k
            if in_keys:
                name, resolved = self.substitute(k, [*parts, k], secret=True)
                if resolved:
                    self.redact.add(name)
                if name in out:
                    self.error([*parts, name], "the same key is defined twice in this file")
            if entries and name == k:
                out[name] = self._entry(str(parts[0]), name, v, depth + 1)
            else:
                out[name] = self.walk(v, [*parts, name], depth + 1)
        for k in dict.fromkeys(repeated):
            if in_keys:
                self.error([*parts, k], "the same key is defined twice in this file")
            else:
                shown = _show_name(k)
                self.error(parts, f"field {shown} is given twice; the last one is used", "warning")
        return out

    def _unchanged(self, section: str, value: dict[str, Any]) -> dict[str, Walked] | None:
        """The entries of ``section`` that are as they were last time and read nothing
        else (no number or boolean, no variable, no secret): all of them at once (C speed:
        a reload of a big config changes few of its 10,000 keys).  The others go through
        :meth:`_entry`."""
        olds = self.last.get(section) if self.last is not None else None
        if not olds or self.kept is None:
            return None
        if section == "keys" and any(["${" in name for name in value]):
            return None  # (a name is substituted: see _object)
        taken = {
            n: w
            for n, v in value.items()
            if (w := olds.get(n)) is not None and w.plain and w.raw == v
        }
        total = sum([w.values for w in taken.values()])
        if self.values + total > _MAX_VALUES:
            return None  # (walked, to fail where a full walk does)
        self.values += total
        self.kept.setdefault(section, {}).update(taken)
        if section == "keys":
            self.redact.add_all(taken)  # (their names are the secrets)
        return taken

    def _entry(self, section: str, name: str, value: Any, depth: int) -> Any:
        """An entry of a section: as it was last time when it is the same (see ``last``)."""
        assert self.kept is not None
        kept = self.kept.setdefault(section, {})
        olds = self.last.get(section) if self.last is not None else None
        was = olds.get(name) if olds is not None else None
        if (
            was is not None
            and self.values + was.values <= _MAX_VALUES
            and was.same(value, self.env)
        ):
            self.values += was.values
            self.used += was.env
            for text in was.secrets:
                self.secret(text)
            for text in was.env_values:
                self.shown.append(text)
                self.env_values.add(text)
            kept[name] = was
            return was.out
        values, problems, reported = self.values, len(self.problems), len(self.reported)
        used, secrets, shown, numbers = (
            len(self.used),
            len(self.secrets),
            len(self.shown),
            self.numbers,
        )
        out = self.walk(value, [section, name], depth)
        if len(self.problems) == problems and len(self.reported) == reported:
            kept[name] = Walked.of(
                value,
                out,
                self.numbers != numbers,
                tuple(self.used[used:]),
                tuple(self.secrets[secrets:]),
                tuple(self.shown[shown:]),
                self.values - values,
            )
        else:
            kept.pop(name, None)
        return out

    def _url_password(self, text: str) -> None:
        for m in re.finditer(r"://[^/@:\s]*:([^/@\s]+)@", text):
            self.secret(m.group(1))


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


class _Locator:
    """Maps a path in the merged document to the file, and the path in it, it came from."""

    def __init__(self, docs: Sequence[_Prepared], files: Sequence[str]) -> None:
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


def _json_type(value: Any) -> str:
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
    return any(isinstance(p, str) and p in _SECRET_FIELDS for p in parts)


def _show(value: Any, parts: Sequence[str | int]) -> str:
    """A config value for a message: quoted when short and not secret-bearing, else its type."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float) and not _sensitive(parts):
        return json.dumps(value)
    if isinstance(value, str) and not _sensitive(parts) and len(value) <= _SHOW_MAX:
        return json.dumps(value)
    return _json_type(value)


def _show_name(name: str) -> str:
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


def _schema_problem(
    error: jsonschema.ValidationError, locator: _Locator
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
            message = f"unknown field {_show_name(extra)}" + (f" in {kind}" if kind else "")
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
    redact = _Redactor()  # secrets: hidden in paths and messages
    env_values = _Redactor()  # other ${VAR} values: hidden in messages
    docs: list[_Prepared] = []
    walked: dict[str, dict[str, dict[str, Walked]]] = {}
    unreadable = False
    for source in sources:
        _pause()
        parsed = _parse(source)
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
                    f"the config must be a JSON object, not {_json_type(parsed.doc)}",
                )
            )
            unreadable = True
            continue
        # A YAML document may hold one object in several places (aliases), even within
        # itself: only a JSON file's entries are compared with the last ones.
        json_file = not source.name.endswith((".yaml", ".yml"))
        before = last.walked.get(source.name) if last is not None and json_file else None
        preparer = _Preparer(
            source.name, env, parsed.duplicates, problems, redact, env_values, before
        )
        _pause()
        try:
            doc = preparer.walk(parsed.doc, [], 0)
        except _TooBig:
            unreadable = True
            continue
        if json_file and preparer.kept is not None:
            walked[source.name] = preparer.kept
        docs.append(_Prepared(source.name, doc, preparer.reported))
    found: list[Problem] = []  # by the checks below, which may follow from the above
    digests: dict[str, str] = {}
    _check_duplicate_keys(docs, found, last.digests if last is not None else {}, digests)
    if unreadable:
        raise ConfigError(_finish(problems, found, docs, redact, env_values))

    merged: dict[str, Any] = {}
    for prepared in docs:
        merged = merge(merged, prepared.doc)
    files = tuple(s.name for s in sources)
    locator = _Locator(docs, files)

    _pause()
    canonical = Canonical.of(merged, last.canonical if last is not None else None)
    built_now = Built(canonical, walked=walked, digests=digests)
    _pause()
    # The entries the last good build had as they are were valid: the others are checked,
    # and when one is not, the whole document, for errors located as in a full build.
    if not schema_valid(changed_only(merged, canonical, last)):
        for error in validator().iter_errors(merged):
            found.extend(_schema_problem(error, locator)[0])
    _pause()
    found.extend(_semantic_checks(merged, locator, canonical, last, built_now))
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
    docs: Sequence[_Prepared],
    redact: _Redactor,
    env_values: _Redactor,
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


def _check_duplicate_keys(
    docs: Sequence[_Prepared],
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
    return {_MODEL_ALIASES.get(k, k): v for k, v in raw.items()}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _deployment_names(doc: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for section in _DEPLOYMENT_SECTIONS:
        names.update(_dict(doc.get(section)))
    names.update(_dict(_dict(doc.get("assistant")).get("assistants")))
    return names


def _semantic_checks(
    doc: dict[str, Any],
    at: _Locator,
    canonical: Canonical | None = None,
    last: Built | None = None,
    built: Built | None = None,
) -> Iterator[Problem]:
    """Cross-references and safety; the document may not match the schema (be defensive).
    A key's checks are the last good build's when its entry and the names it may refer to
    are the same (``canonical``, ``last``); they are kept in ``built``."""
    models = _dict(doc.get("models"))
    roles = _dict(doc.get("roles"))
    keys = _dict(doc.get("keys"))
    deployments = _deployment_names(doc)
    served = set(models) | set(_dict(doc.get("applications")))  # what a key may name

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
            f"unknown time zone {_show_name(timezone)} (an IANA name such as UTC or Europe/Berlin)",
        )

    for role_name, role in roles.items():
        for name in _dict(_dict(role).get("limits")):
            if name not in deployments:
                yield warn(
                    ["roles", role_name, "limits", name],
                    f"no model (or application, addon, assistant, toolset) {_show_name(name)} "
                    "is defined",
                )

    for model_name, raw in models.items():
        if not isinstance(raw, dict):
            continue
        yield from _model_checks(model_name, raw, roles, at)
    for app_name, raw in _dict(doc.get("applications")).items():
        if not isinstance(raw, dict):
            continue
        if app_name in models:
            yield at.problem(
                ["applications", app_name],
                f"{_show_name(app_name)} is also a model ({render_path(['models', app_name])}): "
                "a deployment name must be unique",
            )
        yield from _application_checks(app_name, raw, at)

    for parts, message, severity in route_problems(doc.get("routes")):
        yield at.problem(parts, message, severity)
    for route_name, route in _dict(doc.get("routes")).items():
        for i, up in enumerate(_list(_dict(route).get("upstreams"))):
            where: list[str | int] = ["routes", route_name, "upstreams", i]
            url = _dict(up).get("endpoint")
            if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
                for message in _url_problems(url):
                    yield at.problem([*where, "endpoint"], message)
            key = _dict(up).get("key")
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
    named += [((*base, "roles", i), r) for i, r in enumerate(_list(key.get("roles")))]
    for parts, role in named:
        if isinstance(role, str) and role and role not in roles and role != "default":
            yield parts, f"role {_show_name(role)} is not defined in roles", "warning"
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
    for i, m in enumerate(_list(key.get("models"))):
        if isinstance(m, str) and m not in served:
            yield (*base, "models", i), f"model {_show_name(m)} is not defined", "warning"
    for m in _dict(key.get("limits")):
        if m != "*" and m not in served:
            yield (*base, "limits", m), f"model {_show_name(m)} is not defined", "warning"
    for i, cidr in enumerate(_list(key.get("allowedIpAddressRanges"))):
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


def _application_checks(app_name: str, raw: dict[str, Any], at: _Locator) -> Iterator[Problem]:
    """What dialproxy serves of an application: its endpoint (or chat interface), roles,
    headers and feature endpoints."""
    base: list[str | int] = ["applications", app_name]
    for snake, camel in _MODEL_ALIASES.items():
        if snake in raw and camel in raw:
            yield at.problem(
                [*base, snake], f"`{snake}` is an alias of `{camel}`, which is also set: keep one"
            )
    # (`userRoles` naming a role no key has is not warned: DIAL's sample apps name IDP roles)
    for message in _url_problems(raw.get("endpoint")):
        yield at.problem([*base, "endpoint"], message)
    yield from _header_checks(raw.get("defaultHeaders"), [*base, "defaultHeaders"], at)
    served = isinstance(raw.get("endpoint"), str)
    for kind, entry in _dict(raw.get("interfaces")).items():
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
    for name, value in _dict(raw.get("features")).items():
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
    ups = _list(raw.get("upstreams"))
    interfaces = _dict(raw.get("interfaces"))
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
    model_name: str, raw: dict[str, Any], roles: Mapping[str, Any], at: _Locator
) -> Iterator[Problem]:
    base: list[str | int] = ["models", model_name]
    for snake, camel in _MODEL_ALIASES.items():
        if snake in raw and camel in raw:
            yield at.problem(
                [*base, snake], f"`{snake}` is an alias of `{camel}`, which is also set: keep one"
            )
    field_name = "userRoles" if "userRoles" in raw else "user_roles"
    for i, role in enumerate(_list(raw.get(field_name))):
        if isinstance(role, str) and role not in roles and role != "default":
            yield at.problem(
                [*base, field_name, i],
                f"role {_show_name(role)} is not defined in roles",
                "warning",
            )
    for name in ("endpoint", "responsesEndpoint", "baseUrl"):
        for message in _url_problems(raw.get(name)):
            yield at.problem([*base, name], message)
    yield from _header_checks(raw.get("defaultHeaders"), [*base, "defaultHeaders"], at)
    served = False  # whether an interface entry has a base URL dialproxy forwards to
    for kind, entry in _dict(raw.get("interfaces")).items():
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
    for name, value in _dict(raw.get("features")).items():
        if name.endswith("Endpoint"):
            for message in _url_problems(value):
                yield at.problem([*base, "features", name], message)
    ups = raw.get("upstreams")
    served = served or raw.get("responsesEndpoint") is not None
    if raw.get("endpoint") is None and not served and (_dict(raw.get("interfaces")) or not ups):
        if _dict(raw.get("interfaces")):  # DIAL loads it; it answers every proxied API with 503
            yield at.problem(
                base,
                "no `endpoint` and no interface with a base URL: dialproxy serves no "
                "request of this model (503)",
                "warning",
            )
        else:
            yield at.problem(base, "a model needs an `endpoint`, `interfaces` or an upstream")
    weights: list[Any] = []
    for i, up in enumerate(_list(ups)):
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
            if _list(ups)[i].get("id") is None:
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


def _header_checks(headers: Any, where: list[str | int], at: _Locator) -> Iterator[Problem]:
    for name, value in _dict(headers).items():
        if never_default_header(name):
            yield at.problem(
                [*where, name],
                f"{_show_name(name)} is never forwarded (hop-by-hop, the body's framing, a key, "
                "or set by the proxy): ignored",
                "warning",
            )
        elif isinstance(value, str) and CONTROL.search(value):
            yield at.problem([*where, name], "contains control characters (a header value)")


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
                for kind, entry in _dict(raw.get("interfaces")).items()
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
