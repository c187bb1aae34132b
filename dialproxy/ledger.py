"""The usage ledger: every finished request added to an hourly aggregate.

One row per (hour, project, key fingerprint, shared key id, deployment, API) holds the
requests, the errors, the prompt, completion and total tokens and the cost (nano-USD, an
integer, as the cost counters keep it).  :meth:`Ledger.add` is the request path's part: a
dict lookup and six integer additions in process memory, nothing awaited.  A background task
(:meth:`Ledger.run`) writes what was added to the store every ``flush_every`` seconds (and
once more when the app stops), in one step:

- :class:`SqliteLedgerStore` (embedded, the default): an SQLite file beside the state file,
  one upsert per row, written off the event loop;
- :class:`RedisLedgerStore` (with Redis storage): one hash per hour (``dp:usage:h:<hour>``,
  a field per row and measure, HINCRBY) and a sorted set of the hours (``dp:usage:hours``),
  in script calls of up to 500 rows each, each hour's hash expiring at the end of the
  retention, on the process's one Redis client, so that every instance adds to the same
  ledger.

What a restart can lose is what was added since the last write: at most ``flush_every``
seconds of requests, and none on a clean stop (SIGTERM writes the rest).  A write that
fails (Redis down, a disk error) keeps its rows for the next one, so an outage delays the
ledger rather than losing it.  A Redis call that got no answer may still have been applied
(a timeout while Redis was busy): each call carries a sequence number Redis records with
it, so the same call sent again is applied once, and a read in between counts it once.

Retention: hours older than ``retention_days`` are dropped (at most once an hour, with a
write; in Redis the hashes expire too).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dialproxy.errors import LedgerUnavailable
from dialproxy.statefile import StateDb

if TYPE_CHECKING:
    import redis.asyncio

    from dialproxy.config.model import Model
    from dialproxy.wire.usage import Usage

log = structlog.get_logger("dialproxy.ledger")

HOUR = 3600
DAY = 86400
FLUSH_EVERY = 5.0  # seconds between writes (the most a crash can lose)
READ_TRIES = 3  # reads beside the writes before one waits for them (see Ledger.rows)
RETENTION_DAYS = 400
USAGE_FILE_SUFFIX = ".usage.sqlite"  # beside the state file: dialproxy-state.usage.sqlite

# A row's key without its hour (what the request path hands in) and with it.
Row = tuple[str, str, str, str, str]  # project, key fingerprint, shared key id, deployment, API
RowKey = tuple[int, str, str, str, str, str]  # hour (epoch seconds of its start), then Row
MEASURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_nano_usd",
)
DIMENSIONS = ("hour", "project", "key", "shared_key", "deployment", "api")
# What `by` may group by: a dimension, or `day` (the hour's UTC day).
GROUPS = ("project", "key", "shared_key", "deployment", "api", "hour", "day")
Clock = Callable[[], float]


class LedgerStore(Protocol):
    """Where the ledger's rows live.  ``write`` adds (never replaces) and drops the hours
    before ``keep_from`` (None: not this time); it raises when it failed: :class:`Kept` when
    the store keeps the rows it could not confirm and sends them with its next write
    (``held`` counts them; its reads include them) and hands back those it did not send,
    any other error when it wrote nothing (the caller keeps the rows)."""

    @property
    def held(self) -> int: ...

    async def write(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None: ...
    async def read(
        self, start: int, end: int, project: str | None = None
    ) -> list[tuple[RowKey, list[int]]]: ...
    async def close(self) -> None: ...


class Kept(Exception):
    """A write that failed: the store keeps the call it could not confirm, for its next
    write; ``rows``: those it did not send, for the caller to keep."""

    def __init__(self, rows: list[tuple[RowKey, Sequence[int]]]) -> None:
        super().__init__(f"{len(rows)} rows not sent")
        self.rows = rows


class Outcome(Protocol):
    """What the ledger reads of a finished request (:class:`dialproxy.outcome.Outcome`,
    described here so that the ledger does not import the request path that writes to it)."""

    @property
    def status(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def usage(self) -> Usage | None: ...
    @property
    def model(self) -> Model | None: ...
    @property
    def estimated(self) -> bool: ...


class Ledger:
    """The process's pending hours in memory, written to ``store`` in batches."""

    def __init__(
        self,
        store: LedgerStore,
        *,
        flush_every: float = FLUSH_EVERY,
        retention_days: int = RETENTION_DAYS,
        clock: Clock = time.time,
    ) -> None:
        self.store = store
        self.flush_every = flush_every
        self.retention_days = retention_days
        self.clock = clock
        self.pending: dict[RowKey, list[int]] = {}
        self.writes = 0  # batches written
        self.failures = 0  # batches that failed (kept for the next write)
        self.failing = 0  # writes failed in a row: one warning an outage, not one a flush
        self._pruned_hour = -1  # the hour retention last ran in
        self._hour = -2 * HOUR  # the start of the hour rows were last added in
        self._lock = asyncio.Lock()  # one write at a time (the task's and a shutdown's)
        self.taken = 0  # batches taken out of the pending rows to be written (see rows())
        self._task: asyncio.Task[None] | None = None
        # told of each failed write's cause (the storage's health: a Redis the counters
        # share, whose loss an idle instance would otherwise not notice)
        self.on_failure: Callable[[BaseException], None] | None = None

    def add(self, row: Row, outcome: Outcome) -> None:
        """One finished request: O(1), in memory."""
        now, hour = self.clock(), self._hour
        if not hour <= now < hour + HOUR:  # (the hour's start worked out once an hour)
            hour = self._hour = int(now) // HOUR * HOUR
        key = (hour,) + row  # noqa: RUF005 (one tuple made; (hour, *row) makes a list first)
        totals = self.pending.get(key)
        if totals is None:
            totals = self.pending[key] = [0, 0, 0, 0, 0, 0]
        totals[0] += 1
        status = outcome.status
        # An error: no answer, an answer of 400 or over, or a stream that ended on an error
        # (the upstream broke off or sent an error event, the client left, the shutdown).
        if status == 0 or status >= 400 or outcome.error is not None:
            totals[1] += 1
        usage = outcome.usage
        # (what the limits are charged: a 200's usage, or an estimate: see web/finish.py)
        if usage is not None and (status == 200 or outcome.estimated):
            prompt, completion, total, _ = usage
            totals[2] += prompt
            totals[3] += completion
            totals[4] += total
            model = outcome.model
            if model is not None and (pricing := model.pricing) is not None:
                totals[5] += pricing.cost_nano_usd(prompt, completion)

    def health(self) -> dict[str, Any]:
        """For ``/health``: rows waiting for the next write, writes done and failed, and
        whether the last ones failed (an outage in progress)."""
        return {
            "pendingRows": len(self.pending) + self.store.held,
            "writes": self.writes,
            "failedWrites": self.failures,
            "failing": self.failing > 0,
        }

    async def flush(self) -> bool:
        """Write what is pending (True: written, or nothing to write).  A batch that fails
        is merged back into the pending rows, for the next write."""
        async with self._lock:
            now = self.clock()
            hour = int(now) // HOUR
            keep_from = None
            if hour != self._pruned_hour:
                keep_from = (int(now) - self.retention_days * DAY) // HOUR * HOUR
            if not self.pending and keep_from is None and not self.store.held:
                return True
            batch, self.pending = self.pending, {}
            self.taken += 1
            try:
                await self.store.write(batch, keep_from)
            except Exception as e:
                self.failures += 1
                self.failing += 1
                cause = (e.__cause__ if isinstance(e, Kept) else None) or e
                if self.failing == 1:
                    log.warning("ledger_write_failed", error=type(cause).__name__, rows=len(batch))
                if self.on_failure is not None:
                    self.on_failure(cause)
                # (kept for the next write: what the store did not take)
                merge(self.pending, e.rows if isinstance(e, Kept) else batch.items())
                return False
            self.writes += 1
            if self.failing:
                log.info("ledger_write_recovered", failed_writes=self.failing, rows=len(batch))
                self.failing = 0
            if keep_from is not None:
                self._pruned_hour = hour
            return True

    async def rows(
        self,
        start: float,
        end: float,
        by: Sequence[str] = (),
        project: str | None = None,
        key: str | None = None,
        *,
        shared_key: str | None = None,
        deployment: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ledger's rows of the hours from ``start`` to before ``end`` (epoch seconds),
        this process's pending ones included, filtered and summed by ``by``.  Read between
        writes: a batch being written is in neither the pending rows nor, yet, the store (a
        read beside it would miss it), so a read waits for the write under way, and reads
        again when a write began while it read."""
        lo, hi = int(start) // HOUR * HOUR, int(end)
        for _ in range(READ_TRIES):
            async with self._lock:  # (a write under way ends first; reads run side by side)
                taken = self.taken
            found = await self._read(lo, hi, project)
            if self.taken == taken:  # no batch left the pending rows meanwhile
                break
        else:  # (writes kept coming: read between them)
            async with self._lock:
                found = await self._read(lo, hi, project)
        found += [(k, list(v)) for k, v in self.pending.items() if lo <= k[0] < hi]
        return aggregate(found, by, project, key, shared_key, deployment)

    async def _read(self, start: int, end: int, project: str | None) -> list[Any]:
        """The store's rows; its failure (Redis down, a disk error): a 503."""
        try:
            return await self.store.read(start, end, project)
        except Exception as e:
            log.warning("ledger_read_failed", error=type(e).__name__)
            raise LedgerUnavailable() from e

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_every)
            try:
                await self.flush()
            except Exception as e:  # (flush logs a failed write; anything else, once a round)
                log.error("ledger_flush_error", error=type(e).__name__)

    async def close(self) -> None:
        """Stop the task, write the rest (once; a failure is logged), close the store."""
        if self._task is not None:
            async with self._lock:  # (a write under way ends first: cancelled, it is lost)
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if (self.pending or self.store.held) and not await self.flush():
            log.error("ledger_rows_lost", rows=len(self.pending) + self.store.held)
        await self.store.close()


def merge(into: dict[Any, list[int]], rows: Iterable[tuple[Any, Sequence[int]]]) -> None:
    """``rows``' values added to ``into``'s, key by key (a row or a group)."""
    for key, values in rows:
        totals = into.get(key)
        if totals is None:
            into[key] = list(values)
        else:
            for i, v in enumerate(values):
                totals[i] += v


def _group(key: RowKey, by: Sequence[str]) -> tuple[Any, ...]:
    out: list[Any] = []
    for name in by:
        if name == "day":
            out.append(key[0] // DAY * DAY)
        else:
            out.append(key[DIMENSIONS.index(name)])
    return tuple(out)


def aggregate(
    found: Iterable[tuple[RowKey, Sequence[int]]],
    by: Sequence[str],
    project: str | None = None,
    key: str | None = None,
    shared_key: str | None = None,
    deployment: str | None = None,
) -> list[dict[str, Any]]:
    """Rows summed by the ``by`` groups (in that order; none: one total row), sorted."""
    for name in by:
        if name not in GROUPS:
            raise ValueError(f"cannot group by {name!r}: one of {', '.join(GROUPS)}")
    sums: dict[tuple[Any, ...], list[int]] = {}
    merge(
        sums,
        (
            (_group(row, by), values)
            for row, values in found
            if (project is None or row[1] == project)
            and (key is None or row[2] == key)
            and (shared_key is None or row[3] == shared_key)
            and (deployment is None or row[4] == deployment)
        ),
    )
    if not by and not sums:
        sums[()] = [0] * len(MEASURES)
    return [
        {**dict(zip(by, group, strict=True)), **dict(zip(MEASURES, totals, strict=True))}
        for group, totals in sorted(sums.items())
    ]


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_hours (
    hour INTEGER NOT NULL,
    project TEXT NOT NULL,
    key TEXT NOT NULL,
    shared_key TEXT NOT NULL,
    deployment TEXT NOT NULL,
    api TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    cost_nano_usd INTEGER NOT NULL,
    PRIMARY KEY (hour, project, key, shared_key, deployment, api)
) WITHOUT ROWID;
"""
_UPSERT = (
    f"INSERT INTO usage_hours ({', '.join(DIMENSIONS)}, {', '.join(MEASURES)}) "
    f"VALUES ({', '.join('?' * (len(DIMENSIONS) + len(MEASURES)))}) "
    "ON CONFLICT DO UPDATE SET " + ", ".join(f"{m} = {m} + excluded.{m}" for m in MEASURES)
)


def usage_path(state: Path) -> Path:
    """The ledger's SQLite file, beside the state file (``x.sqlite`` -> ``x.usage.sqlite``)."""
    return state.with_name(state.stem + USAGE_FILE_SUFFIX)


class SqliteLedgerStore:
    """One SQLite file (WAL), written off the event loop; created by the first write.
    Several processes may add to one file (each write is one transaction of additions)."""

    held = 0  # (a write is one transaction: all written or none)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = StateDb(path, _SCHEMA)

    def write_now(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None:
        with self._file.lock:
            db = self._file.connect(create=bool(rows))
            if db is None:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_UPSERT, [(*k, *v) for k, v in rows.items()])
                if keep_from is not None:
                    db.execute("DELETE FROM usage_hours WHERE hour < ?", (keep_from,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def read_now(
        self, start: int, end: int, project: str | None = None
    ) -> list[tuple[RowKey, list[int]]]:
        with self._file.lock:
            db = self._file.connect(create=False)
            if db is None:
                return []
            cursor = db.execute(
                f"SELECT {', '.join(DIMENSIONS)}, {', '.join(MEASURES)} FROM usage_hours "
                "WHERE hour >= ? AND hour < ?"
                + (" AND project = ?" if project is not None else ""),
                (start, end) if project is None else (start, end, project),
            )
            n = len(DIMENSIONS)
            return [(tuple(r[:n]), list(r[n:])) for r in cursor]

    async def write(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None:
        await asyncio.to_thread(self.write_now, rows, keep_from)

    async def read(
        self, start: int, end: int, project: str | None = None
    ) -> list[tuple[RowKey, list[int]]]:
        return await asyncio.to_thread(self.read_now, start, end, project)

    async def close(self) -> None:
        await self._file.close()


# --- Redis ----------------------------------------------------------------------------------

PREFIX = "dp:usage:"
_SEP = "\x1f"  # between a field's parts (never in a project, a key name or a deployment)
ROWS_PER_CALL = 500  # rows in one script call (each up to six HINCRBYs)
WRITER_TTL = 30 * DAY  # how long Redis remembers a writer's last call (see RedisLedgerStore)

# One call of a write: the rows added to their hours' hashes, the hours indexed and set to
# expire, the old hours dropped, unless Redis has this writer's call of that sequence
# number already (sent again after a timeout: it may have been applied).  The number is
# recorded first: refused (Redis out of memory, a read-only replica), nothing is applied
# and the call goes again; recorded, the script's writes are no longer refused for memory.
# A script is not undone by an error half-way, so every write after it is a pcall: a value
# that is not ours (a field that is not an integer, a key of another type) loses that
# addition, counted in the answer, and never makes the call go again (adding twice what
# went before it).
# KEYS: the writer's last sequence number, the hours' index, each hour's hash.
# ARGV: the sequence number, its TTL, keep_from ('' none), each hash's hour and expiry,
# then (hash, field, value) triples.  Answers the writes refused.
_WRITE = """
local seq = tonumber(ARGV[1])
local last = redis.pcall('GET', KEYS[1])
if type(last) == 'string' and (tonumber(last) or 0) >= seq then return 0 end
redis.call('SET', KEYS[1], seq, 'EX', ARGV[2])
local refused = 0
local function write(...)
  local answer = redis.pcall(...)
  if type(answer) == 'table' and answer.err then refused = refused + 1 end
end
local hashes = #KEYS - 2
for i = 4 + 2 * hashes, #ARGV, 3 do
  write('HINCRBY', KEYS[2 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for h = 1, hashes do
  write('EXPIREAT', KEYS[2 + h], ARGV[3 + 2 * h])
  write('ZADD', KEYS[2], ARGV[2 + 2 * h], ARGV[2 + 2 * h])
end
if ARGV[3] ~= '' then write('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3]) end
return refused
"""

# One call's rows: its sequence number, the rows, the hours to drop before (None: none).
Chunk = tuple[int, list[tuple[RowKey, Sequence[int]]], int | None]


def _field(row: RowKey, measure: int) -> str:
    return _SEP.join((*row[1:], str(measure)))


class RedisLedgerStore:
    """``dp:usage:h:<hour>``: a hash per hour, a field per row and measure; ``dp:usage:hours``:
    the hours (a sorted set scored by the hour).  Each hour's hash expires when the retention
    drops it.

    A write is sent in calls of up to :data:`ROWS_PER_CALL` rows, each numbered (this store's
    own sequence, recorded by Redis in ``dp:usage:writer:<id>`` with the call).  A call that
    failed or got no answer is kept and sent first with the next write under the same
    number: applied once whether or not Redis had it (the calls after it were not sent:
    their rows go back to the ledger).  A read adds the kept call if Redis has not applied
    it (read with the hashes, in one transaction)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        retention_days: int = RETENTION_DAYS,
        prefix: str = PREFIX,
    ) -> None:
        self.client = client
        self.retention_days = retention_days
        self.prefix = prefix
        self.owns_client = False  # (the CLI's own; a served process shares the counters')
        self._script = client.register_script(_WRITE)
        self._writer = f"{prefix}writer:{uuid.uuid4().hex}"
        self._seq = 0  # the last call numbered
        self._held: list[Chunk] = []  # calls not yet confirmed, in order

    @property
    def held(self) -> int:
        return sum(len(rows) for _, rows, _ in self._held)

    async def write(self, rows: Mapping[RowKey, Sequence[int]], keep_from: int | None) -> None:
        items = list(rows.items())
        calls = list(self._held)  # (a new list: a read may hold the old one)
        for first in range(0, max(len(items), keep_from is not None), ROWS_PER_CALL):
            self._seq += 1
            calls.append((self._seq, items[first : first + ROWS_PER_CALL], keep_from))
            keep_from = None
        self._held = calls
        for i, call in enumerate(calls):
            try:
                await self._send(call)
            except Exception as e:
                # It may have been applied: kept, to go again as it is.  Those after it
                # were not sent: the caller's again (merged with what comes meanwhile, so
                # an outage holds one call here however many writes fail).
                self._held = [call]
                raise Kept([row for _, rows, _ in calls[i + 1 :] for row in rows]) from e
            self._held = calls[i + 1 :]

    async def _send(self, call: Chunk) -> None:
        seq, rows, keep_from = call
        keys: list[str] = [self._writer, self.prefix + "hours"]
        hashes: dict[int, int] = {}  # hour: its hash's number among the KEYS (1...)
        triples: list[int | str] = []
        for row, values in rows:
            hour = row[0]
            n = hashes.get(hour)
            if n is None:
                n = hashes[hour] = len(hashes) + 1
                keys.append(f"{self.prefix}h:{hour}")
            for measure, v in enumerate(values):
                if v:
                    triples += (n, _field(row, measure), v)
        args: list[int | str] = [seq, WRITER_TTL, "" if keep_from is None else keep_from]
        for hour in hashes:
            args += (hour, hour + HOUR + self.retention_days * DAY)
        refused = await self._script(keys=keys, args=args + triples, client=self.client)
        if refused:  # (a value in Redis that is not the ledger's: said, not retried)
            log.warning("ledger_writes_refused", writes=refused, prefix=self.prefix)

    async def read(
        self, start: int, end: int, project: str | None = None
    ) -> list[tuple[RowKey, list[int]]]:
        """Whole hours (a project's rows are picked out by the caller), with the calls this
        store keeps that Redis has not applied."""
        held = self._held  # (replaced, never changed, by a write: this is a snapshot)
        listed = await self.client.zrangebyscore(self.prefix + "hours", start, f"({end}")
        hours = {hour for hour in map(_integer, listed) if hour is not None}
        kept = [(seq, [r for r in rows if start <= r[0][0] < end]) for seq, rows, _ in held]
        hours.update(row[0] for _, rows in kept for row, _ in rows)
        if not hours:
            return []
        pipe = self.client.pipeline(transaction=True)  # (the hashes and the writer's number
        pipe.get(self._writer)  # at one moment: a kept call is in the hashes or added here)
        for hour in sorted(hours):
            pipe.hgetall(f"{self.prefix}h:{hour}")
        # (what is not the ledger's is skipped: a key of another type, a field that is not
        # one of its rows, a value that is not an integer)
        applied, *hashes = await pipe.execute(raise_on_error=False)
        found: dict[RowKey, list[int]] = {}
        for hour, fields in zip(sorted(hours), hashes, strict=True):
            if not isinstance(fields, dict):
                continue
            for name, value in fields.items():
                *parts, measure = _decoded(name).split(_SEP)
                index, amount = _integer(measure), _integer(value)
                if len(parts) != len(DIMENSIONS) - 1 or index is None or amount is None:
                    continue
                if not 0 <= index < len(MEASURES):
                    continue
                row: RowKey = (hour, *parts)  # type: ignore[assignment]
                totals = found.get(row)
                if totals is None:
                    totals = found[row] = [0] * len(MEASURES)
                totals[index] += amount
        try:  # (as the script reads it: Lua's tonumber, else none applied)
            last = float(_decoded(applied)) if isinstance(applied, (str, bytes)) else 0.0
        except ValueError:
            last = 0.0
        for seq, rows in kept:
            if seq > last:
                merge(found, rows)
        return list(found.items())

    async def close(self) -> None:
        if self.owns_client:
            await self.client.aclose()


def _decoded(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _integer(value: Any) -> int | None:
    """``value`` (a Redis answer) as an integer; None when it is none."""
    try:
        return int(_decoded(value))
    except ValueError:
        return None


# --- dialproxy usage: the rows printed ------------------------------------------------------

FORMATS = ("table", "csv", "json")


def _cell(name: str, value: Any) -> Any:
    if name == "hour":
        return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(value))
    if name == "day":
        return time.strftime("%Y-%m-%d", time.gmtime(value))
    return value


def usd(nano: int) -> str:
    """Nano-USD as an exact decimal string of dollars."""
    sign, nano = ("-", -nano) if nano < 0 else ("", nano)
    return f"{sign}{nano // 1_000_000_000}.{nano % 1_000_000_000:09d}"


def printable(rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows as printed: hours and days as ISO text, the cost in USD (and in nano-USD)."""
    return [
        {name: _cell(name, row[name]) for name in by}
        | {m: row[m] for m in MEASURES[:5]}
        | {"cost_usd": usd(row["cost_nano_usd"]), "cost_nano_usd": row["cost_nano_usd"]}
        for row in rows
    ]


def render(rows: Sequence[Mapping[str, Any]], by: Sequence[str], fmt: str) -> str:
    """The ``dialproxy usage`` output: ``table`` (aligned, with a total line), ``csv`` (a
    header line, then a line per row) or ``json`` (a list of objects)."""
    out = printable(rows, by)
    if fmt == "json":
        return json.dumps(out, indent=2) + "\n"
    columns = [*by, *MEASURES[:5], "cost_usd"] + (["cost_nano_usd"] if fmt == "csv" else [])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)
        return buffer.getvalue()
    lines = [[str(row[c]) for c in columns] for row in out]
    if len(out) > 1 and by:
        total = {m: sum(row[m] for row in rows) for m in MEASURES}
        lines.append(
            ["total"]
            + [""] * (len(by) - 1)
            + [str(total[m]) for m in MEASURES[:5]]
            + [usd(total["cost_nano_usd"])]
        )
    widths = [max([len(c)] + [len(line[i]) for line in lines]) for i, c in enumerate(columns)]
    numeric = len(by)  # (the measures are right-aligned)

    def text(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [text(line) for line in lines]
    if len(out) > 1 and by:
        body.insert(-1, rule)
    return "\n".join([text(columns), rule, *body]) + "\n"
