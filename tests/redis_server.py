"""A real ``redis-server`` for the tests, and proxy processes that share it.

:class:`RedisServer` runs ``redis-server`` on a free port in a temp directory with no
persistence (``--save '' --appendonly no``), and can pause (SIGSTOP), resume (SIGCONT),
kill and restart it on the same port: the outages the failure policies are about.  There is
no skip when ``redis-server`` is missing: the Redis tests fail (``make test`` installs it
through the Makefile's ``redis`` target).

:class:`ProxyProcess` is ``python -m dialproxy serve`` as ops run it behind a load balancer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import pytest

ROOT = Path(__file__).resolve().parents[1]
Reply = int | bytes | str | list["Reply"] | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: the Redis tests need it (`make test` installs it)",
            pytrace=False,
        )
    return binary


class RedisError(Exception):
    pass


def _read_reply(f: BinaryIO) -> Reply:
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        return f.read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(f) for _ in range(size)]
    raise RedisError(f"unexpected reply {line!r}")


def command(port: int, *args: str | int, timeout: float = 1.0) -> Reply:
    """One command over RESP2 on a fresh connection (the tests' view of Redis)."""
    parts = [str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        with sock.makefile("rb") as f:
            return _read_reply(f)


class RedisServer:
    """``redis-server`` on ``port`` (a free one by default), its files in ``directory``."""

    def __init__(
        self, directory: Path, port: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.binary = redis_binary()
        self.extra = extra  # more redis-server options (e.g. a TLS port)
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.socket_path = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"redis+unix://{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                *self.extra,
            ],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.paused = False
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail(f"redis-server exited at start (port {self.port})", pytrace=False)
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("redis-server did not answer PING", pytrace=False)
            time.sleep(0.01)

    def command(self, *args: str | int) -> Reply:
        return command(self.port, *args)

    def flush(self) -> None:
        self.command("FLUSHALL")

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL (works on a paused server too): connections are reset, the data is lost."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.paused = False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class ProxyProcess:
    """``python -m dialproxy serve`` on a free port (stopped with SIGTERM by :meth:`stop`)."""

    def __init__(self, config: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dialproxy",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
                "--no-watch",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={k: v for k, v in os.environ.items() if not k.startswith("DIALPROXY_")},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dialproxy exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.02)
        raise AssertionError(f"dialproxy did not come up:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class BackendProcess:
    """The demo backend (``python -m dialproxy.demo_backend``) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dialproxy.demo_backend", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the demo backend exited at start"
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=1):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.02)
        raise AssertionError("the demo backend did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
