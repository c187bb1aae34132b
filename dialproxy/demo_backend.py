"""A small, fast model server for OpenAI and Anthropic clients: the demo backend and the
tests' upstream.

The "echo" model answers a chat with the text of the last user message prefixed with
``"Echo: "``; legacy completions echo the prompt; embeddings are 8 floats derived from a
hash of each input. Every path ending in ``/chat/completions``, ``/completions`` or
``/embeddings`` is served (so both ``/v1/chat/completions`` and DIAL adapter paths such as
``/openai/deployments/{id}/chat/completions`` work), plus ``GET .../models`` and
``GET /health``. Tokens are words.

Two more APIs answer the same echo:

* OpenAI's Responses API: ``POST .../responses`` (``input``, ``instructions``,
  ``max_output_tokens``, ``stream``, ``background``, ``store``), and for a kept response
  ``GET .../responses/{id}`` (``?stream=true&starting_after=N`` replays and follows its
  events), ``DELETE .../responses/{id}`` and ``POST .../responses/{id}/cancel``. A
  background response is ``queued``, then ``in_progress``, then ``completed`` over
  ``Pace.background_delay`` seconds; the last 10,000 responses are kept.
* Anthropic's Messages API: ``POST .../v1/messages`` (``messages``, ``system``,
  ``max_tokens``, ``stream``) and ``POST .../v1/messages/count_tokens``, with errors in
  Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``).

Its :class:`Pace` sets its delays and the line ending of its SSE streams (``"\\n"``,
``"\\r\\n"`` or ``"\\r"``).  The tests drive failures through a subclass of it that
also records what the server received (``tests/backend_control.py``: ``BackendControl``;
never through request headers): the package ships no fault switch.  ``GET /health`` is
neither recorded nor intercepted.

Run it standalone with ``python -m dialproxy.demo_backend --host 127.0.0.1 --port 8081``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from aiohttp import web

__all__ = [
    "CONTROL_KEY",
    "DEFAULT_MODEL",
    "JSON_TYPE",
    "Pace",
    "anthropic_error_payload",
    "create_backend_app",
    "dumps",
    "embedding_vector",
    "error_payload",
    "is_anthropic",
    "main",
]

DEFAULT_MODEL: Final = "echo"
DEFAULT_BACKGROUND_DELAY: Final = 0.2
# Responses kept for GET .../responses/{id} (the oldest are forgotten first).
MAX_KEPT_RESPONSES: Final = 10_000
ECHO_PREFIX: Final = "Echo: "
EMBEDDING_DIMENSIONS: Final = 8

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_EMBEDDING_IN: Final = struct.Struct(f"<{EMBEDDING_DIMENSIONS}I")
_EMBEDDING_OUT: Final = struct.Struct(f"<{EMBEDDING_DIMENSIONS}f")
# Words with their leading whitespace; the last one also keeps any trailing whitespace, so
# joining the pieces gives back the text exactly (modulo leading whitespace, never present).
_PIECES: Final = re.compile(r"\s*\S+(?:\s+\Z)?")
# .../responses/{id} and .../responses/{id}/cancel
_RESPONSE_PATH: Final = re.compile(r"/responses/([^/]+)(/cancel)?\Z")
JSON_TYPE: Final = "application/json"
_HEALTH_BODY: Final = _encode_json({"status": "ok"}).encode()
_SSE_DONE: Final = b"data: [DONE]\n\n"
_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
}


def dumps(payload: object) -> bytes:
    return _encode_json(payload).encode()


# --------------------------------------------------------------------------------------
# Control object


class Pace:
    """How the demo backend answers: at once, streams framed with LF (``--chunk-delay``
    spaces streamed events).  Nothing here fails on purpose: the tests' fault switches
    (``tests/backend_control.py``: ``BackendControl``) subclass it and use its three hooks,
    which do nothing here."""

    chunk_delay: float
    first_byte_delay: float
    background_delay: float
    line_ending: str

    def __init__(self, *, chunk_delay: float = 0.0) -> None:
        self.chunk_delay = chunk_delay
        self.first_byte_delay = 0.0
        # Seconds a background response (Responses API) takes: queued for the first half,
        # in_progress for the second, then completed.
        self.background_delay = DEFAULT_BACKGROUND_DELAY
        # What ends every line (and blank line) of every SSE stream: "\n", "\r\n" or "\r".
        self.line_ending = "\n"

    def received(self, request: web.Request, body: bytes) -> None:
        """Each request but ``GET /health``, as it arrived (nothing is kept here)."""

    async def intercept(self, request: web.Request, route: str) -> web.StreamResponse | None:
        """An answer instead of the model's (None here: the model answers)."""
        return None

    def stream_break(self) -> int | None:
        """The events after which the next stream is cut (None here: never)."""
        return None


CONTROL_KEY: Final = web.AppKey("dialproxy.demo_backend.control", Pace)


# --------------------------------------------------------------------------------------
# Errors


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "requests",
}


def error_payload(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
    if code is None and status == 429:
        code = "rate_limit_exceeded"
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=dumps(error_payload(status, message, param=param, code=code)),
        content_type=JSON_TYPE,
        headers=headers,
    )


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_payload(status: int, message: str) -> dict[str, Any]:
    default = "api_error" if status >= 500 else "invalid_request_error"
    err_type = _ANTHROPIC_ERROR_TYPES.get(status, default)
    return {"type": "error", "error": {"type": err_type, "message": message}}


def _anthropic_error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,  # (the Anthropic shape has no param: same signature as above)
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=dumps(anthropic_error_payload(status, message)),
        content_type=JSON_TYPE,
        headers=headers,
    )


def is_anthropic(route: str) -> bool:
    return route.endswith(("/v1/messages", "/v1/messages/count_tokens"))


def _json_response(payload: object) -> web.Response:
    return web.Response(body=dumps(payload), content_type=JSON_TYPE)


# --------------------------------------------------------------------------------------
# Request helpers


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _count_words(text: str) -> int:
    return len(text.split())


def _content_text(content: object) -> str:
    """The text of a message's content: a string, or the concatenated text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str) and part.get("type", "text") == "text":
                    texts.append(text)
        return "".join(texts)
    return ""


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


def _max_words(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"'{name}' must be an integer >= 1", name)
        return value
    return None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _BadRequest("'stream_options' must be an object", "stream_options")
    return stream, stream and options.get("include_usage") is True


def _reply_pieces(text: str, limit: int | None) -> tuple[list[str], str]:
    """Split the reply into per-word pieces, capped at ``limit`` -> (pieces, finish_reason)."""
    pieces = _PIECES.findall(text)
    if limit is not None and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _BadRequest(f"'{name}' must be a boolean", name)
    return value


def _sse_event(event: str, data: object) -> bytes:
    """One named SSE event (framed with "\\n": the writer swaps in the line ending)."""
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _input_text(content: object) -> str:
    """The text of a Responses API input message: a string or its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and part.get("type") in ("input_text", "output_text", "text")
        )
    return ""


def _responses_input(value: object) -> tuple[int, str]:
    """(words in all input messages, text of the last user message) of a Responses input."""
    if isinstance(value, str):
        return _count_words(value), value
    if not isinstance(value, list) or not value:
        raise _BadRequest("'input' must be a string or a non-empty array of input items", "input")
    words = 0
    last_user = ""
    for item in value:
        if not isinstance(item, dict):
            raise _BadRequest("each input item must be an object", "input")
        if item.get("type", "message") != "message":
            continue  # tool calls, their outputs, reasoning: nothing to echo
        text = _input_text(item.get("content"))
        words += _count_words(text)
        if item.get("role") == "user":
            last_user = text
    return words, last_user


def _anthropic_input(body: dict[str, Any]) -> tuple[int, str]:
    """(input tokens, text of the last user message) of an Anthropic Messages request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages: Field required (a non-empty array)", "messages")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _BadRequest("system: must be a string or an array of text blocks", "system")
    words = _count_words(_content_text(system))
    last_user = ""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _BadRequest(
                "messages: each message must be an object with role 'user' or 'assistant'",
                "messages",
            )
        text = _content_text(message.get("content"))
        words += _count_words(text)
        if message["role"] == "user":
            last_user = text
    return max(words, 1), last_user


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _embedding_inputs(value: object) -> list[tuple[str, int]]:
    """(text to hash, token count) for each input of an embeddings request."""
    if isinstance(value, str):
        return [(value, _count_words(value))]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [(item, _count_words(item)) for item in value]
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [(_tokens_text(value), len(value))]
        if all(_is_token_list(item) for item in value):
            return [(_tokens_text(item), len(item)) for item in value]
    raise _BadRequest(
        "'input' must be a string, a non-empty array of strings or an array of token arrays",
        "input",
    )


def _is_token_list(item: object) -> bool:
    return (
        isinstance(item, list)
        and bool(item)
        and all(isinstance(tok, int) and not isinstance(tok, bool) for tok in item)
    )


def _tokens_text(tokens: Iterable[object]) -> str:
    return " ".join(str(tok) for tok in tokens)


def embedding_vector(text: str) -> list[float]:
    """The deterministic 8-float embedding of ``text`` (values exact in float32, in [-1, 1))."""
    words = _EMBEDDING_IN.unpack(hashlib.sha256(text.encode()).digest())
    return [(word >> 8) / 8388608.0 - 1.0 for word in words]


# --------------------------------------------------------------------------------------
# Responses API: one response, its state and its stream events


class _ResponseRun:
    """A Responses API response: its current state and the SSE events it has produced.

    A foreground one is produced at once; a background one is ``queued``, then
    ``in_progress``, then ``completed`` (or ``incomplete`` when ``max_output_tokens``
    cut it) over ``Pace.background_delay`` seconds, unless it is cancelled.
    """

    __slots__ = (
        "_waiter",
        "background",
        "created_at",
        "events",
        "finished",
        "id",
        "incomplete",
        "input_tokens",
        "instructions",
        "max_output_tokens",
        "model",
        "msg_id",
        "pieces",
        "status",
        "store",
        "task",
    )

    def __init__(
        self,
        *,
        model: str,
        instructions: str | None,
        max_output_tokens: int | None,
        store: bool,
        background: bool,
        pieces: list[str],
        incomplete: bool,
        input_tokens: int,
    ) -> None:
        self.id = _new_id("resp_")
        self.msg_id = _new_id("msg_")
        self.created_at = int(time.time())
        self.model = model
        self.instructions = instructions
        self.max_output_tokens = max_output_tokens
        self.store = store
        self.background = background
        self.pieces = pieces
        self.incomplete = incomplete
        self.input_tokens = input_tokens
        self.status = "queued" if background else "in_progress"
        self.finished = False
        self.events: list[bytes] = []  # event i has sequence_number i
        self.task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        """The Response object as it stands."""
        done = self.status in ("completed", "incomplete")
        output_tokens = len(self.pieces)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": self.background,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete"
            else None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": {},
            "model": self.model,
            "output": [self._message(self.status, "".join(self.pieces))] if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": self.store,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + output_tokens,
            }
            if done
            else None,
            "user": None,
        }

    def _message(self, status: str, text: str | None = None) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [_output_text(text)],
        }

    def _emit(self, event_type: str, **fields: object) -> None:
        data = {"type": event_type, "sequence_number": len(self.events), **fields}
        self.events.append(_sse_event(event_type, data))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Wait for the next event (or the end)."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def start(self) -> None:
        self._emit("response.created", response=self.snapshot())
        if self.status == "queued":
            self._emit("response.queued", response=self.snapshot())

    def begin(self) -> None:
        self.status = "in_progress"
        self._emit("response.in_progress", response=self.snapshot())

    def finish(self) -> None:
        item_status = "incomplete" if self.incomplete else "completed"
        text = "".join(self.pieces)
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        self._emit("response.output_item.added", output_index=0, item=self._message("in_progress"))
        self._emit("response.content_part.added", **where, part=_output_text(""))
        for piece in self.pieces:
            self._emit("response.output_text.delta", **where, delta=piece, logprobs=[])
        self._emit("response.output_text.done", **where, text=text, logprobs=[])
        self._emit("response.content_part.done", **where, part=_output_text(text))
        self._emit(
            "response.output_item.done", output_index=0, item=self._message(item_status, text)
        )
        self.status = item_status
        self.finished = True
        self._emit(f"response.{item_status}", response=self.snapshot())

    def stop(self, status: str) -> None:
        """End an unfinished response (cancelled, deleted or forgotten) where it stands."""
        if self.task is not None:
            self.task.cancel()
        if not self.finished:
            self.status = status
            self.finished = True
            self._wake()

    async def run_in_background(self, delay: float) -> None:
        await asyncio.sleep(delay / 2)
        self.begin()
        await asyncio.sleep(delay / 2)
        self.finish()


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# --------------------------------------------------------------------------------------
# Handlers


class _Backend:
    __slots__ = ("pace", "responses")

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        # The Responses API's kept responses, oldest first (dicts keep insertion order).
        self.responses: dict[str, _ResponseRun] = {}

    async def close(self, _app: web.Application) -> None:
        """Stop the background responses still running (on the app's cleanup)."""
        tasks = [run.task for run in self.responses.values() if run.task is not None]
        for run in self.responses.values():
            run.stop("cancelled")
        self.responses.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/health":
            if request.method != "GET":
                return _error_response(405, "Method not allowed", headers={"Allow": "GET"})
            return web.Response(body=_HEALTH_BODY, content_type=JSON_TYPE)

        pace = self.pace
        raw = await request.read()
        pace.received(request, raw)
        route = path.rstrip("/")
        answer = await pace.intercept(request, route)
        if answer is not None:
            return answer
        if pace.first_byte_delay > 0:
            await asyncio.sleep(pace.first_byte_delay)

        errors = _error_response
        if route.endswith("/chat/completions"):
            endpoint = self._chat
        elif route.endswith("/completions"):
            endpoint = self._completions
        elif route.endswith("/embeddings"):
            endpoint = self._embeddings
        elif route.endswith("/models") and request.method == "GET":
            return _json_response(
                {
                    "object": "list",
                    "data": [
                        {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "demo"}
                    ],
                }
            )
        elif route.endswith("/responses"):
            endpoint = self._responses_create
        elif route.endswith("/v1/messages"):
            endpoint = self._messages
            errors = _anthropic_error_response
        elif route.endswith("/v1/messages/count_tokens"):
            endpoint = self._count_tokens
            errors = _anthropic_error_response
        else:
            match = _RESPONSE_PATH.search(route)
            if match is None:
                return _error_response(404, f"Unknown path: {path}", code="not_found")
            return await self._response_by_id(request, match[1], match[2] is not None)
        if request.method != "POST":
            return errors(405, f"Method {request.method} not allowed", headers={"Allow": "POST"})

        try:
            body = json.loads(raw)
        except ValueError as exc:
            return errors(400, f"Request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return errors(400, "Request body must be a JSON object")
        try:
            return await endpoint(request, body)
        except _BadRequest as exc:
            return errors(400, exc.message, param=exc.param)

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array", "messages")
        prompt_words = 0
        last_user = ""
        for message in messages:
            if not isinstance(message, dict):
                raise _BadRequest("each message must be an object", "messages")
            text = _content_text(message.get("content"))
            prompt_words += _count_words(text)
            if message.get("role") == "user":
                last_user = text
        stream, include_usage = _stream_flags(body)
        pieces, finish = _reply_pieces(ECHO_PREFIX + last_user, _max_words(body))
        usage = _usage(max(prompt_words, 1), len(pieces))
        model = _model_of(body)
        completion_id = _new_id("chatcmpl-")
        created = int(time.time())

        if not stream:
            return _json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(pieces)},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )

        choices: list[object] = [
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": piece}
                    if i == 0
                    else {"content": piece},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
            for i, piece in enumerate(pieces)
        ]
        choices.append([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
        return await self._stream(
            request,
            _chunk_prefix(completion_id, "chat.completion.chunk", created, model),
            choices,
            usage if include_usage else None,
        )

    async def _completions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)
        if not isinstance(prompt, str):
            raise _BadRequest("'prompt' must be a string or an array of strings", "prompt")
        stream, include_usage = _stream_flags(body)
        pieces, finish = _reply_pieces(ECHO_PREFIX + prompt, _max_words(body))
        usage = _usage(max(_count_words(prompt), 1), len(pieces))
        model = _model_of(body)
        completion_id = _new_id("cmpl-")
        created = int(time.time())

        if not stream:
            return _json_response(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "text": "".join(pieces),
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )

        choices: list[object] = [
            [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]
            for piece in pieces
        ]
        choices.append([{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}])
        return await self._stream(
            request,
            _chunk_prefix(completion_id, "text_completion", created, model),
            choices,
            usage if include_usage else None,
        )

    async def _embeddings(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        inputs = _embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if encoding is None:
            encoding = "float"
        if encoding not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        data: list[dict[str, Any]] = []
        tokens = 0
        for index, (text, count) in enumerate(inputs):
            tokens += count
            vector = embedding_vector(text)
            embedding: list[float] | str = (
                base64.b64encode(_EMBEDDING_OUT.pack(*vector)).decode("ascii")
                if encoding == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = max(tokens, 1)
        return _json_response(
            {
                "object": "list",
                "data": data,
                "model": _model_of(body),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _stream(
        self,
        request: web.Request,
        prefix: bytes,
        choices: Sequence[object],
        usage: dict[str, int] | None,
    ) -> web.StreamResponse:
        """Write one SSE event per entry of ``choices`` (+ the usage chunk), then [DONE]."""
        suffix = b',"usage":null}\n\n' if usage is not None else b"}\n\n"
        events = [prefix + dumps(choice) + suffix for choice in choices]
        if usage is not None:
            events.append(prefix + b'[],"usage":' + dumps(usage) + b"}\n\n")
        events.append(_SSE_DONE)
        return await self._write_events(request, events)

    async def _write_events(
        self,
        request: web.Request,
        events: Sequence[bytes],
        run: _ResponseRun | None = None,
        start: int = 0,
    ) -> web.StreamResponse:
        """Stream ``events`` (each framed with "\\n") from ``events[start]`` on.

        With a ``run``, ``events`` is its growing list: written as they come until it ends.
        Lines end with ``Pace.line_ending``; ``chunk_delay`` is waited between two
        events and a cut (:meth:`Pace.stream_break`) counts the events written.
        """
        pace = self.pace
        break_after = pace.stream_break()
        newline = pace.line_ending.encode()

        resp = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            written = 0
            index = start
            while True:
                while index < len(events):
                    if written == break_after:
                        transport = request.transport
                        if transport is not None:
                            transport.close()
                        return resp
                    if written and pace.chunk_delay > 0:
                        await asyncio.sleep(pace.chunk_delay)
                    event = events[index]
                    if newline != b"\n":
                        event = event.replace(b"\n", newline)  # (JSON data holds no raw LF)
                    await resp.write(event)
                    index += 1
                    written += 1
                if run is None or run.finished:
                    break
                await run.changed()
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        return resp

    # ----------------------------------------------------------------------------------
    # OpenAI Responses API

    async def _responses_create(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _BadRequest("'instructions' must be a string", "instructions")
        prompt_words, last_user = _responses_input(body.get("input"))
        if instructions:
            prompt_words += _count_words(instructions)
        limit = body.get("max_output_tokens")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise _BadRequest("'max_output_tokens' must be an integer >= 1", "max_output_tokens")
        background = _bool_field(body, "background")
        store = body.get("store", True)
        if not isinstance(store, bool):
            raise _BadRequest("'store' must be a boolean", "store")
        if background and not store:
            raise _BadRequest(
                "Background responses must be stored: 'store' cannot be false", "store"
            )
        stream = _bool_field(body, "stream")
        pieces, finish = _reply_pieces(ECHO_PREFIX + last_user, limit)
        run = _ResponseRun(
            model=_model_of(body),
            instructions=instructions,
            max_output_tokens=limit,
            store=store,
            background=background,
            pieces=pieces,
            incomplete=finish == "length",
            input_tokens=max(prompt_words, 1),
        )
        run.start()
        if store:
            self._keep(run)
        if background:
            run.task = asyncio.create_task(run.run_in_background(self.pace.background_delay))
            if stream:
                return await self._write_events(request, run.events, run)
            return _json_response(run.snapshot())
        run.begin()
        run.finish()
        if stream:
            return await self._write_events(request, run.events)
        return _json_response(run.snapshot())

    def _keep(self, run: _ResponseRun) -> None:
        responses = self.responses
        responses[run.id] = run
        while len(responses) > MAX_KEPT_RESPONSES:
            oldest = responses.pop(next(iter(responses)))
            oldest.stop("cancelled")

    async def _response_by_id(
        self, request: web.Request, response_id: str, cancel: bool
    ) -> web.StreamResponse:
        method = request.method
        allowed = "POST" if cancel else "GET, DELETE"
        if method not in allowed.split(", "):
            return _error_response(405, f"Method {method} not allowed", headers={"Allow": allowed})
        run = self.responses.get(response_id)
        if run is None:
            # (OpenAI's own 404 here says invalid_request_error, not not_found_error)
            error = {
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return web.Response(status=404, body=dumps({"error": error}), content_type=JSON_TYPE)
        if cancel:
            if not run.background:
                return _error_response(400, "Only background responses can be cancelled.")
            if run.finished:
                return _error_response(400, f"Cannot cancel a response with status '{run.status}'.")
            run.stop("cancelled")
            return _json_response(run.snapshot())
        if method == "DELETE":
            del self.responses[response_id]
            run.stop("cancelled")
            return _json_response({"id": response_id, "object": "response", "deleted": True})
        query = request.rel_url.query
        if query.get("stream", "false").lower() != "true":
            return _json_response(run.snapshot())
        after = query.get("starting_after")
        start = 0
        if after is not None:
            try:
                start = int(after) + 1
            except ValueError:
                return _error_response(
                    400, "'starting_after' must be an integer", param="starting_after"
                )
        return await self._write_events(request, run.events, run, max(start, 0))

    # ----------------------------------------------------------------------------------
    # Anthropic Messages API

    async def _messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        input_tokens, last_user = _anthropic_input(body)
        limit = body.get("max_tokens")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _BadRequest("max_tokens: Field required (an integer >= 1)", "max_tokens")
        stream = _bool_field(body, "stream")
        pieces, finish = _reply_pieces(ECHO_PREFIX + last_user, limit)
        stop_reason = "max_tokens" if finish == "length" else "end_turn"
        message_id = _new_id("msg_")
        model = _model_of(body)
        if not stream:
            return _json_response(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": "".join(pieces)}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": _anthropic_usage(input_tokens, len(pieces)),
                }
            )
        start = {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _anthropic_usage(input_tokens, 1),
            },
        }
        events = [
            _sse_event("message_start", start),
            _sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _sse_event("ping", {"type": "ping"}),
        ]
        events.extend(
            _sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in pieces
        )
        events.append(_sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(
            _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": len(pieces)},
                },
            )
        )
        events.append(_sse_event("message_stop", {"type": "message_stop"}))
        return await self._write_events(request, events)

    async def _count_tokens(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        input_tokens, _ = _anthropic_input(body)
        return _json_response({"input_tokens": input_tokens})


def _chunk_prefix(completion_id: str, obj: str, created: int, model: str) -> bytes:
    return (
        b'data: {"id":'
        + dumps(completion_id)
        + b',"object":'
        + dumps(obj)
        + b',"created":'
        + str(created).encode()
        + b',"model":'
        + dumps(model)
        + b',"choices":'
    )


# --------------------------------------------------------------------------------------
# App and CLI


def create_backend_app(control: Pace | None = None) -> web.Application:
    """The backend app; its :class:`Pace` (in the tests: their fault switches) is
    ``app[CONTROL_KEY]``."""
    if control is None:
        control = Pace()
    app = web.Application(client_max_size=64 * 1024**2)
    app[CONTROL_KEY] = control
    backend = _Backend(control)
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    app.on_cleanup.append(backend.close)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dialproxy.demo_backend",
        description="Run the demo model backend (OpenAI and Anthropic APIs, model 'echo').",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (8081)")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks (0)"
    )
    args = parser.parse_args(argv)
    host: str = args.host
    port: int = args.port
    shown_host = f"[{host}]" if ":" in host else host

    def announce(*_: object) -> None:
        print(f"demo backend listening on http://{shown_host}:{port}", flush=True)

    web.run_app(
        create_backend_app(Pace(chunk_delay=args.chunk_delay)),
        host=host,
        port=port,
        access_log=None,
        print=announce,
        handle_signals=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
