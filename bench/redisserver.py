"""The bench's own ``redis-server``: a free port, no persistence, its stats read around a run.

The Redis-counter proxy keeps every counter there; around each measured run the bench
resets the server's command statistics (``CONFIG RESETSTAT``) and reads them after
(``INFO commandstats``: calls per command, the commands run inside Lua scripts and MULTI
blocks included) with the server's CPU time (``INFO cpu``: used_cpu_sys + used_cpu_user).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import redis

from bench.procs import BenchError, Child

# Commands the bench itself sends (never the proxy): left out of the counts.
_OWN = ("info", "config|", "ping")


def redis_argv(port: int, directory: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: `make redis` installs it (or --no-redis)")
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory),
    ]  # fmt: skip


class RedisServer:
    """A started ``redis-server`` child and a client to read its stats."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.child.check_alive()
            try:
                if self.client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise BenchError(f"redis-server did not answer PING on {self.port}") from None
                time.sleep(0.05)

    def _info(self, section: str) -> dict[str, Any]:
        return self.client.info(section)

    def cpu_seconds(self) -> float:
        cpu = self._info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def reset_stats(self) -> None:
        self.client.config_resetstat()

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the last reset (lower case, e.g. ``evalsha``)."""
        calls: dict[str, int] = {}
        for key, stats in self._info("commandstats").items():
            name = key.removeprefix("cmdstat_").lower()
            if not name.startswith(_OWN):
                calls[name] = int(stats["calls"])
        return calls

    def close(self) -> None:
        self.client.close()
