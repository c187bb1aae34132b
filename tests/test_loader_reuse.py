"""A reload rebuilds what changed and takes the rest from the last good build: what it
serves is what a full build of the same files gives, and what it refuses is refused with
the same problems."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest

from dialproxy.config.loader import Source, build_snapshot
from dialproxy.config.model import Snapshot, key_digest
from dialproxy.config.store import ConfigStore
from dialproxy.errors import ConfigError
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
