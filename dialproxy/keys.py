"""``dialproxy keys generate | add | list | revoke | rotate``: API keys in the config file.

A key is written into the config as its digest, ``"sha256:<64 hex>"``: the file never holds
the secret, which is printed once.  Secrets carry the prefix ``dpk_`` (shared keys ``dps_``)
followed by 43 base62 characters (256 random bits), so secret scanners and log redaction can
match ``dp[ks]_[A-Za-z0-9]{43}``.

The file is edited through :class:`dialproxy.configfile.ConfigFile`: the entry spliced into
its text, checked, and the file replaced atomically.  YAML files are listed but never written.

The commands' cores (:func:`create_key`, :func:`find_key`, :func:`revoke_key`,
:func:`set_roles`, :func:`rotate_key`, then :meth:`ConfigFile.save`) are what the admin API
(:mod:`dialproxy.web.admin`) calls too, with the edits it alone makes: a key's models, quotas,
``canShare`` and expiry (:func:`set_models`, :func:`set_key_limits`, :func:`set_can_share`,
:func:`set_expiry`) and a role's limit for a model (:func:`set_role_limit`,
:func:`remove_role_limit`); a member is taken out for ``null`` in the admin API.

Revoking sets ``"disabled": true`` and keeps the entry, so the file keeps a record of the key
(its fingerprint, name, project) for audit; delete the entry by hand to forget it.
Exit codes: 0 done, 1 not found or invalid, 2 usage (bad arguments, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from dialproxy.config.model import Problem, key_state
from dialproxy.configfile import ConfigFile, digest_of, keys_of, parse_config, read_config
from dialproxy.errors import EXIT_OK, EXIT_USAGE, KeyNotFound, KeysError, NotEditable, RoleNotFound
from dialproxy.text import (
    CONTROL,
    SHA256_KEY,
    has_control,
    hashed,
    iso,
    key_digest,
    new_secret,
    parse_datetime,
    parse_duration,
    parse_expiry,
)

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class _Validity:
    disabled: bool
    not_before: datetime | None
    expires_at: datetime | None


def key_roles(entry: Mapping[str, Any]) -> list[str]:
    """A key entry's roles as written (``role``, then ``roles``), once each; what is not a
    role name (a hand edit's ``"roles": 5``, the config refuses it) is left out."""
    role, roles = entry.get("role"), entry.get("roles")
    named = [role, *(roles if isinstance(roles, list) else ())]
    return list(dict.fromkeys(r for r in named if isinstance(r, str) and r))


def entry_state(entry: Mapping[str, Any], now: datetime) -> str:
    """``active``, ``expired``, ``disabled`` or ``not yet valid``: as the proxy decides
    (:func:`dialproxy.config.model.key_state`; a time that is not one: none)."""
    validity = _Validity(
        entry.get("disabled") is True,
        _entry_time(entry.get("notBefore")),
        _entry_time(entry.get("expiresAt")),
    )
    return key_state(validity, now)


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
        for name, entry in keys_of(path, doc).items()
        if isinstance(entry, dict)
        and (digest := digest_of(name, env)) is not None
        and digest.startswith(wanted)
    ]
    if not found:
        raise KeyNotFound(f"{path}: no key with fingerprint {wanted}")
    if len(found) > 1:
        names = ", ".join(
            f"{(digest_of(n, env) or '')[:12]} ({_safe(str(doc['keys'][n].get('name', '')))})"
            for n in found
        )
        raise KeysError(f"{path}: fingerprint {wanted} is ambiguous: {names}; give more digits")
    return found[0]


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


def _literal(field: str, values: Iterable[str | None]) -> None:
    """A value given to be written (not read from the file) holding ``${``: refused, as the
    config would read it as an environment variable's reference, and show its value (an
    upstream key...) to whoever reads the field back."""
    if any(value is not None and "${" in value for value in values):
        raise KeysError(
            f"the {field} holds '${{', which the config reads as an environment variable: "
            "write such a value by hand",
            EXIT_USAGE,
        )
    lines = field == "description"  # (a description's line breaks and tabs are its own)
    for value in values:
        if value is not None and has_control(
            value.replace("\n", "").replace("\t", "") if lines else value
        ):
            raise KeysError(f"the {field} holds a control character", EXIT_USAGE)


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
    for field, values in (
        ("project", [project]), ("roles", roles), ("name", [name]),
        ("description", [description]), ("models", models or ()),
    ):  # fmt: skip
        _literal(field, values)
    if not project:
        raise KeysError("the project must not be empty", EXIT_USAGE)
    if not roles:
        raise KeysError("a key needs at least one role", EXIT_USAGE)
    secret = new_secret()
    entry = _entry(project, roles, name=name, description=description, expires=expires)
    if models is not None:  # ([] as for an edit: no model at all)
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
        doc = parse_config(path, read_config(path))
        for name, entry in keys_of(path, doc).items():
            if not isinstance(entry, dict):
                continue
            digest = digest_of(name, env)
            stored = "sha256" if SHA256_KEY.match(name) else "env" if "${" in name else "plaintext"
            roles = key_roles(entry)
            out.append(
                Listed(
                    fingerprint=digest[:8] if digest else "?",
                    name=_text(entry.get("name")),
                    project=_text(entry.get("project")),
                    roles=tuple(dict.fromkeys(str(r) for r in roles)),
                    not_before=_text(entry.get("notBefore")),
                    expires_at=_text(entry.get("expiresAt")),
                    state=entry_state(entry, now),
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
    return name, (digest_of(name, env) or "")[:8]


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
    _literal("name", [new_name])
    old = config.keys[name]
    old_fp = (digest_of(name, env) or "")[:8]
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
