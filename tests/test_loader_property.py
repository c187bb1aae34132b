"""Property tests: whatever the bytes, the loader answers with a snapshot or a ConfigError
(nothing else), never shows a secret, and its fast schema check agrees with jsonschema.

The inputs are arbitrary bytes, arbitrary JSON values (also under the config's own section
and field names), and the shipped configs mutated: fields deleted, duplicated elsewhere,
retyped, renamed, values swapped, files split in two, written as JSON or YAML, truncated.
(hypothesis-jsonschema is not used: 0.23.1 is broken with the installed hypothesis.)
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Problem
from dialproxy.config.parse import Source
from dialproxy.config.schema import schema, schema_valid
from dialproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    ROOT / "aidial.config.json",
    *sorted((ROOT / "config").glob("*.json")),
    *sorted((ROOT / "config" / "split").glob("*.json")),
]
CLIENT_SECRET = "3b9d5f7a1c2e4b6d8f0a9c7e5d3b1f2a"
UPSTREAM_SECRET = "upstream-7Gq2Lx9Vb4Nw"
ENV = {
    "OPENAI_API_KEY": UPSTREAM_SECRET,
    "AZURE_OPENAI_KEY_EAST": UPSTREAM_SECRET,
    "AZURE_OPENAI_KEY_WEST": "azure-west-2Hj8Kp5Rt",
    "UPSTREAM_KEY_1": "adapter-key-9Zc4Mv1Qs",
    "UPSTREAM_KEY_2": "adapter-key-3Tf6Wd8Yb",
    "UPSTREAM_KEY_3": "adapter-key-5Ne2Gh7Ux",
    "UPSTREAM_KEY_4": "adapter-key-1Ka9Lo3Pi",
    "CLIENT_KEY": CLIENT_SECRET,
}
SETTINGS = settings(  # DIALPROXY_PROPERTY_EXAMPLES=5000 for a longer hunt
    max_examples=int(os.environ.get("DIALPROXY_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def own_config() -> dict[str, Any]:
    """A config with every kind of secret: plain keys, ${VAR} keys, upstream keys."""
    return {
        "models": {
            "m": {
                "type": "chat",
                "endpoint": "http://localhost:7001/openai/deployments/m/chat/completions",
                "upstreams": [
                    {"endpoint": "http://localhost:7001", "key": "literal-upstream-4Rk8Dw"},
                    {"endpoint": "http://localhost:7002", "key": "${OPENAI_API_KEY}", "tier": 1},
                ],
                "pricing": {"unit": "token", "prompt": "0.5", "completion": "1.25"},
                "userRoles": ["r", "default"],
            }
        },
        "keys": {
            "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c": {"project": "p", "role": "r"},
            "${CLIENT_KEY}": {"project": "q", "roles": ["r"], "expiresAt": "2030-01-01T00:00:00Z"},
        },
        "roles": {"r": {"limits": {"m": {"minute": "100000", "day": 1000000}}}},
    }


BASES: list[dict[str, Any]] = [own_config(), *(json.loads(p.read_text()) for p in SHIPPED)]
SECRET_LIKE = {
    "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c",
    "literal-upstream-4Rk8Dw",
    *(v for v in ENV.values()),
    *(k for base in BASES for k in base.get("keys", {}) if not k.startswith(("sha256:", "${"))),
}
FIELD_NAMES = sorted(
    {
        name
        for node in schema()["$defs"].values()
        for name in (node.get("properties") or {})
        if isinstance(node, dict)
    }
    | set(schema()["properties"])
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["${OPENAI_API_KEY}", "${UNSET}", "http://h/x", "ftp://u:p@h", "100", ""])
)
names = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=4),
    max_leaves=25,
)


def paths_of(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_of(v, (*path, i))
    return out


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in paths_of(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = at(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["delete", "retype", "duplicate", "rename", "swap", "add"]))
        if op == "delete":
            del parent[last]
        elif op == "retype":
            parent[last] = draw(json_values)
        elif op == "duplicate":  # the value also appears somewhere else
            target = at(doc, draw(st.sampled_from(paths))[:-1])
            value = copy.deepcopy(parent[last])
            if isinstance(target, dict):
                target[draw(names)] = value
            elif isinstance(target, list):
                target.append(value)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(names)] = parent.pop(last)
        elif op == "swap":  # the value moves to where another one was
            other = draw(st.sampled_from(paths))
            target = at(doc, other[:-1])
            target[other[-1]], parent[last] = copy.deepcopy(parent[last]), target[other[-1]]
        elif op == "add" and isinstance(parent, dict | list):
            node = parent[last]
            if isinstance(node, dict):
                node[draw(names)] = draw(json_values)
            elif isinstance(node, list):
                node.append(draw(json_values))
    return doc


def secrets_of(doc: Any) -> set[str]:
    """The secret-like strings that are secrets of this (mutated) config."""
    found: set[str] = set()
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if isinstance(keys, dict):
        found.update(keys)

    def walk(node: Any, field: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, field)
        elif isinstance(node, str) and field == "key":
            found.add(node)

    walk(doc, None)
    resolved = {ENV.get(s[2:-1], s) if s.startswith("${") else s for s in found}
    return resolved & SECRET_LIKE


def outcome(sources: list[Source], env: dict[str, str] = ENV) -> list[Problem]:
    """Build; anything but a Snapshot or a ConfigError fails the test."""
    try:
        snapshot = build_snapshot(sources, env)
    except ConfigError as e:
        assert any(p.severity == "error" for p in e.problems)
        found = list(e.problems)
    else:
        assert all(p.severity == "warning" for p in snapshot.warnings)
        found = list(snapshot.warnings)
    for p in found:
        assert p.path.startswith("$") and p.message and p.severity in ("error", "warning")
        assert p.file in {s.name for s in sources}
    return found


def assert_hidden(found: list[Problem], secrets: set[str]) -> None:
    for p in found:
        text = f"{p.path} {p.message}"
        for secret in secrets:
            assert secret not in text, (secret, text)


@SETTINGS
@given(data=st.binary(max_size=600), name=st.sampled_from(["c.json", "c.yaml"]))
def test_any_bytes(data: bytes, name: str) -> None:
    outcome([Source(name, data)])


@SETTINGS
@given(value=json_values, name=st.sampled_from(["c.json", "c.yaml"]))
def test_any_json_value(value: Any, name: str) -> None:
    text = json.dumps(value) if name.endswith(".json") else yaml.safe_dump(value)
    outcome([Source(name, text.encode())])


@SETTINGS
@given(
    sections=st.dictionaries(
        st.sampled_from(["models", "keys", "roles", "applications", "retriableErrorCodes"]),
        st.dictionaries(names, json_values, max_size=3),
        max_size=4,
    )
)
def test_any_values_under_the_config_sections(sections: dict[str, Any]) -> None:
    outcome([Source("c.json", json.dumps(sections).encode())])


@SETTINGS
@given(
    doc=mutated_configs(),
    form=st.sampled_from(["json", "yaml", "split", "truncated"]),
    cut=st.integers(0, 10_000),
    drop_env=st.booleans(),
)
def test_mutated_configs(doc: dict[str, Any], form: str, cut: int, drop_env: bool) -> None:
    env = {} if drop_env else ENV
    if form == "yaml":
        sources = [Source("c.yaml", yaml.safe_dump(doc).encode())]
    elif form == "split":
        names = sorted(doc)
        first = {k: doc[k] for k in names[: len(names) // 2]}
        second = {k: doc[k] for k in names[len(names) // 2 :]}
        sources = [
            Source("a.json", json.dumps(first).encode()),
            Source("b.json", json.dumps(second).encode()),
        ]
    elif form == "truncated":
        data = json.dumps(doc).encode()
        sources = [Source("c.json", data[: cut % (len(data) + 1)])]
    else:
        sources = [Source("c.json", json.dumps(doc).encode())]
    found = outcome(sources, env)
    if form != "truncated":
        assert_hidden(
            found, secrets_of(doc) if not drop_env else secrets_of(doc) - set(ENV.values())
        )


VALIDATOR = jsonschema.Draft202012Validator(schema())


@SETTINGS
@given(doc=mutated_configs() | json_values)
def test_fast_schema_check_agrees_with_jsonschema(doc: Any) -> None:
    assert schema_valid(doc) == VALIDATOR.is_valid(doc)
