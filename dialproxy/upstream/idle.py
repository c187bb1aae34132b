"""The upstream idle timeout, kept by one periodic check instead of a timer per request.

A timer costs much more than it looks: arming and cancelling one (aiohttp's ``sock_read``,
or ``asyncio.timeout``) costs about 40k instructions of a proxied request's ~960k, the event
loop's heap of timer handles comparing them in Python; aiohttp's ``sock_read`` re-arms one
on every chunk that arrives.  So :class:`IdleWatch` looks, every ``period``, at what is
waiting on an upstream:

- a request waiting for its answer's headers (:meth:`IdleWatch.headers`, around the
  request): its task is cancelled once it has waited ``idle`` seconds, and the block raises
  ``TimeoutError``, as ``asyncio.timeout`` does (a cancellation from elsewhere, a client
  that went away, still comes through as a cancellation);
- an answer whose body is read (:meth:`IdleWatch.watch` / :meth:`IdleWatch.release`): once
  it has received no byte for ``idle`` seconds it fails as aiohttp's own timeout fails it
  (``SocketTimeoutError``), so the same handling applies.

A wait is first seen by a check, so the timeout falls between ``idle`` and ``idle`` plus two
periods of silence (300 to 302 s with the default).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

import aiohttp


class HeadersWait:
    """``async with``: the block waits for an answer's headers, for at most ``idle``."""

    __slots__ = ("cancelling", "expired", "since", "task", "watch")

    def __init__(self, watch: IdleWatch) -> None:
        self.watch = watch
        self.since: float | None = None  # first seen by a check
        self.expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()
        self.watch._waits.add(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.watch._waits.discard(self)
        if (
            self.expired
            and self.task.uncancel() <= self.cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError("No answer from the upstream") from exc


class IdleWatch:
    def __init__(self, idle: float) -> None:
        self.idle = idle  # <= 0: no idle timeout
        self.period = min(1.0, idle / 4)
        self._waits: set[HeadersWait] = set()
        # answer -> [bytes received when last seen to move, loop time then (None: not yet)]
        self._answers: dict[aiohttp.ClientResponse, list[float | None]] = {}

    def headers(self) -> HeadersWait:
        return HeadersWait(self)

    def watch(self, answer: aiohttp.ClientResponse) -> None:
        self._answers[answer] = [-1, None]

    def release(self, answer: aiohttp.ClientResponse) -> None:
        self._answers.pop(answer, None)

    def check(self, now: float) -> None:
        """Time out what has waited ``idle`` seconds with nothing from its upstream."""
        for wait in list(self._waits):
            if wait.since is None:
                wait.since = now
            elif now - wait.since >= self.idle:
                self._waits.discard(wait)
                wait.expired = True
                wait.task.cancel()
        for answer, seen in list(self._answers.items()):
            received = answer.content.total_bytes
            since = seen[1]
            if received != seen[0] or since is None:
                seen[0], seen[1] = received, now
            elif now - since >= self.idle:
                del self._answers[answer]
                answer.content.set_exception(
                    aiohttp.SocketTimeoutError("Timeout on reading data from socket")
                )
                answer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The periodic check, for as long as the block runs."""
        if self.idle <= 0:
            yield
            return
        loop = asyncio.get_running_loop()

        async def run() -> None:
            while True:
                await asyncio.sleep(self.period)
                self.check(loop.time())

        task = loop.create_task(run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
