"""The tests' fault switches for the demo backend (:mod:`dialproxy.demo_backend`): a
:class:`BackendControl` answers the next requests with a status, drops their connections or
cuts their streams, and records what the backend received.  Kept out of the package: the
wheel ships no fault injection."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict

from dialproxy.demo_backend import (
    DEFAULT_BACKGROUND_DELAY,
    JSON_TYPE,
    Pace,
    anthropic_error_payload,
    dumps,
    error_payload,
    is_anthropic,
)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the backend received it."""

    method: str
    path: str
    query_string: str  # raw: as it came, percent-escapes and all
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.body)


@dataclass(slots=True)
class _Fault:
    kind: Literal["fail", "drop"]
    remaining: int
    status: int = 0
    body: bytes = b""
    headers: CIMultiDict[str] | None = None
    anthropic_body: bytes | None = None  # the default body, as the Anthropic paths send it


class BackendControl(Pace):
    """Failure injection and request recording for a backend app (used in-process): the
    demo backend's :class:`Pace` with fault switches."""

    requests: list[ReceivedRequest]

    def __init__(self, *, record: bool = True, chunk_delay: float = 0.0) -> None:
        super().__init__(chunk_delay=chunk_delay)
        self.record = record
        self.requests = []
        self._faults: deque[_Fault] = deque()
        self._stream_breaks: deque[list[int]] = deque()  # [n_chunks, remaining]

    # --- the demo backend's hooks

    def received(self, request: web.Request, body: bytes) -> None:
        if self.record:
            self.requests.append(
                ReceivedRequest(
                    method=request.method,
                    path=request.path,
                    query_string=request.rel_url.raw_query_string,
                    headers=CIMultiDict(request.headers),
                    body=body,
                )
            )

    async def intercept(self, request: web.Request, route: str) -> web.StreamResponse | None:
        fault = self._take_fault()
        if fault is None:
            return None
        if fault.kind == "drop":
            transport = request.transport
            if transport is not None:
                transport.close()
            # Never sent: writing to the closed transport fails and aiohttp treats that as a
            # premature client disconnection (no error log, connection discarded).
            return web.Response(status=502)
        if self.first_byte_delay > 0:
            await asyncio.sleep(self.first_byte_delay)
        fault_body = fault.body
        if fault.anthropic_body is not None and is_anthropic(route):
            fault_body = fault.anthropic_body
        return web.Response(status=fault.status, body=fault_body, headers=fault.headers)

    def stream_break(self) -> int | None:
        return self._take_stream_break()

    # --- the switches

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        body: dict[str, Any] | str | bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests with ``status`` and ``body``.

        ``body`` defaults to an OpenAI-style error object (an Anthropic-style one on the
        Anthropic paths); a dict is sent as JSON, a str or bytes body is sent as is (as
        ``text/plain`` unless ``headers`` set a Content-Type).
        """
        _check_times(times)
        out_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        anthropic_payload = None
        if body is None:
            message = f"Injected failure: {_status_text(status)}"
            payload = dumps(error_payload(status, message))
            anthropic_payload = dumps(anthropic_error_payload(status, message))
            out_headers.setdefault("Content-Type", JSON_TYPE)
        elif isinstance(body, dict):
            payload = dumps(body)
            out_headers.setdefault("Content-Type", JSON_TYPE)
        else:
            payload = body.encode() if isinstance(body, str) else bytes(body)
            out_headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        self._faults.append(_Fault("fail", times, status, payload, out_headers, anthropic_payload))

    def drop_next(self, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests before any response bytes."""
        _check_times(times)
        self._faults.append(_Fault("drop", times))

    def break_stream_after(self, n_chunks: int, times: int = 1) -> None:
        """Abort the next ``times`` streamed responses after writing ``n_chunks`` chunks.

        The connection is closed without the final chunk, the ``[DONE]`` event or the
        chunked-encoding terminator, so a client sees an incomplete payload.
        """
        if n_chunks < 0:
            raise ValueError("n_chunks must be >= 0")
        _check_times(times)
        self._stream_breaks.append([n_chunks, times])

    def reset(self) -> None:
        """Forget the recorded requests, pending failures and delays; frame streams with LF."""
        self.requests.clear()
        self._faults.clear()
        self._stream_breaks.clear()
        self.chunk_delay = 0.0
        self.first_byte_delay = 0.0
        self.background_delay = DEFAULT_BACKGROUND_DELAY
        self.line_ending = "\n"

    @property
    def last_request(self) -> ReceivedRequest:
        """The most recent recorded request (``IndexError`` when there is none)."""
        return self.requests[-1]

    def _take_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.popleft()
        return fault

    def _take_stream_break(self) -> int | None:
        if not self._stream_breaks:
            return None
        entry = self._stream_breaks[0]
        entry[1] -= 1
        if entry[1] <= 0:
            self._stream_breaks.popleft()
        return entry[0]


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _check_times(times: int) -> None:
    if times < 1:
        raise ValueError("times must be >= 1")
