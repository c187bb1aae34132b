"""``make bench``: the proxy beside a minimal aiohttp pass-through, on one local backend.

Child processes on free 127.0.0.1 ports: the demo backend, the real proxy (``dialproxy
serve`` with auth, token/request/cost limits, pricing, stream usage injection and its
JSON request log all on) with in-process counters, the same proxy with its counters in
Redis (a ``redis-server`` of the bench's own, no persistence; the chat modes only; off
with ``--no-redis``), the same proxy with its metrics off (``--no-metrics``: what they cost;
off with ``--no-bare``) and the pass-through floor (aiohttp on uvloop).  The modes
(:data:`MODES`): chat completions non-streaming and streaming, a Responses API stream and
an Anthropic Messages stream, each its own body, proxy route and backend path.  Then,
interleaved:

- throughput, every mode: ``--rounds`` x ``--seconds`` at ``--connections`` connections
  (1 wrk thread), proxy (and Redis-counter proxy) and pass-through alternating, with each
  one's CPU time per request from /proc/<pid>/stat (utime + stime) and the backend's and
  wrk's CPU use beside it;
- added latency at idle, the chat modes: one keep-alive connection, sequential requests,
  p50/p99 of the proxy and of the pass-through minus the same percentile straight to the
  backend.

With Redis, each run's Redis commands (``INFO commandstats``, reset before the run) and
the server's CPU (``INFO cpu``) are divided by the requests completed.

Exit 0 whether the targets are met or not; 1 when the bench itself breaks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bench.load import LoadGenerator, LoadResult
from bench.procs import (
    SCHEDSTAT,
    BenchError,
    Child,
    cpu_seconds,
    family_cpu_seconds,
    family_waited_seconds,
    free_port,
    machine_busy_seconds,
    stop_all,
)
from bench.redisserver import RedisServer, redis_argv

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SECRET = "bench-secret-key-0123456789"
DEPLOYMENT = "echo"
PROXY_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
BACKEND_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
MESSAGES_PATH = "/v1/messages"
PROMPT = "Tell me briefly why a reverse proxy should add almost no latency"
_BACKEND_RESPONSE_ID = re.compile(rb'"resp_(?!dial_)')  # the demo backend's ids: resp_<hex>


NONSTREAM_TARGET = 0.70
STREAM_TARGET = 0.75
LATENCY_TARGET_MS = 0.6
REDIS_TARGET = 0.80  # Redis-counter proxy req/s >= this x the memory-counter proxy's
REDIS_SETTLE = 0.1  # s after a run before Redis's stats are read: the last settlements land
PROXY, PROXY_REDIS, PASS = "proxy", "proxy redis", "pass-through"
PROXY_WORKERS = "proxy redis x2"  # serve --workers 2 on the same Redis (reported, no target)
WORKERS = 2
# The proxy with what observes it off (--bare): the cost of the metrics and the usage ledger
# on (tracing is off in both: no OTEL_* variables), as the proxy's req/s and CPU per request
# over its.
PROXY_BARE = "proxy bare"
BARE_FLAGS = ("--no-metrics", "--ledger", "off")
OBSERVED_TARGET = 0.95  # proxy (metrics and ledger on) req/s >= this x the bare proxy's
PROXIES = frozenset({PROXY, PROXY_REDIS, PROXY_WORKERS, PROXY_BARE})
REDIS_TARGETS = frozenset({PROXY_REDIS, PROXY_WORKERS})
BACKEND_SATURATED = 0.90  # cores
OTHER_LOAD = 0.25  # cores used by processes outside the bench: worth a warning


def bench_config(backend_port: int, all_windows: bool = False) -> dict[str, Any]:
    """Every check on: key auth, token/request limits never reached, pricing + costLimit.

    The role limits what a role typically limits (tokens per minute and day, requests per
    minute and day, cost per day); ``all_windows`` limits every window there is (7 windows
    and 3 cost windows: the worst case, each window a counter operation per request)."""
    huge = str(10**12)
    limit = {"minute": huge, "day": huge, "requestMinute": str(10**9), "requestDay": str(10**11)}
    cost = {"day": "10000000"}
    if all_windows:
        limit |= {"week": huge, "month": huge, "requestHour": str(10**10)}
        cost |= {"minute": "1000000", "month": "100000000"}
    return {
        "models": {
            DEPLOYMENT: {
                "type": "chat",
                "upstreams": [
                    {
                        "id": "openai",
                        "endpoint": f"http://{HOST}:{backend_port}{BACKEND_PATH}",
                        "responsesEndpoint": f"http://{HOST}:{backend_port}{RESPONSES_PATH}",
                        "key": "bench-upstream-key",
                    },
                    {
                        "id": "anthropic",
                        "endpoint": f"http://{HOST}:{backend_port}{MESSAGES_PATH}",
                        "auth": "x-api-key",
                        "key": "bench-upstream-key",
                    },
                ],
                "pricing": {"unit": "token", "prompt": "0.000001", "completion": "0.000002"},
            }
        },
        "roles": {"bench": {"limits": {DEPLOYMENT: limit}, "costLimit": cost}},
        "keys": {SECRET: {"project": "bench", "role": "bench", "name": "bench key"}},
    }


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def request_body(stream: bool) -> bytes:
    """A chat completions request (no stream_options: the proxy injects include_usage)."""
    body: dict[str, Any] = {
        "model": DEPLOYMENT,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stream:
        body["stream"] = True
    return _json(body)


HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}


def _no_usage_leak(data: bytes) -> str | None:
    return "the proxy leaked the usage chunk it asked for" if b'"usage"' in data else None


def _ids_rewritten(data: bytes) -> str | None:
    if b'"resp_dial_' not in data:
        return "the proxy's Responses stream has no resp_dial_ id: ids are not rewritten"
    if _BACKEND_RESPONSE_ID.search(data):
        return "the backend's own resp_ id reached the client: ids are not rewritten"
    return None


@dataclass(frozen=True, slots=True)
class Mode:
    """One kind of request: the same body to the proxy's route and the backend's path."""

    name: str
    body: bytes
    proxy_path: str
    backend_path: str
    target: float  # proxy req/s >= target x the pass-through's in the same run
    ratelimit_header: str  # one the proxy must send (its limits are on)
    check: Callable[[bytes], str | None] | None = None  # of the proxy's answer: an error
    latency: bool = True  # also measured at idle (1 connection)
    redis: bool = False  # also through the proxy with its counters in Redis


MODES = (
    Mode(
        "non-streaming", request_body(False), PROXY_PATH, BACKEND_PATH,
        NONSTREAM_TARGET, "x-ratelimit-remaining-requests", redis=True,
    ),
    Mode(
        "streaming", request_body(True), PROXY_PATH, BACKEND_PATH,
        STREAM_TARGET, "x-ratelimit-remaining-requests", _no_usage_leak, redis=True,
    ),
    Mode(
        "responses stream",
        _json({"model": DEPLOYMENT, "input": PROMPT, "stream": True}),
        "/openai/v1/responses", RESPONSES_PATH,
        STREAM_TARGET, "x-ratelimit-remaining-requests", _ids_rewritten, latency=False,
    ),
    Mode(
        "anthropic stream",
        _json({"model": DEPLOYMENT, "max_tokens": 256, "stream": True,
               "messages": [{"role": "user", "content": PROMPT}]}),
        "/anthropic/v1/messages", MESSAGES_PATH,
        STREAM_TARGET, "anthropic-ratelimit-requests-remaining", latency=False,
    ),
)  # fmt: skip
TARGETS = {m.name: m.target for m in MODES}


@dataclass(frozen=True, slots=True)
class Options:
    connections: int = 32
    rounds: int = 3
    seconds: float = 5.0  # per throughput run (wrk -d takes whole seconds)
    warmup: float = 1.0
    latency_rounds: int = 3
    latency_seconds: float = 2.0
    profile: Path | None = None  # write py-spy flame graphs of the proxy here
    all_windows: bool = False  # limit every window (the worst case), not a typical role's
    modes: tuple[Mode, ...] = MODES
    redis: bool = True  # the Redis-counter proxy too, in the modes marked redis
    ledger: str = "on"  # the proxies' usage ledger (serve --ledger): on as served, or off
    bare: bool = True  # the proxy with its metrics off too (PROXY_BARE)


# --------------------------------------------------------------------------------------
# Sanity checks: every path answers 200 with the echo, and the proxy's checks are live


def _post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=HEADERS, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def _get_json(url: str) -> Any:
    req = urllib.request.Request(url, headers=HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for(done: Callable[[], bool], attempts: int = 50) -> bool:
    for _ in range(attempts):
        if done():
            return True
        time.sleep(0.02)
    return False


@dataclass(frozen=True, slots=True)
class Targets:
    """Where each target listens: the proxy serves a mode on its own path, the others on
    the backend's."""

    bases: dict[str, str]  # "direct", "pass-through", "proxy"[, "proxy redis"] -> base URL

    def url(self, mode: Mode, target: str) -> str:
        return self.bases[target] + (mode.proxy_path if target in PROXIES else mode.backend_path)

    def of(self, mode: Mode) -> list[str]:
        """The targets a mode runs on: the Redis-counter proxies in their modes only."""
        return [t for t in self.bases if t not in REDIS_TARGETS or mode.redis]


def _logged_request(log: Path) -> bool:
    return b'"event":"request"' in log.read_bytes()


def sanity_check(modes: tuple[Mode, ...], targets: Targets, proxy_logs: dict[str, Path]) -> None:
    def tokens_used(target: str) -> int:
        limits_url = f"{targets.bases[target]}/v1/deployments/{DEPLOYMENT}/limits"
        return int(_get_json(limits_url)["minuteTokenStats"]["used"])

    def usage_grew(target: str, before: int) -> bool:
        return _wait_for(lambda: tokens_used(target) > before)

    for mode in modes:
        for target in targets.of(mode):
            used = tokens_used(target) if target in PROXIES else 0
            status, headers, data = _post(targets.url(mode, target), mode.body)
            if status != 200 or b"Echo:" not in data:
                raise BenchError(f"{target} {mode.name} answered {status}: {data[:300]!r}")
            if target not in PROXIES:
                continue
            if mode.ratelimit_header not in {k.lower() for k in headers}:
                raise BenchError(f"the proxy sent no {mode.ratelimit_header} ({mode.name}):"
                                 " limits are off")  # fmt: skip
            if mode.check is not None and (error := mode.check(data)) is not None:
                raise BenchError(f"{mode.name}: {error}")
            # Usage parsed and recorded (a background task: give it a moment).
            if not usage_grew(target, used):
                raise BenchError(f"{target} recorded no token usage for {mode.name}:"
                                 " usage parsing is off")  # fmt: skip
    # log lines are written in batches, within 0.1 s
    for target, log in proxy_logs.items():
        if not _wait_for(partial(_logged_request, log)):
            raise BenchError(f"{target} wrote no request log line to {log}")


# --------------------------------------------------------------------------------------
# Measurements


@dataclass
class Throughput:
    """The runs of one target (proxy or pass-through) in one mode, summed over the rounds."""

    requests: int = 0
    seconds: float = 0.0  # as the load generator measured its runs
    wall: float = 0.0  # between the CPU clock reads around the runs
    cpu: float = 0.0  # of the measured proxy process
    backend_cpu: float = 0.0
    load_cpu: float = 0.0  # of the load generator
    other_cpu: float = 0.0  # of every other process on the machine
    redis_cpu: float = 0.0  # of redis-server (INFO cpu), in the Redis-counter proxy's runs
    redis_calls: dict[str, int] = field(default_factory=dict)  # INFO commandstats, summed
    # Ready to run but waiting for a core (the scheduler's run-queue wait): of the measured
    # process, of redis-server
    waited: float = 0.0
    redis_waited: float = 0.0
    rounds: list[float] = field(default_factory=list)  # req/s of each round

    def add(
        self,
        load: LoadResult,
        wall: float,
        cpu: float,
        backend_cpu: float,
        busy: float,
        redis_cpu: float = 0.0,
        redis_calls: dict[str, int] | None = None,
        waited: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.requests += load.requests
        self.waited += waited[0]
        self.redis_waited += waited[1]
        self.seconds += load.seconds
        self.wall += wall
        self.cpu += cpu
        self.backend_cpu += backend_cpu
        self.load_cpu += load.cpu_seconds
        self.redis_cpu += redis_cpu
        self.other_cpu += max(busy - cpu - backend_cpu - load.cpu_seconds - redis_cpu, 0.0)
        for command, calls in (redis_calls or {}).items():
            self.redis_calls[command] = self.redis_calls.get(command, 0) + calls
        self.rounds.append(load.rps)

    def per_request(self, amount: float) -> float:
        return amount / self.requests if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.per_request(self.cpu) * 1e6

    @property
    def redis_commands(self) -> float:
        """Redis commands per request (those run inside scripts and MULTI blocks too)."""
        return self.per_request(sum(self.redis_calls.values()))

    def cores(self, cpu: float) -> float:
        return cpu / self.wall if self.wall else 0.0


def _checked(load: LoadResult, what: str) -> LoadResult:
    if load.status_errors or load.socket_errors:
        raise BenchError(
            f"{what}: {load.status_errors} non-2xx answers, {load.socket_errors} socket errors"
            f" in {load.requests} requests"
        )
    if load.requests == 0:
        raise BenchError(f"{what}: no request completed")
    return load


class Bench:
    def __init__(self, workdir: Path, options: Options, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.options = options
        self.say = say
        self.children: list[Child] = []
        self.redis: RedisServer | None = None
        self.modes = {m.name: m for m in options.modes}
        self.loads = {
            m.name: LoadGenerator(workdir, f"mode{i}", m.body, HEADERS)
            for i, m in enumerate(options.modes)
        }

    @property
    def tool(self) -> str:
        return next(iter(self.loads.values())).tool

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        if self.redis is not None:
            self.redis.close()
        stop_all(self.children)

    def run(self) -> dict[str, Any]:
        with_redis = self.options.redis and any(m.redis for m in self.options.modes)
        ports: set[int] = set()
        while len(ports) < 7:
            ports.add(free_port())
        bport, pport, tport, rport, qport, wport, nport = ports
        config = self.workdir / "bench.config.json"
        config.write_text(json.dumps(bench_config(bport, self.options.all_windows), indent=2))
        py = sys.executable
        backend = self.start(
            "backend", [py, "-m", "dialproxy.demo_backend", "--host", HOST, "--port", str(bport)]
        )

        def start_proxy(name: str, port: int, storage: list[str], workers: int = 1) -> Child:
            return self.start(
                name,
                [py, "-m", "dialproxy", "serve", "--config", str(config), "--host", HOST,
                 "--port", str(port), "--no-watch", "--workers", str(workers),
                 "--ledger", self.options.ledger,
                 "--storage", *storage],
            )  # fmt: skip

        proxy = start_proxy("proxy", pport, ["memory://"])
        if self.options.bare:
            bare = start_proxy("proxy-bare", nport, ["memory://", *BARE_FLAGS])
        if with_redis:
            redis_dir = self.workdir / "redis"
            redis_dir.mkdir()
            self.redis = RedisServer(self.start("redis", redis_argv(rport, redis_dir)), rport)
            self.redis.wait_ready()
            # deny: a Redis failure is a 503 (the bench stops), never a silent fallback to
            # in-process counters that would measure the memory path under the Redis name
            redis_storage = [self.redis.url, "--storage-failure", "deny"]
            proxy_redis = start_proxy("proxy-redis", qport, redis_storage)
            proxy_workers = start_proxy("proxy-workers", wport, redis_storage, WORKERS)
        passthrough = self.start(
            "passthrough",
            [py, "-m", "bench.passthrough", "--host", HOST, "--port", str(tport),
             "--upstream", f"http://{HOST}:{bport}"],
        )  # fmt: skip
        backend_base = f"http://{HOST}:{bport}"
        backend.wait_http(backend_base + "/health")
        bases = {"direct": backend_base, PASS: f"http://{HOST}:{tport}"}
        measured = {PROXY: proxy}
        bases[PROXY] = f"http://{HOST}:{pport}"
        if with_redis:
            bases[PROXY_REDIS] = f"http://{HOST}:{qport}"
            measured[PROXY_REDIS] = proxy_redis
            bases[PROXY_WORKERS] = f"http://{HOST}:{wport}"
            measured[PROXY_WORKERS] = proxy_workers
        if self.options.bare:
            bases[PROXY_BARE] = f"http://{HOST}:{nport}"
            measured[PROXY_BARE] = bare
        measured[PASS] = passthrough
        for target, child in measured.items():
            child.wait_http(bases[target] + ("/health" if target in PROXIES else "/"))
        if "event loop: uvloop" not in passthrough.tail():
            raise BenchError(f"the pass-through does not run on uvloop: {passthrough.tail()}")
        targets = Targets(bases)
        proxy_logs = {t: c.log_path for t, c in measured.items() if t in PROXIES}
        sanity_check(self.options.modes, targets, proxy_logs)

        def load(mode: str, target: str, connections: int, seconds: float) -> LoadResult:
            for child in self.children:
                child.check_alive()
            what = f"{target} {mode} c={connections}"
            url = targets.url(self.modes[mode], target)
            return _checked(self.loads[mode].run(url, connections, seconds, ROOT), what)

        opts = self.options
        self.say(f"warming up ({self.tool})")
        for mode in self.loads:
            for target in targets.of(self.modes[mode]):
                load(mode, target, opts.connections, opts.warmup)

        throughput = {
            m: {t: Throughput() for t in measured if t in targets.of(self.modes[m])}
            for m in self.loads
        }
        for rnd in range(opts.rounds):
            for mode in self.loads:
                order = list(throughput[mode])
                if rnd % 2:
                    order.reverse()
                for target in order:
                    self.measure(rnd, mode, target, measured[target], backend, load, throughput)

        idle = [m.name for m in opts.modes if m.latency]
        latency: dict[str, dict[str, list[tuple[float, float]]]] = {
            m: {t: [] for t in targets.of(self.modes[m])} for m in idle
        }
        pids = [c.pid for c in self.children]
        ours0, busy0, wall0 = sum(map(cpu_seconds, pids)), machine_busy_seconds(), time.monotonic()
        load_cpu = 0.0
        for rnd in range(opts.latency_rounds):
            for mode in idle:
                order = list(latency[mode])
                if rnd % 2:
                    order.reverse()
                for target in order:
                    result = load(mode, target, 1, opts.latency_seconds)
                    load_cpu += result.cpu_seconds
                    latency[mode][target].append((result.p50_ms, result.p99_ms))
            self.say(f"latency round {rnd + 1}/{opts.latency_rounds} done")
        ours = sum(map(cpu_seconds, pids)) - ours0 + load_cpu
        other = (machine_busy_seconds() - busy0 - ours) / (time.monotonic() - wall0)
        if opts.profile is not None:
            for mode in self.loads:
                self.profile(mode, targets.url(self.modes[mode], "proxy"), proxy, opts.profile)
        return {"throughput": throughput, "latency": latency, "latency_other": max(other, 0.0)}

    def measure(
        self,
        rnd: int,
        mode: str,
        target: str,
        child: Child,
        backend: Child,
        load: Callable[[str, str, int, float], LoadResult],
        throughput: dict[str, dict[str, Throughput]],
    ) -> None:
        """One throughput run of a target, with the CPU clocks (and Redis's stats) around it."""
        opts = self.options
        redis = self.redis if target in REDIS_TARGETS else None
        if redis is not None:
            rcpu0 = redis.cpu_seconds()
            redis.reset_stats()
        rwait0 = 0.0 if redis is None else family_waited_seconds(redis.child.pid)
        wall0, busy0 = time.monotonic(), machine_busy_seconds()
        cpu0, bcpu0 = family_cpu_seconds(child.pid), cpu_seconds(backend.pid)
        wait0 = family_waited_seconds(child.pid)
        result = load(mode, target, opts.connections, opts.seconds)
        cpu1, bcpu1 = family_cpu_seconds(child.pid), cpu_seconds(backend.pid)
        waited = family_waited_seconds(child.pid) - wait0
        busy, wall = machine_busy_seconds() - busy0, time.monotonic() - wall0
        redis_cpu, redis_waited, calls, extra = 0.0, 0.0, None, ""
        if redis is not None:
            time.sleep(REDIS_SETTLE)
            calls = redis.command_calls()
            redis_cpu = redis.cpu_seconds() - rcpu0
            redis_waited = family_waited_seconds(redis.child.pid) - rwait0  # (as its CPU)
            per_request = sum(calls.values()) / result.requests
            if calls.get("evalsha", 0) < result.requests:
                raise BenchError(
                    f"{target} {mode}: {calls.get('evalsha', 0)} Redis script calls for"
                    f" {result.requests} requests: are its counters in Redis? {calls}"
                )
            extra = (
                f"  redis {per_request:.2f} commands/req"
                f" {redis_cpu / result.requests * 1e6:4.0f} us CPU/req"
            )
        throughput[mode][target].add(
            result, wall, cpu1 - cpu0, bcpu1 - bcpu0, busy, redis_cpu, calls,
            (waited, redis_waited),
        )  # fmt: skip
        self.say(
            f"round {rnd + 1}/{opts.rounds} {mode:16} {target:12}"
            f" {result.rps:8.0f} req/s"
            f"  {(cpu1 - cpu0) / result.requests * 1e6:6.0f} us CPU/req"
            f"  backend {(bcpu1 - bcpu0) / wall:4.2f} cores{extra}"
        )

    def profile(self, mode: str, url: str, proxy: Child, out_dir: Path) -> None:
        """Sample the proxy with py-spy while wrk loads it: a flame graph per mode."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).is_file():
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)
        svg = out_dir / f"proxy-{mode.replace(' ', '-')}.svg"
        seconds = max(round(self.options.seconds), 3)
        argv = self.loads[mode].argv(url, self.options.connections, seconds + 2)
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as load:
            try:
                time.sleep(1)
                done = subprocess.run(
                    [spy, "record", "--pid", str(proxy.pid), "--duration", str(seconds),
                     "--rate", "200", "--output", str(svg)],
                    capture_output=True, text=True, timeout=seconds + 30, check=False,
                )  # fmt: skip
            finally:
                load.kill()
        if done.returncode != 0:
            raise BenchError(f"py-spy failed ({done.returncode}):\n{done.stderr}")
        self.say(f"profile of the proxy ({mode}): {svg}")


def added_latency(
    samples: dict[str, list[tuple[float, float]]], target: str
) -> tuple[float, float]:
    """Median over the rounds of (target percentile - direct percentile), for p50 and p99."""
    direct = samples["direct"]
    p50 = statistics.median(t[0] - d[0] for t, d in zip(samples[target], direct, strict=True))
    p99 = statistics.median(t[1] - d[1] for t, d in zip(samples[target], direct, strict=True))
    return p50, p99


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict[str, Any], tool: str, opts: Options) -> str:
    throughput: dict[str, dict[str, Throughput]] = results["throughput"]
    latency: dict[str, dict[str, list[tuple[float, float]]]] = results["latency"]
    modes = list(throughput)
    rows: list[tuple[str, ...]] = [("", *modes)]

    def row(label: str, fn: Callable[[str], str]) -> None:
        rows.append((label, *(fn(m) for m in modes)))

    redis_modes = [m for m in modes if PROXY_REDIS in throughput[m]]

    def spread(t: Throughput) -> str:
        return f"{t.rps:,.0f} ({min(t.rounds):,.0f}-{max(t.rounds):,.0f})"

    def redis_row(label: str, fn: Callable[[Throughput, str], str]) -> None:
        if redis_modes:
            row(label, lambda m: fn(throughput[m][PROXY_REDIS], m) if m in redis_modes else "-")

    row("proxy req/s (min-max)", lambda m: spread(throughput[m][PROXY]))
    redis_row("proxy redis req/s (min-max)", lambda t, m: spread(t))
    row("pass-through req/s (min-max)", lambda m: spread(throughput[m][PASS]))
    row(
        "ratio proxy/pass-through",
        lambda m: f"{throughput[m][PROXY].rps / throughput[m][PASS].rps:.2f}",
    )
    redis_row(
        "ratio proxy redis/pass-through", lambda t, m: f"{t.rps / throughput[m][PASS].rps:.2f}"
    )
    redis_row("ratio proxy redis/proxy", lambda t, m: f"{t.rps / throughput[m][PROXY].rps:.2f}")
    row("proxy CPU us/req", lambda m: f"{throughput[m][PROXY].cpu_us:.0f}")
    redis_row("proxy redis CPU us/req", lambda t, m: f"{t.cpu_us:.0f}")
    redis_row("redis-server CPU us/req", lambda t, m: f"{t.per_request(t.redis_cpu) * 1e6:.0f}")
    redis_row("redis commands/req", lambda t, m: f"{t.redis_commands:.2f}")

    def workers_row(label: str, fn: Callable[[Throughput, str], str]) -> None:
        if redis_modes:
            row(label, lambda m: fn(throughput[m][PROXY_WORKERS], m) if m in redis_modes else "-")

    workers_row(f"proxy redis x{WORKERS} req/s (min-max)", lambda t, m: spread(t))
    workers_row(
        f"ratio proxy redis x{WORKERS}/proxy redis",
        lambda t, m: f"{t.rps / throughput[m][PROXY_REDIS].rps:.2f}",
    )
    workers_row(f"proxy redis x{WORKERS} CPU us/req", lambda t, m: f"{t.cpu_us:.0f}")
    row("pass-through CPU us/req", lambda m: f"{throughput[m][PASS].cpu_us:.0f}")

    def waited(t: Throughput, amount: float | None = None) -> str:
        if not SCHEDSTAT:  # (no such statistics: not a 0)
            return "-"
        return f"{t.per_request(t.waited if amount is None else amount) * 1e6:.0f}"

    # (what the other processes on the cores cost the measured one in time, not CPU)
    row("proxy waited for a core us/req", lambda m: waited(throughput[m][PROXY]))
    redis_row("proxy redis waited for a core us/req", lambda t, m: waited(t))
    workers_row(f"proxy redis x{WORKERS} waited for a core us/req", lambda t, m: waited(t))
    redis_row("redis-server waited for a core us/req", lambda t, m: waited(t, t.redis_waited))
    row("pass-through waited for a core us/req", lambda m: waited(throughput[m][PASS]))
    row(
        "CPU ratio pass-through/proxy",
        lambda m: f"{throughput[m][PASS].cpu_us / throughput[m][PROXY].cpu_us:.2f}",
    )
    bare_modes = [m for m in modes if PROXY_BARE in throughput[m]]
    if bare_modes:
        row("proxy bare req/s (min-max)", lambda m: spread(throughput[m][PROXY_BARE]))
        row("proxy bare CPU us/req", lambda m: f"{throughput[m][PROXY_BARE].cpu_us:.0f}")
        row(
            "ratio proxy/proxy bare (req/s; CPU bare/proxy)",
            lambda m: (
                f"{throughput[m][PROXY].rps / throughput[m][PROXY_BARE].rps:.3f}; "
                f"{throughput[m][PROXY_BARE].cpu_us / throughput[m][PROXY].cpu_us:.3f}"
            ),
        )

    def added(target: str) -> Callable[[str], str]:
        def cell(m: str) -> str:
            if m not in latency or target not in latency[m]:
                return "-"
            return "{:+.3f} / {:+.3f}".format(*added_latency(latency[m], target))

        return cell

    def direct(m: str) -> str:
        if m not in latency:
            return "-"
        p50 = statistics.median(s[0] for s in latency[m]["direct"])
        return f"{p50:.3f} / {statistics.median(s[1] for s in latency[m]['direct']):.3f}"

    row("proxy added p50/p99 ms", added(PROXY))
    if redis_modes:
        row("proxy redis added p50/p99 ms", added(PROXY_REDIS))
    row("pass-through added p50/p99 ms", added(PASS))
    row("direct p50/p99 ms", direct)

    def cores(target: str) -> Callable[[str], str]:
        return lambda m: _cores(throughput[m][target]) if target in throughput[m] else "-"

    row("cores in proxy runs: proxy/backend/load/other", cores(PROXY))
    if redis_modes:
        row("cores in proxy redis runs: proxy/backend/load/other/redis", cores(PROXY_REDIS))
        row(f"cores in proxy redis x{WORKERS} runs: ...", cores(PROXY_WORKERS))
    row("cores in pass-through runs: pt/backend/load/other", cores(PASS))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"dialproxy bench: {os.cpu_count()} CPUs, load generator {tool},"
        f" {opts.connections} connections, {opts.rounds} x {opts.seconds:g} s per target and"
        f" mode, interleaved; idle latency ({', '.join(latency) or 'no mode'}): 1 connection,"
        f" {opts.latency_rounds} x {opts.latency_seconds:g} s per target and mode;"
        " pass-through and proxy on uvloop"
        + (
            f"; proxy redis: the proxy with --storage redis:// ({', '.join(redis_modes)}),"
            f" x{WORKERS}: with --workers {WORKERS} too"
            if redis_modes
            else ""
        ),
        "",
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))).rstrip())  # fmt: skip
    if redis_modes:
        lines += [
            "",
            "Redis commands per proxied request (INFO commandstats over the measured runs,"
            " / the requests completed; commands run inside Lua scripts and MULTI blocks"
            " count too):",
        ]
        for mode in redis_modes:
            t = throughput[mode][PROXY_REDIS]
            each = sorted(t.redis_calls.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(
                f"  {mode}: {t.redis_commands:.2f} = "
                + ", ".join(f"{name} {_per_request(t.per_request(calls))}" for name, calls in each)
            )
    lines.append("")
    lines.append("targets (every proxy check on: auth, limits, usage parsing, logging):")
    for mode in modes:
        goal = TARGETS[mode]
        ratio = throughput[mode][PROXY].rps / throughput[mode][PASS].rps
        lines.append(
            f"  {mode} throughput >= {goal:.2f}x pass-through:"
            f" {ratio:.2f}x  {verdict(ratio >= goal)}"
        )
    for mode in redis_modes:
        ratio = throughput[mode][PROXY_REDIS].rps / throughput[mode][PROXY].rps
        lines.append(
            f"  {mode} Redis counters throughput >= {REDIS_TARGET:.2f}x memory counters:"
            f" {ratio:.2f}x  {verdict(ratio >= REDIS_TARGET)}"
        )
    for mode in redis_modes:
        ratio = throughput[mode][PROXY_WORKERS].rps / throughput[mode][PROXY_REDIS].rps
        lines.append(
            f"  {mode} --workers {WORKERS} with Redis (reported, no target):"
            f" {ratio:.2f}x one worker's throughput"
        )
    for mode in bare_modes:
        ratio = throughput[mode][PROXY].rps / throughput[mode][PROXY_BARE].rps
        cpu = throughput[mode][PROXY_BARE].cpu_us / throughput[mode][PROXY].cpu_us
        lines.append(
            f"  {mode} metrics and ledger on: throughput >= {OBSERVED_TARGET:.2f}x off"
            f" ({' '.join(BARE_FLAGS)}): {ratio:.3f}x (CPU per request: {cpu:.3f}x)"
            f"  {verdict(ratio >= OBSERVED_TARGET)}"
        )
    for mode in latency:
        p50, p99 = added_latency(latency[mode], "proxy")
        lines.append(
            f"  {mode} added latency at idle (p50) <= {LATENCY_TARGET_MS} ms:"
            f" {p50:+.3f} ms  {verdict(p50 <= LATENCY_TARGET_MS)}   (p99: {p99:+.3f} ms)"
        )
    notes: list[str] = []
    cpus = os.cpu_count() or 1
    runs = [(f"{target} {mode}", t) for mode in modes for target, t in throughput[mode].items()]
    backend = [f"{name} {t.cores(t.backend_cpu):.2f}" for name, t in runs]
    if any(t.cores(t.backend_cpu) >= BACKEND_SATURATED for _, t in runs):
        notes.append(
            f"  the backend (near) saturated a core ({', '.join(backend)}): the throughput"
            " of those runs is capped by it"
        )
    busy = [
        (name, t.cores(t.cpu + t.backend_cpu + t.load_cpu + t.other_cpu + t.redis_cpu))
        for name, t in runs
    ]
    if saturated := [f"{name} {b:.2f}" for name, b in busy if b >= 0.9 * cpus]:
        notes.append(
            f"  the machine's {cpus} cores were (near) all busy in: {', '.join(saturated)}:"
            " there the faster side is slowed by the backend and the load generator"
            " taking cores from it, which flatters the slower side's req/s ratio; the CPU"
            " ratio is the fairer comparison"
        )
    other = max((t.cores(t.other_cpu), name) for name, t in runs)
    latency_other = results["latency_other"]
    if other[0] >= OTHER_LOAD or latency_other >= OTHER_LOAD:
        notes.append(
            f"  processes outside the bench used up to {other[0]:.2f} cores ({other[1]} runs)"
            f" and {latency_other:.2f} cores during the idle latency runs: the figures are"
            " noisy (p99 the most); rerun on a quiet machine"
        )
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def _per_request(calls: float) -> str:
    """A command's calls per request: the rare ones (reconnections) as <0.01, not 0.00."""
    return f"{calls:.2f}" if calls >= 0.005 else "<0.01"


def _cores(t: Throughput) -> str:
    cpus = [t.cpu, t.backend_cpu, t.load_cpu, t.other_cpu]
    if t.redis_calls:
        cpus.append(t.redis_cpu)
    return "/".join(f"{t.cores(c):.2f}" for c in cpus)


class _Terminated(Exception):
    """SIGTERM: stop like on Ctrl-C."""


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_options(argv: list[str] | None) -> Options:
    d = Options()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=d.connections)
    parser.add_argument("--rounds", type=int, default=d.rounds, help="throughput rounds")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="per throughput run")
    parser.add_argument("--latency-rounds", type=int, default=d.latency_rounds)
    parser.add_argument("--latency-seconds", type=float, default=d.latency_seconds)
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="also write py-spy flame graphs of the proxy"
    )
    parser.add_argument(
        "--all-windows",
        action="store_true",
        help="limit every token, request and cost window (the worst case)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(TARGETS),
        help=f"comma-separated, of: {', '.join(TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--no-bare",
        action="store_true",
        help="skip the proxy with its metrics off (what the metrics cost is measured by it)",
    )
    parser.add_argument(
        "--no-redis",
        action="store_true",
        help="skip the proxy with its counters in Redis (and the redis-server it needs)",
    )
    parser.add_argument(
        "--ledger",
        choices=("on", "off"),
        default=d.ledger,
        help="the proxies' usage ledger (serve --ledger; on, as served): run once each way "
        "to see what it costs",
    )
    a = parser.parse_args(argv)
    names = [n.strip() for n in a.modes.split(",") if n.strip()]
    if not names or (unknown := set(names) - set(TARGETS)):
        parser.error(f"--modes: unknown {sorted(unknown) if names else 'empty'}")
    modes = tuple(m for m in MODES if m.name in names)
    if min(a.connections, a.rounds, a.latency_rounds) < 1 or min(a.seconds, a.latency_seconds) < 1:
        parser.error("counts and durations must be >= 1")
    return Options(
        connections=a.connections,
        rounds=a.rounds,
        seconds=a.seconds,
        latency_rounds=a.latency_rounds,
        latency_seconds=a.latency_seconds,
        profile=a.profile,
        all_windows=a.all_windows,
        modes=modes,
        redis=not a.no_redis,
        ledger=a.ledger,
        bare=not a.no_bare,
    )


def main(argv: list[str] | None = None) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options = parse_options(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dialproxy-bench-"))
    keep = True
    bench = Bench(workdir, options, say)
    started = time.monotonic()
    try:
        with _terminate_on_sigterm():
            try:
                results = bench.run()
            finally:
                bench.stop_all()
        print(report(results, bench.tool, options))
        say(f"bench took {time.monotonic() - started:.0f} s")
        keep = False
        return 0
    except BenchError as e:
        say(f"bench broken: {e}\n(logs kept in {workdir})")
        return 1
    except (KeyboardInterrupt, _Terminated) as e:
        say("interrupted: every process the bench started is stopped")
        keep = False
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
