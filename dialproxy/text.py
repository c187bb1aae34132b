"""The text forms of keys, times and durations, one definition each: the ``keys`` CLI, the
config loader and the server's handlers read and write them alike.

- secrets: ``dpk_`` (config keys) or ``dps_`` (shared keys) + 43 base62 characters (256
  random bits), so that secret scanners and log redaction match ``dp[ks]_[A-Za-z0-9]{43}``;
  a key is written into a config as ``sha256:<64 hex>``;
- times: ISO 8601 in (a date, or a date-time; without an offset it is UTC),
  ``2026-01-01T00:00:00Z`` out;
- durations: ``30d``, ``12h``, ``1w2d``, ``90m``, ``45s``, ``0``;
- a config value's ``${VAR}`` references, and control characters (never in a header value,
  a name, or a terminal).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

KEY_PREFIX = "dpk_"
SHARED_KEY_PREFIX = "dps_"
SECRET_PATTERN = re.compile(r"dp[ks]_[A-Za-z0-9]{43}")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SECRET_DIGITS = 43  # 62**43 > 2**256
# A key written as its digest; group 1: the digest.
SHA256_KEY = re.compile(r"^sha256:([0-9a-f]{64})$")
# A ``${VAR}`` reference in a config value; group 1: the variable's name.
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SURROGATE = re.compile("[\ud800-\udfff]")
# A URL's ``user:password@`` (a Redis URL's, an exporter's endpoint), as an error quotes it.
URL_CREDENTIALS = re.compile(r"://[^@/\s'\"]*@")
_DURATION = re.compile(r"([0-9]+)([smhdw])")  # (ASCII digits: int() reads others too)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}  # a duration's, in seconds


def key_digest(secret: str) -> str:
    """The SHA-256 hex digest of a key secret: how keys are looked up."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret, safe for logs and messages."""
    if secret.startswith("sha256:") and len(secret) == 71:
        return secret[7:15]
    return key_digest(secret)[:8]


def new_secret(prefix: str = KEY_PREFIX) -> str:
    """A new key secret: ``prefix`` + 256 random bits written as 43 base62 characters."""
    n = int.from_bytes(secrets.token_bytes(32), "big")
    digits = []
    for _ in range(_SECRET_DIGITS):
        n, r = divmod(n, 62)
        digits.append(_BASE62[r])
    return prefix + "".join(reversed(digits))


def hashed(secret: str) -> str:
    """The form a key is written in the config: ``sha256:<64 hex>``."""
    return "sha256:" + key_digest(secret)


def written_digest(name: str) -> str:
    """The SHA-256 of the key a config's ``keys`` entry names: its ``sha256:`` form, else
    the secret itself (``${VAR}`` references already replaced)."""
    if m := SHA256_KEY.match(name):
        return m.group(1)
    return key_digest(name)


def has_control(text: str) -> bool:
    return CONTROL.search(text) is not None


def lone_surrogate(text: str) -> str | None:
    """The first surrogate code point of ``text``, escaped (``\\ud800``), or None: half a
    UTF-16 pair, which JSON's ``\\u`` escapes and ``surrogateescape`` can put in a str but no
    UTF-8 text (a file, a log line, a Redis key, an SQLite row) can carry."""
    m = SURROGATE.search(text)
    return None if m is None else f"\\u{ord(m.group()):04x}"


def iso(when: datetime) -> str:
    """``2026-01-01T00:00:00Z``: the form written into configs and answers."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_datetime(value: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC."""
    parsed = datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# The instants a bound, a duration or an expiry may name: from 1970 to the end of 9998 (a
# date-time at either end of Python's range overflows once moved to UTC or a day later).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9998, 12, 31, tzinfo=UTC)
# A duration's most, in seconds: 100 years (from now, always a date before LATEST; a
# longer one would not make one).
LONGEST = 36_525 * 86_400


def within(when: datetime, value: str) -> datetime:
    """``when`` (read from ``value``), if it is from :data:`EARLIEST` to :data:`LATEST`;
    else a ValueError that says so."""
    try:
        inside = EARLIEST <= when <= LATEST
    except OverflowError:  # (compared in UTC: an offset may take it past year 9999)
        inside = False
    if not inside:
        raise ValueError(f"{value!r} is out of range (1970 to 9998)")
    return when


def timestamp(value: str, end_of_day: bool = False) -> float:
    """A range's bound: an ISO 8601 date or date-time as epoch seconds; with
    ``end_of_day``, a date (no time) means the end of that day."""
    when = within(parse_datetime(value), value)
    if end_of_day and "T" not in value.upper():
        when += timedelta(days=1)
    return when.timestamp()


def parse_duration(value: str) -> timedelta:
    """``30d``, ``12h``, ``1w2d``, ``90m``, ``45s``, ``0``."""
    text = value.strip().lower()
    if text == "0":
        return timedelta(0)
    if not text or _DURATION.sub("", text):
        raise ValueError(f"not a duration: {value!r} (use e.g. 30d, 12h, 1w2d, 90m)")
    seconds = sum(int(n) * UNITS[u] for n, u in _DURATION.findall(text))
    if seconds > LONGEST:
        raise TooLong(f"{value!r} is too long (at most 100 years)")
    return timedelta(seconds=seconds)


class TooLong(ValueError):
    """A duration past :data:`LONGEST`."""


def parse_expiry(value: str, now: datetime) -> datetime:
    """``30d`` (from now) or a date / date-time; must be in the future."""
    try:
        when = now + parse_duration(value)
    except TooLong:
        raise
    except ValueError:
        try:
            when = parse_datetime(value)
        except ValueError:
            raise ValueError(
                f"not a duration or a date: {value!r} (use 30d, 2026-01-01 or 2026-01-01T12:00:00Z)"
            ) from None
    within(when, value)
    if when <= now:
        raise ValueError(f"{value!r} is not in the future")
    return when
