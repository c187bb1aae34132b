"""Stream readers that sit in the relay: fed each chunk as it comes from the upstream, they
return what goes on to the client and keep the stream's usage.

- :class:`UsageScanner` relays every byte as it came and reads the usage of the complete
  events (the client asked for usage itself, or the backend is an adapter).
- :class:`UsageHider` relays complete events only, without the usage the proxy asked for
  on the client's behalf: the usage-only final event and the ``"usage": null`` fields.

Both hold back at most one unfinished event, up to ``max_event`` bytes (beyond it
:class:`~dialproxy.wire.sse.EventTooLarge`), and count the chunks and bytes they have
been fed (what an estimate goes by when a stream is cut before its usage: see
:attr:`_Reader.events`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dialproxy.errors import EventTooLarge
from dialproxy.wire import sse
from dialproxy.wire.usage import CHAT_USAGE, MARK, Usage, UsageRule, usage_in

_NULL = b'"usage":null'
_NULL_SPACED = b'"usage": null'
_COMMA_NULL = b',"usage":null'
_COMMA_NULL_SPACED = b', "usage": null'
# A null usage field written any other way (spaces, tabs, line breaks, first in its object).
_ANY_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
EVENT_BYTES = 256  # bytes of a stream taken for one event in an estimate


class _Reader:
    __slots__ = ("_held", "_max", "_rule", "_size", "bytes", "chunks", "ended", "usage")

    def __init__(self, max_event: int = sse.MAX_EVENT, rule: UsageRule = CHAT_USAGE) -> None:
        self._max = max_event
        self._rule = rule  # where the API's events say what was used
        self._held: list[bytes] = []  # an event that has not ended yet, as it came
        self._size = 0  # its bytes
        self.usage: Usage | None = None
        self.chunks = self.bytes = 0
        self.ended = False  # the stream ended (flushed), not cut

    @property
    def events(self) -> int:
        """About how many events came: an upstream sends about one a chunk as it streams,
        and an event of a chat stream is 150-250 bytes (counted, not searched for: a count
        of ``data:`` would be one more pass over every chunk)."""
        return max(self.chunks, self.bytes // EVENT_BYTES)

    @property
    def mid_event(self) -> bool:
        """Whether the client's stream stops inside an event (part of it relayed): only a
        reader that relays bytes as they come (:class:`UsageScanner`) leaves it so."""
        return False

    @property
    def has_all_usage(self) -> bool:
        """Whether the usage read so far is the stream's (an API whose events each add to
        it has it all only once the stream has ended)."""
        return self.usage is not None and (self._rule.last_wins or self.ended)

    def _complete(self, chunk: bytes) -> bytes:
        """The complete events of what is held with ``chunk``; the rest is held.  An event
        arriving in many chunks is searched and copied once, not once a chunk."""
        self.chunks += 1
        self.bytes += len(chunk)
        held = self._held
        if not held:
            if chunk.endswith(b"\n\n"):  # the usual: whole events, LF-framed
                return chunk
            end = sse.complete_end(chunk)
            if end == len(chunk):
                return chunk
            self._hold(chunk[end:], chunk[:end])
            return chunk[:end]
        # A blank line may start in the last bytes held: those two and the new chunk.
        tail = held[-1][-2:]
        end = sse.complete_end(tail + chunk) - len(tail)
        if end <= 0:
            self._hold(chunk)
            return b""
        data = b"".join(held) + chunk[:end]
        held.clear()
        self._size = 0
        if end < len(chunk):
            self._hold(chunk[end:], data)
        return data

    def _hold(self, part: bytes, complete: bytes = b"") -> None:
        """Holds ``part`` (an event not ended); ``complete``: the events ended before it."""
        self._held.append(part)
        self._size += len(part)
        if self._size > self._max:
            self._overflow(complete)

    def _overflow(self, complete: bytes) -> None:
        raise EventTooLarge(f"an upstream event grew past {self._max} bytes", complete)

    def _rest(self) -> bytes:
        """What is held when the stream ends (an event the upstream did not end)."""
        self.ended = True
        if not self._held:  # the usual: the stream ended with its last event
            return b""
        data = b"".join(self._held)
        self._held.clear()
        self._size = 0
        return data

    def _read_usage(self, events: bytes, end: int) -> int:
        """Looks at the events of ``events[:end]`` that hold a usage mark, from the last;
        keeps the first usage with a value (or, when every event adds to the usage, reads
        them all).  Returns where the event read last starts (0: none)."""
        read, last_wins = self._rule
        found = 0
        while end > 0:
            index = events.rfind(MARK, 0, end)
            if index < 0:
                return found
            start, _, answer = sse.decoded_event_around(events, index)
            usage = read(answer, self.usage)
            if usage is not None:
                self.usage = usage
                if last_wins:
                    return start
                found = start
            end = start
        return found


class UsageScanner(_Reader):
    """Relays each chunk as it came; reads the usage of the events as they complete.  It
    holds nothing back from the client, so an event over ``max_event`` is not a reason to
    cut the stream: what is held of it is dropped (its usage, if any, is not read)."""

    __slots__ = ()

    def _overflow(self, complete: bytes) -> None:
        self._held[:] = [self._held[-1][-2:]]  # (a blank line may start in the last bytes)
        self._size = len(self._held[0])

    @property
    def mid_event(self) -> bool:
        return bool(self._held)  # (what it holds of an event, it has relayed too)

    def feed(self, chunk: bytes) -> bytes:
        events = self._complete(chunk)
        if events.find(MARK) >= 0:  # (find: bytes' ``in`` first tries its operand as an int)
            self._scan(events)
        return chunk

    def flush(self) -> bytes:
        rest = self._rest()
        if rest.find(MARK) >= 0:
            self._scan(rest)
        return b""  # (every byte was relayed as it came)

    def _scan(self, events: bytes) -> None:
        marks = events.count(MARK)
        nulls = events.count(_NULL)
        if nulls < marks:
            nulls += events.count(_NULL_SPACED)
        if nulls < marks:  # a usage with a value, or a null written otherwise
            self._read_usage(events, len(events))


class UsageHider(_Reader):
    """Relays complete events without the usage asked for on the client's behalf; keeps
    the last usage it sees.  An event with a usage and no choices (empty, null or none) is
    dropped whole."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        try:
            events = self._complete(chunk)
        except EventTooLarge as e:  # the events before it still go out
            e.relayed = self._hide(e.relayed) if e.relayed else e.relayed
            raise
        return self._hide(events) if events else events

    def flush(self) -> bytes:
        rest = self._rest()
        return self._hide(rest) if rest else rest

    def _hide(self, events: bytes) -> bytes:
        # The nulls cut with one split (the usual: compact JSON, a null in every event);
        # a mark left is a usage with a value, or a null written otherwise.
        parts = events.split(_COMMA_NULL)
        if len(parts) > 1:
            events = b"".join(parts)
        index = events.find(MARK)
        return events if index < 0 else self._drop_usage_events(events, index)

    def _drop_usage_events(self, events: bytes, index: int) -> bytes:
        """``events`` without those that have a usage and no choices (``index``: the first
        usage mark left in it), and without null usages written other than compactly; the
        last usage is kept.  One pass forward: each mark's event read once, the search
        going on past it."""
        found: Usage | None = None
        kept: list[bytes] = []  # what goes out before ``done``
        done = 0  # where what is not yet kept starts
        nulls = False
        while index >= 0:
            start, stop, answer = sse.decoded_event_around(events, index)
            if type(answer) is dict:
                value = answer.get("usage", MARK)
                if value is None:
                    nulls = True  # "usage": null, spaced: cut below
                elif value is not MARK:
                    usage = usage_in(value)
                    if usage is not None:  # (the last one is the stream's)
                        found = usage
                    if not answer.get("choices"):  # the usage event (valid or not): its
                        # choices empty, null or left out (not every upstream sends `[]`)
                        kept.append(events[done:start])
                        done = stop
            index = events.find(MARK, stop)
        if found is not None:
            self.usage = found
        if done:
            kept.append(events[done:])
            events = b"".join(kept)
        if nulls:
            events = _ANY_NULL.sub(b"", events.replace(_COMMA_NULL_SPACED, b""))
        return events


class EventRewriter(_Reader):
    """Relays complete events, each batch passed through ``rewrite`` (an API's ids made the
    proxy's own); reads the usage of the events as they complete.  An event over
    ``max_event`` cuts the stream (:class:`~dialproxy.wire.sse.EventTooLarge`)."""

    __slots__ = ("rewrite",)

    def __init__(
        self,
        rewrite: Callable[[bytes], bytes],
        max_event: int = sse.MAX_EVENT,
        rule: UsageRule = CHAT_USAGE,
    ) -> None:
        super().__init__(max_event, rule)
        self.rewrite = rewrite

    def feed(self, chunk: bytes) -> bytes:
        try:
            events = self._complete(chunk)
        except EventTooLarge as e:  # the events before it still go out
            e.relayed = self.rewrite(e.relayed) if e.relayed else e.relayed
            raise
        if events.find(MARK) >= 0:
            self._read_usage(events, len(events))
        return self.rewrite(events) if events else events

    def flush(self) -> bytes:
        rest = self._rest()
        if rest.find(MARK) >= 0:
            self._read_usage(rest, len(rest))
        return self.rewrite(rest) if rest else rest


Relay = UsageScanner | UsageHider | EventRewriter
"""The reader a stream is relayed through."""
