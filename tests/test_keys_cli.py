"""``dialproxy keys``: generate, add, list, revoke, rotate; files edited in place and atomically,
the rest of each file kept byte for byte; exit codes; never a secret in a file or a listing."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any

import pytest

from dialproxy import cli, configfile, text
from dialproxy.errors import KeysError
from dialproxy.text import hashed, iso, key_digest, parse_expiry
from tests.conftest import SECRETS

PRETTY = """{
  "$schema": "./schemas/aidial.config.schema.json",
  "models": {
    "echo": {
      "type": "chat",
      "displayName": "Écho \\u00e9",
      "upstreams": [
        {"endpoint": "http://127.0.0.1:8081/v1/chat/completions", "key": "k"}
      ]
    }
  },
  "roles": {
    "user": {
      "limits": {"echo": {"minute": "10000", "requestDay": "5000"}}
    }
  },
  "keys": {
    "sha256:c57fa162aa1188baa1b2d3a4c23049db7c580cd0b8b4ca41e0d26d2ae278d9ae": {
      "project": "demo",
      "role": "user",
      "name": "demo"
    }
  }
}
"""
LAST_ENTRY_END = PRETTY.rindex("    }\n  }\n}") + len("    }")
Result = tuple[int, str, str]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    code = cli.main(["keys", *args])
    out, err = capsys.readouterr()
    for line in out.splitlines():  # the session's logs are searched for every secret
        if text.SECRET_PATTERN.fullmatch(line.strip()):
            SECRETS.append(line.strip())
    return code, out, err


def valid(path: Path, capsys: pytest.CaptureFixture[str]) -> bool:
    code = cli.main(["validate", str(path)])
    capsys.readouterr()
    return code == 0


@pytest.fixture
def pretty(tmp_path: Path) -> Path:
    path = tmp_path / "aidial.config.json"
    path.write_text(PRETTY, encoding="utf-8")
    return path


def test_generate_prints_a_new_secret_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "generate")
    secret, digest = out.splitlines()
    assert code == 0 and "only this once" in err
    assert re.fullmatch(r"dpk_[A-Za-z0-9]{43}", secret)
    assert digest == "sha256:" + key_digest(secret)
    code, out, _ = run(capsys, "generate", "--format", "json")
    record = json.loads(out)
    assert record["key"] != secret and record["hash"] == "sha256:" + key_digest(record["key"])
    assert record["fingerprint"] == key_digest(record["key"])[:8]
    assert len({text.new_secret() for _ in range(1000)}) == 1000
    assert all(len(text.new_secret()) == 47 for _ in range(1000))


def test_add_splices_the_hashed_entry_in_and_keeps_the_rest(
    pretty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = datetime.now(UTC)
    code, out, err = run(
        capsys,
        "add",
        "--config",
        str(pretty),
        "--project",
        "team",
        "--role",
        "user",
        "--name",
        "ci bot",
        "--expires",
        "30d",
    )
    assert code == 0, err
    secret = out.strip()
    text = pretty.read_text(encoding="utf-8")
    assert secret not in text
    entry = json.loads(text)["keys"]["sha256:" + key_digest(secret)]
    expires = datetime.fromisoformat(entry.pop("expiresAt").replace("Z", "+00:00"))
    assert entry == {"project": "team", "role": "user", "name": "ci bot"}
    assert before + timedelta(days=30) - timedelta(seconds=1) <= expires
    assert expires <= datetime.now(UTC) + timedelta(days=30)
    inserted = (
        ",\n"
        f'    "sha256:{key_digest(secret)}": {{\n'
        '      "project": "team",\n'
        '      "role": "user",\n'
        '      "name": "ci bot",\n'
        f'      "expiresAt": "{iso(expires)}"\n'
        "    }"
    )
    assert text == PRETTY[:LAST_ENTRY_END] + inserted + PRETTY[LAST_ENTRY_END:]
    assert "Écho \\u00e9" in text  # untouched, escapes and all
    assert valid(pretty, capsys)
    assert f"added key {key_digest(secret)[:8]}" in err


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        pytest.param(
            '{"models": {}, "keys": {"a-key-that-is-long-enough-for-128-bits-0123456789": '
            '{"project": "p", "role": "r"}}}',
            '{"models": {}, "keys": {"a-key-that-is-long-enough-for-128-bits-0123456789": '
            '{"project": "p", "role": "r"}, "NEW": {"project": "team", "role": "user"}}}',
            id="one-line",
        ),
        pytest.param(
            '{\n    "keys": {}\n}\n',
            '{\n    "keys": {\n        "NEW": {\n            "project": "team",\n'
            '            "role": "user"\n        }\n    }\n}\n',
            id="empty-keys-4-spaces",
        ),
        pytest.param(
            '{\n\t"models": {}\n}\n',
            '{\n\t"models": {},\n\t"keys": {\n\t\t"NEW": {\n\t\t\t"project": "team",\n'
            '\t\t\t"role": "user"\n\t\t}\n\t}\n}\n',
            id="no-keys-tabs",
        ),
        pytest.param(
            '\ufeff{\r\n  "keys": {\r\n    "sha256:'
            + "0" * 64
            + '": {"project": "p", "role": "r"}\r\n  }\r\n}\r\n',
            '\ufeff{\r\n  "keys": {\r\n    "sha256:'
            + "0" * 64
            + '": {"project": "p", "role": "r"},\r\n    "NEW": {\r\n      "project": "team",'
            '\r\n      "role": "user"\r\n    }\r\n  }\r\n}\r\n',
            id="bom-crlf",
        ),
    ],
)
def test_add_follows_the_files_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], original: str, expected: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(original.encode("utf-8"))
    code, out, err = run(
        capsys, "add", "--config", str(path), "--project", "team", "--role", "user"
    )
    assert code == 0, err
    written = path.read_bytes().decode("utf-8")
    assert written == expected.replace("NEW", "sha256:" + key_digest(out.strip()))


def test_add_options_and_usage_errors(pretty: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "add",
        "--config",
        str(pretty),
        "--project",
        "team",
        "--role",
        "user",
        "--role",
        "admin",
        "--model",
        "echo",
        "--can-share",
        "--description",
        "the build",
        "--expires",
        "2999-01-01",
        "--format",
        "json",
    )
    assert code == 0, err
    printed = json.loads(out)
    SECRETS.append(printed["key"])
    entry = json.loads(pretty.read_text())["keys"][printed["hash"]]
    assert entry == {
        "project": "team",
        "roles": ["user", "admin"],
        "description": "the build",
        "expiresAt": "2999-01-01T00:00:00Z",
        "models": ["echo"],
        "canShare": True,
    }
    assert "role 'admin' is not defined" in err or 'role "admin" is not defined' in err
    assert valid(pretty, capsys)

    unchanged = pretty.read_bytes()
    for args in (
        ["--expires", "2001-01-01"],
        ["--expires", "soon"],
        ["--expires", "0"],
        ["--expires", "2932000d"],  # (past year 9999 from now: was a traceback)
        ["--expires", "3000000d"],
    ):
        code, _, err = run(
            capsys, "add", "--config", str(pretty), "--project", "p", "--role", "r", *args
        )
        assert code == 2 and "--expires" in err, args
    code, _, err = run(
        capsys, "add", "--config", str(pretty), "--project", "p", "--role", "r",
        "--expires", "3000000d",
    )  # fmt: skip
    assert "is too long (at most 100 years)" in err
    code, _, err = run(capsys, "add", "--config", str(pretty), "--project", "", "--role", "r")
    assert code == 2
    for option, value in (("--project", "a\nb"), ("--name", "a\x1bb"), ("--description", "\x07")):
        given = {"--project": "p", "--role": "r"} | {option: value}
        code, _, err = run(capsys, "add", "--config", str(pretty), *chain(*given.items()))
        assert code == 2 and "control character" in err, option
    for option in ("--project", "--name", "--description", "--role"):  # read as variables
        given = {"--project": "p", "--role": "r"} | {option: "${UPSTREAM_KEY}"}
        code, _, err = run(capsys, "add", "--config", str(pretty), *chain(*given.items()))
        assert code == 2 and "environment variable" in err, option
    for argv in (
        ["add", "--config", str(pretty), "--role", "r"],
        ["add", "--config", str(pretty), "--project", "p"],
        ["revoke", "--config", str(pretty)],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(["keys", *argv])
        assert exited.value.code == 2, argv
    capsys.readouterr()
    code, _, err = run(
        capsys, "add", "--config", str(pretty.parent / "nope.json"), "--project", "p", "--role", "r"
    )
    assert code == 2 and "cannot read" in err
    broken = pretty.parent / "broken.json"
    broken.write_text('{"keys": ')
    code, _, err = run(capsys, "add", "--config", str(broken), "--project", "p", "--role", "r")
    assert code == 1 and "not a valid config file" in err
    assert pretty.read_bytes() == unchanged


def test_files_the_config_refuses_are_said_so_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand edit the proxy refuses: a key's ``roles`` that is no list (listed without it),
    a file nested past Python's recursion (it raised RecursionError), a YAML alias bomb of
    a few hundred bytes (listing it expanded it to gigabytes): exit 1 and why, or a list."""
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"keys": {"sha256:" + "1" * 64: {"project": "p", "roles": 5}}}))
    code, out, err = run(capsys, "list", "--config", str(wrong), "--format", "json")
    assert code == 0, err
    assert [(k["fingerprint"], k["roles"]) for k in json.loads(out)] == [("11111111", [])]
    deep = tmp_path / "deep.json"
    deep.write_text('{"keys": ' + "[" * 100_000 + "]" * 100_000 + "}")
    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\nkeys: {}\nname: *a8\n")
    for path, why in ((deep, "nested too deeply"), (bomb, "more than 1,000,000 values")):
        code, out, err = run(capsys, "list", "--config", str(path))
        assert (code, out) == (1, ""), err
        assert "not a valid config file" in err and why in err and "Traceback" not in err


def test_add_works_in_a_shell_without_the_servers_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI checks an edit with its shell's environment, which seldom holds the server's
    secrets: an unset ``${VAR}`` the file had already does not refuse it (no worse than
    before), where the admin API, checking with the server's, refuses a broken config."""
    path = tmp_path / "aidial.config.json"
    model = {"type": "chat", "upstreams": [{"endpoint": "http://x", "key": "${NOT_IN_THIS_SHELL}"}]}
    path.write_text(json.dumps({"models": {"m": model}, "roles": {"r": {}}, "keys": {}}))
    code, _, err = run(capsys, "add", "--config", str(path), "--project", "p", "--role", "r")
    assert code == 0, err
    assert len(json.loads(path.read_text())["keys"]) == 1


def test_an_edit_to_a_config_that_does_not_load_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config the proxy refuses already (a field it does not know): a revoke written there
    would say "done" while the reload refused the file and the key went on working."""
    path = tmp_path / "aidial.config.json"
    model = {"type": "chat", "endpoint": "http://x/chat", "bogusField": 1}
    secret = "sha256:" + "1" * 64
    doc = {"models": {"m": model}, "roles": {"r": {}}, "keys": {secret: {"project": "p"}}}
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    code, _, err = run(capsys, "revoke", "--config", str(path), "1111")
    assert code == 1 and "fix it first" in err, err
    assert path.read_bytes() == before


def test_yaml_files_are_listed_but_never_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.yaml"
    original = "# ops keys\nkeys:\n  sha256:" + "1" * 64 + ":\n    project: p\n    role: r\n"
    path.write_text(original)
    code, out, err = run(capsys, "add", "--config", str(path), "--project", "p", "--role", "r")
    assert code == 1 and out == ""
    assert "YAML config files are not edited" in err and "keys generate" in err
    code, _, err = run(capsys, "revoke", "--config", str(path), "1111")
    assert code == 1 and "YAML" in err
    assert path.read_text() == original
    code, out, _ = run(capsys, "list", "--config", str(path), "--format", "json")
    assert code == 0 and json.loads(out)[0]["fingerprint"] == "11111111"


def test_list_shows_every_key_with_its_state_and_never_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = "plain-secret-" + "x1y2z3" * 8
    from_env = "env-secret-" + "a1b2c3" * 8
    SECRETS.extend([plain, from_env])
    monkeypatch.setenv("TEAM_KEY", from_env)
    monkeypatch.delenv("UNSET_KEY", raising=False)
    main = tmp_path / "main.json"
    main.write_text(
        json.dumps(
            {
                "keys": {
                    "sha256:" + "a" * 64: {"project": "p", "role": "r", "name": "active"},
                    "sha256:" + "b" * 64: {
                        "project": "p",
                        "roles": ["r", "s"],
                        "expiresAt": "2000-01-01T00:00:00Z",
                    },
                    "sha256:" + "c" * 64: {"project": "p", "role": "r", "disabled": True},
                    "sha256:" + "d" * 64: {
                        "project": "p",
                        "role": "r",
                        "notBefore": "2999-01-01T00:00:00Z",
                    },
                    plain: {"project": "q", "role": "r", "name": "in\x1bplain"},
                }
            }
        )
    )
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(
            {
                "keys": {
                    "${TEAM_KEY}": {"project": "e", "role": "r"},
                    "${UNSET_KEY}": {"project": "u", "role": "r"},
                }
            }
        )
    )
    code, out, _ = run(capsys, "list", "--config", str(main), str(other), "--format", "json")
    assert code == 0
    listed = json.loads(out)
    assert [(k["fingerprint"], k["state"], k["stored"]) for k in listed] == [
        ("a" * 8, "active", "sha256"),
        ("b" * 8, "expired", "sha256"),
        ("c" * 8, "disabled", "sha256"),
        ("d" * 8, "not yet valid", "sha256"),
        (key_digest(plain)[:8], "active", "plaintext"),
        (key_digest(from_env)[:8], "active", "env"),
        ("?", "active", "env"),
    ]
    assert listed[1]["roles"] == ["r", "s"] and listed[1]["expiresAt"] == "2000-01-01T00:00:00Z"
    assert listed[4]["name"] == "in?plain"  # no terminal escapes from a file
    assert listed[5]["file"] == str(other)
    code, text, _ = run(capsys, "list", "--config", str(main), "--config", str(other))
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == [
        "FINGERPRINT",
        "NAME",
        "PROJECT",
        "ROLES",
        "EXPIRES",
        "STATE",
        "STORED",
        "FILE",
    ]
    assert lines[2].split() == [
        "b" * 8,
        "-",
        "p",
        "r,s",
        "2000-01-01T00:00:00Z",
        "expired",
        "sha256",
        str(main),
    ]
    for secret in (plain, from_env):
        assert secret not in out and secret not in text


def add_key(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, out, err = run(
        capsys, "add", "--config", str(path), "--project", "team", "--role", "user", *extra
    )
    assert code == 0, err
    return out.strip()


def test_revoke_disables_and_keeps_the_entry(
    pretty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = add_key(pretty, capsys, "--name", "to revoke")
    fp = key_digest(secret)[:8]
    code, _, err = run(capsys, "revoke", "--config", str(pretty), fp.upper())
    assert code == 0 and "disabled" in err
    entry = json.loads(pretty.read_text())["keys"]["sha256:" + key_digest(secret)]
    assert entry == {"project": "team", "role": "user", "name": "to revoke", "disabled": True}
    assert pretty.read_text().count('"disabled": true') == 1
    assert valid(pretty, capsys)
    code, _, err = run(capsys, "revoke", "--config", str(pretty), fp)
    assert code == 0 and "already disabled" in err
    code, _, err = run(capsys, "revoke", "--config", str(pretty), "0123abcd")
    assert code == 1 and "no key with fingerprint 0123abcd" in err
    code, _, err = run(capsys, "revoke", "--config", str(pretty), "xyz")
    assert code == 2


def test_an_ambiguous_fingerprint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, str] = {}
    while True:  # two secrets whose digests share 4 hex digits (a birthday: ~300 tries)
        secret = text.new_secret()
        prefix = key_digest(secret)[:4]
        if prefix in seen:
            a, b = seen[prefix], secret
            break
        seen[prefix] = secret
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {
                "keys": {
                    hashed(a): {"project": "p", "role": "r", "name": "a"},
                    hashed(b): {"project": "p", "role": "r", "name": "b"},
                }
            },
            indent=2,
        )
    )
    code, _, err = run(capsys, "revoke", "--config", str(path), prefix)
    assert code == 1 and "ambiguous" in err and "(a)" in err and "(b)" in err
    code, _, _ = run(capsys, "rotate", "--config", str(path), prefix)
    assert code == 1
    code, _, _ = run(capsys, "revoke", "--config", str(path), key_digest(b)[:12])
    assert code == 0
    assert json.loads(path.read_text())["keys"][hashed(b)]["disabled"] is True
    assert "disabled" not in json.loads(path.read_text())["keys"][hashed(a)]


def test_rotate_issues_a_like_key_and_expires_the_old_one_after_the_overlap(
    pretty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = add_key(pretty, capsys, "--name", "svc", "--model", "echo", "--can-share")
    doc = json.loads(pretty.read_text())
    doc["keys"][hashed(old)]["limits"] = {"*": {"requestHour": 5}}
    pretty.write_text(json.dumps(doc, indent=2))
    before = datetime.now(UTC)
    code, out, err = run(
        capsys, "rotate", "--config", str(pretty), key_digest(old)[:8], "--overlap", "2d"
    )
    assert code == 0, err
    new = out.strip()
    assert re.fullmatch(r"dpk_[A-Za-z0-9]{43}", new)
    doc = json.loads(pretty.read_text())
    assert doc["keys"][hashed(new)] == {
        "project": "team",
        "role": "user",
        "name": "svc",
        "models": ["echo"],
        "canShare": True,
        "limits": {"*": {"requestHour": 5}},
    }
    ends = text.parse_datetime(doc["keys"][hashed(old)]["expiresAt"])
    assert before + timedelta(days=2, seconds=-1) <= ends <= datetime.now(UTC) + timedelta(days=2)
    assert f"replaces {key_digest(old)[:8]}" in err
    assert valid(pretty, capsys)

    # An old key that already ends sooner keeps its end; the new key may get its own.
    code, out, _ = run(
        capsys,
        "rotate",
        "--config",
        str(pretty),
        key_digest(old)[:8],
        "--overlap",
        "30d",
        "--expires",
        "90d",
        "--name",
        "svc 3",
        "--format",
        "json",
    )
    assert code == 0
    third = json.loads(out)
    SECRETS.append(third["key"])
    doc = json.loads(pretty.read_text())
    assert text.parse_datetime(doc["keys"][hashed(old)]["expiresAt"]) == ends.replace(microsecond=0)
    assert third["oldExpiresAt"] == iso(ends) and third["name"] == "svc 3"
    assert doc["keys"][third["hash"]]["expiresAt"] == third["expiresAt"]

    # A revoked key is not rotated; a bad overlap is a usage error.
    run(capsys, "revoke", "--config", str(pretty), key_digest(new)[:8])
    code, _, err = run(capsys, "rotate", "--config", str(pretty), key_digest(new)[:8])
    assert code == 1 and "disabled" in err
    for overlap in ("a while", "2932000d"):  # (the latter past year 9999: was a traceback)
        code, _, err = run(
            capsys, "rotate", "--config", str(pretty), key_digest(old)[:8], "--overlap", overlap
        )
        assert code == 2 and "--overlap" in err, overlap


def test_writes_are_atomic_and_keep_mode_and_symlinks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "aidial.config.json"
    target.write_text(PRETTY)
    os.chmod(target, 0o640)
    link = tmp_path / "aidial.config.json"
    link.symlink_to(target)
    secret = add_key(link, capsys)
    assert link.is_symlink() and hashed(secret) in target.read_text()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert sorted(p.name for p in real.iterdir()) == ["aidial.config.json"]  # no temp file left


def test_an_edit_that_would_break_the_config_or_race_another_is_not_written(
    pretty: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = configfile.ConfigFile(pretty)
    name = next(iter(config.keys))
    config.set_field(name, "expiresAt", "next tuesday")
    with pytest.raises(KeysError, match="would make the config invalid"):
        config.save({})
    assert pretty.read_text() == PRETTY

    config = configfile.ConfigFile(pretty)
    config.set_field(name, "disabled", True)
    pretty.write_text(PRETTY.replace('"demo"', '"changed"'))
    with pytest.raises(KeysError, match="changed while it was being edited"):
        config.save({})
    assert '"changed"' in pretty.read_text()
    assert sorted(p.name for p in pretty.parent.iterdir()) == ["aidial.config.json"]


def test_durations_and_dates() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    cases: dict[str, Any] = {
        "30d": timedelta(days=30),
        "12h": timedelta(hours=12),
        "1w2d": timedelta(days=9),
        "90m": timedelta(minutes=90),
        "45s": timedelta(seconds=45),
    }
    for value, delta in cases.items():
        assert parse_expiry(value, now) == now + delta
    assert parse_expiry("2026-01-01", now) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expiry("2026-01-01T12:00:00+02:00", now) == datetime(2026, 1, 1, 10, tzinfo=UTC)
    for bad in ("", "d", "3x", "-1d", "2024-12-31", "0"):
        with pytest.raises(ValueError):
            parse_expiry(bad, now)
    assert text.parse_duration("0") == timedelta(0)


_LAYOUTS = [
    '{"roles": {"a": {}, "b": {"limits": {"m": {"day": 1}}}}, "keys": {"k": {"x": [1, {"y": 2}]}}}',
    '{\n  "roles": {\n    "a": {},\n    "b": {\n      "limits": {\n'
    '        "m": {"day": 1}\n      }\n    }\n  },\n'
    '  "keys": {"k": {"x": [1, {"y": 2}]}}\n}\n',
    '{\r\n\t"keys": {"k": {"x": [1, {"y": 2}]}},\r\n'
    '\t"roles": {"a": {}, "b": {"limits": {"m": {"day": 1}}}}\r\n}',
    '{ "roles" : { "b" : { "limits" : { "m" : { "day" : 1 } , "n" : {} } } , "a" : { } } ,\n'
    ' "keys" : { "k" : { "x" : [1, {"y": 2}] , "é" : "ü" } } }',
]


@pytest.mark.parametrize("text", _LAYOUTS)
def test_splices_set_and_remove_members_at_any_depth(text: str) -> None:
    """Members set, added and taken out of nested objects in any layout: the text parses to
    exactly the intended document, and taking out what was added gives the text back."""
    edited = configfile.JsonText(text)
    doc = json.loads(text)
    edited.set_member(["roles", "b", "limits"], "new", {"minute": 5}, expand=0)
    doc["roles"]["b"]["limits"]["new"] = {"minute": 5}
    assert json.loads(edited.text) == doc
    edited.remove_member(["roles", "b", "limits"], "new")
    del doc["roles"]["b"]["limits"]["new"]
    assert edited.text == text
    edited.set_member(["roles", "a"], "limits", {"m": {"day": "2"}})
    doc["roles"]["a"]["limits"] = {"m": {"day": "2"}}
    edited.set_member(["keys", "k"], "x", None)
    doc["keys"]["k"]["x"] = None
    edited.remove_member(["roles", "b", "limits"], "m")
    del doc["roles"]["b"]["limits"]["m"]
    assert json.loads(edited.text) == doc
    edited.remove_member(["keys"], "k")
    del doc["keys"]["k"]
    assert json.loads(edited.text) == doc
    with pytest.raises(KeysError):
        configfile.JsonText("[1, 2]").set_member([], "a", 1)
