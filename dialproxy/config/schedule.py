"""DIAL's ``rateLimitSchedule``: day, week and month windows on calendar boundaries.

DIAL Core (issue 1951, PR 1954) turned the day, week and month windows of token, cost and
request limits from sliding windows into fixed calendar periods: a day starts at
``resetTime`` local time in ``timezone``, a week on ``weekStartDay`` at that time, a month
on the 1st at that time; minute and hour windows still slide.  Without a
``rateLimitSchedule`` the schedule is UTC, Monday, 00:00.

Boundaries are worked out on local calendar dates and then placed in the zone, so a day
across a daylight-saving change is 23 or 25 hours long and a month is its own length.  A
reset time that does not exist on a day (inside a spring-forward gap) falls where Python's
``zoneinfo`` puts it (the offset before the change, i.e. one hour later on the new clock).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# Which windows reset on calendar boundaries (the rest slide).
CALENDAR_WINDOWS = frozenset({"day", "week", "month"})


def zone(name: str) -> ZoneInfo | None:
    """The IANA time zone ``name`` (``UTC`` too), or None when there is none of that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


class Calendar:
    """One kind of calendar period (``day``, ``week`` or ``month``) of a schedule; the
    current period is kept, so a request pays one comparison until it ends."""

    __slots__ = ("_end", "_start", "kind", "schedule")

    def __init__(self, schedule: Schedule, kind: str) -> None:
        self.schedule = schedule
        self.kind = kind
        self._start = 0
        self._end = 0

    def period(self, now: float) -> tuple[int, int]:
        """The period ``now`` is in: its start and end (epoch seconds; the end excluded)."""
        if self._start <= now < self._end:
            return self._start, self._end
        start, end = self.schedule.period(self.kind, now)
        if start <= now < end:  # (kept: the current one)
            self._start, self._end = start, end
        return start, end


@dataclass(frozen=True, slots=True)
class Schedule:
    """Where the day, week and month periods start: ``reset`` local time (hours, minutes)
    in ``timezone``; weeks on ``week_start`` (0 Monday ... 6 Sunday)."""

    timezone: str = "UTC"
    week_start: int = 0
    reset: tuple[int, int] = (0, 0)
    tz: ZoneInfo = field(init=False, repr=False, compare=False)
    calendars: dict[str, Calendar] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tz = zone(self.timezone)
        if tz is None:
            raise ValueError(f"unknown time zone {self.timezone!r}")
        object.__setattr__(self, "tz", tz)
        object.__setattr__(self, "calendars", {k: Calendar(self, k) for k in CALENDAR_WINDOWS})

    @classmethod
    def parse(cls, raw: object) -> Schedule:
        """From a checked ``rateLimitSchedule`` object (absent: the defaults)."""
        if not isinstance(raw, dict):
            return cls()
        hours, minutes = str(raw.get("resetTime", "00:00")).split(":")
        return cls(
            timezone=str(raw.get("timezone", "UTC")),
            week_start=WEEKDAYS.index(str(raw.get("weekStartDay", "Mon"))),
            reset=(int(hours), int(minutes)),
        )

    def _at(self, day: dt.date) -> int:
        """The epoch second of the reset time on local date ``day``."""
        hours, minutes = self.reset
        local = dt.datetime(day.year, day.month, day.day, hours, minutes, tzinfo=self.tz)
        return int(local.timestamp())

    def period(self, kind: str, now: float) -> tuple[int, int]:
        """The ``kind`` period (day, week, month) ``now`` is in: start and end, epoch s."""
        today = dt.datetime.fromtimestamp(now, self.tz).date()
        if self._at(today) > now:  # (before today's reset: still yesterday's day)
            today -= dt.timedelta(days=1)
        if kind == "day":
            first, following = today, today + dt.timedelta(days=1)
        elif kind == "week":
            first = today - dt.timedelta(days=(today.weekday() - self.week_start) % 7)
            following = first + dt.timedelta(days=7)
        elif kind == "month":
            first = today.replace(day=1)
            following = (first + dt.timedelta(days=32)).replace(day=1)
        else:
            raise ValueError(f"no calendar period {kind!r}")
        return self._at(first), self._at(following)

    def resets_at(self, end: float) -> str:
        """A period's end as DIAL's ``resetsAt``: ISO 8601 with the zone's offset."""
        return dt.datetime.fromtimestamp(end, self.tz).isoformat()


DEFAULT_SCHEDULE = Schedule()
