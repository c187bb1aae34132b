"""The one mutable cell: the snapshot being served, its generation, and the last refusal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from dialproxy.config.loader import build_reusing
from dialproxy.config.model import Problem, Snapshot
from dialproxy.config.parse import Source, read_sources
from dialproxy.config.reuse import Built
from dialproxy.errors import ConfigError, EmptyConfig

log = structlog.get_logger("dialproxy.config")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: ``applied`` (a new generation is served), or refused with
    ``problems``, or neither (the content is the one already served)."""

    applied: bool
    generation: int
    problems: tuple[Problem, ...] = ()

    @property
    def refused(self) -> bool:
        return bool(self.problems)


def source_digest(sources: Sequence[Source]) -> str:
    """The digest of the config files' names and bytes, as read (before any parsing)."""
    h = hashlib.sha256()
    for source in sources:
        for part in (source.name.encode("utf-8", "surrogateescape"), source.data):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


# Entries a snapshot's memo keeps, at most (keys x deployments called, upstream capacities,
# route scopes): the least recently used goes first.
MEMO_SIZE = 100_000


class Memo:
    """What the request path works out once per snapshot and reuses (a key's plan for a
    deployment, an upstream's capacity counters...): a bounded map that evicts the least
    recently used entry.  Owned by the store: a new one with each snapshot served."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.size = size

    def get(self, key: Hashable) -> Any:
        """The value kept for ``key`` (now the most recently used), or None."""
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        entries = self._entries
        entries[key] = value
        if len(entries) > self.size:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# While a build runs in a worker thread, the serving thread that wants the interpreter back
# (after each socket read or write) waits at most this long instead of the default 5 ms.
BUILD_SWITCH_INTERVAL = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def _short_switches() -> Iterator[None]:
    """:data:`BUILD_SWITCH_INTERVAL` while at least one build runs (the interval is the
    process's), the interval found before the first of them again after the last."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, BUILD_SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class ConfigStore:
    """Holds the current snapshot; ``reload`` swaps it in one step or keeps the old one."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        allow_empty: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        memo_size: int = MEMO_SIZE,
    ) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self._env = env
        self.allow_empty = allow_empty
        self._clock = clock
        self.generation = 0
        self.loaded_at: datetime | None = None
        self.last_error: tuple[Problem, ...] | None = None
        self.reloads_applied = 0  # reloads that swapped in a new generation (/metrics)
        self.reloads_refused = 0  # reloads refused: the last good config kept serving
        # The digest of the bytes last built (served or refused); None when unknown or
        # unreadable.  The watcher skips a rebuild when the files still hold these bytes.
        self.source_digest: str | None = None
        self._snapshot: Snapshot | None = None
        # The last good build's entries: a rebuild takes the unchanged ones from it.
        self._built: Built | None = None
        self.memo_size = memo_size
        self._memo = Memo(memo_size)  # the served snapshot's

    def memo_for(self, snapshot: Snapshot) -> Memo:
        """The memo of ``snapshot`` when it is the one served; a request still on an older
        one gets an empty memo of its own (what it works out is not kept)."""
        if snapshot is self._snapshot:
            return self._memo
        return Memo(0)

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "load() first"
        return self._snapshot

    def env(self) -> Mapping[str, str]:
        return self._env if self._env is not None else os.environ

    def build(self, sources: Sequence[Source]) -> Snapshot:
        # The build allocates hundreds of thousands of objects that all live on: the cyclic
        # collector would walk the whole heap again and again for nothing (a third of a
        # reload's CPU).  Off for the build, on again after (when it was on).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with _short_switches():
                snapshot, built = build_reusing(sources, self.env(), self._built)
        finally:
            if collecting:
                gc.enable()
        if not self.allow_empty and (not snapshot.keys or not snapshot.models):
            empty = "keys" if not snapshot.keys else "models"
            raise EmptyConfig(
                [
                    Problem(
                        snapshot.files[-1] if snapshot.files else "<config>",
                        f"$.{empty}",
                        f"the config defines no {empty}: refused so that a mistake cannot "
                        "empty the gateway (start with --allow-empty-config to allow it)",
                    )
                ]
            )
        self._built = built  # (one assignment: a build in another thread sees old or new)
        return snapshot

    def load(self) -> Snapshot:
        """The first load: raises ConfigError (with OSError as a problem) when it fails."""
        try:
            sources = read_sources(self.paths)
        except OSError as e:
            raise ConfigError([Problem(str(e.filename or "?"), "$", e.strerror or str(e))]) from e
        snapshot = self.build(sources)
        self.source_digest = source_digest(sources)
        self._set(snapshot)
        return snapshot

    def reload(
        self, sources: Sequence[Source] | None = None, *, trigger: str = "reload"
    ) -> ReloadResult:
        """Rebuild from ``sources`` (or from the files, read now) and swap the snapshot in one
        step; on any problem keep serving the current one and record why.  A request that
        took the old snapshot keeps it to its end."""
        return self._apply(*self._attempt(sources), trigger)

    async def reload_async(
        self, sources: Sequence[Source] | None = None, *, trigger: str = "reload"
    ) -> ReloadResult:
        """:meth:`reload` with the build (pure, and long for a big config) in a worker
        thread, so the event loop keeps serving; the swap itself happens on the loop."""
        built = await asyncio.to_thread(self._attempt, sources)
        return self._apply(*built, trigger)

    def _attempt(
        self, sources: Sequence[Source] | None
    ) -> tuple[Snapshot | tuple[Problem, ...], str | None]:
        """Read (when needed) and build: the snapshot or the problems, and the bytes' digest
        (None when unreadable).  Touches no state: safe in a worker thread."""
        try:
            if sources is None:
                sources = read_sources(self.paths)
        except OSError as e:
            return (Problem(str(e.filename or "?"), "$", e.strerror or "cannot be read"),), None
        digest = source_digest(sources)
        try:
            return self.build(sources), digest
        except ConfigError as e:
            return tuple(p for p in e.problems if p.severity == "error"), digest
        except Exception as e:  # a loader bug must not take the reload path (or the watcher) down
            problem = Problem(
                sources[-1].name if sources else "<config>",
                "$",
                f"unexpected error while building the config ({type(e).__name__})",
            )
            return (problem,), digest

    def _apply(
        self, built: Snapshot | tuple[Problem, ...], digest: str | None, trigger: str
    ) -> ReloadResult:
        self.source_digest = digest  # None when unreadable: whatever appears next is new
        if not isinstance(built, Snapshot):
            return self._refuse(built, trigger)
        snapshot = built
        if self._snapshot is not None and snapshot.digest == self._snapshot.digest:
            # Same content (perhaps formatted differently): not a reload.  The files hold
            # what is served again, so an earlier refusal is no longer current.
            self.last_error = None
            log.info("config_unchanged", trigger=trigger, generation=self.generation)
            return ReloadResult(False, self.generation)
        self._set(snapshot)
        self.reloads_applied += 1
        log.info(
            "config_reloaded",
            trigger=trigger,
            generation=self.generation,
            digest=snapshot.digest[:12],
            models=len(snapshot.models),
            keys=len(snapshot.keys),
            warnings=[p.as_dict() for p in snapshot.warnings],
        )
        return ReloadResult(True, self.generation)

    def _refuse(self, problems: tuple[Problem, ...], trigger: str) -> ReloadResult:
        self.last_error = problems
        self.reloads_refused += 1
        log.error(
            "config_reload_refused",
            trigger=trigger,
            generation=self.generation,
            problems=[p.as_dict() for p in problems],
        )
        return ReloadResult(False, self.generation, problems)

    def _set(self, snapshot: Snapshot) -> None:
        self._memo = Memo(self.memo_size)  # (first: a request never pairs it with the old one)
        self._snapshot = snapshot
        self.generation += 1
        self.loaded_at = self._clock()
        self.last_error = None

    def health(self) -> dict[str, object]:
        snapshot = self._snapshot
        return {
            "generation": self.generation,
            "loadedAt": self.loaded_at.isoformat() if self.loaded_at else None,
            "digest": snapshot.digest if snapshot else None,
            "lastError": None
            if self.last_error is None
            else [{"file": p.file, "path": p.path, "message": p.message} for p in self.last_error],
        }
