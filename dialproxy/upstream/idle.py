"""The upstream idle timeout, kept by one periodic check instead of a timer per request.

A timer per request is what :mod:`dialproxy.stalls` avoids (aiohttp's ``sock_read`` even
re-arms one on every chunk that arrives).  So :class:`IdleWatch` looks, every ``period``,
at what is waiting on an upstream:

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
from types import TracebackType

import aiohttp
from aiohttp import StreamReader

from dialproxy.stalls import StallWatch


class HeadersWait:
    """``async with``: the block waits for an answer's headers, for at most ``idle``."""

    __slots__ = ("cancelling", "expired", "since", "task", "watch")

    def __init__(self, watch: IdleWatch) -> None:
        self.watch = watch
        self.since: float | None = None  # first seen by a check
        self.expired = False

    def enter(self) -> HeadersWait:
        """The wait begins (``async with``'s enter, as a plain call: the request path's
        retry loop calls it and :meth:`exit` without two coroutines a request)."""
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()
        self.watch._waits.add(self)
        return self

    def exit(self, exc: BaseException | None) -> None:
        """The wait ends, the block having raised ``exc`` (None: it did not): raises
        ``TimeoutError`` from the cancellation that the timeout made."""
        self.watch._waits.discard(self)
        if (
            self.expired
            and self.task.uncancel() <= self.cancelling
            and type(exc) is asyncio.CancelledError
        ):
            raise TimeoutError("No answer from the upstream") from exc

    async def __aenter__(self) -> None:
        self.enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exit(exc)


class IdleWatch(StallWatch[aiohttp.ClientResponse]):
    """The upstream idle timeout: waits for headers (:meth:`headers`) and answers whose body
    is read (:meth:`watch` / :meth:`release`)."""

    def __init__(self, idle: float) -> None:
        super().__init__(idle)
        self._waits: set[HeadersWait] = set()

    def headers(self) -> HeadersWait:
        return HeadersWait(self)

    def stream(self, read: aiohttp.ClientResponse) -> StreamReader:
        return read.content

    def stalled(self, read: aiohttp.ClientResponse) -> None:
        read.content.set_exception(
            aiohttp.SocketTimeoutError("Timeout on reading data from socket")
        )
        read.close()

    def check(self, now: float) -> None:
        """Time out what has waited ``idle`` seconds with nothing from its upstream."""
        for wait in list(self._waits):
            if wait.since is None:
                wait.since = now
            elif now - wait.since >= self.idle:
                self._waits.discard(wait)
                wait.expired = True
                wait.task.cancel()
        super().check(now)
