"""structlog set-up: one JSON object per line on stderr.  Nothing here ever sees a secret:
callers log fingerprints.

Lines are written in batches: a request line costs a ``write`` system call otherwise (stderr
redirected to a file or a pipe is line-buffered).  Buffered lines reach the stream within
:data:`FLUSH_AFTER` seconds, at once for warnings and errors, and at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

FLUSH_AFTER = 0.1


class BatchedLines:
    """A structlog logger writing rendered lines to a stream in batches."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False

    def msg(self, line: str) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: nothing would flush later
            self.flush()
            return
        loop.call_later(FLUSH_AFTER, self.flush)
        self._scheduled = True

    def urgent(self, line: str) -> None:
        self._pending.append(line)
        self.flush()

    log = debug = info = msg
    warning = warn = error = err = critical = exception = fatal = urgent

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed at exit): nothing to do
            pass


# As structlog's add_log_level names them.
_LEVELS = {"warn": "warning", "exception": "error"}


class JSONLines:
    """The one processor: what ``add_log_level``, a UTC ISO ``TimeStamper`` and
    ``JSONRenderer`` would do in a row, in one call (a request line goes through it on
    every request).  The date part of the timestamp is made once a second; JSON is
    orjson's (about ten times json.dumps' speed, as structlog's performance guide
    suggests); a value JSON cannot hold is written as its ``repr``."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event["level"] = _LEVELS.get(method, method)
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{micros:06d}Z"
        try:
            return orjson.dumps(event, default=repr).decode()
        except TypeError:  # what orjson cannot write at all (an int beyond 64 bits)
            return json.dumps(event, default=repr)


class RequestLog(structlog.BoundLoggerBase):
    """The request log's logger (a structlog custom wrapper): :meth:`line` logs an event
    at info level with its fields given as one dict.  ``log.info("request", **fields)``
    would pass a request line's fifteen fields as keywords through two more calls, three
    copies of them: about half of what a line costs."""

    def line(self, event: str, fields: dict[str, Any]) -> None:
        if _level > logging.INFO:
            return
        try:
            args, kw = self._process_event("info", event, fields)
        except structlog.DropEvent:
            return
        self._logger.info(*args, **kw)


def request_log() -> RequestLog:
    """A :class:`RequestLog` on the configured processors and logger."""
    log = structlog.wrap_logger(None, wrapper_class=RequestLog).bind()
    assert isinstance(log, RequestLog)
    return log


_level = logging.INFO  # as configured: RequestLog obeys it as structlog's loggers do


def configure(level: int = logging.INFO, stream: TextIO | None = None) -> BatchedLines:
    global _level
    _level = level
    lines = BatchedLines(stream or sys.stderr)
    atexit.register(lines.flush)

    def factory(*_: Any) -> BatchedLines:
        return lines

    structlog.configure(
        processors=[JSONLines()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return lines
