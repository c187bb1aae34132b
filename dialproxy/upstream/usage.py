"""Finding ``usage`` in a response without parsing more of it than needed.

DIAL counts the **last** ``"usage": {...}`` object of a response; for a stream, the last
chunk carrying a non-null ``usage``.  A quote inside a JSON string is always escaped, so
the bytes ``"usage"`` can only be a key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

_MARK = b'"usage"'
_NULLS = (b'"usage":null', b'"usage": null')
_SPACE = b" \t\r\n"
_COLON, _BRACE = ord(":"), ord("{")
_MAX_PENDING = 65_536


class Usage(NamedTuple):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


_new_usage = tuple.__new__  # (Usage(...) is a Python-level call)


def _usage(obj: Any) -> Usage | None:
    if type(obj) is not dict:
        return None
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    total = obj.get("total_tokens")
    # Counts are non-negative ints; anything else counts as 0.
    if type(prompt) is not int or prompt < 0:
        prompt = 0
    if type(completion) is not int or completion < 0:
        completion = 0
    if type(total) is not int or total <= 0:
        total = prompt + completion
    usage: Usage = _new_usage(Usage, (prompt, completion, total))
    return usage


def _skip_space(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] in _SPACE:
        pos += 1
    return pos


def _decode_at(data: bytes, index: int) -> tuple[Any, bool]:
    """Decode the value after ``"usage"`` at ``index``: (value, complete).  Only an object
    is decoded (from its ``{`` to the first ``}`` that closes valid JSON: the shortest
    prefix that parses is the whole object); any other value is None."""
    pos = index + len(_MARK)
    if data.startswith(b":{", pos):  # compact JSON, the usual
        pos += 1
    else:
        pos = _skip_space(data, pos)
        if pos == len(data):
            return None, False
        if data[pos] != _COLON:
            return None, True
        pos = _skip_space(data, pos + 1)
        if pos == len(data):
            return None, False
        if data[pos] != _BRACE:
            return None, len(data) - pos >= 4  # null, a number...: complete once past "null"
    end = data.find(b"}", pos)
    while end >= 0:
        try:
            return orjson.loads(data[pos : end + 1]), True
        except orjson.JSONDecodeError:
            end = data.find(b"}", end + 1)
    return None, False


def usage_at(data: bytes, index: int) -> Usage | None:
    """The usage object after the ``"usage"`` mark at ``index`` (None: not an object)."""
    return _usage(_decode_at(data, index)[0])


def find_usage(body: bytes) -> Usage | None:
    """The last usage object of a complete (non-streamed) body."""
    index = body.rfind(_MARK)
    while index >= 0:
        usage = usage_at(body, index)
        if usage is not None:
            return usage
        index = body.rfind(_MARK, 0, index)
    return None


class UsageScanner:
    """Fed a stream chunk by chunk; keeps the last non-null usage it has seen.  Relays
    each chunk as it is (:meth:`feed` returns it)."""

    __slots__ = ("_pending", "_tail", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._pending = b""  # from a "usage" mark whose value is not complete yet
        self._tail = b""  # the last bytes of the previous chunk, for a mark split in two

    def feed(self, chunk: bytes) -> bytes:
        self._scan(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def _scan(self, chunk: bytes) -> None:
        if self._pending:
            self._pending += chunk
            self._try_pending()
            if self._pending:
                return
        data = self._tail + chunk if self._tail else chunk
        self._tail = data[-(len(_MARK) - 1) :]
        if data.count(_MARK) == data.count(_NULLS[0]):
            return  # the common chunk: no usage, or only (compact) nulls
        # From the end: the last usage of the chunk is the one that counts.
        index = data.rfind(_MARK)
        while index >= 0:
            if not data.startswith(_NULLS, index):
                value, complete = _decode_at(data, index)
                if not complete:  # the chunk ends inside it: wait for the rest
                    self._pending, self._tail = data[index:], b""
                    return
                usage = _usage(value)
                if usage is not None:
                    self.usage = usage
                    return
            index = data.rfind(_MARK, 0, index)

    def _try_pending(self) -> None:
        value, complete = _decode_at(self._pending, 0)
        if complete:
            usage = _usage(value)
            if usage is not None:
                self.usage = usage
            self._pending = b""
        elif len(self._pending) > _MAX_PENDING:
            self._pending = b""
