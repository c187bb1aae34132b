"""DIAL's limit rules, apart from any storage: which limit a caller's roles give on a model
(each field the maximum over the roles' entries, the ``default`` role's when none has one),
the windows it counts, and a project's cost windows.  The loader builds a snapshot's
accesses with :class:`Grants`; the routes resolve theirs with :func:`resolve_grant`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from dialproxy.config.model import (
    COST_WINDOWS,
    Access,
    Grant,
    Limit,
    Model,
    Role,
    Window,
    windows,
)
from dialproxy.config.schedule import DEFAULT_SCHEDULE, Schedule

_LIMIT_FIELDS = tuple(f.name for f in fields(Limit))


def max_limit(limits: Sequence[Limit]) -> Limit:
    """DIAL: each field is the maximum over the roles' entries; absent = unlimited."""
    if len(limits) == 1:
        return limits[0]
    values: dict[str, int | None] = {}
    for name in _LIMIT_FIELDS:
        best: int | None = None
        for lim in limits:
            value = getattr(lim, name)
            if value is None:  # this role does not limit it: unlimited
                best = None
                break
            if best is None or value > best:
                best = value
        values[name] = best
    return Limit(**values)


def resolve_grant(
    model: Model,
    roles: frozenset[str],
    all_roles: Mapping[str, Role],
    schedule: Schedule = DEFAULT_SCHEDULE,
) -> Grant:
    """DIAL's limit resolution for one model and a caller's roles.  A limited grant counts
    every window (its use is known in each), its day, week and month ones on ``schedule``."""
    counted = roles if model.user_roles is None else roles & model.user_roles
    entries = [
        all_roles[r].limits[model.name]
        for r in sorted(counted)
        if r in all_roles and model.name in all_roles[r].limits
    ]
    if not entries and "default" in all_roles and model.name in all_roles["default"].limits:
        entries = [all_roles["default"].limits[model.name]]
    limit = max_limit(entries) if entries else None
    return Grant(
        model=model,
        limit=limit,
        denied=limit.denies if limit else False,
        token_windows=limit.token_windows(schedule) if limit and limit.limits_anything else (),
        request_windows=limit.request_windows(schedule) if limit and limit.limits_anything else (),
        concurrency=limit.concurrent if limit else None,
    )


class Grants:
    """Grants shared between role sets: a grant depends only on the roles that have an entry.

    ``last`` holds the last good build's grants with their inputs (the roles' entries for
    the model, and the `default` role's): a grant whose model is the same object and whose
    inputs are equal is taken from it (the caller gives none when the schedule changed)."""

    def __init__(
        self,
        models: Mapping[str, Model],
        roles: Mapping[str, Role],
        schedule: Schedule,
        last: Mapping[tuple[str, frozenset[str]], tuple[Grant, Any]] | None = None,
    ) -> None:
        self.models = models
        self.roles = roles
        self.schedule = schedule
        self.limited: dict[str, frozenset[str]] = {}
        by_model: dict[str, set[str]] = {}
        for role in roles.values():
            for model_name in role.limits:
                by_model.setdefault(model_name, set()).add(role.name)
        self.limited = {m: frozenset(r) for m, r in by_model.items()}
        self.cache: dict[tuple[str, frozenset[str]], Grant] = {}
        self.last = last or {}
        # What the next build may take: this one's grants, and the last one's for the models
        # still there (an access taken whole from the last build resolves none of its own).
        self.kept: dict[tuple[str, frozenset[str]], tuple[Grant, Any]] = {
            k: v for k, v in self.last.items() if k[0] in models
        }

    def _grant(self, model: Model, relevant: frozenset[str]) -> Grant:
        name = model.name
        default = self.roles.get("default")
        inputs = (
            tuple(self.roles[r].limits.get(name) for r in sorted(relevant)),
            default.limits.get(name) if default is not None else None,
        )
        found = self.last.get((name, relevant))
        if found is not None and found[0].model is model and found[1] == inputs:
            grant = found[0]
        else:
            grant = resolve_grant(model, relevant, self.roles, self.schedule)
        self.kept[(name, relevant)] = (grant, inputs)
        return grant

    def access(self, roles: frozenset[str]) -> Access:
        grants: dict[str, Grant] = {}
        for name, model in self.models.items():
            if not model.admits(roles):
                continue
            counted = roles if model.user_roles is None else roles & model.user_roles
            relevant = counted & self.limited.get(name, frozenset())
            grant = self.cache.get((name, relevant))
            if grant is None:
                grant = self.cache[(name, relevant)] = self._grant(model, relevant)
            grants[name] = grant
        return Access(
            roles=roles,
            grants=MappingProxyType(grants),
            cost_windows=cost_windows(roles, self.roles, self.schedule),
        )


def cost_windows(
    roles: frozenset[str], all_roles: Mapping[str, Role], schedule: Schedule
) -> tuple[Window, ...]:
    """The project's cost windows (nano-USD): every one when any is limited."""
    cost: dict[str, Decimal | None] = {}
    role_list = [all_roles[r] for r in sorted(roles) if r in all_roles]
    for window, _ in COST_WINDOWS:
        values = [r.cost_limit.get(window) for r in role_list if r.cost_limit]
        cost[window] = (
            max(v for v in values if v is not None)
            if any(v is not None for v in values) and all(v is not None for v in values)
            else None
        )
    if all(value is None for value in cost.values()):
        return ()
    nano = tuple(None if v is None else int(v * 1_000_000_000) for v in cost.values())
    return windows(COST_WINDOWS, nano, schedule, every=True)
