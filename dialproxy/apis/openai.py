"""DIAL's own APIs, OpenAI's shape: chat/completions, completions, embeddings.

Route: ``/openai/deployments/{id}/<api>`` (the deployment in the path) and
``/openai/v1/<api>`` (in the body's ``model``).  Body rule: the model's ``defaults`` and
``overrideName``; a direct backend's stream asked for its usage (hidden from a client that
did not ask).  Usage: the top-level ``usage`` of the answer or of the last event that has
one.  Errors: DIAL's ``{"error": {"message", "code"}}``, ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from dialproxy import errorbody
from dialproxy.apis import Api, ErrorShape, rewritten, with_defaults
from dialproxy.counting.limiter import WindowState
from dialproxy.wire.headers import FORWARDED_REQUEST_HEADERS
from dialproxy.wire.usage import CHAT_USAGE

if TYPE_CHECKING:
    from dialproxy.config.model import Model

FORWARDED_HEADERS = (*FORWARDED_REQUEST_HEADERS, "openai-beta")


def go_duration(seconds: float) -> str:
    """Seconds written as OpenAI writes resets: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms" if seconds > 0 else "0ms"
    return _whole_seconds(round(seconds))


@functools.lru_cache(maxsize=4096)  # resets move by the second: most requests hit
def _whole_seconds(total: int) -> str:
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(
    requests: WindowState | None, tokens: WindowState | None
) -> list[tuple[str, str]]:
    """The ``x-ratelimit-*`` headers of the tightest request and token windows.  (Built in
    one call, :func:`go_duration` inline for a second or more: this runs on every request
    with a limit.)"""
    headers: list[tuple[str, str]] = []
    if requests is not None:
        window, used, reset = requests.window, requests.used, requests.reset
        limit = window.limit
        headers += (
            ("x-ratelimit-limit-requests", window.text),
            ("x-ratelimit-remaining-requests", str(limit - used) if used < limit else "0"),
            (
                "x-ratelimit-reset-requests",
                _whole_seconds(round(reset)) if reset >= 1 else go_duration(reset),
            ),
        )
    if tokens is not None:
        window, used, reset = tokens.window, tokens.used, tokens.reset
        limit = window.limit
        headers += (
            ("x-ratelimit-limit-tokens", window.text),
            ("x-ratelimit-remaining-tokens", str(limit - used) if used < limit else "0"),
            (
                "x-ratelimit-reset-tokens",
                _whole_seconds(round(reset)) if reset >= 1 else go_duration(reset),
            ),
        )
    return headers


def sse_error(message: str, status: int = 502) -> bytes:
    """The event a stream ends with when it cannot go on (the openai SDK raises an
    ``APIError`` with the message on an event that has an ``error``)."""
    body = {"error": {"message": message, "code": str(status), "type": "upstream_error"}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DIAL_ERRORS = ErrorShape(errorbody.response_for, sse_error, ratelimit_headers)


# Appended to a streamed body (its closing brace replaced) to ask for usage.
_USAGE_OPTION = b',"stream_options":{"include_usage":true}}'


def chat_body(body: dict[str, Any], raw: bytes, model: Model) -> tuple[bytes | None, bool]:
    """``defaults``/``overrideName``; a direct backend's stream asked for its usage."""
    updates = with_defaults(body, model.defaults, model.override_name)
    injected_usage = False
    if model.direct and body.get("stream") is True:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            updates["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            injected_usage = True
    if not updates:
        return None, False
    if injected_usage and len(updates) == 1 and "stream_options" not in body:
        # Only the option to add: the client's bytes with it appended (nothing re-encoded).
        return raw.rstrip()[:-1] + _USAGE_OPTION, True
    return rewritten(body, raw, updates), injected_usage


def embeddings_body(body: dict[str, Any], raw: bytes, model: Model) -> tuple[bytes | None, bool]:
    """``defaults``/``overrideName`` (embeddings never stream)."""
    updates = with_defaults(body, model.defaults, model.override_name)
    return (rewritten(body, raw, updates) if updates else None), False


def _api(name: str, interface: str, body: Any, completion: tuple[str, ...]) -> Api:
    return Api(
        name=name,
        interface=interface,
        paths=(f"/openai/deployments/{{id}}/{name}", f"/openai/v1/{name}"),
        body=body,
        usage=CHAT_USAGE,
        errors=DIAL_ERRORS,
        forwarded_headers=FORWARDED_HEADERS,
        completion_fields=completion,
    )


_MAX = ("max_completion_tokens", "max_tokens")
CHAT = _api("chat/completions", "openaiChatCompletions", chat_body, _MAX)
COMPLETIONS = _api("completions", "openaiChatCompletions", chat_body, _MAX)
EMBEDDINGS = _api("embeddings", "openaiEmbeddings", embeddings_body, ())
