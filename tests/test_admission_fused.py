"""The in-memory admission in one call (``LocalCounters.admit``) and a settlement's one
loop (``LocalCounters.change_kinds``) leave the counters as the window-by-window steps do,
and answer the same: random requests to a project and a key scope (sliding and calendar
windows, unlimited ones, small limits that refuse, a concurrency cap), on two counters, with
a clock that jumps by fractions of a minute and past days."""

from __future__ import annotations

import math
import random

import pytest

from dialproxy.config.model import UNLIMITED, Window
from dialproxy.config.schedule import Schedule
from dialproxy.counters import LocalCounters
from dialproxy.errors import ConcurrencyLimited, RateLimited
from dialproxy.limiter import Admission, Scope, WindowState, _admit_now, _refuse_now

SCHEDULE = Schedule("UTC", reset=(6, 0))


def windows(rnd: random.Random, names: tuple[tuple[str, int], ...]) -> tuple[Window, ...]:
    """Some of ``names``, each limited (small, often alike: ties; or huge) or unlimited, a day on the calendar."""
    chosen = [n for n in names if rnd.random() < 0.7]
    return tuple(
        Window(
            name,
            seconds,
            rnd.choice([UNLIMITED, 6, 30, rnd.randint(1, 400), 10**12]),
            SCHEDULE.calendars.get(name),
        )
        for name, seconds in chosen
    )


def scopes(rnd: random.Random) -> list[Scope]:
    sliding = (("minute", 60), ("hour", 3_600), ("day", 86_400), ("week", 604_800))
    made = [
        Scope(
            owner="p:team",
            model="chat",
            token_windows=windows(rnd, sliding),
            request_windows=windows(rnd, sliding[:3]),
            cost_windows=windows(rnd, sliding),
            concurrency=rnd.choice([None, None, 3]),
        )
    ]
    if rnd.random() < 0.5:
        made.append(
            Scope(
                owner="k:key",
                model="chat",
                token_windows=windows(rnd, sliding),
                request_windows=windows(rnd, sliding[:3]),
                concurrency=rnd.choice([None, 2]),
            )
        )
    return made


def state(s: WindowState | None) -> object:
    return None if s is None else (s.window, s.counts, s.used)


def admit(
    fused: bool, local: LocalCounters, admission: Admission, tokens: int, cost: int, member: str,
    now: float,
) -> object:  # fmt: skip
    """What an admission answers: the two states, or the 429's message and headers."""
    step = _admit_now if fused else _refuse_now
    try:
        request, token = step(local, admission, tokens, cost, member, now)
    except (RateLimited, ConcurrencyLimited) as e:
        return type(e), str(e), e.headers
    return state(request), state(token)


@pytest.mark.parametrize("seed", range(6))
def test_one_call_admits_and_settles_as_the_steps(seed: int) -> None:
    rnd = random.Random(seed)
    one, steps = LocalCounters(), LocalCounters()
    one._next_sweep = steps._next_sweep = math.inf  # (a sweep is not what is compared)
    now = 1_800_000_000.0
    admitted = 0
    for round_ in range(40):
        # one admission per round as the plan (one per config snapshot) keeps it
        chosen = scopes(rnd)
        fast, slow = Admission(chosen), Admission(chosen)
        assert fast.fast is not None
        held: list[tuple[str, int, int, float]] = []
        for i in range(60):
            for admission in (fast, slow):
                if not admission.period[0] <= now < admission.period[1]:
                    admission.current(now)
            tokens, cost = rnd.choice([0, 1, 5, 30]), rnd.choice([0, 2, 50])
            member = f"{round_}.{i}" if rnd.random() < 0.8 else ""
            got = admit(True, one, fast, tokens, cost, member, now)
            assert got == admit(False, steps, slow, tokens, cost, member, now)
            if isinstance(got[0], tuple | None):  # (admitted)
                admitted += 1
                held.append((member, tokens, cost, now))
            assert one.windows == steps.windows and one.slots == steps.slots
            if held and rnd.random() < 0.6:  # a settlement: usage less the reservation
                member, tokens, cost, when = held.pop(rnd.randrange(len(held)))
                used, spent = rnd.randint(0, 40) - tokens, rnd.randint(0, 60) - cost
                for scope in chosen:
                    one.change_kinds(scope.usage_at(when), (used, spent), now)
                    token_counters, cost_counters = scope.counters_at(when)
                    steps.change_many(token_counters, used, now)
                    steps.change_many(cost_counters, spent, now)
                    if member and scope.concurrency is not None:
                        one.settle((), (), (scope.slot_set,), member, now)
                        steps.settle((), (), (scope.slot_set,), member, now)
                assert one.windows == steps.windows and one.slots == steps.slots
            now += rnd.choice([0.0, 0.01, 0.7, 3.0, 29.0, 61.0, 3_700.0, 40_000.0])
    assert admitted > 200  # (refusals too: small limits)
