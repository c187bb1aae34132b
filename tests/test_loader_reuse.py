"""A reload rebuilds what changed and takes the rest from the last good build: what it
serves is what a full build of the same files gives, and what it refuses is refused with
the same problems."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Snapshot
from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore
from dialproxy.errors import ConfigError
from dialproxy.text import key_digest
from tests.conftest import new_key

KEYS = [new_key() for _ in range(6)]
ENV = {"UPSTREAM_KEY": "upstream-key-one-not-a-secret-really"}


def config() -> dict[str, Any]:
    models = {
        f"m{i}": {
            "type": "chat",
            "upstreams": [{"endpoint": f"https://up{i}.example.com/v1", "key": "${UPSTREAM_KEY}"}],
            **({"userRoles": ["a", "b"]} if i == 2 else {}),
        }
        for i in range(4)
    }
    return {
        "models": models,
        "roles": {
            "default": {"limits": {"m0": {"minute": "100"}}},
            "a": {"limits": {"m1": {"minute": "1000", "day": "5000"}}, "costLimit": {"day": "5"}},
            "b": {"limits": {"m1": {"minute": "2000"}, "m2": {"requestHour": "10"}}},
        },
        "keys": {
            KEYS[0]: {"project": "p0", "role": "a"},
            KEYS[1]: {"project": "p1", "roles": ["a", "b"]},
            KEYS[2]: {"project": "p2", "role": "b", "allowedIpAddressRanges": ["10.0.0.0/8"]},
            KEYS[3]: {"project": "p3", "role": "default", "expiresAt": "2030-01-01T00:00:00Z"},
            KEYS[4]: {"project": "p4", "role": "b", "limits": {"m3": {"minute": "7"}}},
        },
    }


def sources(doc: dict[str, Any]) -> list[Source]:
    return [Source("aidial.config.json", json.dumps(doc, indent=2).encode())]


def loaded(doc: dict[str, Any], env: dict[str, str] = ENV) -> ConfigStore:
    store = ConfigStore(["aidial.config.json"], env=env)
    assert store.reload(sources(doc)).applied
    return store


def reloaded(store: ConfigStore, doc: dict[str, Any]) -> Snapshot:
    result = store.reload(sources(doc))
    assert result.applied and not result.refused, result
    return store.snapshot


def fresh(doc: dict[str, Any], env: dict[str, str] = ENV) -> Snapshot:
    return build_snapshot(sources(doc), env)


def key(snapshot: Snapshot, secret: str) -> Any:
    return snapshot.keys[key_digest(secret)]


def test_a_changed_key_is_rebuilt_and_the_others_are_the_same_objects() -> None:
    doc = config()
    store = loaded(doc)
    before = store.snapshot
    doc["keys"][KEYS[0]]["name"] = "renamed"
    after = reloaded(store, doc)
    assert after == fresh(doc)
    assert after.digest == fresh(doc).digest
    assert key(after, KEYS[0]).name == "renamed"
    assert key(after, KEYS[0]) is not key(before, KEYS[0])
    for secret in KEYS[1:5]:
        assert key(after, secret) is key(before, secret)
    assert after.models["m1"] is before.models["m1"]
    assert after.roles["a"] is before.roles["a"]


def test_added_and_removed_keys() -> None:
    doc = config()
    store = loaded(doc)
    del doc["keys"][KEYS[1]]
    doc["keys"][KEYS[5]] = {"project": "p5", "roles": ["a", "b"]}
    after = reloaded(store, doc)
    assert after == fresh(doc)
    assert key_digest(KEYS[1]) not in after.keys
    assert key(after, KEYS[5]).project == "p5"


def test_a_role_change_re_resolves_the_keys_that_have_it() -> None:
    doc = config()
    store = loaded(doc)
    before = store.snapshot
    doc["roles"]["b"]["limits"]["m1"]["minute"] = "3000"
    after = reloaded(store, doc)
    assert after == fresh(doc)
    # KEYS[1] has a and b: the maximum of the two roles' minute limits
    assert key(after, KEYS[1]).access.grants["m1"].limit.minute == 3000
    assert key(after, KEYS[2]).access.grants["m1"].limit.minute == 3000
    assert key(after, KEYS[0]).access.grants["m1"].limit.minute == 1000
    assert key(after, KEYS[0]) is key(before, KEYS[0])  # role a only: unchanged
    assert key(after, KEYS[3]) is key(before, KEYS[3])


def test_a_default_role_change_reaches_every_key_it_falls_back_to() -> None:
    doc = config()
    store = loaded(doc)
    doc["roles"]["default"]["limits"]["m0"]["minute"] = "5"
    after = reloaded(store, doc)
    assert after == fresh(doc)
    for secret in KEYS[:5]:
        assert key(after, secret).access.grants["m0"].limit.minute == 5


def test_a_model_change_reaches_every_key_that_can_call_it() -> None:
    doc = config()
    store = loaded(doc)
    doc["models"]["m1"]["upstreams"][0]["endpoint"] = "https://moved.example.com/v1"
    after = reloaded(store, doc)
    assert after == fresh(doc)
    for secret in KEYS[:5]:
        grant = key(after, secret).access.grants["m1"]
        assert grant.model is after.models["m1"]
        assert grant.model.upstreams[0].endpoint == "https://moved.example.com/v1"


def test_user_roles_and_schedule_changes() -> None:
    doc = config()
    store = loaded(doc)
    doc["models"]["m2"]["userRoles"] = ["a"]
    after = reloaded(store, doc)
    assert after == fresh(doc)
    assert "m2" not in key(after, KEYS[2]).access.grants  # role b only
    doc["rateLimitSchedule"] = {"timezone": "Europe/Berlin"}
    after = reloaded(store, doc)
    assert after == fresh(doc)
    assert after.schedule.timezone == "Europe/Berlin"
    windows = key(after, KEYS[0]).access.grants["m1"].token_windows
    assert windows == fresh(doc).keys[key_digest(KEYS[0])].access.grants["m1"].token_windows


def test_an_environment_variable_change_is_honoured() -> None:
    doc = config()
    env = dict(ENV)  # the process environment, read at each build
    store = ConfigStore(["aidial.config.json"], env=env)
    assert store.reload(sources(doc)).applied
    changed = {"UPSTREAM_KEY": "upstream-key-two-not-a-secret-really"}
    env.update(changed)
    after = reloaded(store, doc)
    assert after == fresh(doc, changed)
    assert after.models["m1"].upstreams[0].key == changed["UPSTREAM_KEY"]


def test_a_key_named_by_a_variable_follows_it() -> None:
    doc = config()
    doc["keys"]["${CLIENT_KEY}"] = {"project": "env", "role": "a"}
    first, second = new_key(), new_key()
    env = {**ENV, "CLIENT_KEY": first}
    store = ConfigStore(["aidial.config.json"], env=env)
    assert store.reload(sources(doc)).applied
    env["CLIENT_KEY"] = second
    after = reloaded(store, doc)
    assert key_digest(first) not in after.keys
    assert key(after, second).project == "env"
    assert after == fresh(doc, {**ENV, "CLIENT_KEY": second})


def problems_of_full_build(doc: dict[str, Any]) -> tuple[Any, ...]:
    with pytest.raises(ConfigError) as e:
        fresh(doc)
    return tuple(p for p in e.value.problems if p.severity == "error")


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["keys"][KEYS[0]].update({"project": 5}),
        lambda d: d["keys"][KEYS[0]].pop("project"),
        lambda d: d["keys"][KEYS[1]].update({"rolez": ["a"]}),
        lambda d: d["keys"][KEYS[2]].update({"allowedIpAddressRanges": ["10.0.0.0/33"]}),
        lambda d: d["keys"][KEYS[3]].update({"expiresAt": "tomorrow"}),
        lambda d: d["keys"].update({"sha256:abc": {"project": "p", "role": "a"}}),
        lambda d: d["models"]["m1"]["upstreams"][0].update({"weight": "heavy"}),
        lambda d: d["roles"]["a"]["limits"]["m1"].update({"minute": "lots"}),
        lambda d: d.update({"rateLimitSchedule": {"timezone": "Mars/Olympus"}}),
    ],
)
def test_a_broken_entry_is_refused_with_the_problems_of_a_full_build(break_it: Any) -> None:
    doc = config()
    store = loaded(doc)
    before = store.snapshot
    broken = copy.deepcopy(doc)
    break_it(broken)
    result = store.reload(sources(broken))
    assert result.refused
    assert result.problems == problems_of_full_build(broken)
    assert store.snapshot is before
    # and the fix after it is served as a full build would
    doc["keys"][KEYS[0]]["name"] = "after the fix"
    assert reloaded(store, doc) == fresh(doc)


def test_warnings_of_unchanged_keys_stay_and_follow_what_they_refer_to() -> None:
    doc = config()
    doc["keys"][KEYS[0]]["role"] = "later"  # not defined yet: a warning
    doc["keys"]["short-key"] = {"project": "weak", "role": "a"}  # too few bits: a warning
    store = loaded(doc)
    paths = {p.path for p in store.snapshot.warnings}
    assert "$.keys.<key " + key_digest(KEYS[0])[:8] + ">.role" in paths
    doc["keys"][KEYS[1]]["name"] = "touched"
    after = reloaded(store, doc)
    assert after.warnings == fresh(doc).warnings
    doc["roles"]["later"] = {"limits": {}}
    after = reloaded(store, doc)
    assert after.warnings == fresh(doc).warnings
    assert "$.keys.<key " + key_digest(KEYS[0])[:8] + ">.role" not in {
        p.path for p in after.warnings
    }


def test_an_unchanged_config_written_differently_is_not_a_reload() -> None:
    doc = config()
    store = loaded(doc)
    generation = store.generation
    compact = [Source("aidial.config.json", json.dumps(doc).encode())]
    result = store.reload(compact)
    assert not result.applied and not result.refused
    assert store.generation == generation


def test_several_files_merged_after_a_change() -> None:
    doc = config()
    keys = {"keys": doc.pop("keys")}
    files = [
        Source("models.json", json.dumps(doc).encode()),
        Source("keys.json", json.dumps(keys).encode()),
    ]
    store = ConfigStore(["models.json", "keys.json"], env=ENV)
    assert store.reload(files).applied
    keys["keys"][KEYS[0]]["project"] = "moved"
    keys["keys"][KEYS[1]]["roles"] = ["a", "nope"]
    files[1] = Source("keys.json", json.dumps(keys).encode())
    result = store.reload(files)
    assert result.applied
    assert store.snapshot == build_snapshot(files, ENV)
    assert store.snapshot.warnings == build_snapshot(files, ENV).warnings
    assert {p.file for p in store.snapshot.warnings} == {"keys.json"}


def test_the_digest_is_the_sha256_of_the_merged_config_with_sorted_keys() -> None:
    doc = config()
    doc["retriableErrorCodes"] = [500]
    doc["models"]["m0"]["displayName"] = "Modèle \u2028 «zéro»"
    doc["models"]["m0"]["maxInputAttachments"] = 3
    doc["roles"]["a"]["costLimit"] = {"day": 5.5, "month": 1e-06}
    store = loaded(doc)
    doc["keys"][KEYS[0]]["name"] = "again"
    snapshot = reloaded(store, doc)
    text = json.dumps(dict(snapshot.raw), sort_keys=True)
    assert snapshot.digest == hashlib.sha256(text.encode()).hexdigest()


def test_grants_a_role_change_leaves_alone_are_kept_across_reloads() -> None:
    doc = config()
    store = loaded(doc)
    before = store.snapshot
    doc["keys"][KEYS[0]]["name"] = "a key change first: every access is taken whole"
    reloaded(store, doc)
    doc["roles"]["b"]["limits"]["m2"]["requestHour"] = "20"
    after = reloaded(store, doc)
    assert after == fresh(doc)
    old, new = key(before, KEYS[1]).access, key(after, KEYS[1]).access
    assert new is not old  # it has role b: re-resolved
    assert new.grants["m2"].limit.request_hour == 20
    for model in ("m0", "m1", "m3"):  # grants role b's change does not touch
        assert new.grants[model] is old.grants[model]


# --- incremental == full, for random sequences of edits -----------------------------------

SECRET_VALUES = ["upstream-key-one-not-a-secret-really", "upstream-key-two-not-a-secret-really"]
CLIENT_KEYS = [new_key(), new_key()]
ROLE_NAMES = ["a", "b", "default", "ghost"]
# Values `==` takes for one another, and the schema (and the canonical JSON) does not.
LOOK_ALIKES: list[Any] = [True, 1, 1.0, False, 0, 0.0, -0.0, "1", None, [1], {"x": 1}]

Edit = tuple[str, int, int]


def edit(doc: dict[str, Any], env: dict[str, str], what: Edit) -> None:
    """Apply one edit: (kind, which entry, which value)."""
    kind, i, v = what
    keys = list(doc["keys"])
    secret = keys[i % len(keys)] if keys else None
    model = doc["models"].get(f"m{i % 4}")
    if kind == "key name" and secret is not None:
        doc["keys"][secret]["name"] = f"name {v}"
    elif kind == "key role" and secret is not None:
        doc["keys"][secret].pop("roles", None)
        doc["keys"][secret]["role"] = ROLE_NAMES[v % len(ROLE_NAMES)]
    elif kind == "key roles" and secret is not None:
        doc["keys"][secret].pop("role", None)
        doc["keys"][secret]["roles"] = ROLE_NAMES[v % 3 :][:2]
    elif kind == "key look-alike" and secret is not None:
        doc["keys"][secret]["secured"] = LOOK_ALIKES[v % len(LOOK_ALIKES)]
    elif kind == "key limits" and secret is not None:
        doc["keys"][secret]["limits"] = {f"m{v % 4}": {"minute": str(v)}}
    elif kind == "add key":
        doc["keys"][KEYS[5] if v % 2 else f"sha256:{key_digest(new_key())}"] = {
            "project": f"new {v}",
            "role": ROLE_NAMES[v % len(ROLE_NAMES)],
        }
    elif kind == "remove key" and secret is not None:
        del doc["keys"][secret]
    elif kind == "variable key":
        if v % 3 == 0:
            doc["keys"].pop("${CLIENT_KEY}", None)
        else:
            doc["keys"]["${CLIENT_KEY}"] = {"project": "env", "role": "a"}
            env["CLIENT_KEY"] = CLIENT_KEYS[v % 2]
    elif kind == "role limit":
        role = doc["roles"][ROLE_NAMES[v % 3]]
        role.setdefault("limits", {})[f"m{i % 4}"] = {"minute": str(100 + v)}
    elif kind == "role look-alike":
        doc["roles"]["a"].setdefault("costLimit", {})["day"] = LOOK_ALIKES[v % len(LOOK_ALIKES)]
    elif kind == "model look-alike" and model is not None:
        model["upstreams"][0]["tier"] = LOOK_ALIKES[v % len(LOOK_ALIKES)]
    elif kind == "model key" and model is not None:
        texts = ["${UPSTREAM_KEY}", "literal-upstream-key-abcdef", "${UNSET_KEY}", None]
        text = texts[v % len(texts)]
        if text is None:
            model["upstreams"][0].pop("key", None)
        else:
            model["upstreams"][0]["key"] = text
    elif kind == "model endpoint" and model is not None:
        model["upstreams"][0]["endpoint"] = f"https://up{v}.example.com/v1"
    elif kind == "remove model" and model is not None and len(doc["models"]) > 1:
        del doc["models"][f"m{i % 4}"]
    elif kind == "add model":
        doc["models"][f"m{i % 4}"] = {
            "type": "chat",
            "upstreams": [{"endpoint": f"https://new{v}.example.com/v1"}],
        }
    elif kind == "environment":
        env["UPSTREAM_KEY"] = SECRET_VALUES[v % 2]
    elif kind == "schedule":
        doc["rateLimitSchedule"] = {"timezone": ["UTC", "Europe/Berlin", "Mars/Olympus"][v % 3]}


EDITS = st.tuples(
    st.sampled_from(
        [
            "key name",
            "key role",
            "key roles",
            "key look-alike",
            "key limits",
            "add key",
            "remove key",
            "variable key",
            "role limit",
            "role look-alike",
            "model look-alike",
            "model key",
            "model endpoint",
            "remove model",
            "add model",
            "environment",
            "schedule",
        ]
    ),
    st.integers(0, 7),
    st.integers(0, 30),
)


def written(doc: dict[str, Any], form: str) -> list[Source]:
    """``doc`` as files: one (indented or compact), two (keys apart), one with a field given
    twice (a warning, and nothing of it is taken as it was), or YAML (walked whole)."""
    if form == "yaml":
        return [Source("aidial.config.yaml", yaml.safe_dump(doc).encode())]
    if form == "split":
        rest = {k: v for k, v in doc.items() if k != "keys"}
        return [
            Source("aidial.config.json", json.dumps(rest).encode()),
            Source("keys.json", json.dumps({"keys": doc["keys"]}, indent=1).encode()),
        ]
    text = json.dumps(doc, indent=2 if form == "indented" else None)
    if form == "repeated field":
        text = text.replace('"project": ', '"project": "first", "project": ', 1)
    return [Source("aidial.config.json", text.encode())]


@settings(  # DIALPROXY_PROPERTY_EXAMPLES=2000 for a longer hunt
    max_examples=int(os.environ.get("DIALPROXY_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            EDITS, st.sampled_from(["indented", "compact", "split", "repeated field", "yaml"])
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_reload_serves_and_refuses_what_a_full_build_does(
    steps: list[tuple[Edit, str]],
) -> None:
    doc = config()
    env = dict(ENV)
    form = steps[0][1]
    # (allow_empty: the last key removed is the loader's to serve, not the store's to refuse)
    store = ConfigStore(["aidial.config.json"], env=env, allow_empty=True)
    assert store.reload(written(doc, form)).applied
    for what, form in steps:
        edit(doc, env, what)
        check_reload(store, written(doc, form), env)


def check_reload(store: ConfigStore, files: list[Source], env: dict[str, str]) -> None:
    """``store`` reloads ``files`` as a full build of them serves or refuses them."""
    served = store.snapshot
    result = store.reload(files)
    try:
        full = build_snapshot(files, dict(env))
    except ConfigError as e:
        assert result.refused
        assert result.problems == tuple(p for p in e.problems if p.severity == "error")
        assert store.snapshot is served
        return
    assert not result.refused, result.problems
    # the same content (in other files perhaps) is not a reload: the snapshot served stays
    assert result.applied == (full.digest != served.digest)
    if not result.applied:
        assert store.snapshot is served
        return
    assert store.snapshot == full
    assert store.snapshot.digest == full.digest
    assert store.snapshot.warnings == full.warnings
    assert list(store.snapshot.keys) == list(full.keys)
    assert list(store.snapshot.models) == list(full.models)


@pytest.mark.parametrize(
    "place",
    [
        lambda d, v: d["keys"][KEYS[0]].update({"secured": v}),
        lambda d, v: d["roles"]["a"]["costLimit"].update({"day": v}),
        lambda d, v: d["models"]["m1"]["upstreams"][0].update({"tier": v}),
    ],
)
def test_values_equal_in_python_but_not_in_json_are_changes(place: Any) -> None:
    """True == 1 == 1.0 in Python, not in the schema: an entry changed from one to the other
    is a changed entry."""
    for before in LOOK_ALIKES:
        doc = config()
        place(doc, before)
        store = ConfigStore(["aidial.config.json"], env=ENV)
        if not store.reload(sources(doc)).applied:
            continue  # (refused: nothing is served to reuse)
        for after in LOOK_ALIKES:
            place(doc, after)
            check_reload(store, sources(doc), ENV)
            place(doc, before)
            check_reload(store, sources(doc), ENV)
