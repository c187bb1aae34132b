"""The in-memory admission in one call (``LocalCounters.admit``) and a settlement's one
loop (``LocalCounters.change_kinds``) leave the counters as the window-by-window steps do,
and answer the same: random requests to a project and a key scope (sliding and calendar
windows, unlimited ones, small limits that refuse, a concurrency cap), on two counters, with
a clock that jumps by fractions of a minute and past days."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from dialproxy.config.model import UNLIMITED, Window
from dialproxy.config.schedule import Schedule
from dialproxy.counting.counters import LocalCounters
from dialproxy.counting.limiter import Admission, Limiter, Scope, WindowState, admit_in_steps
from dialproxy.errors import ConcurrencyLimited, RateLimited

SCHEDULE = Schedule("UTC", reset=(6, 0))


def windows(rnd: random.Random, names: tuple[tuple[str, int], ...]) -> tuple[Window, ...]:
    """Some of ``names``, each limited (small, often alike: ties; or huge) or unlimited, a
    day on the calendar."""
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


def counted(local: LocalCounters, now: float) -> dict[tuple[str, int], list[int]]:
    """The records as any read or take-back sees them: none that a sweep would drop (stale;
    the two sweep at different steps), a previous bucket only when it is the one before
    (an older one is never read), none that counts nothing (a blank one, kept for the one
    call, reads and counts as none)."""
    seen = {}
    for (key, seconds), (bucket, count, other, other_count) in local.windows.items():
        if seconds < 0:
            if bucket > now and count:
                seen[key, seconds] = [bucket, count]
            continue
        if bucket < int(now / seconds) - 1:
            continue
        previous = [other, other_count] if other == bucket - 1 and other_count else []
        if count or previous:
            seen[key, seconds] = [bucket, count, *previous]
    return seen


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def state(s: WindowState | None) -> object:
    return None if s is None else (s.window, s.counts, s.used)


def answer(
    admit: Callable[..., tuple[WindowState | None, WindowState | None]], *args: object
) -> tuple[object, ...]:
    """What ``admit(*args)`` answers: the two states, or the 429's message and headers."""
    try:
        request, token = admit(*args)
    except (RateLimited, ConcurrencyLimited) as e:
        return type(e), str(e), e.headers
    return state(request), state(token)


@pytest.mark.parametrize("seed", range(6))
def test_one_call_admits_and_settles_as_the_steps(seed: int) -> None:
    rnd = random.Random(seed)
    # (swept below, both at once)
    one, steps = LocalCounters(sweep_every=math.inf), LocalCounters(sweep_every=math.inf)
    clock = Clock()
    limiter = Limiter(one, clock=clock)
    admitted = 0
    for round_ in range(40):
        # one admission per round as the plan (one per config snapshot) keeps it
        chosen = scopes(rnd)
        fast, slow = Admission(chosen), Admission(chosen)
        assert fast.fast is not None
        held: list[tuple[str, int, int, float]] = []
        for i in range(60):
            now = clock.now
            for admission in (fast, slow):
                if not admission.period[0] <= now < admission.period[1]:
                    admission.current(now)
            tokens, cost = rnd.choice([0, 1, 5, 30]), rnd.choice([0, 2, 50])
            member = f"{round_}.{i}" if rnd.random() < 0.8 else ""
            got = answer(limiter.admit_now, fast, tokens, cost, member)  # (at clock.now)
            assert got == answer(admit_in_steps, steps, slow, tokens, cost, member, now)
            if isinstance(got[0], tuple | None):  # (admitted)
                admitted += 1
                held.append((member, tokens, cost, now))
            assert counted(one, now) == counted(steps, now) and one.slots == steps.slots
            if held and rnd.random() < 0.6:  # a settlement: usage less the reservation
                member, tokens, cost, when = held.pop(rnd.randrange(len(held)))
                used, spent = rnd.randint(0, 40) - tokens, rnd.randint(0, 60) - cost
                limiter.record_now(chosen, used, spent, member, when)
                for scope in chosen:
                    token_counters, cost_counters = scope.counters_at(when)
                    steps.change_many(token_counters, used, now)
                    steps.change_many(cost_counters, spent, now)
                    if member and scope.concurrency is not None:
                        steps.settle((), (), (scope.slot_set,), member, now)
                assert counted(one, now) == counted(steps, now) and one.slots == steps.slots
            if rnd.random() < 0.05:  # the sweep drops records the one call keeps
                one.sweep(now)
                steps.sweep(now)
            clock.now += rnd.choice([0.0, 0.01, 0.7, 3.0, 29.0, 61.0, 3_700.0, 40_000.0])
    assert admitted > 100  # (refusals too: small limits)


@pytest.mark.parametrize("steps", [False, True])
def test_a_reservation_in_an_empty_bucket_resets_with_that_bucket(steps: bool) -> None:
    """The token window's reset (``x-ratelimit-reset-tokens``) counts the request's own
    reservation, as its remaining count does: in a new bucket (the previous one still
    holding tokens, or none) it is that bucket's time, the request window's, not the
    previous bucket's (what the first request of each minute said, or 0 at the first)."""
    scope = Scope(
        owner="p:team",
        model="chat",
        token_windows=(Window("minute", 60, 1000),),
        request_windows=(Window("minute", 60, 1000),),
    )
    clock = Clock()
    clock.now = 1_800_000_000.0 + 1.0  # (a second into a bucket)
    local = LocalCounters()
    limiter = Limiter(local, clock=clock)
    admission = Admission([scope])
    for _ in range(2):  # the first bucket empty, then the next with the previous full
        if steps:
            request, token = admit_in_steps(local, admission, 10, 0, "", clock.now)
        else:
            request, token = limiter.admit_now(admission, 10, 0, "")
        assert request is not None and token is not None
        assert token.reset == request.reset >= 60
        clock.now += 60
