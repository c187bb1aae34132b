"""The APIs the proxy serves, one small module each: what makes one API differ from another.

An :class:`Api` is a route (the paths it is served on, the deployment in the path or in the
body's ``model``), a body rule (what the upstream gets), a usage rule (where an answer and a
stream say what they used) and an error shape (how a refusal, a stream's error event and our
rate-limit headers are written).  The request path (:func:`dialproxy.web.proxy.handle`) is
one straight line for every API; it asks the API for these and nothing else.

- :mod:`~dialproxy.apis.openai`: chat/completions, completions, embeddings (DIAL's own).
- :mod:`~dialproxy.apis.responses`: the OpenAI Responses API (its ids rewritten).
- :mod:`~dialproxy.apis.anthropic`: the Anthropic Messages API and its token counting.

A fourth API is one more module that builds an :class:`Api` and is listed in :data:`APIS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson

from dialproxy.wire.headers import FORWARDED_REQUEST_HEADERS
from dialproxy.wire.usage import MAX_TOKENS, UsageRule

if TYPE_CHECKING:
    from aiohttp import web

    from dialproxy.config.model import Model, Route, Serving
    from dialproxy.counting.limiter import WindowState

BodyRule = Callable[[dict[str, Any], bytes, "Model"], tuple[bytes | None, bool]]
"""(body as read, its bytes, model) -> (the body the upstream gets, None: the client's bytes
unchanged; whether usage was asked for on the client's behalf, to be hidden from it)."""


class ErrorShape(NamedTuple):
    """How an API writes what the proxy says itself."""

    # (request, exception) -> the error response
    response: Callable[[web.Request, Exception], web.Response]
    # (message, status) -> the event a stream ends with when it cannot go on
    stream_error: Callable[[str, int], bytes]
    # (tightest request window, tightest token window) -> our rate-limit headers
    ratelimit_headers: Callable[[WindowState | None, WindowState | None], list[tuple[str, str]]]


class AnswerIds(Protocol):
    """An API's ids in one answer, made the proxy's own (the Responses API's)."""

    def served_by(self, route: Route, serving: Serving) -> None:
        """The upstream that answers (what the proxy's ids name)."""

    def route(self, serving: Serving) -> Route | None:
        """The one upstream the request may go to (None: any)."""

    def body(self, data: bytes, answer: Any, learn: bool = True) -> bytes:
        """A whole answer, its ids rewritten (``answer``: decoded, None if it was not;
        ``learn``: the answer may make a new one, a success)."""

    def events(self, data: bytes) -> bytes:
        """Complete stream events, their ids rewritten."""

    @property
    def charged_once(self) -> str | None:
        """The id of ours whose usage is charged once, whoever brings it (a background
        response's: a follow-up may see it too); None: none."""


@dataclass(frozen=True, slots=True)
class Api:
    """One API the proxy serves."""

    name: str  # how a model's `serving` names it; in logs
    interface: str  # DIAL's interface type that serves it (`interfaces` key)
    paths: tuple[str, ...]  # POSTed; `{id}` in a path names the deployment, else the body's model
    body: BodyRule
    usage: UsageRule
    errors: ErrorShape
    forwarded_headers: tuple[str, ...] = FORWARDED_REQUEST_HEADERS
    counted: bool = True  # False: neither limited nor counted (a token count)
    # The body's fields that cap the completion (its reservation; none: it has none)
    completion_fields: tuple[str, ...] = ()
    x_api_key: bool = False  # the key may come in `x-api-key` too (Anthropic's clients)
    # (body, deployment, project) -> the ids of the answer to rewrite (None: none are)
    ids: Callable[[dict[str, Any], str, str], AnswerIds] | None = None
    shutdown_event: bytes = b""  # what a stream open when the shutdown's grace ends gets

    def __post_init__(self) -> None:
        event = self.errors.stream_error("The server is shutting down: the stream was ended", 503)
        object.__setattr__(self, "shutdown_event", event)

    def reservation(self, body: dict[str, Any], size: int, model: Model) -> tuple[int, int]:
        """What a request holds in its token and cost windows from admission until it is
        settled: the prompt at one token per four bytes of its body (``size``), the
        completion at the most it asks for (the API's ``completion_fields``; at most
        :data:`~dialproxy.wire.usage.MAX_TOKENS`: a client's 2^63 must not overflow a
        counter), else the
        model's ``maxCompletionTokens``, else :data:`DEFAULT_COMPLETION_RESERVE`; an
        embedding, none."""
        prompt = max(size // 4, 1)
        completion = 0
        if self.completion_fields:
            for name in self.completion_fields:
                value = body.get(name)
                if type(value) is int and value > 0:
                    completion = value if value < MAX_TOKENS else MAX_TOKENS
                    break
            else:
                most = model.token_limits.get("maxCompletionTokens")
                if type(most) is not int or most <= 0:
                    completion = DEFAULT_COMPLETION_RESERVE
                else:  # (the config's may be past any model's too)
                    completion = most if most < MAX_TOKENS else MAX_TOKENS
        pricing = model.pricing
        cost = pricing.cost_nano_usd(prompt, completion) if pricing is not None else 0
        return prompt + completion, cost


# The completion tokens a request reserves when it says no maximum and its model has no
# `limits.maxCompletionTokens`.
DEFAULT_COMPLETION_RESERVE = 256


def with_defaults(
    body: dict[str, Any], defaults: Mapping[str, Any], override_name: str | None
) -> dict[str, Any]:
    """The fields a body gets from the model: ``defaults`` it lacks, the ``overrideName``."""
    updates = {n: v for n, v in defaults.items() if n not in body} if defaults else {}
    if override_name is not None and body.get("model") != override_name:
        updates["model"] = override_name
    return updates


# orjson reads an integer beyond 64 bits as a float; json keeps it exact.  A body that may
# hold one (a run of 19 digits, in a string or not) is rewritten from json's reading.  The
# search runs only on a body with 19 digits in all (a count is ~5x cheaper than the search).
_LONG_NUMBER = re.compile(rb"\d{19}")
_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)


def _may_hold_long_number(raw: bytes) -> bool:
    return len(raw.translate(None, _NOT_DIGITS)) >= 19 and _LONG_NUMBER.search(raw) is not None


def rewritten(body: dict[str, Any], raw: bytes, updates: dict[str, Any]) -> bytes:
    """``body`` (read from ``raw``) with ``updates``, encoded: every value as the client
    wrote it (numbers beyond 64 bits exact, lone surrogate escapes kept)."""
    if not _may_hold_long_number(raw):
        try:
            return orjson.dumps(body | updates)
        except TypeError:  # a string orjson cannot write (a lone surrogate escape)
            exact = body | updates
    else:
        exact = json.loads(raw) | updates
    # ASCII with escapes: any string Python's json read, lone surrogates too, written back
    return json.dumps(exact, separators=(",", ":")).encode()
