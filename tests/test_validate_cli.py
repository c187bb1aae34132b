"""`dialproxy validate`, run as a real subprocess: exit codes, both formats, several files,
the shipped configs, and no secret in what it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dialproxy.text import fingerprint
from tests.samples import EXAMPLE_ENV, SECRET

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
DIALPROXY = Path(sys.executable).parent / "dialproxy"
KEY = f"$.keys.<key {fingerprint(SECRET)}>"
LINE = re.compile(r"^(?P<file>.+?): (?P<path>\$.*?): (?P<severity>error|warning): (?P<message>.+)$")


def run(
    *args: str | Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m dialproxy validate ARGS`` with only ``env`` (and PATH) in the environment
    (``stdin``: what it reads there)."""
    return subprocess.run(
        [sys.executable, "-m", "dialproxy", "validate", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8", **(env or {})},
    )


def config() -> dict[str, Any]:
    return {
        "models": {
            "m": {
                "type": "chat",
                "upstreams": [{"endpoint": "http://localhost:8000/v1/chat/completions"}],
            }
        },
        "keys": {SECRET: {"project": "p", "role": "r"}},
        "roles": {"r": {"limits": {"m": {"minute": "1000"}}}},
    }


def write(tmp_path: Path, name: str, content: dict[str, Any] | str) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
    return path


def lines(stdout: str) -> list[dict[str, str]]:
    out = []
    for line in stdout.splitlines():
        m = LINE.match(line)
        assert m, f"not `file: $.path: severity: message`: {line!r}"
        out.append(m.groupdict())
    return out


# --- exit codes ----------------------------------------------------------------------------


def test_valid_config_exits_0_and_prints_no_problem(tmp_path: Path) -> None:
    result = run(write(tmp_path, "c.json", config()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "valid (0 error(s), 0 warning(s))" in result.stderr


def test_warnings_exit_0_and_1_with_strict(tmp_path: Path) -> None:
    c = config()
    c["keys"][SECRET]["role"] = "ghost"
    path = write(tmp_path, "c.json", c)
    result = run(path)
    assert result.returncode == 0
    assert lines(result.stdout) == [
        {
            "file": str(path),
            "path": f"{KEY}.role",
            "severity": "warning",
            "message": 'role "ghost" is not defined in roles',
        }
    ]
    strict = run("--strict", path)
    assert strict.returncode == 1
    assert strict.stdout == result.stdout
    assert "invalid (0 error(s), 1 warning(s))" in strict.stderr


def test_errors_exit_1(tmp_path: Path) -> None:
    c = config()
    c["roles"]["r"]["limits"]["m"]["minute"] = "abc"
    c["models"]["m"]["bogus"] = True
    path = write(tmp_path, "c.json", c)
    result = run(path)
    assert result.returncode == 1
    assert [(p["path"], p["severity"]) for p in lines(result.stdout)] == [
        ("$.models.m", "error"),
        ("$.roles.r.limits.m.minute", "error"),
    ]
    assert "invalid (2 error(s), 0 warning(s))" in result.stderr


@pytest.mark.parametrize(
    ("name", "text", "start"),
    [
        ("bad.json", '{"models": {', "invalid JSON at line 1, column 13"),
        ("bad.yaml", "models: [\n", "invalid YAML at line 2, column 1"),
        ("list.json", "[]", "the config must be a JSON object"),
    ],
)
def test_a_file_that_is_not_a_config_exits_1(
    tmp_path: Path, name: str, text: str, start: str
) -> None:
    path = write(tmp_path, name, text)
    result = run(path)
    assert result.returncode == 1
    [problem] = lines(result.stdout)
    assert (problem["file"], problem["path"], problem["severity"]) == (str(path), "$", "error")
    assert problem["message"].startswith(start)


def test_an_unreadable_file_exits_2(tmp_path: Path) -> None:
    good = write(tmp_path, "c.json", config())
    missing = run(good, tmp_path / "missing.json")
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr and "missing.json" in missing.stderr
    assert missing.stdout == ""
    directory = run(tmp_path)
    assert directory.returncode == 2
    assert "cannot read" in directory.stderr


def test_a_config_piped_in_is_validated(tmp_path: Path) -> None:
    """``dialproxy validate /dev/stdin`` (or ``<(envsubst < tmpl)``): a pipe, read as the
    command line gives it (the server refuses what is not a regular file; CI does not)."""
    result = run("/dev/stdin", stdin=json.dumps(config()))
    assert result.returncode == 0, result.stderr
    assert "valid (0 error(s), 0 warning(s))" in result.stderr


@pytest.mark.parametrize(
    "args", [[], ["--format", "xml", "c.json"], ["--bogus", "c.json"], ["--strict"]]
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    write(tmp_path, "c.json", config())
    result = subprocess.run(
        [sys.executable, "-m", "dialproxy", "validate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr


def test_the_console_script_is_the_same_program(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", config())
    result = subprocess.run(
        [str(DIALPROXY), "validate", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, json.loads(result.stdout)) == (0, [])


# --- formats -------------------------------------------------------------------------------


def test_json_format(tmp_path: Path) -> None:
    c = config()
    c["keys"][SECRET]["role"] = "ghost"
    c["models"]["m"]["upstreams"][0]["endpoint"] = "ftp://host/x"
    path = write(tmp_path, "c.json", c)
    result = run("--format", "json", path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report == [
        {
            "file": str(path),
            "path": f"{KEY}.role",
            "message": 'role "ghost" is not defined in roles',
            "severity": "warning",
        },
        {
            "file": str(path),
            "path": "$.models.m.upstreams[0].endpoint",
            "message": "must be an http:// or https:// URL with a host",
            "severity": "error",
        },
    ]
    assert (json.loads(run("--format", "json", write(tmp_path, "ok.json", config())).stdout)) == []


def test_text_format_is_one_problem_per_line(tmp_path: Path) -> None:
    c = config()
    for i in range(5):
        c["keys"][SECRET][f"extra{i}"] = i
    result = run(write(tmp_path, "c.json", c))
    found = lines(result.stdout)
    assert len(found) == 5
    assert {p["message"] for p in found} == {f'unknown field "extra{i}" in a key' for i in range(5)}


def test_an_empty_config_is_a_warning_like_the_server_refusal(tmp_path: Path) -> None:
    result = run(write(tmp_path, "models.json", {"models": config()["models"]}))
    assert result.returncode == 0
    [problem] = lines(result.stdout)
    assert (problem["path"], problem["severity"]) == ("$.keys", "warning")
    assert "--allow-empty-config" in problem["message"]
    assert run("--strict", tmp_path / "models.json").returncode == 1


# --- several files -------------------------------------------------------------------------


def test_several_files_are_merged_in_order(tmp_path: Path) -> None:
    c = config()
    models = write(tmp_path, "models.json", {"models": c["models"]})
    keys = write(tmp_path, "keys.json", {"keys": c["keys"], "roles": c["roles"]})
    assert run("--strict", models, keys).returncode == 0
    override = write(tmp_path, "override.json", {"roles": {"r": {"limits": {"m": {"day": "x"}}}}})
    result = run(models, keys, override)
    assert result.returncode == 1
    [problem] = lines(result.stdout)
    assert (problem["file"], problem["path"]) == (str(override), "$.roles.r.limits.m.day")
    again = write(tmp_path, "again.json", {"keys": c["keys"]})
    result = run(models, keys, again)
    [problem] = lines(result.stdout)
    assert (problem["file"], problem["path"]) == (str(again), KEY)
    assert problem["message"] == f"the same key is already defined in {keys}"


def test_yaml_and_json_files_together(tmp_path: Path) -> None:
    c = config()
    models = write(
        tmp_path, "models.yaml", "models:\n  m:\n    type: chat\n    endpoint: http://h/x\n"
    )
    keys = write(tmp_path, "keys.json", {"keys": c["keys"], "roles": {"r": {}}})
    result = run("--strict", models, keys)
    assert result.returncode == 0, result.stdout


# --- the shipped configs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        ["aidial.config.json"],
        ["config/openai.json"],
        ["config/azure.json"],
        ["config/local-vllm.json"],
        ["config/dial-sample.json"],
        ["config/split/models.json", "config/split/keys.json"],
    ],
    ids=lambda files: "+".join(Path(f).name for f in files),
)
def test_shipped_configs_pass_strict(files: list[str]) -> None:
    result = run("--strict", *files, env=EXAMPLE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_examples_without_their_variables_name_them(tmp_path: Path) -> None:
    result = run("--format", "json", "config/dial-sample.json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert {p["message"] for p in report} == {
        f"environment variable UPSTREAM_KEY_{i} is not set" for i in (1, 2, 3, 4)
    }
    assert all(p["severity"] == "error" for p in report)


# --- no secret in the output ---------------------------------------------------------------

KEY_SECRET = "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c"
WEAK_SECRET = "weakpass42"
UPSTREAM_SECRET = "upstream-S3cr3t-9b8a7c6d"
ENV_SECRET = "env-S3cr3t-Value-1f2e3d4c"
URL_PASSWORD = "urlPa55w0rd-77aa"
SECRETS = [KEY_SECRET, WEAK_SECRET, UPSTREAM_SECRET, ENV_SECRET, URL_PASSWORD]


def leaky_files(tmp_path: Path) -> list[Path]:
    full = {
        "models": {
            "m": {
                "type": KEY_SECRET,
                "endpoint": f"gopher://admin:{URL_PASSWORD}@host/",
                "upstreams": [
                    {"endpoint": "http://h", "key": UPSTREAM_SECRET, UPSTREAM_SECRET: True},
                    {"endpoint": "http://h", "key": "${UPSTREAM}", "tier": "${UPSTREAM}"},
                    {"endpoint": "http://h", "key": UPSTREAM_SECRET + "\u0007"},
                ],
                "userRoles": [WEAK_SECRET],
                "pricing": {"prompt": UPSTREAM_SECRET},
            }
        },
        "keys": {
            KEY_SECRET: {"project": "p", "role": KEY_SECRET, KEY_SECRET: 1},
            WEAK_SECRET: {"project": 5, "roles": WEAK_SECRET},
            "${CLIENT}": {"project": "p", "role": "default"},
        },
        "roles": {"r": {"limits": {KEY_SECRET: {"minute": WEAK_SECRET}}}},
    }
    again = {"keys": {KEY_SECRET: {"project": "p", "role": "default"}}}
    return [
        write(tmp_path, "full.json", full),
        write(tmp_path, "again.json", again),
        write(tmp_path, "broken.json", f'{{"keys": {{"{KEY_SECRET}": {{"project": "p"}} "x'),
        write(tmp_path, "broken.yaml", f"keys:\n  {KEY_SECRET}: *{WEAK_SECRET}\n"),
    ]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_in_the_output(tmp_path: Path, fmt: str) -> None:
    full, again, broken_json, broken_yaml = leaky_files(tmp_path)
    env = {"UPSTREAM": ENV_SECRET, "CLIENT": ENV_SECRET}
    runs = [
        run("--format", fmt, "--strict", full, again, env=env),
        run("--format", fmt, broken_json, env=env),
        run("--format", fmt, broken_yaml, full, env=env),
    ]
    for result in runs:
        assert result.returncode == 1
        output = result.stdout + result.stderr
        for secret in SECRETS:
            assert secret.lower() not in output.lower(), (secret, output)
        assert "S3cr3t" not in output
    problems = runs[0].stdout.count("\n") if fmt == "text" else len(json.loads(runs[0].stdout))
    assert problems >= 15  # the secrets sat next to many problems
    assert "the same key is already defined in" in runs[0].stdout
