"""Reads that must keep moving, watched by one periodic check instead of a timer each.

A timer costs much more than it looks (arming and cancelling one is about 40k instructions
of a proxied request's ~960k: the event loop's heap of timer handles compares them in
Python).  A :class:`StallWatch` looks, every ``period``, at the reads it holds: one that has
received no byte for ``idle`` seconds is stalled (:meth:`StallWatch.stalled`, which each
kind of read defines).  A read is first seen by a check, so a stall is found between
``idle`` and ``idle`` plus two periods of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

from aiohttp import StreamReader

from dialproxy.errors import BodyTimeout

Read = TypeVar("Read")


class StallWatch(Generic[Read]):
    def __init__(self, idle: float) -> None:
        self.idle = idle  # <= 0: never stalled (no check runs)
        self.period = min(1.0, idle / 4)
        # read -> [bytes received when last seen to move, loop time then (None: not yet)]
        self._reads: dict[Read, list[float | None]] = {}

    def watch(self, read: Read) -> None:
        self._reads[read] = [-1, None]

    def release(self, read: Read) -> None:
        self._reads.pop(read, None)

    def stream(self, read: Read) -> StreamReader:
        """The bytes ``read`` receives (whose count shows it moving)."""
        raise NotImplementedError

    def stalled(self, read: Read) -> None:
        """What becomes of a read that stalled (it is no longer watched)."""
        raise NotImplementedError

    def check(self, now: float) -> None:
        for read, seen in list(self._reads.items()):
            received = self.stream(read).total_bytes
            since = seen[1]
            if received != seen[0] or since is None:
                seen[0], seen[1] = received, now
            elif now - since >= self.idle:
                del self._reads[read]
                self.stalled(read)

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


class BodyWatch(StallWatch[StreamReader]):
    """The body timeout: a body being read that receives no byte for ``idle`` seconds gets
    :class:`BodyTimeout` (within ``idle`` plus two periods)."""

    @contextlib.contextmanager
    def watching(self, stream: StreamReader) -> Iterator[None]:
        self.watch(stream)
        try:
            yield
        finally:
            self.release(stream)

    def stream(self, read: StreamReader) -> StreamReader:
        return read

    def stalled(self, read: StreamReader) -> None:
        read.set_exception(BodyTimeout("The request body stopped arriving"))
