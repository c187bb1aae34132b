"""What a reload takes from the last good build: the entries that did not change.

A reload of a big config changes one key or one role, and rebuilding the 10,000 others
is most of its cost (and, in the reload thread, the event loop's time: the build holds
the interpreter).  :class:`Built` keeps the last good build's inputs and outputs by entry:
each entry of ``keys``, ``models``, ``applications``, ``roles`` and ``routes`` by its name
and the canonical JSON of its entry (after ``${VAR}`` substitution, so that a changed
variable is a changed entry), with what it depends on beside it:

- the schema: an entry whose canonical JSON is the last good load's is valid (the schema
  checks each entry of these sections on its own), so only the changed ones are checked;
  when one is not valid, the whole document is checked, so that the errors are worded and
  located as in a full build;
- a key's checks (its roles defined, its models served, its entropy, its ranges and dates):
  by its entry, while the role names and the served names are the same;
- the frozen objects: a model, an application, a role by its entry; an :class:`Access`
  by its role set, while every model, the schedule and the roles of the set (and
  ``default``) are the same objects; a :class:`Key` by its entry and its access.

Before all of these, the entries themselves (:class:`Walked`): each entry of a JSON
file's sections as parsed, beside what ``${VAR}`` substitution made of it.  An entry equal
to the last one (``==`` on the parsed objects, at C speed; ``repr`` when it holds a number
or a boolean, which ``==`` confuses) whose variables have the same values is not walked
again: its substituted object is the last one, so its canonical JSON is the last text
(:meth:`Canonical.of` compares objects by identity; the loader never changes an object it
built) and everything after it finds it unchanged without dumping it.  The unchanged keys,
key checks and digests are then taken in one comprehension each, not one by one.

Every reuse is checked against all of its inputs, so a stale or foreign ``Built`` is never
wrong, only slower.  The canonical JSON also gives the snapshot's digest (the same as a
``json.dumps(doc, sort_keys=True)`` of the whole document, without a second pass).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dialproxy.config.model import Access, Grant, Key, Model, Role
from dialproxy.config.schedule import Schedule

# The sections whose entries are checked and built one by one.
SECTIONS = ("keys", "models", "applications", "roles", "routes")


def _no_default(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _sorted_dumps() -> Callable[[Any], str]:
    """``json.dumps(value, sort_keys=True)``, without building an encoder for each call
    (three times faster on 10,000 small entries)."""
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # (no C accelerator)
        return json.JSONEncoder(sort_keys=True).encode
    encode = make(None, _no_default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
                  True, False, True)  # fmt: skip

    def dumps(value: Any) -> str:
        if isinstance(value, str):
            return str(json.encoder.encode_basestring_ascii(value))
        return "".join(encode(value, 0))

    return dumps


_dumps = _sorted_dumps()

# A key's checks: (JSON path parts, message, severity) before they are located in a file.
RawProblem = tuple[tuple[str | int, ...], str, str]


_MISSING = object()


@dataclass(frozen=True, slots=True)
class Canonical:
    """A merged document's canonical JSON: per entry of :data:`SECTIONS`, and per other
    top-level field; and the digest of the whole."""

    entries: Mapping[str, Mapping[str, str]]  # section -> name -> canonical JSON
    rest: Mapping[str, str]  # other top-level field -> canonical JSON
    digest: str
    # section -> the merged section the texts were made from (its entries, by name), and
    # name -> `"name": text`, the entry's part of the whole document's text
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    pieces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # section -> its names in sorted order, and its whole text
    orders: Mapping[str, list[str]] = field(default_factory=dict)
    texts: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, doc: Mapping[str, Any], last: Canonical | None = None) -> Canonical:
        """The canonical JSON of ``doc``.  An entry that is the very object ``last`` was
        made from (an unchanged entry the loader took as it was) has the text it had: the
        loader's objects are never changed once built.  A section with the same names
        keeps their order; one with the same entries, its text."""
        entries: dict[str, dict[str, str]] = {}
        rest: dict[str, str] = {}
        sections: dict[str, Mapping[str, Any]] = {}
        all_pieces: dict[str, dict[str, str]] = {}
        orders: dict[str, list[str]] = {}
        texts: dict[str, str] = {}
        parts: list[str] = []
        dumps = _dumps
        for top in sorted(doc):
            value = doc[top]
            if top in SECTIONS and isinstance(value, dict):
                old = (last.sections.get(top) if last is not None else None) or {}
                modified = [n for n, e in value.items() if old.get(n, _MISSING) is not e]
                if last is not None and old and len(modified) < len(value):  # (few dumped)
                    section = dict(last.entries[top])
                    pieces = dict(last.pieces[top])
                    added = [n for n in modified if n not in old]
                    removed = len(old) + len(added) - len(value)
                    if removed:
                        for name in [n for n in old if n not in value]:
                            del section[name], pieces[name]
                    order = last.orders[top] if not added and not removed else None
                    text = last.texts[top] if not modified and not removed else None
                else:
                    section, pieces, order, text = {}, {}, None, None
                for name in modified:
                    entry_text = section[name] = dumps(value[name])
                    pieces[name] = f"{dumps(name)}: {entry_text}"
                if order is None:
                    order = sorted(pieces)
                if text is None:
                    text = "{" + ", ".join([pieces[n] for n in order]) + "}"
                entries[top] = section
                sections[top] = value
                all_pieces[top] = pieces
                orders[top] = order
                texts[top] = text
            else:
                text = rest[top] = dumps(value)
            parts.append(f"{dumps(top)}: {text}")
        whole = "{" + ", ".join(parts) + "}"
        digest = hashlib.sha256(whole.encode()).hexdigest()
        return cls(entries, rest, digest, sections, all_pieces, orders, texts)

    def entry(self, section: str, name: str) -> str | None:
        found = self.entries.get(section)
        return found.get(name) if found is not None else None


@dataclass(frozen=True, slots=True)
class Walked:
    """One entry of a section of one JSON file as parsed, what ``${VAR}`` substitution made
    of it, and all that this read or added: the next parse's entry, when it is equal and
    the variables it names have the same values, is taken as it was (no walk, and the same
    object, so :meth:`Canonical.of` keeps its text).  Only an entry that raised no problem
    is kept."""

    raw: Any  # as parsed
    # repr(raw) when it holds a number or a boolean: `==` takes 1, 1.0 and true for one
    # another (and the schema does not); repr tells them apart.  Without one, `==` is exact.
    strict: str | None
    out: Any  # after substitution
    env: tuple[tuple[str, str], ...]  # the variables it named, with their values
    secrets: tuple[str, ...]  # what it added to the secrets to redact
    env_values: tuple[str, ...]  # and to the variable values to redact
    values: int  # the values it counts for in the document's limit
    plain: bool  # read nothing but itself, added nothing: the same when `==`

    @classmethod
    def of(
        cls,
        raw: Any,
        out: Any,
        numbers: bool,
        env: tuple[tuple[str, str], ...],
        secrets: tuple[str, ...],
        env_values: tuple[str, ...],
        values: int,
    ) -> Walked:
        strict = repr(raw) if numbers else None
        plain = strict is None and not env and not secrets and not env_values
        return cls(raw, strict, out, env, secrets, env_values, values, plain)

    def same(self, raw: Any, env: Mapping[str, str]) -> bool:
        if self.strict is not None:
            if repr(raw) != self.strict:
                return False
        elif raw != self.raw:
            return False
        return all(env.get(name) == value for name, value in self.env)


@dataclass(slots=True)
class Built:
    """One good build's inputs and outputs, by entry (see the module's docstring)."""

    canonical: Canonical
    check_context: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
    key_checks: dict[str, tuple[str | None, tuple[RawProblem, ...]]] = field(default_factory=dict)
    models: dict[tuple[str, str], tuple[str, Model]] = field(default_factory=dict)
    roles: dict[str, tuple[str, Role]] = field(default_factory=dict)
    schedule: tuple[str | None, Schedule] | None = None
    model_list: tuple[Model, ...] = ()
    accesses: dict[frozenset[str], Access] = field(default_factory=dict)
    # the roles each access was resolved with: its set's and `default` (None: absent)
    access_roles: dict[frozenset[str], tuple[Role | None, ...]] = field(default_factory=dict)
    # key name -> its entry's canonical JSON, its object, and its set of roles
    keys: dict[str, tuple[str, Key, frozenset[str]]] = field(default_factory=dict)
    # (model name, the roles with an entry for it) -> the grant and its inputs
    grants: dict[tuple[str, frozenset[str]], tuple[Grant, Any]] = field(default_factory=dict)
    # file name -> section -> entry name -> the entry as parsed and substituted (JSON files)
    walked: dict[str, dict[str, dict[str, Walked]]] = field(default_factory=dict)
    # key name (a secret or its `sha256:` form) -> its digest
    digests: dict[str, str] = field(default_factory=dict)


def changed_only(doc: Mapping[str, Any], canonical: Canonical, last: Built | None) -> Any:
    """``doc`` without the entries of :data:`SECTIONS` that the last good build had as they
    are: what is left to check against the schema (the schema checks those entries one by
    one, so the answer is the whole document's)."""
    if last is None:
        return doc
    reduced = dict(doc)
    for section, entries in canonical.entries.items():
        before = last.canonical.entries.get(section)
        if not before:
            continue
        value = doc[section]
        reduced[section] = {
            name: value[name] for name, text in entries.items() if before.get(name) != text
        }
    return reduced
