"""The usage an answer reports, by DIAL's rule: the top-level ``usage`` object of a
non-streamed answer, or of the last stream event that has one with a value.

Counts are non-negative integers: a usage with a count that is not one is no usage; a
missing count is 0, a missing total the sum.  A request's count over :data:`MAX_TOKENS` is
not believed either (``web.finish.settle``): no model reads or writes that many, and the
counters, the shared keys' store and the usage ledger hold 64-bit integers.  A ``usage``
anywhere else (inside another object, inside the usage itself) is not a usage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson

# Beyond this a body orjson refuses is not read again with Python's slower json.
_JSON_FALLBACK_MAX = 1024 * 1024
MARK = b'"usage"'
# The most tokens one request may count (its usage, its reservation): a billion, past any
# model's context, and far inside a 64-bit counter (and a double's exact integers, which the
# Redis scripts count in) however many requests add up in a window.
MAX_TOKENS = 1_000_000_000


class Usage(NamedTuple):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # What the API reports beside the counts (cached, reasoning tokens...): for the log line.
    details: Mapping[str, int] | None = None


_new_usage = tuple.__new__  # (Usage(...) is a Python-level call)


def usage_in(obj: Any) -> Usage | None:
    """The usage of an answer's or event's ``usage`` value (None: not an object, or one
    whose counts are not counts: a count present must be a non-negative integer; a missing
    or null one is 0, a missing total the sum)."""
    if type(obj) is not dict:
        return None
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    total = obj.get("total_tokens")
    if prompt is None:
        prompt = 0
    elif type(prompt) is not int or prompt < 0:
        return None
    if completion is None:
        completion = 0
    elif type(completion) is not int or completion < 0:
        return None
    if total is None:
        total = prompt + completion
    elif type(total) is not int or total < 0:
        return None
    usage: Usage = _new_usage(Usage, (prompt, completion, total, None))
    return usage


class UsageRule(NamedTuple):
    """Where an API's answers say what they used.

    ``read(answer, so_far)``: the usage of a decoded answer or stream event, given the
    stream's usage so far (None: this one says nothing).  ``last_wins``: the last event that
    has a usage has all of it (a relay reads back from the end and stops at the first);
    else every event that has one adds to it (read in any order: ``read`` must not care).
    """

    read: Callable[[Any, Usage | None], Usage | None]
    last_wins: bool = True


def _chat_usage(answer: Any, so_far: Usage | None) -> Usage | None:
    return usage_in(answer.get("usage")) if type(answer) is dict else None


CHAT_USAGE = UsageRule(_chat_usage)  # the top-level ``usage`` (DIAL's rule)


def read_counts(obj: Any, names: tuple[str, ...]) -> list[int] | None:
    """The counts under ``names`` of a usage object: each a non-negative integer, a missing
    or null one 0 (None: not an object, or a count that is not a count)."""
    if type(obj) is not dict:
        return None
    found = []
    for name in names:
        value = obj.get(name)
        if value is None:
            value = 0
        elif type(value) is not int or value < 0:
            return None
        found.append(value)
    return found


def counts(obj: Any, prompt_name: str, completion_name: str, total_name: str) -> Usage | None:
    """A usage object's counts under the given names, by the rule of :func:`usage_in` (a
    missing total is the sum)."""
    found = read_counts(obj, (prompt_name, completion_name))
    if found is None:
        return None
    total = obj.get(total_name)
    if total is None:
        total = found[0] + found[1]
    elif type(total) is not int or total < 0:
        return None
    usage: Usage = _new_usage(Usage, (found[0], found[1], total, None))
    return usage


def decoded(body: bytes) -> Any:
    """A complete JSON answer decoded (None: not JSON)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _python_decoded(body)


def _python_decoded(body: bytes) -> Any:
    """What orjson refuses and Python's json reads (NaN, a lone surrogate escape)."""
    if len(body) > _JSON_FALLBACK_MAX:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def find_usage(body: bytes, rule: UsageRule = CHAT_USAGE) -> Usage | None:
    """The usage of a complete (non-streamed) JSON answer.  (:func:`decoded` and, for the
    chat rule, :func:`usage_in` called here: this runs on every answer; ``rfind``: a usage
    is near the end, and bytes' ``in`` first tries its operand as an int.)"""
    if body.rfind(MARK) < 0:
        return None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = _python_decoded(body)
    if rule is CHAT_USAGE:
        return usage_in(answer.get("usage")) if type(answer) is dict else None
    return rule.read(answer, None)


def estimate(request_bytes: int, events: int) -> Usage:
    """What a stream cut off before its usage is charged: the prompt at one token per four
    bytes of the request body, the completion at one token per event that came (a chat or
    messages stream sends about one token an event; see ``relay._Reader.events``)."""
    prompt = max(request_bytes // 4, 1)
    completion = max(events, 1)
    usage: Usage = _new_usage(Usage, (prompt, completion, prompt + completion, None))
    return usage
