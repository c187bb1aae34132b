"""The store's memo (what the request path works out once per snapshot): bounded, evicting
the least recently used, and new with each snapshot; a key's IP ranges parsed at build."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from dialproxy.auth import authenticate
from dialproxy.config.loader import build_snapshot
from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore, Memo
from dialproxy.errors import Unauthorized
from tests.conftest import new_key

KEY = new_key()


def test_the_memo_keeps_at_most_its_size_and_evicts_the_least_recently_used() -> None:
    memo = Memo(3)
    for name in "abc":
        memo.put(name, name.upper())
    assert memo.get("a") == "A"  # now the most recently used
    memo.put("d", "D")
    assert len(memo) == 3
    assert memo.get("b") is None  # the least recently used went
    assert [memo.get(n) for n in "acd"] == ["A", "C", "D"]
    for i in range(100):
        memo.put(i, i)
    assert len(memo) == 3


def config(project: str) -> dict[str, Any]:
    return {
        "models": {"m": {"endpoint": "https://up.example.com/v1/chat/completions"}},
        "keys": {KEY: {"project": project, "role": "default"}},
    }


def source(doc: dict[str, Any]) -> list[Source]:
    return [Source("aidial.config.json", json.dumps(doc).encode())]


def test_each_snapshot_served_has_a_memo_of_its_own() -> None:
    store = ConfigStore(["aidial.config.json"], memo_size=10)
    assert store.reload(source(config("one"))).applied
    old = store.snapshot
    memo = store.memo_for(old)
    memo.put("plan", "for the first config")
    assert store.memo_for(old) is memo
    assert store.reload(source(config("two"))).applied
    new = store.memo_for(store.snapshot)
    assert new.get("plan") is None  # nothing worked out on the old config is served
    # a request still on the old snapshot keeps nothing: it cannot fill the new memo
    stale = store.memo_for(old)
    stale.put("plan", "late")
    assert stale.get("plan") is None and new.get("plan") is None


def test_ip_ranges_are_parsed_once_at_build() -> None:
    doc = config("p")
    doc["keys"][KEY]["allowedIpAddressRanges"] = ["10.1.2.3/8", "2001:db8::/32"]
    key = next(iter(build_snapshot(source(doc), {}).keys.values()))
    assert key.allowed_ip_ranges == ("10.1.2.3/8", "2001:db8::/32")  # as written
    assert key.allowed_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )


async def test_a_key_found_by_its_secret_is_remembered_and_unknown_secrets_are_not() -> None:
    """Auth keeps a config key found by its secret in the snapshot's memo (no SHA-256 the
    next time); secrets that name no key are never kept (clients cannot fill the memo), and
    a reload's new memo has none of them (a removed key is unknown at once)."""

    def headers(secret: str) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict({"Api-Key": secret}))

    store = ConfigStore(["aidial.config.json"], memo_size=100)
    assert store.reload(source(config("one"))).applied
    snapshot = store.snapshot
    memo = store.memo_for(snapshot)
    for _ in range(20):
        with pytest.raises(Unauthorized):
            await authenticate(headers(new_key()), snapshot, None, None, memo=memo)
    assert len(memo) == 0
    for _ in range(3):
        principal = await authenticate(headers(KEY), snapshot, None, None, memo=memo)
        assert principal.key.project == "one"
    assert len(memo) == 1
    doc = config("two")
    doc["keys"] = {new_key(): {"project": "two", "role": "default"}}
    assert store.reload(source(doc)).applied
    fresh = store.memo_for(store.snapshot)
    assert len(fresh) == 0
    with pytest.raises(Unauthorized):  # the removed key: unknown at once
        await authenticate(headers(KEY), store.snapshot, None, None, memo=fresh)
