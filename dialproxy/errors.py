"""The one exception tree: every refusal the proxy makes is a ProxyError with DIAL's message.

:func:`dialproxy.web.guard.response_for` is the one place that turns it into a response
``{"error": {"message": ..., "code": "<status>"}}``.  Messages never carry a secret.
"""

from __future__ import annotations

from typing import Any, ClassVar


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


class PayloadTooLarge(ProxyError):
    status = 413


class UnsupportedMediaType(ProxyError):
    status = 415


class BadGateway(ProxyError):
    status = 502


class Unavailable(ProxyError):
    status = 503


class StoreUnavailable(Unavailable):
    """The shared key store (or the per-request keys' Redis) did not answer."""


class SharedKeyCapReached(ProxyError):
    status = 429
