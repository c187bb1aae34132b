"""``make bench-hostile``: what hostile clients cost the proxy (issue 11).

Two child processes on free 127.0.0.1 ports: the demo backend and ``dialproxy serve`` (the
bench config of :mod:`bench.run`, default timeouts).  Then:

- a gzip body inflating to 1 GiB (about 1 MiB on the wire), POSTed ``--bombs`` times with
  no key (401) and with the key (413): the proxy's CPU time for each, from
  /proc/<pid>/stat (utime + stime, clock-tick resolution), the largest reported;
- the latency of normal requests (non-streamed chat, ``--clients`` clients each sending
  one request after another over a keep-alive connection, ``--seconds`` per run) without
  and with ``--slow`` slowloris connections held open (each sends a request line and then
  a header line every ``--trickle`` seconds, never the blank line; one closed by the
  proxy's header timeout is opened again), ``--rounds`` rounds interleaved: p50 and p99
  of each run, and the ratio of the median p99s.

Exit 0 whether the figures are good or not; 1 when the bench itself breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import BenchError, Child, cpu_seconds, free_port, stop_all
from bench.run import HEADERS, HOST, PROXY_PATH, bench_config, request_body


@dataclass(frozen=True, slots=True)
class Options:
    bombs: int = 10
    rounds: int = 3
    seconds: float = 5.0
    clients: int = 4
    slow: int = 500
    trickle: float = 2.0


def gzip_bomb(size: int = 1 << 30) -> bytes:
    """``size`` zero bytes gzipped (about a thousandth of that)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


async def bomb_cpu(proxy: Child, url: str, bomb: bytes, key: bool) -> tuple[int, float]:
    """One bomb POSTed: the status and the proxy's CPU seconds meanwhile."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    if key:
        headers["Authorization"] = HEADERS["Authorization"]
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(0.2)  # (the proxy idle: its clock moves by our request only)
        before = cpu_seconds(proxy.pid)
        async with s.post(url, data=bomb, headers=headers) as r:
            await r.read()
            status = r.status
        await asyncio.sleep(0.2)  # (what it does after the answer counts: the unread body)
        return status, cpu_seconds(proxy.pid) - before


async def latency_run(url: str, clients: int, seconds: float) -> list[float]:
    """Request latencies (ms) of ``clients`` sequential clients for ``seconds``."""
    body = request_body(False)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for _ in range(1_000_000):  # (bounded: the deadline ends it long before)
                if time.perf_counter() >= deadline:
                    return
                started = time.perf_counter()
                async with s.post(url, data=body, headers=HEADERS) as r:
                    await r.read()
                    if r.status != 200:
                        raise BenchError(f"a normal request got {r.status}")
                latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


class Slowloris:
    """``count`` connections that never finish their request headers, kept open."""

    def __init__(self, port: int, count: int, trickle: float) -> None:
        self.port, self.count, self.trickle = port, count, trickle
        self.reopened = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self, index: int) -> None:
        for _ in range(100_000):  # (bounded: the bench cancels it long before)
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                await asyncio.sleep(self.trickle)
                continue
            try:
                writer.write(f"POST {PROXY_PATH} HTTP/1.1\r\nHost: {HOST}\r\n".encode())
                for line in range(100_000):
                    await asyncio.sleep(self.trickle)
                    if reader.at_eof():
                        break
                    writer.write(f"X-Slow-{index}-{line}: y\r\n".encode())
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()
            self.reopened += 1

    async def __aenter__(self) -> Slowloris:
        self._tasks = [asyncio.create_task(self._one(i)) for i in range(self.count)]
        await asyncio.sleep(1.0)  # (all connected)
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(options: Options, proxy: Child, proxy_base: str, port: int) -> dict[str, Any]:
    url = proxy_base + PROXY_PATH
    bomb = gzip_bomb()
    results: dict[str, Any] = {"bomb_bytes": len(bomb)}
    for key, expected in ((False, 401), (True, 413)):
        cpus = []
        for _ in range(options.bombs):
            status, cpu = await bomb_cpu(proxy, url, bomb, key)
            if status != expected:
                raise BenchError(f"the gzip bomb got {status}, not {expected}")
            cpus.append(cpu)
            proxy.check_alive()
        results[f"bomb_{expected}_cpu_ms"] = [round(c * 1000) for c in cpus]
        # One reading is whole clock ticks (10 ms); the mean of several is finer.
        results[f"bomb_{expected}_mean_cpu_ms"] = round(sum(cpus) / len(cpus) * 1000, 1)
        shown = ", ".join(f"{c * 1000:.0f}" for c in cpus)
        print(f"gzip bomb ({'key' if key else 'no key'}): {expected}, proxy CPU ms: {shown}")
    await latency_run(url, options.clients, 1.0)  # warm-up
    p99s: dict[str, list[float]] = {"without": [], "with": []}
    for round_ in range(options.rounds):
        for mode in ("without", "with") if round_ % 2 == 0 else ("with", "without"):
            if mode == "with":
                async with Slowloris(port, options.slow, options.trickle) as slow:
                    latencies = await latency_run(url, options.clients, options.seconds)
                    reopened = slow.reopened
            else:
                latencies, reopened = await latency_run(url, options.clients, options.seconds), 0
            p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
            p99s[mode].append(p99)
            print(
                f"round {round_ + 1}/{options.rounds} {mode:7} slowloris: {len(latencies)} "
                f"requests, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                + (f" ({reopened} slow connections closed, reopened)" if reopened else "")
            )
            proxy.check_alive()
    without, with_ = statistics.median(p99s["without"]), statistics.median(p99s["with"])
    results |= {"p99_without_ms": without, "p99_with_ms": with_, "p99_ratio": with_ / without}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    defaults = Options()
    for name in Options.__slots__:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args(argv)
    options = Options(**{name: getattr(args, name) for name in Options.__slots__})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * options.slow + 256  # this process's sockets and the proxy's (inherited)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    with tempfile.TemporaryDirectory(prefix="dialproxy-hostile-") as tmp:
        work = Path(tmp)
        bport, pport = free_port(), free_port()
        config = work / "bench.config.json"
        config.write_text(json.dumps(bench_config(bport)))
        py = sys.executable
        children = [
            Child(
                "backend",
                [py, "-m", "dialproxy.demo_backend", "--host", HOST, "--port", str(bport)],
                work / "backend.log",
            ),
            Child(
                "proxy",
                [py, "-m", "dialproxy", "serve", "--config", str(config), "--host", HOST,
                 "--port", str(pport), "--storage", "memory://", "--no-watch"],
                work / "proxy.log",
            ),
        ]  # fmt: skip
        try:
            backend, proxy = children
            backend.wait_http(f"http://{HOST}:{bport}/health")
            proxy.wait_http(f"http://{HOST}:{pport}/health")
            started = time.perf_counter()
            results = asyncio.run(measure(options, proxy, f"http://{HOST}:{pport}", pport))
            for line in proxy.log_path.read_text().splitlines():
                json.loads(line)  # every line the proxy wrote is JSON
        except (BenchError, ValueError) as e:
            print(f"bench-hostile: {e}", file=sys.stderr)
            return 1
        finally:
            stop_all(children)
    print(json.dumps(results))
    worst = max(max(results["bomb_401_cpu_ms"]), max(results["bomb_413_cpu_ms"]))
    print(
        f"\ngzip body inflating to 1 GiB ({results['bomb_bytes']:,} bytes sent): "
        f"{results['bomb_401_mean_cpu_ms']} ms of proxy CPU on average without a key (401), "
        f"{results['bomb_413_mean_cpu_ms']} ms with one (413, after inflating the 16 MiB the "
        f"limit allows); at most {worst} ms in one reading (10 ms ticks)\n"
        f"{options.slow} slowloris connections held open: other clients' p99 "
        f"{results['p99_with_ms']:.2f} ms vs {results['p99_without_ms']:.2f} ms without them "
        f"({results['p99_ratio']:.2f}x); took {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
