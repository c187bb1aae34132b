"""One JSON log line per request, with what ops need and never a secret."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from dialproxy.logs import JSONLines
from dialproxy.text import fingerprint
from tests.conftest import Backend, ProxyFactory, new_key

KEY = new_key()
UPSTREAM_KEY = new_key("sk-upstream-")


def config(backend: Backend) -> dict[str, Any]:
    return {
        "models": {
            "chat": {
                "type": "chat",
                "upstreams": [{"endpoint": backend.url(), "key": UPSTREAM_KEY}],
            }
        },
        "keys": {KEY: {"project": "team-log", "role": "default"}},
    }


async def test_one_line_per_request_with_usage_and_no_secret(
    backend: Backend, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(config(backend))
    body = {"messages": [{"role": "user", "content": "a b"}]}
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                r = await s.post(
                    proxy.url("/openai/deployments/chat/chat/completions"),
                    json={**body, "stream": stream},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                await r.read()
            r = await s.post(
                proxy.url("/openai/deployments/chat/chat/completions"),
                json=body,
                headers={"Api-Key": KEY + "x"},
            )
            await r.read()
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 3
    ok = lines[0]
    assert ok["status"] == 200 and ok["project"] == "team-log" and ok["deployment"] == "chat"
    assert ok["key"] == fingerprint(KEY)
    assert ok["upstream"] == "upstreams[0]" and ok["attempts"] == 1
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["total_tokens"]) == (2, 3, 5)
    assert ok["duration_ms"] > 0
    assert lines[1]["total_tokens"] == 5  # the streamed one is counted too
    assert lines[2]["status"] == 401 and lines[2]["key"] is None
    text = json.dumps(logs)
    assert KEY not in text and UPSTREAM_KEY not in text


async def test_lines_are_batched_but_errors_go_out_at_once() -> None:
    import io

    from dialproxy.logs import FLUSH_AFTER, BatchedLines

    stream = io.StringIO()
    lines = BatchedLines(stream)
    lines.info('{"event": "a"}')
    lines.info('{"event": "b"}')
    assert stream.getvalue() == ""  # batched
    await asyncio.sleep(FLUSH_AFTER * 2)
    assert stream.getvalue() == '{"event": "a"}\n{"event": "b"}\n'
    lines.info('{"event": "c"}')
    lines.error('{"event": "d"}')  # an error flushes what is pending with it
    assert stream.getvalue().endswith('{"event": "c"}\n{"event": "d"}\n')


def test_the_json_line_has_level_timestamp_and_any_value() -> None:
    render = JSONLines()
    line = render(None, "warn", {"event": "x", "cost": Decimal("1.5"), "n": 3, "none": None})
    parsed = json.loads(line)
    assert parsed["event"] == "x" and parsed["level"] == "warning"
    assert (parsed["cost"], parsed["n"], parsed["none"]) == ("Decimal('1.5')", 3, None)
    stamp = datetime.strptime(parsed["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 5
    assert json.loads(render(None, "exception", {"event": "y"}))["level"] == "error"
    assert json.loads(render(None, "info", {"event": "z", "n": 2**70}))["n"] == 2**70
    assert "\n" not in line


def test_the_request_log_renders_through_the_configured_chain_and_obeys_its_level() -> None:
    import io
    import logging

    import structlog

    from dialproxy import logs

    saved = structlog.get_config()
    try:
        for level, expected in ((logging.WARNING, 0), (logging.INFO, 1)):
            stream = io.StringIO()
            lines = logs.configure(level, stream)
            fields = {"status": 200, "deployment": "chat", "shared_key": None}
            logs.request_log().line("request", fields)
            lines.flush()
            out = [json.loads(line) for line in stream.getvalue().splitlines()]
            assert len(out) == expected
            if expected:
                assert out[0] == {
                    **fields,
                    "event": "request",
                    "level": "info",
                    "timestamp": out[0]["timestamp"],
                }
            assert fields == {"status": 200, "deployment": "chat", "shared_key": None}
        with capture_logs() as captured:  # and a processor that drops the event
            logs.request_log().line("request", {"status": 200})
        assert captured == [{"event": "request", "status": 200, "log_level": "info"}]
    finally:
        logs.configure(logging.INFO, io.StringIO())
        structlog.configure(**saved)


def test_a_request_line_handed_over_is_written_as_a_line_given_to_copy() -> None:
    """``take`` (the request path's: the fields handed over, rendered to bytes) writes what
    ``line`` writes, to a stream with a UTF-8 buffer (stderr) and to one without; an
    overlong line is cut as any line is."""
    import io
    import logging
    import re

    import structlog

    from dialproxy import logs

    stamp = re.compile(r'"timestamp": ?"[^"]*"')
    saved = structlog.get_config()
    try:
        for binary in (True, False):
            raw = io.BytesIO()
            stream = io.TextIOWrapper(raw, encoding="utf-8") if binary else io.StringIO()
            lines = logs.configure(logging.INFO, stream)
            for fields in (
                {"status": 200, "path": "/caf\u00e9 \u263a", "cost": Decimal("1.5"), "n": None},
                {"status": 200, "big": 2**70},
                {"status": 500, "error": "x" * 5000, "details": {"k": "y" * 5000}},
            ):
                logs.request_log().line("request", fields)
                handed = dict(fields)
                logs.request_log().take("request", handed)
                assert handed["event"] == "request" and handed["level"] == "info"
            lines.flush()
            text = stream.getvalue() if isinstance(stream, io.StringIO) else raw.getvalue().decode()
            out = text.splitlines()
            assert len(out) == 6 and text.endswith("\n")
            for given, taken in zip(out[::2], out[1::2], strict=True):
                assert stamp.sub("", given) == stamp.sub("", taken)
            assert "caf\u00e9 \u263a" in out[1] and json.loads(out[3])["big"] == 2**70
            assert len(out[5]) < 4096 and "more characters" in out[5]
            stamp_of = json.loads(out[1])["timestamp"]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp_of)
    finally:
        logs.configure(logging.INFO, io.StringIO())
        structlog.configure(**saved)


def test_the_served_process_writes_an_uncaught_exception_as_a_json_line() -> None:
    """What `dialproxy serve` sets up: an exception nobody caught (its message may quote
    anything) is one JSON line with its class and frames, not a text traceback."""
    import subprocess
    import sys

    code = (
        "from dialproxy import logs; logs.capture_stdlib(logs.configure()); "
        "import warnings; warnings.warn('careful'); "
        "raise ValueError('Api-Key: sk-in-a-message')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    lines = [json.loads(line) for line in err.splitlines()]  # every line: JSON
    assert [line["logger"] for line in lines] == ["py.warnings", "dialproxy.uncaught"]
    assert lines[1]["event"] == "uncaught exception (ValueError)"
    assert lines[1]["exception"].endswith("ValueError") and "sk-in-a-message" not in err


def test_standard_library_records_lose_exception_messages_and_keep_their_class() -> None:
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from dialproxy import logs

    out: list[str] = []
    logger = logging.getLogger("dialproxy.test.stdlib")
    handler = logs.stdlib_handler(out.append)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for exc in (BadHttpMessage(f"Invalid header: Api-Key: {KEY}\r"), KeyError(KEY)):
            try:
                raise exc
            except Exception as e:
                logger.exception("Error handling request from %s", "127.0.0.1", exc_info=e)
        logger.warning("%s arguments %s", "too few")  # (the bare format string, no error)
        logger.warning("long " + "x" * 5000)
        # an exporter's retry warning quotes the URL it could not reach, query string and all
        logger.warning("Max retries exceeded with url: %s", f"/v1/traces?api_key={KEY}")
        logger.warning("connecting to %s", f"https://user:{KEY}@collector:4318/v1/traces")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = [json.loads(line) for line in out]
    assert KEY not in "".join(out)
    assert lines[0]["event"] == "bad HTTP request from client: BadHttpMessage"
    assert "exception" not in lines[0]
    assert lines[1]["event"] == "Error handling request from 127.0.0.1 (KeyError)"
    assert lines[1]["exception"].endswith("KeyError") and "test_logs.py" in lines[1]["exception"]
    assert lines[2]["event"] == "%s arguments %s"
    assert len(lines[3]["event"]) < 1100 and lines[3]["event"].endswith("more characters)")
    assert lines[4]["event"] == "Max retries exceeded with url: /v1/traces?***"
    assert lines[5]["event"] == "connecting to https://***@collector:4318/v1/traces"


def test_workers_sharing_one_pipe_never_split_a_line() -> None:
    """`--workers N` processes write to one stderr pipe: a batch goes in writes of at most
    PIPE_BUF bytes of whole lines (the kernel keeps each such write whole), so a slow reader
    of the shared pipe gets whole lines, every one JSON."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import asyncio, sys, structlog\n"
        "from dialproxy import logs\n"
        "logs.configure()\n"
        "log = structlog.get_logger('t')\n"
        "async def main():\n"
        "    for burst in range(8):\n"
        "        for i in range(300):\n"
        "            log.info('line', worker=sys.argv[1], n=burst * 300 + i, pad='x' * 150)\n"
        "        await asyncio.sleep(0.12)\n"
        "asyncio.run(main())\n"
    )
    read_end, write_end = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(w)], stderr=write_end) for w in range(2)
    ]
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4000):  # (slowly: the pipe fills, the writers wait)
        chunks.append(chunk)
        time.sleep(0.002)
    os.close(read_end)
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    lines = b"".join(chunks).decode().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole
    assert sorted((p["worker"], p["n"]) for p in parsed) == [
        (str(w), n) for w in range(2) for n in range(2400)
    ]


def test_a_batch_is_cut_into_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    from dialproxy.logs import PIPE_BUF, pieces

    lines = [b"a" * 1000] * 9 + [b"b" * (PIPE_BUF + 10)] + [b"c" * (PIPE_BUF - 1)]
    data = b"\n".join(lines) + b"\n"
    out = [bytes(p) for p in pieces(data)]
    assert b"".join(out) == data  # nothing lost or reordered
    assert [len(p) for p in out] == [4004, 4004, 1001, PIPE_BUF + 11, PIPE_BUF]
    assert all(p.endswith(b"\n") for p in out)
    assert list(pieces(b"short\n")) == [b"short\n"]
