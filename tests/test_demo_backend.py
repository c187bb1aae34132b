"""The demo backend, exercised through the real openai and anthropic SDKs and a raw aiohttp
client."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from dialproxy.demo_backend import CONTROL_KEY, create_backend_app, embedding_vector
from tests.backend_control import BackendControl


@dataclass
class Backend:
    server: TestServer
    control: BackendControl

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def backend(aiohttp_server: AiohttpServer) -> Backend:
    control = BackendControl()
    app = create_backend_app(control)
    assert app[CONTROL_KEY] is control
    server = await aiohttp_server(app)
    return Backend(server, control)


@pytest.fixture
async def client(backend: Backend) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=backend.url("/v1"), api_key="x", max_retries=0, timeout=10
    ) as sdk:
        yield sdk


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield http


async def test_chat_non_streaming(client: openai.AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
    )
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == "gpt-test"
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: hello there world"
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 5
    assert result.usage.completion_tokens == 4
    assert result.usage.total_tokens == 9


async def test_chat_content_parts_and_max_tokens(client: openai.AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model="echo",
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "one two "},
                    {"type": "text", "text": "three four"},
                ],
            },
        ],
        max_tokens=3,
    )
    choice = result.choices[0]
    assert choice.message.content == "Echo: one two"
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 8
    assert result.usage.completion_tokens == 3


async def test_chat_streaming_without_usage(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.chunk_delay = 0.05
    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "a b c"}],
        stream=True,
    )
    arrivals: list[float] = []
    pieces: list[str] = []
    finishes: list[str | None] = []
    roles: list[str | None] = []
    async with stream:
        async for chunk in stream:
            arrivals.append(time.monotonic())
            assert chunk.object == "chat.completion.chunk"
            assert chunk.model == "echo"
            assert chunk.usage is None
            assert len(chunk.choices) == 1
            delta = chunk.choices[0].delta
            roles.append(delta.role)
            pieces.append(delta.content or "")
            finishes.append(chunk.choices[0].finish_reason)
    # One chunk per word, then the finish chunk.
    assert len(arrivals) == 5
    assert "".join(pieces) == "Echo: a b c"
    assert roles[0] == "assistant"
    assert roles[1:] == [None] * 4
    assert finishes == [None, None, None, None, "stop"]
    # Chunks are written as produced: the first arrives well before the last is sent.
    assert arrivals[-1] - arrivals[0] >= 0.15


async def test_chat_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hi you"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *content_chunks, last = chunks
    assert all(chunk.usage is None for chunk in content_chunks)
    assert all(len(chunk.choices) == 1 for chunk in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "Echo: hi you"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == 2
    assert last.usage.completion_tokens == 3
    assert last.usage.total_tokens == 5


async def test_chat_stream_raw_wire_format(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        backend.url("/openai/deployments/gpt-4/chat/completions?api-version=2024-02-01"),
        json={
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 1,
        },
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert '"usage":null' in events[0]
    assert '"model":"echo"' in events[0]
    assert '"finish_reason":"length"' in events[1]
    assert '"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1' in events[2]


async def test_legacy_completions(client: openai.AsyncOpenAI) -> None:
    result = await client.completions.create(model="echo-instruct", prompt="say this")
    assert result.object == "text_completion"
    assert result.model == "echo-instruct"
    assert result.choices[0].text == "Echo: say this"
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].logprobs is None
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (2, 3)

    stream = await client.completions.create(
        model="echo-instruct",
        prompt="say this",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: say this"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 5


async def test_embeddings_base64_default_and_float(
    backend: Backend, client: openai.AsyncOpenAI
) -> None:
    by_default = await client.embeddings.create(model="embed", input=["alpha", "beta gamma"])
    assert backend.control.last_request.json["encoding_format"] == "base64"
    as_float = await client.embeddings.create(
        model="embed", input=["alpha", "beta gamma"], encoding_format="float"
    )
    assert backend.control.last_request.json["encoding_format"] == "float"
    for result in (by_default, as_float):
        assert result.object == "list"
        assert result.model == "embed"
        assert [item.index for item in result.data] == [0, 1]
        assert result.data[0].embedding == embedding_vector("alpha")
        assert result.data[1].embedding == embedding_vector("beta gamma")
        assert len(result.data[0].embedding) == 8
        assert result.usage.prompt_tokens == result.usage.total_tokens == 3
    assert embedding_vector("alpha") != embedding_vector("beta gamma")

    single = await client.embeddings.create(model="embed", input="alpha", encoding_format="base64")
    encoded = single.data[0].embedding
    # Requesting base64 explicitly leaves the decoding to the caller: little-endian float32.
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == embedding_vector("alpha")


async def test_fail_next_429_is_rate_limit_error(
    backend: Backend, client: openai.AsyncOpenAI
) -> None:
    backend.control.fail_next(429, headers={"Retry-After": "7"})
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    body = caught.value.body
    assert isinstance(body, dict)
    assert "Injected failure" in body["message"]
    # Only the next request failed.
    ok = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.choices[0].message.content == "Echo: hi"


async def test_fail_next_times_and_custom_body(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    backend.control.fail_next(503, times=2, body={"error": {"message": "busy"}})
    url = backend.url("/v1/chat/completions")
    payload = {"messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []
    for _ in range(3):
        async with session.post(url, json=payload) as resp:
            statuses.append(resp.status)
            if resp.status == 503:
                assert await resp.json() == {"error": {"message": "busy"}}
    assert statuses == [503, 503, 200]
    assert len(backend.control.requests) == 3


async def test_break_stream_after_is_a_client_error(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    backend.control.break_stream_after(2)
    received: list[bytes] = []
    async with session.post(
        backend.url("/v1/chat/completions"),
        json={"messages": [{"role": "user", "content": "one two three four"}], "stream": True},
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                received.append(line)
    data = [line for line in received if line.startswith(b"data: ")]
    assert len(data) == 2
    assert all(b"[DONE]" not in line and b'"finish_reason":"stop"' not in line for line in data)

    # Only one stream was broken; the next one completes.
    async with session.post(
        backend.url("/v1/chat/completions"),
        json={"messages": [{"role": "user", "content": "one"}], "stream": True},
    ) as resp:
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_break_stream_seen_by_sdk(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.break_stream_after(1)
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    seen = 0
    with pytest.raises(openai.APIError):  # raised mid-iteration
        async with stream:
            async for _ in stream:
                seen += 1
    assert seen == 1


async def test_drop_next_is_a_connection_error(
    backend: Backend, session: aiohttp.ClientSession, client: openai.AsyncOpenAI
) -> None:
    backend.control.drop_next()
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with session.post(
            backend.url("/v1/chat/completions"),
            json={"messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            await resp.read()

    backend.control.drop_next()
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}]
        )
    assert len(backend.control.requests) == 2

    ok = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.choices[0].message.content == "Echo: hi"


async def test_requests_are_recorded(backend: Backend, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "record me"}],
        extra_headers={"X-Custom-Header": "abc"},
        extra_query={"api-version": "2024-02-01"},
    )
    assert len(backend.control.requests) == 1
    received = backend.control.requests[0]
    assert received.method == "POST"
    assert received.path == "/v1/chat/completions"
    assert received.query_string == "api-version=2024-02-01"
    assert received.headers["Authorization"] == "Bearer x"
    assert received.headers["x-custom-header"] == "abc"
    assert received.json == {
        "messages": [{"role": "user", "content": "record me"}],
        "model": "echo",
    }
    assert b"record me" in received.body

    backend.control.fail_next(500)
    backend.control.chunk_delay = 1.0
    backend.control.reset()
    assert backend.control.requests == []
    assert backend.control.chunk_delay == 0
    again = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert again.choices[0].message.content == "Echo: hi"


async def test_recorded_headers_keep_their_case(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        backend.url("/v1/embeddings"), json={"input": "x"}, headers={"X-Custom-Header": "abc"}
    ) as resp:
        assert resp.status == 200
    received = backend.control.last_request
    assert "X-Custom-Header" in list(received.headers.keys())
    assert received.headers["x-custom-header"] == "abc"
    assert received.json == {"input": "x"}


async def test_first_byte_delay(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.first_byte_delay = 0.2
    start = time.monotonic()
    await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - start >= 0.2


async def test_errors_and_health(backend: Backend, session: aiohttp.ClientSession) -> None:
    async with session.post(
        backend.url("/v1/chat/completions"),
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["type"] == "invalid_request_error"
        assert isinstance(body["error"]["message"], str)

    async with session.post(backend.url("/v1/chat/completions"), json={"model": "x"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"

    async with session.post(backend.url("/v1/unknown"), json={}) as resp:
        assert resp.status == 404

    recorded = len(backend.control.requests)
    backend.control.fail_next(500)
    async with session.get(backend.url("/health")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    # /health is neither recorded nor subject to injected failures.
    assert len(backend.control.requests) == recorded
    async with session.post(backend.url("/v1/embeddings"), json={"input": "x"}) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["type"] == "server_error"


# --------------------------------------------------------------------------------------
# OpenAI Responses API


async def test_responses_create(client: openai.AsyncOpenAI) -> None:
    result = await client.responses.create(
        model="gpt-test", input="hello there world", instructions="be brief"
    )
    assert result.object == "response"
    assert result.id.startswith("resp_")
    assert result.status == "completed"
    assert result.model == "gpt-test"
    assert result.background is False
    assert result.output_text == "Echo: hello there world"
    [message] = result.output
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert result.usage is not None
    # Words: 2 of instructions + 3 of input; "Echo:" + 3 words out.
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 4)
    assert result.usage.total_tokens == 9
    assert result.usage.input_tokens_details.cached_tokens == 0
    assert result.usage.output_tokens_details.reasoning_tokens == 0
    assert result.error is None
    assert result.incomplete_details is None


async def test_responses_input_items_and_max_output_tokens(client: openai.AsyncOpenAI) -> None:
    result = await client.responses.create(
        model="echo",
        input=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "one two "},
                    {"type": "input_text", "text": "three four"},
                ],
            },
        ],
        max_output_tokens=3,
    )
    # Cut by max_output_tokens: OpenAI's "incomplete", with the reason.
    assert result.status == "incomplete"
    assert result.incomplete_details is not None
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.output_text == "Echo: one two"
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (8, 3)


async def test_responses_sync_client(backend: Backend) -> None:
    def call() -> tuple[str, int, str, str]:
        with openai.OpenAI(
            base_url=backend.url("/openai/v1"), api_key="x", max_retries=0, timeout=10
        ) as sdk:
            made = sdk.responses.create(model="echo", input="sync call")
            again = sdk.responses.retrieve(made.id)
            with sdk.responses.stream(model="echo", input="streamed sync") as stream:
                text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            assert made.usage is not None
            return made.output_text, made.usage.output_tokens, again.output_text, text

    assert await asyncio.to_thread(call) == (
        "Echo: sync call",
        3,
        "Echo: sync call",
        "Echo: streamed sync",
    )
    assert backend.control.requests[0].path == "/openai/v1/responses"


_RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_responses_streamed(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.chunk_delay = 0.02
    stream = await client.responses.create(model="echo", input="a b", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == _RESPONSE_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created = events[0]
    assert created.type == "response.created"
    assert created.response.status == "in_progress"
    assert created.response.usage is None
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Echo:", " a", " b"]
    done = events[7]
    assert done.type == "response.output_text.done"
    assert done.text == "Echo: a b"
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == "Echo: a b"
    assert last.response.usage is not None
    assert (last.response.usage.input_tokens, last.response.usage.output_tokens) == (2, 3)
    # The streamed response is kept like any other.
    kept = await client.responses.retrieve(last.response.id)
    assert kept.status == "completed"
    assert kept.output_text == "Echo: a b"


async def test_responses_stream_helper(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="echo", input="stream me please") as stream:
        texts = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert "".join(texts) == "Echo: stream me please"
    assert final.output_text == "Echo: stream me please"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)


async def test_responses_background_retrieve_cancel_delete(
    backend: Backend, client: openai.AsyncOpenAI
) -> None:
    backend.control.background_delay = 0.2
    queued = await client.responses.create(model="echo", input="in the background", background=True)
    assert queued.status == "queued"
    assert queued.background is True
    assert queued.usage is None
    assert queued.output_text == ""

    seen: list[str] = []
    deadline = time.monotonic() + 5
    while True:
        current = await client.responses.retrieve(queued.id)
        if not seen or seen[-1] != current.status:
            seen.append(current.status or "")
        if current.status == "completed" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert seen == ["queued", "in_progress", "completed"]
    assert current.output_text == "Echo: in the background"
    assert current.usage is not None
    assert (current.usage.input_tokens, current.usage.output_tokens) == (3, 4)

    # A finished response cannot be cancelled.
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.cancel(queued.id)
    assert caught.value.status_code == 400

    # An unfinished one can: it stays cancelled, without usage.
    backend.control.background_delay = 5
    other = await client.responses.create(model="echo", input="never mind", background=True)
    cancelled = await client.responses.cancel(other.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is None
    assert (await client.responses.retrieve(other.id)).status == "cancelled"

    deleted = await client.responses.with_raw_response.delete(queued.id)
    assert deleted.status_code == 200
    assert json.loads(deleted.content) == {"id": queued.id, "object": "response", "deleted": True}
    assert backend.control.last_request.method == "DELETE"
    await client.responses.delete(other.id)  # (the SDK returns None)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.retrieve(queued.id)
    body = missing.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(queued.id)


async def test_responses_background_streams(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.background_delay = 0.1
    stream = await client.responses.create(
        model="echo", input="follow me", background=True, stream=True
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == [
        "response.created",
        "response.queued",
        *_RESPONSE_EVENTS[1:],
    ]
    assert events[0].type == "response.created"
    assert events[0].response.status == "queued"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Echo: follow me"
    response_id = events[0].response.id

    # Streaming a kept response replays its events, after starting_after when given.
    replay = await client.responses.retrieve(response_id, stream=True)
    assert [e.sequence_number async for e in replay] == list(range(len(events)))
    tail = await client.responses.retrieve(response_id, stream=True, starting_after=9)
    assert [e.type async for e in tail] == [e.type for e in events[10:]]

    # Followed while it runs: the events arrive as they are produced.
    queued = await client.responses.create(model="echo", input="later on", background=True)
    live = await client.responses.retrieve(queued.id, stream=True)
    last = [e async for e in live][-1]
    assert last.type == "response.completed"
    assert last.response.output_text == "Echo: later on"


async def test_responses_not_stored(client: openai.AsyncOpenAI) -> None:
    result = await client.responses.create(model="echo", input="forget me", store=False)
    assert result.output_text == "Echo: forget me"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(result.id)
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="echo", input="x", store=False, background=True)


async def test_responses_faults(backend: Backend, client: openai.AsyncOpenAI) -> None:
    backend.control.fail_next(429)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.responses.create(model="echo", input="hi")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "rate_limit_exceeded"

    backend.control.break_stream_after(3)
    stream = await client.responses.create(model="echo", input="a b c d", stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        async for event in stream:
            seen.append(event.type)
    assert seen == _RESPONSE_EVENTS[:3]

    backend.control.drop_next()
    with pytest.raises(openai.APIConnectionError):
        await client.responses.create(model="echo", input="hi")

    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model="echo", input=[])
    assert bad.value.param == "input"


# --------------------------------------------------------------------------------------
# Anthropic Messages API


@pytest.fixture
async def claude(backend: Backend) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=backend.url("/anthropic"), api_key="x", max_retries=0, timeout=10
    ) as sdk:
        yield sdk


async def test_messages_create(backend: Backend, claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-test",
        max_tokens=100,
        system="be brief",
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ],
    )
    assert backend.control.last_request.path == "/anthropic/v1/messages"
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-test"
    [block] = message.content
    assert block.type == "text"
    assert block.text == "Echo: hello there world"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    # Words: 2 of system + 2 + 2 + 3 of the messages; "Echo:" + 3 words out.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 4)
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0

    capped = await claude.messages.create(
        model="claude-test", max_tokens=2, messages=[{"role": "user", "content": "a b c"}]
    )
    assert capped.stop_reason == "max_tokens"
    assert [b.text for b in capped.content if b.type == "text"] == ["Echo: a"]
    assert capped.usage.output_tokens == 2


async def test_messages_sync_client(backend: Backend) -> None:
    def call() -> tuple[str, int, str, int, int]:
        with anthropic.Anthropic(
            base_url=backend.url(""), api_key="x", max_retries=0, timeout=10
        ) as sdk:
            message = sdk.messages.create(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "sync hi"}]
            )
            with sdk.messages.stream(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "streamed"}]
            ) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            counted = sdk.messages.count_tokens(
                model="c", messages=[{"role": "user", "content": "count these words"}]
            )
            block = message.content[0]
            assert block.type == "text"
            return (
                block.text,
                message.usage.output_tokens,
                text,
                final.usage.output_tokens,
                (counted.input_tokens),
            )

    assert await asyncio.to_thread(call) == ("Echo: sync hi", 3, "Echo: streamed", 2, 3)
    assert backend.control.requests[0].path == "/v1/messages"


async def test_messages_stream_helper(backend: Backend, claude: anthropic.AsyncAnthropic) -> None:
    backend.control.chunk_delay = 0.02
    async with claude.messages.stream(
        model="claude-test",
        max_tokens=50,
        system=[{"type": "text", "text": "sys"}],
        messages=[{"role": "user", "content": "stream this text"}],
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["Echo:", " stream", " this", " text"]
    assert final.content[0].type == "text"
    assert final.content[0].text == "Echo: stream this text"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 4)


async def test_messages_raw_stream_events(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="claude-test",
        max_tokens=2,
        messages=[{"role": "user", "content": "x y z"}],
        stream=True,
    )
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # (the SDK passes the ping over)
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == 3
    assert start.message.usage.output_tokens == 1
    assert start.message.content == []
    deltas = [
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    ]
    assert deltas == ["Echo:", " x"]
    delta = events[5]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 2


async def test_messages_raw_wire_format(backend: Backend, session: aiohttp.ClientSession) -> None:
    async with session.post(
        backend.url("/v1/messages"),
        json={
            "model": "c",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        },
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    names = [event.split("\n")[0] for event in events[:-1]]
    assert names == [
        "event: message_start",
        "event: content_block_start",
        "event: ping",
        "event: content_block_delta",
        "event: content_block_delta",
        "event: content_block_stop",
        "event: message_delta",
        "event: message_stop",
    ]
    assert events[6].split("\n")[1] == (
        'data: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
        '"stop_sequence":null},"usage":{"output_tokens":2}}'
    )


async def test_messages_count_tokens(claude: anthropic.AsyncAnthropic) -> None:
    counted = await claude.messages.count_tokens(
        model="claude-test",
        system="one two",
        messages=[{"role": "user", "content": [{"type": "text", "text": "three four five"}]}],
    )
    assert counted.input_tokens == 5
    message = await claude.messages.create(
        model="claude-test",
        max_tokens=10,
        system="one two",
        messages=[{"role": "user", "content": [{"type": "text", "text": "three four five"}]}],
    )
    assert message.usage.input_tokens == 5


async def test_messages_errors(
    backend: Backend, claude: anthropic.AsyncAnthropic, session: aiohttp.ClientSession
) -> None:
    backend.control.fail_next(429, headers={"Retry-After": "3"})
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "3"
    assert limited.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Injected failure: 429 Too Many Requests"},
    }

    backend.control.fail_next(529)
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert overloaded.value.status_code == 529
    assert isinstance(overloaded.value.body, dict)
    assert overloaded.value.body["error"]["type"] == "overloaded_error"

    with pytest.raises(anthropic.BadRequestError) as bad:
        await claude.messages.create(
            model="c", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(bad.value.body, dict)
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]

    async with session.post(
        backend.url("/v1/messages"), data=b"{nope", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
    async with session.post(backend.url("/v1/messages/count_tokens"), json={}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with session.get(backend.url("/v1/messages")) as resp:
        assert resp.status == 405
        assert (await resp.json())["type"] == "error"

    backend.control.drop_next()
    with pytest.raises(anthropic.APIConnectionError):
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )

    # A broken stream: the anthropic SDK lets its HTTP client's error through.
    backend.control.break_stream_after(5)
    texts: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        async with claude.messages.stream(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "a b c"}]
        ) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert texts == ["Echo:", " a"]  # start, block start, ping, two deltas


# --------------------------------------------------------------------------------------
# Stream framing


def _assert_framed(raw: bytes, line_ending: str, lines: int) -> None:
    """Every line of ``raw`` ends with ``line_ending``: no other CR or LF is left."""
    newline = line_ending.encode()
    assert raw.endswith(newline * 2)
    assert raw.count(newline) == lines
    assert b"\n" not in raw.replace(newline, b"")
    assert b"\r" not in raw.replace(newline, b"")


@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
async def test_chat_streams_framed_with_line_ending(
    backend: Backend,
    client: openai.AsyncOpenAI,
    session: aiohttp.ClientSession,
    line_ending: str,
) -> None:
    backend.control.line_ending = line_ending
    chat = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "a b"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in chat]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: a b"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 5

    completion = await client.completions.create(model="echo", prompt="c d", stream=True)
    assert "".join([c.choices[0].text async for c in completion]) == "Echo: c d"

    def sync_chat() -> str:
        with openai.OpenAI(base_url=backend.url("/v1"), api_key="x", max_retries=0) as sdk:
            stream = sdk.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "e f"}], stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(sync_chat) == "Echo: e f"

    async with session.post(
        backend.url("/v1/chat/completions"),
        json={"messages": [{"role": "user", "content": "x y"}], "stream": True},
    ) as resp:
        raw = await resp.read()
    # 3 pieces + the finish chunk + [DONE]: 5 events of one line and a blank one.
    _assert_framed(raw, line_ending, 5 * 2)
    assert raw.endswith(b"data: [DONE]" + line_ending.encode() * 2)


@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
async def test_messages_streams_framed_with_line_ending(
    backend: Backend,
    claude: anthropic.AsyncAnthropic,
    session: aiohttp.ClientSession,
    line_ending: str,
) -> None:
    backend.control.line_ending = line_ending
    async with claude.messages.stream(
        model="c", max_tokens=10, messages=[{"role": "user", "content": "g h"}]
    ) as stream:
        assert [t async for t in stream.text_stream] == ["Echo:", " g", " h"]
        message = await stream.get_final_message()
    assert message.usage.output_tokens == 3
    raw_events = [
        e.type
        async for e in await claude.messages.create(
            model="c", max_tokens=10, messages=[{"role": "user", "content": "i"}], stream=True
        )
    ]
    assert raw_events == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]

    def sync_stream() -> str:
        with (
            anthropic.Anthropic(base_url=backend.url(""), api_key="x", max_retries=0) as sdk,
            sdk.messages.stream(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "sync two"}]
            ) as stream,
        ):
            return "".join(stream.text_stream)

    assert await asyncio.to_thread(sync_stream) == "Echo: sync two"

    async with session.post(
        backend.url("/v1/messages"),
        json={"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as resp:
        raw = await resp.read()
    # 8 events (start, block start, ping, 2 deltas, block stop, delta, stop) of 3 lines.
    _assert_framed(raw, line_ending, 8 * 3)
    newline = line_ending.encode()
    assert raw.endswith(
        b"event: message_stop" + newline + b'data: {"type":"message_stop"}' + newline * 2
    )


@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
async def test_responses_streams_framed_with_line_ending(
    backend: Backend,
    client: openai.AsyncOpenAI,
    session: aiohttp.ClientSession,
    line_ending: str,
) -> None:
    backend.control.line_ending = line_ending
    events = [
        e async for e in await client.responses.create(model="echo", input="a b", stream=True)
    ]
    assert [e.type for e in events] == _RESPONSE_EVENTS
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == "Echo: a b"
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 3

    async with client.responses.stream(model="echo", input="e f") as helper:
        final = await helper.get_final_response()
    assert final.output_text == "Echo: e f"

    backend.control.background_delay = 0.05
    queued = await client.responses.create(model="echo", input="later", background=True)
    followed = [e.type async for e in await client.responses.retrieve(queued.id, stream=True)]
    assert followed[-1] == "response.completed"

    def sync_stream() -> str:
        with (
            openai.OpenAI(base_url=backend.url("/v1"), api_key="x", max_retries=0) as sdk,
            sdk.responses.stream(model="echo", input="sync one") as stream,
        ):
            return stream.get_final_response().output_text

    assert await asyncio.to_thread(sync_stream) == "Echo: sync one"

    async with session.post(
        backend.url("/v1/responses"), json={"input": "x", "stream": True}
    ) as resp:
        raw = await resp.read()
    # created, in_progress, item added, part added, 2 deltas, text done, part done, item
    # done, completed: 10 events of 3 lines.
    _assert_framed(raw, line_ending, 10 * 3)
