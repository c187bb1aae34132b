"""``dialproxy serve | validate | run-demo | demo-backend``: parse, build, return an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp import web

from dialproxy import keys, ledger, logs
from dialproxy.config.loader import build_snapshot
from dialproxy.config.model import Problem
from dialproxy.config.parse import read_sources
from dialproxy.config.store import ConfigStore
from dialproxy.errors import EXIT_INVALID, EXIT_OK, EXIT_USAGE, ConfigError
from dialproxy.settings import LEDGER_MODES, LOOPS, METRICS_AUTH, NUMBERS, Settings
from dialproxy.text import timestamp
from dialproxy.workers import FORWARDED, WORKER_FLAG, supervise, watch_parent

log = structlog.get_logger("dialproxy.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dialproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="serve the API")
    _serve_args(serve)
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serving processes on the one port (SO_REUSEPORT); over 1 needs "
        "--storage redis://... (env DIALPROXY_WORKERS; 1)",
    )
    # Internal: a worker started by `serve --workers N`, the supervising parent's pid.
    serve.add_argument(WORKER_FLAG, type=int, dest="worker_of", help=argparse.SUPPRESS)

    demo = sub.add_parser("run-demo", help="serve the API and the local demo model backend")
    _serve_args(demo)
    demo.add_argument("--demo-port", type=int, default=8081, help="demo backend port")

    validate = sub.add_parser("validate", help="check config files as the server would load them")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--strict", action="store_true", help="warnings are errors")
    validate.add_argument("--format", choices=("text", "json"), default="text")

    keys.add_parser(sub)

    usage = sub.add_parser(
        "usage",
        help="print the usage ledger (the served process's SQLite file, or Redis)",
        description="The usage ledger's hourly rows from --from to before --to, summed by the "
        "--by groups, as a table, CSV or JSON.  Reads what serve writes: the SQLite file beside "
        "the state file (--state / --config), or Redis (--storage redis://...).",
    )
    usage.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="the served config file: the state file is beside the first (env DIALPROXY_CONFIG)",
    )
    usage.add_argument(
        "--state", metavar="FILE", help="the served state file (env DIALPROXY_STATE)"
    )
    usage.add_argument(
        "--storage", help="redis://HOST:PORT/DB: the ledger in Redis (env DIALPROXY_STORAGE)"
    )
    usage.add_argument(
        "--from", dest="start", metavar="DATE", help="ISO date or date-time (UTC); default: all"
    )
    usage.add_argument(
        "--to", dest="end", metavar="DATE", help="up to before it (a date: up to its end); now"
    )
    usage.add_argument(
        "--by",
        action="append",
        choices=ledger.GROUPS,
        help="group by (repeatable, in order; default: --by project --by deployment)",
    )
    usage.add_argument("--project", help="only this project")
    usage.add_argument("--key", metavar="FINGERPRINT", help="only this key (its fingerprint)")
    usage.add_argument("--format", choices=ledger.FORMATS, default="table")

    backend = sub.add_parser("demo-backend", help="run only the demo model backend")
    backend.add_argument("--host", default="127.0.0.1")
    backend.add_argument("--port", type=int, default=8081)
    return parser


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="config file (repeatable; merged in order). Env: DIALPROXY_CONFIG=a.json,b.json",
    )
    parser.add_argument("--host", help="listen address (env DIALPROXY_HOST; 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (env DIALPROXY_PORT; 8080)")
    parser.add_argument("--storage", help="counter storage: memory:// or redis://HOST:PORT/DB")
    parser.add_argument(
        "--storage-failure",
        choices=("allow", "deny", "local"),
        help="what to do while Redis is unreachable",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        help="the event loop: uvloop (libuv's, the default: fewer instructions per request) "
        "or asyncio (Python's own) (env DIALPROXY_LOOP)",
    )
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="SQLite file for shared keys with memory counters (env DIALPROXY_STATE; "
        "default: dialproxy-state.sqlite beside the first config file)",
    )
    parser.add_argument(
        "--ledger",
        choices=LEDGER_MODES,
        help="the usage ledger: hourly usage per project, key, deployment and API, in an "
        "SQLite file beside the state file or (Redis storage) in Redis (env DIALPROXY_LEDGER; on)",
    )
    parser.add_argument(
        "--ledger-flush",
        type=float,
        metavar="SECONDS",
        help="how often the ledger is written: the most a crash loses (env "
        "DIALPROXY_LEDGER_FLUSH; 5)",
    )
    parser.add_argument(
        "--ledger-retention",
        type=int,
        metavar="DAYS",
        help="days of usage the ledger keeps (env DIALPROXY_LEDGER_RETENTION; 400)",
    )
    parser.add_argument(
        "--allow-empty-config",
        action="store_true",
        help="accept a config with no keys or no models",
    )
    parser.add_argument("--no-watch", action="store_true", help="do not reload on file changes")
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="serve no GET /metrics and count nothing for it (env DIALPROXY_METRICS=off)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve GET /metrics on this port (same host) instead of the main port "
        "(env DIALPROXY_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-key-label",
        action="store_true",
        help="add a key label (the config key's fingerprint) to the request, token and cost "
        "series: one series per key (env DIALPROXY_METRICS_KEY_LABEL=on)",
    )
    parser.add_argument(
        "--metrics-auth",
        choices=METRICS_AUTH,
        help="who may read /metrics: none (anyone who reaches it; the default) or key (a "
        "request carrying any key of the config, as Api-Key or Authorization: Bearer) "
        "(env DIALPROXY_METRICS_AUTH)",
    )
    parser.add_argument(
        "--admin-role",
        help="a key with this role may use the whole admin API (/v1/admin/...) "
        "(env DIALPROXY_ADMIN_ROLE; admin)",
    )
    parser.add_argument(
        "--viewer-role",
        help="a key with this role may read the admin API, not write "
        "(env DIALPROXY_VIEWER_ROLE; viewer)",
    )
    parser.add_argument(
        "--keys-file",
        metavar="FILE",
        help="of several config files, the one the admin API writes keys to (env "
        "DIALPROXY_KEYS_FILE; default: the one file that holds a keys section)",
    )
    parser.add_argument(
        "--max-response",
        type=int,
        metavar="BYTES",
        help="largest non-streamed upstream answer relayed, decoded; over it: 502 "
        "(env DIALPROXY_MAX_RESPONSE; 67108864 = 64 MiB)",
    )
    parser.add_argument(
        "--max-event",
        type=int,
        metavar="BYTES",
        help="largest unfinished upstream stream event held; over it the stream ends with an "
        "SSE error (env DIALPROXY_MAX_EVENT; 4194304 = 4 MiB)",
    )
    parser.add_argument(
        "--stream-drain",
        type=float,
        metavar="SECONDS",
        help="how long a stream the client left is still read for its usage "
        "(env DIALPROXY_STREAM_DRAIN; 5)",
    )
    parser.add_argument(
        "--slot-lease",
        type=float,
        metavar="SECONDS",
        help="with Redis storage: how long a concurrency slot of an instance that died stays "
        "taken (live ones are renewed every third of it; env DIALPROXY_SLOT_LEASE; 60)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may finish before open streams are "
        "ended (env DIALPROXY_SHUTDOWN_TIMEOUT; 30)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        help="a connection's time to send complete request headers, from its opening or its "
        "previous answer; idle keep-alive connections close after it too "
        "(env DIALPROXY_HEADER_TIMEOUT; 10)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        help="a request body that receives no byte for this long is answered 408 "
        "(env DIALPROXY_BODY_TIMEOUT; 30)",
    )


def settings_for(argv: Sequence[str]) -> Settings:
    """The settings a command line gives (``DIALPROXY_*`` variables, then its flags)."""
    return _settings(_parser().parse_args(argv))


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    changes: dict[str, object] = {}
    if args.config:
        changes["config_paths"] = tuple(args.config)
    for name in (
        "host",
        "storage",
        "storage_failure",
        "state",
        "loop",
        "ledger",
        "metrics_auth",
        "admin_role",
        "viewer_role",
        "keys_file",
        *NUMBERS,
    ):
        if getattr(args, name, None) is not None:  # (run-demo has no --workers)
            changes[name] = getattr(args, name)
    if args.allow_empty_config:
        changes["allow_empty_config"] = True
    if args.no_watch:
        changes["watch"] = False
    if args.no_metrics:
        changes["metrics"] = False
    if args.metrics_key_label:
        changes["metrics_key_label"] = True
    if args.command == "run-demo" or getattr(args, "worker_of", None) is not None:
        changes["workers"] = 1  # run-demo is one process; a worker is one of the N
    return replace(settings, **changes)  # type: ignore[arg-type]


def _report(problems: Sequence[Problem], fmt: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if fmt == "json":
        print(json.dumps([p.as_dict() for p in problems], indent=2), file=stream)
        return
    for p in problems:
        print(f"{p.file}: {p.path}: {p.severity}: {p.message}", file=stream)


def validate(files: Sequence[str], strict: bool, fmt: str) -> int:
    """Load FILEs as the server would; report every problem; 0 valid, 1 invalid, 2 unreadable."""
    for stream in (sys.stdout, sys.stderr):  # a file name or a config value may not encode
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        sources = read_sources(files, pipes=True)  # (`validate <(envsubst < tmpl)`)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        print(f"dialproxy validate: cannot read {e.filename}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    try:
        snapshot = build_snapshot(sources, os.environ)
        problems = list(snapshot.warnings)
        for section, found in (("models", snapshot.models), ("keys", snapshot.keys)):
            if not found:  # `dialproxy serve` refuses this unless --allow-empty-config
                problems.append(
                    Problem(
                        files[-1],
                        f"$.{section}",
                        f"the config defines no {section}: `dialproxy serve` refuses it "
                        "unless started with --allow-empty-config",
                        "warning",
                    )
                )
    except ConfigError as e:
        problems = list(e.problems)
    invalid = any(p.severity == "error" or strict for p in problems)
    _report(problems, fmt, sys.stdout)
    if fmt == "text":
        errors = sum(p.severity == "error" for p in problems)
        warnings = len(problems) - errors
        verdict = "invalid" if invalid else "valid"
        print(
            f"{', '.join(files)}: {verdict} ({errors} error(s), {warnings} warning(s))",
            file=sys.stderr,
        )
    return EXIT_INVALID if invalid else EXIT_OK


def _date(value: str | None, end: bool) -> float | None:
    if value is None:
        return None
    return timestamp(value, end_of_day=end)  # (a date: up to its end)


def usage(args: argparse.Namespace) -> int:
    """``dialproxy usage``: the ledger's rows printed; 0, 1 (no ledger there), 2 (usage)."""
    settings = Settings.from_env()
    changes: dict[str, object] = {}
    if args.config:
        changes["config_paths"] = tuple(args.config)
    for name in ("state", "storage"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    settings = replace(settings, **changes)  # type: ignore[arg-type]
    try:
        start = _date(args.start, end=False)
        end = _date(args.end, end=True)
    except ValueError:
        print("dialproxy usage: --from and --to take ISO dates or date-times", file=sys.stderr)
        return EXIT_USAGE
    if start is not None and end is not None and start >= end:  # (as the HTTP API: 400)
        print("dialproxy usage: --from must be before --to", file=sys.stderr)
        return EXIT_USAGE
    uri = settings.storage.removeprefix("async+")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    store: ledger.LedgerStore
    if scheme in ("redis", "rediss", "redis+unix"):
        import redis.asyncio

        if scheme == "redis+unix":
            uri = "unix" + uri.removeprefix("redis+unix")
        client = redis.asyncio.Redis.from_url(uri, decode_responses=True, socket_timeout=10)
        store = ledger.RedisLedgerStore(client, settings.ledger_retention)
        store.owns_client = True
    elif scheme == "memory":
        from dialproxy.statefile import state_path

        path = ledger.usage_path(state_path(settings))
        if not path.is_file():
            print(f"dialproxy usage: no ledger at {path} (see --state, --config)", file=sys.stderr)
            return EXIT_INVALID
        store = ledger.SqliteLedgerStore(path)
    else:
        print("dialproxy usage: --storage must be memory:// or redis://...", file=sys.stderr)
        return EXIT_USAGE
    by = tuple(args.by or ("project", "deployment"))

    async def read() -> list[dict[str, Any]]:
        book = ledger.Ledger(store)
        try:
            return await book.rows(
                start if start is not None else 0,
                end if end is not None else time.time() + ledger.HOUR,
                by,
                args.project,
                args.key,
            )
        finally:
            await store.close()

    try:
        rows = asyncio.run(read())
    except Exception as e:  # (Redis unreachable, a file that is no ledger)
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        print(
            f"dialproxy usage: cannot read the ledger: {type(cause).__name__}: {cause}",
            file=sys.stderr,
        )
        return EXIT_INVALID
    sys.stdout.write(ledger.render(rows, by, args.format))
    return EXIT_OK


def _load_store(settings: Settings) -> ConfigStore | None:
    store = ConfigStore(settings.config_paths, allow_empty=settings.allow_empty_config)
    try:
        store.load()
    except ConfigError as e:
        print("dialproxy: the config is invalid; not serving:", file=sys.stderr)
        _report(e.problems, "text")
        return None
    return store


class CannotListen(Exception):
    """A port the process cannot listen on (taken, not allowed): ``host:port: why``."""


async def _serve(
    settings: Settings, store: ConfigStore, demo_port: int | None, parent: int | None = None
) -> None:
    """Serve until SIGTERM or SIGINT.  ``parent``: this is a worker of ``serve --workers N``
    (listening with SO_REUSEPORT beside the others; it stops if that process goes)."""
    from dialproxy.demo_backend import Pace, create_backend_app
    from dialproxy.server import build_app, reload_soon, tune_gc
    from dialproxy.web.appkeys import DRAIN
    from dialproxy.web.drain import FINISH_TIMEOUT, shut_down

    app = build_app(settings, store)
    if parent is not None:  # (an admin write here is told to every worker through it)
        from dialproxy.web.appkeys import SUPERVISOR

        app[SUPERVISOR] = parent
    reuse = True if parent is not None else None  # (workers share their ports)
    runners: list[web.AppRunner] = []

    async def listen(runner: web.AppRunner, port: int, reuse_port: bool | None) -> None:
        runners.append(runner)  # (cleaned up below if a later port cannot be had)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, port, reuse_port=reuse_port).start()
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)  # (e's own text repeats the address)
            raise CannotListen(f"{settings.host}:{port}: {why}") from None

    try:
        if demo_port is not None:
            await listen(
                web.AppRunner(create_backend_app(Pace()), access_log=None), demo_port, None
            )
            log.info("demo_backend_serving", url=f"http://{settings.host}:{demo_port}")
        # The grace is shut_down's; aiohttp's own timeout (applied twice) only follows it.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=FINISH_TIMEOUT
        )
        await listen(runner, settings.port, reuse)
        runners.insert(0, runners.pop())  # (the app's first: it is stopped with the grace)
        if settings.metrics and settings.metrics_port is not None:
            from dialproxy.web.app import metrics_app

            await listen(
                web.AppRunner(metrics_app(app), access_log=None), settings.metrics_port, reuse
            )
            log.info(
                "metrics_serving", url=f"http://{settings.host}:{settings.metrics_port}/metrics"
            )
    except CannotListen:
        for r in reversed(runners):
            await r.cleanup()
        raise
    tune_gc()
    log.info("serving", url=f"http://{settings.host}:{settings.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: the same reload as a file change (rebuild, swap or refuse), watcher or not.
    loop.add_signal_handler(signal.SIGHUP, reload_soon, app, "sighup")
    watching = None
    if parent is not None:  # the supervisor started it with them blocked (workers.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        watching = asyncio.create_task(watch_parent(parent, stop))
    try:
        await stop.wait()
    finally:
        grace = settings.shutdown_timeout
        log.info("stopping", detail=f"letting requests in flight finish (up to {grace:g} s)")
        if watching is not None:
            watching.cancel()
        await shut_down(runner, app[DRAIN], grace)
        for r in runners[1:]:  # the demo backend, the metrics port
            await r.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.files, args.strict, args.format)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "usage":
        return usage(args)
    if args.command == "demo-backend":
        from dialproxy.demo_backend import main as backend_main

        return backend_main(["--host", args.host, "--port", str(args.port)])
    logs.capture_stdlib(logs.configure(logging.INFO))
    worker_of = getattr(args, "worker_of", None)
    if worker_of is not None:
        logs.tag_pid()
    try:
        settings = _settings(args)
        settings.check()
    except ValueError as e:
        print(f"dialproxy: {e}", file=sys.stderr)
        return EXIT_USAGE
    missing = [p for p in settings.config_paths if not Path(p).is_file()]
    if missing:
        print(f"dialproxy: config file not found: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    store = _load_store(settings)
    if store is None:
        return EXIT_INVALID
    if settings.workers > 1:  # the config is valid: the workers load it each
        del store
        return supervise(settings, argv)
    demo_port = args.demo_port if args.command == "run-demo" else None
    from dialproxy.server import event_loop_factory

    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.loop)) as runner:
            runner.run(_serve(settings, store, demo_port, worker_of))
    except CannotListen as e:
        print(f"dialproxy: cannot listen on {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
