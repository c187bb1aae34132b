"""The loader's first stages: sources read, each parsed (JSON, or YAML with JSON's data
model), walked once (``${VAR}`` substituted, secrets found, values JSON cannot hold
reported), and the documents merged as DIAL merges them."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dialproxy.config.messages import SECRET_FIELDS, Redactor, render_path, show_name
from dialproxy.config.model import Problem, Severity
from dialproxy.config.reuse import SECTIONS, Walked
from dialproxy.text import ENV_REF, SURROGATE, lone_surrogate

_MAX_DEPTH = 64  # nesting levels a document may have
_MAX_VALUES = 1_000_000  # values a document may expand to (YAML aliases)
# A surrogate's escape (JSON's and YAML's \uD800-\uDFFF, YAML's \U0000D800-...): the one way
# text decoded from UTF-8 comes to hold a lone surrogate (besides a ${VAR}'s value).
_SURROGATE_ESCAPE = re.compile(rb"\\(?:u|U0000)[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Source:
    """One config file's name (as reported) and bytes."""

    name: str
    data: bytes


def read_sources(paths: Iterable[str | Path], pipes: bool = False) -> list[Source]:
    """Read config files; an unreadable file raises ``OSError`` (the caller's exit 2).
    ``pipes``: a pipe is read too, waiting for its writer (a command line's ``<(...)`` or
    ``/dev/stdin``: not the server's, whose event loop must not wait)."""
    if pipes:
        return [Source(str(p), Path(p).read_bytes()) for p in paths]
    return [Source(str(p), read_file(p)) for p in paths]


def read_file(path: str | Path) -> bytes:
    """A config file's bytes; ``OSError`` when it cannot be read, or is not a regular file:
    a FIFO (a path swapped for one) would block the reading thread, the event loop's, until
    something wrote to it (it is opened without waiting, and refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


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
class Parsed:
    doc: Any
    duplicates: dict[int, tuple[object, list[str]]]
    problem: str | None = None


def parse_source(source: Source) -> Parsed:
    """The document of one source (any JSON value), or why it cannot be read."""
    duplicates: dict[int, tuple[object, list[str]]] = {}
    try:
        text = source.data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = source.data[: e.start].count(b"\n") + 1
        return Parsed(None, duplicates, f"not UTF-8 text (line {line}, byte {e.start})")
    if source.name.endswith((".yaml", ".yml")):
        try:
            loader = _YamlLoader(text)  # checks the characters: may raise ReaderError
            loader.duplicates = duplicates
            try:
                return Parsed(loader.get_single_data(), duplicates)
            finally:
                loader.dispose()
        except yaml.reader.ReaderError as e:
            problem = f"invalid YAML: character #x{e.character:04x} is not allowed"
            line = text[: e.position].count("\n") + 1
            return Parsed(None, duplicates, f"{problem} (line {line})")
        except yaml.YAMLError as e:
            return Parsed(None, duplicates, _yaml_problem(e))
        except RecursionError:
            return Parsed(None, duplicates, "invalid YAML: nested too deeply")
        except (ValueError, TypeError, AttributeError, OverflowError):
            return Parsed(None, duplicates, "invalid YAML: a value cannot be constructed")

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
        return Parsed(
            None, duplicates, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        )
    except RecursionError:
        return Parsed(None, duplicates, "invalid JSON: nested too deeply")
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        reason = str(e) if "JSON number" in str(e) else "a number is too long"
        return Parsed(None, duplicates, f"invalid JSON: {reason}")
    return Parsed(doc, duplicates)


# --- one document: JSON data model, ${VAR}, secrets ---------------------------------------


class TooBig(Exception):
    """A document expands to too many values (YAML aliases): stop walking it."""


@dataclass
class Prepared:
    """One source after parsing and ``${VAR}`` substitution, with what was learnt on the way."""

    name: str
    doc: dict[str, Any]
    # (file, rendered path) of values already reported (an unset ${VAR}, a YAML value JSON
    # cannot hold...): what the later checks find there follows from it and is not reported.
    reported: list[tuple[str, str]] = field(default_factory=list)


class Preparer:
    """Walks a parsed document once: checks it is JSON, substitutes ``${VAR}``, finds secrets."""

    def __init__(
        self,
        file: str,
        env: Mapping[str, str],
        duplicates: Mapping[int, tuple[object, list[str]]],
        problems: list[Problem],
        redact: Redactor,
        env_values: Redactor,
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
            raise TooBig
        if isinstance(value, str):
            secret = bool(parts) and (
                parts[-1] in SECRET_FIELDS
                or (len(parts) > 1 and isinstance(parts[-1], int) and parts[-2] in SECRET_FIELDS)
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
        secret_list = bool(parts) and parts[-1] in SECRET_FIELDS
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
                and k not in SECRET_FIELDS
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
                shown = show_name(k)
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


def may_hold_surrogates(source: Source, used: Iterable[tuple[str, str]]) -> bool:
    """Whether a document may hold a lone surrogate: its text escapes one (a pair is one
    character, but which it is is found by looking) or a ${VAR} it read has one."""
    return _SURROGATE_ESCAPE.search(source.data) is not None or any(
        [SURROGATE.search(value) for _, value in used]
    )


def lone_surrogates(value: Any, parts: list[str | int]) -> Iterator[tuple[list[str | int], str]]:
    """The paths of the strings (names and values) of a prepared document that hold a lone
    surrogate, which no UTF-8 text can carry (a log line, a Redis key, the usage ledger's
    rows would fail on it), each with the first such character, escaped."""
    if isinstance(value, str):
        if (char := lone_surrogate(value)) is not None:
            yield parts, char
    elif isinstance(value, dict):
        for k, v in value.items():
            if (char := lone_surrogate(k)) is not None:
                yield [*parts, k], char
            yield from lone_surrogates(v, [*parts, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from lone_surrogates(v, [*parts, i])


def oversized(doc: Any) -> str | None:
    """Why a parsed document is past what a config may be (None: it is not): more than the
    loader's values once its YAML aliases are expanded (a few hundred bytes of aliases can
    stand for billions), or nested deeper.  Walked without recursion, and no further than
    the first value past the cap."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    values = 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > _MAX_VALUES:
            return f"it expands to more than {_MAX_VALUES:,} values"
        if isinstance(value, dict | list):
            if depth >= _MAX_DEPTH:
                return f"nested more than {_MAX_DEPTH} levels deep"
            items = value.values() if isinstance(value, dict) else value
            stack += [(v, depth + 1) for v in items]
    return None


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
