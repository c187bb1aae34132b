"""``dialproxy keys generate | add | list | revoke | rotate``: API keys in the config file.

A key is written into the config as its digest, ``"sha256:<64 hex>"``: the file never holds
the secret, which is printed once.  Secrets carry the prefix ``dpk_`` (shared keys ``dps_``)
followed by 43 base62 characters (256 random bits), so secret scanners and log redaction can
match ``dp[ks]_[A-Za-z0-9]{43}``.

Writing a config file changes only what it must: the new entry, or one field of an entry, is
spliced into the file's text (the rest is kept byte for byte, indentation and layout
included), the result is checked to parse to exactly the intended document and to validate
no worse than before, and it replaces the file atomically (a temporary file in the same
folder, then ``os.replace``).  YAML files are listed but never written.

The commands' cores (:func:`create_key`, :func:`find_key`, :func:`revoke_key`,
:func:`set_roles`, :func:`rotate_key`, then :meth:`ConfigFile.save`) are what the admin API
(:mod:`dialproxy.web.admin`) calls too, with the edits it alone makes: a key's models, quotas,
``canShare`` and expiry (:func:`set_models`, :func:`set_key_limits`, :func:`set_can_share`,
:func:`set_expiry`) and a role's limit for a model (:func:`set_role_limit`,
:func:`remove_role_limit`).  Members are taken out of the text as they are put in, with their
separating comma and layout (``null`` in the admin API).

Revoking sets ``"disabled": true`` and keeps the entry, so the file keeps a record of the key
(its fingerprint, name, project) for audit; delete the entry by hand to forget it.
Exit codes: 0 done, 1 not found or invalid, 2 usage (bad arguments, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from dialproxy.config.loader import Source, build_snapshot
from dialproxy.config.model import Problem, key_digest
from dialproxy.errors import EXIT_OK, EXIT_USAGE, ConfigError, RoleNotFound

# (the admin API catches these as keys.KeysError, keys.KeyNotFound, ...)
from dialproxy.errors import FileChanged as FileChanged
from dialproxy.errors import InvalidEdit as InvalidEdit
from dialproxy.errors import KeyNotFound as KeyNotFound
from dialproxy.errors import KeysError as KeysError
from dialproxy.errors import NotEditable as NotEditable
from dialproxy.text import CONTROL, ENV_REF, SHA256_KEY, new_secret, parse_datetime

# (the admin API calls these as keys.hashed, keys.iso, ...)
from dialproxy.text import hashed as hashed
from dialproxy.text import iso as iso
from dialproxy.text import parse_duration as parse_duration
from dialproxy.text import parse_expiry as parse_expiry

Clock = Callable[[], datetime]


def key_state(entry: Mapping[str, Any], now: datetime) -> str:
    """``active``, ``expired``, ``disabled`` or ``not yet valid``: as the proxy decides."""
    if entry.get("disabled") is True:
        return "disabled"
    not_before = _entry_time(entry.get("notBefore"))
    if not_before is not None and now < not_before:
        return "not yet valid"
    expires = _entry_time(entry.get("expiresAt"))
    if expires is not None and now >= expires:
        return "expired"
    return "active"


def _entry_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value)
    except ValueError:
        return None


def _safe(text: str) -> str:
    """For a terminal: no control characters from a config file."""
    return CONTROL.sub("?", text)


# --- the config file -----------------------------------------------------------------------


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeysError(f"cannot read {path}: {e.strerror or e}", EXIT_USAGE) from None


def _parse(path: Path, data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8-sig")
        doc = yaml.safe_load(text) if _is_yaml(path) else json.loads(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise KeysError(f"{path}: not a valid config file ({reason})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise KeysError(f"{path}: the config must be a JSON object")
    return doc


def _digest_of(name: str, env: Mapping[str, str]) -> str | None:
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


def _keys_of(path: Path, doc: Mapping[str, Any]) -> Mapping[str, Any]:
    keys = doc.get("keys", {})
    if not isinstance(keys, dict):
        raise KeysError(f"{path}: $.keys must be an object")
    return keys


def _find(path: Path, doc: Mapping[str, Any], prefix: str, env: Mapping[str, str]) -> str:
    """The ``keys`` map entry whose digest starts with ``prefix`` (one, or an error)."""
    wanted = prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", wanted):
        raise KeysError(
            f"not a key fingerprint: {_safe(prefix)!r} (4 to 64 hex digits, as `keys list` "
            "shows them)",
            EXIT_USAGE,
        )
    found = [
        name
        for name, entry in _keys_of(path, doc).items()
        if isinstance(entry, dict)
        and (digest := _digest_of(name, env)) is not None
        and digest.startswith(wanted)
    ]
    if not found:
        raise KeyNotFound(f"{path}: no key with fingerprint {wanted}")
    if len(found) > 1:
        names = ", ".join(
            f"{(_digest_of(n, env) or '')[:12]} ({_safe(str(doc['keys'][n].get('name', '')))})"
            for n in found
        )
        raise KeysError(f"{path}: fingerprint {wanted} is ambiguous: {names}; give more digits")
    return found[0]


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


class _JsonText:
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
        if _is_yaml(path):
            raise NotEditable(
                f"{path}: YAML config files are not edited (their comments and layout "
                "would be lost): run `dialproxy keys generate` and add the printed "
                '"sha256:..." entry under keys by hand'
            )
        self.path = path
        self.original = _read(path)
        self.doc = _parse(path, self.original)
        _keys_of(path, self.doc)
        self.bom = self.original.startswith(b"\xef\xbb\xbf")
        self.text = _JsonText(self.original.decode("utf-8-sig"))

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
        (``strict``: refuses those too, as errors).  ``together``: every file the config is
        made of, in their order, this one among them: the edit is checked as those files
        load merged (alone otherwise)."""
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
        write_atomic(self.path, data, self.original)
        return introduced


def _problems(
    path: Path, data: bytes, env: Mapping[str, str], together: Sequence[Path] = ()
) -> list[Problem]:
    """The problems of ``path`` holding ``data``: alone, or merged with ``together``."""
    sources = [
        Source(str(p), data) if p == path else Source(str(p), _read(p))
        for p in (together if path in together else [path])
    ]
    try:
        return list(build_snapshot(sources, env).warnings)
    except ConfigError as e:
        return list(e.problems)


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
        if expected is not None and target.read_bytes() != expected:
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


# --- the commands --------------------------------------------------------------------------


@dataclass(slots=True)
class Io:
    out: TextIO
    err: TextIO
    now: datetime
    env: Mapping[str, str]


def _print_secret(io: Io, fmt: str, secret: str, **fields: Any) -> None:
    if fmt == "json":
        record = {"key": secret, "hash": hashed(secret), "fingerprint": key_digest(secret)[:8]}
        print(json.dumps(record | fields, indent=2), file=io.out)
    else:
        print(secret, file=io.out)


def cmd_generate(args: argparse.Namespace, io: Io) -> int:
    secret = new_secret()
    if args.format == "json":
        _print_secret(io, "json", secret)
    else:
        print(secret, file=io.out)
        print(hashed(secret), file=io.out)
        print(
            "dialproxy keys: the first line is the secret, shown only this once; put the "
            "second (its sha256 form) in the config's keys",
            file=io.err,
        )
    return EXIT_OK


def _entry(
    project: str,
    roles: Sequence[str],
    *,
    name: str | None,
    description: str | None,
    expires: datetime | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"project": project}
    unique = list(dict.fromkeys(roles))
    if len(unique) == 1:
        entry["role"] = unique[0]
    else:
        entry["roles"] = unique
    if name is not None:
        entry["name"] = name
    if description is not None:
        entry["description"] = description
    if expires is not None:
        entry["expiresAt"] = iso(expires)
    return entry


def create_key(
    config: ConfigFile,
    *,
    project: str,
    roles: Sequence[str],
    name: str | None = None,
    description: str | None = None,
    expires: datetime | None = None,
    models: Sequence[str] | None = None,
    can_share: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Add a new key to ``config`` (not saved yet): its secret (shown once) and entry."""
    if not project:
        raise KeysError("the project must not be empty", EXIT_USAGE)
    if not roles:
        raise KeysError("a key needs at least one role", EXIT_USAGE)
    secret = new_secret()
    entry = _entry(project, roles, name=name, description=description, expires=expires)
    if models:
        entry["models"] = list(dict.fromkeys(models))
    if can_share:
        entry["canShare"] = True
    config.add_key(hashed(secret), entry)
    return secret, entry


def cmd_add(args: argparse.Namespace, io: Io) -> int:
    if not args.project:
        raise KeysError("--project must not be empty", EXIT_USAGE)
    expires = _expiry_arg(args.expires, io.now)
    config = ConfigFile(Path(args.config))
    secret, entry = create_key(
        config,
        project=args.project,
        roles=args.role,
        name=args.name,
        description=args.description,
        expires=expires,
        models=args.model,
        can_share=args.can_share,
    )
    warnings = config.save(io.env)
    _print_secret(io, args.format, secret, file=str(config.path), **_public(entry))
    _report_warnings(io, warnings)
    print(
        f"dialproxy keys: added key {key_digest(secret)[:8]} to {config.path}; the secret is "
        "shown only this once; a running proxy takes it up when the file changes",
        file=io.err,
    )
    return EXIT_OK


def _public(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("project", "role", "roles", "name", "expiresAt") if k in entry}


def _expiry_arg(value: str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_expiry(value, now)
    except ValueError as e:
        raise KeysError(f"--expires: {e}", EXIT_USAGE) from None


def _report_warnings(io: Io, warnings: Sequence[Problem]) -> None:
    for p in warnings:
        print(f"dialproxy keys: warning: {p.path}: {p.message}", file=io.err)


@dataclass(frozen=True, slots=True)
class Listed:
    fingerprint: str
    name: str | None
    project: str | None
    roles: tuple[str, ...]
    not_before: str | None
    expires_at: str | None
    state: str
    stored: str  # sha256 | plaintext | env
    file: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "name": self.name,
            "project": self.project,
            "roles": list(self.roles),
            "notBefore": self.not_before,
            "expiresAt": self.expires_at,
            "state": self.state,
            "stored": self.stored,
            "file": self.file,
        }


def list_keys(paths: Sequence[Path], now: datetime, env: Mapping[str, str]) -> list[Listed]:
    """Every key of the files, by fingerprint; never a secret."""
    out: list[Listed] = []
    for path in paths:
        doc = _parse(path, _read(path))
        for name, entry in _keys_of(path, doc).items():
            if not isinstance(entry, dict):
                continue
            digest = _digest_of(name, env)
            stored = "sha256" if SHA256_KEY.match(name) else "env" if "${" in name else "plaintext"
            role = entry.get("role")
            roles = [*(entry.get("roles") or ()), *([role] if role else [])]
            out.append(
                Listed(
                    fingerprint=digest[:8] if digest else "?",
                    name=_text(entry.get("name")),
                    project=_text(entry.get("project")),
                    roles=tuple(dict.fromkeys(str(r) for r in roles)),
                    not_before=_text(entry.get("notBefore")),
                    expires_at=_text(entry.get("expiresAt")),
                    state=key_state(entry, now),
                    stored=stored,
                    file=str(path),
                )
            )
    return out


def _text(value: Any) -> str | None:
    return _safe(value) if isinstance(value, str) else None


def cmd_list(args: argparse.Namespace, io: Io) -> int:
    paths = [Path(p) for p in args.config]
    listed = list_keys(paths, io.now, io.env)
    if args.format == "json":
        print(json.dumps([k.as_dict() for k in listed], indent=2), file=io.out)
        return EXIT_OK
    header = ["FINGERPRINT", "NAME", "PROJECT", "ROLES", "EXPIRES", "STATE", "STORED"]
    if len(paths) > 1:
        header.append("FILE")
    rows = [header]
    for k in listed:
        row = [
            k.fingerprint,
            k.name or "-",
            k.project or "-",
            ",".join(k.roles) or "-",
            k.expires_at or "never",
            k.state,
            k.stored,
        ]
        rows.append([*row, k.file] if len(paths) > 1 else row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=io.out)
    return EXIT_OK


def find_key(config: ConfigFile, fingerprint: str, env: Mapping[str, str]) -> tuple[str, str]:
    """The ``keys`` map name of the one key whose fingerprint starts so, and its 8-digit
    fingerprint."""
    name = _find(config.path, config.doc, fingerprint, env)
    return name, (_digest_of(name, env) or "")[:8]


def revoke_key(config: ConfigFile, name: str) -> bool:
    """Set ``"disabled": true`` on the key (not saved yet); False: it already was."""
    if config.keys[name].get("disabled") is True:
        return False
    config.set_field(name, "disabled", True)
    return True


def set_roles(config: ConfigFile, name: str, roles: Sequence[str]) -> None:
    """Make the key's roles ``roles`` (not saved yet).  Members are never removed from the
    text: a key written with ``role`` keeps it (the first role) and ``roles`` holds the rest."""
    unique = list(dict.fromkeys(roles))
    if not unique:
        raise KeysError("a key needs at least one role", EXIT_USAGE)
    entry = config.keys[name]
    if "role" not in entry:
        config.set_field(name, "roles", unique)
        return
    config.set_field(name, "role", unique[0])
    if len(unique) > 1 or "roles" in entry:
        config.set_field(name, "roles", unique[1:])


def set_expiry(config: ConfigFile, name: str, when: datetime | None) -> None:
    """The key's ``expiresAt`` (None: the member taken out, it never expires); not saved."""
    if when is None:
        config.remove_field(name, "expiresAt")
    else:
        config.set_field(name, "expiresAt", iso(when))


def set_models(config: ConfigFile, name: str, models: Sequence[str] | None) -> None:
    """The deployments the key may call (None: the member taken out, every one its roles
    allow); not saved yet."""
    if models is None:
        config.remove_field(name, "models")
    else:
        config.set_field(name, "models", list(dict.fromkeys(models)))


def set_key_limits(config: ConfigFile, name: str, limits: Mapping[str, Any] | None) -> None:
    """The key's own quotas, ``{deployment or "*": Limit}`` (None: taken out); not saved
    yet (the schema checks the entries when it is)."""
    if limits is None:
        config.remove_field(name, "limits")
    else:
        config.set_field(name, "limits", dict(limits))


def set_can_share(config: ConfigFile, name: str, can_share: bool) -> None:
    """Whether the key may create shared keys (false and absent: left absent); not saved."""
    if can_share or "canShare" in config.keys[name]:
        config.set_field(name, "canShare", can_share)


# --- roles ---------------------------------------------------------------------------------


def _role(config: ConfigFile, role: str) -> dict[str, Any]:
    roles = config.doc.get("roles")
    if not isinstance(roles, dict) or not isinstance(roles.get(role), dict):
        raise RoleNotFound(f"{config.path}: no role {_safe(role)!r} under roles")
    if "${" in role:
        raise NotEditable(
            f"{config.path}: role {_safe(role)!r} is named by an environment variable: "
            "edit it by hand"
        )
    found: dict[str, Any] = roles[role]
    return found


def set_role_limit(
    config: ConfigFile, role: str, model: str, limit: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Make ``roles.<role>.limits.<model>`` ``limit`` (not saved yet); the entry it
    replaces, if any."""
    entry = _role(config, role)
    limits = entry.get("limits")
    if limits is None:
        config.set_at(["roles", role], "limits", {model: dict(limit)})
        return None
    if not isinstance(limits, dict):
        raise KeysError(f"{config.path}: roles.{_safe(role)}.limits must be an object")
    before = limits.get(model)
    config.set_at(["roles", role, "limits"], model, dict(limit), expand=0)
    return dict(before) if isinstance(before, dict) else None


def remove_role_limit(config: ConfigFile, role: str, model: str) -> dict[str, Any]:
    """Take ``roles.<role>.limits.<model>`` out (not saved yet); the entry it was."""
    limits = _role(config, role).get("limits")
    if not isinstance(limits, dict) or model not in limits:
        raise RoleNotFound(f"{config.path}: role {_safe(role)!r} has no limit for {_safe(model)!r}")
    before = limits[model]
    config.remove_at(["roles", role, "limits"], model)
    return dict(before) if isinstance(before, dict) else {}


@dataclass(frozen=True, slots=True)
class Rotated:
    secret: str
    entry: dict[str, Any]
    old_fingerprint: str
    old_expires_at: datetime


def rotate_key(
    config: ConfigFile,
    name: str,
    *,
    now: datetime,
    overlap: timedelta,
    new_name: str | None = None,
    expires: datetime | None = None,
    env: Mapping[str, str],
) -> Rotated:
    """Add a new key with the old one's project, roles and the rest, and let the old one
    expire ``overlap`` from now (sooner if it already did); not saved yet."""
    old = config.keys[name]
    old_fp = (_digest_of(name, env) or "")[:8]
    if old.get("disabled") is True:
        raise KeysError(f"key {old_fp} is disabled (revoked): add a new key instead")
    secret = new_secret()
    entry = {k: v for k, v in old.items() if k not in ("expiresAt", "notBefore", "disabled")}
    if new_name is not None:
        entry["name"] = new_name
    if expires is not None:
        entry["expiresAt"] = iso(expires)
    end = now + overlap
    current_end = _entry_time(old.get("expiresAt"))
    config.add_key(hashed(secret), entry)
    if current_end is None or end < current_end:
        config.set_field(name, "expiresAt", iso(end))
        current_end = end
    return Rotated(secret, entry, old_fp, current_end)


def cmd_revoke(args: argparse.Namespace, io: Io) -> int:
    config = ConfigFile(Path(args.config))
    name, fp = find_key(config, args.fingerprint, io.env)
    if not revoke_key(config, name):
        print(f"dialproxy keys: key {fp} is already disabled", file=io.err)
        return EXIT_OK
    config.save(io.env)
    print(
        f"dialproxy keys: key {fp} disabled in {config.path} (kept for the record); "
        "a running proxy refuses it from its next reload",
        file=io.err,
    )
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace, io: Io) -> int:
    try:
        overlap = parse_duration(args.overlap)
    except ValueError as e:
        raise KeysError(f"--overlap: {e}", EXIT_USAGE) from None
    expires = _expiry_arg(args.expires, io.now)
    config = ConfigFile(Path(args.config))
    name, _ = find_key(config, args.fingerprint, io.env)
    rotated = rotate_key(
        config,
        name,
        now=io.now,
        overlap=overlap,
        new_name=args.name,
        expires=expires,
        env=io.env,
    )
    config.save(io.env)
    secret = rotated.secret
    _print_secret(
        io,
        args.format,
        secret,
        file=str(config.path),
        replaces=rotated.old_fingerprint,
        oldExpiresAt=iso(rotated.old_expires_at),
        **_public(rotated.entry),
    )
    print(
        f"dialproxy keys: key {key_digest(secret)[:8]} replaces {rotated.old_fingerprint}, "
        f"which stops working at {iso(rotated.old_expires_at)}; the new secret is shown only "
        "this once",
        file=io.err,
    )
    return EXIT_OK


# --- argparse ------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register ``keys`` and its commands on the CLI's subparsers."""
    keys = subparsers.add_parser("keys", help="create, list, revoke and rotate API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=type(keys))

    generate = sub.add_parser("generate", help="print a new secret and its sha256 form")
    generate.add_argument("--format", choices=("text", "json"), default="text")

    add = sub.add_parser("add", help="add a new key (hashed) to a config file")
    add.add_argument("--config", required=True, metavar="FILE")
    add.add_argument("--project", required=True)
    add.add_argument("--role", action="append", required=True, help="repeatable")
    add.add_argument("--name")
    add.add_argument("--description")
    add.add_argument("--expires", metavar="30d|DATE", help="e.g. 30d, 12h, 2026-01-01")
    add.add_argument("--model", action="append", help="restrict the key to it (repeatable)")
    add.add_argument("--can-share", action="store_true", help="may create shared keys")
    add.add_argument("--format", choices=("text", "json"), default="text")

    lst = sub.add_parser("list", help="list the keys of config files (never a secret)")
    lst.add_argument("--config", required=True, nargs="+", action="extend", metavar="FILE")
    lst.add_argument("--format", choices=("text", "json"), default="text")

    revoke = sub.add_parser("revoke", help='set "disabled": true on a key')
    revoke.add_argument("--config", required=True, metavar="FILE")
    revoke.add_argument("fingerprint", metavar="FINGERPRINT")

    rotate = sub.add_parser("rotate", help="a new key for the same project and roles")
    rotate.add_argument("--config", required=True, metavar="FILE")
    rotate.add_argument("fingerprint", metavar="FINGERPRINT")
    rotate.add_argument(
        "--overlap", default="7d", help="how long the old key keeps working (default 7d)"
    )
    rotate.add_argument("--name", help="name of the new key (default: the old key's)")
    rotate.add_argument("--expires", metavar="30d|DATE", help="expiry of the new key")
    rotate.add_argument("--format", choices=("text", "json"), default="text")


COMMANDS: dict[str, Callable[[argparse.Namespace, Io], int]] = {
    "generate": cmd_generate,
    "add": cmd_add,
    "list": cmd_list,
    "revoke": cmd_revoke,
    "rotate": cmd_rotate,
}


def run(
    args: argparse.Namespace,
    *,
    now: datetime | None = None,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    io = Io(
        out=out or sys.stdout,
        err=err or sys.stderr,
        now=now or datetime.now(UTC),
        env=os.environ if env is None else env,
    )
    try:
        return COMMANDS[args.keys_command](args, io)
    except KeysError as e:
        print(f"dialproxy keys {args.keys_command}: {e}", file=io.err)
        return e.code
