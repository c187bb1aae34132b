"""Request headers + snapshot -> the Principal that calls, or a 400/401."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDictProxy

from dialproxy.config.model import Access, IPNetwork, Key, Snapshot
from dialproxy.config.store import Memo
from dialproxy.errors import BadRequest, Forbidden, Unauthorized

if TYPE_CHECKING:
    from dialproxy.sharedkeys.model import SharedKey

NO_CREDENTIALS = "At least API-KEY or Authorization header must be provided"
UNKNOWN_KEY = "Unknown api key"
BOTH_DIFFER = "Either API-KEY or Authorization header must be provided but not both"
# A per-request key's secret starts so (see dialproxy.perrequest); a config key may too, and
# then it is that key (the config is looked up first).
PER_REQUEST_KEY_PREFIX = "dprk_"


@dataclass(slots=True)
class Principal:
    """Who calls: the key's project and roles, and what those roles may do."""

    key: Key  # for a shared key: its owner's key
    secret: str  # kept only to avoid forwarding it; never logged
    shared: SharedKey | None = None  # set when a shared key calls, in its owner's name
    per_request: bool = False  # a per-request key calls, for its originator (``key``)

    @property
    def project(self) -> str:
        return self.key.project

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    @property
    def access(self) -> Access:
        return self.key.access


def credentials(headers: CIMultiDictProxy[str], x_api_key: bool = False) -> str:
    """The API key the request carries (``Api-Key`` or ``Authorization: Bearer``; with
    ``x_api_key``, Anthropic's ``x-api-key`` too, taken as ``Api-Key``)."""
    api_key = headers.get("Api-Key")
    if x_api_key and api_key is None:
        api_key = headers.get("x-api-key")
    authorization = headers.get("Authorization")
    bearer = None
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
    if api_key is not None and bearer is not None and api_key != bearer:
        # DIAL: a per-request key in Api-Key may come with the user's JWT in Authorization
        # (forwarded as it is when the deployment has forwardAuthToken)
        if not api_key.startswith(PER_REQUEST_KEY_PREFIX):
            raise BadRequest(BOTH_DIFFER)
        return api_key
    secret = api_key if api_key is not None else bearer
    if not secret:
        if api_key is None and authorization is None:
            raise Unauthorized(NO_CREDENTIALS)
        raise Unauthorized(UNKNOWN_KEY)
    return secret


def _admitted(key: Key, secret: str, remote: str | None, now: datetime | None) -> Principal:
    timed = key.not_before is not None or key.expires_at is not None
    if (key.disabled or timed) and key.state(now or datetime.now(UTC)) != "active":
        raise Unauthorized(UNKNOWN_KEY)
    if key.allowed_networks is not None and not _address_allowed(remote, key.allowed_networks):
        raise Forbidden("Access denied")
    return Principal(key, secret)


class PerRequestFinder(Protocol):
    """What :func:`authenticate` needs of the per-request keys in flight
    (:class:`dialproxy.perrequest.PerRequestKeys`, which builds on this module)."""

    async def principal(
        self, secret: str, snapshot: Snapshot, shared: SharedKeyFinder, now: datetime
    ) -> Principal: ...


class SharedKeyFinder(Protocol):
    """What :func:`authenticate` needs of the app's shared keys
    (:class:`dialproxy.sharedkeys.service.SharedKeys`)."""

    clock: Callable[[], datetime] | None

    @property
    def per_request(self) -> PerRequestFinder | None:  # the per-request keys in flight
        ...

    async def find(self, secret: str) -> SharedKey | None: ...

    async def find_digest(self, digest: str) -> SharedKey | None: ...


def _known(secret: str, snapshot: Snapshot, memo: Memo) -> Key | None:
    """The config key ``secret`` names, kept in the memo by its secret (a str: the memo's
    other entries are tuples).  Only a secret that is a key is kept, so what clients send
    cannot fill the memo; the memo is the snapshot's, so a reload forgets them all."""
    key: Key | None = memo.get(secret)
    if key is None:
        key = snapshot.key_for_secret(secret)
        if key is not None:
            memo.put(secret, key)
    return key


async def authenticate(
    headers: CIMultiDictProxy[str],
    snapshot: Snapshot,
    remote: str | None,
    shared: SharedKeyFinder | None,
    x_api_key: bool = False,
    memo: Memo | None = None,
) -> Principal:
    """The key a request carries, from the config or, for a secret the config does not
    know, from the per-request keys in flight (their prefix) or the shared keys.

    A shared key acts as its owner, who is looked up by digest in *this* snapshot: an owner
    key that is gone, disabled, expired or without ``canShare`` takes its shared keys with
    it (401 like an unknown key), and the owner's address ranges apply.  With the store's
    ``memo`` of ``snapshot``, a config key found by its secret is remembered there (no
    SHA-256 the next time).
    """
    clock = shared.clock if shared is not None else None
    now = clock() if clock is not None else None
    secret = credentials(headers, x_api_key)
    key = snapshot.key_for_secret(secret) if memo is None else _known(secret, snapshot, memo)
    if key is not None:
        return _admitted(key, secret, remote, now)
    if secret.startswith(PER_REQUEST_KEY_PREFIX) and shared is not None:
        if shared.per_request is None:
            raise Unauthorized(UNKNOWN_KEY)
        return await shared.per_request.principal(
            secret, snapshot, shared, now or datetime.now(UTC)
        )
    found = await shared.find(secret) if shared is not None else None
    if found is None:
        raise Unauthorized(UNKNOWN_KEY)
    owner = snapshot.keys.get(found.owner)
    now = now or datetime.now(UTC)
    if owner is None or not owner.can_share or not found.active(now):
        raise Unauthorized(UNKNOWN_KEY)
    return Principal(_admitted(owner, secret, remote, now).key, secret, found)


def _address_allowed(remote: str | None, ranges: tuple[IPNetwork, ...]) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in network for network in ranges)
