"""The APIs' own rules, apart from the request path: ids, usage, error shapes, routing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from dialproxy.apis import anthropic, responses
from dialproxy.apis.all import APIS
from dialproxy.apis.responses import ResponseIds, ResponseRef
from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import API_INTERFACES
from dialproxy.config.parse import Source
from dialproxy.wire.relay import EventRewriter, UsageScanner
from dialproxy.wire.usage import Usage, find_usage


def sse(kind: str, obj: object, end: str = "\n") -> bytes:
    return f"event: {kind}{end}data: {json.dumps(obj)}{end}{end}".encode()


def test_every_api_names_an_interface_and_its_routes_are_unique() -> None:
    assert {api.name for api in APIS} == set(API_INTERFACES)
    paths = [path for api in APIS for path in api.paths]
    assert len(paths) == len(set(paths))
    for api in APIS:
        assert API_INTERFACES[api.name] == api.interface


@pytest.mark.parametrize("background", [False, True])
def test_a_response_id_round_trips_and_names_its_upstream(background: bool) -> None:
    ref = ResponseRef("gpt-5", "east", responses.project_tag("team"), background, "resp_abc")
    ours = responses.mint(ref)
    assert ours.startswith("resp_dial_") and "resp_abc" not in ours
    assert responses.parse(ours) == ref
    assert all(c.isalnum() or c in "_-" for c in ours)  # (a URL path segment as it is)


@pytest.mark.parametrize(
    "text",
    ["resp_abc", "resp_dial_", "resp_dial_!!!", "resp_dial_" + "A" * 3000, "resp_dial_WzFd"],
)
def test_what_is_not_one_of_our_ids_is_none(text: str) -> None:
    assert responses.parse(text) is None


def test_ids_are_rewritten_in_a_body_and_in_events_split_anywhere() -> None:
    created = {"type": "response.created", "response": {"id": "resp_up1", "usage": None}}
    done = {
        "type": "response.completed",
        "response": {
            "id": "resp_up1",
            "usage": {
                "input_tokens": 7,
                "output_tokens": 5,
                "total_tokens": 12,
                "input_tokens_details": {"cached_tokens": 3},
                "output_tokens_details": {"reasoning_tokens": 2},
            },
        },
    }
    for end in ("\n", "\r\n", "\r"):
        stream = sse("response.created", created, end) + sse("response.completed", done, end)
        for cut in range(1, len(stream)):
            ids = responses.ids_for({"background": True}, "m", "team")
            relay = EventRewriter(ids.events, rule=responses.USAGE)
            out = relay.feed(stream[:cut]) + relay.feed(stream[cut:]) + relay.flush()
            assert b"resp_up1" not in out
            assert relay.usage == Usage(7, 5, 12, {"cached_tokens": 3, "reasoning_tokens": 2})
            ours = json.loads(out.split(b"data: ")[1].split(end.encode())[0])["response"]["id"]
            ref = responses.parse(ours)
            assert ref is not None and ref.background and ref.upstream_id == "resp_up1"
    body = json.dumps({"id": "resp_up2", "object": "response"}).encode()
    ids = responses.ids_for({}, "m", "team")
    out = ids.body(body, None)
    ref = responses.parse(json.loads(out)["id"])
    assert ref is not None and not ref.background and ref.upstream_id == "resp_up2"


def test_a_follow_up_rewrites_the_id_it_knows() -> None:
    ref = ResponseRef("m", "", responses.project_tag("p"), True, "resp_x")
    ours = responses.mint(ref)
    ids = ResponseIds.of(ref, ours)
    assert json.loads(ids.body(b'{"id": "resp_x", "status": "queued"}', None))["id"] == ours


def test_responses_usage_of_a_body_and_of_failed_or_incomplete_events() -> None:
    body = {"id": "r", "usage": {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}}
    assert find_usage(json.dumps(body).encode(), responses.USAGE) == Usage(4, 6, 10)
    for kind in ("response.incomplete", "response.failed"):
        event = {"type": kind, "response": {"usage": {"input_tokens": 2, "output_tokens": 1}}}
        scanner = UsageScanner(rule=responses.USAGE)
        scanner.feed(sse(kind, event))
        assert scanner.usage == Usage(2, 1, 3)
    bad = {"type": "response.completed", "response": {"usage": {"input_tokens": -1}}}
    scanner = UsageScanner(rule=responses.USAGE)
    scanner.feed(sse("response.completed", bad))
    assert scanner.usage is None


ANTHROPIC_STREAM = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "usage": {
                    "input_tokens": 10,
                    "cache_creation_input_tokens": 4,
                    "cache_read_input_tokens": 6,
                    "output_tokens": 1,
                },
            },
        },
    ),
    ("content_block_delta", {"type": "content_block_delta", "delta": {"text": '"usage"'}}),
    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}}),
    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9}}),
    ("message_stop", {"type": "message_stop"}),
]


def test_anthropic_usage_adds_message_start_and_the_last_message_delta_split_anywhere() -> None:
    for end in ("\n", "\r\n", "\r"):
        stream = b"".join(sse(kind, obj, end) for kind, obj in ANTHROPIC_STREAM)
        expected = Usage(
            20, 9, 29, {"cache_creation_input_tokens": 4, "cache_read_input_tokens": 6}
        )
        whole = UsageScanner(rule=anthropic.USAGE)
        whole.feed(stream)
        whole.flush()
        assert whole.usage == expected
        for cut in range(1, len(stream), 3):
            scanner = UsageScanner(rule=anthropic.USAGE)
            assert scanner.feed(stream[:cut]) + scanner.feed(stream[cut:]) == stream
            scanner.flush()
            assert scanner.usage == expected, (end, cut)
    message = {"type": "message", "usage": {"input_tokens": 5, "output_tokens": 7}}
    assert find_usage(json.dumps(message).encode(), anthropic.USAGE) == Usage(5, 7, 12)


def test_anthropic_errors_and_rate_limit_headers_are_anthropics() -> None:
    event = anthropic.stream_error("gone", 502)
    assert event.startswith(b"event: error\ndata: ")
    assert json.loads(event[len(b"event: error\ndata: ") :]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "gone"},
    }
    assert anthropic.error_type(429) == "rate_limit_error"
    assert anthropic.error_type(404) == "not_found_error"
    assert anthropic.error_type(503) == "api_error"


def _snapshot(model: dict[str, Any]) -> dict[str, Any]:
    return {"models": {"m": model}, "keys": {}, "roles": {}}


def test_direct_upstreams_serve_the_apis_their_urls_and_auth_say() -> None:
    model = {
        "type": "chat",
        "upstreams": [
            {
                "id": "o",
                "endpoint": "http://o/v1/chat/completions",
                "key": "k1",
                "responsesEndpoint": "http://o/v1/responses",
            },
            {"id": "a", "endpoint": "http://a/v1/messages", "key": "k2", "auth": "x-api-key"},
        ],
    }
    m = build_snapshot([Source("c.json", json.dumps(_snapshot(model)).encode())], {}).models["m"]
    url = {api: [(r.url, dict(r.headers)) for r in s.routes] for api, s in m.serving.items()}
    assert url["chat/completions"] == [
        ("http://o/v1/chat/completions", {"Authorization": "Bearer k1"})
    ]
    assert url["responses"] == [("http://o/v1/responses", {"Authorization": "Bearer k1"})]
    assert url["messages"] == [("http://a/v1/messages", {"x-api-key": "k2"})]
    assert url["messages/count_tokens"] == [
        ("http://a/v1/messages/count_tokens", {"x-api-key": "k2"})
    ]
    assert m.listing("model")["interfaces"] == [
        "openaiChatCompletions",
        "openaiResponses",
        "anthropicMessages",
    ]


def test_an_adapter_gets_an_upstreams_responses_endpoint_for_the_responses_api() -> None:
    model = {
        "type": "chat",
        "endpoint": "http://adapter/chat",
        "responsesEndpoint": "http://adapter/responses",
        "upstreams": [
            {"id": "u", "endpoint": "http://up/chat", "responsesEndpoint": "http://up/resp"}
        ],
    }
    m = build_snapshot([Source("c.json", json.dumps(_snapshot(model)).encode())], {}).models["m"]
    (chat,) = m.serving["chat/completions"].routes
    (resp,) = m.serving["responses"].routes
    assert (chat.url, chat.headers["X-UPSTREAM-ENDPOINT"]) == (
        "http://adapter/chat",
        "http://up/chat",
    )
    assert (resp.url, resp.headers["X-UPSTREAM-ENDPOINT"]) == (
        "http://adapter/responses",
        "http://up/resp",
    )
    assert "messages" not in m.serving


def test_anthropic_reset_is_an_rfc3339_time() -> None:
    from dialproxy.config.model import Window
    from dialproxy.counting.limiter import WindowState

    state = WindowState(Window("minute", 60, 10), (3, 0.0, 0, 0.0), 3)
    headers = dict(anthropic.ratelimit_headers(state, None))
    assert headers["anthropic-ratelimit-requests-limit"] == "10"
    assert headers["anthropic-ratelimit-requests-remaining"] == "7"
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-requests-reset"])
    assert reset.tzinfo is not None and reset >= datetime.now(UTC).replace(microsecond=0)


def test_an_upstream_id_too_short_or_too_long_is_not_taken_for_a_response_id() -> None:
    for upstream_id in ("resp", "r" * 600):
        ids = responses.ids_for({}, "m", "p")
        body = json.dumps({"id": upstream_id, "text": f"{upstream_id} said"}).encode()
        assert ids.body(body, None) == body
