"""A shared key and its rules: active until it expires, stopped by its own token cap."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from dialproxy.config.model import UNLIMITED
from dialproxy.errors import SharedKeyCapReached
from dialproxy.text import iso

MAX_TOKENS = UNLIMITED  # the largest cap (the counters' own bound)
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class SharedKey:
    """One shared key.  ``owner`` is the owner key's digest; the secret is not kept."""

    id: str
    digest: str
    owner: str
    name: str
    tokens: int  # cap on the tokens used through it in total; -1: no cap of its own
    utilized: int = 0
    expires_at: datetime | None = None
    created_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def capped(self) -> bool:
        return 0 <= self.tokens <= self.utilized

    def public(self, project: str) -> dict[str, Any]:
        """What the API shows of it (never the secret)."""
        return {
            "id": self.id,
            "name": self.name,
            "project": project,
            "tokens": self.tokens,
            "utilized": self.utilized,
            "expiresAt": iso(self.expires_at) if self.expires_at else None,
        }


@dataclass(frozen=True, slots=True)
class Changes:
    """A PATCH: the fields to set (``set_expires_at`` with ``expires_at=None`` removes it)."""

    name: str | None = None
    tokens: int | None = None
    expires_at: datetime | None = None
    set_expires_at: bool = False

    def apply(self, key: SharedKey) -> SharedKey:
        return replace(
            key,
            name=key.name if self.name is None else self.name,
            tokens=key.tokens if self.tokens is None else self.tokens,
            expires_at=self.expires_at if self.set_expires_at else key.expires_at,
        )


def check_cap(key: SharedKey) -> None:
    """Before forwarding: 429 once the shared key's own token cap is used up."""
    if key.capped:
        raise SharedKeyCapReached(
            f"The shared key's token cap is reached: {key.utilized} / {key.tokens} tokens "
            "used. Its owner can raise the cap.",
            extra={"limit_type": "shared_key_tokens"},
        )
