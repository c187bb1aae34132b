"""The published JSON Schema of aidial.config.json and the example configs in config/."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.samples import SECRET, base_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "schemas" / "aidial.config.schema.json"
CONFIG_DIR = ROOT / "config"
EXAMPLES = sorted([*CONFIG_DIR.glob("*.json"), *CONFIG_DIR.glob("split/*.json")])
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

# An obviously-example client key secret (32 hex digits); never a real one.


def load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded = load_json(SCHEMA_PATH)
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def errors_of(
    validator: jsonschema.Draft202012Validator, instance: Any
) -> list[jsonschema.ValidationError]:
    return list(validator.iter_errors(instance))


def error_paths(validator: jsonschema.Draft202012Validator, instance: Any) -> list[str]:
    return [e.json_path for e in errors_of(validator, instance)]


# --- the schema itself ---------------------------------------------------------------------


def test_schema_is_valid_against_its_metaschema(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://dialproxy.dev/schemas/aidial.config.schema.json"


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    missing: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                for name, sub in props.items():
                    has_own = isinstance(sub, dict) and "description" in sub
                    ref = sub.get("$ref") if isinstance(sub, dict) else None
                    has_ref = (
                        isinstance(ref, str)
                        and ref.startswith("#/$defs/")
                        and "description" in schema["$defs"][ref.removeprefix("#/$defs/")]
                    )
                    if not (has_own or has_ref):
                        missing.append(f"{where}.{name}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(schema, "#")
    assert missing == []


def test_base_config_is_valid(validator: jsonschema.Draft202012Validator) -> None:
    assert error_paths(validator, base_config()) == []


# --- the examples --------------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in EXAMPLES}
    assert {
        "openai.json",
        "azure.json",
        "local-vllm.json",
        "dial-sample.json",
        "split/models.json",
        "split/keys.json",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_example_validates_with_jsonschema(
    path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    instance = load_json(path)
    messages = [f"{e.json_path}: {e.message}" for e in errors_of(validator, instance)]
    assert messages == []
    schema_ref = instance.get("$schema")
    assert isinstance(schema_ref, str)
    assert (path.parent / schema_ref).resolve() == SCHEMA_PATH


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_example_passes_check_jsonschema(path: Path) -> None:
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--schemafile", str(SCHEMA_PATH), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_rejects_an_invalid_config(tmp_path: Path) -> None:
    config = base_config()
    config["models"]["m"]["bogus"] = True
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--schemafile", str(SCHEMA_PATH), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "$.models.m" in result.stdout


def test_dial_sample_uses_dial_style(validator: jsonschema.Draft202012Validator) -> None:
    sample = load_json(CONFIG_DIR / "dial-sample.json")
    for section in ("models", "keys", "roles", "routes", "applications", "interceptors"):
        assert sample[section], section
    assert "default" in sample["roles"]
    assert len(sample["roles"]) >= 3
    assert any("endpoint" in m and m.get("upstreams") for m in sample["models"].values())
    limit_values = [
        v
        for role in sample["roles"].values()
        for limit in role.get("limits", {}).values()
        for v in limit.values()
    ]
    assert limit_values
    assert all(isinstance(v, str) for v in limit_values)


# --- invalid snippets ----------------------------------------------------------------------


def mutated(mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    config = base_config()
    mutate(config)
    return config


def test_unknown_field_in_model_is_reported_at_the_model(
    validator: jsonschema.Draft202012Validator,
) -> None:
    config = mutated(lambda c: c["models"]["m"].__setitem__("bogus", 1))
    errors = errors_of(validator, config)
    assert [e.json_path for e in errors] == ["$.models.m"]
    assert errors[0].validator == "additionalProperties"
    assert "bogus" in errors[0].message


def test_key_without_project(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["keys"][SECRET].pop("project"))
    errors = errors_of(validator, config)
    assert [e.json_path for e in errors] == [f"$.keys.{SECRET}"]
    assert errors[0].validator == "required"
    assert "project" in errors[0].message


def test_key_with_empty_project(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["keys"][SECRET].__setitem__("project", ""))
    assert error_paths(validator, config) == [f"$.keys.{SECRET}.project"]


def test_key_with_neither_role_nor_roles(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["keys"][SECRET].pop("role"))
    errors = errors_of(validator, config)
    assert [e.json_path for e in errors] == [f"$.keys.{SECRET}"]
    assert errors[0].validator == "anyOf"


def test_key_with_only_empty_roles(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"][SECRET] = {"project": "p", "roles": []}

    assert error_paths(validator, mutated(mutate)) == [f"$.keys.{SECRET}"]


def test_key_with_role_and_empty_roles_is_valid(
    validator: jsonschema.Draft202012Validator,
) -> None:
    config = mutated(lambda c: c["keys"][SECRET].__setitem__("roles", []))
    assert error_paths(validator, config) == []


def test_key_with_roles_only_is_valid(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"][SECRET] = {"project": "p", "roles": ["r", "s"]}

    assert error_paths(validator, mutated(mutate)) == []


def test_limit_that_is_not_an_integer(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["roles"]["r"]["limits"]["m"].__setitem__("minute", "abc"))
    assert error_paths(validator, config) == ["$.roles.r.limits.m.minute"]


@pytest.mark.parametrize("value", ["1.5", 1.5, True, None, "", " 10"])
def test_other_bad_limit_values(validator: jsonschema.Draft202012Validator, value: Any) -> None:
    config = mutated(lambda c: c["roles"]["r"]["limits"]["m"].__setitem__("day", value))
    assert error_paths(validator, config) == ["$.roles.r.limits.m.day"]


@pytest.mark.parametrize("value", [0, -1, "0", "-5", 100, "100000"])
def test_limit_values_that_are_accepted(
    validator: jsonschema.Draft202012Validator, value: Any
) -> None:
    config = mutated(lambda c: c["roles"]["r"]["limits"]["m"].__setitem__("requestMinute", value))
    assert error_paths(validator, config) == []


def test_unknown_field_in_limit(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["roles"]["r"]["limits"]["m"].__setitem__("hour", "5"))
    assert error_paths(validator, config) == ["$.roles.r.limits.m"]


def test_unknown_field_in_role(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["roles"]["r"].__setitem__("limit", {}))
    assert error_paths(validator, config) == ["$.roles.r"]


def test_pricing_as_a_number(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["models"]["m"]["pricing"].__setitem__("prompt", 0.5))
    errors = errors_of(validator, config)
    assert [e.json_path for e in errors] == ["$.models.m.pricing.prompt"]
    assert errors[0].validator == "type"


def test_pricing_bad_unit(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["models"]["m"]["pricing"].__setitem__("unit", "tokens"))
    assert error_paths(validator, config) == ["$.models.m.pricing.unit"]


def test_upstream_with_unknown_field(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["models"]["m"]["upstreams"][0].__setitem__("weigth", 2))
    errors = errors_of(validator, config)
    assert [e.json_path for e in errors] == ["$.models.m.upstreams[0]"]
    assert "weigth" in errors[0].message


def test_upstream_bad_auth(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["models"]["m"]["upstreams"][0].__setitem__("auth", "basic"))
    assert error_paths(validator, config) == ["$.models.m.upstreams[0].auth"]


@pytest.mark.parametrize("value", ["chatt", "embeddings", "", "chat ", 1])
def test_bad_model_type(validator: jsonschema.Draft202012Validator, value: Any) -> None:
    config = mutated(lambda c: c["models"]["m"].__setitem__("type", value))
    assert error_paths(validator, config) == ["$.models.m.type"]


@pytest.mark.parametrize("value", ["chat", "CHAT", "Chat", "completion", "Embedding"])
def test_model_type_is_case_insensitive(
    validator: jsonschema.Draft202012Validator, value: str
) -> None:
    config = mutated(lambda c: c["models"]["m"].__setitem__("type", value))
    assert error_paths(validator, config) == []


def test_unknown_field_in_token_limits(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["models"]["m"].__setitem__("limits", {"maxTokens": 10}))
    assert error_paths(validator, config) == ["$.models.m.limits"]


def test_unknown_field_in_cost_limit(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["roles"]["r"].__setitem__("costLimit", {"hour": "1"}))
    assert error_paths(validator, config) == ["$.roles.r.costLimit"]


def test_unknown_field_in_key(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c["keys"][SECRET].__setitem__("projct", "p"))
    assert error_paths(validator, config) == [f"$.keys.{SECRET}"]


def test_bad_sha256_key_name(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"]["sha256:ABCDEF"] = {"project": "p", "role": "r"}

    assert error_paths(validator, mutated(mutate)) == ["$.keys"]


def test_good_sha256_key_name(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"]["sha256:" + "0123456789abcdef" * 4] = {"project": "p", "role": "r"}

    assert error_paths(validator, mutated(mutate)) == []


@pytest.mark.parametrize("value", ["2025-01-01", "2025-01-01 00:00:00Z", "tomorrow", 1735689600])
def test_bad_expires_at(validator: jsonschema.Draft202012Validator, value: Any) -> None:
    config = mutated(lambda c: c["keys"][SECRET].__setitem__("expiresAt", value))
    assert error_paths(validator, config) == [f"$.keys.{SECRET}.expiresAt"]


def test_bad_retriable_error_code(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c.__setitem__("retriableErrorCodes", [500, 600]))
    assert error_paths(validator, config) == ["$.retriableErrorCodes[1]"]


def test_bad_rate_limit_schedule(validator: jsonschema.Draft202012Validator) -> None:
    config = mutated(lambda c: c.__setitem__("rateLimitSchedule", {"resetTime": "24:00"}))
    assert error_paths(validator, config) == ["$.rateLimitSchedule.resetTime"]


def test_all_problems_are_reported_at_once(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"]["bogus"] = 1
        c["models"]["m"]["pricing"]["completion"] = 2
        c["roles"]["r"]["limits"]["m"]["minute"] = "abc"

    assert sorted(error_paths(validator, mutated(mutate))) == [
        "$.models.m",
        "$.models.m.pricing.completion",
        "$.roles.r.limits.m.minute",
    ]


# --- what is accepted ----------------------------------------------------------------------


def test_unknown_top_level_sections_are_accepted(
    validator: jsonschema.Draft202012Validator,
) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["applicationTypeSchemas"] = [{"$id": "x"}]
        c["someFutureSection"] = {"anything": [1, 2, 3]}

    assert error_paths(validator, mutated(mutate)) == []


def test_loose_sections_accept_any_content(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        for section in ("applications", "interceptors", "addons", "toolsets"):
            c[section] = {"x": {"whatever": True, "nested": {"deep": [None]}}}
        c["assistant"] = {"endpoint": "http://localhost:7001", "assistants": {}}

    assert error_paths(validator, mutated(mutate)) == []


def test_routes_are_checked(validator: jsonschema.Draft202012Validator) -> None:
    """``routes`` is served, so its entries are checked (an unknown field is an error)."""

    def mutate(c: dict[str, Any]) -> None:
        c["routes"] = {
            "ok": {"paths": ["/v1/x"], "methods": ["GET"], "response": {"status": 200}},
            "bad": {"paths": "/v1/x", "order": -1, "whatever": True},
        }

    assert sorted(error_paths(validator, mutated(mutate))) == [
        "$.routes.bad",
        "$.routes.bad.order",
        "$.routes.bad.paths",
    ]


def test_unknown_feature_flags_are_accepted(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"]["features"] = {"toolsSupported": True, "someNewFlag": True}

    assert error_paths(validator, mutated(mutate)) == []


def test_snake_case_aliases_are_accepted(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"].update(
            {
                "display_name": "M",
                "display_version": "1",
                "icon_url": "https://host/m.svg",
                "user_roles": None,
                "forward_auth_token": True,
                "input_attachment_types": ["image/png"],
                "max_input_attachments": 3,
                "description_keywords": ["chat"],
            }
        )

    assert error_paths(validator, mutated(mutate)) == []


def test_extensions_are_accepted(validator: jsonschema.Draft202012Validator) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"]["upstreams"].append(
            {"endpoint": "https://x.openai.azure.com/", "key": "${K}", "auth": "api-key"}
        )
        c["keys"][SECRET].update(
            {
                "name": "n",
                "description": "d",
                "notBefore": "2025-01-01T00:00:00Z",
                "expiresAt": "2026-01-01T00:00:00.5+02:00",
                "disabled": False,
                "limits": {"*": {"requestMinute": 10}, "m": {"day": "1000"}},
                "models": ["m"],
                "canShare": True,
            }
        )
        c["roles"]["r"]["costLimit"] = {"minute": 0.5, "day": "10", "week": 0, "month": "100.25"}

    assert error_paths(validator, mutated(mutate)) == []


def test_extension_descriptions_are_marked(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]
    extensions = {
        ("Upstream", "auth"),
        ("Limit", "requestMinute"),
        *(
            ("Key", name)
            for name in (
                "name",
                "description",
                "notBefore",
                "expiresAt",
                "disabled",
                "limits",
                "models",
                "canShare",
            )
        ),
    }
    for where, name in extensions:
        assert "dialproxy extension:" in defs[where]["properties"][name]["description"]
    assert "dialproxy extension:" in schema["properties"]["keys"]["description"]
