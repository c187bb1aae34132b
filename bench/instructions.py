"""``python -m bench.instructions``: machine instructions per request, proxy beside pass-through.

CPU time on a shared 2-core machine moves by several percent from one run to the next;
instructions counted by valgrind's callgrind do not (the same code and requests give the
same count within about 0.3%).  So a change to the request path is best judged here first,
then confirmed with ``make bench``.

For each target (the proxy with the bench's config, the pass-through) and mode: start it
under callgrind beside the demo backend, send a warm-up, zero the counters, send exactly
``--requests`` requests over ``--connections`` keep-alive connections, dump, and divide.
Under callgrind Python runs ~50x slower: the default takes about two minutes.  Needs
valgrind (Debian: ``apt-get install valgrind``).  ``--redis`` also counts the proxy with its
counters in a redis-server of its own (the proxy's instructions only: the bench prints
redis-server's CPU and commands per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench.procs import BenchError, Child, free_port, stop_all
from bench.redisserver import RedisServer, redis_argv
from bench.run import (
    BACKEND_PATH,
    BARE_FLAGS,
    HEADERS,
    HOST,
    PROXY_PATH,
    bench_config,
    request_body,
)

MODES = {"non-streaming": False, "streaming": True}


async def _send(url: str, body: bytes, requests: int, connections: int) -> None:
    async def worker(session: aiohttp.ClientSession, count: int) -> None:
        for _ in range(count):
            async with session.post(url, data=body, headers=HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    raise BenchError(f"{url} answered {resp.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(worker(session, requests // connections) for _ in range(connections))
        )


def _callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


def _total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {out}")


def count(
    workdir: Path, name: str, argv: list[str], url: str, health: str, opts: argparse.Namespace
) -> dict[str, int]:
    """Instructions per request of the program ``argv`` serving ``url``, per mode."""
    out = workdir / f"{name}.callgrind"
    child = Child(
        name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        workdir / f"{name}.log",
    )  # fmt: skip
    try:
        child.wait_http(health, timeout=180.0)
        per_request: dict[str, int] = {}
        for mode, stream in MODES.items():
            body = request_body(stream)
            asyncio.run(_send(url, body, 100, opts.connections))  # warm-up
            _callgrind(child.pid, "-z")
            asyncio.run(_send(url, body, opts.requests, opts.connections))
            for old in workdir.glob(f"{name}.callgrind*"):
                old.unlink()
            _callgrind(child.pid, "-d")
            dumps = sorted(workdir.glob(f"{name}.callgrind*"))
            if not dumps:
                raise BenchError(f"callgrind wrote no dump for {name}")
            per_request[mode] = _total(dumps[-1]) // opts.requests
        return per_request
    finally:
        stop_all([child])


def _count_redis(
    workdir: Path, py: str, config: Path, pport: int, opts: argparse.Namespace
) -> dict[str, int]:
    """The proxy's instructions per request with its counters in a redis-server of its own
    (the server's are not counted: ``make bench`` prints its CPU and commands)."""
    rport = free_port()
    (workdir / "redis").mkdir()
    server = RedisServer(
        Child("redis", redis_argv(rport, workdir / "redis"), workdir / "redis.log"), rport
    )
    try:
        server.wait_ready()
        return count(
            workdir, "proxy-redis",
            [py, "-m", "dialproxy", "serve", "--config", str(config), "--host", HOST,
             "--port", str(pport), "--storage", server.url, "--storage-failure", "deny",
             "--no-watch", "--ledger", opts.ledger],
            f"http://{HOST}:{pport}{PROXY_PATH}", f"http://{HOST}:{pport}/health", opts,
        )  # fmt: skip
    finally:
        server.close()
        stop_all([server.child])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--ledger", choices=("on", "off"), default="on", help="serve --ledger")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also count the proxy with its counters in Redis (a redis-server of its own)",
    )
    parser.add_argument(
        "--bare",
        action="store_true",
        help=f"also count the proxy with {' '.join(BARE_FLAGS)}: what metrics and ledger cost",
    )
    opts = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.instructions needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 1
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="dialproxy-instr-") as tmp:
        workdir = Path(tmp)
        bport, pport, tport = free_port(), free_port(), free_port()
        config = workdir / "bench.config.json"
        config.write_text(json.dumps(bench_config(bport)))
        backend = Child(
            "backend", [py, "-m", "dialproxy.demo_backend", "--host", HOST, "--port", str(bport)],
            workdir / "backend.log",
        )  # fmt: skip
        try:
            backend.wait_http(f"http://{HOST}:{bport}/health")
            proxy = count(
                workdir, "proxy",
                [py, "-m", "dialproxy", "serve", "--config", str(config), "--host", HOST,
                 "--port", str(pport), "--storage", "memory://", "--no-watch",
                 "--ledger", opts.ledger],
                f"http://{HOST}:{pport}{PROXY_PATH}", f"http://{HOST}:{pport}/health", opts,
            )  # fmt: skip
            bare: dict[str, int] = {}
            if opts.bare:
                bare = count(
                    workdir, "proxy-bare",
                    [py, "-m", "dialproxy", "serve", "--config", str(config), "--host", HOST,
                     "--port", str(pport), "--storage", "memory://", "--no-watch", *BARE_FLAGS],
                    f"http://{HOST}:{pport}{PROXY_PATH}", f"http://{HOST}:{pport}/health", opts,
                )  # fmt: skip
            redis: dict[str, int] = {}
            if opts.redis:
                redis = _count_redis(workdir, py, config, pport, opts)
            floor = count(
                workdir, "passthrough",
                [py, "-m", "bench.passthrough", "--host", HOST, "--port", str(tport),
                 "--upstream", f"http://{HOST}:{bport}"],
                f"http://{HOST}:{tport}{BACKEND_PATH}", f"http://{HOST}:{tport}/", opts,
            )  # fmt: skip
        except BenchError as e:
            print(f"bench.instructions: {e}", file=sys.stderr)
            return 1
        finally:
            stop_all([backend])
    print(
        f"instructions per request ({opts.requests} requests, {opts.connections} connections, "
        f"ledger {opts.ledger})"
    )
    print(f"{'':16}{'proxy':>12}{'pass-through':>14}{'ratio':>8}")
    for mode in MODES:
        ratio = floor[mode] / proxy[mode]
        print(f"{mode:16}{proxy[mode]:>12,}{floor[mode]:>14,}{ratio:>8.2f}")
    if redis:
        print("\nthe proxy with its counters in Redis (--storage redis://, the proxy's own count)")
        print(f"{'':16}{'redis':>12}{'memory':>14}{'ratio':>8}")
        for mode in MODES:
            print(f"{mode:16}{redis[mode]:>12,}{proxy[mode]:>14,}{redis[mode] / proxy[mode]:>8.3f}")
    if bare:
        print(
            f"\nthe proxy with {' '.join(BARE_FLAGS)} (metrics and ledger off; tracing off in both)"
        )
        print(f"{'':16}{'proxy':>12}{'bare':>14}{'on/off':>8}")
        for mode in MODES:
            print(f"{mode:16}{proxy[mode]:>12,}{bare[mode]:>14,}{proxy[mode] / bare[mode]:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
