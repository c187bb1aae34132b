"""The Anthropic Messages API, as DIAL serves it (``interfaces.anthropicMessages``).

Route: ``/anthropic/v1/messages`` and ``/anthropic/v1/messages/count_tokens``, the
deployment in the body's ``model``; the key in ``x-api-key`` (what the anthropic SDK sends),
``Api-Key`` or ``Authorization: Bearer``; ``anthropic-version`` and ``anthropic-beta`` passed
on.  Body rule: ``overrideName``.  Usage: ``input_tokens`` (with the cache writes and
reads) of ``message_start`` and the ``output_tokens`` of the last ``message_delta`` (output
counts are running totals), or the ``usage`` of a whole message.  A token count is neither
limited nor counted.  Errors: Anthropic's ``{"type": "error", "error": {"type",
"message"}}`` (so the SDK raises its own exception types), a stream's ``event: error``, and
our limits in ``anthropic-ratelimit-*``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dialproxy import errorbody
from dialproxy.apis import Api, ErrorShape, rewritten, with_defaults
from dialproxy.counting.limiter import WindowState
from dialproxy.wire.headers import FORWARDED_REQUEST_HEADERS
from dialproxy.wire.usage import Usage, UsageRule, read_counts

if TYPE_CHECKING:
    from dialproxy.config.model import Model

FORWARDED_HEADERS = (*FORWARDED_REQUEST_HEADERS, "anthropic-version", "anthropic-beta")

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_response(request: web.Request, error: Exception) -> web.Response:
    """The proxy's refusal in Anthropic's shape (the status, headers and message DIAL's
    shape has: :func:`dialproxy.web.errorbody.response_for`)."""
    dial = errorbody.response_for(request, error)
    assert isinstance(dial.body, bytes)
    message = json.loads(dial.body)["error"]["message"]
    body = {"type": "error", "error": {"type": error_type(dial.status), "message": message}}
    headers = {k: v for k, v in dial.headers.items() if k.lower() != "content-type"}
    return errorbody.error_response(dial.status, body, headers)


def stream_error(message: str, status: int = 502) -> bytes:
    """Anthropic's error event (the SDK raises it as an ``APIStatusError``)."""
    body = {"type": "error", "error": {"type": error_type(status), "message": message}}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


def ratelimit_headers(
    requests: WindowState | None, tokens: WindowState | None
) -> list[tuple[str, str]]:
    """Our tightest request and token windows as Anthropic names them: the limit, what is
    left, and when the window is empty again (RFC 3339, to the second)."""
    headers: list[tuple[str, str]] = []
    now = time.time()
    for unit, state in (("requests", requests), ("tokens", tokens)):
        if state is None:
            continue
        limit, used = state.window.limit, state.used
        reset = _rfc3339(math.ceil(now + state.reset))
        headers += [
            (f"anthropic-ratelimit-{unit}-limit", state.window.text),
            (f"anthropic-ratelimit-{unit}-remaining", str(limit - used) if used < limit else "0"),
            (f"anthropic-ratelimit-{unit}-reset", reset),
        ]
    return headers


@functools.lru_cache(maxsize=1024)  # resets move by the second: most requests hit
def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


ANTHROPIC_ERRORS = ErrorShape(error_response, stream_error, ratelimit_headers)


def body_rule(body: dict[str, Any], raw: bytes, model: Model) -> tuple[bytes | None, bool]:
    """The ``overrideName`` (DIAL's ``defaults`` are chat completions' own)."""
    updates = with_defaults(body, {}, model.override_name)
    return (rewritten(body, raw, updates) if updates else None), False


_COUNTS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def _usage(answer: Any, so_far: Usage | None) -> Usage | None:
    """A message's usage, or what a stream event adds to it: every count read is a running
    total, so the stream's is the largest of each (in whatever order the events are read)."""
    if type(answer) is not dict:
        return None
    kind = answer.get("type")
    if kind == "message_start":
        message = answer.get("message")
        obj = message.get("usage") if type(message) is dict else None
    elif kind in ("message_delta", "message"):
        obj = answer.get("usage")
    else:
        return None
    values = read_counts(obj, _COUNTS)
    if values is None:
        return None
    fresh, written, read, output = values
    details = dict(so_far.details or {}) if so_far is not None else {}
    for name, value in (
        ("cache_creation_input_tokens", written),
        ("cache_read_input_tokens", read),
    ):
        if value or name in details:
            details[name] = max(value, details.get(name, 0))
    prompt = fresh + written + read
    if so_far is not None:
        prompt = max(prompt, so_far.prompt_tokens)
        output = max(output, so_far.completion_tokens)
    return Usage(prompt, output, prompt + output, details or None)


USAGE = UsageRule(_usage, last_wins=False)


def _api(name: str, counted: bool = True) -> Api:
    return Api(
        name=name,
        interface="anthropicMessages",
        paths=(f"/anthropic/v1/{name}",),
        body=body_rule,
        usage=USAGE,
        errors=ANTHROPIC_ERRORS,
        forwarded_headers=FORWARDED_HEADERS,
        counted=counted,
        x_api_key=True,
        completion_fields=("max_tokens",),
    )


MESSAGES = _api("messages")
COUNT_TOKENS = _api("messages/count_tokens", counted=False)  # (a count is free)
