"""A JSON config file edited as text: the document, the splice, the check, the atomic write.

Writing a config file changes only what it must: the new entry, or one field of an entry, is
spliced into the file's text (the rest is kept byte for byte, indentation and layout
included; members are taken out as they are put in, with their separating comma and
layout), the result is checked to parse to exactly the intended document and to validate
(for the CLI an unset ``${VAR}`` aside: its shell may lack the server's; for the admin API
with no warning it did not have), and it replaces the file atomically (a temporary file in
the same folder, then ``os.replace``).  YAML files are read but never written.

The ``keys`` CLI (:mod:`dialproxy.keys`) and the admin API (:mod:`dialproxy.web.admin`) edit
through :class:`ConfigFile`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source, oversized, read_file
from dialproxy.errors import (
    EXIT_USAGE,
    ConfigError,
    FileChanged,
    InvalidEdit,
    KeysError,
    NotEditable,
    Problem,
)
from dialproxy.text import ENV_REF, SHA256_KEY, key_digest

# --- the config file -----------------------------------------------------------------------


def is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def read_config(path: Path) -> bytes:
    try:
        return read_file(path)
    except OSError as e:
        raise KeysError(f"cannot read {path}: {e.strerror or e}", EXIT_USAGE) from None


def parse_config(path: Path, data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8-sig")
        doc = yaml.safe_load(text) if is_yaml(path) else json.loads(text)
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise KeysError(f"{path}: not a valid config file ({reason})") from None
    except RecursionError:
        raise KeysError(f"{path}: not a valid config file (nested too deeply)") from None
    if is_yaml(path) and (too_big := oversized(doc)) is not None:  # (an alias bomb:
        # a few hundred bytes that, shown or copied, are gigabytes; JSON has no aliases)
        raise KeysError(f"{path}: not a valid config file ({too_big})")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise KeysError(f"{path}: the config must be a JSON object")
    return doc


def digest_of(name: str, env: Mapping[str, str]) -> str | None:
    """The SHA-256 of the key a ``keys`` map entry names (None: an unset ``${VAR}``)."""
    if m := SHA256_KEY.match(name):
        return m.group(1)
    missing = False

    def one(m: re.Match[str]) -> str:
        nonlocal missing
        if m.group(1) not in env:
            missing = True
            return ""
        return env[m.group(1)]

    secret = ENV_REF.sub(one, name)
    return None if missing else key_digest(secret)


def keys_of(path: Path, doc: Mapping[str, Any]) -> Mapping[str, Any]:
    keys = doc.get("keys", {})
    if not isinstance(keys, dict):
        raise KeysError(f"{path}: $.keys must be an object")
    return keys


# --- text-preserving JSON edits ------------------------------------------------------------


@dataclass(slots=True)
class _Span:
    """Where a JSON value sits in the text; objects also know their members."""

    start: int
    end: int
    members: dict[str, tuple[int, _Span]] | None = None  # key -> (where the key starts, value)


_DECODER = json.JSONDecoder()


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text

    def skip(self, i: int) -> int:
        text, n = self.text, len(self.text)
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def value(self, i: int) -> _Span:
        """Where the value at ``i`` ends (json's C decoder: an object's members are scanned
        only when an edit goes into it, by :meth:`object`)."""
        i = self.skip(i)
        return _Span(i, _DECODER.raw_decode(self.text, i)[1])

    def object(self, start: int) -> _Span:
        """The object at ``start`` with its members (their values' spans, not theirs)."""
        text = self.text
        start = self.skip(start)
        if text[start] != "{":
            raise ValueError(f"expected an object at {start}")
        members: dict[str, tuple[int, _Span]] = {}
        i = self.skip(start + 1)
        if text[i] == "}":
            return _Span(start, i + 1, members)
        while True:
            i = self.skip(i)
            if text[i] != '"':
                raise ValueError(f"expected a member name at {i}")
            key, j = _DECODER.raw_decode(text, i)
            j = self.skip(j)
            if text[j] != ":":
                raise ValueError(f"expected ':' at {j}")
            value = self.value(j + 1)
            members[key] = (i, value)
            j = self.skip(value.end)
            if text[j] == ",":
                i = j + 1
            elif text[j] == "}":
                return _Span(start, j + 1, members)
            else:
                raise ValueError(f"expected ',' or '}}' at {j}")


class JsonText:
    """A JSON document's text, edited in place: members set or added, the rest untouched."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ascii = text.isascii()
        found = re.search(r"\n([ \t]+)\S", text)
        self.unit = found.group(1) if found else "  "
        self.multiline = "\n" in text.strip()
        self.newline = "\r\n" if "\r\n" in text else "\n"

    def _at(self, path: Sequence[str]) -> _Span:
        """The object at ``path`` (keys of nested objects), with its members; only the
        objects on the way are scanned member by member (10,000 keys: ~0.05 s, not 0.4)."""
        scanner = _Scanner(self.text)
        try:
            node = scanner.object(0)
            for part in path:
                assert node.members is not None
                node = scanner.object(node.members[part][1].start)
        except (ValueError, IndexError) as e:
            raise KeysError(f"cannot edit the file's JSON text: {e}") from None
        return node

    def _indent_at(self, pos: int) -> str:
        line = self.text[self.text.rfind("\n", 0, pos) + 1 : pos]
        return line[: len(line) - len(line.lstrip(" \t"))]

    def _dump(self, value: Any, indent: str, expand: int) -> str:
        if expand > 0 and self.multiline and isinstance(value, dict) and value:
            inner = indent + self.unit
            items = [
                f"{inner}{json.dumps(k, ensure_ascii=self.ascii)}: "
                f"{self._dump(v, inner, expand - 1)}"
                for k, v in value.items()
            ]
            nl = self.newline
            return "{" + nl + ("," + nl).join(items) + nl + indent + "}"
        return json.dumps(value, ensure_ascii=self.ascii)

    def _splice(self, start: int, end: int, new: str) -> None:
        self.text = self.text[:start] + new + self.text[end:]

    def set_member(self, path: Sequence[str], key: str, value: Any, expand: int = 1) -> None:
        """Set ``path.key`` to ``value``: its value replaced, or a member added at the end."""
        obj = self._at(path)
        assert obj.members is not None
        if key in obj.members:
            key_start, old = obj.members[key]
            self._splice(old.start, old.end, self._dump(value, self._indent_at(key_start), 0))
            return
        name = json.dumps(key, ensure_ascii=self.ascii)
        if obj.members:
            first_key = min(k for k, _ in obj.members.values())
            last = max((v for _, v in obj.members.values()), key=lambda v: v.end)
            if "\n" in self.text[obj.start : first_key]:
                indent = self._indent_at(first_key)
                new = f",{self.newline}{indent}{name}: {self._dump(value, indent, expand)}"
            else:
                new = f", {name}: {json.dumps(value, ensure_ascii=self.ascii)}"
            self._splice(last.end, last.end, new)
        elif self.multiline:
            outer = self._indent_at(obj.start)
            inner = outer + self.unit
            member = f"{inner}{name}: {self._dump(value, inner, expand)}"
            nl = self.newline
            self._splice(obj.start, obj.end, "{" + nl + member + nl + outer + "}")
        else:
            self._splice(obj.start, obj.end, "{" + f"{name}: {json.dumps(value)}" + "}")

    def remove_member(self, path: Sequence[str], key: str) -> None:
        """Take ``path.key`` out, with the comma and the layout that separated it from its
        neighbour (the rest untouched)."""
        obj = self._at(path)
        assert obj.members is not None
        order = sorted(obj.members.values(), key=lambda m: m[0])
        key_start, value = obj.members[key]
        i = next(n for n, (k, _) in enumerate(order) if k == key_start)
        if i > 0:  # from the end of the one before: `,<layout>"key": value`
            self._splice(order[i - 1][1].end, value.end, "")
        elif len(order) > 1:  # the first: `"key": value,<layout>` up to the next one's name
            self._splice(key_start, order[1][0], "")
        else:
            self._splice(obj.start, obj.end, "{}")


class ConfigFile:
    """One JSON config file being edited: its document, its text, and the write back."""

    def __init__(self, path: Path) -> None:
        if is_yaml(path):
            raise NotEditable(
                f"{path}: YAML config files are not edited (their comments and layout "
                "would be lost): run `dialproxy keys generate` and add the printed "
                '"sha256:..." entry under keys by hand'
            )
        self.path = path
        self.original = read_config(path)
        self.doc = parse_config(path, self.original)
        keys_of(path, self.doc)
        self.bom = self.original.startswith(b"\xef\xbb\xbf")
        self.text = JsonText(self.original.decode("utf-8-sig"))

    @property
    def keys(self) -> dict[str, Any]:
        keys = self.doc.get("keys")
        return keys if isinstance(keys, dict) else {}

    def add_key(self, name: str, entry: dict[str, Any]) -> None:
        if "keys" not in self.doc:
            self.text.set_member([], "keys", {name: entry}, expand=2)
            self.doc["keys"] = {name: entry}
        else:
            self.text.set_member(["keys"], name, entry)
            self.doc["keys"][name] = entry

    def set_field(self, name: str, field: str, value: Any) -> None:
        self.set_at(["keys", name], field, value)

    def remove_field(self, name: str, field: str) -> bool:
        """Take ``field`` out of the key's entry (False: it had none)."""
        return self.remove_at(["keys", name], field)

    def _node(self, path: Sequence[str]) -> dict[str, Any]:
        node: Any = self.doc
        for part in path:
            node = node[part]
        assert isinstance(node, dict)
        return node

    def set_at(self, path: Sequence[str], field: str, value: Any, expand: int = 1) -> None:
        """Set the member ``field`` of the object at ``path`` (keys of nested objects)."""
        self.text.set_member(path, field, value, expand)
        self._node(path)[field] = value

    def remove_at(self, path: Sequence[str], field: str) -> bool:
        """Take the member ``field`` out of the object at ``path`` (False: it had none)."""
        node = self._node(path)
        if field not in node:
            return False
        self.text.remove_member(path, field)
        del node[field]
        return True

    def save(
        self,
        env: Mapping[str, str],
        strict: bool = False,
        together: Sequence[Path] = (),
    ) -> list[Problem]:
        """Check and write the edited text; returns the warnings the edit introduced
        (``strict``: refuses those too, as errors, and an unset variable: the server's edit
        is checked with its environment).  ``together``: every
        file the config is made of, in their order, this one among them: the edit is
        checked as those files load merged (alone otherwise)."""
        new = self.text.text
        try:
            same = json.loads(new) == self.doc
        except ValueError:
            same = False
        if not same:  # cannot happen unless the splicing is wrong: never write it then
            raise KeysError(f"{self.path}: the edit did not produce the intended document")
        data = (b"\xef\xbb\xbf" if self.bom else b"") + new.encode("utf-8")
        after = _problems(self.path, data, env, together)
        # (the file as it was is built only when the edit's has problems to tell from its:
        # a clean result, the usual case, is one build; 10,000 keys: ~1 s)
        before = _problems(self.path, self.original, env, together) if after else []
        seen = {(p.path, p.message) for p in before}
        introduced = [p for p in after if (p.path, p.message) not in seen]
        errors = [p for p in introduced if strict or p.severity == "error"]
        if errors:
            detail = "; ".join(f"{p.path}: {p.message}" for p in errors)
            raise InvalidEdit(f"{self.path}: the edit would make the config invalid: {detail}")
        # An error the files had already: the result would not load either, so the edit
        # would not take effect (a revoked key would go on working): nothing written.  (The
        # CLI checks with its shell's environment, which may lack the server's variables:
        # an unset one is no such error there.)
        already = [p for p in after if p.severity == "error" and (strict or not _unset_variable(p))]
        if already:
            detail = "; ".join(f"{p.file} {p.path}: {p.message}" for p in already)
            raise InvalidEdit(
                f"the config does not validate as it is, so no edit can take effect: fix it "
                f"first ({detail})"
            )
        write_atomic(self.path, data, self.original)
        return introduced


def _problems(
    path: Path, data: bytes, env: Mapping[str, str], together: Sequence[Path] = ()
) -> list[Problem]:
    """The problems of ``path`` holding ``data``: alone, or merged with ``together``."""
    sources = [
        Source(str(p), data) if p == path else Source(str(p), read_config(p))
        for p in (together if path in together else [path])
    ]
    try:
        return list(build_snapshot(sources, env).warnings)
    except ConfigError as e:
        return list(e.problems)


def _unset_variable(problem: Problem) -> bool:
    return problem.message.startswith("environment variable ") and problem.message.endswith(
        " is not set"
    )


def _current(path: Path) -> bytes | None:
    try:
        return read_file(path)
    except OSError:  # (gone, or no longer a regular file)
        return None


def write_atomic(path: Path, data: bytes, expected: bytes | None = None) -> None:
    """Replace ``path`` by ``data`` in one step: a temporary file next to it, then
    ``os.replace``.  The file keeps its permissions; ``expected`` guards against a change
    made by someone else since it was read."""
    target = Path(os.path.realpath(path))  # a symlinked config: replace what it points at
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        if expected is not None and _current(target) != expected:
            raise FileChanged(f"{path}: the file changed while it was being edited; run again")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        folder = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)
