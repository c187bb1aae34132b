"""Every exception type of the package, with its status and message.

The one exception tree: every refusal the proxy makes is a :class:`ProxyError` with DIAL's
message, and :func:`dialproxy.errorbody.response_for` is the one place that turns it into a
response ``{"error": {"message": ..., "code": "<status>"}}``.  Beside it, the refusals of
the other entry points: :class:`ConfigError` (a config that cannot be served: every
problem, with its JSON path) and :class:`KeysError` (the ``keys`` CLI and the admin API's
edits, with the CLI's exit code).  Messages never carry a secret.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

# The CLI's exit codes (a KeysError carries one).
EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
# What a request refused while the counter storage is down (``deny``) or the shared key
# store does not answer is told to wait: about two probes of the storage.
RETRY_AFTER = 1


class ProxyError(Exception):
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status  # type: ignore[misc]
        self.headers: dict[str, str] = headers or {}
        self.extra: dict[str, Any] = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "code": str(self.status), **self.extra}}


class BadRequest(ProxyError):
    status = 400


class Unauthorized(ProxyError):
    status = 401


class Forbidden(ProxyError):
    status = 403


class NotFound(ProxyError):
    status = 404


class RequestTimeout(ProxyError):
    status = 408


class Conflict(ProxyError):
    """The request conflicts with the config as it is (the admin API: a file it does not
    write, an entry it does not edit)."""

    status = 409


class PreconditionFailed(ProxyError):
    """``If-Match`` names another version of the file than the one there now."""

    status = 412


class PayloadTooLarge(ProxyError):
    status = 413


class UnsupportedMediaType(ProxyError):
    status = 415


class Unprocessable(ProxyError):
    """The edit is well formed but would make the config invalid."""

    status = 422


class PreconditionRequired(ProxyError):
    """A write without ``If-Match``."""

    status = 428


class BadGateway(ProxyError):
    status = 502


class NoRoute(BadGateway):
    """DIAL's "No route" to the client; the log line says what went wrong (the message)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": "No route", "code": "502"}}


class Unavailable(ProxyError):
    status = 503


class StoreUnavailable(Unavailable):
    """The shared key store (or the per-request keys' Redis) did not answer."""


class LedgerUnavailable(Unavailable):
    """The usage ledger's store (Redis, the SQLite file) failed a read."""

    def __init__(self) -> None:
        super().__init__(
            "The usage ledger is unavailable", headers={"Retry-After": str(RETRY_AFTER)}
        )


class SharedKeyCapReached(ProxyError):
    status = 429


class StorageUnavailable(Unavailable):
    """``deny``: the limits cannot be checked, so the request is not served."""

    def __init__(self) -> None:
        super().__init__(
            "Rate limit storage is unavailable",
            headers={"Retry-After": str(RETRY_AFTER)},
        )


class _Window(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def limit(self) -> int: ...
    @property
    def limited(self) -> bool: ...


class _WindowState(Protocol):
    """What a 429 says of a window (:class:`dialproxy.counting.limiter.WindowState`)."""

    @property
    def window(self) -> _Window: ...
    @property
    def used(self) -> int: ...
    @property
    def retry_after(self) -> float: ...


class RateLimited(ProxyError):
    status = 429

    def __init__(self, kind: str, states: Sequence[_WindowState], blocking: _WindowState) -> None:
        unit = {"token": "tokens", "request": "requests", "cost": "USD"}[kind]
        parts = [f"Hit {kind} rate limit."]
        for s in states:
            if not s.window.limited:  # (counted, not limited: nothing to say)
                continue
            if kind == "cost":
                parts.append(
                    f"{s.window.name.capitalize()} limit: {s.used / 1e9:.6g} / "
                    f"{s.window.limit / 1e9:.6g} {unit}."
                )
            else:
                parts.append(
                    f"{s.window.name.capitalize()} limit: {s.used} / {s.window.limit} {unit}."
                )
        self.retry_after = max(1, math.ceil(blocking.retry_after))
        super().__init__(" ".join(parts))
        self.extra = {
            "limit_type": kind,
            "window": blocking.window.name,
            "retry_after": self.retry_after,
        }
        self.headers = {"Retry-After": str(self.retry_after)}


class ConcurrencyLimited(ProxyError):
    """A scope's requests in flight are at its cap."""

    status = 429

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Hit concurrency limit: {limit} / {limit} requests in flight.",
            headers={"Retry-After": "1"},
            extra={"limit_type": "concurrency", "retry_after": 1},
        )


class BodyTimeout(TimeoutError):
    """Set on a body's stream when nothing of it arrived for the body timeout (a
    ``TimeoutError``: aiohttp's lingering read after the answer takes it as a timeout and
    closes the connection); answered 408."""


class InvalidField(BadRequest):
    """400 naming the field that is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"Invalid field '{field}': {message}", extra={"field": field})


# --- the config -----------------------------------------------------------------------------

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config, located by file and JSON path."""

    file: str
    path: str
    message: str
    severity: Severity = "error"

    def as_dict(self) -> dict[str, str]:
        return {
            "file": self.file,
            "path": self.path,
            "message": self.message,
            "severity": self.severity,
        }

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message} [{self.severity}]"


class ConfigError(Exception):
    """The config cannot be served; ``problems`` lists every reason (errors and warnings)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        super().__init__(f"invalid config: {len(errors)} error(s)")


class EmptyConfig(ConfigError):
    """The config defines no keys or no models (refused unless ``--allow-empty-config``)."""


# --- the keys CLI and the admin API's edits -------------------------------------------------


class KeysError(Exception):
    """A refusal with its exit code; the message never holds a secret."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.code = code


class KeyNotFound(KeysError):
    """No key has the fingerprint given."""


class InvalidEdit(KeysError):
    """The edit would make the config invalid (it is not written)."""


class FileChanged(KeysError):
    """The file changed since it was read (it is not written)."""


class RoleNotFound(KeysError):
    """The file's ``roles`` has no such role, or the role no such limit."""


class NotEditable(KeysError):
    """The file (YAML) or the key (named by a ``${VAR}``) is not edited."""


# --- what an upstream sends ----------------------------------------------------------------


class EventTooLarge(Exception):
    """An upstream event grew past the cap before it ended: the stream is cut, after the
    complete events that came before it in the same chunk (``relayed``)."""

    def __init__(self, message: str, relayed: bytes = b"") -> None:
        super().__init__(message)
        self.relayed = relayed
