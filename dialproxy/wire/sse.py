"""Server-sent events as a relay needs them: where events end, and what an event says.

An event ends at a blank line.  A line ends with CRLF, LF or a lone CR (the SSE spec allows
all three), so a blank line follows wherever two line ends meet, and that is always one of
three byte pairs: ``\\n\\n`` (LF LF, CRLF LF), ``\\n\\r`` (LF CR, CRLF CRLF, LF CRLF) or
``\\r\\r`` (CR CR, CR CRLF).  When the blank line itself ends with CRLF its LF belongs to it.

A relay never parses every event: it finds where the complete events of what it holds end
(a pass from the end, stopping at the first blank line) and decodes only the few events
its rules need (those that carry a usage).
"""

from __future__ import annotations

from typing import Any

import orjson

_BLANKS = (b"\n\n", b"\n\r", b"\r\r")
_CR, _LF, _E = 13, 10, 101  # (CR, LF, "e")

# The most an event may hold before its end is seen (a setting overrides it per app).
MAX_EVENT = 4 * 1024 * 1024


def _past_blank(data: bytes, index: int) -> int:
    """Where the blank line whose byte pair starts at ``index`` ends."""
    end = index + 2
    if data[end - 1] == _CR and data[end : end + 1] == b"\n":
        end += 1
    return end


def complete_end(data: bytes, start: int = 0, stop: int | None = None) -> int:
    """Where the last complete event of ``data[start:stop]`` ends (``start``: none ends)."""
    if stop is None:
        if data.endswith(b"\n\n"):  # the usual chunk: whole events, LF-framed
            return len(data)
        stop = len(data)
    # Each search after the first looks only past what was found (found near the end, it
    # costs nothing; the common LF framing never needs the later two to go far).
    index = data.rfind(b"\n\n", start, stop)
    for blank in (b"\n\r", b"\r\r"):
        found = data.rfind(blank, max(index, start), stop)
        if found > index:
            index = found
    return start if index < 0 else _past_blank(data, index)


def event_around(data: bytes, index: int) -> tuple[int, int]:
    """The start and end of the event of ``data`` that holds the byte at ``index``; an
    event that has not ended runs to the end of ``data``."""
    start = data.rfind(b"\n\n", 0, index) + 2  # the usual: LF framing (1: none before)
    stop = data.find(b"\n\n", index) + 2
    if stop > 1 and b"\r" not in data[start:stop]:  # no CR in between: no other blank line
        return (start if start > 1 else 0), stop
    start = complete_end(data, 0, index)
    end = data.find(b"\n\n", index)
    stop = len(data) if end < 0 else end
    for blank in (b"\n\r", b"\r\r"):  # only before the first found
        found = data.find(blank, index, stop)
        if found >= 0:
            end = stop = found
    return start, len(data) if end < 0 else _past_blank(data, end)


def event_data(event: bytes) -> bytes | None:
    """The event's data: its ``data:`` lines joined by LF (None: it has none)."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2 and b"\r" not in event:
        return event[6:].rstrip(b"\n")  # the usual: one data line, LF-framed
    if b"\r" in event:
        event = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    parts = [
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


def event_json(event: bytes) -> Any:
    """The event's data decoded as JSON (None: no data, or not JSON)."""
    data = event_data(event)
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def decoded_event_around(data: bytes, index: int) -> tuple[int, int, Any]:
    """:func:`event_around` and :func:`event_json` of that event, in one call (the usual
    event, one ``data: `` line framed with LF, after an ``event: `` line or not, without
    building the lines)."""
    start = data.rfind(b"\n\n", 0, index) + 2
    if start < 2:
        start = 0
    stop = data.find(b"\n\n", index) + 2
    if stop > 1:
        begin = start
        # (a named event: its name on a line first; a byte compared before a call)
        if data[start] == _E and data.startswith(b"event: ", start):
            begin = data.find(b"\n", start, stop) + 1
        if data.startswith(b"data: ", begin):
            line = data[begin + 6 : stop - 2]
            # (find, not ``in``: bytes' ``in`` first tries its operand as an int)
            if line.find(b"\n") < 0 and line.find(b"\r") < 0:
                try:
                    return start, stop, orjson.loads(line)
                except orjson.JSONDecodeError:
                    return start, stop, None
    start, stop = event_around(data, index)
    return start, stop, event_json(data[start:stop])
