"""The one mutable cell: the snapshot being served, its generation, and the last refusal."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from dialproxy.config.loader import ConfigError, Source, build_snapshot, read_sources
from dialproxy.config.model import Problem, Snapshot

log = structlog.get_logger("dialproxy.config")


class EmptyConfig(ConfigError):
    pass


@dataclass(frozen=True, slots=True)
class ReloadResult:
    applied: bool
    generation: int
    problems: tuple[Problem, ...] = ()


class ConfigStore:
    """Holds the current snapshot; ``reload`` swaps it in one step or keeps the old one."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        allow_empty: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self._env = env
        self.allow_empty = allow_empty
        self._clock = clock
        self.generation = 0
        self.loaded_at: datetime | None = None
        self.last_error: tuple[Problem, ...] | None = None
        self._snapshot: Snapshot | None = None

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> ConfigStore:
        """A store serving a prebuilt snapshot (tests, embedding)."""
        store = cls(snapshot.files)
        store._set(snapshot)
        return store

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None, "load() first"
        return self._snapshot

    def env(self) -> Mapping[str, str]:
        return self._env if self._env is not None else os.environ

    def build(self, sources: Sequence[Source]) -> Snapshot:
        snapshot = build_snapshot(sources, self.env())
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
        return snapshot

    def load(self) -> Snapshot:
        """The first load: raises ConfigError (with OSError as a problem) when it fails."""
        try:
            sources = read_sources(self.paths)
        except OSError as e:
            raise ConfigError([Problem(str(e.filename or "?"), "$", e.strerror or str(e))]) from e
        snapshot = self.build(sources)
        self._set(snapshot)
        return snapshot

    def reload(self) -> ReloadResult:
        """Rebuild from the files; on any problem keep serving the current snapshot."""
        try:
            sources = read_sources(self.paths)
            snapshot = self.build(sources)
        except OSError as e:
            problems: tuple[Problem, ...] = (
                Problem(str(e.filename or "?"), "$", e.strerror or "cannot be read"),
            )
            return self._refuse(problems)
        except ConfigError as e:
            return self._refuse(tuple(p for p in e.problems if p.severity == "error"))
        if self._snapshot is not None and snapshot.digest == self._snapshot.digest:
            self.last_error = None
            return ReloadResult(False, self.generation)
        self._set(snapshot)
        log.info(
            "config_reloaded",
            generation=self.generation,
            digest=snapshot.digest[:12],
            models=len(snapshot.models),
            keys=len(snapshot.keys),
            warnings=len(snapshot.warnings),
        )
        return ReloadResult(True, self.generation)

    def _refuse(self, problems: tuple[Problem, ...]) -> ReloadResult:
        self.last_error = problems
        log.error(
            "config_reload_refused",
            generation=self.generation,
            problems=[p.as_dict() for p in problems],
        )
        return ReloadResult(False, self.generation, problems)

    def _set(self, snapshot: Snapshot) -> None:
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
