"""structlog set-up: one JSON object per line on stderr.  Nothing here ever sees a secret:
callers log fingerprints.

The standard library's loggers (aiohttp's, asyncio's, warnings) go through the same JSON
rendering (:func:`stdlib_handler`).  What they log about a client's bad bytes is cut down
to the error's class: aiohttp quotes the raw request line or header (an ``Api-Key`` value
with it) in the message of a malformed request's error.  A string longer than
:data:`MAX_VALUE` is cut in any line that would be longer than :data:`MAX_LINE`.

Lines are written in batches: a request line costs a ``write`` system call otherwise (stderr
redirected to a file or a pipe is line-buffered).  Buffered lines reach the stream within
:data:`FLUSH_AFTER` seconds, at once for warnings and errors, and at exit.  A batch goes in
writes of whole lines of at most ``PIPE_BUF`` bytes each: processes sharing one pipe
(``--workers``) never split each other's lines (the kernel keeps such a write whole).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from dialproxy.text import URL_CREDENTIALS

FLUSH_AFTER = 0.1
MAX_VALUE = 256  # characters of a string kept in an overlong log line
MAX_LINE = 4096  # a line longer than this has its long strings cut
PIPE_BUF = select.PIPE_BUF  # the most one write to a pipe keeps whole (4096 on Linux)


class BatchedLines:
    """A structlog logger writing rendered lines to a stream in batches.

    Lines are kept as UTF-8 bytes: the request line comes rendered so (:meth:`raw`, no
    decoding), and a batch goes to the stream's binary buffer when it has one and writes
    UTF-8 (stderr does), else decoded to its text layer (a ``StringIO``)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self._buffer = getattr(stream, "buffer", None) if encoding == "utf8" else None
        self._pending: list[bytes] = []
        self._scheduled = False

    def msg(self, line: str) -> None:
        self.raw(line.encode("utf-8", "backslashreplace"))  # (as stderr writes it)

    def raw(self, line: bytes) -> None:
        """A line rendered as UTF-8 bytes (:meth:`JSONLines.info`), written with the batch."""
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
        self._pending.append(line.encode("utf-8", "backslashreplace"))
        self.flush()

    log = debug = info = msg
    warning = warn = error = err = critical = exception = fatal = urgent

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        data = b"\n".join(lines) + b"\n"
        try:
            if self._buffer is not None:
                self._stream.flush()  # (what was written to its text layer goes first)
                for piece in pieces(data):
                    self._buffer.write(piece)
                    self._buffer.flush()  # (one write: the buffer was empty)
            else:
                for piece in pieces(data):
                    self._stream.write(bytes(piece).decode("utf-8", "backslashreplace"))
                    self._stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed at exit): nothing to do
            pass


def pieces(data: bytes) -> Iterator[bytes | memoryview]:
    """``data`` (newline-ended lines) in pieces of whole lines of at most :data:`PIPE_BUF`
    bytes (a longer line goes alone); the cuts found by C searches, not line by line."""
    if len(data) <= PIPE_BUF:  # (the usual: one write)
        yield data
        return
    view, start, size = memoryview(data), 0, len(data)
    while start < size:
        end = start + PIPE_BUF
        if end >= size:
            end = size
        else:
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= 0 else data.index(b"\n", end) + 1
        yield view[start:end]
        start = end


# "000" to "999": a timestamp's microseconds in two lookups (a format is slower).
_DIGITS = tuple(f"{n:03d}" for n in range(1000))

# As structlog's add_log_level names them.
_LEVELS = {"warn": "warning", "exception": "error"}


class JSONLines:
    """The one processor: what ``add_log_level``, a UTC ISO ``TimeStamper`` and
    ``JSONRenderer`` would do in a row, in one call (a request line goes through it on
    every request).  The date part of the timestamp is made once a second, its
    microseconds looked up (:data:`_DIGITS`); JSON is orjson's (about ten times
    json.dumps' speed, as structlog's performance guide suggests); a value JSON cannot
    hold is written as its ``repr``."""

    def __init__(self) -> None:
        self._base = 0  # the current second, in epoch nanoseconds
        self._prefix = ""  # its timestamp up to the fraction: 2026-01-02T03:04:05.

    def _stamp(self, now: int) -> str:
        """The timestamp of ``now`` (epoch nanoseconds)."""
        micros = (now - self._base) // 1000
        if 0 <= micros < 1_000_000:  # (the current second)
            return self._prefix + _DIGITS[micros // 1000] + _DIGITS[micros % 1000] + "Z"
        second = now // 1_000_000_000
        self._base = second * 1_000_000_000
        self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        micros = (now - self._base) // 1000
        return self._prefix + _DIGITS[micros // 1000] + _DIGITS[micros % 1000] + "Z"

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event["level"] = _LEVELS.get(method, method)
        event["timestamp"] = self._stamp(time.time_ns())  # (the request line's is inline)
        if _pid is not None:
            event["pid"] = _pid
        line = _render(event)
        if len(line) > MAX_LINE:  # (one length test on the common path)
            line = _render({name: cut_value(value) for name, value in event.items()})
        return line

    def info(self, event: dict[str, Any]) -> bytes:
        """The line of ``event`` at info level, as :meth:`__call__` makes it, in UTF-8 bytes:
        what :class:`BatchedLines` keeps (the request line's way: no str made)."""
        event["level"] = "info"
        now = time.time_ns()
        micros = (now - self._base) // 1000  # (small numbers: quick, no formatting)
        if 0 <= micros < 1_000_000:
            event["timestamp"] = (
                self._prefix + _DIGITS[micros // 1000] + _DIGITS[micros % 1000] + "Z"
            )
        else:
            event["timestamp"] = self._stamp(now)
        if _pid is not None:
            event["pid"] = _pid
        try:
            line = orjson.dumps(event, default=repr)
        except TypeError:  # (as _render: json.dumps writes what orjson cannot)
            line = json.dumps(event, default=repr).encode()
        # (bytes count at least the characters: only a line this long may be too long)
        if len(line) > MAX_LINE and len(line.decode()) > MAX_LINE:
            line = _render({name: cut_value(value) for name, value in event.items()}).encode()
        return line


def _render(event: MutableMapping[str, Any]) -> str:
    try:
        return orjson.dumps(event, default=repr).decode()
    except TypeError:  # what orjson cannot write at all (an int beyond 64 bits)
        return json.dumps(event, default=repr)


def cut(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis saying so (a 1 MB model name
    is not echoed in an error body or a log line)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


def cut_value(value: Any) -> Any:
    """A log field's value with its long strings cut (in lists and dicts too)."""
    if isinstance(value, str):
        return cut(value)
    if isinstance(value, bytes | bytearray):
        return cut(repr(bytes(value[: MAX_VALUE + 1])))
    if isinstance(value, dict):
        return {cut(str(k)): cut_value(v) for k, v in list(value.items())[:MAX_VALUE]}
    if isinstance(value, list | tuple):
        return [cut_value(v) for v in value[:MAX_VALUE]]
    return value


class RequestLog(structlog.BoundLoggerBase):
    """The request log's logger (a structlog custom wrapper): :meth:`line` logs an event
    at info level with its fields given as one dict.  ``log.info("request", **fields)``
    would pass a request line's fifteen fields as keywords through two more calls, three
    copies of them: about half of what a line costs.  The event dict is built and run
    through the processors here, as structlog's ``_process_event`` does (the bound
    context, the fields, then ``event``), without its keyword copy and its checks of what
    the last processor returned, when that is a line (it always is: :class:`JSONLines`)."""

    def line(self, event: str, fields: dict[str, Any]) -> None:
        if _level > logging.INFO:
            return
        event_dict: Any = {**self._context, **fields} if self._context else fields.copy()
        event_dict["event"] = event
        try:
            for proc in self._processors:
                event_dict = proc(self._logger, "info", event_dict)
        except structlog.DropEvent:
            return
        if isinstance(event_dict, str):  # a line: JSONLines'
            self._logger.info(event_dict)
        elif isinstance(event_dict, tuple):  # (args, kwargs), as structlog takes them
            self._logger.info(*event_dict[0], **event_dict[1])
        elif isinstance(event_dict, dict):
            self._logger.info(**event_dict)
        else:  # bytes
            self._logger.info(event_dict)

    def take(self, event: str, fields: dict[str, Any]) -> None:
        """:meth:`line` with ``fields`` handed over: the line's own (changed, not copied).
        On the chain :func:`configure` sets (no context bound, :class:`JSONLines` to
        :class:`BatchedLines`), rendered here to bytes and handed to the batch as they are:
        the request line's way, every request."""
        if _level > logging.INFO:
            return
        processors, logger = self._processors, self._logger
        if (
            self._context
            or not isinstance(processors, list)
            or len(processors) != 1
            or type(logger) is not BatchedLines
            or type(render := processors[0]) is not JSONLines
        ):
            self.line(event, fields)
            return
        fields["event"] = event
        logger.raw(render.info(fields))


def request_log() -> RequestLog:
    """A :class:`RequestLog` on the configured processors and logger."""
    log = structlog.wrap_logger(None, wrapper_class=RequestLog).bind()
    assert isinstance(log, RequestLog)
    return log


_level = logging.INFO  # as configured: RequestLog obeys it as structlog's loggers do
_pid: int | None = None  # with --workers: every line says which process wrote it


def tag_pid() -> None:
    """From now on every line carries ``"pid"``: the processes of ``serve --workers N``
    write to one stderr."""
    global _pid
    _pid = os.getpid()


class ClientErrorFilter(logging.Filter):
    """Cuts a standard library log record down to what may be logged: no exception message
    and no argument, which may quote a client's bytes (aiohttp's "Error handling request"
    for a malformed request quotes the raw header line; asyncio's messages carry reprs).
    A malformed request becomes ``bad HTTP request from client: BadHttpMessage``; any other
    exception keeps its class and its traceback's frames, never its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _from_client(exc):
            record.msg = f"bad HTTP request from client: {type(exc).__name__}"
        elif exc is not None:
            frames = "".join(traceback.format_tb(exc.__traceback__))
            record.msg = f"{_message(record)} ({type(exc).__name__})"
            record.__dict__["exception"] = f"{frames}{type(exc).__name__}"
        else:
            record.msg = _message(record)
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def _message(record: logging.LogRecord) -> str:
    """The record's message, cut, with the query strings and the ``user:password@`` of the
    URLs in it hidden (an exporter's "max retries exceeded with url: /v1/traces?token=..."):
    its bare format string when its arguments do not fit it (a filter's error would reach
    the code that logged)."""
    try:
        text = record.getMessage()
    except Exception:
        text = str(record.msg)
    return cut(URL_CREDENTIALS.sub("://***@", _URL_QUERY.sub(r"\1?***", text)), 1024)


# A path's query string (``/v1/traces?api_key=...``, a URL's too), as third-party libraries
# quote it in their messages.
_URL_QUERY = re.compile(r"(/[^\s?'\"<>]*)\?[^\s'\"<>)]+")


def _from_client(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.web_protocol import RequestPayloadError

    return isinstance(exc, HttpProcessingError | RequestPayloadError)


def _stdlib_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The record's logger name and, from :class:`ClientErrorFilter`, its frames."""
    record = event.get("_record")
    if record is not None:
        event["logger"] = record.name
        if "exception" in record.__dict__:
            event["exception"] = record.__dict__["exception"]
    return event


def stdlib_handler(write: Callable[[str], None]) -> logging.Handler:
    """A handler rendering standard library records as the JSON lines of this module,
    through :class:`ClientErrorFilter`, each handed to ``write``."""

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                write(self.format(record))
            except Exception:  # (as logging.Handler does: a log line never breaks a request)
                self.handleError(record)

    handler = Lines()
    handler.addFilter(ClientErrorFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                _stdlib_fields,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                JSONLines(),
            ],
        )
    )
    return handler


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


def capture_stdlib(lines: BatchedLines, level: int = logging.INFO) -> None:
    """The served process's standard library loggers (aiohttp's, asyncio's) and warnings
    as JSON lines on ``lines`` (the only handler): nothing else writes to stderr."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(stdlib_handler(lines.urgent))
    root.setLevel(level)
    # watchfiles logs each batch of changes at INFO: with stderr written into the config's
    # folder, each such line is a change, logged, a change... (the watcher logs its own)
    logging.getLogger("watchfiles").setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    uncaught = logging.getLogger("dialproxy.uncaught")

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        uncaught.critical("uncaught exception", exc_info=(kind, value, tb))
        lines.flush()

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and args.exc_type is not SystemExit:
            uncaught.critical("uncaught exception in a thread", exc_info=args.exc_value)

    sys.excepthook = excepthook  # (a traceback printed as text is not a JSON line)
    threading.excepthook = thread_excepthook
