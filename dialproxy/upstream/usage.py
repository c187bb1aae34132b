"""Finding ``usage`` in a response without parsing more of it than needed.

DIAL counts the **last** ``"usage": {...}`` object of a response; for a stream, the last
chunk carrying a non-null ``usage``.  A quote inside a JSON string is always escaped, so
the bytes ``"usage"`` can only be a key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_MARK = b'"usage"'
_DECODER = json.JSONDecoder()
_MAX_PENDING = 65_536


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None

    def num(name: str) -> int:
        value = obj.get(name)
        return value if isinstance(value, int) and value >= 0 else 0

    prompt, completion = num("prompt_tokens"), num("completion_tokens")
    total = num("total_tokens") or prompt + completion
    return Usage(prompt, completion, total)


def _decode_at(data: bytes, index: int) -> tuple[Any, bool]:
    """Decode the value after ``"usage"`` at ``index``: (value, complete)."""
    text = data[index + len(_MARK) :].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return None, bool(text)
    text = text[1:].lstrip()
    try:
        value, _ = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return None, False
    return value, True


def find_usage(body: bytes) -> Usage | None:
    """The last usage object of a complete (non-streamed) body."""
    index = body.rfind(_MARK)
    while index >= 0:
        value, _ = _decode_at(body, index)
        usage = _usage(value)
        if usage is not None:
            return usage
        index = body.rfind(_MARK, 0, index)
    return None


class UsageScanner:
    """Fed a stream chunk by chunk; keeps the last non-null usage it has seen."""

    __slots__ = ("_pending", "_tail", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._pending = b""  # from a "usage" mark whose value is not complete yet
        self._tail = b""  # the last bytes of the previous chunk, for a mark split in two

    def feed(self, chunk: bytes) -> None:
        if self._pending:
            self._pending += chunk
            self._try_pending()
            if self._pending:
                return
        data = self._tail + chunk if self._tail else chunk
        self._tail = data[-(len(_MARK) - 1) :]
        index = data.find(_MARK)
        while index >= 0:
            after = data[index + len(_MARK) : index + len(_MARK) + 7]
            if after.startswith((b":null", b": null")):  # the common case: nothing to decode
                index = data.find(_MARK, index + len(_MARK))
                continue
            self._pending = data[index:]
            self._try_pending()
            if self._pending:  # incomplete: wait for the next chunk
                return
            index = data.find(_MARK, index + len(_MARK))

    def _try_pending(self) -> None:
        value, complete = _decode_at(self._pending, 0)
        if complete:
            usage = _usage(value)
            if usage is not None:
                self.usage = usage
            self._pending = b""
        elif len(self._pending) > _MAX_PENDING:
            self._pending = b""
