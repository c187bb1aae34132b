"""Usage found, and injected usage hidden, however the stream is cut into chunks."""

from __future__ import annotations

import json

import pytest

from dialproxy.wire.relay import UsageHider, UsageScanner
from dialproxy.wire.usage import Usage, find_usage


def event(obj: object, separators: tuple[str, str] = (",", ":")) -> bytes:
    return b"data: " + json.dumps(obj, separators=separators).encode() + b"\n\n"


CHUNKS = [
    {"id": "c", "choices": [{"delta": {"content": f' w{i} "usage"'}}], "usage": None}
    for i in range(3)
]
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
STREAM = (
    b"".join(event(c) for c in CHUNKS)
    + event({"id": "c", "choices": [], "usage": USAGE})
    + b"data: [DONE]\n\n"
)
EXPECTED_FOR_CLIENT = (
    b"".join(event({k: v for k, v in c.items() if k != "usage"}) for c in CHUNKS)
    + b"data: [DONE]\n\n"
)


# The same stream as Python's json.dumps writes it by default (vLLM and others do).
SPACED = (", ", ": ")
STREAM_SPACED = (
    b"".join(event(c, SPACED) for c in CHUNKS)
    + event({"id": "c", "choices": [], "usage": USAGE}, SPACED)
    + b"data: [DONE]\n\n"
)
EXPECTED_SPACED = (
    b"".join(event({k: v for k, v in c.items() if k != "usage"}, SPACED) for c in CHUNKS)
    + b"data: [DONE]\n\n"
)


def cuts(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64, 10_000])
@pytest.mark.parametrize(
    ("stream", "expected"), [(STREAM, EXPECTED_FOR_CLIENT), (STREAM_SPACED, EXPECTED_SPACED)]
)
def test_any_chunking_finds_usage_and_hides_what_was_injected(
    size: int, stream: bytes, expected: bytes
) -> None:
    scanner, hide = UsageScanner(), UsageHider()
    out = relayed = b""
    for chunk in cuts(stream, size):
        relayed += scanner.feed(chunk)
        out += hide.feed(chunk)
    out += hide.flush()
    relayed += scanner.flush()
    assert scanner.usage == hide.usage == Usage(3, 4, 7)
    assert relayed == stream  # the scanner relays every byte as it came
    assert out == expected


def test_the_filter_finds_a_usage_in_a_stream_cut_off_before_its_last_event_ends() -> None:
    hide = UsageHider()
    cut = STREAM[: STREAM.index(b"data: [DONE]") - 2]  # the usage event without its "\n\n"
    out = hide.feed(cut) + hide.flush()
    assert hide.usage == Usage(3, 4, 7)
    assert out == EXPECTED_FOR_CLIENT[: -len(b"data: [DONE]\n\n")]  # (hidden all the same)


def test_every_two_way_split() -> None:
    for i in range(len(STREAM)):
        scanner = UsageScanner()
        scanner.feed(STREAM[:i])
        scanner.feed(STREAM[i:])
        assert scanner.usage == Usage(3, 4, 7), i


def test_only_the_top_level_usage_of_a_body_counts() -> None:
    body = json.dumps({"usage": {"total_tokens": 1}, "x": {"usage": USAGE}}).encode()
    assert find_usage(body) == Usage(0, 0, 1)
    nested = {"usage": USAGE | {"usage": {"total_tokens": 10**9}}}
    assert find_usage(json.dumps(nested).encode()) == Usage(3, 4, 7)
    assert find_usage(json.dumps({"x": {"usage": USAGE}}).encode()) is None
    assert find_usage(b'{"choices": []}') is None
    assert find_usage(b'{"usage": null}') is None


def test_only_usage_only_events_are_hidden() -> None:
    """Azure's first event has no choices and no usage (its prompt filter results): kept."""
    azure_first = event({"choices": [], "prompt_filter_results": [{"prompt_index": 0}]})
    stream = azure_first + STREAM
    for size in (5, 10_000):
        hide = UsageHider()
        out = b"".join(hide.feed(chunk) for chunk in cuts(stream, size)) + hide.flush()
        assert out == azure_first + EXPECTED_FOR_CLIENT


def test_counts_that_are_not_counts_make_no_usage_and_a_missing_total_is_the_sum() -> None:
    def usage(obj: object) -> Usage | None:
        return find_usage(json.dumps({"usage": obj}).encode())

    assert usage({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4, 7)
    assert usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 9}) == Usage(3, 4, 9)
    bad = {"prompt_tokens": "3", "completion_tokens": -1, "total_tokens": True}
    assert usage(bad) is None
    assert usage({"prompt_tokens": 2.5, "completion_tokens": None}) is None
    assert usage({"prompt_tokens": 2, "completion_tokens": None}) == Usage(2, 0, 2)
    assert usage({"prompt_tokens": 2, "total_tokens": -1}) is None
    assert usage({"prompt_tokens": 5, "total_tokens": 5}) == Usage(5, 0, 5)  # embeddings
    assert find_usage(b'{"usage" :\n {"prompt_tokens": 1}}') == Usage(1, 0, 1)  # spaced


def test_the_last_usage_is_the_streams_and_every_usage_event_is_hidden() -> None:
    """Two usage events and nulls written both ways, in one chunk or byte by byte: both
    events hidden, the nulls cut, the later usage counted."""
    first = event({"id": "c", "choices": [], "usage": {"total_tokens": 1}})
    spaced = event({"id": "c", "choices": [{"delta": {}}], "usage": None}, SPACED)
    stream = STREAM.replace(b"data: [DONE]", first + spaced + b"data: [DONE]")
    expected = EXPECTED_FOR_CLIENT.replace(
        b"data: [DONE]",
        event({"id": "c", "choices": [{"delta": {}}]}, SPACED) + b"data: [DONE]",
    )
    usage_event = event({"id": "c", "choices": [], "usage": USAGE})
    earlier = stream.replace(first, b"").replace(usage_event, first + usage_event)
    for size in (1, 10_000):
        hide = UsageHider()
        out = b"".join(hide.feed(chunk) for chunk in cuts(stream, size)) + hide.flush()
        assert (out, hide.usage) == (expected, Usage(0, 0, 1))
        hide = UsageHider()  # the one-token usage first: the later one counts
        out = b"".join(hide.feed(chunk) for chunk in cuts(earlier, size)) + hide.flush()
        assert (out, hide.usage) == (expected, Usage(3, 4, 7))
