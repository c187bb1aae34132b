"""Load generation: ``wrk`` with a Lua script (POST + JSON body), or ``bench.pyload``.

Both print one ``BENCH_RESULT`` line; :func:`run_load` runs one and returns what it saw,
with the load generator's own CPU time (from the rusage of the reaped child).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT %d %d %d %d %d %d %d %.1f %.1f\\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_seconds: float  # the load generator's own CPU time

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def parse_result(output: str) -> tuple[int, float, int, int, float, float]:
    """(requests, seconds, status errors, socket errors, p50 ms, p99 ms) of a run."""
    for line in output.splitlines():
        if line.startswith("BENCH_RESULT "):
            f = line.split()[1:]
            requests, duration_us = int(f[0]), int(f[1])
            socket_errors = sum(int(x) for x in f[3:7])
            return (
                requests,
                duration_us / 1e6,
                int(f[2]),
                socket_errors,
                float(f[7]) / 1000,
                float(f[8]) / 1000,
            )
    raise BenchError(f"the load generator printed no result:\n{output[-2000:]}")


class LoadGenerator:
    """One request shape (URL path, body, headers) run against several base URLs."""

    def __init__(self, workdir: Path, name: str, body: bytes, headers: dict[str, str]) -> None:
        self.wrk = shutil.which("wrk")
        self.body = body
        self.headers = headers
        self.script = workdir / f"{name}.lua"
        lines = "\n".join(
            f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()
        )
        self.script.write_text(_LUA.format(body=body.decode(), headers=lines))

    @property
    def tool(self) -> str:
        return "wrk" if self.wrk else "python (bench.pyload)"

    def argv(self, url: str, connections: int, seconds: float) -> list[str]:
        if self.wrk:
            return [
                self.wrk,
                "-t1",
                f"-c{connections}",
                f"-d{max(round(seconds), 1)}s",
                "--timeout",
                "5s",
                "-s",
                str(self.script),
                url,
            ]
        return [
            sys.executable,
            "-m",
            "bench.pyload",
            "--url",
            url,
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
            "--body",
            self.body.decode(),
            "--headers",
            json.dumps(self.headers),
        ]

    def run(self, url: str, connections: int, seconds: float, cwd: Path) -> LoadResult:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            done = subprocess.run(
                self.argv(url, connections, seconds),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=seconds + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"the load generator hung on {url}") from None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise BenchError(f"the load generator failed ({done.returncode}):\n{done.stderr}")
        requests, secs, status_errors, socket_errors, p50, p99 = parse_result(done.stdout)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return LoadResult(requests, secs, status_errors, socket_errors, p50, p99, cpu)
