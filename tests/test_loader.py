"""The loader: golden invalid configs (exact path, a message that names the problem), the
merge, YAML, ${VAR}, aliases, DIAL's limit resolution, and no secret in any problem."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dialproxy.config.grants import resolve_grant
from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Limit, Model, Pricing, Problem, Role, Snapshot
from dialproxy.config.parse import Source
from dialproxy.config.schema import schema, schema_valid
from dialproxy.errors import ConfigError
from dialproxy.text import fingerprint
from tests.samples import EXAMPLE_ENV, SECRET, base_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"

KEY = f"$.keys.<key {fingerprint(SECRET)}>"
UPSTREAM_KEY = "upstream-secret-6f1d0c2b"
ENV = {"UPSTREAM_KEY": UPSTREAM_KEY}


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mutated(mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    config = base_config()
    mutate(config)
    return config


def source(config: dict[str, Any] | bytes | str, name: str = "aidial.config.json") -> Source:
    if isinstance(config, dict):
        return Source(name, json.dumps(config).encode())
    return Source(name, config.encode() if isinstance(config, str) else config)


def problems_of(*sources: Source, env: dict[str, str] | None = None) -> list[Problem]:
    """Every problem (errors and warnings) of building these sources."""
    try:
        return list(build_snapshot(sources, ENV if env is None else env).warnings)
    except ConfigError as e:
        return list(e.problems)


def problems(
    config: dict[str, Any] | bytes | str, name: str = "aidial.config.json"
) -> list[Problem]:
    return problems_of(source(config, name))


def build(*configs: dict[str, Any], env: dict[str, str] | None = None) -> Snapshot:
    sources = [source(c, f"{i}.json") for i, c in enumerate(configs)]
    return build_snapshot(sources, ENV if env is None else env)


def the_problem(found: Sequence[Problem]) -> Problem:
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_base_config_is_valid_without_problems() -> None:
    snapshot = build(base_config())
    assert snapshot.warnings == ()
    assert set(snapshot.models) == {"m"}
    assert snapshot.key_for_secret(SECRET) is not None


# --- files that cannot be read as a config --------------------------------------------------


def test_invalid_json_gives_line_and_column() -> None:
    text = '{\n  "models": {\n    "m": {"type": "chat"},\n  }\n}\n'
    p = the_problem(problems(text))
    assert (p.file, p.path, p.severity) == ("aidial.config.json", "$", "error")
    assert p.message.startswith("invalid JSON at line 4, column 3:")
    assert "property name" in p.message


def test_empty_json_file() -> None:
    p = the_problem(problems(b""))
    assert p.path == "$"
    assert p.message.startswith("invalid JSON at line 1, column 1")


def test_invalid_yaml_gives_line_and_column() -> None:
    p = the_problem(problems("models:\n  m: [chat, completion\nkeys: {}\n", "c.yaml"))
    assert (p.file, p.path, p.severity) == ("c.yaml", "$", "error")
    assert p.message.startswith("invalid YAML at line 3, column 5:")


@pytest.mark.parametrize(
    ("text", "name", "kind"),
    [
        ("[1, 2]", "c.json", "an array"),
        ('"models"', "c.json", "a string"),
        ("42", "c.json", "a number"),
        ("- models\n- keys\n", "c.yaml", "an array"),
        ("just text\n", "c.yml", "a string"),
    ],
)
def test_top_level_must_be_an_object(text: str, name: str, kind: str) -> None:
    p = the_problem(problems(text, name))
    assert p.path == "$"
    assert p.message == f"the config must be a JSON object, not {kind}"


def test_nan_and_infinity_are_not_json() -> None:
    assert "NaN is not a JSON number" in the_problem(problems('{"a": NaN}')).message
    assert "Infinity" in the_problem(problems('{"a": -Infinity}')).message


def test_not_utf8() -> None:
    p = the_problem(problems(b'{"models": {}}\n\xff\xfe'))
    assert p.message == "not UTF-8 text (line 2, byte 15)"


def test_a_lone_surrogate_is_refused_where_it_is() -> None:
    """JSON's and YAML's \\u escapes can name half of a pair, which no UTF-8 text (a log
    line, a Redis key, a ledger row) can carry: one in a project stopped every later write
    of the usage ledger.  A pair is one character, and fine."""
    config = mutated(lambda c: c["keys"][SECRET].update(project="team\ud800", name="\ud83d\ude00"))
    p = the_problem(problems(json.dumps(config)))
    assert (p.path, p.severity) == (f"{KEY}.project", "error")
    assert p.message == "not valid Unicode: a lone surrogate (\\ud800) cannot be UTF-8 text"
    model = '"m": {"type": "chat", "endpoint": "http://localhost:7001/x"}'
    yaml_text = f'models: {{"\\udc00x": {{"type": "chat"}}, {model}}}\nkeys: {{}}\n'
    found = problems(yaml_text, "c.yaml")
    assert [(p.path, p.message) for p in found if "surrogate" in p.message] == [
        (
            '$.models["\\udc00x"]',
            "not valid Unicode: a lone surrogate (\\udc00) cannot be UTF-8 text",
        )
    ]


def test_a_lone_surrogate_from_a_variable_is_refused() -> None:
    env = {**ENV, "PROJECT": "p\udcff"}  # (a non-UTF-8 byte in the environment: surrogateescape)
    found = problems_of(
        source(mutated(lambda c: c["keys"][SECRET].update(project="${PROJECT}"))), env=env
    )
    p = the_problem(found)
    assert (p.path, p.message) == (
        f"{KEY}.project",
        "not valid Unicode: a lone surrogate (\\udcff) cannot be UTF-8 text",
    )


def test_an_empty_yaml_file_is_an_empty_config() -> None:
    snapshot = build_snapshot([Source("empty.yaml", b"")], {})
    assert not snapshot.models and not snapshot.keys and snapshot.warnings == ()


def test_other_files_are_still_checked_when_one_cannot_be_read() -> None:
    found = problems_of(
        source("{", "a.json"), source(mutated(lambda c: c["models"]["m"].pop("endpoint")))
    )
    assert [(p.file, p.path) for p in found] == [("a.json", "$")]
    found = problems_of(source("{", "a.json"), source({"models": {"m": {"key": "${NOPE}"}}}))
    assert [p.message for p in found][1:] == ["environment variable NOPE is not set"]


# --- unknown fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "path", "field", "kind"),
    [
        (lambda c: c["models"]["m"].update(bogus=1), "$.models.m", "bogus", "a model"),
        (lambda c: c["keys"][SECRET].update(projct="p"), KEY, "projct", "a key"),
        (lambda c: c["roles"]["r"].update(limit={}), "$.roles.r", "limit", "a role"),
        (
            lambda c: c["roles"]["r"]["limits"]["m"].update(hour="5"),
            "$.roles.r.limits.m",
            "hour",
            "a limit",
        ),
        (
            lambda c: c["models"]["m"]["upstreams"][0].update(weigth=2),
            "$.models.m.upstreams[0]",
            "weigth",
            "an upstream",
        ),
        (
            lambda c: c["models"]["m"]["pricing"].update(currency="EUR"),
            "$.models.m.pricing",
            "currency",
            "pricing",
        ),
        (
            lambda c: c["roles"]["r"].update(costLimit={"hour": "1"}),
            "$.roles.r.costLimit",
            "hour",
            "a cost limit",
        ),
    ],
)
def test_unknown_field(
    mutate: Callable[[dict[str, Any]], object], path: str, field: str, kind: str
) -> None:
    p = the_problem(problems(mutated(mutate)))
    assert (p.path, p.severity) == (path, "error")
    assert p.message.startswith(f'unknown field "{field}" in {kind}')


def test_unknown_field_suggests_the_close_name() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"]["upstreams"][0].update(weigth=2))))
    assert p.message == 'unknown field "weigth" in an upstream; did you mean "weight"?'


def test_unknown_top_level_sections_are_accepted() -> None:
    config = mutated(lambda c: c.update(applicationTypeSchemas=[{"$id": "x"}], future={"a": 1}))
    assert problems(config) == []


# --- keys ----------------------------------------------------------------------------------


def test_key_without_project() -> None:
    p = the_problem(problems(mutated(lambda c: c["keys"][SECRET].pop("project"))))
    assert (p.path, p.severity, p.message) == (KEY, "error", 'a key needs "project"')


def test_key_with_empty_project() -> None:
    p = the_problem(problems(mutated(lambda c: c["keys"][SECRET].update(project=""))))
    assert (p.path, p.message) == (f"{KEY}.project", "must not be empty")


@pytest.mark.parametrize("entry", [{"project": "p"}, {"project": "p", "roles": []}])
def test_key_without_any_role(entry: dict[str, Any]) -> None:
    found = problems(mutated(lambda c: c["keys"].update({SECRET: entry})))
    p = next(p for p in found if p.path == KEY)
    assert p.severity == "error"
    assert p.message == "a key needs at least one role: set `role` or a non-empty `roles`"


def test_key_with_role_and_empty_roles_is_valid() -> None:
    assert problems(mutated(lambda c: c["keys"][SECRET].update(roles=[]))) == []


def test_key_role_that_no_role_defines_is_a_warning() -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"][SECRET] = {"project": "p", "role": "nobody", "roles": ["r", "ghost"]}

    found = problems(mutated(mutate))
    assert [(p.path, p.severity, p.message) for p in found] == [
        (f"{KEY}.role", "warning", 'role "nobody" is not defined in roles'),
        (f"{KEY}.roles[1]", "warning", 'role "ghost" is not defined in roles'),
    ]


def test_the_default_role_needs_no_definition() -> None:
    assert problems(mutated(lambda c: c["keys"][SECRET].update(role="default"))) == []


@pytest.mark.parametrize(
    "weak",
    ["0123456789", "password-password", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "deadbeefdeadbeef"],
)
def test_weak_key_is_a_warning(weak: str) -> None:
    found = problems(mutated(lambda c: c["keys"].update({weak: {"project": "q", "role": "r"}})))
    p = the_problem(found)
    assert (p.path, p.severity) == (f"$.keys.<key {sha256(weak)[:8]}>", "warning")
    assert "less than 128 bits of entropy" in p.message
    assert weak not in p.path + p.message


@pytest.mark.parametrize(
    "strong",
    [
        SECRET,
        "dpk_" + "Ab3" * 14 + "x",
        "550e8400-e29b-41d4-a716-446655440000aa",
        "sha256:" + sha256("anything"),
    ],
)
def test_strong_keys_are_not_warned(strong: str) -> None:
    config = {"keys": {strong: {"project": "q", "role": "default"}}}
    assert problems(config) == []


def test_key_named_by_an_invalid_digest() -> None:
    name = "sha256:ABCDEF"
    p = the_problem(
        problems(mutated(lambda c: c["keys"].update({name: {"project": "q", "role": "r"}})))
    )
    assert (p.path, p.severity) == (f"$.keys.<key {sha256(name)[:8]}>", "error")
    assert "64 lowercase hex digits" in p.message


def test_empty_key() -> None:
    p = the_problem(
        problems(mutated(lambda c: c["keys"].update({"": {"project": "q", "role": "r"}})))
    )
    assert (p.path, p.message) == (f"$.keys.<key {fingerprint('')}>", "a key must not be empty")


def test_duplicate_key_across_two_files() -> None:
    first = base_config()
    second = {"keys": {SECRET: {"project": "other", "role": "r"}}}
    found = problems_of(source(first, "a.json"), source(second, "b.json"))
    p = the_problem(found)
    assert (p.file, p.path, p.severity) == ("b.json", KEY, "error")
    assert p.message == "the same key is already defined in a.json"


def test_duplicate_key_as_plain_and_as_digest() -> None:
    digest = "sha256:" + sha256(SECRET)
    second = {"keys": {digest: {"project": "other", "role": "r"}}}
    p = the_problem(problems_of(source(base_config(), "a.json"), source(second, "b.json")))
    assert (p.file, p.path) == ("b.json", KEY)
    assert "already defined in a.json" in p.message
    same_file = mutated(lambda c: c["keys"].update({digest: {"project": "q", "role": "r"}}))
    p = the_problem(problems(same_file))
    assert (p.path, p.message) == (KEY, "the same key is already defined in aidial.config.json")


def test_duplicate_key_in_one_json_file() -> None:
    text = json.dumps(base_config()).replace(
        f'"{SECRET}": {{', f'"{SECRET}": {{"project": "x", "role": "r"}}, "{SECRET}": {{', 1
    )
    p = the_problem(problems(text))
    assert (p.path, p.severity, p.message) == (
        KEY,
        "error",
        "the same key is defined twice in this file",
    )


def test_a_field_given_twice_is_a_warning() -> None:
    text = '{"models": {"m": {"type": "chat", "type": "embedding", "endpoint": "http://h/x"}}}'
    p = the_problem(problems(text))
    assert (p.path, p.severity) == ("$.models.m", "warning")
    assert p.message == 'field "type" is given twice; the last one is used'


def test_bad_ip_range_and_dates() -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["keys"][SECRET].update(
            allowedIpAddressRanges=["10.0.0.0/8", "10.0.0.300/8"],
            notBefore="2026-01-01T00:00:00Z",
            expiresAt="2025-02-30T00:00:00Z",
        )

    found = problems(mutated(mutate))
    assert [(p.path, p.message) for p in found] == [
        (f"{KEY}.allowedIpAddressRanges[1]", "not a valid IP address range (CIDR)"),
        (f"{KEY}.expiresAt", "not a valid date-time"),
    ]
    c = mutated(
        lambda c: c["keys"][SECRET].update(
            notBefore="2026-01-01T00:00:00Z", expiresAt="2025-01-01T00:00:00+00:00"
        )
    )
    p = the_problem(problems(c))
    assert (p.path, p.severity) == (f"{KEY}.expiresAt", "warning")


# --- roles and limits ----------------------------------------------------------------------


def test_limit_that_is_not_an_integer() -> None:
    p = the_problem(
        problems(mutated(lambda c: c["roles"]["r"]["limits"]["m"].update(minute="abc")))
    )
    assert (p.path, p.severity) == ("$.roles.r.limits.m.minute", "error")
    assert p.message == (
        'must be an integer or an integer written as a string, such as "100000" (got "abc")'
    )


@pytest.mark.parametrize("value", ["1.5", 1.5, True, None, "", " 10", "99999999999999999999"])
def test_other_bad_limit_values(value: Any) -> None:
    p = the_problem(problems(mutated(lambda c: c["roles"]["r"]["limits"]["m"].update(day=value))))
    assert p.path == "$.roles.r.limits.m.day"
    assert p.message.startswith("must be an integer")


def test_a_deployment_name_with_a_control_character_is_an_error() -> None:
    """Sent to an adapter in X-DIAL-DEPLOYMENT-ID: aiohttp refuses such a header value (every
    request to it answered 500)."""

    def mutate(c: dict[str, Any]) -> None:
        c["models"]["a\x01b"] = c["models"]["m"]

    found = [p for p in problems(mutated(mutate)) if p.severity == "error"]
    assert [(p.path, p.message) for p in found] == [
        (
            '$.models["a\\u0001b"]',
            "a deployment name is sent as a header value: no control characters",
        )
    ]


def test_limit_naming_an_undefined_model_is_a_warning() -> None:
    p = the_problem(problems(mutated(lambda c: c["roles"]["r"]["limits"].update(gpt5={}))))
    assert (p.path, p.severity) == ("$.roles.r.limits.gpt5", "warning")
    assert p.message.startswith(
        'no model (or application, addon, assistant, toolset, route) "gpt5"'
    )


@pytest.mark.parametrize(
    "section",
    [
        {"applications": {"app": {"endpoint": "http://localhost:7001/app"}}},
        {"addons": {"app": {"endpoint": "http://localhost:7010/search"}}},
        {"toolsets": {"app": {"endpoint": "http://git-mcp/call"}}},
        {"assistant": {"endpoint": "http://h/a", "assistants": {"app": {"prompt": "p"}}}},
        # a route: its entry counts the route's request windows
        {"routes": {"app": {"paths": ["/v1/vs/.*"], "response": {"status": 200}}}},
    ],
)
def test_limit_naming_another_deployment_is_not_warned(section: dict[str, Any]) -> None:
    def mutate(c: dict[str, Any]) -> None:
        c.update(section)
        c["roles"]["r"]["limits"]["app"] = {}

    assert problems(mutated(mutate)) == []


def test_pricing_that_is_not_a_string() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"]["pricing"].update(prompt=0.5))))
    assert (p.path, p.severity) == ("$.models.m.pricing.prompt", "error")
    assert "decimal number written as a string" in p.message
    assert "(got 0.5)" in p.message


def test_pricing_unit() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"]["pricing"].update(unit="tokens"))))
    assert (p.path, p.message) == (
        "$.models.m.pricing.unit",
        'must be one of "token", "char_without_whitespace", "none" (got "tokens")',
    )


def test_model_user_role_that_no_role_defines_is_a_warning() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"].update(userRoles=["r", "nobody"]))))
    assert (p.path, p.severity, p.message) == (
        "$.models.m.userRoles[1]",
        "warning",
        'role "nobody" is not defined in roles',
    )
    p = the_problem(problems(mutated(lambda c: c["models"]["m"].update(user_roles=["ghost"]))))
    assert p.path == "$.models.m.user_roles[0]"


# --- models, upstreams, URLs ---------------------------------------------------------------


def test_model_type() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"].update(type="chatt"))))
    assert (p.path, p.message) == (
        "$.models.m.type",
        'must be chat, completion or embedding (got "chatt")',
    )


def test_model_with_neither_endpoint_nor_upstreams() -> None:
    def mutate(c: dict[str, Any]) -> None:
        del c["models"]["m"]["endpoint"]
        c["models"]["m"]["upstreams"] = []

    p = the_problem(problems(mutated(mutate)))
    assert (p.path, p.severity) == ("$.models.m", "error")
    assert p.message == "a model needs an `endpoint`, `interfaces` or an upstream"


def test_model_with_only_interfaces_is_servable() -> None:
    model = {"type": "chat", "interfaces": {"openaiChatCompletions": {"base_url": "http://h"}}}
    assert problems({"models": {"m": model}}) == []


@pytest.mark.parametrize("upstreams", [[], [{"endpoint": "http://u"}]])
def test_model_serving_no_proxied_interface_is_a_warning(upstreams: list[Any]) -> None:
    model = {
        "type": "chat",
        "interfaces": {"anthropicMessages": {"mode": "translator"}},
        "upstreams": upstreams,
    }
    found = problems({"models": {"m": model}})
    assert [(p.path, p.severity) for p in found] == [
        ("$.models.m.interfaces.anthropicMessages.mode", "warning"),
        ("$.models.m", "warning"),
    ]
    assert "503" in found[1].message
    assert build({"models": {"m": model}}).models["m"].serving == {}


def test_anthropic_and_responses_interfaces_serve_their_apis() -> None:
    model = {
        "type": "chat",
        "interfaces": {
            "anthropicMessages": {"base_url": "http://a/"},
            "openaiResponses": {"base_url": "http://r"},
        },
    }
    assert problems({"models": {"m": model}}) == []
    serving = build({"models": {"m": model}}).models["m"].serving
    assert set(serving) == {"messages", "messages/count_tokens", "responses"}
    assert [(r.url, r.append_path) for r in serving["messages"].routes] == [("http://a", True)]
    assert [(r.url, r.append_path) for r in serving["responses"].routes] == [("http://r", True)]


def test_empty_interfaces_with_upstreams_is_a_direct_model() -> None:
    model = {"type": "chat", "interfaces": {}, "upstreams": [{"endpoint": "http://u"}]}
    assert problems({"models": {"m": model}}) == []
    assert build({"models": {"m": model}}).models["m"].direct


@pytest.mark.parametrize(
    ("entry", "path", "words"),
    [
        ({}, "$.models.m.interfaces.openaiChatCompletions", "no `base_url`"),
        (
            {"base_url": "http://h", "overridePaths": {"postAzureOpenaiChatCompletions": "/x"}},
            "$.models.m.interfaces.openaiChatCompletions.overridePaths",
            "does not apply overridePaths",
        ),
        (
            {"mode": "translator", "translator": "t"},
            "$.models.m.interfaces.openaiChatCompletions.mode",
            "translators",
        ),
        (
            {"base_url": "http://h", "defaultHeaders": {"Connection": "close"}},
            "$.models.m.interfaces.openaiChatCompletions.defaultHeaders.Connection",
            "never forwarded",
        ),
    ],
)
def test_interface_entries_dialproxy_does_not_serve_as_written_warn(
    entry: dict[str, Any], path: str, words: str
) -> None:
    model = {"endpoint": "http://e", "interfaces": {"openaiChatCompletions": entry}}
    p = the_problem(problems({"models": {"m": model}}))
    assert (p.path, p.severity) == (path, "warning")
    assert words in p.message


@pytest.mark.parametrize("name", ["Api-Key", "authorization", "X-UPSTREAM-KEY", "Host"])
def test_default_headers_the_proxy_owns_are_ignored(name: str) -> None:
    model = {"endpoint": "http://e", "defaultHeaders": {name: "v", "x-custom": "w"}}
    p = the_problem(problems({"models": {"m": model}}))
    assert (p.path, p.severity) == (f"$.models.m.defaultHeaders.{name}", "warning")
    snapshot = build({"models": {"m": model}})
    assert dict(snapshot.models["m"].serving["chat/completions"].default_headers) == {
        "x-custom": "w"
    }


def test_unknown_interface_type_is_an_error() -> None:
    model = {"endpoint": "http://e", "interfaces": {"openaiChat": {"base_url": "http://h"}}}
    p = the_problem(problems({"models": {"m": model}}))
    assert (p.path, p.severity) == ("$.models.m.interfaces", "error")
    assert "openaiChat" in p.message


def test_pricing_unit_none_counts_no_cost() -> None:
    model = {"endpoint": "http://e", "pricing": {"unit": "none", "prompt": "1", "completion": "1"}}
    snapshot = build({"models": {"m": model}})
    assert snapshot.models["m"].pricing is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://localhost/x", "must be an http:// or https:// URL with a host"),
        ("file:///etc/passwd", "must be an http:// or https:// URL with a host"),
        ("http:///nohost", "must be an http:// or https:// URL with a host"),
        ("https://user:hunter2@localhost/x", "must not carry credentials"),
        ("https://localhost:99999/x", "not a valid URL"),
        ("http://localhost/x\r\nX-Injected: 1", "contains control characters"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    endpoint = the_problem(problems(mutated(lambda c: c["models"]["m"].update(endpoint=url))))
    assert (endpoint.path, endpoint.severity) == ("$.models.m.endpoint", "error")
    assert endpoint.message.startswith(message)
    upstream = the_problem(
        problems(mutated(lambda c: c["models"]["m"]["upstreams"][0].update(endpoint=url)))
    )
    assert (upstream.path, upstream.severity) == ("$.models.m.upstreams[0].endpoint", "error")
    assert upstream.message.startswith(message)
    assert "hunter2" not in endpoint.message + upstream.message


def test_not_a_url_at_all() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"].update(endpoint="localhost:7001"))))
    assert p.path == "$.models.m.endpoint"
    assert p.message.startswith("must be an http:// or https:// URL")


def test_feature_endpoint_with_credentials() -> None:
    url = "https://admin:hunter2@host/rate"
    p = the_problem(
        problems(mutated(lambda c: c["models"]["m"].update(features={"rateEndpoint": url})))
    )
    assert p.path == "$.models.m.features.rateEndpoint"
    assert p.message.startswith("must not carry credentials")


def test_upstream_key_with_a_control_character() -> None:
    p = the_problem(
        problems(mutated(lambda c: c["models"]["m"]["upstreams"][0].update(key="abc\r\ndef")))
    )
    assert (p.path, p.severity) == ("$.models.m.upstreams[0].key", "error")
    assert p.message == "contains control characters (it is sent as a header value)"


def test_upstream_with_base_url_but_no_endpoint() -> None:
    up = {"id": "fireworks", "baseUrl": "https://api.fireworks.ai/inference", "key": "k"}
    p = the_problem(problems(mutated(lambda c: c["models"]["m"]["upstreams"].append(up))))
    assert (p.path, p.severity) == ("$.models.m.upstreams[1]", "error")
    assert p.message.startswith('an upstream needs "endpoint"')
    assert "baseUrl" in p.message


def test_all_weights_disabled_is_a_warning() -> None:
    p = the_problem(problems(mutated(lambda c: c["models"]["m"]["upstreams"][0].update(weight=0))))
    assert (p.path, p.severity) == ("$.models.m.upstreams", "warning")


def test_every_problem_is_reported_at_once() -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"]["bogus"] = 1
        c["models"]["m"]["pricing"]["completion"] = 2
        c["roles"]["r"]["limits"]["m"]["minute"] = "abc"
        c["keys"][SECRET]["role"] = "ghost"
        c["models"]["m"]["upstreams"][0]["endpoint"] = "ftp://h"

    found = problems(mutated(mutate))
    assert sorted((p.path, p.severity) for p in found) == [
        (f"{KEY}.role", "warning"),
        ("$.models.m", "error"),
        ("$.models.m.pricing.completion", "error"),
        ("$.models.m.upstreams[0].endpoint", "error"),
        ("$.roles.r.limits.m.minute", "error"),
    ]


# --- ${VAR} ---------------------------------------------------------------------------------


def test_env_substitution() -> None:
    config = mutated(
        lambda c: c["models"]["m"].update(
            endpoint="http://${HOST}:${PORT}/chat", displayName="$HOST"
        )
    )
    snapshot = build_snapshot([source(config)], {**ENV, "HOST": "example.com", "PORT": "81"})
    model = snapshot.models["m"]
    assert model.endpoint == "http://example.com:81/chat"
    assert model.upstreams[0].key == UPSTREAM_KEY
    assert model.display_name == "$HOST"  # only ${NAME} is a reference


def test_env_substitution_in_a_key_name() -> None:
    client = "client-secret-from-env-5e0f2a9c7b1d"
    config = {"keys": {"${CLIENT_KEY}": {"project": "p", "role": "default"}}}
    snapshot = build_snapshot([source(config)], {"CLIENT_KEY": client})
    assert snapshot.key_for_secret(client) is not None
    assert snapshot.key_for_secret("${CLIENT_KEY}") is None


def test_unset_variable_is_reported_at_the_string_that_uses_it() -> None:
    p = the_problem(problems_of(source(base_config()), env={}))
    assert (p.path, p.severity) == ("$.models.m.upstreams[0].key", "error")
    assert p.message == "environment variable UPSTREAM_KEY is not set"


def test_unset_variable_in_a_key_name() -> None:
    config = mutated(lambda c: c["keys"].update({"${CLIENT_KEY}": {"project": "p", "role": "r"}}))
    p = the_problem(problems(config))
    assert (p.path, p.message) == (
        '$.keys["${CLIENT_KEY}"]',
        "environment variable CLIENT_KEY is not set",
    )
    config = mutated(lambda c: c["keys"].update({"sk-${SUFFIX}": {"project": "p", "role": "r"}}))
    p = the_problem(problems(config))
    assert (p.path, p.message) == (
        f"$.keys.<key {fingerprint('sk-${SUFFIX}')}>",
        "environment variable SUFFIX is not set",
    )


def test_unset_variables_are_each_reported_once_without_follow_on_problems() -> None:
    config = mutated(lambda c: c["models"]["m"].update(endpoint="${SCHEME}://${HOST}/x/${HOST}"))
    found = problems(config)
    assert [(p.path, p.message) for p in found] == [
        ("$.models.m.endpoint", "environment variable SCHEME is not set"),
        ("$.models.m.endpoint", "environment variable HOST is not set"),
    ]


# --- merging several files -------------------------------------------------------------------


def test_merge_objects_by_key_arrays_concatenated_later_scalars_win() -> None:
    first = base_config()
    first["retriableErrorCodes"] = [500]
    second = {
        "models": {
            "m": {
                "displayName": "M (second)",
                "upstreams": [{"endpoint": "http://localhost:7002", "key": "k2"}],
            },
            "n": {"type": "embedding", "endpoint": "http://localhost:7003/embeddings"},
        },
        "roles": {"r": {"limits": {"m": {"minute": "5"}}}},
        "retriableErrorCodes": [501],
    }
    snapshot = build(first, second)
    assert list(snapshot.models) == ["m", "n"]
    m = snapshot.models["m"]
    assert m.display_name == "M (second)"
    assert m.type == "chat"  # kept from the first file
    assert [u.endpoint for u in m.upstreams] == ["http://localhost:7001", "http://localhost:7002"]
    assert snapshot.roles["r"].limits["m"] == Limit(minute=5, day=1_000_000)
    assert snapshot.retriable_codes == {429, 500, 501, 502, 503, 504}


def test_a_problem_is_located_in_the_file_and_at_the_index_it_came_from() -> None:
    second: dict[str, Any] = {"models": {"m": {"upstreams": [{"endpoint": "ftp://bad"}]}}}
    p = the_problem(problems_of(source(base_config(), "a.json"), source(second, "b.json")))
    assert (p.file, p.path) == ("b.json", "$.models.m.upstreams[0].endpoint")
    first = mutated(lambda c: c["models"]["m"].update(bogus=True))
    second = {"models": {"m": {"displayName": "M"}}}
    p = the_problem(problems_of(source(first, "a.json"), source(second, "b.json")))
    assert (p.file, p.path) == ("a.json", "$.models.m")


def test_a_later_scalar_replaces_an_earlier_object() -> None:
    second = {"roles": {"r": {"limits": {"m": "none"}}}}
    p = the_problem(problems_of(source(base_config(), "a.json"), source(second, "b.json")))
    assert (p.file, p.path) == ("b.json", "$.roles.r.limits.m")
    assert p.message == 'must be an object (got "none")'


def test_split_example_merges_into_one_config() -> None:
    sources = [
        Source(str(p), p.read_bytes())
        for p in (CONFIG_DIR / "split" / "models.json", CONFIG_DIR / "split" / "keys.json")
    ]
    snapshot = build_snapshot(sources, EXAMPLE_ENV)
    assert set(snapshot.models) == {"gpt-4o-mini", "llama-3.1-8b"}
    assert len(snapshot.keys) == 2
    assert snapshot.warnings == ()


# --- YAML ----------------------------------------------------------------------------------


def test_yaml_is_equivalent_to_json() -> None:
    config = mutated(lambda c: c["keys"][SECRET].update(expiresAt="2030-01-01T00:00:00Z"))
    from_json = build_snapshot([source(config, "c.json")], ENV)
    for name in ("c.yaml", "c.yml"):
        from_yaml = build_snapshot([source(yaml.safe_dump(config), name)], ENV)
        assert from_yaml.digest == from_json.digest
        assert from_yaml.models == from_json.models
        assert from_yaml.keys == from_json.keys
        assert from_yaml.roles == from_json.roles


def test_yaml_as_people_write_it() -> None:
    text = f"""
defaults: &fast {{minute: "100000", day: 1000000}}
models:
  m:
    type: chat
    endpoint: http://localhost:7001/openai/deployments/m/chat/completions
    upstreams:
      - endpoint: http://localhost:7001
        key: ${{UPSTREAM_KEY}}
keys:
  {SECRET}:
    project: p
    role: r
    expiresAt: 2030-01-01T00:00:00Z   # unquoted: stays the string that was written
roles:
  r:
    limits:
      m: *fast
"""
    snapshot = build_snapshot([source(text, "c.yaml")], ENV)
    key = snapshot.key_for_secret(SECRET)
    assert key is not None and key.expires_at is not None and key.expires_at.year == 2030
    assert snapshot.roles["r"].limits["m"] == Limit(minute=100_000, day=1_000_000)
    assert snapshot.raw["keys"][SECRET]["expiresAt"] == "2030-01-01T00:00:00Z"


def test_yaml_values_json_cannot_hold() -> None:
    found = problems("models: !!set {a, b}\nkeys:\n  1: {project: p, role: r}\nx: .nan\n", "c.yaml")
    assert [(p.path, p.message) for p in found] == [
        ("$.models", "a YAML set value has no JSON equivalent"),
        ("$.keys", "a field name must be a string (quote the YAML key 1)"),
        ("$.x", "not a finite number"),
    ]


def test_yaml_alias_bomb_is_refused() -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    p = the_problem(problems("\n".join(lines) + "\n", "bomb.yaml"))
    assert "expands to more than" in p.message


def test_yaml_duplicate_key() -> None:
    entry = "{project: p, role: default}"
    text = f"keys:\n  {SECRET}: {entry}\n  {SECRET}: {entry}\n"
    p = the_problem(problems(text, "c.yaml"))
    assert (p.path, p.message) == (KEY, "the same key is defined twice in this file")


def test_deep_nesting_is_refused() -> None:
    deep = '{"models": {"m": {"endpoint": "http://h/x", "defaults": '
    deep += '{"a": ' * 100 + "1" + "}" * 100 + "}}}"
    p = the_problem(problems(deep))
    assert p.message == "nested more than 64 levels deep"
    p = the_problem(problems("[" * 100_000 + "]" * 100_000))
    assert p.message == "invalid JSON: nested too deeply"


# --- aliases and newer DIAL fields ---------------------------------------------------------


def test_snake_case_aliases_give_the_same_model() -> None:
    camel = {
        "type": "chat",
        "endpoint": "http://localhost:7001/x",
        "displayName": "M",
        "displayVersion": "1",
        "iconUrl": "https://host/m.svg",
        "userRoles": ["r"],
        "forwardAuthToken": True,
        "inputAttachmentTypes": ["image/png"],
        "maxInputAttachments": 3,
        "descriptionKeywords": ["chat"],
        "overrideName": "m-v1",
        "maxRetryAttempts": 2,
        "createdAt": 1672534800000,
        "updatedAt": "2024-01-01",
    }
    snake_names = {
        "displayName": "display_name",
        "displayVersion": "display_version",
        "iconUrl": "icon_url",
        "userRoles": "user_roles",
        "forwardAuthToken": "forward_auth_token",
        "inputAttachmentTypes": "input_attachment_types",
        "maxInputAttachments": "max_input_attachments",
        "descriptionKeywords": "description_keywords",
        "overrideName": "override_name",
        "maxRetryAttempts": "max_retry_attempts",
        "createdAt": "created_at",
        "updatedAt": "updated_at",
    }
    snake = {snake_names.get(k, k): v for k, v in camel.items()}
    roles: dict[str, Any] = {"r": {}}
    a = build({"models": {"m": camel}, "roles": roles})
    b = build({"models": {"m": snake}, "roles": roles})
    assert a.warnings == b.warnings == ()
    assert a.models["m"] == b.models["m"]
    model = a.models["m"]
    assert (model.display_name, model.override_name, model.max_retry_attempts) == ("M", "m-v1", 2)
    assert model.forward_auth_token is True
    assert model.user_roles == frozenset({"r"})


def test_an_alias_and_its_camel_case_name_together() -> None:
    p = the_problem(
        problems(mutated(lambda c: c["models"]["m"].update(displayName="a", display_name="b")))
    )
    assert (p.path, p.severity) == ("$.models.m.display_name", "error")
    assert "alias of `displayName`" in p.message


def test_newer_dial_fields_are_accepted() -> None:
    def mutate(c: dict[str, Any]) -> None:
        c["models"]["m"].update(
            {
                "interfaces": {
                    "openaiChatCompletions": {"base_url": "http://localhost:7005"},
                    "openaiResponses": {"base_url": "http://localhost:7005"},
                },
                "responsesEndpoint": "http://localhost:7001/openai/deployments/m/responses",
                "intro": {"en": "Hello", "de": "Hallo"},
                "dependencies": ["other-model"],
                "displayName": {"de": "Modell", "en": "Model"},
                "description": {"fr": "Un modèle"},
                "created_at": 1672534800000,
                "updated_at": 1672534800000,
            }
        )
        c["models"]["m"]["upstreams"][0].update(
            {
                "id": "primary",
                "baseUrl": "https://api.example.com/inference",
                "interfaces": {"anthropicMessages": {"endpoint": "https://h/v1/messages"}},
            }
        )

    snapshot = build(mutated(mutate))
    assert snapshot.warnings == ()
    assert snapshot.models["m"].display_name == "Model"
    assert snapshot.models["m"].description == "Un modèle"


def test_the_dial_sample_validates_unchanged() -> None:
    path = CONFIG_DIR / "dial-sample.json"
    snapshot = build_snapshot([Source(str(path), path.read_bytes())], EXAMPLE_ENV)
    assert snapshot.warnings == ()
    assert {"chat-gpt-35-turbo", "gpt-4", "embedding-ada"} <= set(snapshot.models)


@pytest.mark.parametrize(
    "path",
    [*sorted(CONFIG_DIR.glob("*.json")), ROOT / "aidial.config.json"],
    ids=lambda p: p.name,
)
def test_shipped_configs_have_no_problem(path: Path) -> None:
    snapshot = build_snapshot([Source(str(path), path.read_bytes())], EXAMPLE_ENV)
    assert snapshot.warnings == ()
    assert snapshot.models and snapshot.keys


REPLACEMENTS: list[Any] = [
    "",
    "x",
    "-5",
    "1.5",
    0,
    -1,
    1.5,
    2.0,
    True,
    None,
    [],
    {},
    ["x"],
    {"x": 1},
]


@pytest.mark.parametrize("name", ["base", "azure.json"])
def test_the_fast_schema_check_agrees_with_jsonschema(name: str) -> None:
    """Every value of a config replaced, in turn, by each kind of value: the same verdict.

    (tests/test_loader_property.py does the same on random mutations.)"""
    validator = jsonschema.Draft202012Validator(schema())
    config = base_config() if name == "base" else json.loads((CONFIG_DIR / name).read_text())
    checked = 0

    def walk(node: Any) -> None:
        nonlocal checked
        slots = list(node) if isinstance(node, dict) else range(len(node))
        for slot in slots:
            original = node[slot]
            for replacement in REPLACEMENTS:
                node[slot] = replacement
                assert schema_valid(config) == validator.is_valid(config), (slot, replacement)
                checked += 1
            node[slot] = original
            if isinstance(original, dict | list):
                walk(original)

    assert schema_valid(config) and validator.is_valid(config)
    walk(config)
    assert checked > 300


# --- DIAL's limit resolution -----------------------------------------------------------------


def limits_config() -> dict[str, Any]:
    chat = {"type": "chat", "endpoint": "http://localhost:7001/x"}
    return {
        "models": {
            "open": dict(chat),
            "picky": dict(chat, userRoles=["a"]),
            "nobody": dict(chat, userRoles=[]),
            "free": dict(chat),
        },
        "roles": {
            "default": {"limits": {"open": {"minute": "10", "day": "100"}}},
            "a": {
                "limits": {
                    "open": {"minute": "100", "day": "1000", "requestHour": "5"},
                    "picky": {"minute": "100", "day": "1000"},
                },
                "costLimit": {"day": "10", "month": "100"},
            },
            "b": {
                "limits": {
                    "open": {"minute": "200", "requestHour": "0"},
                    "picky": {"minute": "999999"},
                },
                "costLimit": {"day": "20"},
            },
            "zero": {"limits": {"open": {"minute": 0}}},
            "c": {},
        },
        "keys": {
            sha256_key(name): {"project": name, "roles": roles} for name, roles in KEY_ROLES.items()
        },
    }


KEY_ROLES = {
    "ab": ["a", "b"],
    "a": ["a"],
    "b": ["b"],
    "c": ["c"],
    "zero": ["zero"],
    "zb": ["zero", "b"],
}


def sha256_key(name: str) -> str:
    return "sha256:" + sha256("limits-" + name)


def grants(name: str) -> dict[str, Any]:
    snapshot = build(limits_config())
    key = snapshot.keys[sha256("limits-" + name)]
    return dict(key.access.grants)


def test_each_field_is_the_maximum_over_the_roles() -> None:
    grant = grants("ab")["open"]
    # a: minute 100, day 1000, requestHour 5; b: minute 200, day absent (unlimited), 0 requests
    assert grant.limit == Limit(minute=200, day=None, request_hour=5)
    assert not grant.denied
    limited = [(w.name, w.seconds, w.limit) for w in grant.request_windows if w.limited]
    assert [(w.name, w.limit) for w in grant.token_windows if w.limited] == [("minute", 200)]
    assert limited == [("hour", 3600, 5)]
    # every window of a limited grant is counted (DIAL: its use is known in each)
    assert [w.name for w in grant.token_windows] == ["minute", "day", "week", "month"]
    assert [w.name for w in grant.request_windows] == ["minute", "hour", "day"]


def test_only_the_roles_the_model_admits_count() -> None:
    grant = grants("ab")["picky"]  # userRoles ["a"]: b's 999999 does not count
    assert grant.limit == Limit(minute=100, day=1000)
    assert "picky" not in grants("b")


def test_default_role_when_no_role_has_an_entry() -> None:
    assert grants("c")["open"].limit == Limit(minute=10, day=100)
    assert grants("a")["open"].limit == Limit(minute=100, day=1000, request_hour=5)


def test_no_entry_anywhere_is_unlimited() -> None:
    grant = grants("a")["free"]
    assert grant.limit is None and not grant.denied and grant.token_windows == ()


def test_nobody_may_call_a_model_with_empty_user_roles() -> None:
    assert "nobody" not in grants("ab")


def test_zero_denies_unless_another_role_allows_more() -> None:
    assert grants("zero")["open"].denied
    assert grants("b")["open"].denied  # requestHour "0"
    assert not grants("ab")["open"].denied  # a's requestHour 5 is the maximum


def test_cost_windows_are_the_maximum_and_need_every_role_to_limit() -> None:
    snapshot = build(limits_config())
    ab = snapshot.keys[sha256("limits-ab")].access
    a = snapshot.keys[sha256("limits-a")].access
    assert [(w.name, w.limit) for w in ab.cost_windows if w.limited] == [("day", 20_000_000_000)]
    assert [(w.name, w.limit) for w in a.cost_windows if w.limited] == [
        ("day", 10_000_000_000),
        ("month", 100_000_000_000),
    ]


def test_resolve_grant_directly() -> None:
    model = Model(name="x", type="chat", endpoint="http://h", upstreams=())
    roles = {
        "default": Role("default", {"x": Limit(day=1)}),
        "p": Role("p", {"x": Limit(minute=5)}),
        "q": Role("q", {"x": Limit(minute=7, day=3)}),
    }
    assert resolve_grant(model, frozenset({"p", "q"}), roles).limit == Limit(minute=7)
    assert resolve_grant(model, frozenset({"q"}), roles).limit == Limit(minute=7, day=3)
    assert resolve_grant(model, frozenset({"other"}), roles).limit == Limit(day=1)
    assert resolve_grant(model, frozenset(), {}).limit is None
    denied = resolve_grant(model, frozenset({"z"}), {"z": Role("z", {"x": Limit(day=-1)})})
    assert denied.denied


def test_keys_with_the_same_roles_share_one_access() -> None:
    config = limits_config()
    config["keys"][sha256_key("ab2")] = {"project": "other", "roles": ["b", "a"]}
    snapshot = build(config)
    first = snapshot.keys[sha256("limits-ab")].access
    second = snapshot.keys[sha256("limits-ab2")].access
    assert first is second


def test_costs_and_decimal_pricing() -> None:
    snapshot = build(base_config())
    pricing = snapshot.models["m"].pricing
    assert pricing is not None and pricing.prompt == Decimal("0.5")


# --- no secret in any problem ------------------------------------------------------------------

KEY_SECRETS = [
    "9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c",  # strong, with problems inside its entry
    "weakpass42",  # weak (warned)
    "another-weak-one",
]
UPSTREAM_SECRET = "upstream-S3cr3t-9b8a7c6d"
ENV_SECRET = "env-S3cr3t-Value-1f2e3d4c"
URL_PASSWORD = "urlPa55w0rd-77aa"
SECRETS = [*KEY_SECRETS, UPSTREAM_SECRET, ENV_SECRET, URL_PASSWORD]
SECRET_ENV = {"CLIENT_KEY": ENV_SECRET, "UP": ENV_SECRET}


def leaky_configs() -> list[tuple[str, bytes]]:
    """Configs that hold the secrets above and trigger errors and warnings next to them."""
    s0, s1, s2 = KEY_SECRETS
    full: dict[str, Any] = {
        "models": {
            "m": {
                "type": s0,  # a key secret where a model type should be
                "endpoint": f"ftp://user:{URL_PASSWORD}@host/x",
                "upstreams": [
                    {"endpoint": "http://h", "key": UPSTREAM_SECRET, UPSTREAM_SECRET: 1},
                    {"endpoint": f"https://u:{URL_PASSWORD}@h/", "key": UPSTREAM_SECRET + "\n"},
                    {"endpoint": "http://h", "key": "${UP}", "weight": ENV_SECRET},
                    {"endpoint": "http://h", "key": 12345},
                ],
                "userRoles": [s1],
                "pricing": {"unit": s2, "prompt": UPSTREAM_SECRET},
            }
        },
        "keys": {
            s0: {"project": "p", "role": s0, s0: "field named by the secret", "roles": s1},
            s1: {"project": s2, "role": "default", "expiresAt": s0},
            s2: "not an object",
            "${CLIENT_KEY}": {"project": ["x"], "role": "default"},
            "sha256:" + s0.upper() + s0.upper(): {"project": "p", "role": "default"},
        },
        "roles": {"r": {"limits": {s0: {"minute": s1, "day": "${UP}"}, "m": {s2: 1}}}},
    }
    dup = {
        "keys": {
            s0: {"project": "p", "role": "default"},
            "sha256:" + sha256(s1): {"project": "p", "role": "default"},
        }
    }
    yaml_tail = f"keys:\n  {s0}: {{project: p, role: default}}\n  {s1}: *{s2}\n"
    return [
        ("full.json", json.dumps(full).encode()),
        ("dup.json", json.dumps(dup).encode()),
        ("after-secret.json", f'{{"keys": {{"{s0}": {{"project": "p"}}, "{s1}" }}'.encode()),
        ("after-secret2.json", f'{{"keys": {{"{s0}": {{"project": "{UPSTREAM_SECRET}'.encode()),
        ("alias.yaml", yaml_tail.encode()),
        ("tag.yaml", f"keys:\n  {s0}: !{s1} {{project: p}}\n".encode()),
        ("unclosed.yaml", f'keys:\n  {s0}: {{project: "{UPSTREAM_SECRET}\n'.encode()),
        ("tab.yaml", f"keys:\n  {s0}:\n\t{s1}: 1\n".encode()),
        ("top.json", json.dumps(s0).encode()),
        ("keys-string.json", json.dumps({"keys": s0}).encode()),
        ("keys-list.json", json.dumps({"keys": [s0, UPSTREAM_SECRET]}).encode()),
    ]


def assert_no_secret(found: Sequence[Problem]) -> None:
    for p in found:
        text = f"{p.file} {p.path} {p.message}"
        for secret in SECRETS:
            assert secret.lower() not in text.lower(), (secret, text)
        assert "S3cr3t" not in text and "weakpass" not in text


def test_no_secret_in_any_problem() -> None:
    configs = leaky_configs()
    for name, data in configs:
        assert_no_secret(problems_of(Source(name, data), env=SECRET_ENV))
    full = dict(configs)
    found = problems_of(
        Source("full.json", full["full.json"]), Source("dup.json", full["dup.json"]), env=SECRET_ENV
    )
    assert len(found) >= 20  # the secrets sit next to many problems...
    assert_no_secret(found)  # ...none of which shows them
    assert any("the same key is already defined in full.json" in p.message for p in found)
    assert any(p.path.startswith("$.keys.<key ") for p in found)


def test_secrets_in_snapshot_warnings_and_error_text() -> None:
    s0, s1, _ = KEY_SECRETS
    config = {
        "models": {"m": {"endpoint": "http://h/x", "userRoles": [s1]}},
        "keys": {s1: {"project": "p", "role": s0}, s0: {"project": "p", "role": "default"}},
        "roles": {"r": {"limits": {s1: {}}}},
    }
    snapshot = build_snapshot([source(config)], {})
    assert len(snapshot.warnings) == 4  # weak s1, undefined role s0, user role s1, model s1
    assert_no_secret(snapshot.warnings)
    with pytest.raises(ConfigError) as raised:
        build_snapshot([source(mutated(lambda c: c["keys"].update({s1: {}})))], ENV)
    assert s1 not in str(raised.value)
    assert_no_secret(raised.value.problems)


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [
        ("0.000001", "0.000002"),
        ("0.0000025", "0.00001"),
        ("0.0000000015", "0.000000001"),
        ("3", "0"),
    ],
)
def test_cost_in_nano_usd_is_exact(prompt: str, completion: str) -> None:
    """Whole nano-USD prices take integer arithmetic; others Decimal: the same answer."""
    pricing = Pricing("token", Decimal(prompt), Decimal(completion))
    for tokens in [(0, 0), (1, 0), (12, 13), (123_456, 7_890)]:
        cost = Decimal(prompt) * tokens[0] + Decimal(completion) * tokens[1]
        assert pricing.cost_nano_usd(*tokens) == int(cost * 1_000_000_000)
    assert Pricing("unit", Decimal(prompt), Decimal(completion)).cost_nano_usd(5, 5) == 0
