"""``dialproxy serve --workers N``: N serving processes on one port, one supervising parent.

Each worker is ``python -m dialproxy serve`` with the parent's own arguments plus
:data:`WORKER_FLAG` (the parent's pid): a whole ``serve`` of its own (config, watcher, SIGHUP
reload, SIGTERM grace, the Redis client) that listens with ``SO_REUSEPORT``, so the kernel
spreads new connections over the workers.  Re-executing the program, not
``multiprocessing``: a worker starts exactly as a single ``serve`` does (no pickled state,
no ``__main__`` re-import), and its stdin, stdout and stderr are the parent's.

The parent forwards SIGTERM, SIGINT and SIGHUP to the workers and exits when they all have:
0 if every one exited 0.  A worker that exits on its own (a crash, killed, a port it could
not take) is logged and the others are stopped as on SIGTERM: the parent exits 1 (the
service manager restarts the whole set).  A worker whose parent is gone stops too.

Before starting any, the parent checks that its ports are free (bound once without
``SO_REUSEPORT``): taken, by anything, a second set of workers among them included, it
says so and exits 2, rather than sharing the port with whatever holds it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import suppress

import structlog

from dialproxy import logs
from dialproxy.errors import EXIT_USAGE
from dialproxy.settings import Settings

WORKER_FLAG = "--worker-of"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# After SIGTERM, how much longer than the shutdown grace a worker may take before SIGKILL.
KILL_AFTER = 10.0

log = structlog.get_logger("dialproxy.workers")


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` workers of ``dialproxy <argv>``; the exit code: 0 or 1 (2:
    a port taken)."""
    ports = [settings.port]
    if settings.metrics and settings.metrics_port is not None:
        ports.append(settings.metrics_port)
    for port in ports:
        if (why := taken(settings.host, port)) is not None:
            print(f"dialproxy: cannot listen on {settings.host}:{port}: {why}", file=sys.stderr)
            return EXIT_USAGE
    logs.tag_pid()
    return asyncio.run(_supervise(settings, argv))


def taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on alone (None: it can), tried as a server
    binds it, each address ``host`` names, with SO_REUSEADDR and without SO_REUSEPORT."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as e:
        return str(e.strerror or e)
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                return str(e.strerror or e)
    return None


async def _supervise(settings: Settings, argv: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    command = [sys.executable, "-m", "dialproxy", *argv, WORKER_FLAG, str(os.getpid())]
    workers: list[asyncio.subprocess.Process] = []
    deadline: float | None = None  # set by the first stop

    def signal_all(sig: int) -> None:
        nonlocal deadline
        if sig != signal.SIGHUP and deadline is None:
            deadline = time.monotonic() + settings.shutdown_timeout + KILL_AFTER
        for worker in workers:
            if worker.returncode is None:
                with suppress(ProcessLookupError):
                    worker.send_signal(sig)

    for sig in FORWARDED:
        loop.add_signal_handler(sig, signal_all, sig)
    # The workers start with these signals blocked (the mask is inherited through fork and
    # exec) and unblock them once their handlers are in: one sent meanwhile waits for them,
    # rather than killing a worker still importing (SIGHUP's default action is to end it).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        for _ in range(settings.workers):
            workers.append(await asyncio.create_subprocess_exec(*command))
    except OSError as e:
        log.error("worker_not_started", error=type(e).__name__, detail=str(e))
        signal_all(signal.SIGTERM)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    log.info(
        "workers_started",
        workers=len(workers),
        pids=[w.pid for w in workers],
        url=f"http://{settings.host}:{settings.port}",
    )
    failed = len(workers) < settings.workers
    waits = {asyncio.ensure_future(w.wait()): w for w in workers}
    pending = set(waits)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=0.5)
        for task in done:
            worker, code = waits[task], task.result()
            if deadline is None:  # not asked to stop: it died
                log.error(
                    "worker_died",
                    worker=worker.pid,
                    code=code,
                    detail="a worker exited on its own: stopping the others",
                )
                failed = True
                signal_all(signal.SIGTERM)
            else:
                # A worker ended by the forwarded signal itself (still starting) stopped fine.
                stopped = code in (0, -signal.SIGTERM, -signal.SIGINT)
                failed = failed or not stopped
                log.info("worker_exited", worker=worker.pid, code=code)
        if pending and deadline is not None and time.monotonic() > deadline:
            log.error("workers_killed", pids=[waits[t].pid for t in pending])
            failed = True
            for task in pending:
                with suppress(ProcessLookupError):
                    waits[task].kill()
            deadline = float("inf")  # killed once; wait for them to go
    return 1 if failed else 0


async def watch_parent(parent: int, stop: asyncio.Event, every: float = 1.0) -> None:
    """A worker's task: set ``stop`` once the supervising process is gone (its parent pid
    is no longer ``parent``), so no worker outlives a parent killed with SIGKILL."""
    while True:
        await asyncio.sleep(every)
        if os.getppid() != parent:
            break
    log.error("supervisor_gone", detail="the supervising process exited: stopping")
    stop.set()
