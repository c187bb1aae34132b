"""Request headers + snapshot -> the Principal that calls, or a 400/401."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime

from multidict import CIMultiDictProxy

from dialproxy.config.model import Access, Key, Snapshot
from dialproxy.errors import BadRequest, Forbidden, Unauthorized

NO_CREDENTIALS = "At least API-KEY or Authorization header must be provided"
UNKNOWN_KEY = "Unknown api key"
BOTH_DIFFER = "Either API-KEY or Authorization header must be provided but not both"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls: the key's project and roles, and what those roles may do."""

    key: Key
    secret: str  # kept only to avoid forwarding it; never logged

    @property
    def project(self) -> str:
        return self.key.project

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    @property
    def access(self) -> Access:
        return self.key.access


def credentials(headers: CIMultiDictProxy[str]) -> str:
    """The API key the request carries (``Api-Key`` or ``Authorization: Bearer``)."""
    api_key = headers.get("Api-Key")
    authorization = headers.get("Authorization")
    bearer = None
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
    if api_key is not None and bearer is not None and api_key != bearer:
        raise BadRequest(BOTH_DIFFER)
    secret = api_key if api_key is not None else bearer
    if not secret:
        if api_key is None and authorization is None:
            raise Unauthorized(NO_CREDENTIALS)
        raise Unauthorized(UNKNOWN_KEY)
    return secret


def authenticate(
    headers: CIMultiDictProxy[str],
    snapshot: Snapshot,
    remote: str | None,
    now: datetime | None = None,
) -> Principal:
    secret = credentials(headers)
    key = snapshot.key_for_secret(secret)
    if key is None:
        raise Unauthorized(UNKNOWN_KEY)
    timed = key.not_before is not None or key.expires_at is not None
    if (key.disabled or timed) and key.state(now or datetime.now(UTC)) != "active":
        raise Unauthorized(UNKNOWN_KEY)
    if key.allowed_ip_ranges is not None and not _address_allowed(remote, key.allowed_ip_ranges):
        raise Forbidden("Access denied")
    return Principal(key, secret)


def _address_allowed(remote: str | None, ranges: tuple[str, ...]) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(r, strict=False) for r in ranges)
