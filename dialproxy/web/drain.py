"""Stopping a served process: the grace for requests in flight, then the streams still open.

SIGTERM (or SIGINT) runs :func:`shut_down`:

1. the listening sockets close: a new connection is refused;
2. idle keep-alive connections close; a busy one closes after the request it is serving;
3. requests in flight get the grace (``--shutdown-timeout``, 30 s by default) to finish;
4. once the grace runs out, every stream still open is ended with an SSE error event
   (``data: {"error": {...}}``) by :meth:`Drain.end_streams`, and whatever else is still
   running gets :data:`FINISH_TIMEOUT` to end (aiohttp's shutdown, given that timeout
   rather than the grace: it applies its timeout twice, once to wait, once after cancelling);
5. the app's cleanup runs (usage records still pending are written) and the process exits 0.

A stream relay registers its task with :meth:`Drain.relay` for the time it runs: a set add and
discard per streamed request, nothing per chunk and no timer.  Ending a relay is cancelling
its task, which the relay undoes (``Task.uncancel``) to write the error event and finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

_log = structlog.get_logger("dialproxy.shutdown")

# After the grace: how long aiohttp waits for the handlers to finish (twice, at most).
FINISH_TIMEOUT = 0.5
# How often the grace checks whether every request in flight is done.
_POLL = 0.05


class Drain:
    """The stream relays running now, and the end of the grace, which ends them."""

    __slots__ = ("_ending", "_open", "over")

    def __init__(self) -> None:
        self._open: set[asyncio.Task[object]] = set()
        self._ending: set[asyncio.Task[object]] = set()  # cancelled by end_streams
        self.over = False  # the grace is over: what is cancelled now is the shutdown's

    def __len__(self) -> int:
        return len(self._open)

    async def relay(
        self, response: web.StreamResponse, relay: Awaitable[None], farewell: Callable[[], bytes]
    ) -> bool:
        """Await ``relay`` (the stream's relay); when :meth:`end_streams` ends it first,
        write ``farewell()`` (an SSE error event, as it goes after what was relayed) and end
        the response.  True in that case."""
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            await relay
        except asyncio.CancelledError:
            # Ours alone: the stream ends with the event.  Anyone else's (a client that went
            # away, aiohttp's own cancel) goes on as a cancellation.
            if task not in self._ending or task.uncancel() > 0:
                raise
        else:
            if task not in self._ending:
                return False
            task.uncancel()  # (the relay swallowed the cancel and ended by itself)
            return True
        finally:
            self._open.discard(task)
            self._ending.discard(task)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client is gone
            await response.write(farewell())
            await response.write_eof()
        return True

    def end_streams(self) -> int:
        """End every stream still relayed (the grace is over); how many there were."""
        self.over = True
        ended = 0
        for task in self._open - self._ending:
            if not task.done():
                self._ending.add(task)
                task.cancel()
                ended += 1
        return ended


async def shut_down(runner: web.AppRunner, drain: Drain, grace: float) -> None:
    """The sequence above.  ``runner`` was made with ``shutdown_timeout=FINISH_TIMEOUT``."""
    for site in list(runner.sites):
        await site.stop()  # no new connections
    server = runner.server
    if server is not None:
        server.pre_shutdown()  # idle connections now, busy ones after their request
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while server.connections:  # (a check every _POLL: no event says the last one went)
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(_POLL, left))
    ended = drain.end_streams()
    if ended:
        _log.warning("grace_over", grace_seconds=grace, streams_ended=ended)
    await runner.cleanup()
