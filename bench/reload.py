"""``make bench-reload``: what reloading a big config costs (issue 17).

The config of :mod:`bench.validate_bench` (``--keys`` 10,000 keys, ``--models`` 200
models, 13 roles), with the bench's ``echo`` model and key of :mod:`bench.run` added.

1. In this process, the CPU time (``time.process_time``) of one build through
   :class:`ConfigStore`: the first load (a full build), and reloads after one key changed,
   after one role changed, and of the same content written differently (no-op); the
   median of ``--runs`` runs each.
2. Through a real ``dialproxy serve`` (watching its file) and the demo backend, on free
   127.0.0.1 ports: non-streamed chat requests (``wrk``, ``--connections``) for
   ``--seconds`` steady, then for ``--seconds`` while the config file is rewritten
   ``--rewrites`` times at even intervals (one key changed each time, the bytes encoded
   before the run); ``--rounds``
   rounds.  Throughput and p99 of each, the ratio of the medians, and the reloads the
   proxy applied (its ``/health`` generation).

Exit 0 whether the targets are met or not; 1 when the bench itself breaks.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import structlog

from bench.load import LoadGenerator, LoadResult
from bench.procs import BenchError, Child, free_port, stop_all
from bench.run import DEPLOYMENT, HEADERS, HOST, PROXY_PATH, ROOT, bench_config, request_body
from bench.validate_bench import UPSTREAM_ENV, generate
from dialproxy.config.parse import Source
from dialproxy.config.store import ConfigStore

CPU_TARGET = 0.3  # s of CPU for a reload of the big config
THROUGHPUT_TARGET = 0.8  # req/s while reloading >= this x steady


def big_config(keys: int, models: int, backend_port: int) -> dict[str, Any]:
    config = generate(keys, models)
    small = bench_config(backend_port)
    config["models"][DEPLOYMENT] = small["models"][DEPLOYMENT]
    config["roles"].update(small["roles"])
    config["keys"].update(small["keys"])
    return config


def _encode(config: dict[str, Any], compact: bool = False) -> bytes:
    return json.dumps(config, indent=None if compact else 2).encode()


def _cpu(store: ConfigStore, sources: list[Source]) -> float:
    """CPU seconds of one reload of ``sources``."""
    start = time.process_time()
    store.reload(sources)
    return time.process_time() - start


def build_cpu(config: dict[str, Any], runs: int) -> dict[str, float]:
    """Median CPU seconds of the first load and of reloads after each kind of change."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    name = "aidial.config.json"
    first: list[float] = []
    for _ in range(runs + 1):  # the first one compiles the schema: not counted
        store = ConfigStore([name], env=UPSTREAM_ENV)
        first.append(_cpu(store, [Source(name, _encode(config))]))
    doc = copy.deepcopy(config)
    secrets = list(doc["keys"])
    times: dict[str, list[float]] = {"key change": [], "role change": [], "no-op": []}
    for i in range(runs):
        doc["keys"][secrets[i]]["name"] = f"changed {i}"
        data = [Source(name, _encode(doc))]
        times["key change"].append(_cpu(store, data))
        doc["roles"]["team-3"]["limits"][f"model-{i:03d}"] = {"minute": str(1000 + i)}
        data = [Source(name, _encode(doc))]
        times["role change"].append(_cpu(store, data))
        data = [Source(name, _encode(doc, compact=i % 2 == 0) + b"\n")]
        times["no-op"].append(_cpu(store, data))
    out = {"full build": statistics.median(first[1:])}
    out.update((what, statistics.median(t)) for what, t in times.items())
    return out


def _generation(base: str) -> int:
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return int(json.load(r)["config"]["generation"])


def serve_throughput(
    config: dict[str, Any], opts: argparse.Namespace, workdir: Path, backend_port: int
) -> dict[str, Any]:
    pport = free_port()
    path = workdir / "aidial.config.json"
    path.write_bytes(_encode(config))
    py = sys.executable
    children: list[Child] = []

    def start(name: str, argv: list[str]) -> Child:
        child = Child(name, argv, workdir / f"{name}.log")
        children.append(child)
        return child

    os.environ.update(UPSTREAM_ENV)  # (the children inherit it)
    try:
        backend = start(
            "backend",
            [py, "-m", "dialproxy.demo_backend", "--host", HOST, "--port", str(backend_port)],
        )
        proxy = start(
            "proxy",
            [py, "-m", "dialproxy", "serve", "--config", str(path), "--host", HOST,
             "--port", str(pport)],
        )  # fmt: skip
        base = f"http://{HOST}:{pport}"
        backend.wait_http(f"http://{HOST}:{backend_port}/health")
        proxy.wait_http(base + "/health", timeout=60)
        load = LoadGenerator(workdir, "chat", request_body(False), HEADERS)
        url = base + PROXY_PATH

        def run(seconds: float) -> LoadResult:
            proxy.check_alive()
            result = load.run(url, opts.connections, seconds, ROOT)
            if result.status_errors or result.socket_errors or not result.requests:
                raise BenchError(f"failed requests: {result} (see {proxy.log_path})")
            return result

        run(2.0)  # warm-up
        doc = copy.deepcopy(config)
        secrets = [s for s in doc["keys"] if s != HEADERS["Authorization"][7:]]
        steady: list[LoadResult] = []
        during: list[LoadResult] = []
        applied: list[int] = []
        written = 0
        for _ in range(opts.rounds):
            # The rewrites are encoded before the run: encoding 2.2 MB takes the bench
            # ~0.1 s of CPU each, which a 2-core machine would take from the proxy.
            texts: list[bytes] = []
            for _ in range(opts.rewrites):
                doc["keys"][secrets[written]]["name"] = f"rewrite {written}"
                written += 1
                texts.append(_encode(doc))
            steady.append(run(opts.seconds))
            before = _generation(base)
            found: list[LoadResult] = []
            loader = threading.Thread(target=lambda out=found: out.append(run(opts.seconds)))
            loader.start()
            interval = opts.seconds / opts.rewrites
            for text in texts:
                time.sleep(interval / 2)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(text)
                tmp.replace(path)  # as an editor saves
                time.sleep(interval / 2)
            loader.join()
            if not found:
                raise BenchError("the load during the rewrites failed")
            during.append(found[0])
            time.sleep(2.0)  # the last reload lands before the next steady run
            applied.append(_generation(base) - before)
        return {"steady": steady, "during": during, "applied": applied}
    finally:
        stop_all(children)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rewrites", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-serve", action="store_true", help="only the in-process CPU")
    opts = parser.parse_args(argv)

    backend_port = free_port()
    config = big_config(opts.keys, opts.models, backend_port)
    print(
        f"config: {len(config['keys']):,} keys, {len(config['models'])} models, "
        f"{len(config['roles'])} roles, {len(_encode(config)) / 1e6:.1f} MB"
    )
    cpu = build_cpu(config, opts.runs)
    print(f"CPU of one build (time.process_time, median of {opts.runs}):")
    for what, seconds in cpu.items():
        target = "" if what == "full build" else f"  target <= {CPU_TARGET} s"
        print(f"  {what:<12} {seconds:.3f} s{target}")
    if opts.no_serve:
        return 0
    try:
        with tempfile.TemporaryDirectory(prefix="dialproxy-bench-reload-") as tmp:
            found = serve_throughput(config, opts, Path(tmp), backend_port)
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    steady, during = found["steady"], found["during"]
    print(
        f"chat requests through dialproxy serve ({opts.connections} connections, "
        f"{opts.seconds:.0f} s runs, {opts.rounds} rounds; "
        f"{opts.rewrites} rewrites of the config per run during):"
    )
    for name, runs in (("steady", steady), ("during", during)):
        print(
            f"  {name:<7} req/s " + " ".join(f"{r.rps:7.0f}" for r in runs)
            + "   p99 ms " + " ".join(f"{r.p99_ms:6.1f}" for r in runs)
        )  # fmt: skip
    ratio = statistics.median(r.rps for r in during) / statistics.median(r.rps for r in steady)
    p99s = statistics.median(r.p99_ms for r in steady), statistics.median(r.p99_ms for r in during)
    print(f"  reloads applied per run: {found['applied']}")
    print(
        f"  throughput during / steady: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x); "
        f"p99 {p99s[0]:.1f} ms steady, {p99s[1]:.1f} ms during"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
