"""SSE framing as the relay reads it: events end at a blank line whatever the line endings
(LF, CRLF, CR), at every possible chunk boundary; what is held per stream is bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dialproxy.errors import EventTooLarge
from dialproxy.wire import sse
from dialproxy.wire.relay import UsageHider, UsageScanner
from dialproxy.wire.usage import Usage

USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


def _event(obj: object, eol: bytes, separators: tuple[str, str]) -> bytes:
    return b"data: " + json.dumps(obj, separators=separators).encode() + eol + eol


def stream(eol: bytes, separators: tuple[str, str] = (",", ":")) -> tuple[bytes, bytes]:
    """A chat stream with usage asked for on the client's behalf, and what the client must
    get of it (the same bytes without the usage)."""
    chunks = [
        {"id": "c", "choices": [{"delta": {"content": f"w{i}"}}], "usage": None} for i in range(3)
    ]
    full = b"".join(_event(c, eol, separators) for c in chunks)
    full += _event({"id": "c", "choices": [], "usage": USAGE}, eol, separators)
    full += b"data: [DONE]" + eol + eol
    hidden = b"".join(
        _event({k: v for k, v in c.items() if k != "usage"}, eol, separators) for c in chunks
    )
    return full, hidden + b"data: [DONE]" + eol + eol


FRAMINGS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}
SPACINGS = {"compact": (",", ":"), "spaced": (", ", ": "), "odd": (" ,\t", " :\t ")}


@pytest.mark.parametrize("eol", FRAMINGS.values(), ids=FRAMINGS.keys())
@pytest.mark.parametrize("separators", SPACINGS.values(), ids=SPACINGS.keys())
def test_every_two_way_split_finds_the_usage_and_hides_it(
    eol: bytes, separators: tuple[str, str]
) -> None:
    full, expected = stream(eol, separators)
    for i in range(len(full) + 1):
        scanner, hider = UsageScanner(), UsageHider()
        relayed = scanner.feed(full[:i]) + scanner.feed(full[i:]) + scanner.flush()
        out = hider.feed(full[:i]) + hider.feed(full[i:]) + hider.flush()
        assert relayed == full, i
        assert scanner.usage == hider.usage == Usage(11, 5, 16), i
        # What the client gets parses to the same events as what it should get.
        assert _events(out) == _events(expected), i
        assert b'"usage"' not in out, i


def _events(data: bytes) -> list[object]:
    """The events' data, decoded where JSON (how it is spaced does not matter)."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    decoded = [sse.event_json(e) for e in text.split(b"\n\n") if e.strip()]
    return [d if d is not None else "not JSON" for d in decoded]


@pytest.mark.parametrize("eol", FRAMINGS.values(), ids=FRAMINGS.keys())
def test_byte_by_byte_complete_events_go_out_as_soon_as_they_end(eol: bytes) -> None:
    full, _ = stream(eol)
    hider = UsageHider()
    first_event_end = full.index(eol + eol) + 2 * len(eol)
    out = b""
    for i in range(first_event_end):
        out += hider.feed(full[i : i + 1])
    if eol == b"\r":  # a lone CR may yet be the start of a CRLF: it ends the event anyway
        assert out.endswith(b"\r\r")
    assert out.count(b"data:") == 1  # the first event is out, nothing of the second


def test_mixed_line_endings_end_events() -> None:
    events = [b"data: 1\n\r\n", b"data: 2\r\n\n", b"data: 3\r\r\n", b"data: 4\n\r", b"data: 5\n\n"]
    data = b"".join(events)
    assert sse.complete_end(data) == len(data)
    ends, pos = [], 0
    while pos < len(data):
        _, stop = sse.event_around(data, pos)
        ends.append(stop)
        pos = stop
    assert ends[:3] == [len(b"".join(events[: i + 1])) for i in range(3)]


def test_a_crlf_inside_an_event_is_no_end() -> None:
    assert sse.complete_end(b"data: a\r\ndata: b\r\n") == 0
    assert sse.complete_end(b"data: a\r\ndata: b\r\n\r\n") == 20
    assert sse.event_data(b"event: x\r\ndata: a\r\ndata:b\r\n\r\n") == b"a\nb"


def test_only_the_top_level_usage_of_an_event_counts() -> None:
    nested = {"choices": [], "usage": USAGE | {"usage": {"total_tokens": 10**9}}}
    inner_only = {"choices": [{"delta": {"usage": {"total_tokens": 10**9}}}]}
    data = _event(inner_only, b"\n", (",", ":")) + _event(nested, b"\n", (",", ":"))
    scanner = UsageScanner()
    scanner.feed(data)
    assert scanner.usage == Usage(11, 5, 16)
    scanner = UsageScanner()
    scanner.feed(_event(inner_only, b"\n", (",", ":")))
    assert scanner.usage is None


def test_a_usage_whose_counts_are_not_counts_is_no_usage() -> None:
    bad = {"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": "9"}}
    scanner = UsageScanner()
    scanner.feed(_event(bad, b"\n", (",", ":")))
    assert scanner.usage is None


@pytest.mark.parametrize("reader", [UsageScanner, UsageHider])
def test_whole_events_of_any_size_pass(reader: type[UsageScanner | UsageHider]) -> None:
    assert reader(max_event=1000).feed(b"data: " + b"y" * 5000 + b"\n\n").endswith(b"y\n\n")


def test_the_hider_refuses_to_hold_an_event_over_the_cap() -> None:
    relay = UsageHider(max_event=1000)
    relay.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge):
        relay.feed(b"x" * 200)


def test_the_scanner_relays_an_event_over_the_cap_and_reads_the_usage_after_it() -> None:
    """It holds nothing back from the client: a big event is relayed whole, in pieces."""
    scanner = UsageScanner(max_event=1000)
    big = b"data: " + b"z" * 5000 + b"\r\n\r\n"
    usage = _event({"choices": [], "usage": USAGE}, b"\r\n", (",", ":"))
    stream = big + usage
    relayed = b"".join(scanner.feed(stream[i : i + 100]) for i in range(0, len(stream), 100))
    assert relayed == stream and scanner.usage == Usage(11, 5, 16)


@pytest.mark.parametrize("eol", FRAMINGS.values(), ids=FRAMINGS.keys())
def test_an_event_in_many_small_chunks(eol: bytes) -> None:
    """Held as it comes (searched and joined once when it ends), byte by byte too."""
    event = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + eol + eol
    hider = UsageHider()
    out = b"".join(hider.feed(event[i : i + 1]) for i in range(len(event))) + hider.flush()
    assert hider.usage == Usage(11, 5, 16) and b"usage" not in out


@pytest.mark.parametrize("choices", [{"choices": []}, {"choices": None}, {}])
def test_the_usage_event_is_hidden_whatever_its_choices_say(choices: dict[str, Any]) -> None:
    """The usage-only event the proxy asked for, with its choices empty, null or left out
    (as some OpenAI-compatible servers send it): dropped, its usage kept; an event with
    choices and no usage goes out."""
    content = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    data = _event(content, b"\n", (",", ":")) + _event(
        {"id": "c1"} | choices | {"usage": USAGE}, b"\n", (",", ":")
    )
    hider = UsageHider()
    out = hider.feed(data) + hider.flush()
    assert out == _event(content, b"\n", (",", ":"))
    assert hider.usage == Usage(11, 5, 16)


def test_events_are_estimated_from_chunks_and_bytes() -> None:
    """About an event a chunk (an upstream streams one at a time), or one per 256 bytes
    when it sends them together."""
    full, _ = stream(b"\r\n")
    scanner = UsageScanner()
    for i in range(0, len(full), 7):
        scanner.feed(full[i : i + 7])
    scanner.flush()
    assert scanner.events == len(range(0, len(full), 7))
    whole = UsageScanner()
    whole.feed(full * 4)
    assert whole.events == len(full) * 4 // 256 > 1


def test_events_before_an_event_over_the_cap_in_the_same_chunk_still_go_out() -> None:
    first = b'data: {"id": "c", "choices": [{"delta": {"content": "hi"}}]}\n\n'
    for framing in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        event = first.replace(b"\n\n", framing)
        hider = UsageHider(max_event=1000)
        with pytest.raises(EventTooLarge) as cut:
            hider.feed(event + b"data: " + b"x" * 2000)
        assert cut.value.relayed == event
        held = UsageHider(max_event=1000)
        held.feed(b"data: ")  # an event held from an earlier chunk, then more
        with pytest.raises(EventTooLarge) as cut:
            held.feed(b'"a"' + framing + event + b"data: " + b"x" * 2000)
        assert cut.value.relayed == b'data: "a"' + framing + event
