"""Watches the config files' folders and reloads the store when the files' bytes change.

Folders, not files: an editor's atomic save (write a temporary file, rename it over the
config) and a Kubernetes ConfigMap update (a new timestamped folder, then the ``..data``
symlink swapped) both replace the file, and a watch on the old file would see nothing more.
The folder of each path as given and the folder it resolves to (through symlinks) are watched;
when what a path resolves to moves, the watch moves with it.

Any event in a watched folder, and a slow poll as a backstop, leads to a check: the config
files are read, and re-read until two reads agree (a writer in the middle of a two-step write
is waited for); bytes identical to the last ones built are not built again.  Otherwise the
store rebuilds the snapshot with the loader ``dialproxy validate`` uses and swaps it in one
step, or refuses it and keeps serving the last good one (see :class:`ConfigStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import structlog
from watchfiles import awatch

from dialproxy.config.parse import Source, read_sources
from dialproxy.config.store import ConfigStore, ReloadResult, source_digest

log = structlog.get_logger("dialproxy.config")

Reload = Callable[[Sequence[Source] | None], Awaitable[ReloadResult]]


def watched_dirs(paths: Iterable[Path]) -> tuple[Path, ...]:
    """The folders to watch: each path's own folder and the folder it resolves to."""
    dirs: dict[Path, None] = {}
    for p in paths:
        path = Path(p).absolute()
        for folder in (path.parent, path.resolve().parent):
            if folder.is_dir():
                dirs.setdefault(folder)
    return tuple(dirs)


def _not_state_file(_: object, path: str) -> bool:
    # (dialproxy-state.sqlite, its -wal and -shm, the ledger's dialproxy-state.usage.sqlite)
    return not Path(path).name.startswith("dialproxy-state")


def _read(paths: Sequence[Path]) -> list[Source] | None:
    try:
        return read_sources(paths)
    except OSError:
        return None


class ConfigWatcher:
    """Runs one background task (``start``/``close``) that keeps the store up to date.

    ``reload`` is called with the settled bytes (or ``None`` when a file cannot be read, so
    that the store reports it) and does the rebuild and swap.
    """

    def __init__(
        self,
        store: ConfigStore,
        reload: Reload | None = None,
        *,
        debounce_ms: int = 50,
        step_ms: int = 25,
        settle: float = 0.02,
        settle_reads: int = 10,
        poll_interval: float = 5.0,
        retry_delay: float = 1.0,
    ) -> None:
        self.store = store
        self._reload: Reload = reload or (lambda s: store.reload_async(s, trigger="watch"))
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self.settle = settle
        self.settle_reads = settle_reads
        self.poll_interval = poll_interval
        self.retry_delay = retry_delay
        self.ready = asyncio.Event()  # set once the folders are watched
        self.checks = 0
        self.failures = 0
        self._closing = asyncio.Event()
        self._round_stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self._task is None, "started twice"
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="dialproxy-config-watcher"
        )

    async def close(self) -> None:
        """Stop watching and wait for the task: it ends within a watch step."""
        self._closing.set()
        self._round_stop.set()
        task = self._task
        if task is None:
            return
        await asyncio.wait([task], timeout=2.0)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def check(self) -> ReloadResult | None:
        """Re-read the files; rebuild when their bytes differ from the last ones built."""
        self.checks += 1
        paths = self.store.paths
        sources = _read(paths)
        first = sources
        # (a big config's digest is worked out on the event loop: once per read kept)
        digest = source_digest(sources) if sources is not None else None
        if digest is not None and digest == self.store.source_digest:
            return None
        for _ in range(self.settle_reads):  # until two reads agree
            await asyncio.sleep(self.settle)
            again = _read(paths)
            if again == sources:
                break
            sources = again
        if sources is None:
            if self.store.source_digest is None and self.store.last_error is not None:
                return None  # still unreadable: already reported
        else:
            if sources is not first:
                digest = source_digest(sources)
            if digest == self.store.source_digest:
                return None
        return await self._reload(sources)

    async def _run(self) -> None:
        failure: str | None = None  # the last one logged: a lasting failure is logged once
        while not self._closing.is_set():
            dirs = watched_dirs(self.store.paths)
            try:
                await self._watch(dirs, announce=failure is not None or not self.ready.is_set())
                failure = None
            except Exception as e:  # the folder went away, inotify limits...: retry, keep serving
                self.failures += 1
                detail = f"{type(e).__name__}: {str(e)[:200]}"
                if detail != failure:
                    log.error(
                        "config_watch_failed",
                        error=detail,
                        folders=[str(d) for d in dirs],
                        retry_every=self.retry_delay,
                    )
                failure = detail
                await self.check()  # a config that went away with its folder is reported
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.retry_delay)

    async def _watch(self, dirs: tuple[Path, ...], *, announce: bool) -> None:
        """Watch ``dirs`` until closed, or until the paths resolve to other folders."""
        if not dirs:
            raise FileNotFoundError("no config folder exists")
        stop = self._round_stop = asyncio.Event()
        if self._closing.is_set():
            return
        batches = awatch(
            *dirs,
            # Any event may change what a path resolves to: all are checked, except writes to
            # the shared keys' SQLite file, which may sit beside the config.
            watch_filter=_not_state_file,
            debounce=self.debounce_ms,
            step=self.step_ms,
            stop_event=stop,
            rust_timeout=max(int(self.poll_interval * 1000), 1),
            yield_on_timeout=True,
            recursive=False,
        )
        pending = asyncio.ensure_future(anext(batches))
        try:
            # awatch registers its watches before it first suspends, so once the task has
            # run one step they are in place; the check then covers what happened before.
            await asyncio.sleep(0)
            if pending.done():
                pending.result()  # raises why the watch could not start
            if announce:
                log.info("config_watch_started", folders=[str(d) for d in dirs])
            self.ready.set()
            await self.check()
            while True:
                try:
                    await pending
                except StopAsyncIteration:
                    return
                await self.check()
                if watched_dirs(self.store.paths) != dirs:
                    return  # a symlink now points elsewhere: watch its new folder
                pending = asyncio.ensure_future(anext(batches))
        finally:
            stop.set()  # the watch thread sees it within a step
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved: nothing is left unobserved
            await batches.aclose()
